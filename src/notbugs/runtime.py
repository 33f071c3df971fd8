"""What every pipeline job sets up: logging to its log file, its thread pool, its device; and the
one way notbugs writes a file so that nothing half-written appears under a finished name."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator


def start_logging(log_path: str | Path | None, prefix: str = "") -> None:
    """Send logging and stderr (tqdm's progress bars) to ``log_path``; echo log lines to stdout.
    ``prefix`` starts every line (e.g. the rank of a distributed job)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_path, "a", buffering=1)
        sys.stderr = stream
        handlers.append(logging.StreamHandler(stream))
    logging.basicConfig(level=logging.INFO, format=(prefix + " " if prefix else "") + "%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)


def resolve_device(name: str = "auto"):
    """``auto`` is CUDA when present, else CPU; an explicit CUDA device must exist."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
    return torch.device(name)


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bfloat16 arithmetic


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no such file)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def native_bf16(device, flags: set[str] | None = None) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CUDA GPU that supports it, or a CPU
    with AMX or AVX-512 BF16. Elsewhere torch emulates bfloat16, and on an AVX2-only CPU autocast
    made training 10-16x slower than float32 (docs/performance.md)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":  # is_bf16_supported() also counts emulation on pre-Ampere GPUs
        return torch.cuda.get_device_capability(device)[0] >= 8
    return bool((cpu_flags() if flags is None else flags) & set(CPU_BF16_FLAGS))


def resolve_precision(precision: str, device, flags: set[str] | None = None) -> str:
    """``auto`` is bfloat16 where ``device`` has it natively, else float32. An explicit bfloat16
    on a device without it is kept (the results are the same, only slower), with a warning."""
    if precision == "auto":
        return "bfloat16" if native_bf16(device, flags) else "float32"
    if precision == "bfloat16" and not native_bf16(device, flags):
        logging.getLogger(__name__).warning(
            "precision bfloat16 on %s, which has no native bfloat16 (no AMX or AVX-512 BF16): torch emulates it, "
            "many times slower than float32; precision: auto would choose float32 here", device)
    return precision


def start_job(log_path: str | Path | None, threads: int = 1, device: str = "auto", prefix: str = ""):
    """:func:`start_logging`, then use ``threads`` CPU threads and return the torch device."""
    import torch

    start_logging(log_path, prefix)
    keep_freed_memory()
    torch.set_num_threads(max(1, int(threads)))
    torch.set_flush_denormal(True)  # denormals make CPU attacks on robust models several times slower
    resolved = resolve_device(device)
    logging.getLogger("notbugs").info("device %s, %d CPU threads", resolved, torch.get_num_threads())
    return resolved


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of returning it to the kernel.
    An attack frees and reallocates activation-sized CPU buffers at every step; by default glibc
    serves large ones with fresh mappings, and a 10-step attack on a batch of 256 then took about
    155,000 page faults per call and ran 15% slower (docs/performance.md). Results are unchanged:
    only where the memory comes from differs. Returns False where it does not apply (not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so that the ranks of a distributed
    job do not outlive a killed job and race its rerun. Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def partial_path(path: str | Path) -> Path:
    """Where a file is written before it is complete."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on any error
    (or interrupt) remove it. A reader never sees a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
