"""Snakemake glue for the study_* rules."""

from pathlib import Path

from notbugs import hdf5, studies
from notbugs.models import accelerate, load_model
from notbugs.runtime import start_job


def write(table, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False, float_format="%.6g")


def transfer(smk, device):
    source = accelerate(load_model(smk.input.source, device=device)[0], smk.params.fast)
    victims = {arch: accelerate(load_model(path, device=device)[0], smk.params.fast)
               for arch, path in zip(smk.params.archs, smk.input.standard)}
    with hdf5.open_artifact(smk.input.data, kind="data") as data:
        test, n_classes = data.split("test"), len(data.class_names)
        rates = studies.transfer_rates(source, victims, test.images[:], test.labels, smk.params.construction,
                                       n_classes, seed=smk.params.seed, device=device)
    learned = {a: studies.read_metrics(p) for a, p in zip(smk.params.archs, smk.input.learned_metrics)}
    standard = {a: studies.read_metrics(p) for a, p in zip(smk.params.archs, smk.input.standard_metrics)}
    write(studies.transfer_table(rates, learned, standard), smk.output[0])


def robust_leakage(smk, device):
    model, _ = load_model(smk.input.linear)
    with hdf5.open_artifact(smk.input.data, kind="data") as data:
        train, test = data.split("train"), data.split("test")
        n_classes, image_shape = len(data.class_names), train.images.shape[1:]
        weights, bias = studies.linear_features(model, image_shape)
        features = studies.certify_linear_features(weights, bias, train.images[:], train.labels,
                                                   smk.params.study["eps"])
        sets = {"d": (train.images[:], train.labels)}
        for name, path in zip(smk.params.constructions, smk.input.constructed):
            sets[name] = hdf5.load_split(path, "train", kind="constructed")
        deep = {n: studies.read_metrics(p) for n, p in zip(smk.params.deep_sets, smk.input.deep_metrics)}
        table = studies.robust_leakage_table(weights, bias, sets, (test.images[:], test.labels), n_classes, deep,
                                             steps=smk.params.study["feature_epochs"])
    write(table, smk.output.accuracy)
    write(features, smk.output.features)


def gaussian(smk, device):
    from notbugs.gaussian import run_study
    tables = run_study(smk.params.study, seed=smk.params.seed)
    for key in ("fits", "misalignment", "eigen"):
        write(tables[key], getattr(smk.output, key))


def rebuttals(smk, device):
    judge, _ = load_model(smk.input.judge, device=device)
    nakkiran = {}
    for name, path, metrics in zip(smk.params.names, smk.input.constructed, smk.input.learned_metrics):
        with hdf5.open_artifact(path, kind="constructed") as cons:
            method = cons.attrs["method"]
        nakkiran[name] = {"method": method, **studies.constructed_summary(path),
                          "judge_transfer_rate": studies.judged_transfer_rate(judge, path, device),
                          "target_test_acc": 100 * studies.read_metrics(metrics)["std_acc"]}
    with hdf5.open_artifact(smk.input.data, kind="data") as data:
        train_rows = len(data.split("train"))
    wallace = {"train_set": Path(smk.input.relabelled).stem,
               "rows": studies.constructed_summary(smk.input.relabelled)["rows"], "train_rows": train_rows,
               "relabeller_test_acc": 100 * studies.read_metrics(smk.input.relabeller_metrics)["std_acc"],
               "target_test_acc": 100 * studies.read_metrics(smk.input.relabel_metrics)["std_acc"]}
    write(studies.rebuttals_table(nakkiran, wallace), smk.output[0])


STUDY_RULES = {"study_transfer": transfer, "study_robust_leakage": robust_leakage, "study_gaussian": gaussian,
               "study_rebuttals": rebuttals}


def main(smk):
    device = start_job(smk.log[0], smk.threads, smk.params.get("device", "auto"))
    STUDY_RULES[smk.rule](smk, device)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
