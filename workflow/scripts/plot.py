"""Snakemake glue for the plot_* rules."""

import pandas as pd

from notbugs import hdf5, plots
from notbugs.runtime import start_logging


def main(smk):
    start_logging(smk.log[0])
    out = smk.output[0]
    if smk.rule == "plot_figure2":
        plots.figure2(pd.read_csv(smk.input[0]), out)
    elif smk.rule == "plot_table1":
        plots.table1(pd.read_csv(smk.input[0]), out)
    elif smk.rule == "plot_training_curves":
        plots.training_curves({name: pd.read_csv(path) for name, path in zip(smk.params.names, smk.input)}, out)
    elif smk.rule == "plot_grid":
        n = smk.params.examples
        with hdf5.open_artifact(smk.input.constructed, kind="constructed") as cons, \
                hdf5.open_artifact(smk.input.data, kind="data") as data:
            split = cons.split("train")
            # Constructed rows keep the original order, so orig_index[:n] is increasing.
            original = data.split("train").images[split["orig_index"][:n]]
            plots.image_grid(original, split.images[:n], split["orig_label"][:n], split.labels[:n], cons.class_names,
                             out, amplify=smk.params.amplify, title=f"{smk.wildcards.name}: {cons.attrs['source']}")
    elif smk.rule == "plot_transfer":
        plots.transfer(pd.read_csv(smk.input[0]), out)
    elif smk.rule == "plot_robust_leakage":
        plots.robust_leakage(pd.read_csv(smk.input[0]), pd.read_csv(smk.input[1]), out)
    elif smk.rule == "plot_gaussian":
        plots.gaussian(*(pd.read_csv(path) for path in smk.input), out)
    elif smk.rule == "plot_rebuttals":
        plots.rebuttals(pd.read_csv(smk.input[0]), out)
    else:
        raise ValueError(f"unknown plot rule {smk.rule}")


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
