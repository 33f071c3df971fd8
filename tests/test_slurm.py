"""A real cluster run: profiles/slurm on a one-node SLURM (Debian's slurm-wlm; CI starts it with
.ci/start-slurm), with the profile adapted to the cluster exactly as docs/cluster.md tells users to.

It reruns a slice of a finished pipeline through SLURM: a copy of the tiny run (the default
config's DAG at toy sizes, the session fixture ``tiny_run``) loses the leakage twins' clean
source, so Snakemake submits every job that depends on it, one or more of each stage's rules from
training to the figures, and the tables must come out as the local run's. (The whole default
pipeline through SLURM took 10.5 minutes of a CI run whose budget is 35; the slice exercises the
same profile, resources and submission path.)

Skipped, with the reason, where no SLURM controller answers; CI sets NOTBUGS_REQUIRE_SLURM=1 so
that there it fails instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from helpers import REPO, copy_finished_run
from test_workflow import snakemake, tiny_config

pytestmark = pytest.mark.slow


def _slurm_partition() -> str:
    problem = None
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        problem = "SLURM's commands are not installed (Debian: slurm-wlm, munge; then .ci/start-slurm)"
    else:
        state = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=30)
        idle = [line.split()[0].rstrip("*") for line in state.stdout.splitlines() if "idle" in line or "mix" in line]
        if state.returncode != 0 or not idle:
            problem = f"no SLURM partition with an idle node ({(state.stdout + state.stderr).strip()[:200]})"
        else:
            return idle[0]
    if os.environ.get("NOTBUGS_REQUIRE_SLURM"):
        pytest.fail(f"NOTBUGS_REQUIRE_SLURM is set but {problem}")
    pytest.skip(problem)


def site_profile(destination: Path, partition: str, cpus_per_gpu: int, mem_mb: int) -> Path:
    """profiles/slurm adapted to a cluster the way docs/cluster.md says (the same substitutions)."""
    shutil.copytree(REPO / "profiles" / "slurm", destination)
    config = destination / "config.yaml"
    text = config.read_text()
    text = text.replace("<your-cpu-partition>", partition).replace("<your-gpu-partition>", partition)
    text = text.replace("cpus_per_gpu: 4", f"cpus_per_gpu: {cpus_per_gpu}")
    text = text.replace("mem_mb: 16000", f"mem_mb: {mem_mb}").replace("mem_mb: 4000", f"mem_mb: {mem_mb}")
    text += "\nslurm-status-command: squeue   # this cluster has no accounting storage (sacct)\n"
    assert not [line for line in text.splitlines() if "<your-" in line.split("#")[0]]
    config.write_text(text)
    return destination


# The leakage twins' mask model: removing it invalidates two constructions, their targets and
# evaluations, the tables and the figures, but neither the data nor the other sources.
REMOVED = "sources/brief_clean"
STAGE_RULES = {"train_source", "evaluate_source", "construct", "train_target", "evaluate_target", "tables"}


def test_a_slice_of_the_pipeline_reruns_through_slurm_and_matches_the_local_run(tmp_path, tiny_run):
    partition = _slurm_partition()
    config = tiny_config()
    local_results = tiny_run / "results" / config["dataset"]["name"]
    cluster = tmp_path / "cluster"  # SLURM jobs run on this machine's node, so tmp is shared
    copy_finished_run(tiny_run, cluster)
    results = cluster / "results" / config["dataset"]["name"]
    shutil.rmtree(results / REMOVED)
    for table in results.glob("tables/*.csv"):
        table.unlink()
    profile = site_profile(tmp_path / "profile", partition, cpus_per_gpu=1, mem_mb=2000)
    result = snakemake(cluster, config, "--profile", str(profile), "--workflow-profile", "none",
                       "--slurm-init-seconds-before-status-checks", "1", "--latency-wait", "5")
    log = result.stdout + result.stderr
    submitted = re.findall(r"submitted with SLURM jobid \d+ \(log: \S*/rule_(\w+)/", log)
    rules = set(submitted)
    assert STAGE_RULES <= rules and any(rule.startswith("plot_") for rule in rules), (sorted(rules), log[-3000:])
    assert not rules & {"prepare_data"}, sorted(rules)
    assert submitted.count("construct") == 2 and submitted.count("train_target") == 2, submitted
    assert (results / REMOVED / "model.pt").exists()
    for table in ("table1", "figure2", "claims"):
        got = pd.read_csv(results / "tables" / f"{table}.csv")
        expected = pd.read_csv(local_results / "tables" / f"{table}.csv")
        pd.testing.assert_frame_equal(got, expected)
