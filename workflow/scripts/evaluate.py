"""Snakemake glue for rules evaluate_source and evaluate_target (one or several models a job)."""

from notbugs.evaluate import evaluate_checkpoint
from notbugs.runtime import start_job


def main(smk):
    device = start_job(smk.log[0], smk.threads, smk.params.device)
    for model, metrics, predictions in zip(smk.input.models, smk.output.metrics, smk.output.predictions):
        evaluate_checkpoint(model, smk.input.data, smk.params.evaluation, metrics, device=device,
                            seed=smk.params.seed, predictions=predictions, fast=smk.params.fast)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
