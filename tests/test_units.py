"""Small pure functions of the training and sampling code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import train_config
from notbugs.sampling import choose_targets, chunk_generator, derangement, epoch_generator
from notbugs.train import augment, lr_at

# --------------------------------------------------------------------------- lr_at


def test_constant_schedule():
    cfg = train_config(schedule="constant", lr=0.3, epochs=5)
    assert [lr_at(e, cfg) for e in range(5)] == [0.3] * 5


def test_step_schedule_drops_at_the_milestones():
    cfg = train_config(schedule="step", lr=1.0, epochs=10, milestones=[0.5, 0.8], gamma=0.1)
    lrs = [lr_at(e, cfg) for e in range(10)]
    assert lrs[:5] == [1.0] * 5
    assert lrs[5:8] == pytest.approx([0.1] * 3)
    assert lrs[8:] == pytest.approx([0.01] * 2)


def test_cosine_schedule_starts_at_the_peak_and_decays():
    cfg = train_config(schedule="cosine", lr=0.2, epochs=4)
    assert [lr_at(e, cfg) for e in range(4)] == pytest.approx([0.2 * 0.5 * (1 + math.cos(math.pi * e / 4))
                                                               for e in range(4)])


def test_triangle_schedule_peaks_at_a_fifth_then_decays_to_zero():
    cfg = train_config(schedule="triangle", lr=1.0, epochs=10)
    lrs = [lr_at(e, cfg) for e in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == lrs[2] == pytest.approx(1.0) == max(lrs)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] == pytest.approx(1 / 8)


# --------------------------------------------------------------------------- augment

def _ramp(n=6):
    return torch.arange(n * 3 * 8 * 8, dtype=torch.float32).reshape(n, 3, 8, 8)


def test_augment_off_is_the_identity():
    x = _ramp()
    out = augment(x, train_config()["augment"], torch.Generator().manual_seed(0))
    assert torch.equal(out, x)


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    x = _ramp()
    cfg = train_config(augment={"crop": True, "padding": 2})["augment"]
    out = augment(x, cfg, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert not torch.equal(out, x)


def test_flip_mirrors_some_images_and_keeps_the_others():
    x = _ramp(32)
    out = augment(x, train_config(augment={"flip": True})["augment"], torch.Generator().manual_seed(2))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < len(x)


def test_augment_is_determined_by_the_generator():
    x = _ramp()
    cfg = train_config(augment={"crop": True, "flip": True})["augment"]
    a = augment(x, cfg, epoch_generator(0, 3))
    b = augment(x, cfg, epoch_generator(0, 3))
    c = augment(x, cfg, epoch_generator(0, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- sampling

def test_choose_targets_schemes():
    labels = np.arange(1000) % 10
    nxt = choose_targets("next", labels, 10, np.random.default_rng(0))
    np.testing.assert_array_equal(nxt, (labels + 1) % 10)
    other = choose_targets("other", labels, 10, np.random.default_rng(0))
    assert (other != labels).all() and set(other) == set(range(10))
    rand = choose_targets("random", labels, 10, np.random.default_rng(0))
    assert 0.05 < (rand == labels).mean() < 0.15  # t = y about 1/C of the time
    assert set(rand) == set(range(10))
    with pytest.raises(ValueError, match="unknown target scheme"):
        choose_targets("previous", labels, 10, np.random.default_rng(0))


@pytest.mark.parametrize("n", [2, 3, 10, 257])
def test_derangement_is_a_permutation_without_fixed_points(n):
    for seed in range(5):
        perm = derangement(n, np.random.default_rng(seed))
        assert sorted(perm) == list(range(n))
        assert (perm != np.arange(n)).all()


def test_derangement_needs_two_images():
    with pytest.raises(ValueError, match="at least two"):
        derangement(1, np.random.default_rng(0))


def test_chunk_generators_depend_on_seed_and_offset_only():
    def draw(seed, offset):
        return torch.rand(3, generator=chunk_generator(seed, offset))
    assert torch.equal(draw(0, 512), draw(0, 512))
    assert not torch.equal(draw(0, 512), draw(0, 1024))
    assert not torch.equal(draw(0, 512), draw(1, 512))


# --------------------------------------------------------------------------- fresh targets

def test_targets_are_fresh_models():
    """Two targets of one set differ in initial weights and first-batch rows from each other and
    from the source (which trains with the top-level seed)."""
    from notbugs.sampling import target_seed
    from notbugs.train import epoch_order, initial_model

    seeds = {"source": 0, "r1": target_seed(0, "d_det", "small_cnn", 1), "r2": target_seed(0, "d_det", "small_cnn", 2),
             "other set": target_seed(0, "d_rand", "small_cnn", 1)}
    assert len(set(seeds.values())) == len(seeds)
    weights = {k: initial_model("small_cnn", 10, [0.5] * 3, [0.25] * 3, s).state_dict()["body.0.weight"]
               for k, s in seeds.items()}
    first_batch = {k: epoch_order(s, 0, 2000)[0][:128] for k, s in seeds.items()}
    names = list(seeds)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.equal(weights[a], weights[b]), (a, b)
            assert not torch.equal(first_batch[a], first_batch[b]), (a, b)
    assert target_seed(0, "d_det", "small_cnn", 1) == seeds["r1"]  # stable, so a rerun is the same model


# --------------------------------------------------------------------------- precision: auto

def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    from notbugs.runtime import cpu_flags
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\n"
                                      "processor\t: 1\nflags\t\t: fpu avx2 amx_bf16\n")
    assert cpu_flags(tmp_path / "cpuinfo") == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize("flags, expected", [({"avx2", "fma"}, "float32"), ({"avx2", "avx512_bf16"}, "bfloat16"),
                                             ({"amx_bf16", "amx_tile"}, "bfloat16"), (set(), "float32")])
def test_auto_precision_is_bfloat16_only_where_the_cpu_computes_in_it(flags, expected):
    from notbugs.runtime import resolve_precision
    assert resolve_precision("auto", "cpu", flags) == expected
    assert resolve_precision("float32", "cpu", flags) == "float32"


def test_an_explicit_bfloat16_without_native_support_is_kept_with_a_warning(caplog):
    from notbugs.runtime import resolve_precision
    with caplog.at_level("WARNING"):
        assert resolve_precision("bfloat16", "cpu", {"avx2"}) == "bfloat16"
    assert "no native bfloat16" in caplog.text and "precision: auto" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert resolve_precision("bfloat16", "cpu", {"avx512_bf16"}) == "bfloat16"
    assert caplog.text == ""


@pytest.mark.parametrize("flags, expected", [(set(), "float32"), ({"amx_bf16"}, "bfloat16")])
def test_a_model_trained_with_auto_precision_records_the_one_it_used(tmp_path, monkeypatch, flags, expected):
    from helpers import make_data_artifact, train_tiny_model
    from notbugs import runtime
    from notbugs.models import read_checkpoint
    monkeypatch.setattr(runtime, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": flags)
    data = make_data_artifact(tmp_path / "data.h5", n_train=256, n_test=64)
    checkpoint = train_tiny_model(data, tmp_path / "model", epochs=1, precision="auto")
    assert read_checkpoint(checkpoint)["config"]["train"]["precision"] == expected


@pytest.mark.parametrize("capability, expected", [((7, 0), "float32"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")])
def test_auto_precision_on_a_gpu_follows_its_compute_capability(monkeypatch, capability, expected):
    """is_bf16_supported() says yes on pre-Ampere GPUs too (emulation); auto must not."""
    from notbugs.runtime import resolve_precision
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", "cuda:0", {"amx_bf16"} if expected == "float32" else set()) == expected
