"""Print each constructed set's recorded attributes (attack success, kept rows, perturbation
norms, robust leakage, distances) and the precision its attack ran in.

    python docs/results/cifar10-cpu/construction_attrs.py <run dir> > construction_attrs.txt
"""
import sys
from pathlib import Path

import h5py

from notbugs import tables

results = next((Path(sys.argv[1]) / "results").iterdir())
for path in sorted(results.glob("constructed/*.h5")):
    summary = {key: round(float(value), 4) if not isinstance(value, (int, str)) else value
               for key, value in tables.construction_summary(path, path.stem).items()}
    with h5py.File(path, "r") as f:
        summary["precision"] = f.attrs.get("precision", "") or "none (no model run)"
    print(path.name, summary)
