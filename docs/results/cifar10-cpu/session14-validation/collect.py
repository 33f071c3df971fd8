"""Validation accuracy / robust accuracy (500 images) per target, and D_R - D per replicate."""
import glob, sys, pandas as pd
root = sys.argv[1]
rows = []
for log in sorted(glob.glob(f"{root}/results/cifar10-cpu/targets/*/*/r*/train_log.csv")):
    d = pd.read_csv(log); s = log.split("/")
    rows.append(dict(set=s[-4], rep=s[-2], epochs=len(d), val=100 * d.val_acc.iloc[-1], val_robust=100 * d.val_robust_acc.iloc[-1]))
df = pd.DataFrame(rows)
print(df.pivot(index="rep", columns="set", values="val_robust").round(1).to_string())
print(df.groupby("set")[["epochs", "val", "val_robust"]].agg(["mean", "std"]).round(1).to_string())
p = df.pivot(index="rep", columns="set", values="val_robust")
for c in p.columns:
    if c != "d" and "d" in p:
        print(c, "- d per replicate:", (p[c] - p["d"]).round(1).tolist(), "mean", round((p[c] - p["d"]).mean(), 1))
