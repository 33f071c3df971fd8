"""Killed jobs resume: SIGKILL mid-run, rerun, and the result equals an uninterrupted run."""

import json
import textwrap

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from helpers import make_data_artifact, run_and_kill, run_python, tables_equal, train_tiny_model
from notbugs import hdf5
from notbugs.cli import describe

pytestmark = pytest.mark.slow


def _train_code(data_path, out_dir, epochs):
    return textwrap.dedent(f"""
        import logging, sys, torch
        torch.set_num_threads(1)
        logging.basicConfig(level=logging.INFO, stream=sys.stdout)
        sys.path.insert(0, {str(__import__('helpers').REPO / 'tests')!r})
        from helpers import train_tiny_model
        from pathlib import Path
        train_tiny_model(Path({str(data_path)!r}), Path({str(out_dir)!r}), epochs={epochs})
    """)


@pytest.mark.parametrize("kill_at", ["epoch 2/4", "epoch 3/4"])
def test_training_resumes_after_sigkill_with_identical_result(tmp_path, kill_at):
    data_path = make_data_artifact(tmp_path / "data.h5", n_train=400, n_test=100)
    epochs = 4
    run_python(_train_code(data_path, tmp_path / "straight", epochs))

    killed = tmp_path / "killed"
    run_and_kill(_train_code(data_path, killed, epochs), trigger=kill_at)
    assert (killed / "checkpoints" / "last.pt").exists() and not (killed / "model.pt").exists()
    resumed_from = torch.load(killed / "checkpoints" / "last.pt", weights_only=False)["epoch"]
    assert 1 <= resumed_from < epochs
    run_python(_train_code(data_path, killed, epochs))

    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_a = pd.read_csv(tmp_path / "straight" / "train_log.csv").drop(columns="seconds")
    log_b = pd.read_csv(killed / "train_log.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(log_a, log_b)
    assert not (killed / "checkpoints").exists(), "resume state is removed once the model is final"


def _construct_code(data_path, source, output, chunk_size, keep="all"):
    return textwrap.dedent(f"""
        import logging, sys, torch
        torch.set_num_threads(1)
        logging.basicConfig(level=logging.INFO, stream=sys.stdout)
        from notbugs.config import complete
        from notbugs.construct import construct
        cfg = complete("constructions.d_det", dict(method="pgd", source="standard", target="next", eps=0.5,
                                                   steps=20, step_size=0.1, keep={keep!r}))
        construct("d_det", cfg, data_path={str(data_path)!r}, source_checkpoint={str(source)!r},
                  output={str(output)!r}, seed=0, device=torch.device("cpu"), chunk_size={chunk_size},
                  fast=complete("fast_paths"))
    """)


@pytest.mark.parametrize("kill_after_rows,keep", [(100, "all"), (300, "all"), (300, "reached")])
def test_construction_resumes_after_sigkill_with_identical_file(tmp_path, kill_after_rows, keep):
    data_path = make_data_artifact(tmp_path / "data.h5", n_train=400, n_test=100)
    source = train_tiny_model(data_path, tmp_path / "source", epochs=2)
    straight, killed = tmp_path / "straight.h5", tmp_path / "killed.h5"
    run_python(_construct_code(data_path, source, straight, 50, keep))

    run_and_kill(_construct_code(data_path, source, killed, 50, keep), trigger=f"{kill_after_rows}/400 rows done")
    assert not killed.exists(), "a killed construction must not leave a finished-looking file"
    building = killed.with_name(killed.name + (".all.partial" if keep == "reached" else ".partial"))
    assert building.exists()
    run_python(_construct_code(data_path, source, killed, 50, keep))
    assert not building.exists() and not list(tmp_path.glob("killed.h5.*"))

    with h5py.File(straight, "r") as fa, h5py.File(killed, "r") as fb:
        assert sorted(fa["train"]) == sorted(fb["train"])
        for column in fa["train"]:
            assert tables_equal(fa["train"][column][:], fb["train"][column][:]), column
        for key in ("success_rate", "mean_perturbation_norm", "source_sha256", "config"):
            assert fa.attrs[key] == fb.attrs[key] or (np.isnan(fa.attrs[key]) and np.isnan(fb.attrs[key]))


def _evaluate_code(model, data_path, output):
    return textwrap.dedent(f"""
        import logging, sys, torch
        torch.set_num_threads(1)
        logging.basicConfig(level=logging.INFO, stream=sys.stdout)
        from notbugs.config import complete
        from notbugs.evaluate import evaluate_checkpoint
        cfg = complete("evaluation", dict(eps=[0.25, 0.5], steps=10, random_start=True, batch_size=50))
        evaluate_checkpoint({str(model)!r}, {str(data_path)!r}, cfg, {str(output)!r}, device=torch.device("cpu"),
                            seed=3, fast=complete("fast_paths"))
    """)


@pytest.mark.parametrize("kill_after_rows", [50, 150])
def test_evaluation_resumes_after_sigkill_with_identical_results(tmp_path, kill_after_rows):
    data_path = make_data_artifact(tmp_path / "data.h5", n_train=300, n_test=200)
    model = train_tiny_model(data_path, tmp_path / "model", epochs=2)
    straight, killed = tmp_path / "straight" / "metrics.json", tmp_path / "killed" / "metrics.json"
    run_python(_evaluate_code(model, data_path, straight))

    run_and_kill(_evaluate_code(model, data_path, killed), trigger=f"{kill_after_rows}/200 rows done")
    assert not killed.exists() and not killed.with_name("predictions.h5").exists()
    assert killed.with_name("predictions.h5.partial").exists()
    run_python(_evaluate_code(model, data_path, killed))

    a, b = json.loads(straight.read_text()), json.loads(killed.read_text())
    drop = ("checkpoint", "predictions", "train_seconds")
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    with h5py.File(straight.with_name("predictions.h5"), "r") as fa, \
            h5py.File(killed.with_name("predictions.h5"), "r") as fb:
        assert sorted(fa["test"]) == sorted(fb["test"]) and "robust_pred_eps0.25" in fa["test"]
        for column in fa["test"]:
            assert tables_equal(fa["test"][column][:], fb["test"][column][:]), column
    with hdf5.open_artifact(killed.with_name("predictions.h5"), kind="evaluation") as art:
        split = art.split("test")
        assert len(split) == 200 and art.attrs["std_acc"] == b["std_acc"]
        assert "clean_pred" in describe(str(killed.with_name("predictions.h5")))
