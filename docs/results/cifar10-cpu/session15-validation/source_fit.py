import sys, torch, numpy as np
from notbugs import hdf5
from notbugs.models import load_model
from notbugs.batches import predict
torch.set_num_threads(2)
for run in sys.argv[1:]:
    with hdf5.open_artifact(f"{run}/results/cifar10-cpu/data.h5") as a:
        x, y = a.split("train").images[:], a.split("train").labels
    for s in ["standard", "standard_2", "standard_3", "robust"]:
        m = load_model(f"{run}/results/cifar10-cpu/sources/{s}/model.pt")[0]
        print(run, s, "accuracy on the 10k subset %.1f" % (100 * (predict(m, x, 500) == y).mean()))
