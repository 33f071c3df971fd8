"""Tables (models, table1, claims) of a run that built only some target sets.

    python partial_tables.py <run dir> <out dir> better:worse [better:worse ...]

Reads results/<name>/targets/*/*/r*/{metrics.json,predictions.h5} and results/<name>/constructed/*.h5
with notbugs.tables' own functions; the comparisons are clean accuracy on the test split.
"""
import json
import sys
from pathlib import Path

from notbugs import tables

run, out = Path(sys.argv[1]), Path(sys.argv[2])
pairs = [dict(zip(("better", "worse"), a.split(":")), metric="clean") for a in sys.argv[3:]]
results = next((run / "results").iterdir())
metrics, predictions = {}, {}
for path in sorted(results.glob("targets/*/*/r*/metrics.json")):
    model_dir = str(path.parent.relative_to(results))
    metrics[model_dir] = json.loads(path.read_text())
    predictions[model_dir] = path.parent / "predictions.h5"
constructions = {path.stem: tables.construction_summary(path, path.stem)
                 for path in sorted(results.glob("constructed/*.h5"))}
models = tables.models_table(metrics, constructions)
out.mkdir(parents=True, exist_ok=True)
models.to_csv(out / "models.csv", index=False, float_format="%.4g")
tables.table1(models, 10, constructions).to_csv(out / "table1.csv", index=False, float_format="%.4g")
claims = tables.claims(models, pairs, 0.25, lambda d, m: tables.correct_per_example(predictions[d], m, 0.25))
claims.to_csv(out / "claims.csv", index=False, float_format="%.4g")
(out / "construction_attrs.txt").write_text(
    "\n".join(f"{k}: {v}" for k, v in constructions.items()) + "\n")
print(claims.to_string(index=False))
