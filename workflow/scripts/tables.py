"""Snakemake glue for rule tables."""

from notbugs.evaluate import write_tables
from notbugs.runtime import start_job


def main(smk):
    start_job(smk.log[0], 1, device="cpu")
    write_tables(dict(zip(smk.params.model_dirs, smk.input.metrics)),
                 dict(zip(smk.params.constructions, smk.input.constructed)),
                 smk.input.data, smk.params.figure2_rows, smk.output)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
