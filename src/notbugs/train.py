"""Stages 2 and 4, training: source models (standard or adversarial) and target models.

One recipe for both, readable top to bottom in :func:`train`:
SGD with momentum, a per-epoch schedule, optional crop/flip augmentation on the device,
optional label smoothing, optional PGD adversarial training (L2 or L∞), and forward passes in
float32 or autocast bfloat16 (``precision``).

Determinism and resume: the model is initialised from ``seed``, and every epoch draws its
shuffle, augmentation and attack starts from a generator seeded by (seed, epoch). The state is
checkpointed after each epoch, so a killed run that is restarted continues from the last
finished epoch and ends with the same weights as an uninterrupted run (on CPU). The result is
always the *last* epoch; nothing is selected on the test set.

Data that does not fit in memory (``loader: stream``): the training split is read from its HDF5
file in whole chunks. Each epoch shuffles the chunks, groups them into windows of about
``shuffle_window`` rows and shuffles the rows inside each window, so at most two windows are in
memory whatever the size of the set; with several processes each reads only its own chunks. ``loader: memory`` (the default) holds the whole split on
the device and shuffles it as one window.

Several processes (``processes`` > 1): :func:`run_job` runs as one rank of a
``torchrun`` launch (:func:`launch_distributed`) and trains with DistributedDataParallel. Every
rank draws the same epoch order and trains on its slice of each batch, so one step still sees
``batch_size`` examples; rank 0 validates, checkpoints and writes the model.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from notbugs import attacks
from notbugs.batches import classes, to_float
from notbugs.hdf5 import ROWS_PER_CHUNK
from notbugs.models import build_model, save_checkpoint
from notbugs.runtime import atomic_write, resolve_precision
from notbugs.sampling import derived_seed, epoch_generator

log = logging.getLogger("notbugs.train")  # also when run as a torchrun rank (__main__)
LOG_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_acc", "val_robust_acc", "seconds"]


def lr_at(epoch: int, cfg: Mapping) -> float:
    """Learning rate for ``epoch`` (0-based) under the configured schedule."""
    base, total = cfg["lr"], cfg["epochs"]
    schedule = cfg["schedule"]
    if schedule == "constant":
        return base
    if schedule == "step":
        drops = sum(epoch >= round(m * total) for m in cfg["milestones"])
        return base * cfg["gamma"] ** drops
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * epoch / total))
    if schedule == "triangle":  # linear warm-up to the peak at 1/5, then linear decay to 0
        peak = max(1, round(total / 5))
        return base * (epoch + 1) / peak if epoch < peak else base * (total - epoch) / max(1, total - peak)
    raise ValueError(f"unknown schedule {schedule!r}")


def augment(x: torch.Tensor, cfg: Mapping, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, per example, on x's device."""
    n, _, h, w = x.shape
    if cfg["crop"]:
        pad = cfg["padding"]
        padded = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    if cfg["flip"]:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(3), x)
    return x


def fingerprint(cfg: Mapping, seed: int, n_train: int) -> str:
    return json.dumps({"cfg": cfg, "seed": seed, "n": n_train}, sort_keys=True, default=str)


def initial_model(arch: str, num_classes: int, mean, std, seed: int, device: torch.device | str = "cpu"):
    """The untrained model that training with ``seed`` starts from."""
    torch.manual_seed(seed)
    return build_model(arch, num_classes, mean, std).to(device).to(memory_format=torch.channels_last)


def epoch_order(seed: int, epoch: int, n: int) -> tuple[torch.Tensor, torch.Generator]:
    """The shuffled row order of one epoch, and the generator its augmentation and attacks go on with."""
    gen = epoch_generator(seed, epoch)
    return torch.randperm(n, generator=gen), gen


def windowed_order(n: int, block: int, window_blocks: int, generator: torch.Generator, *, batch_size: int = 1,
                   ranks: int = 1) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """A row order that reads whole blocks of ``block`` consecutive rows, and the blocks each rank
    reads, window by window.

    The blocks are visited in a random order, ``window_blocks`` per rank at a time. Each window's
    blocks are dealt out to the ``ranks`` in turn, and each rank shuffles the rows of its blocks
    into its own stream. Global batch k is the concatenation of every rank's k-th slice of
    ``batch_size / ranks`` rows, so rank r's slice of a batch (as the training loop cuts it) comes
    from rank r's blocks alone: each rank reads 1/ranks of the file. With one rank the order is
    the stream itself, every row once; with several, each epoch drops the rows beyond the
    shortest stream's last whole slice (fewer than ``ranks`` × (``block`` + a slice))."""
    n_blocks = math.ceil(n / block)
    blocks = torch.randperm(n_blocks, generator=generator).tolist()
    streams: list[list[torch.Tensor]] = [[] for _ in range(ranks)]
    windows: list[list[list[int]]] = [[] for _ in range(ranks)]
    span = window_blocks * ranks
    for lo in range(0, n_blocks, span):
        for rank in range(ranks):
            mine = sorted(blocks[lo + rank:lo + span:ranks])
            windows[rank].append(mine)
            if mine:
                rows = torch.cat([torch.arange(b * block, min(n, (b + 1) * block)) for b in mine])
                streams[rank].append(rows[torch.randperm(len(rows), generator=generator)])
    flat = [torch.cat(stream) if stream else torch.zeros(0, dtype=torch.long) for stream in streams]
    if ranks == 1:
        return flat[0], windows
    share = batch_size // ranks
    steps = min(len(stream) for stream in flat) // share
    order = torch.stack([stream[:steps * share].view(steps, share) for stream in flat], dim=1)
    return order.reshape(-1), windows


class InMemoryRows:
    """The whole training split as one tensor on the device."""

    def __init__(self, images, device: torch.device):
        self.images = torch.from_numpy(np.asarray(images)).to(device)

    def epoch_order(self, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Generator]:
        return epoch_order(seed, epoch, len(self.images))

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        return self.images[rows.to(self.images.device)]

    def predictions(self, model, batch_size: int) -> torch.Tensor:
        """The model's class for every row, in row order."""
        return predictions(model, self.images, batch_size)


class StreamedRows:
    """The training split read from an array or HDF5 dataset (:func:`windowed_order`): this rank's
    blocks of one window are read together when the first of them is needed. At most two windows
    of blocks are held: the tail of the last one and the current one."""

    def __init__(self, images, window_rows: int, device: torch.device, *, batch_size: int = 1,
                 rank: int = 0, ranks: int = 1):
        self.images, self.device = images, device
        self.batch_size, self.rank, self.ranks = batch_size, rank, ranks
        chunks = getattr(images, "chunks", None)
        # Whole chunks, or on a set too small to give every rank several, parts of one.
        self.block = min(chunks[0] if chunks else ROWS_PER_CHUNK, max(1, math.ceil(len(images) / (4 * ranks))))
        self.window_blocks = max(1, window_rows // self.block)
        self.cache: dict[int, np.ndarray] = {}
        self.spare: list[np.ndarray] = []

    def epoch_order(self, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Generator]:
        gen = epoch_generator(seed, epoch)
        order, windows = windowed_order(len(self.images), self.block, self.window_blocks, gen,
                                        batch_size=self.batch_size, ranks=self.ranks)
        self.windows = windows[self.rank]
        self.window_index = {b: w for w, window in enumerate(self.windows) for b in window}
        self.spare += self.cache.values()
        self.cache.clear()
        return order, gen

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.numpy()
        blocks = rows // self.block
        needed = set(blocks.tolist())
        missing = needed - set(self.cache)
        if missing:
            for b in [b for b in self.cache if b not in needed]:
                self.spare.append(self.cache.pop(b))
            while missing:  # one window, or more where a window holds fewer rows than a batch
                window = self.windows[self.window_index[min(missing, key=self.window_index.get)]]
                self.cache.update({b: self._read_block(b) for b in window if b not in self.cache})
                missing = needed - set(self.cache)
        out = np.empty((len(rows),) + tuple(self.images.shape[1:]), dtype=self.images.dtype)
        for b in needed:
            here = blocks == b
            out[here] = self.cache[b][rows[here] - b * self.block]
        return torch.from_numpy(out).to(self.device)

    def predictions(self, model, batch_size: int) -> torch.Tensor:
        """The model's class for every row, in row order, reading the file a block at a time."""
        out = []
        for b in range(math.ceil(len(self.images) / self.block)):
            buffer = self._read_block(b)
            rows = min(len(self.images), (b + 1) * self.block) - b * self.block
            out.append(predictions(model, torch.from_numpy(buffer[:rows]).to(self.device), batch_size))
            self.spare.append(buffer)
        return torch.cat(out)

    def _read_block(self, b: int) -> np.ndarray:
        # Into a reused buffer: a fresh array per block fragments the heap, and the job's memory
        # then creeps up with the number of blocks read.
        buffer = self.spare.pop() if self.spare else np.empty((self.block,) + tuple(self.images.shape[1:]),
                                                              dtype=self.images.dtype)
        lo, hi = b * self.block, min(len(self.images), (b + 1) * self.block)
        if hasattr(self.images, "read_direct"):
            self.images.read_direct(buffer, np.s_[lo:hi], np.s_[0:hi - lo])
        else:
            buffer[:hi - lo] = self.images[lo:hi]
        return buffer


def training_rows(images, cfg: Mapping, device: torch.device, rank: int = 0, ranks: int = 1):
    """How the training loop reads ``images`` (an array or an h5py dataset) under ``cfg['loader']``."""
    if cfg["loader"] == "stream":
        return StreamedRows(images, cfg["shuffle_window"], device, batch_size=cfg["batch_size"], rank=rank,
                            ranks=ranks)
    return InMemoryRows(images[:] if not isinstance(images, np.ndarray) else images, device)


def world() -> tuple[int, int]:
    """(rank, number of processes) of the running torch.distributed job; (0, 1) outside one."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(*values: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist
    packed = torch.stack([v.double() for v in values])
    dist.all_reduce(packed)
    return list(packed)


def predictions(model, images, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """The model's classes for un-augmented images (a tensor, array or h5py dataset) in eval mode,
    the model left as it was."""
    if device is None:
        device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
    with attacks.frozen(model):
        return classes(model, images, batch_size, device)


def validate(model, val_images, val_labels: torch.Tensor, val_cfg: Mapping, batch_size: int
             ) -> tuple[float, float]:
    """(accuracy, robust accuracy or NaN) on the validation split, the model left as it was.
    Robust accuracy attacks the first ``robust_examples`` images with L2 PGD (worst iterate)."""
    preds = predictions(model, val_images, batch_size, val_labels.device)
    accuracy = float((preds == val_labels).float().mean())
    k = min(val_cfg["robust_examples"], len(val_labels))
    if not k:
        return accuracy, float("nan")
    eps, steps = val_cfg["robust_eps"], val_cfg["robust_steps"]
    x = to_float(torch.as_tensor(np.asarray(val_images[:k])).to(val_labels.device))
    res = attacks.pgd(model, x, val_labels[:k], eps=eps, steps=steps,
                      step_size=2.5 * eps / steps, norm="l2", worst_iterate=True)
    return accuracy, float(((preds[:k] == val_labels[:k]) & ~res.success).float().mean())


def train(images, labels: np.ndarray, *, arch: str, num_classes: int, mean, std,
          cfg: Mapping, seed: int, out_dir: str | os.PathLike, device: torch.device,
          checkpoint_config: Mapping | None = None, val: tuple | None = None,
          val_cfg: Mapping | None = None, keep_resume_state: bool = False) -> dict:
    """Train, checkpointing each epoch into ``out_dir/checkpoints``; writes ``out_dir/model.pt``
    and ``out_dir/train_log.csv``. ``images`` is an array or an h5py dataset (read as
    ``cfg['loader']`` says). With ``val`` (images, labels) and the config section ``validation``
    as ``val_cfg``, every epoch also logs accuracy on the validation split (which draws no random
    numbers, so it does not change the training run). The resume state is removed once the model
    is written, unless ``keep_resume_state``. Inside a torch.distributed job every rank calls
    this; only rank 0 writes. Returns a summary dict."""
    out_dir = Path(out_dir)
    resume_path = out_dir / "checkpoints" / "last.pt"
    cfg = {**cfg, "precision": resolve_precision(cfg["precision"], device)}  # the checkpoint records which
    rank, n_ranks = world()
    fp = fingerprint({**cfg, "arch": arch, "ranks": n_ranks}, seed, len(labels))

    model = initial_model(arch, num_classes, mean, std, seed, device)
    stepped = model
    if n_ranks > 1:
        from torch.nn.parallel import DistributedDataParallel
        stepped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                          weight_decay=cfg["weight_decay"], nesterov=cfg["nesterov"])
    start_epoch, history, elapsed = 0, [], 0.0
    if resume_path.exists():
        state = torch.load(resume_path, map_location=device, weights_only=False)
        if state.get("fingerprint") == fp:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start_epoch, history, elapsed = state["epoch"], state["history"], state["elapsed"]
            log.info("resuming from %s after epoch %d", resume_path, start_epoch)
        else:
            log.info("ignoring %s: it was made with other settings", resume_path)

    rows = training_rows(images, cfg, device, rank, n_ranks)
    y_all = torch.from_numpy(np.asarray(labels)).to(device)
    if val is not None:
        x_val, y_val = val[0], torch.from_numpy(np.asarray(val[1])).to(device)
        if cfg["loader"] == "memory":
            x_val = torch.from_numpy(np.asarray(x_val[:])).to(device)
    adv = cfg["adversarial"]
    bf16 = cfg["precision"] == "bfloat16"
    threat = attacks.threat_model(adv["norm"], adv["eps"], adv["step_size"]) if adv else None
    n, bs = len(labels), cfg["batch_size"]
    if n_ranks > 1 and (bs % n_ranks or not cfg["drop_last"] or n < bs):
        raise ValueError(f"training with {n_ranks} processes needs batch_size ({bs}) divisible by the number "
                         f"of processes, drop_last: true and at least one full batch ({n} rows)")

    for epoch in range(start_epoch, cfg["epochs"]):
        t0 = time.perf_counter()
        order, gen = rows.epoch_order(seed, epoch)
        # Every row once (in memory, or streamed by one process), less the rows a streamed epoch
        # of several processes leaves over.
        steps_per_epoch = (max(1, len(order) // bs) if cfg["drop_last"] and len(order) >= bs
                           else math.ceil(len(order) / bs))
        if len(order) < bs and n_ranks > 1:
            raise ValueError(f"{n} training rows give the {n_ranks} processes no full batch of {bs} this "
                             "epoch; use fewer processes or a smaller batch_size")
        if n_ranks > 1:  # same order on every rank; augmentation and attack starts differ per rank
            gen = torch.Generator().manual_seed(derived_seed("rank", seed, epoch, rank))
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, cfg)
        model.train()
        total_loss = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg['epochs']}", unit="batch",
                   leave=False, mininterval=1 if os.isatty(2) else 30, disable=rank != 0)
        for step in bar:
            idx = order[step * bs:(step + 1) * bs]
            if n_ranks > 1:
                idx = idx.tensor_split(n_ranks)[rank]
            x = augment(to_float(rows.read(idx)), cfg["augment"], gen)
            y = y_all[idx.to(device)]
            if threat is not None:
                x = _adversarial_batch(model, x, y, threat, adv, gen, bf16)
            logits, loss = train_step(stepped, opt, x, y, cfg["label_smoothing"], bf16)
            total_loss += loss * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        elapsed += time.perf_counter() - t0
        if n_ranks > 1:
            total_loss, correct, seen = _all_reduce_sum(total_loss, correct, torch.tensor(seen, device=device))
        if rank == 0:
            val_acc, val_robust = (validate(model, x_val, y_val, val_cfg, bs) if val is not None
                                   else (float("nan"), float("nan")))
            row = dict(epoch=epoch + 1, lr=lr_at(epoch, cfg), train_loss=float(total_loss) / float(seen),
                       train_acc=float(correct) / float(seen), val_acc=val_acc, val_robust_acc=val_robust,
                       seconds=round(elapsed, 3))
            history.append(row)
            log.info("epoch %d/%d  loss %.4f  acc %.4f  val acc %.4f  val robust %.4f  lr %.4g", row["epoch"],
                     cfg["epochs"], row["train_loss"], row["train_acc"], val_acc, val_robust, row["lr"])
            with atomic_write(resume_path) as tmp:
                torch.save({"fingerprint": fp, "model": model.state_dict(), "optimizer": opt.state_dict(),
                            "epoch": epoch + 1, "history": history, "elapsed": elapsed}, tmp)
        if n_ranks > 1:
            import torch.distributed as dist
            dist.barrier()

    if rank != 0:
        return {"train_seconds": elapsed, "final_train_acc": None, "train_fit": None}
    # How well the model fits its own training set (un-augmented): a control such as a
    # leakage-only set means nothing if its shortcut was never learnt (docs/paper-notes.md §6).
    train_fit = float((rows.predictions(model, bs) == y_all).float().mean())
    log.info("fit of its own training set: %.4f", train_fit)
    write_log(out_dir / "train_log.csv", history)
    save_checkpoint(out_dir / "model.pt", model, arch=arch, num_classes=num_classes, mean=mean, std=std,
                    config=dict(checkpoint_config or {}, train=dict(cfg)), epochs=cfg["epochs"],
                    seed=seed, train_seconds=elapsed, train_fit=train_fit)
    if not keep_resume_state:
        shutil.rmtree(resume_path.parent, ignore_errors=True)
    return {"train_seconds": elapsed, "final_train_acc": history[-1]["train_acc"] if history else None,
            "train_fit": train_fit}


def forward(model, x: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Float32 logits of ``model(x)``, its forward pass autocast to bfloat16 if ``bf16``."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(x).float()


def train_step(model, opt, x, y, label_smoothing: float = 0.0, bf16: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a batch; returns the (detached) logits and mean loss."""
    logits = forward(model, x, bf16)
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return logits.detach(), loss.detach()


def _adversarial_batch(model, x, y, threat, adv: Mapping, gen: torch.Generator, bf16: bool = False
                       ) -> torch.Tensor:
    def loss_fn(z):
        return -F.cross_entropy(forward(model, z, bf16), y, reduction="none")
    with attacks.frozen(model):
        x_adv, _ = attacks.descend(x, loss_fn, threat, adv["steps"], random_start=adv["random_start"],
                                   generator=gen, evaluate_last=False)
    return x_adv


def write_log(path: Path, history: list[dict]) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(history)


# --------------------------------------------------------------------------- one job, one or several processes

def run_job(job: Mapping, device: torch.device) -> None:
    """Train every replicate of one Snakemake job (``job``: what :func:`job_spec` returns), in this
    process or as one rank of a distributed launch."""
    from notbugs import hdf5

    with hdf5.open_artifact(job["data"], kind="data") as data, \
            hdf5.open_artifact(job["train_set"]) as train_set:
        mean, std, class_names = data.attrs["mean"], data.attrs["std"], data.class_names
        val = (data.split("val").images, data.split("val").labels) if "val" in data.splits else None
        split = train_set.split("train")
        images, labels = split.images, split.labels
        provenance = {"rule": job["rule"], "train_set": str(job["train_set"])}
        if job.get("use_extra_train"):
            extra = data.split("extra_train")
            images, labels = np.concatenate([images[:], extra.images[:]]), np.concatenate([labels, extra.labels])
            provenance["extra_train_rows"] = len(extra)
        for out_dir, seed in zip(job["out_dirs"], job["seeds"]):
            # Resume state is kept until every replicate of the job is done: if the job is killed,
            # Snakemake deletes its finished outputs too, and the rerun restores them from it.
            train(images, labels, arch=job["arch"], num_classes=len(class_names), mean=mean, std=std,
                  cfg=job["train"], seed=seed, out_dir=out_dir, device=device,
                  checkpoint_config=provenance, val=val, val_cfg=job["validation"], keep_resume_state=True)
    if world()[0] == 0:
        for out_dir in job["out_dirs"]:
            shutil.rmtree(Path(out_dir) / "checkpoints", ignore_errors=True)


def job_spec(*, rule: str, data: str, train_set: str, arch: str, train_cfg: Mapping, seeds, out_dirs,
             validation: Mapping, device: str, threads: int, use_extra_train: bool = False) -> dict:
    """Everything a training job needs, as plain JSON-able values (a distributed launch passes it
    to every rank in a file). ``use_extra_train``: add the data's extra_train split to the training set."""
    return dict(rule=rule, data=str(data), train_set=str(train_set), arch=arch, train=dict(train_cfg),
                seeds=[int(s) for s in seeds], out_dirs=[str(d) for d in out_dirs],
                validation=dict(validation), device=device, threads=int(threads),
                use_extra_train=bool(use_extra_train))


def launch_distributed(job: Mapping, log_path: str | os.PathLike) -> None:
    """Run ``job`` as ``job['train']['processes']`` ranks of one torchrun launch on this node,
    their output appended to ``log_path``. The launch dies with this process."""
    import json
    import subprocess
    import sys

    from notbugs.runtime import die_with_parent

    processes = job["train"]["processes"]
    spec = Path(job["out_dirs"][0]).parent / f".{Path(job['out_dirs'][0]).name}.distributed-job.json"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(job))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           "-m", "notbugs.train", str(spec)]
    log.info("launching %d training processes: %s", processes, " ".join(cmd))
    with open(log_path, "a") as out:
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    spec.unlink(missing_ok=True)
    if result.returncode:
        raise RuntimeError(f"distributed training failed (torchrun exit code {result.returncode}); "
                           f"see the ranks' output in {log_path}")


def _distributed_rank_main(spec_path: str) -> None:
    """Entry point of one torchrun rank: join the process group, train, leave."""
    import json

    import torch.distributed as dist

    from notbugs.runtime import die_with_parent, start_job

    die_with_parent()
    job = json.loads(Path(spec_path).read_text())
    processes = job["train"]["processes"]
    device = start_job(None, job["threads"] // processes, job["device"], prefix=f"rank {os.environ.get('RANK', 0)}")
    if device.type == "cuda":
        if torch.cuda.device_count() < processes:
            raise RuntimeError(f"{processes} training processes need as many GPUs; "
                               f"this job sees {torch.cuda.device_count()} (request them: resources gpu)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        run_job(job, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    _distributed_rank_main(sys.argv[1])
