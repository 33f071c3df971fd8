"""Snakemake glue for rule construct."""

from notbugs.construct import construct
from notbugs.runtime import start_job


def main(smk):
    device = start_job(smk.log[0], smk.threads, smk.params.device)
    construct(smk.wildcards.name, smk.params.construction, data_path=smk.input.data,
              source_checkpoint=smk.input.get("source"), output=smk.output[0],
              seed=smk.params.seed, device=device, chunk_size=smk.params.chunk_size,
              ensemble_checkpoints=list(smk.input.ensemble), fast=smk.params.fast,
              twin=smk.input.get("twin"), check_checkpoint=smk.input.get("check"),
              drop_checkpoint=smk.input.get("drop"), attacked=smk.input.get("attacked"))


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
