"""Fixtures shared by several test modules."""

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml


# The suite runs in two processes (README: pytest -n 2, pytest-xdist; --dist loadfile in
# pyproject.toml): alone it kept one of the two cores idle half the time. Each test file runs
# whole in one process, so its module fixtures are built once. The files are handed out in the
# order below (--no-loadscope-reorder), the longest first, so that the processes end together:
# each of these took 3 to 6 minutes of CI. test_slurm.py builds the tiny run early, and
# test_workflow.py, which reads it too, comes after it.
LONGEST_FIRST = ("test_restricted_imagenet.py", "test_slurm.py", "test_train_at_scale.py", "test_resume.py",
                 "test_workflow.py")


def pytest_collection_modifyitems(items):
    """The longest files first (the order only changes how soon the suite ends), then files with
    slow tests, then the rest."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item):
        name = item.path.name
        return (LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST), item.path not in slow)

    items.sort(key=rank)


def pytest_configure(config):
    """Two worker processes share the cores: one intra-op thread each, or OpenMP spin-waiting
    between them slows both."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


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
    config = yaml.safe_load((REPO / "config.yaml").read_text())

    def build(workdir):
        finished = os.environ.get("NOTBUGS_FINISHED_DEFAULT_RUN")
        if finished:
            copy_finished_run(Path(finished), workdir)
        snakemake(workdir, config)
        snakemake(workdir, config, "--report", str(workdir / "report.html"))

    workdir = _run_once(tmp_path_factory, "default", build)
    return workdir, workdir / "results" / config["dataset"]["name"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny config's whole pipeline (test_workflow.tiny_config), run once per test session;
    the tests that need a finished run start from a copy (helpers.copy_finished_run)."""
    from test_workflow import snakemake, tiny_config
    return _run_once(tmp_path_factory, "tiny", lambda workdir: snakemake(workdir, tiny_config()))


def _run_once(tmp_path_factory, name: str, build) -> Path:
    """A fresh directory that ``build`` fills, once per test session. Under pytest-xdist each
    process has its own session fixtures, so the processes share one directory under a file
    lock: the first to need it builds it, another that needs it meanwhile waits, and a failed
    build leaves no mark, so the next process tries again and reports its own failure."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        workdir = tmp_path_factory.mktemp(name)
        build(workdir)
        return workdir
    from filelock import FileLock
    shared = tmp_path_factory.getbasetemp().parent  # the session's temporary root, above each process's
    workdir, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir()
            build(workdir)
            done.touch()
    return workdir
