"""Snakemake glue for rules train_source and train_target (one or several replicates a job)."""

from pathlib import Path

from notbugs.runtime import start_job, start_logging
from notbugs.train import job_spec, launch_distributed, run_job


def main(smk):
    train_cfg = dict(smk.params.train)
    use_extra_train = train_cfg.pop("use_extra_train", False)  # see common.smk's source_train_params
    job = job_spec(rule=smk.rule, data=smk.input.data, train_set=smk.input.get("train_set", smk.input.data),
                   arch=smk.params.arch, train_cfg=train_cfg, seeds=smk.params.seeds,
                   out_dirs=[Path(model).parent for model in smk.output.models],
                   validation=smk.params.validation, device=smk.params.device, threads=smk.threads,
                   use_extra_train=use_extra_train)
    if job["train"]["processes"] > 1:
        start_logging(smk.log[0])
        launch_distributed(job, smk.log[0])
    else:
        run_job(job, start_job(smk.log[0], smk.threads, smk.params.device))


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
