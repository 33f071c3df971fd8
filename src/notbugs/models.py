"""Model registry. Every model takes [0,1] images, normalises internally and exposes
``features(x)``, its penultimate representation, so attacks and inversions work in pixel space.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from notbugs.runtime import atomic_write

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


class MeanLogits(nn.Module):
    """Several classifiers read as one: the mean of their logits (an attack on it has to turn
    all of them)."""

    def __init__(self, models):
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def attacked_model(source: nn.Module, ensemble: Sequence[nn.Module] = ()) -> nn.Module:
    """What a pgd construction attacks: its source, or the mean logits of source and ensemble."""
    return MeanLogits([source, *ensemble]) if ensemble else source


class FinalReLU(nn.Module):
    """The ReLU that produces a model's representation. With ``straight_through`` its backward
    pass is the identity (the forward value is unchanged): the authors' inversions match the
    representation this way (their ``fake_relu``, docs/paper-notes.md §2; what it does to these
    models' inversions is measured in docs/tuning.md). Every architecture with a ReLU before
    its representation ends with one; :func:`straight_through_last_relu` switches it on."""

    straight_through = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.straight_through:
            return x + (torch.relu(x) - x).detach()  # exact: x + (0 - x) = 0 and x + (x - x) = x
        return torch.relu(x)


def straight_through_last_relu(model: nn.Module) -> bool:
    """Switch the model's representation ReLU to a straight-through backward pass. Call it before
    :func:`accelerate`, which traces the model. Returns False for a model without one (linear)."""
    finals = [m for m in model.modules() if isinstance(m, FinalReLU)]
    if finals:
        finals[-1].straight_through = True
    return bool(finals)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, *, pool: bool = False, final: bool = False
                  ) -> list[nn.Module]:
    """conv -> BN -> ReLU, with ``pool`` a 2x2 max-pool before the ReLU: the same function as
    pooling after it (a max commutes with a non-decreasing function, and the input gradients
    match bit for bit), with the ReLU's forward and backward on a quarter of the values. The two
    parameter-free layers only swap places, so checkpoints saved with the other order load."""
    layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return [*layers, FinalReLU() if final else nn.ReLU(inplace=True)]


def small_cnn(width: int = 16) -> tuple[nn.Module, int]:
    """A fast CPU default: a stride-2 stem then three conv blocks, about 0.1M parameters."""
    w = width
    body = nn.Sequential(
        *_conv_bn_relu(3, w, stride=2),
        *_conv_bn_relu(w, 2 * w, pool=True),
        *_conv_bn_relu(2 * w, 4 * w, pool=True),
        *_conv_bn_relu(4 * w, 4 * w, final=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return body, 4 * w


class _ConvGroup(nn.Sequential):
    """conv -> max-pool -> BN -> ReLU -> conv -> BN -> ReLU: pooling before normalising halves
    the cost of the normalisation, as in the airbench CIFAR-10 speed-run networks."""

    def __init__(self, cin: int, cout: int, *, final: bool = False):
        super().__init__(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), *_conv_bn_relu(cout, cout, final=final))


def cifar_net(widths: Sequence[int] = (32, 64, 128), stem: int = 24) -> tuple[nn.Module, int]:
    """An airbench-style CIFAR net: a full-resolution stem (no stride, so pixel-scale detail
    reaches the features) and three conv groups, then a global max-pool. About twice the
    FLOPs of ``small_cnn_wide`` at the default widths and it converges far faster per epoch
    (docs/tuning.md)."""
    layers: list[nn.Module] = _conv_bn_relu(3, stem)
    cin = stem
    for i, width in enumerate(widths):
        layers.append(_ConvGroup(cin, width, final=i == len(widths) - 1))
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten()), cin


PIXELS = 3 * 32 * 32  # the pixel-input models below assume CIFAR-shaped 3x32x32 images


def linear() -> tuple[nn.Module, int]:
    """Logits affine in the pixels (the robust linear classifier of Goh's leakage study)."""
    return nn.Flatten(), PIXELS


def mlp(width: int = 256) -> tuple[nn.Module, int]:
    return nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, width), nn.ReLU(inplace=True),
                         nn.Linear(width, width), FinalReLU()), width


class _ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.out_relu = FinalReLU()
        self.main = nn.Sequential(*_conv_bn_relu(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_relu(self.main(x) + self.shortcut(x))


def tiny_resnet(width: int = 16) -> tuple[nn.Module, int]:
    """A narrow three-stage ResNet (one residual block per stage) for quick CPU studies."""
    w = width
    body = nn.Sequential(*_conv_bn_relu(3, w), _ResidualBlock(w, w, 2), _ResidualBlock(w, 2 * w, 2),
                         _ResidualBlock(2 * w, 4 * w, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return body, 4 * w


# torchvision is imported inside the builders: it adds seconds to every job's start-up.

def _resnet_blocks():
    """torchvision's residual blocks, with their output ReLU as a :class:`FinalReLU` (same weights)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    class WithOutReLU:  # mixed in before the torchvision block, so nn.Module is set up first
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.out_relu = FinalReLU()

    class Basic(WithOutReLU, BasicBlock):
        def forward(self, x):
            shortcut = x if self.downsample is None else self.downsample(x)
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.out_relu(out + shortcut)

    class Bottle(WithOutReLU, Bottleneck):
        def forward(self, x):
            shortcut = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
            return self.out_relu(out + shortcut)

    return Basic, Bottle


def _resnet(depth: int, stem: str) -> tuple[nn.Module, int]:
    """torchvision's ResNet-18/50 body. ``stem`` "cifar": 3x3 stride 1 and no max-pool, so a
    32x32 input ends at 4x4 before pooling; "imagenet": torchvision's own 7x7 stride-2 stem and
    max-pool, for 224 px inputs (a 224 px image ends at 7x7)."""
    import torchvision.models as tvm
    basic, bottleneck = _resnet_blocks()
    block, layers = {18: (basic, [2, 2, 2, 2]), 50: (bottleneck, [3, 4, 6, 3])}[depth]
    net = tvm.ResNet(block, layers)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def _vgg16() -> tuple[nn.Module, int]:
    import torchvision.models as tvm
    vgg = tvm.vgg16_bn()
    last_relu = max(i for i, m in enumerate(vgg.features) if isinstance(m, nn.ReLU))
    vgg.features[last_relu] = FinalReLU()
    return nn.Sequential(vgg.features, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 512


def _densenet121() -> tuple[nn.Module, int]:
    import torchvision.models as tvm
    net = tvm.densenet121()
    net.features.conv0 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.features.pool0 = nn.Identity()
    return nn.Sequential(net.features, FinalReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 1024


ARCHITECTURES: dict[str, Callable[[], tuple[nn.Module, int]]] = {
    "small_cnn": small_cnn,
    "small_cnn_wide": lambda: small_cnn(32),
    "tiny_resnet": tiny_resnet,
    "cifar_net": cifar_net,
    "cifar_net_wide": lambda: cifar_net((64, 128, 256), stem=32),
    "mlp": mlp,
    "linear": linear,
    "resnet18": lambda: _resnet(18, "cifar"),
    "resnet50": lambda: _resnet(50, "cifar"),
    "resnet18_imagenet": lambda: _resnet(18, "imagenet"),
    "resnet50_imagenet": lambda: _resnet(50, "imagenet"),
    "vgg16": _vgg16,
    "densenet121": _densenet121,
}


def build_model(arch: str, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> Classifier:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    body, dim = ARCHITECTURES[arch]()
    return Classifier(body, dim, num_classes, mean, std)


class Accelerated(nn.Module):
    """A frozen-weights view of a :class:`Classifier` for attacks and evaluation: optional bf16
    autocast (outputs are returned in float32, so losses, norms and projections stay float32)
    and optional ``torch.compile`` of ``forward`` and ``features``."""

    def __init__(self, model: nn.Module, *, bf16: bool = False, compile: bool = False):
        super().__init__()
        self.model = model
        self.bf16 = bf16
        # Plain attributes, not submodules: the compiled callables wrap the same parameters.
        self.__dict__["_forward"] = torch.compile(model) if compile else model
        self.__dict__["_features"] = torch.compile(model.features) if compile else model.features

    def _run(self, fn, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return fn(x).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self._forward, x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self._features, x)


def fold_batchnorm(model: Classifier) -> Classifier:
    """A copy of an eval-mode model with every BatchNorm folded into the convolution before it
    (torch.fx): one layer fewer per block in the forward and the backward pass of an attack.
    Exact up to float rounding. Returns the model unchanged if its body cannot be traced."""
    import copy
    import logging

    from torch.fx.experimental.optimization import fuse

    folded = copy.deepcopy(model).eval()
    try:
        folded.body = fuse(folded.body)
    except Exception as exc:  # fx cannot trace every architecture; the unfolded model is still correct
        logging.getLogger(__name__).info("BatchNorm folding skipped (%s: %s)", type(exc).__name__, exc)
        return model
    return folded


def accelerate(model: Classifier, fast: Mapping) -> nn.Module:
    """Apply the configured fast paths (the validated config section ``fast_paths``) to a model
    used with frozen weights, i.e. by attacks and evaluation."""
    if fast["fold_batchnorm"]:
        model = fold_batchnorm(model)
    if fast["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if fast["bf16_autocast"] or fast["compile"]:
        return Accelerated(model, bf16=fast["bf16_autocast"], compile=fast["compile"])
    return model


def save_checkpoint(path: str | os.PathLike, model: Classifier, *, arch: str, num_classes: int,
                    mean: Sequence[float], std: Sequence[float], config: dict, **extra) -> None:
    """Atomically save everything needed to rebuild the model from the file alone."""
    payload = dict(format=CHECKPOINT_FORMAT, arch=arch, num_classes=num_classes,
                   mean=list(mean), std=list(std), config=config,
                   state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra)
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)


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
