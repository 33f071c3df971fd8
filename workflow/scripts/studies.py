"""Snakemake glue for the study_* rules."""

from notbugs import studies
from notbugs.gaussian import run_study
from notbugs.runtime import start_job


def transfer(smk, device):
    archs = smk.params.archs
    table = studies.transfer_study(
        source_path=smk.input.source, standard_paths=dict(zip(archs, smk.input.standard)),
        learned_metrics=dict(zip(archs, smk.input.learned_metrics)),
        standard_metrics=dict(zip(archs, smk.input.standard_metrics)), data_path=smk.input.data,
        construction=smk.params.construction, fast=smk.params.fast, seed=smk.params.seed,
        batch_size=smk.params.batch_size, device=device, ensemble_paths=list(smk.input.ensemble))
    studies.write_table(table, smk.output[0])


def robust_leakage(smk, device):
    accuracy, features = studies.robust_leakage_study(
        linear_path=smk.input.linear, data_path=smk.input.data,
        constructed=dict(zip(smk.params.constructions, smk.input.constructed)),
        deep_metrics=dict(zip(smk.params.deep_sets, smk.input.deep_metrics)),
        eps=smk.params.study["eps"], feature_epochs=smk.params.study["feature_epochs"])
    studies.write_table(accuracy, smk.output.accuracy)
    studies.write_table(features, smk.output.features)


def gaussian(smk, device):
    tables = run_study(smk.params.study, seed=smk.params.seed)
    for key in ("fits", "misalignment", "eigen"):
        studies.write_table(tables[key], getattr(smk.output, key))


def rebuttals(smk, device):
    names = smk.params.names
    table = studies.rebuttals_study(
        judge_path=smk.input.judge, source_path=smk.input.source, ensemble_paths=list(smk.input.ensemble),
        constructed=dict(zip(names, smk.input.constructed)), constructions=dict(zip(names, smk.params.constructions)),
        learned_metrics=dict(zip(names, smk.input.learned_metrics)), relabelled_path=smk.input.relabelled,
        relabel_metrics=smk.input.relabel_metrics, relabeller_metrics=smk.input.relabeller_metrics,
        data_path=smk.input.data, fast=smk.params.fast, seed=smk.params.seed, batch_size=smk.params.batch_size,
        device=device)
    studies.write_table(table, smk.output[0])


STUDIES = {"transfer": transfer, "robust_leakage": robust_leakage, "gaussian": gaussian, "rebuttals": rebuttals}


def main(smk):
    device = start_job(smk.log[0], smk.threads, smk.params.device)
    STUDIES[smk.params.study_name](smk, device)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
