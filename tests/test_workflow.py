"""The Snakemake workflow: dry runs, a real data stage, config errors and rerun semantics."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import h5py
import pandas as pd
import pytest
import yaml

from helpers import DEFAULT_CONFIG, REPO, SNAKEFILE, SNAKEMAKE, copy_finished_run, parse_dry_run
PLOT_RULES = {"plot_figure2", "plot_table1", "plot_training_curves", "plot_grid", "plot_summary_page"}


def tiny_config() -> dict:
    """The default config's structure at toy sizes: same rules, same DAG, seconds per job."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["dataset"].update(name="tiny", n_train=100, n_test=50)
    for source in config["sources"].values():
        source["train"]["epochs"] = 1
        if source["train"].get("adversarial"):
            source["train"]["adversarial"]["steps"] = 1
    for cons in config["constructions"].values():
        if cons["method"] not in ("leakage", "blend"):  # every method with an attack or inversion loop
            cons["steps"] = 2
    config["targets"]["train"]["epochs"] = 1
    config["targets"]["replicates"] = 2
    config["dataset"]["n_val"] = 20
    config["evaluation"] = {"eps": [0.25], "steps": 2}
    return config


def write_config(workdir: Path, config: dict) -> Path:
    """workdir/config.yaml, keys in the config's own order: Snakemake compares a rule's params by
    their text, so a reordered copy of a config counts as changed params against a run made from
    the original file."""
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(workdir: Path, config: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    write_config(workdir, config)
    cmd = [SNAKEMAKE, "-s", str(SNAKEFILE), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def planned_jobs(workdir: Path, config: dict) -> list[tuple[str, str]]:
    """(rule, first output) of every job a dry run plans."""
    return [(job["rule"], job["output"]) for job in parse_dry_run(snakemake(workdir, config, "--dry-run").stdout)]


def test_the_workflow_parses_without_importing_torch():
    """Every Snakemake start parses the workflow: each dry run, and on a cluster each job again.
    Importing torch there cost 2.7 s of every start (a dry run of config.yaml: 4.8 s, 2.1 s without;
    docs/performance.md)."""
    import re
    import sys
    sources = [SNAKEFILE, *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    modules = sorted({m for path in sources for m in re.findall(r"^\s*(?:from|import) (notbugs[\w.]*)", path.read_text(), re.M)})
    assert "notbugs.config" in modules, modules
    probe = f"import sys\nimport {', '.join(modules)}\nprint('torch' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert imported == "False", modules


def test_replicates_get_a_job_each_unless_grouped(tmp_path):
    config = tiny_config()
    config["targets"]["group_replicates"] = False
    jobs = planned_jobs(tmp_path, config)
    trained = sorted(out for rule, out in jobs if rule == "train_target" and "/d_det/" in out)
    assert trained == [f"results/tiny/targets/d_det/small_cnn/r{k}/model.pt" for k in (1, 2)]
    config["targets"]["group_replicates"] = True
    jobs = planned_jobs(tmp_path, config)
    assert [out for rule, out in jobs if rule == "train_target" and "/d_det/" in out] == [trained[0]]


def test_figure2_autoattack_attacks_every_figure2_model_and_feeds_the_tables(tmp_path):
    config = tiny_config()
    config["evaluation"]["figure2_autoattack"] = {"n_test": 20}
    config["figures"] = {"figure2": {"standard_on_d_r_blend": "targets/d_r_blend/small_cnn"}}
    jobs = planned_jobs(tmp_path, config)
    attacked = sorted(out for rule, out in jobs if rule == "evaluate_autoattack")
    expected = ["results/tiny/sources/robust/autoattack.json"] + [
        f"results/tiny/targets/{s}/small_cnn/r{k}/autoattack.json" for s in ("d", "d_nr", "d_r", "d_r_blend")
        for k in (1, 2)]
    assert attacked == sorted(expected)


def test_dry_run_plans_every_stage(tmp_path):
    rules = {rule for rule, _ in planned_jobs(tmp_path, tiny_config())}
    assert rules == {"prepare_data", "train_source", "construct", "train_target", "evaluate_source", "evaluate_target",
                     "tables"} | PLOT_RULES


def test_threads_by_rule_sets_one_rules_threads_and_leaves_the_others(tmp_path):
    config = tiny_config()
    config["threads_by_rule"] = {"train_source": 2}
    jobs = parse_dry_run(snakemake(tmp_path, config, "--dry-run").stdout)
    threads = {}
    for job in jobs:
        threads.setdefault(job["rule"], set()).add(job["threads"])
    assert threads["train_source"] == {2}
    assert threads["train_target"] == threads["construct"] == {config.get("threads", 1)}


def test_prepare_data_writes_an_artifact_that_plain_h5py_reads(tmp_path):
    snakemake(tmp_path, tiny_config(), "results/tiny/data.h5")
    with h5py.File(tmp_path / "results/tiny/data.h5", "r") as f:
        assert f["train/images"].shape == (100, 3, 32, 32)
        assert f["train/labels"].shape == (100,)
        assert f["test/images"].shape == (50, 3, 32, 32)
        assert f.attrs["format"] == "notbugs"
    assert (tmp_path / "logs/tiny/prepare_data.log").exists()


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["constructions"]["d_det"].update(eps=-0.5), "constructions.d_det.eps"),
    (lambda c: c["sources"]["standard"]["train"].update(epochz=3), "sources.standard.train"),
    (lambda c: c["evaluation"].update(steps="many"), "evaluation.steps"),
    (lambda c: c.update(threads_by_rule={"train_sources": 2}), "threads_by_rule"),
])
def test_invalid_config_stops_and_names_the_key(tmp_path, edit, key):
    config = tiny_config()
    edit(config)
    result = snakemake(tmp_path, config, "--dry-run", check=False)
    assert result.returncode != 0
    assert key in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_rerun_semantics(tmp_path, tiny_run):
    config = tiny_config()
    copy_finished_run(tiny_run, tmp_path)
    assert planned_jobs(tmp_path, config) == []

    lr_changed = copy.deepcopy(config)
    lr_changed["targets"]["train"]["lr"] = 0.01
    rules = {rule for rule, _ in planned_jobs(tmp_path, lr_changed)}
    assert "train_target" in rules
    assert rules <= {"train_target", "evaluate_target", "tables"} | PLOT_RULES, rules

    eps_changed = copy.deepcopy(config)
    eps_changed["constructions"]["d_det"]["eps"] = 0.4
    eps_changed["constructions"]["d_leak_det"]["eps"] = 0.4  # a twin keeps its PGD set's eps
    jobs = planned_jobs(tmp_path, eps_changed)
    constructed = sorted(out for rule, out in jobs if rule == "construct")
    assert constructed == ["results/tiny/constructed/d_det.h5", "results/tiny/constructed/d_leak_det.h5"]
    trained = sorted(out for rule, out in jobs if rule == "train_target")
    # one job per set trains r1 and r2
    assert trained == [f"results/tiny/targets/{s}/small_cnn/r1/model.pt" for s in ("d_det", "d_leak_det")]
    assert not {rule for rule, _ in jobs} & {"prepare_data", "train_source"}

    robust_changed = copy.deepcopy(config)
    robust_changed["sources"]["robust"]["train"]["adversarial"]["eps"] = 0.25
    sources = [out for rule, out in planned_jobs(tmp_path, robust_changed) if rule == "train_source"]
    assert sources == ["results/tiny/sources/robust/model.pt"]


@pytest.mark.slow
def test_a_second_concurrent_run_is_refused_and_the_first_completes(tmp_path):
    import time

    config = tiny_config()
    # long enough that the first run still holds its lock once the second has built its DAG
    # (Snakemake checks the lock only then: 5-15 s after starting, more on a busy machine)
    config["sources"]["robust"]["train"]["epochs"] = 150
    write_config(tmp_path, config)
    target = "results/tiny/sources/robust/model.pt"
    cmd = [SNAKEMAKE, "-s", str(SNAKEFILE), "--directory", str(tmp_path),
           "--configfile", str(tmp_path / "config.yaml"), "--cores", "1"]
    # data.h5 first, on its own: a job of the first run that has just finished can still be marked
    # incomplete for a moment, and a second run that sees that refuses for that reason instead
    subprocess.run(cmd + ["results/tiny/data.h5"], check=True, capture_output=True)
    cmd.append(target)
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    locks = tmp_path / ".snakemake" / "locks"
    deadline = time.time() + 60
    while not (locks.exists() and any(locks.iterdir())):
        assert first.poll() is None and time.time() < deadline, "first run ended before taking its lock"
        time.sleep(0.1)
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert second.returncode != 0
    assert "cannot be locked" in second.stdout + second.stderr
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-2000:]
    with h5py.File(tmp_path / "results/tiny/data.h5", "r") as f:
        assert f["train/images"].shape == (100, 3, 32, 32)
    remaining = planned_jobs(tmp_path, config)
    assert remaining, "the rest of the pipeline is still to do"
    assert all(rule != "prepare_data" and not output.endswith("sources/robust/model.pt")
               for rule, output in remaining), "what the first run finished is not redone"


@pytest.mark.slow
def test_every_study_runs_in_the_pipeline_and_reaches_the_report(tmp_path, tiny_run):
    copy_finished_run(tiny_run, tmp_path)  # the studies reuse its sources, sets and targets
    config = tiny_config()
    config["studies"] = yaml.safe_load((REPO / "configs/studies.yaml").read_text())["studies"]
    config["studies"]["robust_leakage"]["linear_epochs"] = 2
    config["studies"]["gaussian"].update(n_samples=2000, condition_numbers=[1, 10, 100])
    config["studies"]["transfer"]["archs"] = ["small_cnn", "mlp"]  # fewer jobs; the default has four
    config["studies"]["rebuttals"]["fresh_models"] = 1
    snakemake(tmp_path, config)
    snakemake(tmp_path, config, "--report", str(tmp_path / "report.html"))
    results = tmp_path / "results" / "tiny"
    tables = {"transfer": ["arch", "transfer_rate", "constructed_set_test_acc", "pearson_r"],
              "robust_leakage": ["train_set", "features_only_test_acc", "deep_model_test_acc"],
              "robust_leakage_features": ["feature", "certified_gamma"],
              "gaussian_fits": ["eps", "kappa_closed_form", "cos_w_mu"],
              "gaussian_misalignment": ["misalignment", "vulnerability_standard"],
              "gaussian_eigen": ["metric_eig"],
              "rebuttals": ["study", "train_set", "target_test_acc"]}
    for name, columns in tables.items():
        table = pd.read_csv(results / "tables" / f"{name}.csv")
        assert len(table) and set(columns) <= set(table.columns), name
    transfer = pd.read_csv(results / "tables" / "transfer.csv")
    assert sorted(transfer.arch) == ["mlp", "small_cnn"]
    rebuttals = pd.read_csv(results / "tables" / "rebuttals.csv")
    assert set(rebuttals.train_set) == {"d_det", "d_det_nontransferable", "d_relabel"}
    report = (tmp_path / "report.html").read_text()
    for study in ("transfer", "robust_leakage", "gaussian", "rebuttals"):
        assert (results / "figures" / f"{study}.png").stat().st_size > 5000
        assert (results / "figures" / f"{study}.pdf").exists()
        assert f"{study}.png" in report


def test_the_rules_environment_file_lists_exactly_the_package_dependencies():
    """envs/notbugs.yaml (every rule's `conda:`) holds notbugs' dependencies and no path, so it
    means the same after Snakemake copies it into .snakemake/conda/ (--sdm conda)."""
    import tomllib
    env = yaml.safe_load((REPO / "envs/notbugs.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(pip) == sorted(declared)
    assert not [p for p in pip if p.startswith(("-e", ".", "/", "file:"))]


@pytest.mark.slow
def test_jobs_run_in_an_environment_without_notbugs_installed(tmp_path):
    """What --sdm conda gives each job: an interpreter with the dependencies but not notbugs. The
    workflow must still parse and its jobs must still run, through the Snakefile's PYTHONPATH."""
    import site
    import sys
    bare = tmp_path / "bare-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    python = bare / "bin" / "python"
    bare_site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies as plain path entries: .pth files there (notbugs' editable install) are not run.
    Path(bare_site, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([str(python), "-c", "import snakemake, torch, h5py; import notbugs"],
                           capture_output=True, text=True, env=env)
    assert probe.returncode != 0 and "No module named 'notbugs'" in probe.stderr, probe.stderr
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_config(workdir, tiny_config())
    result = subprocess.run([str(python), "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir),
                             "--configfile", str(workdir / "config.yaml"), "--cores", "2",
                             "results/tiny/sources/standard/metrics.json"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "results/tiny/sources/standard/metrics.json").exists()
