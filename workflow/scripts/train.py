"""Snakemake glue for rules train_source and train_target."""

from pathlib import Path

from notbugs import hdf5
from notbugs.runtime import start_job
from notbugs.train import train


def main(smk):
    device = start_job(smk.log[0], smk.threads, smk.params.device)
    with hdf5.open_artifact(smk.input.data, kind="data") as data:
        mean, std, classes = data.attrs["mean"], data.attrs["std"], data.class_names
    train_file = smk.input.get("train_set", smk.input.data)
    images, labels = hdf5.load_split(train_file, "train")
    train(images, labels, arch=smk.params.arch, num_classes=len(classes), mean=mean, std=std,
          cfg=smk.params.train, seed=smk.params.seed, out_dir=Path(smk.output.model).parent,
          device=device, checkpoint_config={"rule": smk.rule, "train_set": str(train_file)})


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
