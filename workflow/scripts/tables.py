"""Snakemake glue for rule tables."""

from notbugs.runtime import start_logging
from notbugs.tables import write_tables


def main(smk):
    start_logging(smk.log[0])
    write_tables(dict(zip(smk.params.model_dirs, smk.input.metrics)),
                 dict(zip(smk.params.model_dirs, smk.input.predictions)),
                 dict(zip(smk.params.constructions, smk.input.constructed)), smk.input.data,
                 figure2_rows=smk.params.figure2_rows, figure2_eps=smk.params.figure2_eps,
                 comparisons=smk.params.comparisons,
                 autoattack_files=dict(zip(smk.params.autoattack_dirs, smk.input.autoattack)),
                 outputs={key: smk.output[key] for key in ("models", "table1", "figure2", "claims", "summary")})


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
