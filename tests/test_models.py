"""Tests of notbugs.models: the architecture registry, internal normalisation, checkpoint
save/load and its errors, and device resolution."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from notbugs import models
from notbugs.runtime import resolve_device
from notbugs.models import (ARCHITECTURES, CheckpointError, build_model, load_model, read_checkpoint,
                            save_checkpoint)

MEAN = (0.1, 0.2, 0.3)
STD = (0.5, 0.25, 0.125)
FEATURE_DIMS = {"small_cnn": 64, "small_cnn_wide": 128, "cifar_net": 128, "cifar_net_wide": 256, "resnet18": 512, "resnet50": 2048,
                "vgg16": 512, "densenet121": 1024}


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n=2, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _model_with_running_stats(arch="small_cnn", num_classes=10, seed=0, mean=MEAN, std=STD):
    """A model whose BatchNorm running statistics are not the defaults, so a checkpoint that
    dropped buffers would be noticed."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes, mean, std)
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(_batch(8, seed=100 + i))
    return model.eval()


def _save(path, model, arch="small_cnn", num_classes=10, mean=MEAN, std=STD, **extra):
    save_checkpoint(path, model, arch=arch, num_classes=num_classes, mean=mean, std=std,
                    config={"train": {"epochs": 3, "lr": 0.05}, "source": "unit test"}, **extra)


# --------------------------------------------------------------------------- registry

def test_registry_lists_the_documented_architectures():
    assert set(FEATURE_DIMS) <= set(ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_builds_and_maps_images_to_logits(arch):
    num_classes = 7
    model = build_model(arch, num_classes, MEAN, STD).eval()
    assert isinstance(model, models.Classifier)
    x = _batch()
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
    assert logits.shape == (2, num_classes)
    dim = FEATURE_DIMS.get(arch, model.head.in_features)
    assert feats.shape == (2, dim)
    assert model.head.in_features == dim and model.head.out_features == num_classes
    assert torch.isfinite(logits).all() and torch.isfinite(feats).all()
    # logits are the linear head on the features
    torch.testing.assert_close(logits, model.head(feats), rtol=1e-5, atol=1e-5)
    # different images, different representations (the body is not degenerate)
    assert not torch.allclose(feats[0], feats[1])


def test_unknown_architecture_is_rejected_with_the_choices():
    with pytest.raises(ValueError) as err:
        build_model("resnet9000", 10, MEAN, STD)
    assert "resnet9000" in str(err.value) and "small_cnn" in str(err.value)


# --------------------------------------------------------------------------- normalisation

def test_normalisation_is_inside_the_model():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, MEAN, STD).eval()
    x = _batch(4)
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        manual_feats = model.body((x - m) / s)
        manual = model.head(manual_feats)
        torch.testing.assert_close(model.features(x), manual_feats, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(x), manual, rtol=1e-6, atol=1e-6)
        # and it is not a no-op: the body on the raw image gives something else
        assert not torch.allclose(model.head(model.body(x)), manual, atol=1e-3)


def test_mean_and_std_are_part_of_the_state():
    model = build_model("small_cnn", 10, MEAN, STD)
    state = model.state_dict()
    torch.testing.assert_close(state["normalize.mean"].flatten(), torch.tensor(MEAN))
    torch.testing.assert_close(state["normalize.std"].flatten(), torch.tensor(STD))
    assert "normalize.mean" not in dict(model.named_parameters())  # buffers: never trained


def test_same_weights_other_statistics_give_other_outputs():
    torch.manual_seed(0)
    a = build_model("small_cnn", 10, MEAN, STD).eval()
    b = build_model("small_cnn", 10, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)).eval()
    body_and_head = {k: v for k, v in a.state_dict().items() if not k.startswith("normalize.")}
    b.load_state_dict(body_and_head, strict=False)
    x = _batch()
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x), atol=1e-3)


# --------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("channels_last", [False, True])  # train() saves a channels_last model
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, channels_last):
    model = _model_with_running_stats()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    path = tmp_path / "sub" / "model.pt"
    _save(path, model, epochs=3, seed=42)
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no .partial left behind

    loaded, meta = load_model(path, expected_arch="small_cnn")
    assert not loaded.training
    if channels_last:  # same memory format, so the same conv kernels and bit-identical outputs
        loaded = loaded.to(memory_format=torch.channels_last)
    x = _batch(4, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded.features(x), model.features(x))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert meta["arch"] == "small_cnn" and meta["num_classes"] == 10
    assert meta["mean"] == list(MEAN) and meta["std"] == list(STD)
    assert meta["config"] == {"train": {"epochs": 3, "lr": 0.05}, "source": "unit test"}
    assert meta["epochs"] == 3 and meta["seed"] == 42
    assert meta["format"] == models.CHECKPOINT_FORMAT
    assert "state_dict" not in meta
    # read_checkpoint gives the raw payload, weights included
    assert "state_dict" in read_checkpoint(path)


def test_checkpoint_round_trip_other_architecture_and_classes(tmp_path):
    model = _model_with_running_stats("small_cnn_wide", num_classes=3)
    path = tmp_path / "wide.pt"
    _save(path, model, arch="small_cnn_wide", num_classes=3)
    loaded, meta = load_model(path)
    x = _batch(2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded(x).shape == (2, 3)


def test_save_replaces_an_existing_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    _save(path, _model_with_running_stats(seed=0))
    newer = _model_with_running_stats(seed=1)
    _save(path, newer)
    loaded, _ = load_model(path)
    with torch.no_grad():
        assert torch.equal(loaded(_batch()), newer(_batch()))


def test_expected_arch_mismatch_names_both(tmp_path):
    path = tmp_path / "model.pt"
    _save(path, _model_with_running_stats())
    with pytest.raises(CheckpointError) as err:
        load_model(path, expected_arch="resnet18")
    msg = str(err.value)
    assert "small_cnn" in msg and "resnet18" in msg and str(path) in msg
    assert isinstance(err.value, ValueError)


def test_weights_for_another_architecture_are_rejected(tmp_path):
    """A checkpoint whose metadata says small_cnn but whose weights are small_cnn_wide's."""
    path = tmp_path / "model.pt"
    _save(path, _model_with_running_stats("small_cnn_wide"), arch="small_cnn")
    with pytest.raises(CheckpointError, match="weights do not fit") as err:
        load_model(path)
    assert str(path) in str(err.value)


def _truncated(path, tmp_path):
    _save(path, _model_with_running_stats())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_tiny(path, tmp_path):
    _save(path, _model_with_running_stats())
    path.write_bytes(path.read_bytes()[:10])


def _empty(path, tmp_path):
    path.write_bytes(b"")


def _random_bytes(path, tmp_path):
    path.write_bytes(os.urandom(4096))


def _plain_tensor(path, tmp_path):
    torch.save(torch.zeros(3), path)


def _foreign_dict(path, tmp_path):
    torch.save({"state_dict": build_model("small_cnn", 10, MEAN, STD).state_dict()}, path)


def _other_format(path, tmp_path):
    torch.save({"format": "notbugs-checkpoint-0", "arch": "small_cnn"}, path)


def _pickled_object(path, tmp_path):  # not loadable with weights_only=True
    path.write_bytes(pickle.dumps(ValueError("not a checkpoint")))


def _text(path, tmp_path):
    path.write_text("arch: small_cnn\n")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("make", [_truncated, _truncated_tiny, _empty, _random_bytes, _plain_tensor,
                                  _foreign_dict, _other_format, _pickled_object, _text],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_checkpoint_files_raise_checkpoint_error_naming_the_file(tmp_path, make):
    path = tmp_path / "broken_model.pt"
    make(path, tmp_path)
    for call in (lambda: load_model(path), lambda: load_model(path, expected_arch="small_cnn"),
                 lambda: read_checkpoint(path)):
        with pytest.raises(CheckpointError) as err:
            call()
        assert str(path) in str(err.value)


def test_missing_checkpoint_raises_checkpoint_error(tmp_path):
    path = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(CheckpointError, match="no such checkpoint") as err:
        load_model(path)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------- devices

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_auto_device_is_cpu_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_clear_error(name):
    with pytest.raises(RuntimeError, match="CUDA is not available") as err:
        resolve_device(name)
    assert repr(name) in str(err.value)


def test_device_resolution_when_cuda_is_reported_missing(monkeypatch):
    """Same checks independent of the machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")


def test_device_resolution_when_cuda_is_reported_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_small_cnn_pools_before_its_relu_with_the_same_outputs_gradients_and_checkpoint_keys():
    """Max-pooling commutes with ReLU, so pooling first (a quarter of the ReLU work) must give the
    very same logits and input gradients as the usual order, and load the same checkpoints."""
    import copy

    from notbugs.models import build_model
    torch.manual_seed(0)
    pooled_first = build_model("small_cnn", 10, [0.5] * 3, [0.25] * 3)
    relu_first = copy.deepcopy(pooled_first)
    layers = list(relu_first.body)
    swapped = [i for i, layer in enumerate(layers) if isinstance(layer, torch.nn.MaxPool2d)]
    assert len(swapped) == 2 and all(isinstance(layers[i + 1], torch.nn.ReLU) for i in swapped)
    for i in swapped:
        layers[i], layers[i + 1] = layers[i + 1], layers[i]
    relu_first.body = torch.nn.Sequential(*layers)
    assert relu_first.state_dict().keys() == pooled_first.state_dict().keys()
    relu_first.load_state_dict(pooled_first.state_dict())
    x = torch.randn(16, 3, 32, 32) * 0.5 + 0.5
    for mode in ("train", "eval"):
        grads = []
        for model in (pooled_first, relu_first):
            getattr(model, mode)()
            xi = x.clone().requires_grad_()
            logits = model(xi)
            logits.square().sum().backward()
            grads.append((logits.detach(), xi.grad))
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1]), mode
