"""Fixtures shared by several test modules."""

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
    pipeline's numbers, the report and the SLURM run all read it). (workdir, results dir)."""
    from helpers import REPO
    from test_workflow import snakemake
    workdir = tmp_path_factory.mktemp("default")
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    snakemake(workdir, config)
    snakemake(workdir, config, "--report", str(workdir / "report.html"))
    return workdir, workdir / "results" / config["dataset"]["name"]
