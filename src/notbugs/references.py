"""Every reference number notbugs prints beside its own, with where it comes from.

All values are percentages on CIFAR-10 unless stated. ``origin`` says whose number it is:
"paper" (Ilyas et al., NeurIPS 2019), "paper (approx.)" (read off a figure), "replication"
(a later re-run of the paper's setup, not the paper's own number), or the author of a Distill
response. docs/paper-notes.md has the context of each (section numbers below).
"""

from __future__ import annotations

from typing import NamedTuple


class Reference(NamedTuple):
    value: float
    origin: str
    citation: str


# Figure 2 (docs/paper-notes.md §4): (standard accuracy, robust accuracy at L2 eps=0.25).
FIGURE2 = {
    "standard_on_d": (Reference(95.3, "paper", "paper Fig. 2"), Reference(4.5, "paper", "paper Fig. 2")),
    "adversarial_on_d": (Reference(91.0, "paper (approx.)", "paper Fig. 2, read off the bar"),
                         Reference(82.5, "paper (approx.)", "paper Fig. 2, read off the bar")),
    "standard_on_d_r": (Reference(84.1, "paper", "paper Fig. 2 / §3.1"), Reference(48.3, "paper", "paper Fig. 2 / §3.1")),
    "standard_on_d_nr": (Reference(87.7, "paper", "paper Fig. 2 / §3.1"), Reference(0.8, "paper", "paper Fig. 2 / §3.1")),
}

# Table 1 and its controls (docs/paper-notes.md §4 and §6): test accuracy on the original test set.
TABLE1 = {
    "d": Reference(95.3, "paper", "paper Table 1"),
    "d_rand": Reference(63.3, "paper", "paper Table 1"),
    "d_det": Reference(43.7, "paper", "paper Table 1"),
    "d_other": Reference(67.3, "replication", "docs/paper-notes.md §6"),
    # The leakage-only twins as the replication built them: deconv patterns of norm 0.5; mask t = y
    # for D_rand's twin, a 1-epoch clean model's predictions for D_det's and D_other's.
    "d_leak_rand": Reference(79.5, "replication", "docs/paper-notes.md §6 (mask t = y)"),
    "d_leak_det": Reference(32.3, "replication", "docs/paper-notes.md §6 (1-epoch clean-model mask)"),
    "d_leak_other": Reference(50.1, "replication", "docs/paper-notes.md §6 (1-epoch clean-model mask)"),
}

# Goh, "Robust Feature Leakage" (Distill 2019; docs/paper-notes.md §6): test accuracy of a linear
# classifier on the robust linear model's features, trained on each constructed set.
GOH_FEATURES_ONLY = {"d_rand": 23.5, "d_det": 6.81}

# Nakkiran, "Adversarial Examples are Just Bugs, Too" (Distill 2019; docs/paper-notes.md §6): D_det-style test accuracy
# of a model trained on plain vs non-transferable targeted examples.
NAKKIRAN_TARGET_TEST_ACC = {"pgd": 33.0, "nontransferable": 3.0}

# Wallace, "Learning from Incorrectly Labeled Data" (Distill 2019; docs/paper-notes.md §6).
WALLACE = {"relabeller_test_acc": 63.0, "kept_fraction": 100 * 18768 / 50000, "target_test_acc": 49.7}
