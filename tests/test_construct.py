"""Construction methods at the array level (no HDF5), and the registry pinned to the schema."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import construction_config
from notbugs import construct
from notbugs.config import ConfigError, schema
from notbugs.models import build_model
from notbugs.sampling import chunk_generator

pytestmark = pytest.mark.usefixtures("one_thread")

N_CLASSES = 10


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("small_cnn", N_CLASSES, [0.5] * 3, [0.25] * 3).eval()


def _images(n=24, seed=0):
    return torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(seed))


def _run(method, images: torch.Tensor, labels: np.ndarray, seed=0):
    """Plan and build every row as one chunk, as construct() does, but on arrays."""
    rows, targets = method.plan(images.numpy(), labels, N_CLASSES, np.random.default_rng([seed, 1]), 64, "cpu")
    chunk = construct.Chunk(x=images[rows], labels=torch.from_numpy(labels[rows]),
                            targets=torch.from_numpy(targets[rows]), rows=rows, generator=chunk_generator(seed, 0),
                            read_images=lambda index: images[index])
    return rows, targets, method.build(chunk)


def _labels(n=24):
    return np.arange(n, dtype=np.int64) % N_CLASSES


# --------------------------------------------------------------------------- registry vs schema

def test_registry_and_schema_name_the_same_methods():
    doc = schema()
    enum = doc["$defs"]["construction"]["properties"]["method"]["enum"]
    assert sorted(enum) == sorted(construct.METHODS)
    branches = {b["if"]["properties"]["method"]["const"]: b["then"]["$ref"] for b in doc["$defs"]["construction"]["allOf"]}
    assert sorted(branches) == sorted(construct.METHODS)
    for name, method in construct.METHODS.items():
        entry = doc["$defs"][branches[name].rsplit("/", 1)[1]]
        assert entry["properties"]["method"] == {"const": name}
        # The workflow decides from the config alone whether a job needs a source model.
        assert ("source" in entry["required"]) == method.needs_source, name


def test_targeted_attack_methods_are_the_same_for_config_and_registry():
    from notbugs.config import TARGETED_ATTACK_METHODS
    assert set(TARGETED_ATTACK_METHODS) == {name for name, m in construct.METHODS.items() if m.targeted_attack}


def test_each_method_rejects_settings_it_does_not_use():
    with pytest.raises(ConfigError, match=r"'constructions.test.steps'"):
        construction_config(method="leakage", steps=3)
    with pytest.raises(ConfigError, match=r"'constructions.test.eps'"):
        construction_config(method="inversion", source="s", eps=0.5)
    with pytest.raises(ConfigError, match=r"'source' is a required property"):
        construction_config(method="pgd")


# --------------------------------------------------------------------------- each method on arrays

def test_targeted_pgd_stays_in_the_ball_and_labels_with_the_target():
    images, labels = _images(), _labels()
    method = construct.TargetedPGD(construction_config(method="pgd", source="s", target="next", steps=10),
                                   seed=0, source=_model())
    rows, targets, built = _run(method, images, labels)
    np.testing.assert_array_equal(rows, np.arange(len(labels)))
    np.testing.assert_array_equal(targets, (labels + 1) % N_CLASSES)
    assert built.perturbation_norm.max() <= 0.5 + 1e-5
    torch.testing.assert_close(built.perturbation_norm, (built.images - images).flatten(1).norm(dim=1))
    assert built.images.min() >= 0 and built.images.max() <= 1
    with torch.no_grad():
        predicted = _model()(built.images).argmax(1)
    torch.testing.assert_close(built.target_reached, predicted == torch.from_numpy(targets))


def test_an_ensemble_pgd_attacks_the_mean_of_its_models_logits():
    images, labels = _images(), _labels()
    cfg = construction_config(method="pgd", source="s", ensemble=["a", "b"], target="next", steps=10)
    members = [_model(0), _model(1), _model(2)]
    method = construct.TargetedPGD(cfg, seed=0, source=members[0], ensemble=members[1:])
    _, targets, built = _run(method, images, labels)
    assert built.perturbation_norm.max() <= 0.5 + 1e-5
    assert built.images.min() >= 0 and built.images.max() <= 1
    with torch.no_grad():
        mean_logits = torch.stack([m(built.images) for m in members]).mean(0)
        alone = construct.TargetedPGD(cfg, seed=0, source=_model(0))
    torch.testing.assert_close(built.target_reached, mean_logits.argmax(1) == torch.from_numpy(targets))
    # the perturbation is not the one the source alone would get
    assert not torch.allclose(built.images, _run(alone, images, labels)[2].images)


def test_nontransferable_pgd_stays_in_the_ball():
    images, labels = _images(), _labels()
    cfg = construction_config(method="nontransferable", source="s", ensemble=["a"], target="other", steps=5)
    method = construct.NonTransferablePGD(cfg, seed=0, source=_model(0), ensemble=[_model(1)])
    _, targets, built = _run(method, images, labels)
    assert (targets != labels).all()
    assert built.perturbation_norm.max() <= 0.5 + 1e-5


def test_inversion_starts_from_another_image_and_moves_towards_x():
    images, labels = _images(), _labels()
    model = _model()
    method = construct.Inversion(construction_config(method="inversion", source="s", steps=30, step_size=0.5),
                                 seed=0, source=model)
    rows, targets, built = _run(method, images, labels)
    np.testing.assert_array_equal(targets, labels)
    starts = method.starts
    assert (starts != np.arange(len(labels))).all() and sorted(starts) == list(range(len(labels)))
    with torch.no_grad():
        goal = model.features(images)
        before = (model.features(images[starts]) - goal).norm(dim=1) / goal.norm(dim=1)
    assert (built.loss < before).all()
    torch.testing.assert_close(built.perturbation_norm, (built.images - images[starts]).flatten(1).norm(dim=1))


def test_inversion_from_noise_draws_from_the_chunk_generator():
    images, labels = _images(8), _labels(8)
    cfg = construction_config(method="inversion", source="s", steps=1, start="noise")
    first = _run(construct.Inversion(cfg, seed=0, source=_model()), images, labels)[2]
    again = _run(construct.Inversion(cfg, seed=0, source=_model()), images, labels)[2]
    other = _run(construct.Inversion(cfg, seed=1, source=_model()), images, labels, seed=1)[2]
    torch.testing.assert_close(first.images, again.images)
    assert not torch.allclose(first.images, other.images)


@pytest.mark.parametrize("pattern", ["deconv", "gaussian"])
def test_leakage_adds_the_pattern_of_the_target_class_only(pattern):
    images, labels = _images(), _labels()
    images = images * 0.5 + 0.25  # away from the box, so clamping cannot change the pattern
    cfg = construction_config(method="leakage", target="random", eps=0.3, pattern=pattern)
    method = construct.Leakage(cfg, seed=4)
    assert not construct.Leakage.needs_source and not construct.Leakage.has_success_rate
    _, targets, built = _run(method, images, labels)
    patterns = construct.leakage_patterns(N_CLASSES, (3, 32, 32), 0.3, seed=4, kind=pattern)
    np.testing.assert_allclose((built.images - images).numpy(), patterns[targets], atol=1e-6)
    np.testing.assert_allclose(built.perturbation_norm.numpy(), 0.3, rtol=1e-4)
    assert not built.target_reached.any()


@pytest.mark.parametrize("mask", ["label", "clean_model"])
def test_leakage_mask_leaves_exactly_the_masked_rows_untouched(mask):
    images, labels = _images(200) * 0.5 + 0.25, _labels(200)
    model = _model()
    cfg = construction_config(method="leakage", target="random", eps=0.5, mask=mask,
                              **({"source": "brief"} if mask == "clean_model" else {}))
    _, targets, built = _run(construct.Leakage(cfg, seed=0, source=model), images, labels)
    if mask == "label":
        masked = targets == labels
    else:
        with torch.no_grad():
            masked = (model(images).argmax(1).numpy() == targets)
    assert 0 < masked.sum() < len(masked)
    changed = (built.images != images).flatten(1).any(1).numpy()
    np.testing.assert_array_equal(changed, ~masked)
    assert (built.perturbation_norm.numpy()[masked] == 0).all()
    np.testing.assert_allclose(built.perturbation_norm.numpy()[~masked], 0.5, rtol=1e-4)


def test_leakage_twin_copies_rows_and_labels_of_its_pgd_set(tmp_path):
    from notbugs import hdf5
    rows = np.array([3, 1, 4, 7], dtype=np.int64)
    twin_labels = np.array([2, 2, 9, 0], dtype=np.int64)
    hdf5.write_artifact(tmp_path / "d_rand.h5", kind="constructed", class_names=[str(c) for c in range(10)],
                        config={}, seed=0, source="test",
                        splits={"train": {"images": np.zeros((4, 3, 32, 32), np.float32), "labels": twin_labels,
                                          "orig_index": rows}})
    cfg = construction_config(method="leakage", twin_of="d_rand", mask="label")
    images, labels = _images(8) * 0.5 + 0.25, _labels(8)
    got_rows, got_targets, built = _run(construct.Leakage(cfg, seed=0, twin=tmp_path / "d_rand.h5"), images, labels)
    np.testing.assert_array_equal(got_rows, rows)
    np.testing.assert_array_equal(got_targets[got_rows], twin_labels)
    patterns = construct.leakage_patterns(N_CLASSES, (3, 32, 32), 0.5, seed=0, kind="deconv")
    for i, (row, t) in enumerate(zip(rows, twin_labels)):  # row 1 (t = 2 != y = 1) ... each its own pattern
        expected = images[row] if t == labels[row] else images[row] + patterns[t]
        torch.testing.assert_close(built.images[i], torch.as_tensor(expected), atol=1e-6, rtol=0)


def test_deconv_patterns_survive_a_two_pixel_shift():
    patterns = construct.leakage_patterns(10, (3, 32, 32), 0.5, seed=0, kind="deconv")
    flat = patterns.reshape(10, -1)
    for axis in (2, 3):
        shifted = np.roll(patterns, 2, axis=axis).reshape(10, -1)
        cosine = (flat * shifted).sum(1) / (np.linalg.norm(flat, axis=1) * np.linalg.norm(shifted, axis=1))
        assert cosine.min() >= 0.9, cosine
    gaussian = construct.leakage_patterns(10, (3, 32, 32), 0.5, seed=0, kind="gaussian").reshape(10, -1)
    shifted = np.roll(gaussian.reshape(10, 3, 32, 32), 2, axis=3).reshape(10, -1)
    assert ((gaussian * shifted).sum(1) / 0.25).max() < 0.5  # a Gaussian pattern does not


def test_leakage_patterns_have_norm_eps_and_differ_per_class_and_seed():
    a = construct.leakage_patterns(5, (3, 8, 8), 0.5, seed=0, kind="gaussian")
    np.testing.assert_allclose(np.linalg.norm(a.reshape(5, -1), axis=1), 0.5, rtol=1e-5)
    assert not np.allclose(a[0], a[1])
    np.testing.assert_array_equal(a, construct.leakage_patterns(5, (3, 8, 8), 0.5, seed=0, kind="gaussian"))
    assert not np.allclose(a, construct.leakage_patterns(5, (3, 8, 8), 0.5, seed=1, kind="gaussian"))


def _relabel_setup(n):
    images, model = _images(n), _model()
    with torch.no_grad():
        predictions = model(images).argmax(1).numpy()
    return images, predictions, construct.Relabel(construction_config(method="relabel", source="s"), seed=0,
                                                  source=model)


def test_relabel_keeps_only_wrong_predictions_unchanged():
    images, predictions, method = _relabel_setup(40)
    labels = _labels(40)
    rows, targets, built = _run(method, images, labels)
    np.testing.assert_array_equal(rows, np.flatnonzero(predictions != labels))
    np.testing.assert_array_equal(targets, predictions)
    torch.testing.assert_close(built.images, images[rows])
    assert (built.perturbation_norm == 0).all() and built.target_reached.all()


def test_relabel_refuses_a_source_that_is_always_right():
    images, labels, method = _relabel_setup(10)  # labels = the source's own predictions
    with pytest.raises(ValueError, match="keeps nothing"):
        method.plan(images.numpy(), labels, N_CLASSES, np.random.default_rng(0), 64, "cpu")


# --------------------------------------------------------------------------- pixel-blend control of D_R

def _inversion_file(tmp_path, images, labels, model):
    """Run an inversion on arrays and store it the way construct() does (rows, starts, distances)."""
    from notbugs import hdf5
    method = construct.Inversion(construction_config(method="inversion", source="s", steps=20, step_size=0.2),
                                 seed=0, source=model)
    rows, targets, built = _run(method, images, labels)
    hdf5.write_artifact(tmp_path / "d_r.h5", kind="constructed", class_names=[str(c) for c in range(N_CLASSES)],
                        config={}, seed=0, source="test",
                        splits={"train": {"images": built.images.numpy(), "labels": targets[rows], "orig_index": rows,
                                          "loss": built.loss.numpy(),
                                          "perturbation_norm": built.perturbation_norm.numpy(),
                                          "start_index": built.extra["start_index"].numpy()}})
    return built, method.starts


def test_blend_moves_each_start_image_as_far_as_its_inversion(tmp_path):
    images, labels = _images(16), _labels(16)
    inverted, starts = _inversion_file(tmp_path, images, labels, _model())
    np.testing.assert_array_equal(inverted.extra["start_index"].numpy(), starts)
    blend = construct.PixelBlend(construction_config(method="blend", twin_of="d_r"), seed=0, twin=tmp_path / "d_r.h5")
    rows, targets, built = _run(blend, images, labels)
    np.testing.assert_array_equal(targets[rows], labels[rows])  # labelled y, like D_R
    start = images[starts]
    displacement = (built.images - start).flatten(1).norm(dim=1)
    lam = built.loss
    assert (lam < 1).all()  # every inversion here moved less than ‖x − x′‖, so no row is capped
    torch.testing.assert_close(displacement, inverted.perturbation_norm, rtol=0.01, atol=0)
    # on the segment from x′ to x: x′ + λ(x − x′)
    torch.testing.assert_close(built.images, start + lam.view(-1, 1, 1, 1) * (images - start), atol=1e-6, rtol=0)


def test_blend_refuses_an_inversion_from_noise(tmp_path):
    from notbugs import hdf5
    hdf5.write_artifact(tmp_path / "d_r.h5", kind="constructed", class_names=[str(c) for c in range(N_CLASSES)],
                        config={}, seed=0, source="test",
                        splits={"train": {"images": np.zeros((2, 3, 32, 32), np.float32), "labels": np.zeros(2, np.int64),
                                          "orig_index": np.arange(2), "perturbation_norm": np.ones(2, np.float32),
                                          "start_index": np.full(2, -1)}})
    blend = construct.PixelBlend(construction_config(method="blend", twin_of="d_r"), seed=0, twin=tmp_path / "d_r.h5")
    with pytest.raises(ValueError, match="start: image"):
        _run(blend, _images(2), _labels(2))


def _constructed_file(path, images, labels, rows):
    from notbugs import hdf5
    hdf5.write_artifact(path, kind="constructed", class_names=[str(c) for c in range(N_CLASSES)], config={}, seed=0,
                        source="test", splits={"train": {"images": images, "labels": labels, "orig_index": rows}})
    return path


def _smooth_images(n, seed=0):
    """Natural-looking images: random low-resolution colours, upsampled."""
    small = torch.rand((n, 3, 4, 4), generator=torch.Generator().manual_seed(seed)) * 0.6 + 0.2
    return torch.nn.functional.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)


def test_jpeg_codes_its_twins_images_in_its_rows_and_labels(tmp_path):
    images, labels = _smooth_images(8), _labels(8)
    rows = np.array([6, 1, 4, 3], dtype=np.int64)
    twin_labels = np.array([7, 2, 9, 0], dtype=np.int64)
    perturbed = (images[rows] + 0.02 * torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    twin = _constructed_file(tmp_path / "d_det.h5", perturbed.numpy(), twin_labels, rows)
    method = construct.JpegCoded(construction_config(method="jpeg", twin_of="d_det"), seed=0, twin=twin)
    got_rows, got_targets, built = _run(method, images, labels)
    np.testing.assert_array_equal(got_rows, rows)
    np.testing.assert_array_equal(got_targets[got_rows], twin_labels)
    coded = built.images
    torch.testing.assert_close(coded * 255, (coded * 255).round(), atol=1e-4, rtol=0)  # decoded 8-bit pixels
    # each row is its own twin image coded (the rows are not in train order)
    torch.testing.assert_close(coded, torch.from_numpy(construct.jpeg_code(perturbed.numpy(), 75, "4:2:0")))
    moved = (coded - perturbed).flatten(1).norm(dim=1)
    assert (moved > 0.1).all()
    # a later chunk, its rows in another order: each row still gets its own twin image
    pick = np.array([2, 0])
    later = method.build(construct.Chunk(x=images[rows[pick]], labels=torch.from_numpy(labels[rows[pick]]),
                                         targets=torch.from_numpy(twin_labels[pick]), rows=rows[pick],
                                         generator=chunk_generator(0, 2), read_images=lambda index: images[index]))
    torch.testing.assert_close(later.images, coded[pick])
    torch.testing.assert_close(built.loss, moved)
    torch.testing.assert_close(built.perturbation_norm, (coded - images[rows]).flatten(1).norm(dim=1))


def test_jpeg_coding_removes_fine_patterns_and_keeps_coarse_ones():
    gray = np.full((1, 3, 32, 32), 0.5, dtype=np.float32)
    yy, xx = np.mgrid[0:32, 0:32]
    fine = np.where((yy + xx) % 2 == 0, 1.0, -1.0)[None, None].repeat(3, 1)  # a one-pixel checkerboard
    coarse = np.cos(2 * np.pi * xx / 32)[None, None].repeat(3, 1)              # one cycle across the image

    def kept(pattern, quality):
        delta = (pattern / np.linalg.norm(pattern) * 0.5).astype(np.float32)  # norm 0.5, the PGD sets' eps
        coded = construct.jpeg_code(gray + delta, quality, "4:2:0") - construct.jpeg_code(gray, quality, "4:2:0")
        return float((coded * delta).sum() / (delta * delta).sum())  # share of the pattern left

    assert kept(fine, 75) < 0.2 < 0.8 < kept(coarse, 75)
    assert kept(fine, 75) < kept(fine, 95)
    with pytest.raises(ValueError, match="RGB"):
        construct.jpeg_code(np.zeros((2, 1, 8, 8), np.float32), 75, "4:2:0")


def test_inversion_switches_its_source_to_a_straight_through_relu():
    from notbugs.models import FinalReLU
    model = _model()
    on = construct.Inversion(construction_config(method="inversion", source="s"), seed=0).prepare_source(model)
    assert [m.straight_through for m in on.modules() if isinstance(m, FinalReLU)] == [True]
    off = construct.Inversion(construction_config(method="inversion", source="s", straight_through_relu=False),
                              seed=0).prepare_source(_model())
    assert not any(m.straight_through for m in off.modules() if isinstance(m, FinalReLU))


def _keep_reached_setup(tmp_path):
    from helpers import make_data_artifact, train_tiny_model
    data_path = make_data_artifact(tmp_path / "data.h5", n_train=200, n_test=50)
    return data_path, train_tiny_model(data_path, tmp_path / "source", epochs=2)


def _build(tmp_path, data_path, source, name, keep=None, twin=None, check=None, precision="float32", steps=5,
           drop=None, attacked=None, suffix=""):
    from notbugs.config import complete
    extra = {"drop_read_as_target_by": "judge"} if drop else {}
    cfg = (complete(f"constructions.{name}", dict(method="leakage", twin_of="d_rand", mask="label")) if twin else
           complete(f"constructions.{name}", dict(method="pgd", source="standard", target="random", eps=0.5,
                                                   steps=steps, step_size=0.1, keep=keep, precision=precision,
                                                   **extra)))
    suffix = ("-drop" if drop else "") + suffix
    return construct.construct(name, cfg, data_path=data_path, source_checkpoint=None if twin else source,
                               output=tmp_path / f"{name}-{keep or 'twin'}-{precision}{suffix}.h5", seed=0,
                               device=torch.device("cpu"), chunk_size=64, fast=complete("fast_paths"), twin=twin,
                               check_checkpoint=check, drop_checkpoint=drop, attacked=attacked)


def test_keep_reached_keeps_the_rows_whose_attack_reached_t_and_its_twin_copies_them(tmp_path):
    from notbugs import hdf5
    from notbugs.batches import predict
    from notbugs.config import complete
    from notbugs.models import accelerate, load_model
    data_path, source = _keep_reached_setup(tmp_path)
    every = _build(tmp_path, data_path, source, "d_rand", "all")
    kept = _build(tmp_path, data_path, source, "d_rand", "reached", check=source)
    with hdf5.open_artifact(every) as a, hdf5.open_artifact(kept) as b:
        all_rows, kept_rows = a.split("train"), b.split("train")
        reached = all_rows["target_reached"][:]
        assert 0 < reached.sum() < len(reached), "the test needs an attack that fails on some rows"
        for column in ("images", "labels", "orig_index", "orig_label", "perturbation_norm"):
            np.testing.assert_array_equal(kept_rows[column][:], all_rows[column][:][reached])
        assert kept_rows["target_reached"][:].all()
        # the attack's success is over every attacked row; the other statistics describe the file's rows
        assert b.attrs["success_rate"] == a.attrs["success_rate"] == reached.mean()
        assert (b.attrs["rows_kept"], b.attrs["rows_attacked"]) == (reached.sum(), len(reached))
        norms = kept_rows["perturbation_norm"][:]
        assert b.attrs["mean_perturbation_norm"] == pytest.approx(norms.mean())
        assert b.attrs["max_perturbation_norm"] == pytest.approx(norms.max())
        assert b.attrs["unperturbed_rate"] == pytest.approx((norms == 0).mean())
        t, y = kept_rows.labels, kept_rows["orig_label"][:]
        assert 0 < b.attrs["label_equals_orig_rate"] == pytest.approx((t == y).mean())
        model = accelerate(load_model(source, device=torch.device("cpu"))[0], complete("fast_paths"))
        says = predict(model, kept_rows.images, 64, torch.device("cpu"))
        assert b.attrs["robust_says_target_rate"] == pytest.approx((says == t).mean())
        assert b.attrs["robust_says_label_rate"] == pytest.approx((says == y).mean())
    assert sorted(p.name for p in tmp_path.glob("d_rand-reached-float32.h5*")) == ["d_rand-reached-float32.h5"]

    twin = _build(tmp_path, data_path, source, "d_leak_rand", twin=kept)
    with hdf5.open_artifact(twin) as t, hdf5.open_artifact(kept) as b:
        np.testing.assert_array_equal(t.split("train")["orig_index"][:], b.split("train")["orig_index"][:])
        np.testing.assert_array_equal(t.split("train").labels, b.split("train").labels)


@pytest.mark.parametrize("keep", ["reached", "all"])
def test_drop_read_as_target_by_leaves_out_the_rows_its_model_reads_as_t(tmp_path, keep):
    """The rows that another (robust) model classifies as t after the attack are dropped from the
    rows ``keep`` keeps (rows with t = y stay: reading their true class is not leakage); the
    file's robust-leakage check with the same model then finds none, and a twin copies what is
    left."""
    from helpers import train_tiny_model
    from notbugs import hdf5
    from notbugs.batches import predict
    from notbugs.config import complete
    from notbugs.models import accelerate, load_model
    data_path, source = _keep_reached_setup(tmp_path)
    judge = train_tiny_model(data_path, tmp_path / "judge", epochs=2, seed=5)
    every = _build(tmp_path, data_path, source, "d_rand", "all")
    dropped = _build(tmp_path, data_path, source, "d_rand", keep, check=judge, drop=judge)
    with hdf5.open_artifact(every) as a, hdf5.open_artifact(dropped) as b:
        all_rows = a.split("train")
        model = accelerate(load_model(judge, device=torch.device("cpu"))[0], complete("fast_paths"))
        t, y = all_rows.labels, all_rows["orig_label"][:]
        says_t = predict(model, all_rows.images, 64, torch.device("cpu")) == t
        read_as_t = says_t & (t != y)
        reached = all_rows["target_reached"][:] if keep == "reached" else np.ones(len(t), dtype=bool)
        assert (reached & read_as_t).any() and (reached & ~read_as_t).any(), "the test needs both kinds of row"
        assert (reached & (t == y)).any(), "the test needs rows with t = y"
        expected = reached & ~read_as_t
        np.testing.assert_array_equal(b.split("train")["orig_index"][:], all_rows["orig_index"][:][expected])
        np.testing.assert_array_equal(b.split("train").images[:], all_rows.images[:][expected])
        assert b.attrs["rows_dropped_read_as_target"] == (reached & read_as_t).sum()
        assert b.attrs["rows_kept"] == expected.sum()
        assert b.attrs["success_rate"] == all_rows["target_reached"][:].mean()
        # the same model reads t only on kept rows whose t is their true class
        assert not (says_t[expected] & (t != y)[expected]).any()
        assert b.attrs["robust_says_target_rate"] == pytest.approx(says_t[expected].mean())
    twin = _build(tmp_path, data_path, source, "d_leak_rand", twin=dropped)
    with hdf5.open_artifact(twin) as t, hdf5.open_artifact(dropped) as b:
        np.testing.assert_array_equal(t.split("train")["orig_index"][:], b.split("train")["orig_index"][:])
    with pytest.raises(ValueError, match="drop_read_as_target_by"):
        construct.construct("d_rand", complete("constructions.d_rand", dict(
            method="pgd", source="standard", drop_read_as_target_by="judge")), data_path=data_path,
            source_checkpoint=source, output=tmp_path / "no-judge.h5", seed=0, device=torch.device("cpu"),
            chunk_size=64, fast=complete("fast_paths"))


@pytest.mark.parametrize("keep", ["reached", "all"])
def test_a_set_that_drops_rows_judges_the_rows_of_the_same_attack_instead_of_attacking_again(
        tmp_path, keep, monkeypatch):
    """Given the finished set of the same attack (D_det for D_det without robust-t rows), the
    dropping set reads that set's rows instead of attacking: the same file, column for column and
    statistic for statistic, as when it attacks itself. A set made by another attack is not used."""
    import shutil

    import h5py
    from helpers import train_tiny_model
    from notbugs import hdf5
    data_path, source = _keep_reached_setup(tmp_path)
    judge = train_tiny_model(data_path, tmp_path / "judge", epochs=2, seed=5)
    attacked_itself = _build(tmp_path, data_path, source, "d_rand", keep, check=judge, drop=judge)
    same_attack = _build(tmp_path, data_path, source, "d_rand", keep, check=judge)
    other_attack = _build(tmp_path, data_path, source, "d_rand", keep, steps=2, suffix="-2steps")

    attacks_run = []
    real_build = construct.TargetedPGD.build
    monkeypatch.setattr(construct.TargetedPGD, "build", lambda self, chunk: attacks_run.append(len(chunk.rows))
                        or real_build(self, chunk))
    judged = _build(tmp_path, data_path, source, "d_rand", keep, check=judge, drop=judge, attacked=same_attack,
                    suffix="-judged")
    assert attacks_run == [], "the attack ran again although its rows were given"
    assert [p.name for p in tmp_path.glob("*-judged.h5*")] == [judged.name]
    statistics = ("success_rate", "rows_attacked", "rows_kept", "rows_dropped_read_as_target", "mean_perturbation_norm",
                  "max_perturbation_norm", "unperturbed_rate", "label_equals_orig_rate", "robust_says_target_rate",
                  "robust_says_label_rate", "attack_fingerprint")
    with hdf5.open_artifact(attacked_itself) as a, hdf5.open_artifact(judged) as b:
        assert 0 < b.attrs["rows_dropped_read_as_target"] and 0 < b.attrs["rows_kept"]
        assert b.attrs["rows_judged_from"] == str(same_attack) and a.attrs["rows_judged_from"] == ""
        assert {k: a.attrs[k] for k in statistics} == {k: b.attrs[k] for k in statistics}
        assert a.split("train").columns == b.split("train").columns
        for column in a.split("train").columns:
            np.testing.assert_array_equal(a.split("train")[column][:], b.split("train")[column][:])

    unrecorded = tmp_path / "unrecorded.h5"  # made by code that did not record its attack
    shutil.copy(same_attack, unrecorded)
    with h5py.File(unrecorded, "a") as f:
        del f.attrs["attack_fingerprint"]
    n_train = len(hdf5.load_split(data_path, "train")[1])
    for i, unusable in enumerate((other_attack, unrecorded)):
        rebuilt = _build(tmp_path, data_path, source, "d_rand", keep, check=judge, drop=judge, attacked=unusable,
                         suffix=f"-rebuilt{i}")
        assert sum(attacks_run) == (i + 1) * n_train, f"the rows of {unusable.name} were used"
        with hdf5.open_artifact(attacked_itself) as a, hdf5.open_artifact(rebuilt) as b:
            np.testing.assert_array_equal(a.split("train").images[:], b.split("train").images[:])
            assert b.attrs["rows_judged_from"] == ""
    with pytest.raises(ValueError, match="drop_read_as_target_by"):
        _build(tmp_path, data_path, source, "d_rand", keep, attacked=same_attack, suffix="-no-judge")


def test_keep_reached_resumes_a_copy_that_was_interrupted(tmp_path, monkeypatch):
    import h5py
    data_path, source = _keep_reached_setup(tmp_path)
    straight = _build(tmp_path, data_path, source, "d_rand", "reached")
    straight = straight.rename(tmp_path / "straight.h5")

    copy_rows = construct._copy_rows

    def copy_one_block_then_die(source_writer, destination, rows, block, name):
        copy_rows(source_writer, destination, rows[:len(rows) // 2], block, name)
        raise KeyboardInterrupt

    monkeypatch.setattr(construct, "_copy_rows", copy_one_block_then_die)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, data_path, source, "d_rand", "reached")
    output = tmp_path / "d_rand-reached-float32.h5"
    assert not output.exists()
    with h5py.File(tmp_path / "d_rand-reached-float32.h5.partial") as f, h5py.File(straight) as a:
        assert f.attrs["rows_done"] == a.attrs["rows_kept"] // 2 > 0
    started_at = []

    def record_where_it_starts(source_writer, destination, rows, block, name):
        started_at.append(destination.rows_done)
        copy_rows(source_writer, destination, rows, block, name)

    monkeypatch.setattr(construct, "_copy_rows", record_where_it_starts)
    _build(tmp_path, data_path, source, "d_rand", "reached")
    with h5py.File(straight) as a:
        assert started_at == [a.attrs["rows_kept"] // 2], "the copy continues where it stopped"
    with h5py.File(straight) as a, h5py.File(output) as b:
        for column in a["train"]:
            np.testing.assert_array_equal(a["train"][column][:], b["train"][column][:])
    assert sorted(p.name for p in tmp_path.glob("d_rand-reached-float32.h5*")) == ["d_rand-reached-float32.h5"]


def test_a_bfloat16_construction_attacks_in_bfloat16_and_stays_inside_the_ball(tmp_path):
    """``precision: bfloat16`` autocasts the source's forward passes only: the images stay float32
    inside the ε-ball and the [0,1] box, the attack reaches t about as often as in float32 (within
    10 points, the bound of tests/test_fast_paths.py), and the file says which precision built it."""
    from notbugs import hdf5
    data_path, source = _keep_reached_setup(tmp_path)
    built = {p: _build(tmp_path, data_path, source, "d_rand", "all", precision=p, steps=10) for p in ("float32", "bfloat16")}
    with hdf5.open_artifact(built["float32"]) as f32, hdf5.open_artifact(built["bfloat16"]) as bf16:
        assert (f32.attrs["precision"], bf16.attrs["precision"]) == ("float32", "bfloat16")
        images = bf16.split("train").images[:]
        assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 1
        assert bf16.split("train")["perturbation_norm"][:].max() <= 0.5 + 1e-5
        assert not np.array_equal(images, f32.split("train").images[:]), "bf16 autocast was not applied"
        assert abs(bf16.attrs["success_rate"] - f32.attrs["success_rate"]) <= 0.1


@pytest.mark.parametrize("flags, expected", [(set(), "float32"), ({"avx512_bf16"}, "bfloat16")])
def test_an_auto_precision_construction_records_the_precision_it_attacked_in(tmp_path, monkeypatch, flags, expected):
    from notbugs import hdf5, runtime
    monkeypatch.setattr(runtime, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": flags)
    data_path, source = _keep_reached_setup(tmp_path)
    with hdf5.open_artifact(_build(tmp_path, data_path, source, "d_rand", "all", precision="auto", steps=2)) as f:
        assert f.attrs["precision"] == expected


def test_a_jpeg_set_is_built_from_its_twin_file_with_the_twins_rows(tmp_path):
    from notbugs import hdf5
    from notbugs.config import complete
    data_path, source = _keep_reached_setup(tmp_path)
    pgd = _build(tmp_path, data_path, source, "d_rand", "reached", steps=5)
    cfg = complete("constructions.d_rand_jpeg", {"method": "jpeg", "twin_of": "d_rand", "quality": 50})
    coded = construct.construct("d_rand_jpeg", cfg, data_path=data_path, source_checkpoint=None,
                                output=tmp_path / "d_rand_jpeg.h5", seed=0, device=torch.device("cpu"), chunk_size=64,
                                fast=complete("fast_paths"), twin=pgd)
    with hdf5.open_artifact(pgd) as twin, hdf5.open_artifact(coded) as f:
        for column in ("orig_index", "labels", "orig_label"):
            np.testing.assert_array_equal(f.split("train")[column][:], twin.split("train")[column][:])
        np.testing.assert_array_equal(f.split("train").images[:],
                                      construct.jpeg_code(twin.split("train").images[:], 50, "4:2:0"))
        assert f.attrs["method"] == "jpeg" and f.attrs["twin"] == str(pgd) and np.isnan(f.attrs["success_rate"])
