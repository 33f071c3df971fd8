"""The straight-through representation ReLU (the authors' fake_relu): the same forward pass, a
backward pass that ignores the ReLU, on every architecture, and kept through BatchNorm folding."""

from __future__ import annotations

import pytest
import torch

from notbugs.models import ARCHITECTURES, FinalReLU, build_model, fold_batchnorm, straight_through_last_relu

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch):
    torch.manual_seed(0)
    return build_model(arch, 10, [0.5] * 3, [0.25] * 3).eval()


def _feature_grad(model, x):
    x = x.clone().requires_grad_(True)
    features = model.features(x)
    features.sum().backward()
    return features.detach(), x.grad


@pytest.mark.parametrize("arch", ["small_cnn", "cifar_net", "tiny_resnet", "mlp", "resnet18"])
def test_straight_through_keeps_the_forward_pass_and_changes_the_gradient(arch):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = _model(arch)
    plain_features, plain_grad = _feature_grad(model, x)
    assert straight_through_last_relu(model)
    assert sum(m.straight_through for m in model.modules() if isinstance(m, FinalReLU)) == 1
    st_features, st_grad = _feature_grad(model, x)
    torch.testing.assert_close(st_features, plain_features, rtol=0, atol=0)
    assert not torch.allclose(st_grad, plain_grad)


def test_every_architecture_but_the_linear_one_has_a_representation_relu():
    for arch in ARCHITECTURES:
        if arch in ("resnet50", "vgg16", "densenet121"):  # large; their builders are checked in test_models
            continue
        has = any(isinstance(m, FinalReLU) for m in _model(arch).modules())
        assert has == (arch != "linear"), arch


def test_straight_through_survives_batchnorm_folding():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = _model("small_cnn")
    straight_through_last_relu(model)
    _, expected = _feature_grad(model, x)
    _, folded = _feature_grad(fold_batchnorm(model), x)
    torch.testing.assert_close(folded, expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_blocks_compute_what_torchvision_blocks_compute(depth):
    """The blocks with a FinalReLU re-state torchvision's forward pass: same weights, same outputs."""
    import torch.nn as nn
    import torchvision.models as tvm
    from torchvision.models.resnet import BasicBlock, Bottleneck

    ours = _model(f"resnet{depth}")
    stock = tvm.ResNet(BasicBlock if depth == 18 else Bottleneck, [2, 2, 2, 2] if depth == 18 else [3, 4, 6, 3])
    stock.conv1, stock.maxpool, stock.fc = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
    stock.load_state_dict(ours.body.state_dict())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours.body(x), stock.eval()(x))
