"""Snakemake glue for rule evaluate."""

from notbugs.evaluate import evaluate_checkpoint
from notbugs.runtime import start_job


def main(smk):
    device = start_job(smk.log[0], smk.threads, smk.params.device)
    evaluate_checkpoint(smk.input.model, smk.input.data, smk.params.evaluation, smk.output.metrics,
                        device=device, seed=smk.params.seed, predictions=smk.output.predictions,
                        fast=smk.params.fast)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
