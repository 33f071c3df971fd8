"""Model registry. Every model takes [0,1] images, normalises internally and exposes
``features(x)``, its penultimate representation, so attacks and inversions work in pixel space.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

CHECKPOINT_FORMAT = "notbugs-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, foreign, corrupt or for another architecture."""


class Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """normalise -> body (to a flat feature vector) -> linear head."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int,
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(width: int = 16) -> tuple[nn.Module, int]:
    """A fast CPU default: a stride-2 stem then three conv blocks, about 0.1M parameters."""
    w = width
    body = nn.Sequential(
        *_conv_bn_relu(3, w, stride=2),
        *_conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),
        *_conv_bn_relu(2 * w, 4 * w), nn.MaxPool2d(2),
        *_conv_bn_relu(4 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return body, 4 * w


# torchvision is imported inside the builders: it adds seconds to every job's start-up.

def _cifar_resnet(depth: int) -> tuple[nn.Module, int]:
    import torchvision.models as tvm
    from torchvision.models.resnet import BasicBlock, Bottleneck
    block, layers = {18: (BasicBlock, [2, 2, 2, 2]), 50: (Bottleneck, [3, 4, 6, 3])}[depth]
    net = tvm.ResNet(block, layers)
    # CIFAR stem: 3x3 stride 1 and no max-pool, so a 32x32 input ends at 4x4 before pooling.
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def _vgg16() -> tuple[nn.Module, int]:
    import torchvision.models as tvm
    vgg = tvm.vgg16_bn()
    return nn.Sequential(vgg.features, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 512


def _densenet121() -> tuple[nn.Module, int]:
    import torchvision.models as tvm
    net = tvm.densenet121()
    net.features.conv0 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.features.pool0 = nn.Identity()
    return nn.Sequential(net.features, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 1024


ARCHITECTURES: dict[str, Callable[[], tuple[nn.Module, int]]] = {
    "small_cnn": small_cnn,
    "small_cnn_wide": lambda: small_cnn(32),
    "resnet18": lambda: _cifar_resnet(18),
    "resnet50": lambda: _cifar_resnet(50),
    "vgg16": _vgg16,
    "densenet121": _densenet121,
}


def build_model(arch: str, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> Classifier:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    body, dim = ARCHITECTURES[arch]()
    return Classifier(body, dim, num_classes, mean, std)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
    return torch.device(name)


def save_checkpoint(path: str | os.PathLike, model: Classifier, *, arch: str, num_classes: int,
                    mean: Sequence[float], std: Sequence[float], config: dict, **extra) -> None:
    """Atomically save everything needed to rebuild the model from the file alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(format=CHECKPOINT_FORMAT, arch=arch, num_classes=num_classes,
                   mean=list(mean), std=list(std), config=config,
                   state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra)
    tmp = path.with_name(path.name + ".partial")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a notbugs checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return payload


def load_model(path: str | os.PathLike, *, expected_arch: str | None = None,
               device: torch.device | str = "cpu") -> tuple[Classifier, dict]:
    """Rebuild a model from its checkpoint; returns (model in eval mode, checkpoint metadata)."""
    payload = read_checkpoint(path)
    arch = payload["arch"]
    if expected_arch is not None and arch != expected_arch:
        raise CheckpointError(f"{path}: checkpoint is for architecture {arch!r}, expected {expected_arch!r}")
    model = build_model(arch, payload["num_classes"], payload["mean"], payload["std"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit architecture {arch!r}: {exc}") from exc
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model.to(device).eval(), meta


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
