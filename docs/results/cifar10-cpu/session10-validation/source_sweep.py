"""Source variants: validation accuracy and targeted L2 PGD success (eps 0.5, 30 steps of 0.1,
t = y+1, keep best) on 2000 training rows (every 5th). Validation split only."""
import json, sys, time
from pathlib import Path
import numpy as np, torch
from notbugs import attacks, hdf5, train
from notbugs.config import complete
from notbugs.batches import to_float
from notbugs.models import load_model

torch.set_num_threads(1)
name, arch, overrides, data_path = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
out = Path("sweep") / name
images, labels = hdf5.load_split(data_path, "train")
val = hdf5.load_split(data_path, "val")
with hdf5.open_artifact(data_path) as art:
    mean, std = art.attrs["mean"], art.attrs["std"]
cfg = complete("sources.x.train", {"epochs": 30, "precision": "bfloat16", "batch_size": 128, "lr": 0.1,
                                   "momentum": 0.9, "weight_decay": 5e-4, "schedule": "triangle",
                                   "augment": {"crop": True, "padding": 4, "flip": True}, **overrides})
t0 = time.time()
if not (out / "model.pt").exists():
    train.train(images, labels, arch=arch, num_classes=10, mean=mean, std=std, cfg=cfg, seed=0, out_dir=out,
                device=torch.device("cpu"), val=val, val_cfg=complete("validation", {}))
t_train = time.time() - t0
model = load_model(out / "model.pt", device=torch.device("cpu"))[0].eval()
for p in model.parameters():
    p.requires_grad_(False)
sample = np.arange(0, len(labels), len(labels) // 2000)[:2000]
x = to_float(torch.from_numpy(images[sample]))
y = torch.from_numpy(labels[sample])
t = (y + 1) % 10
t0 = time.time()
reached = []
for i in range(0, 2000, 250):
    res = attacks.pgd(model, x[i:i + 250], t[i:i + 250], eps=0.5, steps=30, step_size=0.1, targeted=True, keep_best=True)
    reached.append(res.success)
success = torch.cat(reached).float().mean().item()
import pandas as pd
log = pd.read_csv(out / "train_log.csv")
print(json.dumps({"name": name, "arch": arch, "overrides": overrides, "val_acc": round(100 * log.val_acc.iloc[-1], 1),
                  "train_fit": round(100 * torch.load(out / "model.pt", weights_only=False)["train_fit"], 1),
                  "success_eps0.5": round(100 * success, 1), "train_s": round(t_train), "attack_s": round(time.time() - t0)}))
