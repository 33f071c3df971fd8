import sys, numpy as np, torch, scipy.stats as st
from notbugs import hdf5
from notbugs.models import load_model
from notbugs.batches import predict
torch.set_num_threads(2)
def acc(run, s, r):
    with hdf5.open_artifact(f"{run}/results/cifar10-cpu/data.h5") as a:
        x, y = a.split("val").images[:], a.split("val").labels
    m = load_model(f"{run}/results/cifar10-cpu/targets/{s}/small_cnn_wide/r{r}/model.pt")[0]
    return 100 * (predict(m, x, 500) == y).mean()
for run in sys.argv[1:]:
    print(run)
    for b, w in (("d_det", "d_leak_det"), ("d_det_no_robust_t", "d_leak_det_no_robust_t")):
        a = np.array([acc(run, b, r) for r in range(1, 5)]); c = np.array([acc(run, w, r) for r in range(1, 5)])
        d = a - c; h = st.t.ppf(0.975, 3) * d.std(ddof=1) / 2
        print(f"  {b} {a.mean():.1f} vs {w} {c.mean():.1f}: per rep {d.round(1).tolist()} mean {d.mean():.1f} [{d.mean()-h:.1f}, {d.mean()+h:.1f}]")
