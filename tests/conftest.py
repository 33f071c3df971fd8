"""Fixtures shared by several test modules."""

import os
from pathlib import Path

import pytest
import torch
import yaml


@pytest.fixture(scope="module")
def one_thread():
    """Small batches gain nothing from a second intra-op thread, and on a busy 2-core machine
    OpenMP spin-waiting can make a 2-thread run many times slower. Restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The README's default run: the real config.yaml, run once per test session (tests of the
    pipeline's numbers, the report and the SLURM run all read it). (workdir, results dir).

    CI has just run the same pipeline from this checkout as the README's first command, and
    names that working directory in NOTBUGS_FINISHED_DEFAULT_RUN: its results, logs and
    Snakemake's provenance records are copied in (modification times kept), and Snakemake then
    reruns whatever the copy lacks or what its rerun triggers (code, params, inputs) find stale,
    which for a run of the same checkout is nothing."""
    from helpers import REPO, copy_finished_run
    from test_workflow import snakemake
    workdir = tmp_path_factory.mktemp("default")
    finished = os.environ.get("NOTBUGS_FINISHED_DEFAULT_RUN")
    if finished:
        copy_finished_run(Path(finished), workdir)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    snakemake(workdir, config)
    snakemake(workdir, config, "--report", str(workdir / "report.html"))
    return workdir, workdir / "results" / config["dataset"]["name"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny config's whole pipeline (test_workflow.tiny_config), run once per test session;
    the tests that need a finished run start from a copy (helpers.copy_finished_run)."""
    from test_workflow import snakemake, tiny_config
    workdir = tmp_path_factory.mktemp("tiny")
    snakemake(workdir, tiny_config())
    return workdir
