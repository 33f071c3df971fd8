"""Snakemake glue for rule tables."""

from notbugs.runtime import start_logging
from notbugs.tables import write_tables


def main(smk):
    start_logging(smk.log[0])
    write_tables(dict(zip(smk.params.model_dirs, smk.input.metrics)),
                 dict(zip(smk.params.constructions, smk.input.constructed)),
                 smk.input.data, smk.params.figure2_rows, smk.params.figure2_eps,
                 {key: smk.output[key] for key in ("models", "table1", "figure2")})


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
