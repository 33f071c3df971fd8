"""Every claim of a cifar10-cpu run on the VALIDATION split: per replicate differences, mean, t-interval.
usage: PYTHONPATH=src python val_claims.py <run dir> [robust images]"""
import glob, sys, json
import numpy as np, torch, scipy.stats as st
from notbugs import hdf5
from notbugs.models import load_model
from notbugs.train import validate
torch.set_num_threads(1)
run = sys.argv[1]; k = int(sys.argv[2]) if len(sys.argv) > 2 else 500
res = f"{run}/results/cifar10-cpu"
with hdf5.open_artifact(f"{res}/data.h5") as art:
    x = art.split("val").images[:]; y = torch.from_numpy(art.split("val").labels)
cfg = {"robust_examples": k, "robust_eps": 0.25, "robust_steps": 20}
ROBUST = {"d", "d_r", "d_r_blend", "d_nr"}
acc = {}
for path in sorted(glob.glob(f"{res}/targets/*/*/r*/model.pt")) + sorted(glob.glob(f"{res}/sources/*/model.pt")):
    parts = path.split("/")
    key = (parts[-4], parts[-2]) if "/targets/" in path else ("src:" + parts[-2], "-")
    m = load_model(path)[0]
    c = {"robust_examples": k if key[0] in ROBUST or key[0].startswith("src:") else 0, "robust_eps": 0.25, "robust_steps": 20}
    acc[key] = [100 * v for v in validate(m, x, y, c, 500)]
    print(key, [round(v, 1) for v in acc[key]], flush=True)
pairs = [("d_r", "d", 1), ("d_r", "d_r_blend", 1), ("d_rand", "d_leak_rand", 0), ("d_det", "d_leak_det", 0),
         ("d_other", "d_leak_other", 0), ("d_det_no_robust_t", "d_leak_det_no_robust_t", 0)]
out = {"acc": {f"{a}/{b}": v for (a, b), v in acc.items()}, "claims": {}}
for better, worse, m in pairs:
    reps = sorted(r for s, r in acc if s == better)
    d = np.array([acc[(better, r)][m] - acc[(worse, r)][m] for r in reps])
    half = st.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    out["claims"][f"{better}>{worse}"] = {"per_rep": d.round(1).tolist(), "mean": round(d.mean(), 1), "ci": [round(d.mean() - half, 1), round(d.mean() + half, 1)]}
    print(f"{better} > {worse} ({'robust' if m else 'clean'}): per rep {d.round(1).tolist()} mean {d.mean():.1f} [{d.mean()-half:.1f}, {d.mean()+half:.1f}]")
for s in ["d", "d_r", "d_r_blend", "d_nr", "d_rand", "d_det", "d_other", "d_det_no_robust_t"]:
    v = np.array([acc[(s, r)] for ss, r in acc if ss == s])
    print(s, "val clean %.1f robust %.1f" % tuple(np.nanmean(v, 0)))
json.dump(out, open(f"{run}/val_claims.json", "w"), indent=1)
