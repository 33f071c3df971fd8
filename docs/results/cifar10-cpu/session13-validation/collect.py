"""Last-epoch validation accuracy and fit of the PGD sets' and twins' targets of three runs."""
import glob, sys
import pandas as pd, torch
RUNS = {"one_source_10k": "/work/run_bf16/results/cifar10-cpu",
        "one_source_20k": "/work/run_v20k/results/cifar10-cpu-20k-val",
        "three_sources_10k": "/work/run_ens/results/cifar10-cpu-ens-val"}
SETS = ["d_rand", "d_leak_rand", "d_det", "d_leak_det", "d_other", "d_leak_other"]
rows = []
for experiment, root in RUNS.items():
    for log in sorted(glob.glob(f"{root}/targets/*/*/r*/train_log.csv")):
        parts = log.split("/")
        if parts[-4] not in SETS:
            continue
        d = pd.read_csv(log)
        m = torch.load(log.replace("train_log.csv", "model.pt"), weights_only=False, map_location="cpu")
        rows.append(dict(experiment=experiment, set=parts[-4], replicate=parts[-2], epochs=len(d),
                         val_acc=round(100 * d.val_acc.iloc[-1], 2), fit=round(100 * m["train_fit"], 2)))
df = pd.DataFrame(rows)
df.to_csv(sys.argv[1], index=False)
print(df.groupby(["experiment", "set"])[["val_acc", "fit"]].agg(["mean", "std", "count"]).round(1).to_string())
