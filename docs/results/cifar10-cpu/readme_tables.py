"""Print the README's two CIFAR-10 tables (models, then claims) from runs' tables directories.

    python docs/results/cifar10-cpu/readme_tables.py docs/results/cifar10-cpu/session14-seed0 \
        docs/results/cifar10-cpu/session14-seed1

Each argument is one seed's copy of results/cifar10-cpu/tables/ (models.csv, figure2.csv,
table1.csv, claims.csv); the columns follow the arguments' order. An argument ``A+B`` reads A and
takes the Table 1 rows and claims that B has from B (B may hold only table1.csv and claims.csv,
as a run that built only some sets does); those cells are marked †.
"""

import sys
from pathlib import Path

import pandas as pd

MODEL_ROWS = [  # (README label, paper, replication, where the row comes from)
    ("standard source (1 model)", "95.3", "–", ("source", "sources/standard")),
    ("robust source, L2 ε=0.5 (1 model; AutoAttack on 100 images)", "≈91 / 82.5", "–",
     ("figure2", "adversarial_on_d")),
    ("standard target on D", "95.3 / 4.5", "–", ("figure2", "standard_on_d")),
    ("standard target on D_R", "84.1 / 48.3", "–", ("figure2", "standard_on_d_r")),
    ("standard target on D_R's pixel blend (control)", "–", "–", ("figure2", "standard_on_d_r_blend")),
    ("standard target on D_NR", "87.7 / 0.8", "–", ("figure2", "standard_on_d_nr")),
    ("D_rand", "63.3", "~84–87 (ResNet-9)", ("table1", "d_rand")),
    ("its leakage-only twin (mask t = y)", "–", "79.5", ("table1", "d_leak_rand")),
    ("D_det", "43.7", "20–35 (ResNet-9)", ("table1", "d_det")),
    ("its leakage-only twin (1-epoch clean-model mask)", "–", "32.3", ("table1", "d_leak_det")),
    ("D_other", "–", "67.3", ("table1", "d_other")),
    ("its leakage-only twin (1-epoch clean-model mask)", "–", "50.1", ("table1", "d_leak_other")),
    ("D_det without the rows the robust source reads as t", "–", "–", ("table1", "d_det_no_robust_t")),
    ("its leakage-only twin (1-epoch clean-model mask)", "–", "–", ("table1", "d_leak_det_no_robust_t")),
]

CLAIM_ROWS = [
    ("D_rand > its twin", "d_rand", "d_leak_rand"),
    ("D_other > its twin", "d_other", "d_leak_other"),
    ("D_det > its twin", "d_det", "d_leak_det"),
    ("D_det without the rows the robust source reads as t > its twin", "d_det_no_robust_t",
     "d_leak_det_no_robust_t"),
    ("D_R > D, robust", "d_r", "d"),
    ("D_R > its pixel blend, robust", "d_r", "d_r_blend"),
]


def number(x):
    return f"{x:.1f}".replace("-", "−")


def interval(mean, low, high):
    return f"{number(mean)} [{number(low)}, {number(high)}]"


def p_value(p):
    if p >= 0.01:
        return f"{p:.2g}"
    mantissa, exponent = f"{p:.0e}".split("e")
    return f"{mantissa}e{exponent[0]}{exponent[1:].zfill(2)}"


def model_cell(tables, where):
    kind, key = where
    if kind == "source":
        row = tables["models"].set_index("model").loc[key]
        return f"{number(row['std_acc'])} / {number(row['robust_acc_eps0.25'])}"
    if kind == "table1":
        row = tables["table1"].set_index("train_set").loc[key]
        return interval(row["test_acc"], row["test_acc_ci_low"], row["test_acc_ci_high"]) + row["mark"]
    row = tables["figure2"].set_index("label").loc[key]
    if row["replicates"] == 1:
        return (f"{number(row['std_acc'])} / {number(row['robust_acc'])} "
                f"(AA {number(row['robust_acc_autoattack'])})")
    return (interval(row["std_acc"], row["std_acc_ci_low"], row["std_acc_ci_high"]) + " / "
            + interval(row["robust_acc"], row["robust_acc_ci_low"], row["robust_acc_ci_high"]))


def claim_holds(row):
    return row["diff_ci_low"] > 0 and row["worst_replicate_p"] < 0.01


def read_tables(argument):
    """The tables of ``A`` or ``A+B`` (B's Table 1 rows and claims replace A's, marked)."""
    base, *overlay = argument.split("+")
    tables = {name: pd.read_csv(Path(base) / f"{name}.csv") for name in ("models", "figure2", "table1", "claims")}
    tables["table1"]["mark"] = tables["claims"]["mark"] = ""
    for directory in overlay:
        for name, keys in (("table1", ["train_set"]), ("claims", ["better", "worse"])):
            new = pd.read_csv(Path(directory) / f"{name}.csv").assign(mark=" †")
            kept = ~tables[name].set_index(keys).index.isin(new.set_index(keys).index)
            tables[name] = pd.concat([tables[name][kept], new], ignore_index=True)
    return tables


def main(directories):
    runs = [read_tables(d) for d in directories]
    seeds = [" + ".join(Path(part).name for part in d.split("+")) for d in directories]
    print("| model | paper | replication | " + " | ".join(f"notbugs {s}: test / robust" for s in seeds) + " |")
    print("|---|---|---|" + "---|" * len(runs))
    for label, paper, replication, where in MODEL_ROWS:
        print(f"| {label} | {paper} | {replication} | "
              + " | ".join(model_cell(t, where) for t in runs) + " |")
    print()
    print("| claim | " + " | ".join(seeds) + " | holds on |")
    print("|---|" + "---|" * len(runs) + "---|")
    for label, better, worse in CLAIM_ROWS:
        cells, held = [], []
        for seed, tables in zip(seeds, runs):
            c = tables["claims"]
            row = c[(c["better"] == better) & (c["worse"] == worse)].iloc[0]
            sign = "+" if row["diff"] > 0 else ""
            cells.append(f"{sign}{interval(row['diff'], row['diff_ci_low'], row['diff_ci_high'])}, "
                         f"{p_value(row['p_value'])}, {p_value(row['worst_replicate_p'])}{row['mark']}")
            if claim_holds(row):
                held.append(seed)
        print(f"| {label} | " + " | ".join(cells) + f" | {', '.join(held) or 'none'} |")
    nr = [t["figure2"].set_index("label").loc["standard_on_d_nr"] for t in runs]
    print("| D_NR robust near 0 | " + " | ".join(
        interval(r["robust_acc"], r["robust_acc_ci_low"], r["robust_acc_ci_high"]) for r in nr) + " | – |")


if __name__ == "__main__":
    main(sys.argv[1:])
