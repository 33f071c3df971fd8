"""Snakemake glue for rule prepare_data."""

from notbugs.data import prepare
from notbugs.runtime import start_job


def main(smk):
    start_job(smk.log[0], 1, device="cpu")
    prepare(smk.params.dataset, smk.params.seed, smk.output[0], workers=smk.threads)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
