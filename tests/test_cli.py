"""`notbugs inspect`: provenance, shapes and a class histogram; a grid; clear errors."""

import h5py

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
