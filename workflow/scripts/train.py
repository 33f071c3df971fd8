"""Snakemake glue for rules train_source and train_target (one or several replicates a job)."""

import shutil
from pathlib import Path

from notbugs import hdf5
from notbugs.runtime import start_job
from notbugs.train import train


def main(smk):
    device = start_job(smk.log[0], smk.threads, smk.params.device)
    with hdf5.open_artifact(smk.input.data, kind="data") as data:
        mean, std, classes = data.attrs["mean"], data.attrs["std"], data.class_names
        val = (data.split("val").images[:], data.split("val").labels) if "val" in data.splits else None
    train_file = smk.input.get("train_set", smk.input.data)
    images, labels = hdf5.load_split(train_file, "train")
    out_dirs = [Path(model).parent for model in smk.output.models]
    for out_dir, seed in zip(out_dirs, smk.params.seeds):
        # Resume state is kept until every replicate of the job is done: if the job is killed,
        # Snakemake deletes its finished outputs too, and the rerun restores them from it.
        train(images, labels, arch=smk.params.arch, num_classes=len(classes), mean=mean, std=std,
              cfg=smk.params.train, seed=seed, out_dir=out_dir, device=device,
              checkpoint_config={"rule": smk.rule, "train_set": str(train_file)}, val=val,
              val_cfg=smk.params.validation, keep_resume_state=True)
    for out_dir in out_dirs:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
