"""The configuration presets (configs/*.yaml and the root config.yaml) and the SLURM profile.

Dry runs only: nothing here trains, reads data or submits jobs, and each test takes seconds.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import DEFAULT_CONFIG, REPO, SCHEMA, SNAKEFILE, SNAKEMAKE, make_imagenet_tree, parse_dry_run
from notbugs.config import load_config, validate_config

PAPER = REPO / "configs/cifar10-paper.yaml"
RESTRICTED_IMAGENET = REPO / "configs/restricted-imagenet.yaml"
SLURM_PROFILE = REPO / "profiles/slurm"

STUDIES_OVERLAY = REPO / "configs/studies.yaml"  # an overlay, not a preset: it only switches studies on
PRESETS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p != STUDIES_OVERLAY)
ALL_CONFIGS = PRESETS + [DEFAULT_CONFIG]
GPU_RULES = {"train_source", "train_target", "construct", "evaluate_source", "evaluate_target", "evaluate_autoattack"}


def gpu_rules(config: dict) -> set[str]:
    """The GPU rules a config plans: the AutoAttack check only where it is switched on."""
    return GPU_RULES - (set() if config["evaluation"]["figure2_autoattack"] else {"evaluate_autoattack"})
STUDY_GPU_RULES = {"study_transfer", "study_rebuttals"}
STUDY_CPU_RULES = {"study_robust_leakage", "study_gaussian", "plot_transfer", "plot_robust_leakage",
                   "plot_gaussian", "plot_rebuttals"}
CPU_RULES = {"prepare_data", "tables", "plot_figure2", "plot_table1", "plot_training_curves", "plot_grid",
             "plot_summary_page"}


def _id(path: Path) -> str:
    return str(path.relative_to(REPO))


def with_data_root(path: Path, workdir: Path) -> Path:
    """``workdir`` with the data root ``path`` needs for planning: the restricted_imagenet source
    checks its ImageNet tree at parse time, so put a tiny one where the preset's relative root
    points. Other presets read nothing before prepare_data runs."""
    raw = _raw(path)["dataset"]
    if raw["source"] == "restricted_imagenet":
        make_imagenet_tree(workdir / raw["root"], per_wnid={"train": 1, "val": 1})
    return workdir


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _model_dirs(config: dict) -> set[str]:
    sources = {f"sources/{s}" for s in config["sources"]}
    targets = {f"targets/{t}/{a}" for t in config["targets"]["train_sets"] for a in config["targets"]["archs"]}
    return sources | targets


def dry_run(workdir: Path, *args: str) -> tuple[list[dict], str]:
    """Run ``snakemake -n`` on the repository's Snakefile in ``workdir``; return one dict per
    planned job (``rule``, ``output``, ``resources``) and the combined output."""
    cmd = [SNAKEMAKE, "-s", str(SNAKEFILE), "--directory", str(workdir), "-n", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    text = result.stdout + "\n" + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"dry run failed ({result.returncode}): {' '.join(cmd)}\n{text[-4000:]}")
    return parse_dry_run(text), text


# --------------------------------------------------------------------------- (a) schema


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=_id)
def test_config_validates_against_the_schema(path, tmp_path, monkeypatch):
    monkeypatch.chdir(with_data_root(path, tmp_path))
    config = load_config(path, SCHEMA)
    # Figure 2's rows must name models the run actually trains, or `tables` fails at the end.
    rows = config["figures"]["figure2"]
    missing = {label: d for label, d in rows.items() if d not in _model_dirs(config)}
    assert not missing, f"figures.figure2 rows point at models this config does not train: {missing}"


@pytest.mark.parametrize("path", PRESETS, ids=_id)
def test_preset_overrides_every_key_of_the_default_config(path, tmp_path, monkeypatch):
    """Run from the repository root, Snakemake loads the Snakefile's `configfile: config.yaml`
    and merges `--configfile <preset>` *into* it recursively. A preset must therefore set every
    key config.yaml sets, or synthetic-default values (n_train 2000, lr 0.05, ...) leak in."""
    from snakemake.utils import update_config

    monkeypatch.chdir(with_data_root(path, tmp_path))
    merged = copy.deepcopy(_raw(DEFAULT_CONFIG))
    update_config(merged, _raw(path))
    alone = validate_config(_raw(path), SCHEMA)
    assert validate_config(merged, SCHEMA) == alone


def test_paper_preset_matches_the_papers_recipe():
    """Spot checks against docs/paper-notes.md §1-§3."""
    config = load_config(PAPER, SCHEMA)
    assert config["device"] == "cuda"
    assert config["dataset"]["source"] == "cifar10" and config["dataset"]["n_train"] is None
    recipes = [config["sources"]["standard"]["train"], config["sources"]["robust"]["train"],
               config["targets"]["train"]]
    from notbugs.train import lr_at
    for recipe in recipes:
        assert (recipe["epochs"], recipe["batch_size"], recipe["lr"]) == (150, 128, 0.1)
        assert (recipe["momentum"], recipe["weight_decay"]) == (0.9, 5e-4)
        assert recipe["augment"] == {"crop": True, "padding": 4, "flip": True}
        # x0.1 at epochs 50 and 100 (0-based epoch 50 is the 51st)
        assert [lr_at(e, recipe) for e in (49, 50, 99, 100)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    assert config["sources"]["robust"]["train"]["adversarial"] == {
        "norm": "l2", "eps": 0.5, "steps": 7, "step_size": 0.1, "random_start": False}
    assert config["sources"]["standard"]["train"]["adversarial"] is None
    assert config["targets"]["train"]["adversarial"] is None
    for name in ("d_r", "d_nr"):
        cons = config["constructions"][name]
        assert (cons["steps"], cons["step_size"], cons["step_decay"], cons["start"]) == (1000, 0.1, "none", "image")
    for name, target in (("d_rand", "random"), ("d_det", "next"), ("d_other", "other")):
        cons = config["constructions"][name]
        assert (cons["target"], cons["eps"], cons["steps"], cons["step_size"], cons["keep_best"]) == (
            target, 0.5, 100, 0.1, True)
    assert config["targets"]["archs"] == ["resnet50"]
    assert config["evaluation"]["eps"] == [0.25, 0.5] and config["evaluation"]["step_size_factor"] == 2.5


def test_restricted_imagenet_preset_carries_the_cifar_presets_controls(tmp_path, monkeypatch):
    """Spot checks: the authors' library defaults for Restricted ImageNet (150 epochs, batch 256,
    lr 0.1 x0.1 every 50, weight decay 1e-4), ResNet-50 with the ImageNet stem at 224 px, streamed
    multi-GPU training, and the same controls, replicates and evaluation as the CIFAR-10 preset."""
    monkeypatch.chdir(with_data_root(RESTRICTED_IMAGENET, tmp_path))
    config = load_config(RESTRICTED_IMAGENET, SCHEMA)
    paper = load_config(PAPER, SCHEMA)
    assert config["device"] == "cuda" and config["dataset"]["source"] == "restricted_imagenet"
    assert config["dataset"]["restricted_imagenet"] == {"resolution": 224, "resize": 256}
    from notbugs.train import lr_at
    for recipe in (config["sources"]["standard"]["train"], config["sources"]["robust"]["train"],
                   config["targets"]["train"]):
        assert (recipe["epochs"], recipe["batch_size"], recipe["lr"], recipe["weight_decay"]) == (150, 256, 0.1, 1e-4)
        assert [lr_at(e, recipe) for e in (49, 50, 99, 100)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
        assert recipe["loader"] == "stream" and recipe["batch_size"] % recipe["processes"] == 0
    assert config["sources"]["robust"]["train"]["adversarial"]["eps"] == 3.0
    assert config["sources"]["standard"]["train"]["adversarial"] is None
    assert {s["arch"] for s in config["sources"].values()} == {"resnet50_imagenet"}
    assert config["targets"]["archs"] == ["resnet50_imagenet"]
    for key in ("train_sets", "replicates"):
        assert config["targets"][key] == paper["targets"][key]
    assert config["comparisons"] == paper["comparisons"]
    assert {k: c["method"] for k, c in config["constructions"].items()} == {
        k: c["method"] for k, c in paper["constructions"].items()}
    for name, cons in config["constructions"].items():  # every PGD set and its twin at one eps
        if "twin_of" in cons and cons["method"] == "leakage":
            assert cons["eps"] == config["constructions"][cons["twin_of"]]["eps"]
    assert config["figures"]["figure2_eps"] in config["evaluation"]["eps"]
    assert config["evaluation"]["figure2_autoattack"] is not None


# --------------------------------------------------------------------------- (b) local dry runs


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=_id)
def test_dry_run_plans_every_stage(path, tmp_path, monkeypatch):
    # config.yaml sits in the working directory, as when running from the repository root.
    (with_data_root(path, tmp_path) / "config.yaml").write_text(DEFAULT_CONFIG.read_text())
    monkeypatch.chdir(tmp_path)
    config = load_config(path, SCHEMA)
    if config["dataset"]["source"] == "imagefolder":
        # A dry run reads no data: the (relative) data root need not exist for planning.
        assert not (tmp_path / config["dataset"]["root"]).exists()
    jobs, _ = dry_run(tmp_path, "--configfile", str(path), "--cores", "2")
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job["rule"]] = counts.get(job["rule"], 0) + 1
    assert set(counts) == gpu_rules(config) | CPU_RULES
    targets = config["targets"]
    jobs_per_group = 1 if targets["group_replicates"] else targets["replicates"]
    n_targets = len(targets["train_sets"]) * len(targets["archs"]) * jobs_per_group
    assert counts["train_source"] == counts["evaluate_source"] == len(config["sources"])
    assert counts["construct"] == counts["plot_grid"] == len(config["constructions"])
    assert counts["train_target"] == n_targets
    assert counts["evaluate_target"] == n_targets
    name = config["dataset"]["name"]
    assert all(job["output"].startswith(f"results/{name}/") for job in jobs)


@pytest.mark.parametrize("path", PRESETS, ids=_id)
def test_a_set_without_robust_leakage_waits_for_its_judge_and_its_twin_for_it(path, tmp_path, monkeypatch):
    """Every preset builds D_det without the rows its robust source reads as t: that job takes
    the robust model and D_det (the same attack, whose rows it judges) as input, and the set's
    leakage twin takes the set."""
    (with_data_root(path, tmp_path) / "config.yaml").write_text(DEFAULT_CONFIG.read_text())
    monkeypatch.chdir(tmp_path)
    config = load_config(path, SCHEMA)
    name = config["dataset"]["name"]
    assert config["constructions"]["d_det_no_robust_t"]["drop_read_as_target_by"] == "robust"
    _, text = dry_run(tmp_path, "--configfile", str(path), "--cores", "2",
                      f"results/{name}/constructed/d_leak_det_no_robust_t.h5")
    blocks = {re.search(r"output: (\S+)", b).group(1): b for b in re.split(r"\n(?=rule \w+:)", text)
              if "output:" in b}
    judged = blocks[f"results/{name}/constructed/d_det_no_robust_t.h5"]
    assert f"results/{name}/sources/robust/model.pt" in re.search(r"input: (.*)", judged).group(1)
    assert f"results/{name}/constructed/d_det.h5" in re.search(r"input: (.*)", judged).group(1)
    twin = blocks[f"results/{name}/constructed/d_leak_det_no_robust_t.h5"]
    assert f"results/{name}/constructed/d_det_no_robust_t.h5" in re.search(r"input: (.*)", twin).group(1)


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=_id)
def test_studies_overlay_plans_every_study_on_every_preset(path, tmp_path):
    (with_data_root(path, tmp_path) / "config.yaml").write_text(DEFAULT_CONFIG.read_text())
    if path == RESTRICTED_IMAGENET:  # the studies' pixel models take 32x32 images: refused at parse time
        with pytest.raises(AssertionError, match=r"linear_robust.arch': 'linear' \(added by studies.robust_leakage\) "
                                                 r"takes 3x32x32 images, and this data set's images are 224x224"):
            dry_run(tmp_path, "--configfile", str(path), str(STUDIES_OVERLAY), "--cores", "2")
        return
    jobs, _ = dry_run(tmp_path, "--configfile", str(path), str(STUDIES_OVERLAY), "--cores", "2")
    rules = {job["rule"] for job in jobs}
    assert rules == gpu_rules(load_config(path, SCHEMA)) | CPU_RULES | STUDY_GPU_RULES | STUDY_CPU_RULES


# --------------------------------------------------------------------------- (c) SLURM profile


@pytest.fixture(scope="module", params=[(PAPER, False), (PAPER, True), (RESTRICTED_IMAGENET, False)],
                ids=["paper", "paper+studies", "restricted-imagenet"])
def slurm_jobs(request, tmp_path_factory) -> tuple[list[dict], str, bool]:
    pytest.importorskip("snakemake_executor_plugin_slurm")
    preset, with_studies = request.param
    workdir = with_data_root(preset, tmp_path_factory.mktemp("slurm"))
    # The command of docs/cluster.md (with the studies overlay in the second variant).
    configs = [str(preset)] + ([str(STUDIES_OVERLAY)] if with_studies else [])
    jobs, text = dry_run(workdir, "--profile", str(SLURM_PROFILE), "--workflow-profile", "none",
                         "--configfile", *configs, "--latency-wait", "120")
    return jobs, text, with_studies, preset


def test_slurm_profile_plans_the_paper_dag(slurm_jobs, monkeypatch):
    jobs, text, with_studies, preset = slurm_jobs
    if preset != PAPER:
        pytest.skip("the paper preset's DAG")
    config = load_config(PAPER, SCHEMA)
    rules = [job["rule"] for job in jobs]
    if with_studies:
        assert set(rules) == GPU_RULES | CPU_RULES | STUDY_GPU_RULES | STUDY_CPU_RULES
        return
    assert set(rules) == GPU_RULES | CPU_RULES
    n_targets = len(config["targets"]["train_sets"]) * config["targets"]["replicates"]
    assert rules.count("train_target") == rules.count("evaluate_target") == n_targets
    assert rules.count("evaluate_source") == rules.count("train_source") == len(config["sources"])
    assert any(job["output"] == "results/cifar10/sources/robust/model.pt" for job in jobs)
    assert config["device"] == "cuda"
    # profiles/default (one local GPU: resources gpu=1) must not be layered over the cluster
    # profile, or the whole cluster run would hold one GPU at a time.
    assert "workflow specific profile" not in text


def test_slurm_gpu_request_lands_on_the_gpu_rules_only(slurm_jobs, tmp_path, monkeypatch):
    jobs, _, _, preset = slurm_jobs
    monkeypatch.chdir(with_data_root(preset, tmp_path))
    config = load_config(preset, SCHEMA)
    processes = {f"results/{config['dataset']['name']}/sources/{name}/model.pt": src["train"]["processes"]
                 for name, src in config["sources"].items()}
    for job in jobs:
        res = job["resources"]
        where = f"{job['rule']} -> {job['output']}: {res}"
        # the plugin needs these on every job (it warns without runtime and memory)
        assert res.get("slurm_partition", "").strip("'\""), where
        assert int(res["runtime"]) > 0 and int(res["mem_mb"]) > 0, where
        if job["rule"] in GPU_RULES | STUDY_GPU_RULES:
            # `gpu: 1` (-> --gpus=1); a site that needs --gres sets gres "gpu:1" and gpu 0 instead.
            # Training jobs ask for one GPU per training process (DistributedDataParallel).
            gpus = {"train_source": processes.get(job["output"], 1),  # study sources copy processes 1
                    "train_target": config["targets"]["train"]["processes"]}.get(job["rule"], 1)
            assert res.get("gpu") == str(gpus) or "gpu" in res.get("gres", ""), where
            assert int(res["cpus_per_gpu"]) >= 1, where
        else:
            assert job["rule"] in CPU_RULES | STUDY_CPU_RULES, where
            assert res.get("gpu", "0") == "0" and "cpus_per_gpu" not in res, where
            assert "gres" not in res, where


class _Resources(dict):
    """What the plugin reads: ``resources.get(name)`` and ``resources.name``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _Job:
    def __init__(self, resources: dict, threads: int):
        self.resources = _Resources(resources)
        self.threads = threads


def _typed(value: str):
    try:
        return int(value)
    except ValueError:
        return value


def test_slurm_plugin_turns_the_profile_into_the_expected_sbatch_flags(slurm_jobs):
    """Feed each rule's planned resources to the plugin's own sbatch builder (version 2.x)."""
    try:
        from snakemake_executor_plugin_slurm.submit_string import get_submit_command
        from snakemake_executor_plugin_slurm.utils import set_gres_string
    except ImportError as exc:  # internal modules, not the plugin's public interface
        pytest.skip(f"snakemake-executor-plugin-slurm internals moved: {exc}")
    jobs, _, with_studies, _ = slurm_jobs
    seen = set()
    for job in jobs:
        if job["rule"] in seen:
            continue
        seen.add(job["rule"])
        resources = {k: _typed(v) for k, v in job["resources"].items() if "<TBD>" not in v}
        fake = _Job(resources, threads=1)
        params = dict(run_uuid="x", slurm_logfile="x.log", comment_str="x", account="", partition="",
                      workdir="")
        call = get_submit_command(fake, params) + set_gres_string(fake)
        assert f"-t {resources['runtime']}" in call and f"--mem {resources['mem_mb']}" in call, call
        if job["rule"] in GPU_RULES | STUDY_GPU_RULES:
            assert "--gpus=" in call or "--gres=gpu" in call, call
            assert f"--cpus-per-gpu={resources['cpus_per_gpu']}" in call, call
        else:
            assert "--gpus" not in call and "--gres" not in call and "--cpus-per-task=1" in call, call
    assert seen == GPU_RULES | CPU_RULES | (STUDY_GPU_RULES | STUDY_CPU_RULES if with_studies else set())
