"""What every pipeline job does first: log to its log file, size its thread pool, pick a device."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def start_logging(log_path: str | Path | None) -> None:
    """Send logging and stderr (tqdm's progress bars) to ``log_path``; echo log lines to stdout."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_path, "a", buffering=1)
        sys.stderr = stream
        handlers.append(logging.StreamHandler(stream))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)


def start_job(log_path: str | Path | None, threads: int = 1, device: str = "auto"):
    """:func:`start_logging`, then use ``threads`` CPU threads and return the torch device."""
    import torch

    from notbugs.models import resolve_device

    start_logging(log_path)
    torch.set_num_threads(max(1, int(threads)))
    torch.set_flush_denormal(True)  # denormals make CPU attacks on robust models several times slower
    resolved = resolve_device(device)
    logging.getLogger("notbugs").info("device %s, %d CPU threads", resolved, torch.get_num_threads())
    return resolved
