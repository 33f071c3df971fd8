"""D_det and its twin without the rows the robust source reads as t: validation accuracy of
fresh targets (one-off; the preset run's files, read-only, no test image)."""
import json, sys
import numpy as np, torch
from notbugs import hdf5
from notbugs.batches import predict
from notbugs.models import load_model
from notbugs.train import train
from notbugs.runtime import keep_freed_memory
from notbugs.sampling import target_seed

keep_freed_memory()
torch.set_num_threads(1)
run, out, which, reps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
res = f"{run}/results/cifar10-cpu"
ref = torch.load(f"{res}/targets/d_det/small_cnn_wide/r1/model.pt", weights_only=False, map_location="cpu")
cfg = ref["config"]["train"]
robust = load_model(f"{res}/sources/robust/model.pt", device="cpu")[0].eval()
with hdf5.open_artifact(f"{res}/data.h5", kind="data") as data:
    val = (data.split("val").images[:], data.split("val").labels[:])
    mean, std = data.attrs["mean"], data.attrs["std"]
with hdf5.open_artifact(f"{res}/constructed/d_det.h5") as f:
    s = f.split("train")
    det_images, t, orig = s.images[:], s.labels[:], s["orig_index"][:]
robust_reads = predict(robust, det_images, 500, "cpu")
drop = robust_reads == t
print(f"robust reads t on {drop.mean():.4f} of {len(t)} D_det rows", flush=True)
name = which
path = f"{res}/constructed/{'d_det' if which == 'det' else 'd_leak_det'}.h5"
with hdf5.open_artifact(path) as f:
    s = f.split("train")
    images, labels, rows = s.images[:], s.labels[:], s["orig_index"][:]
assert (rows == orig).all() and (labels == t).all()
keep = ~drop
results = []
for k in range(1, reps + 1):
    seed = target_seed(0, f"{which}_without_robust_t", "small_cnn_wide", k)
    summary = train(images[keep], labels[keep], arch="small_cnn_wide", num_classes=10, mean=mean, std=std,
                    cfg=cfg, seed=seed, out_dir=f"{out}/{which}/r{k}", device=torch.device("cpu"),
                    val=val, val_cfg={"robust_examples": 0, "robust_eps": 0.25, "robust_steps": 10})
    import pandas as pd
    log = pd.read_csv(f"{out}/{which}/r{k}/train_log.csv")
    results.append(dict(set=which, replicate=k, rows=int(keep.sum()), val_acc=round(100 * log.val_acc.iloc[-1], 2)))
    print(results[-1], flush=True)
import os; os.makedirs(out, exist_ok=True); json.dump(results, open(f"{out}/{which}.json", "w"))
