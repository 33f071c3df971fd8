"""Stage 3, construct: the paper's training sets, built from a source model's view of the data.

A construction *method* is a small class in :data:`METHODS` (the config schema lists the same
names, each with its own settings; a test pins the two together). A method says whether it needs
a source model, picks the rows and target labels (:meth:`Method.plan`) and builds one chunk
(:meth:`Method.build`). :func:`construct` is the loop every method plugs into: it streams the
data in chunks and appends each finished chunk to a ``.partial`` HDF5 file, so memory does not
grow with the dataset and a killed job resumes at the last finished chunk. Images are float32:
uint8 rounding would erase the non-robust perturbation.

Methods (docs/paper-notes.md §2 and §6):

- ``inversion`` (D_R through a robust source, D_NR through a standard one).
- ``pgd`` (D_rand, D_det, D_other).
- ``leakage`` (control, no model).
- ``nontransferable`` (Nakkiran's rebuttal).
- ``relabel`` (Wallace's rebuttal).
- ``jpeg`` (another set's images coded as JPEG and decoded: how much of what a set teaches
  survives the coding that made the CIFAR-10 copy this project is measured on).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from notbugs import attacks, hdf5
from notbugs.batches import predict, read_rows, to_float
from notbugs.models import attacked_model, accelerate, file_sha256, load_model, straight_through_last_relu
from notbugs.runtime import partial_path, resolve_precision
from notbugs.sampling import choose_targets, chunk_generator, derangement

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    """One chunk of the rows a method works on, as its :meth:`Method.build` receives it."""
    x: torch.Tensor            # original images, float in [0, 1], on the device
    labels: torch.Tensor       # original labels y
    targets: torch.Tensor      # the labels the constructed rows will carry
    rows: np.ndarray           # their indices in the data's train split
    generator: torch.Generator  # seeded for this chunk (same numbers after a resume)
    read_images: Callable[[np.ndarray], torch.Tensor]  # other train rows, float, on the device


@dataclass
class Built:
    """What a method makes of one chunk: the new images and per-example diagnostics."""
    images: torch.Tensor
    loss: torch.Tensor               # final attack loss or relative representation distance
    perturbation_norm: torch.Tensor  # L2 norm of the change
    target_reached: torch.Tensor     # the attack's success (bool)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # the method's extra_columns


class Method:
    """A construction method. Subclasses set ``name`` and override what differs."""

    name: ClassVar[str]
    needs_source: ClassVar[bool] = True
    has_success_rate: ClassVar[bool] = True  # False: target_reached carries no meaning
    targeted_attack: ClassVar[bool] = False  # moves images towards t: checked for robust leakage
    extra_columns: ClassVar[dict[str, hdf5.ColumnSpec]] = {}  # per-row columns beyond the common ones

    def __init__(self, cfg: Mapping, *, seed: int, source: torch.nn.Module | None = None,
                 ensemble: Sequence[torch.nn.Module] = (), twin: str | Path | None = None):
        self.cfg, self.seed, self.source, self.ensemble, self.twin = cfg, seed, source, list(ensemble), twin

    def plan(self, images, labels: np.ndarray, n_classes: int, rng: np.random.Generator,
             batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """(rows of the train split to construct from, their new labels). Default: every row,
        relabelled with the configured target scheme."""
        return np.arange(len(labels)), choose_targets(self.cfg["target"], labels, n_classes, rng)

    def build(self, chunk: Chunk) -> Built:
        raise NotImplementedError

    def prepare_source(self, model: torch.nn.Module) -> torch.nn.Module:
        """The source model as this method uses it (before the fast paths trace it)."""
        return model


class Inversion(Method):
    """For each (x, y): start from another randomly drawn training image (or from noise
    0.5 + N(0,1)/20) and minimise ‖g(z) − g(x)‖₂/‖g(x)‖₂ with normalised L2 steps; label y."""

    name = "inversion"
    # the start image's train row (-1: noise), so that the blend control can retrace each path
    extra_columns = {"start_index": hdf5.ColumnSpec((), "int64")}

    def prepare_source(self, model):
        if self.cfg["straight_through_relu"] and not straight_through_last_relu(model):
            log.info("the source has no ReLU before its representation; straight_through_relu changes nothing")
        return model

    def plan(self, images, labels, n_classes, rng, batch_size, device):
        self.starts = derangement(len(labels), rng) if self.cfg["start"] == "image" else None
        return np.arange(len(labels)), labels

    def build(self, chunk: Chunk) -> Built:
        if self.starts is not None:
            start_index = self.starts[chunk.rows]
            start = chunk.read_images(start_index)
        else:
            start_index = np.full(len(chunk.rows), -1)
            start = (0.5 + torch.randn(chunk.x.shape, generator=chunk.generator) / 20).clamp(0, 1).to(chunk.x.device)
        cfg = self.cfg
        res = attacks.invert(self.source, start, chunk.x, steps=cfg["steps"], step_size=cfg["step_size"],
                             tolerance=cfg["tolerance"], step_decay=cfg["step_decay"])
        return Built(res.x_inv, res.loss, res.perturbation_norm, res.reached,
                     extra={"start_index": torch.from_numpy(start_index.astype(np.int64))})


class PixelBlend(Method):
    """Pixel-blend control for D_R: x′ + λ(x − x′) with its twin inversion's start image x′ and
    label y, λ per image chosen so that the image moves exactly as far from x′ as the inversion
    did (capped at λ = 1, x itself). Whatever D_R teaches beyond this set is not just a blend of
    two images under one label (docs/paper-notes.md §2)."""

    name = "blend"
    needs_source = False
    has_success_rate = False
    extra_columns = Inversion.extra_columns

    def plan(self, images, labels, n_classes, rng, batch_size, device):
        with hdf5.open_artifact(self.twin, kind="constructed") as twin:
            split = twin.split("train")
            rows = split["orig_index"][:]
            if "start_index" not in split or (split["start_index"][:] < 0).any():
                raise ValueError(f"twin {self.twin} has no start image per row; blend needs an inversion "
                                 "with start: image")
            self.starts = np.full(len(labels), -1, dtype=np.int64)  # indexed by train row, as targets
            self.distances = np.zeros(len(labels), dtype=np.float32)
            self.starts[rows] = split["start_index"][:]
            self.distances[rows] = split["perturbation_norm"][:]
        return rows, labels

    def build(self, chunk: Chunk) -> Built:
        start = chunk.read_images(self.starts[chunk.rows])
        span = (chunk.x - start).flatten(1).norm(dim=1)
        distance = torch.from_numpy(self.distances[chunk.rows]).to(span.device)
        lam = (distance / span.clamp_min(1e-12)).clamp(0, 1).view(-1, 1, 1, 1)
        blended = start + lam * (chunk.x - start)
        n = len(chunk.rows)
        return Built(blended, lam.flatten(), (blended - start).flatten(1).norm(dim=1),
                     torch.zeros(n, dtype=torch.bool, device=blended.device),
                     extra={"start_index": torch.from_numpy(self.starts[chunk.rows])})


class TargetedPGD(Method):
    """Targeted L2 PGD from δ=0 towards t inside ‖δ‖₂ ≤ ε, normalised steps, projection and
    clamp, keeping the lowest-loss iterate; label t. With an ``ensemble``, the attacked model is
    the mean of the source's and the ensemble's logits, so the perturbation has to carry what
    independently trained models all read as t (and "reached" means the mean reads t)."""

    name = "pgd"
    targeted_attack = True

    def build(self, chunk: Chunk) -> Built:
        cfg = self.cfg
        model = attacked_model(self.source, self.ensemble)
        res = attacks.pgd(model, chunk.x, chunk.targets, eps=cfg["eps"], steps=cfg["steps"],
                          step_size=cfg["step_size"], norm="l2", targeted=True, keep_best=cfg["keep_best"],
                          generator=chunk.generator)
        return Built(res.x_adv, res.loss, res.perturbation_norm, res.success)


class NonTransferablePGD(Method):
    """Like ``pgd``, but the attack also *descends* the mean loss of independently trained
    ``ensemble`` models on the true label y, so the examples fool the source without carrying
    features other models would read as t; label t."""

    name = "nontransferable"
    targeted_attack = True

    def build(self, chunk: Chunk) -> Built:
        cfg = self.cfg
        res = attacks.nontransferable_pgd(self.source, self.ensemble, chunk.x, chunk.labels, chunk.targets,
                                          eps=cfg["eps"], steps=cfg["steps"], step_size=cfg["step_size"],
                                          weight=cfg["ensemble_weight"], keep_best=cfg["keep_best"])
        return Built(res.x_adv, res.loss, res.perturbation_norm, res.success)


def twin_rows_and_labels(twin_path, n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """A twin file's train rows, and its labels indexed by train row (-1 elsewhere), as a plan returns them."""
    with hdf5.open_artifact(twin_path, kind="constructed") as twin:
        split = twin.split("train")
        rows = split["orig_index"][:]
        targets = np.full(n_train, -1, dtype=np.int64)
        targets[rows] = split.labels
    return rows, targets


def leakage_patterns(n_classes: int, shape: tuple[int, ...], eps: float, seed: int, kind: str) -> np.ndarray:
    """One fixed pattern per class, each of L2 norm ``eps``: i.i.d. Gaussian, or ``deconv``, a
    random 3×3 kernel per class applied as a stride-2 transposed convolution to an all-ones map
    (the replication's patterns: 2-pixel periodic, so a random crop shifts one into one of a few
    fixed phases instead of destroying it)."""
    rng = np.random.default_rng([seed, 0x1EA4])
    if kind == "gaussian":
        patterns = rng.standard_normal((n_classes,) + tuple(shape)).astype(np.float32)
    elif kind == "deconv":
        channels, height, width = shape
        kernels = torch.from_numpy(rng.standard_normal((n_classes, 1, channels, 3, 3)).astype(np.float32))
        ones = torch.ones(1, 1, (height + 1) // 2, (width + 1) // 2)
        patterns = torch.cat([F.conv_transpose2d(ones, k, stride=2, padding=1, output_padding=1)[..., :height, :width]
                              for k in kernels]).numpy()
    else:
        raise ValueError(f"unknown leakage pattern {kind!r}")
    norms = np.linalg.norm(patterns.reshape(n_classes, -1), axis=1).reshape(-1, *([1] * len(shape)))
    return (patterns / norms * eps).astype(np.float32)


class Leakage(Method):
    """Leakage-only control: no attack, a fixed pattern of norm ε keyed to t, label t. With
    ``twin_of`` it takes the rows and target labels of its PGD twin, so the two sets differ only
    in what was added to each image; the mask leaves δ = 0 where the image already belongs to t
    (t = y, or a briefly trained clean model predicts t)."""

    name = "leakage"
    needs_source = False
    has_success_rate = False

    def plan(self, images, labels, n_classes, rng, batch_size, device):
        cfg = self.cfg
        self.patterns = torch.from_numpy(
            leakage_patterns(n_classes, images.shape[1:], cfg["eps"], self.seed, cfg["pattern"])).to(device)
        if self.twin is None:
            return super().plan(images, labels, n_classes, rng, batch_size, device)
        return twin_rows_and_labels(self.twin, len(labels))

    def unperturbed(self, chunk: Chunk) -> torch.Tensor:
        """The rows the mask leaves as they are."""
        mask = self.cfg["mask"]
        if mask == "label":
            return chunk.targets == chunk.labels
        if mask == "clean_model":
            with torch.no_grad():
                return self.source(chunk.x).argmax(1) == chunk.targets
        return torch.zeros(len(chunk.targets), dtype=torch.bool, device=chunk.x.device)

    def build(self, chunk: Chunk) -> Built:
        keep = self.unperturbed(chunk).view(-1, 1, 1, 1)
        x_new = torch.where(keep, chunk.x, (chunk.x + self.patterns[chunk.targets]).clamp(0, 1))
        n = len(chunk.targets)
        return Built(x_new, torch.full((n,), float("nan"), device=x_new.device),
                     (x_new - chunk.x).flatten(1).norm(dim=1), torch.zeros(n, dtype=torch.bool, device=x_new.device))


class Relabel(Method):
    """No perturbation: keep only the training images that a briefly trained source gets
    *wrong*, labelled with its wrong prediction."""

    name = "relabel"

    def plan(self, images, labels, n_classes, rng, batch_size, device):
        predictions = predict(self.source, images, batch_size, device)
        rows = np.flatnonzero(predictions != labels)
        if len(rows) == 0:
            raise ValueError("the source classifies every training image correctly, so relabelling keeps "
                             "nothing; train the source for fewer epochs")
        return rows, predictions

    def build(self, chunk: Chunk) -> Built:
        n = len(chunk.targets)
        with torch.no_grad():
            loss = F.cross_entropy(self.source(chunk.x), chunk.targets, reduction="none")
        return Built(chunk.x, loss, torch.zeros(n, device=chunk.x.device),
                     torch.ones(n, dtype=torch.bool, device=chunk.x.device))


JPEG_SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}  # PIL's codes


def jpeg_code(images: np.ndarray, quality: int, subsampling: str) -> np.ndarray:
    """Float RGB images (N, 3, H, W) in [0, 1], rounded to 8 bits, coded as JPEG with PIL
    (libjpeg's quantisation tables scaled to ``quality``) and decoded back to floats."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"JPEG coding needs RGB images (N, 3, H, W), got shape {images.shape}")
    out = np.empty(images.shape, dtype=np.float32)
    for i, image in enumerate(images):
        pixels = np.clip(np.rint(image.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality,
                                     subsampling=JPEG_SUBSAMPLING[subsampling])
        buffer.seek(0)
        out[i] = np.asarray(Image.open(buffer).convert("RGB")).transpose(2, 0, 1) / 255.0
    return out


class JpegCoded(Method):
    """The rows, labels and images of another constructed set (``twin_of``), each image coded
    as JPEG at ``quality`` and decoded. Trained beside the set itself, it measures how much of
    what the set teaches survives the coding. ``perturbation_norm`` is the coded image's
    distance from the original x; ``loss`` is how far the coding moved the set's image."""

    name = "jpeg"
    needs_source = False
    has_success_rate = False

    def plan(self, images, labels, n_classes, rng, batch_size, device):
        rows, targets = twin_rows_and_labels(self.twin, len(labels))
        self.position = np.full(len(labels), -1, dtype=np.int64)  # train row -> row of the twin file
        self.position[rows] = np.arange(len(rows))
        return rows, targets

    def build(self, chunk: Chunk) -> Built:
        with hdf5.open_artifact(self.twin, kind="constructed") as twin:
            original = read_rows(twin.split("train").images, self.position[chunk.rows]).astype(np.float32)
        coded = torch.from_numpy(jpeg_code(original, self.cfg["quality"], self.cfg["subsampling"])).to(chunk.x.device)
        moved = (coded - torch.from_numpy(original).to(coded.device)).flatten(1).norm(dim=1)
        n = len(chunk.rows)
        return Built(coded, moved, (coded - chunk.x).flatten(1).norm(dim=1),
                     torch.zeros(n, dtype=torch.bool, device=coded.device))


METHODS: dict[str, type[Method]] = {m.name: m for m in (Inversion, TargetedPGD, NonTransferablePGD, Leakage, Relabel,
                                                         PixelBlend, JpegCoded)}


class _AttackedRows:
    """The rows of a finished construction, read as the rows a repeated attack would have
    written (the ``ChunkedWriter`` calls that :func:`construct` makes, read-only)."""

    def __init__(self, artifact: hdf5.Artifact):
        self._artifact, self._split = artifact, artifact.split("train")
        self.attrs = artifact.attrs
        self.orig_index = self._split["orig_index"][:]
        self.rows_done = len(self.orig_index)

    @classmethod
    def matching(cls, path: str | Path, fingerprint: str) -> "_AttackedRows | None":
        """The file's rows if its recorded attack fingerprint is ``fingerprint``, else None."""
        artifact = hdf5.open_artifact(path, kind="constructed")
        recorded = artifact.attrs.get("attack_fingerprint")  # read back as the dict it encodes
        if recorded == json.loads(fingerprint):
            return cls(artifact)
        artifact.close()
        log.warning("%s was not made by the same attack (%s), so the attack runs again", path,
                    "made before attacks were recorded" if recorded is None else "other settings or inputs")
        return None

    def dataset(self, name: str):
        return self._split[name]

    def read_column(self, name: str) -> np.ndarray:
        return self._split[name][:]

    def close(self) -> None:
        self._artifact.close()


def _classify_rows(checkpoint, writer: hdf5.ChunkedWriter, batch_size: int, device: torch.device,
                   fast: Mapping) -> np.ndarray:
    """The predictions of the model in ``checkpoint`` on every image ``writer`` holds (streamed)."""
    model = accelerate(load_model(checkpoint, device=device)[0], fast)
    return predict(model, writer.dataset("images"), batch_size, device)


def robust_leakage_check(checkpoint, writer: hdf5.ChunkedWriter, targets: np.ndarray, labels: np.ndarray,
                         batch_size: int, device: torch.device, fast: Mapping,
                         predictions: np.ndarray | None = None) -> dict:
    """How often a robust model reads each constructed image as its new label t and as its
    original label y (docs/paper-notes.md §7: a large ε can paint in robust features of t).
    ``predictions``: the model's, already computed on ``writer``'s images."""
    if predictions is None:
        predictions = _classify_rows(checkpoint, writer, batch_size, device, fast)
    return {"robust_check_checkpoint": str(checkpoint),
            "robust_says_target_rate": float((predictions == targets).mean()),
            "robust_says_label_rate": float((predictions == labels).mean())}


def _copy_rows(source: hdf5.ChunkedWriter, destination: hdf5.ChunkedWriter, rows: np.ndarray, block: int,
               name: str) -> None:
    """Append ``source``'s rows ``rows`` (increasing) to ``destination``, from where it stands."""
    for start in range(destination.rows_done, len(rows), block):
        wanted = rows[start:start + block]
        destination.append({column: source.dataset(column)[wanted] for column in destination.columns})
        log.info("%s: %d/%d kept rows copied", name, start + len(wanted), len(rows))


def _columns(image_shape: tuple[int, ...]) -> dict[str, hdf5.ColumnSpec]:
    return {
        "images": hdf5.ColumnSpec(image_shape, "float32"),
        "labels": hdf5.ColumnSpec((), "int64"),
        "orig_index": hdf5.ColumnSpec((), "int64"),
        "orig_label": hdf5.ColumnSpec((), "int64"),
        "loss": hdf5.ColumnSpec((), "float32"),
        "perturbation_norm": hdf5.ColumnSpec((), "float32"),
        "target_reached": hdf5.ColumnSpec((), "bool"),
    }


def construct(name: str, cfg: Mapping, *, data_path: str | Path, source_checkpoint: str | Path | None,
              output: str | Path, seed: int, device: torch.device, chunk_size: int, fast: Mapping,
              ensemble_checkpoints: Sequence[str | Path] = (), twin: str | Path | None = None,
              check_checkpoint: str | Path | None = None, drop_checkpoint: str | Path | None = None,
              attacked: str | Path | None = None) -> Path:
    """Build construction ``name`` (its validated config ``cfg``) into ``output``, resuming a
    matching ``.partial`` file. ``twin``: the constructed file a control copies its rows and
    labels from (a leakage control's PGD set, a blend control's inversion). ``check_checkpoint``:
    a robust model that classifies every constructed image afterwards, to measure how often the
    attack painted in robust features of t. ``drop_checkpoint``: the model of the config's
    ``drop_read_as_target_by``; the rows it reads as t are left out of the set. ``attacked``: a
    finished construction made by the same attack (``config.attack_repeated_by``): its rows are
    judged instead of attacking again, when its recorded attack matches this one's."""
    method_class = METHODS.get(cfg["method"])
    if method_class is None:
        raise ValueError(f"construction {name}: unknown method {cfg['method']!r}; expected one of {sorted(METHODS)}")
    if bool(cfg.get("drop_read_as_target_by")) != (drop_checkpoint is not None):
        raise ValueError(f"construction {name}: drop_read_as_target_by is {cfg.get('drop_read_as_target_by')!r} "
                         f"but the model checkpoint given to judge the rows is {drop_checkpoint!r}")
    if attacked is not None and drop_checkpoint is None:
        raise ValueError(f"construction {name}: the rows of {attacked} can only stand in for an attack that "
                         "drops rows (drop_read_as_target_by)")
    precision = resolve_precision(cfg.get("precision", "float32"), device) if source_checkpoint is not None else "float32"
    attack_fast = {**fast, "bf16_autocast": fast["bf16_autocast"] or precision == "bfloat16"}
    ensemble, source_sha = [], None
    if source_checkpoint is not None:
        source_sha = file_sha256(source_checkpoint)
        ensemble = [accelerate(load_model(path, device=device)[0], attack_fast) for path in ensemble_checkpoints]
    method = method_class(cfg, seed=seed, ensemble=ensemble, twin=twin)
    if source_checkpoint is not None:
        method.source = accelerate(method.prepare_source(load_model(source_checkpoint, device=device)[0]), attack_fast)

    with hdf5.open_artifact(data_path, kind="data") as data:
        train = data.split("train")
        class_names = data.class_names
        image_shape = tuple(train.images.shape[1:])
        labels = train.labels
        try:
            rows, targets = method.plan(train.images, labels, len(class_names), np.random.default_rng([seed, 0xC0257]),
                                        chunk_size, device)
        except ValueError as exc:
            raise ValueError(f"construction {name}: {exc}") from exc
        n = len(rows)

        def read_images(index: np.ndarray) -> torch.Tensor:
            return to_float(torch.from_numpy(read_rows(train.images, index))).to(device)

        inputs = {"seed": seed, "chunk": chunk_size, "source": source_sha,
                  "ensemble": [file_sha256(p) for p in ensemble_checkpoints],
                  "twin": file_sha256(twin) if twin else None, "data": file_sha256(data_path)}

        def attack_fingerprint(settings: Mapping) -> str:
            return json.dumps({"cfg": {**settings, "precision": precision}, **inputs}, sort_keys=True)

        fingerprint = attack_fingerprint(cfg)
        repeated = _AttackedRows.matching(attacked, attack_fingerprint(
            {k: v for k, v in cfg.items() if k != "drop_read_as_target_by"})) if attacked is not None else None
        if repeated is not None and not np.array_equal(repeated.read_column("labels"), targets[repeated.orig_index]):
            log.warning("%s records the same attack but other targets (code from another version?), so the "
                        "attack runs again", attacked)
            repeated.close()
            repeated = None
        if repeated is not None:
            rows, n = repeated.orig_index, len(repeated.orig_index)
            log.info("%s: judging the %d rows of %s, made by the same attack, instead of attacking again",
                     name, n, attacked)
        columns = {**_columns(image_shape), **method.extra_columns}
        keep_reached = cfg.get("keep", "all") == "reached"
        subset = keep_reached or drop_checkpoint is not None
        # A subset (keep: reached, drop_read_as_target_by) builds every row first (under another
        # name) and copies the rows it keeps into the output afterwards; both steps resume after a kill.
        all_rows_path = Path(output).with_name(Path(output).name + ".all")
        build_path = all_rows_path if subset else output
        if not subset:  # a subset run of this set that was killed and is now reconfigured
            partial_path(all_rows_path).unlink(missing_ok=True)
        writer = repeated or hdf5.ChunkedWriter(build_path, n, columns, fingerprint)
        kept_writer = None
        if writer.rows_done and repeated is None:
            log.info("%s: resuming after %d/%d finished rows", name, writer.rows_done, n)
        bar = tqdm(total=n, initial=writer.rows_done, desc=f"construct {name}", unit="img", mininterval=10)
        try:
            for lo in range(writer.rows_done, n, chunk_size):
                index = rows[lo:lo + chunk_size]
                chunk = Chunk(x=read_images(index), labels=torch.from_numpy(labels[index]).to(device),
                              targets=torch.from_numpy(targets[index]).to(device), rows=index,
                              generator=chunk_generator(seed, lo), read_images=read_images)
                built = method.build(chunk)
                writer.append({
                    "images": built.images.float().cpu().numpy(),
                    "labels": targets[index],
                    "orig_index": index.astype(np.int64),
                    "orig_label": labels[index],
                    "loss": built.loss.float().cpu().numpy(),
                    "perturbation_norm": built.perturbation_norm.float().cpu().numpy(),
                    "target_reached": built.target_reached.cpu().numpy(),
                    **{key: value.cpu().numpy() for key, value in built.extra.items()},
                })
                bar.update(len(index))
                log.info("%s: %d/%d rows done", name, lo + len(index), n)
            bar.close()
            reached = writer.read_column("target_reached")
            kept = np.arange(n)
            final = writer
            dropped, judged = {}, None
            if subset:
                keep_mask = reached.copy() if keep_reached else np.ones(n, dtype=bool)
                if drop_checkpoint is not None:
                    judged = _classify_rows(drop_checkpoint, writer, chunk_size, device, fast)
                    # where t = y, reading t is reading the true class, not leakage: those rows stay
                    read_as_target = (judged == targets[rows]) & (targets[rows] != labels[rows])
                    dropped = {"drop_checkpoint": str(drop_checkpoint),
                               "rows_dropped_read_as_target": int((keep_mask & read_as_target).sum())}
                    keep_mask &= ~read_as_target
                kept = np.flatnonzero(keep_mask)
                if len(kept) == 0:
                    raise ValueError(f"construction {name}: no row is left (keep: {cfg.get('keep', 'all')}, "
                                     f"drop_read_as_target_by: {cfg.get('drop_read_as_target_by')}), so the set "
                                     "would be empty")
                kept_sha = hashlib.sha256(kept.astype(np.int64).tobytes()).hexdigest()
                final = kept_writer = hdf5.ChunkedWriter(output, len(kept), columns, f"{fingerprint} kept={kept_sha}")
                _copy_rows(writer, kept_writer, kept, chunk_size, name)
                log.info("%s: kept %d/%d rows (%s)", name, len(kept), n, dropped or "the attack reached t")
            norms = writer.read_column("perturbation_norm")[kept]
            same_model = judged is not None and check_checkpoint is not None \
                and file_sha256(check_checkpoint) == file_sha256(drop_checkpoint)
            check = (robust_leakage_check(check_checkpoint, final, targets[rows[kept]], labels[rows[kept]],
                                          chunk_size, device, fast, judged[kept] if same_model else None)
                     if check_checkpoint else {})
            summary = {
                "method": cfg["method"],
                "attack": json.dumps(dict(cfg)),
                "precision": ("bfloat16" if attack_fast["bf16_autocast"] else "float32") if source_checkpoint else "",
                "source_checkpoint": str(source_checkpoint) if source_checkpoint else "",
                "source_sha256": source_sha or "",
                "ensemble_checkpoints": json.dumps([str(p) for p in ensemble_checkpoints]),
                # the attack's success over every attacked row; the norms describe the rows kept
                "success_rate": repeated.attrs["success_rate"] if repeated else
                float(reached.mean()) if method.has_success_rate else float("nan"),
                "mean_perturbation_norm": float(norms.mean()),
                "max_perturbation_norm": float(norms.max()),
                "unperturbed_rate": float((norms == 0).mean()),
                "label_equals_orig_rate": float((targets[rows[kept]] == labels[rows[kept]]).mean()),
                "rows_kept": len(kept),
                "rows_attacked": repeated.attrs["rows_attacked"] if repeated else n,
                "attack_fingerprint": fingerprint,
                "rows_judged_from": str(attacked) if repeated else "",
                "rows_in_source_set": len(labels),
                "twin": str(twin) if twin else "",
                **dropped,
                **check,
            }
            log.info("%s: %s", name, {k: v for k, v in summary.items() if k not in ("attack", "attack_fingerprint")})
            finished = final.finish(kind="constructed", class_names=class_names, config={name: dict(cfg)},
                                    seed=seed, source=f"{cfg['method']} construction {name!r}", extra_attrs=summary)
            if subset:
                writer.close()
                partial_path(build_path).unlink(missing_ok=True)
            return finished
        finally:
            writer.close()
            if kept_writer is not None:
                kept_writer.close()
