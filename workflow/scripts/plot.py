"""Snakemake glue for the plot_* rules: ``params.plot`` names the figure."""

import pandas as pd

from notbugs import hdf5, plots
from notbugs.runtime import start_logging


def grid(smk, out):
    n = smk.params.examples
    with hdf5.open_artifact(smk.input.constructed, kind="constructed") as cons, \
            hdf5.open_artifact(smk.input.data, kind="data") as data:
        split = cons.split("train")
        # Constructed rows keep the original order, so orig_index[:n] is increasing.
        original = data.split("train").images[split["orig_index"][:n]]
        plots.image_grid(original, split.images[:n], split["orig_label"][:n], split.labels[:n], cons.class_names,
                         out, amplify=smk.params.amplify, title=f"{smk.wildcards.name}: {cons.attrs['source']}")


def tables(smk):
    return [pd.read_csv(path) for path in smk.input]


PLOTS = {
    "figure2": lambda smk, out: plots.figure2(*tables(smk), out),
    "table1": lambda smk, out: plots.table1(*tables(smk), out),
    "training_curves": lambda smk, out: plots.training_curves(dict(zip(smk.params.names, tables(smk))), out),
    "grid": grid,
    "summary_page": lambda smk, out: plots.summary_page(smk.input.summary, smk.input.figure2, out),
    "transfer": lambda smk, out: plots.transfer(*tables(smk), out),
    "robust_leakage": lambda smk, out: plots.robust_leakage(*tables(smk), out),
    "gaussian": lambda smk, out: plots.gaussian(*tables(smk), out),
    "rebuttals": lambda smk, out: plots.rebuttals(*tables(smk), out),
}


def main(smk):
    start_logging(smk.log[0])
    PLOTS[smk.params.plot](smk, smk.output[0])


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
