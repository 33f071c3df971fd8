"""`notbugs inspect`: provenance, shapes and a class histogram; a grid; clear errors."""

import h5py
import pytest
import torch

from helpers import make_data_artifact
from notbugs.cli import main


def test_inspect_prints_layout_and_saves_grid(tmp_path, capsys):
    path = make_data_artifact(tmp_path / "data.h5", n_train=100, n_test=50)
    assert main(["inspect", str(path), "--grid", str(tmp_path / "grid.png"), "-n", "8"]) == 0
    out = capsys.readouterr().out
    assert "kind: data" in out and "seed: 0" in out and "mean:" in out
    assert "(100, 3, 32, 32)" in out and "float32" in out
    assert "class histogram: class0 10, class1 10" in out
    assert (tmp_path / "grid.png").stat().st_size > 5000


def test_inspect_rejects_a_foreign_file_with_a_clear_error(tmp_path, capsys):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = [1, 2, 3]
    assert main(["inspect", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert str(foreign) in err and "not a notbugs artifact" in err


def test_inspect_describes_a_checkpoint_and_names_a_broken_one(tmp_path, capsys):
    from notbugs.models import build_model, save_checkpoint
    model = build_model("small_cnn", 10, [0.5] * 3, [0.25] * 3)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, arch="small_cnn", num_classes=10, mean=[0.5] * 3, std=[0.25] * 3,
                    config={"epochs": 3}, seed=7)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    expected = sum(p.numel() for p in model.parameters())
    assert "arch: small_cnn" in out and "classes: 10" in out and f"parameters: {expected:,}" in out
    assert "seed: 7" in out and "config: {'epochs': 3}" in out
    assert main(["inspect", str(path), "--grid", str(tmp_path / "g.png")]) == 2
    broken = tmp_path / "broken.pt"
    broken.write_bytes(path.read_bytes()[:100])
    assert main(["inspect", str(broken)]) == 2
    assert str(broken) in capsys.readouterr().err


def test_version(capsys):
    import pytest

    from notbugs import __version__
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"notbugs {__version__}"


def test_inspect_reports_the_accuracies_of_a_predictions_file(tmp_path, capsys):
    import numpy as np

    from notbugs import hdf5
    labels = np.array([0, 1, 2, 3])
    columns = {name: hdf5.ColumnSpec((), "int64") for name in ("labels", "clean_pred", "robust_pred_eps0.25")}
    writer = hdf5.ChunkedWriter(tmp_path / "predictions.h5", 4, columns, "test", split="test")
    writer.append({"labels": labels, "clean_pred": np.array([0, 1, 2, 0]), "robust_pred_eps0.25": np.array([0, 3, 3, 3])})
    writer.finish(kind="evaluation", class_names=["a", "b", "c", "d"], config={}, seed=0, source="test")
    assert main(["inspect", str(tmp_path / "predictions.h5")]) == 0
    out = capsys.readouterr().out
    assert "accuracy: clean 75.00%, robust at eps 0.25 25.00%" in out


@pytest.mark.parametrize("native", [True, False])
def test_bench_reports_every_contender_against_the_peak_of_its_precision(capsys, monkeypatch, native):
    """Structure, not speed: every contender appears with a positive rate, the bf16 rows are
    measured against the bfloat16 peak, and the ratios are printed. Where the CPU has no
    bfloat16 arithmetic the bf16 rows are left out and the output says why. (The native case
    pretends: on such a CPU the bf16 kernels are emulated, so the sizes here stay small.)"""
    from notbugs import bench
    monkeypatch.setattr(bench, "native_bf16", lambda device: native)
    if native:  # the peak's 4096² bf16 matmul alone takes minutes where bf16 is emulated
        monkeypatch.setattr(bench, "peak_flops", lambda device, seconds, dtype=None: 1e9)
    assert main(["bench", "--arch", "small_cnn", "--batch", "16", "--steps", "2", "--seconds", "0.1",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "GFLOP/s float32" in out and ("GFLOP/s bfloat16" in out) == native
    assert ("bfloat16 not measured: this device has no bfloat16 arithmetic" in out) == (not native)
    for contender in ("notbugs PGD ", "notbugs PGD, no fast paths", "reference PGD loop", "notbugs inversion",
                      "notbugs training ", "reference training loop"):
        assert contender in out, contender
    bf16_lines = [line for line in out.splitlines() if "bf16" in line and "% of the" in line]
    assert len(bf16_lines) == (2 if native else 0) and all("of the bfloat16 peak" in line for line in bf16_lines)
    assert ("ratio bf16/float32 PGD" in out) == native and "ratio notbugs/reference train" in out
    rows = [line.strip() for line in out.splitlines() if "% of the" in line]
    with_ceiling = {row.split("  ")[0] for row in rows if "ceiling" in row}
    assert with_ceiling == {"notbugs PGD", "notbugs inversion", "notbugs training"} | (
        {"notbugs PGD, bf16 autocast", "notbugs training, bf16"} if native else set())


def test_bench_stages_names_a_missing_run_and_a_foreign_file(tmp_path, capsys):
    assert main(["bench", "--stages", str(tmp_path)]) == 2
    assert "no Snakemake benchmark files" in capsys.readouterr().err
    (tmp_path / "train_source").mkdir()
    (tmp_path / "train_source" / "robust.tsv").write_text("a\tb\n1\t2\n")
    assert main(["bench", "--stages", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "robust.tsv is not a Snakemake benchmark file" in err and "cpu_time" in err


def test_bench_split_compares_jobs_side_by_side_with_one_threaded_job(capsys):
    """Structure, not speed: each job kind gets a positive rate in both layouts and their ratio."""
    from notbugs.bench import thread_split
    rows = thread_split(archs=["small_cnn"], cores=2, batch=8, steps=1, min_seconds=0.3, rounds=1)
    assert [r["kind"] for r in rows] == ["attack", "inversion", "training"]
    for row in rows:
        assert row["side_by_side"] > 0 and row["one_job"] > 0
        assert row["ratio"] == row["side_by_side"] / row["one_job"]
    out = capsys.readouterr().out
    assert "2 jobs x 1 thread against 1 job x 2 threads" in out and out.count("small_cnn ") == 3


def test_bench_allocator_compares_kept_freed_memory_with_glibcs_default(capsys):
    """Structure, not speed: both allocator settings get a rate per job kind, and their ratio."""
    assert main(["bench", "--allocator", "--arch", "small_cnn", "--batch", "8", "--steps", "1", "--seconds", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "malloc keeping freed memory against glibc's default" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("small_cnn ")]
    assert [row[1] for row in rows] == ["attack", "inversion", "training"]
    for row in rows:
        kept, default, ratio = float(row[2]), float(row[3]), float(row[4].rstrip("x"))
        assert kept > 0 and default > 0 and ratio == pytest.approx(kept / default, abs=0.006)


def test_bench_operators_lists_each_job_kinds_costliest_operators(capsys):
    assert main(["bench", "--operators", "--arch", "small_cnn", "--batch", "8", "--steps", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for kind in ("attack", "inversion", "training"):
        assert f"small_cnn {kind}: top 8 operators" in out
    assert "aten::" in out


def test_bench_operators_by_shape_gives_each_convolution_layer_its_own_line(capsys):
    from notbugs.models import build_model
    assert main(["bench", "--operators", "--by-shape", "--top", "1000", "--arch", "small_cnn", "--batch", "8",
                 "--steps", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    attack = out.split("small_cnn attack:")[1].split("small_cnn inversion:")[0]
    assert "per input shapes" in attack.splitlines()[0]
    rows = [line.split("%", 1) for line in attack.splitlines()[1:] if "%" in line]
    labels = [label.strip() for _, label in rows]
    assert len(labels) == len(set(labels))
    model = build_model("small_cnn", 10, [0.5] * 3, [0.25] * 3)
    weights = [str(list(m.weight.shape)) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(set(weights)) == 4
    for weight in weights:  # every layer's forward and backward pass, each on a line of its own
        for op in ("aten::mkldnn_convolution ", "aten::convolution_backward "):
            assert sum(label.startswith(op) and weight in label for label in labels) == 1, (op, weight)
