"""``notbugs bench``: throughput of notbugs' attacks and training against references, side by side
in one process on the same model, batch and device, printed as ratios.

- PGD: notbugs' targeted L2 PGD vs torchattacks' PGDL2 (if installed) and a plain PyTorch loop.
- Inversion: image-steps/s.
- Training: img/s of notbugs' training step vs a plain reference loop.
- FLOP/s of each, as a fraction of the peak of its own precision measured in the same run (a
  large matmul and convolution in float32, and again in bfloat16 for the bf16 autocast rows).
  FLOPs per image come from ``torch.utils.flop_counter`` (forward); an attack step is counted
  as 2× forward (forward + input gradient), a training step as 3× forward.
- Beside each of notbugs' rows, a ceiling: the share of the same peak the row would reach if
  everything but its convolutions took no time (each convolution timed alone at the job's
  shapes, dtype and layout, with only the gradients the job computes).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from notbugs import attacks
from notbugs.config import complete
from notbugs.models import accelerate, build_model
from notbugs.runtime import native_bf16


def _rate(fn: Callable[[], None], units: float, min_seconds: float, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    runs, start = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return runs * units / elapsed


def _interleaved_rates(fns: dict[str, Callable[[], None]], units: float, min_seconds: float,
                       rounds: int = 3) -> dict[str, float]:
    """Best rate of each function over ``rounds`` rounds that take turns, so that a slow spell
    of a shared machine hits every contender alike instead of whichever ran then."""
    for fn in fns.values():
        fn()  # warm-up (allocator, oneDNN primitive caches)
    best = {name: 0.0 for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = max(best[name], _rate(fn, units, min_seconds / rounds, warm_up=False))
    return best


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / len(x)


def _best_call_rate(fn: Callable[[], None], units: float, min_seconds: float) -> float:
    """Units per second of the fastest single call within ``min_seconds``: a peak, unlike the
    mean rate, is not lowered by a slow spell of a shared machine."""
    fn()
    best, start = 0.0, time.perf_counter()
    while best == 0.0 or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        best = max(best, units / (time.perf_counter() - t))
    return best


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a timed call includes them."""
    if device.type == "cuda":
        torch.cuda.synchronize()


# (channels, height = width, batch) of the 3×3 convolutions the peak tries: the 256-channel one
# alone ran below the models' own convolutions on an AMD EPYC, so the peak also tries the wider
# and smaller shapes that small CIFAR nets use.
PEAK_CONV_SHAPES = ((256, 32, 32), (512, 16, 64), (128, 32, 64))


def peak_flops(device: torch.device, min_seconds: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """The best of large matmuls and 3×3 convolutions (NCHW and NHWC) in ``dtype``, measured now."""
    per_kernel = min_seconds / (2 + 2 * len(PEAK_CONV_SHAPES))
    rates = []
    for n in (2048, 4096):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        rates.append(_best_call_rate(lambda: (a @ b, _synchronize(device)), 2 * n ** 3, per_kernel))
    with torch.no_grad():
        for channels, size, batch in PEAK_CONV_SHAPES:
            conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device, dtype)
            x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
            flops = 2 * batch * channels * channels * 9 * size * size
            rates.append(_best_call_rate(lambda: (conv(x), _synchronize(device)), flops, per_kernel))
            # channels_last reaches a faster convolution kernel (oneDNN on CPU): the peak must include it
            conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            rates.append(_best_call_rate(lambda: (conv(x), _synchronize(device)), flops, per_kernel))
    return max(rates)


def reference_pgd(model, x, y, eps, steps, step_size):
    """A plain 15-line targeted L2 PGD, the baseline everyone writes."""
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta), y)
        loss.backward()
        with torch.no_grad():
            g = delta.grad
            g_norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta -= step_size * g / g_norm
            d_norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta *= torch.clamp(eps / d_norm, max=1.0)
            delta.copy_((x + delta).clamp(0, 1) - x)
        delta.grad.zero_()
    return (x + delta).detach()


def reference_train_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


CONVOLUTIONS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


@dataclasses.dataclass
class ConvolutionCall:
    """One convolution as a job kind runs it: the module, its input (shape, dtype, layout,
    device, autocast), which gradients its backward pass computes, and how many times one call
    of the job runs it with a backward pass (``differentiated``) and without (``forward_only``,
    e.g. an attack's evaluation of the images it returns)."""
    module: torch.nn.Module
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    layout: torch.memory_format
    device: torch.device
    autocast: bool
    input_grad: bool
    weight_grads: tuple[str, ...]
    differentiated: int = 0
    forward_only: int = 0


def _layout(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def convolutions_of(work: Callable[[], None]) -> list[ConvolutionCall]:
    """The convolutions one call of ``work`` runs, one entry per module, with its input as the
    first pass that is differentiated (or the first pass, if none is) saw it."""
    calls: dict[torch.nn.Module, ConvolutionCall] = {}

    def record(module, inputs, output):
        if not isinstance(module, CONVOLUTIONS):
            return
        x, differentiated = inputs[0], output.requires_grad
        if module not in calls or (differentiated and not calls[module].differentiated):
            counts = ((calls[module].differentiated, calls[module].forward_only) if module in calls else (0, 0))
            calls[module] = ConvolutionCall(
                module, tuple(x.shape), x.dtype, _layout(x), x.device, torch.is_autocast_enabled(x.device.type),
                x.requires_grad, tuple(name for name, p in module.named_parameters() if p.requires_grad), *counts)
        if differentiated:
            calls[module].differentiated += 1
        else:
            calls[module].forward_only += 1

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        work()
    finally:
        handle.remove()
    return list(calls.values())


def convolutions_alone_seconds(calls: list[ConvolutionCall], min_seconds: float, buffers: int = 4) -> float:
    """Seconds per call of the job spent in its convolutions alone: each one's forward pass, and
    forward and backward pass, timed by itself at its shapes, dtype, layout and autocast state,
    computing only the gradients the job needs, times the number of such passes the job makes.
    Inputs rotate over ``buffers`` tensors so that no call finds its input in cache where the
    job would not. With the same kernels, a job cannot run faster than this, whatever it does
    about the rest of its work (element-wise passes, pooling, the optimiser)."""
    total = 0.0
    budget = min_seconds / max(2 * len(calls), 1)
    for call in calls:
        module = call.module
        inputs = [torch.randn(call.input_shape, device=call.device, dtype=call.input_dtype)
                  .contiguous(memory_format=call.layout).requires_grad_(call.input_grad) for _ in range(buffers)]
        saved = {name: (p.requires_grad, p.grad) for name, p in module.named_parameters()}
        for name, p in module.named_parameters():
            p.requires_grad_(name in call.weight_grads)
        def autocast(call=call):
            return torch.autocast(call.device.type, dtype=torch.bfloat16, enabled=call.autocast)

        with torch.no_grad(), autocast():
            grad_outputs = [torch.ones_like(module(x)) for x in inputs]
        turn = itertools.cycle(range(buffers))

        def forward():
            with torch.no_grad(), autocast():
                module(inputs[next(turn)])
            _synchronize(call.device)

        def forward_backward():
            i = next(turn)
            with autocast():
                out = module(inputs[i])
            out.backward(grad_outputs[i])
            inputs[i].grad = None
            for p in module.parameters():
                p.grad = None
            _synchronize(call.device)

        try:
            # the fastest call, as for the peak: a ceiling is not lowered by a slow spell of a shared machine
            if call.differentiated:
                total += call.differentiated / _best_call_rate(forward_backward, 1, budget)
            if call.forward_only:
                total += call.forward_only / _best_call_rate(forward, 1, budget)
        finally:
            for name, p in module.named_parameters():
                p.requires_grad_(saved[name][0])
                p.grad = saved[name][1]
    return total


def run(archs=("small_cnn", "resnet18"), batch: int = 256, steps: int = 10, device: str = "cpu",
        min_seconds: float = 3.0, print_fn=print) -> list[dict]:
    dev = torch.device(device)
    # Where torch only emulates bfloat16 (no AMX or AVX-512 BF16, a pre-Ampere GPU) its kernels are
    # 10-16x slower than float32 and not worth minutes of timing: the bf16 rows are left out.
    bf16 = native_bf16(dev)
    peaks = {"float32": peak_flops(dev, min_seconds)}
    if bf16:
        peaks["bfloat16"] = peak_flops(dev, min_seconds, torch.bfloat16)
    bf16_peak = (f"{peaks['bfloat16'] / 1e9:.1f} GFLOP/s bfloat16" if bf16 else
                 "bfloat16 not measured: this device has no bfloat16 arithmetic (torch would emulate it)")
    print_fn(f"device {dev}, {torch.get_num_threads()} threads, measured peak {peaks['float32'] / 1e9:.1f} GFLOP/s "
             f"float32, {bf16_peak} (fastest call of 2048² and 4096² "
             f"matmuls and 3×3 convs of {len(PEAK_CONV_SHAPES)} shapes, NCHW or NHWC)")
    rows = []
    for arch in archs:
        torch.manual_seed(0)
        model = build_model(arch, 10, [0.5] * 3, [0.25] * 3).to(dev).eval()
        x = torch.rand(batch, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (batch,), device=dev)
        fwd = forward_flops(model, x[:8])

        def ours_plain():
            attacks.pgd(model, x, y, eps=EPS, steps=steps, step_size=STEP_SIZE, targeted=True)

        def reference():
            reference_pgd(model, x, y, EPS, steps, STEP_SIZE)

        # "notbugs ..." rows run as the pipeline does: with the default fast paths (BatchNorm
        # folded, channels_last), and again with bf16 autocast.
        attack_fns = {"notbugs PGD": job_kind_workload("attack", model, x, y, steps)[0],
                      "notbugs PGD, no fast paths": ours_plain, "reference PGD loop": reference}
        if bf16:
            attack_fns["notbugs PGD, bf16 autocast"] = job_kind_workload("attack", model, x, y, steps, bf16=True)[0]
        try:
            import torchattacks
            ta = torchattacks.PGDL2(model, eps=EPS, alpha=STEP_SIZE, steps=steps, random_start=False)
            ta.set_mode_targeted_by_label(quiet=True)
            attack_fns["torchattacks PGDL2"] = lambda: ta(x, y)
        except ImportError:
            pass
        attack_fns["notbugs inversion"] = job_kind_workload("inversion", model, x, y, steps)[0]
        results = _interleaved_rates(attack_fns, batch * steps, min_seconds)

        ref_model = copy.deepcopy(model).train()
        ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.01, momentum=0.9)
        training_fns = {"notbugs training": job_kind_workload("training", model, x, y, steps)[0],
                        "reference training loop": lambda: reference_train_step(ref_model, ref_opt, x, y)}
        if bf16:
            training_fns["notbugs training, bf16"] = job_kind_workload("training", model, x, y, steps, bf16=True)[0]
        results.update(_interleaved_rates(training_fns, batch, min_seconds))
        # For notbugs' own rows: the rate its convolutions alone would allow, i.e. the share of
        # the peak that no work on the rest of the job can take it past (None without convolutions).
        ceilings = {}
        for name, fn in {**attack_fns, **training_fns}.items():
            if name.startswith("notbugs") and "no fast paths" not in name:
                seconds = convolutions_alone_seconds(convolutions_of(fn), min_seconds / 3)
                units = batch if "training" in name else batch * steps
                ceilings[name] = units / seconds if seconds else None
        for name, rate in results.items():
            flops_per_unit = (3 if "training" in name else 2) * fwd
            precision = "bfloat16" if "bf16" in name else "float32"
            rows.append({"arch": arch, "what": name, "rate": rate, "precision": precision,
                         "unit": "img/s" if "training" in name else "img-steps/s",
                         "flop_utilisation": rate * flops_per_unit / peaks[precision],
                         "convolutions_alone": (ceilings[name] * flops_per_unit / peaks[precision]
                                                if ceilings.get(name) else None)})
        print_fn(f"\n{arch} (batch {batch}, {steps} steps, {fwd / 1e6:.1f} MFLOP forward per image; "
                 f"ceiling: the share of the peak its convolutions alone reach, each timed by itself)")
        for row in rows[-len(results):]:
            ceiling = (f"   ceiling {100 * row['convolutions_alone']:5.1f}%"
                       if row["convolutions_alone"] is not None else "")
            print_fn(f"  {row['what']:<28} {row['rate']:>10.0f} {row['unit']:<12} "
                     f"{100 * row['flop_utilisation']:5.1f}% of the {row['precision']} peak{ceiling}")
        r = results

        def ratio(ours: str, theirs: str) -> str:
            """The measured ratio, and the most its convolutions alone would allow."""
            ceiling = f" (ceiling {ceilings[ours] / r[theirs]:.2f}x)" if ceilings[ours] else ""
            return f"{r[ours] / r[theirs]:.2f}x{ceiling}"

        print_fn(f"  ratio notbugs/reference PGD:   {ratio('notbugs PGD', 'reference PGD loop')}")
        if "torchattacks PGDL2" in r:
            in_bf16 = f", in bf16 autocast {ratio('notbugs PGD, bf16 autocast', 'torchattacks PGDL2')}" if bf16 else ""
            print_fn(f"  ratio notbugs/torchattacks:    {ratio('notbugs PGD', 'torchattacks PGDL2')}{in_bf16}")
        print_fn(f"  ratio notbugs/reference train: {ratio('notbugs training', 'reference training loop')}")
        if bf16:
            print_fn(f"  ratio bf16/float32 PGD:        {r['notbugs PGD, bf16 autocast'] / r['notbugs PGD']:.2f}x, "
                     f"training {r['notbugs training, bf16'] / r['notbugs training']:.2f}x")
    return rows


_PEAK_RSS = """
# The child's own high-water mark: a parent's rusage would include the pages it shared at fork.
print([line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1])
"""

_CONSTRUCT_CHILD = """
import sys, torch
from notbugs.runtime import keep_freed_memory
keep_freed_memory()  # as runtime.start_job does in every pipeline job
torch.set_num_threads(1)
from notbugs.config import complete
from notbugs.construct import construct
cfg = complete("constructions.bench", dict(method="pgd", source="s", target="next", eps=0.5, steps=2, step_size=0.1))
construct("bench", cfg, data_path=sys.argv[1], source_checkpoint=sys.argv[2], output=sys.argv[3],
          seed=0, device=torch.device("cpu"), chunk_size=256, fast=complete("fast_paths"))
""" + _PEAK_RSS

_TRAIN_CHILD = """
import sys, torch
from notbugs.runtime import keep_freed_memory
keep_freed_memory()
torch.set_num_threads(1)
from notbugs.config import complete
from notbugs.train import job_spec, run_job
cfg = complete("targets.train", dict(epochs=1, batch_size=128, loader=sys.argv[4], shuffle_window=256))
job = job_spec(rule="bench", data=sys.argv[1], train_set=sys.argv[1], arch="small_cnn", train_cfg=cfg, seeds=[0],
               out_dirs=[sys.argv[3]], validation=complete("validation"), device="cpu", threads=1)
run_job(job, torch.device("cpu"))
""" + _PEAK_RSS

MEMORY_JOBS = ("construction", "training, loader stream", "training, loader memory")


def peak_rss(n: int, workdir, print_fn=print, jobs=MEMORY_JOBS) -> dict[str, dict[int, float]]:
    """Peak RSS (MiB) of a construction job and of a training job (streamed, and in memory for
    contrast) over n and 4n training images, each run in a fresh process."""
    import subprocess
    import sys
    from pathlib import Path

    from notbugs.data import prepare
    from notbugs.models import save_checkpoint

    workdir = Path(workdir)
    model = build_model("small_cnn", 10, [0.5] * 3, [0.25] * 3)
    checkpoint = workdir / "model.pt"
    save_checkpoint(checkpoint, model, arch="small_cnn", num_classes=10, mean=[0.5] * 3, std=[0.25] * 3, config={})
    peaks: dict[str, dict[int, float]] = {job: {} for job in jobs}
    for size in (n, 4 * n):
        data_path = workdir / f"data_{size}.h5"
        prepare(complete("dataset", {"name": "bench", "source": "synthetic", "n_train": size, "n_test": 100}), 0, data_path)
        for job in jobs:
            out = workdir / f"{job.replace(' ', '').replace(',', '_')}_{size}"
            if job == "construction":
                args = ["-c", _CONSTRUCT_CHILD, str(data_path), str(checkpoint), str(out) + ".h5"]
            else:
                args = ["-c", _TRAIN_CHILD, str(data_path), "unused", str(out), job.split()[-1]]
            done = subprocess.run([sys.executable, *args], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{job} over {size} images failed:\n{done.stderr[-3000:]}")
            peaks[job][size] = int(done.stdout.split()[-1]) / 1024  # VmHWM is in KiB
    data_mib = {size: (workdir / f"data_{size}.h5").stat().st_size / 2 ** 20 for size in (n, 4 * n)}
    print_fn(f"peak RSS (MiB) over N = {n} and 4N = {4 * n} synthetic float32 training images "
             f"(data files {data_mib[n]:.0f} and {data_mib[4 * n]:.0f} MiB, gzip; "
             f"{4 * n * 3 * 32 * 32 * 4 / 2 ** 20:.0f} MiB of images at 4N)")
    print_fn(f"{'job':<28} {'N':>9} {'4N':>9} {'4N/N':>7}")
    for job, peak in peaks.items():
        print_fn(f"{job:<28} {peak[n]:9.1f} {peak[4 * n]:9.1f} {peak[4 * n] / peak[n]:7.3f}")
    return peaks


def stage_profile(benchmark_dir) -> "pandas.DataFrame":
    """Sum Snakemake's per-job benchmark files (``benchmarks/<dataset>/<rule>/...tsv``, or
    ``<rule>.tsv``; the plot and study rules share ``plot/`` and ``studies/``) by rule:
    jobs, summed and longest wall time, CPU-seconds, cores busy per job (CPU-s / wall s) and the
    largest peak RSS. Snakemake samples CPU time every 30 s, so a job's last seconds may be missing."""
    import pandas as pd
    from pathlib import Path

    root = Path(benchmark_dir)
    files = sorted(root.rglob("*.tsv"))
    if not files:
        raise ValueError(f"no Snakemake benchmark files (*.tsv) under {root}: run the pipeline first")
    records = []
    for path in files:
        table = pd.read_csv(path, sep="\t", na_values=["NA", "-"])
        missing = {"s", "cpu_time", "max_rss"} - set(table.columns)
        if missing or table.empty:
            raise ValueError(f"{path} is not a Snakemake benchmark file (missing {sorted(missing) or 'rows'})")
        last = table.iloc[-1]  # a rule with repeat() writes a row per repetition
        parts = path.relative_to(root).parts  # <rule>/... or <rule>.tsv; plot/ and studies/ hold families
        records.append({"rule": parts[0] if len(parts) > 1 else path.stem, "wall_s": float(last["s"]),
                        "cpu_s": float(last["cpu_time"]), "max_rss_mib": float(last["max_rss"])})
    jobs = pd.DataFrame(records)
    profile = jobs.groupby("rule").agg(jobs=("wall_s", "size"), wall_min=("wall_s", "sum"),
                                       longest_job_min=("wall_s", "max"), cpu_min=("cpu_s", "sum"),
                                       peak_rss_mib=("max_rss_mib", "max"))
    profile[["wall_min", "longest_job_min", "cpu_min"]] /= 60
    profile["cores_busy"] = profile["cpu_min"] / profile["wall_min"]
    profile = profile.sort_values("wall_min", ascending=False)
    total = pd.DataFrame({"jobs": [profile["jobs"].sum()], "wall_min": [profile["wall_min"].sum()],
                          "longest_job_min": [profile["longest_job_min"].max()],
                          "cpu_min": [profile["cpu_min"].sum()], "peak_rss_mib": [profile["peak_rss_mib"].max()]},
                         index=pd.Index(["all jobs"], name="rule"))
    total["cores_busy"] = total["cpu_min"] / total["wall_min"]
    return pd.concat([profile, total])


def print_stage_profile(benchmark_dir, print_fn=print) -> "pandas.DataFrame":
    profile = stage_profile(benchmark_dir)
    print_fn(f"Per-rule profile from {benchmark_dir} (wall and CPU summed over each rule's jobs; "
             "jobs run side by side, so the sums exceed the end-to-end wall time)\n")
    print_fn(profile.round({"wall_min": 1, "longest_job_min": 1, "cpu_min": 1, "peak_rss_mib": 0,
                            "cores_busy": 2}).to_markdown())
    return profile


SPLIT_KINDS = ("attack", "inversion", "training")

_JOB_KIND_CHILD = """
import sys, time, torch
kind, arch, batch, steps, threads, keep_freed = sys.argv[1:3] + [int(a) for a in sys.argv[3:7]]
if keep_freed:
    from notbugs.runtime import keep_freed_memory
    keep_freed_memory()
torch.set_num_threads(threads)
from notbugs.bench import split_workload
work, units = split_workload(kind, arch, batch, steps)
work()
print("ready", flush=True)
while line := sys.stdin.readline():
    seconds = float(line)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        work()
        runs += 1
    print(runs * units / (time.perf_counter() - start), flush=True)
"""


class _JobKindProcess:
    """One job kind (``split_workload``) running in its own process, timed on request."""

    def __init__(self, kind: str, arch: str, batch: int, steps: int, threads: int, keep_freed: bool = True):
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", _JOB_KIND_CHILD, kind, arch, str(batch), str(steps),
                                      str(threads), str(int(keep_freed))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"the {kind} benchmark process for {arch} failed to start (see its stderr above)")

    def start_timing(self, seconds: float) -> None:
        self.proc.stdin.write(f"{seconds}\n")
        self.proc.stdin.flush()

    def rate(self) -> float:
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _interleaved_process_rates(layouts: dict[str, list[_JobKindProcess]], min_seconds: float,
                               rounds: int) -> dict[str, float]:
    """Summed rate of each layout's processes (timed together), best of ``rounds`` rounds in which
    the layouts take turns; every process is closed at the end."""
    best = {name: 0.0 for name in layouts}
    try:
        for _ in range(rounds):
            for name, procs in layouts.items():
                time.sleep(0.5)  # let the other layout's OpenMP threads stop spinning
                for proc in procs:
                    proc.start_timing(min_seconds / rounds)
                best[name] = max(best[name], sum(proc.rate() for proc in procs))
    finally:
        for procs in layouts.values():
            for proc in procs:
                proc.close()
    return best


EPS, STEP_SIZE = 0.5, 0.1  # the benchmark's targeted L2 PGD (the paper's D_rand / D_det radius)


def job_kind_workload(kind: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                      bf16: bool = False):
    """(function, units per call) of one job kind as the pipeline runs it, on ``model`` (left
    unchanged): ``attack`` (construction and evaluation: targeted L2 PGD on the accelerated
    model, in image-steps), ``inversion`` (D_R / D_NR, image-steps) and ``training`` (an SGD
    step in channels_last on a copy of the model, images)."""
    from notbugs.train import train_step
    fast_paths = complete("fast_paths", {"bf16_autocast": bf16})
    if kind == "attack":
        fast = accelerate(model, fast_paths)
        return (lambda: attacks.pgd(fast, x, y, eps=EPS, steps=steps, step_size=STEP_SIZE, targeted=True)), len(x) * steps
    if kind == "inversion":
        fast, start = accelerate(model, fast_paths), torch.rand_like(x)
        return (lambda: attacks.invert(fast, start, x, steps=steps, step_size=STEP_SIZE, tolerance=0.1,
                                       step_decay="none")), len(x) * steps
    if kind == "training":
        trained = copy.deepcopy(model).to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(trained.parameters(), lr=0.01, momentum=0.9)
        x_nhwc = attacks.channels_last(x)
        return (lambda: train_step(trained, opt, x_nhwc, y, bf16=bf16)), len(x)
    raise ValueError(f"unknown job kind {kind!r}: one of {', '.join(SPLIT_KINDS)}")


def split_workload(kind: str, arch: str, batch: int, steps: int):
    """``job_kind_workload`` on a freshly built ``arch`` and a random batch."""
    torch.manual_seed(0)
    model = build_model(arch, 10, [0.5] * 3, [0.25] * 3).eval()
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    return job_kind_workload(kind, model, x, y, steps)


def _compare_process_layouts(heading: str, make_layouts, archs, kinds, min_seconds: float, rounds: int,
                             print_fn) -> list[dict]:
    """One row per architecture and job kind: the best rate of each of two layouts
    (``make_layouts(kind, arch)`` returns {name: processes}) and the first's ratio to the second."""
    print_fn(heading)
    rows = []
    for arch in archs:
        for kind in kinds:
            best = _interleaved_process_rates(make_layouts(kind, arch), min_seconds, rounds)
            first, second = best
            if not rows:
                print_fn(f"{'arch':<16} {'job kind':<10} {first.replace('_', ' '):>14} "
                         f"{second.replace('_', ' '):>14} {'ratio':>7}")
            unit = "img/s" if kind == "training" else "img-steps/s"
            rows.append({"arch": arch, "kind": kind, "unit": unit, **best, "ratio": best[first] / best[second]})
            print_fn(f"{arch:<16} {kind:<10} {best[first]:>14.0f} {best[second]:>14.0f} "
                     f"{rows[-1]['ratio']:>6.2f}x  ({unit})")
    return rows


def thread_split(archs=("small_cnn_wide",), kinds=SPLIT_KINDS, cores: int = 2, batch: int = 256, steps: int = 10,
                 min_seconds: float = 3.0, rounds: int = 3, print_fn=print) -> list[dict]:
    """Throughput of ``cores`` jobs side by side at 1 thread each against one job with ``cores``
    threads, per job kind: the choice behind ``threads`` / ``threads_by_rule`` on a machine with
    that many cores. Each contender runs in its own processes, started once; the two layouts take
    turns for ``rounds`` rounds and the best round of each is kept."""
    return _compare_process_layouts(
        f"{cores} jobs x 1 thread against 1 job x {cores} threads (batch {batch}, {steps} attack steps, "
        f"best of {rounds} interleaved rounds of {min_seconds / rounds:.1f} s)",
        lambda kind, arch: {"side_by_side": [_JobKindProcess(kind, arch, batch, steps, 1) for _ in range(cores)],
                            "one_job": [_JobKindProcess(kind, arch, batch, steps, cores)]},
        archs, kinds, min_seconds, rounds, print_fn)


def allocator_effect(archs=("small_cnn_wide",), kinds=SPLIT_KINDS, threads: int = 1, batch: int = 256,
                     steps: int = 10, min_seconds: float = 3.0, rounds: int = 3, print_fn=print) -> list[dict]:
    """Throughput of each job kind with glibc keeping freed memory (``runtime.keep_freed_memory``,
    as every pipeline job runs) against glibc's default, each in its own process, taking turns."""
    return _compare_process_layouts(
        f"malloc keeping freed memory against glibc's default ({threads} thread(s), batch {batch}, {steps} "
        f"attack steps, best of {rounds} interleaved rounds of {min_seconds / rounds:.1f} s)",
        lambda kind, arch: {"kept": [_JobKindProcess(kind, arch, batch, steps, threads, keep_freed=True)],
                            "default": [_JobKindProcess(kind, arch, batch, steps, threads, keep_freed=False)]},
        archs, kinds, min_seconds, rounds, print_fn)


def top_operators(arch: str = "small_cnn_wide", kinds=SPLIT_KINDS, batch: int = 256, steps: int = 10,
                  calls: int = 3, n: int = 8, by_shape: bool = False, print_fn=print
                  ) -> dict[str, list[tuple[str, float]]]:
    """The torch profiler's ``n`` most expensive operators (self CPU time) of each job kind over
    ``calls`` calls after a warm-up, with their share of the kind's total self time. With
    ``by_shape`` each operator counts separately per input shapes (one line per layer), which
    shows which layer's convolution or element-wise pass costs the time."""
    import os

    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet Kineto's CUDA probe on machines without a GPU
    tops = {}
    for kind in kinds:
        work, _ = split_workload(kind, arch, batch, steps)
        work()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
            for _ in range(calls):
                work()
        events = [e for e in prof.key_averages(group_by_input_shape=by_shape) if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
        tops[kind] = [(_operator_label(e, by_shape), e.self_cpu_time_total / total) for e in ranked]
        per = ", per input shapes" if by_shape else ""
        print_fn(f"\n{arch} {kind}: top {n} operators by self CPU time{per} ({torch.get_num_threads()} threads, "
                 f"batch {batch}, {calls} calls)")
        for name, share in tops[kind]:
            print_fn(f"  {100 * share:5.1f}%  {name}")
    return tops


def _operator_label(event, by_shape: bool) -> str:
    if not by_shape:
        return event.key
    shapes = [list(shape) for shape in event.input_shapes if shape]  # scalars and options have none
    return f"{event.key} {shapes}"
