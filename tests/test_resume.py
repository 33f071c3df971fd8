"""Killed jobs resume: SIGKILL mid-run, rerun, and the result equals an uninterrupted run."""

import textwrap

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from helpers import make_data_artifact, run_and_kill, run_python, tables_equal, train_tiny_model

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


def _construct_code(data_path, source, output, chunk_size):
    return textwrap.dedent(f"""
        import logging, sys, torch
        torch.set_num_threads(1)
        logging.basicConfig(level=logging.INFO, stream=sys.stdout)
        from notbugs.construct import construct
        cfg = dict(method="pgd", source="standard", target="next", eps=0.5, steps=20, step_size=0.1,
                   keep_best=True, start="image", step_decay="none", tolerance=0.1)
        construct("d_det", cfg, data_path={str(data_path)!r}, source_checkpoint={str(source)!r},
                  output={str(output)!r}, seed=0, device=torch.device("cpu"), chunk_size={chunk_size})
    """)


@pytest.mark.parametrize("kill_after_rows", [100, 300])
def test_construction_resumes_after_sigkill_with_identical_file(tmp_path, kill_after_rows):
    data_path = make_data_artifact(tmp_path / "data.h5", n_train=400, n_test=100)
    source = train_tiny_model(data_path, tmp_path / "source", epochs=2)
    straight, killed = tmp_path / "straight.h5", tmp_path / "killed.h5"
    run_python(_construct_code(data_path, source, straight, 50))

    run_and_kill(_construct_code(data_path, source, killed, 50), trigger=f"{kill_after_rows}/400 rows done")
    assert not killed.exists(), "a killed construction must not leave a finished-looking file"
    assert killed.with_name(killed.name + ".partial").exists()
    run_python(_construct_code(data_path, source, killed, 50))

    with h5py.File(straight, "r") as fa, h5py.File(killed, "r") as fb:
        assert sorted(fa["train"]) == sorted(fb["train"])
        for column in fa["train"]:
            assert tables_equal(fa["train"][column][:], fb["train"][column][:]), column
        for key in ("success_rate", "mean_perturbation_norm", "source_sha256", "config"):
            assert fa.attrs[key] == fb.attrs[key] or (np.isnan(fa.attrs[key]) and np.isnan(fb.attrs[key]))
