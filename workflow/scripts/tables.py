"""Snakemake glue for rule tables."""

from notbugs.evaluate import write_tables
from notbugs.runtime import start_logging


def main(smk):
    start_logging(smk.log[0])
    write_tables(dict(zip(smk.params.model_dirs, smk.input.metrics)),
                 dict(zip(smk.params.constructions, smk.input.constructed)),
                 smk.input.data, smk.params.figure2_rows, smk.output)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
