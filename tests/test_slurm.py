"""A real cluster run: the default pipeline (config.yaml) through profiles/slurm on a one-node
SLURM (Debian's slurm-wlm; CI starts it with .ci/start-slurm), with the profile adapted to the
cluster exactly as docs/cluster.md tells users to, and the same tables as the local default run
(the session fixture ``default_run``).

Skipped, with the reason, where no SLURM controller answers; CI sets NOTBUGS_REQUIRE_SLURM=1 so
that there it fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import REPO
from test_workflow import snakemake

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


def test_the_default_pipeline_runs_through_slurm_and_matches_the_local_run(tmp_path, default_run):
    partition = _slurm_partition()
    _, local_results = default_run
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    cluster = tmp_path / "cluster"  # SLURM jobs run on this machine's node, so tmp is shared
    cluster.mkdir()
    profile = site_profile(tmp_path / "profile", partition, cpus_per_gpu=1, mem_mb=2000)
    result = snakemake(cluster, config, "--profile", str(profile), "--workflow-profile", "none",
                       "--slurm-init-seconds-before-status-checks", "1", "--latency-wait", "5")
    log = result.stdout + result.stderr
    submitted = [line for line in log.splitlines() if "submitted with" in line.lower() or "slurm jobid" in line.lower()]
    assert len(submitted) >= 30, log[-3000:]
    results = cluster / "results" / config["dataset"]["name"]
    for table in ("table1", "figure2", "claims"):
        got = pd.read_csv(results / "tables" / f"{table}.csv")
        expected = pd.read_csv(local_results / "tables" / f"{table}.csv")
        pd.testing.assert_frame_equal(got, expected)
