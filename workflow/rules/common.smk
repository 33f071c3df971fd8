import re
import shutil
from pathlib import Path

from snakemake.exceptions import WorkflowError

# Only torch-free modules: every Snakemake start (each dry run, each cluster job) parses this.
from notbugs.config import (ORIGINAL_SET, LINEAR_SOURCE, RELABEL_SET, RELABEL_SOURCE, TARGETED_ATTACK_METHODS,
                            ConfigError, attack_repeated_by, autoattack_config, fresh_sources, nontransferable_set,
                            pgd_config, rebuttal_sets, source_seed, target_train_config, validate_config)
from notbugs.sampling import target_seed

try:
    validate_config(config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml")
except ConfigError as exc:
    raise WorkflowError(f"Invalid configuration: {exc}")


DATASET = config["dataset"]["name"]
RESULTS = f"results/{DATASET}"
LOGS = f"logs/{DATASET}"
# Snakemake's per-job wall time, CPU-seconds and peak memory; `notbugs bench --stages` sums them.
BENCHMARKS = f"benchmarks/{DATASET}"
SOURCES = sorted(config["sources"])
CONSTRUCTIONS = sorted(config["constructions"])
TRAIN_SETS = list(config["targets"]["train_sets"])
TARGET_ARCHS = list(config["targets"]["archs"])
REPLICATES = list(range(1, config["targets"]["replicates"] + 1))
GROUP_REPLICATES = config["targets"]["group_replicates"]


def _wants_gpu():
    device = config["device"]
    if device.startswith("cuda"):
        return 1
    return int(device == "auto" and shutil.which("nvidia-smi") is not None)


GPU = _wants_gpu()


def rule_threads(rule):
    return config["threads_by_rule"].get(rule, config["threads"])


def target_dir(train_set, arch, replicate=1):
    """One target model's directory under RESULTS; the studies use replicate 1."""
    return f"targets/{train_set}/{arch}/r{replicate}"


def target_files(name):
    """Output pattern of a target job: every replicate's file when replicates share a job,
    else the file of replicate {replicate}."""
    if GROUP_REPLICATES:
        return [f"{RESULTS}/targets/{{train_set}}/{{arch}}/r{k}/{name}" for k in REPLICATES]
    return [f"{RESULTS}/targets/{{train_set}}/{{arch}}/r{{replicate}}/{name}"]


def _target_job_file(root, stage, suffix):
    replicate = "" if GROUP_REPLICATES else "_r{replicate}"
    return f"{root}/{stage}/{{train_set}}/{{arch}}{replicate}{suffix}"


def target_job_log(stage):
    return _target_job_file(LOGS, stage, ".log")


def target_job_benchmark(stage):
    return _target_job_file(BENCHMARKS, stage, ".tsv")


def job_replicates(wildcards):
    return REPLICATES if GROUP_REPLICATES else [int(wildcards.replicate)]


def model_dirs():
    sources = [f"sources/{s}" for s in SOURCES]
    targets = [target_dir(t, a, r) for t in TRAIN_SETS for a in TARGET_ARCHS for r in REPLICATES]
    return sources + targets


def figure2_model_dirs():
    """Every model behind a Figure 2 bar: a source, or each replicate of a target group."""
    dirs = []
    for group in config["figures"]["figure2"].values():
        dirs += [group] if group.startswith("sources/") else [f"{group}/r{k}" for k in REPLICATES]
    return dirs


AUTOATTACK = config["evaluation"]["figure2_autoattack"]
AUTOATTACK_DIRS = figure2_model_dirs() if AUTOATTACK else []


def source_train_params(config, source):
    """A source's training settings, with use_extra_train added only when it is on: a run made
    before the option existed keeps the same params, so it is not invalidated."""
    settings = config["sources"][source]
    return {**settings["train"], **({"use_extra_train": True} if settings["use_extra_train"] else {})}


def training_set_file(wildcards):
    if wildcards.train_set == ORIGINAL_SET:
        return f"{RESULTS}/data.h5"
    return f"{RESULTS}/constructed/{wildcards.train_set}.h5"


def construction_inputs(wildcards):
    inputs = {"data": f"{RESULTS}/data.h5"}
    construction = config["constructions"][wildcards.name]
    if "source" in construction:  # the schema requires one exactly for the methods that use a model
        inputs["source"] = f"{RESULTS}/sources/{construction['source']}/model.pt"
    inputs["ensemble"] = [f"{RESULTS}/sources/{s}/model.pt" for s in construction.get("ensemble", [])]
    if "drop_read_as_target_by" in construction:
        inputs["drop"] = f"{RESULTS}/sources/{construction['drop_read_as_target_by']}/model.pt"
    attacked = attack_repeated_by(config["constructions"], wildcards.name)
    if attacked:  # judge that set's rows instead of running the same attack again
        # ancient: a rebuilt copy of the same rows does not make this set stale; its own inputs still do
        inputs["attacked"] = ancient(f"{RESULTS}/constructed/{attacked}.h5")
    if "twin_of" in construction:
        inputs["twin"] = f"{RESULTS}/constructed/{construction['twin_of']}.h5"
    if config["robust_leakage_check"] and construction["method"] in TARGETED_ATTACK_METHODS:
        inputs["check"] = f"{RESULTS}/sources/{config['robust_leakage_check']}/model.pt"
    return inputs


def final_outputs():
    figures = [f"{RESULTS}/figures/{f}.png" for f in ("figure2", "table1", "training_curves")]
    grids = [f"{RESULTS}/figures/grids/{c}.png" for c in CONSTRUCTIONS]
    tables = [f"{RESULTS}/tables/{t}.csv" for t in ("models", "table1", "figure2", "claims")] + [f"{RESULTS}/summary.md", f"{RESULTS}/summary.html"]
    studies = [f"{RESULTS}/figures/{s}.png" for s in ENABLED_STUDIES]
    return figures + grids + tables + studies


# Follow-up studies: their tables, and which are switched on.
STUDIES = config["studies"]
STUDY_TABLES = {
    "transfer": ["transfer"],
    "robust_leakage": ["robust_leakage", "robust_leakage_features"],
    "gaussian": ["gaussian_fits", "gaussian_misalignment", "gaussian_eigen"],
    "rebuttals": ["rebuttals"],
}
ENABLED_STUDIES = [s for s in STUDY_TABLES if STUDIES[s]["enabled"]]


def study_table(name):
    return report(f"{RESULTS}/tables/{name}.csv", caption="../report/study_table.rst", category="Studies")


wildcard_constraints:
    source="|".join(SOURCES) or "^$",
    name="|".join(CONSTRUCTIONS) or "^$",
    train_set="|".join(TRAIN_SETS) or "^$",
    arch="[A-Za-z0-9_]+",
    replicate="[0-9]+",
