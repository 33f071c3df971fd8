"""The ``notbugs`` command: ``notbugs inspect FILE.h5|model.pt [--grid out.png]``, ``notbugs bench``
and ``notbugs --version``."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from notbugs import __version__, hdf5


def describe(path: str) -> str:
    """Datasets, shapes, dtypes, provenance attributes and a class histogram of an artifact."""
    lines = [f"{path}"]
    with hdf5.open_artifact(path) as art:
        attrs = art.attrs
        lines.append(f"  kind: {art.kind}   format version: {attrs['format_version']}   "
                     f"notbugs {attrs['notbugs_version']}   created {attrs['created']}")
        lines.append(f"  source: {attrs['source']}")
        lines.append(f"  seed: {attrs['seed']}")
        extra = {k: v for k, v in attrs.items()
                 if k not in {"format", "format_version", "kind", "notbugs_version", "created", "source", "seed", "config"}}
        for key, value in sorted(extra.items()):
            lines.append(f"  {key}: {value}")
        lines.append(f"  config: {attrs['config']}")
        names = art.class_names
        for split_name in art.splits:
            split = art.split(split_name)
            lines.append(f"  /{split_name}  ({len(split)} rows)")
            for column in split.columns:
                ds = split[column]
                lines.append(f"    {column:<20} {str(ds.shape):<22} {ds.dtype}")
            counts = np.bincount(split.labels, minlength=len(names))
            hist = ", ".join(f"{name} {count}" for name, count in zip(names, counts))
            lines.append(f"    class histogram: {hist}")
            if art.kind == "evaluation":
                labels = split.labels
                clean = split["clean_pred"][:] == labels
                accuracies = [f"clean {100 * clean.mean():.2f}%"] + [
                    f"robust at eps {column.removeprefix('robust_pred_eps')} "
                    f"{100 * (clean & (split[column][:] == labels)).mean():.2f}%"
                    for column in split.columns if column.startswith("robust_pred_eps")]
                lines.append(f"    accuracy: {', '.join(accuracies)} (robust counts clean-correct examples only)")
    return "\n".join(lines)


def describe_checkpoint(path: str) -> str:
    """Architecture, classes, parameter count and provenance of a model checkpoint."""
    from notbugs.models import read_checkpoint
    payload = read_checkpoint(path)
    n_params = sum(v.numel() for k, v in payload["state_dict"].items() if not k.endswith(("running_mean",
                   "running_var", "num_batches_tracked", "normalize.mean", "normalize.std")))
    lines = [path, f"  checkpoint: {payload['format']}   arch: {payload['arch']}   classes: {payload['num_classes']}   "
                   f"parameters: {n_params:,}",
             f"  normalisation inside the model: mean {payload['mean']}  std {payload['std']}"]
    for key, value in sorted(payload.items()):
        if key not in {"format", "arch", "num_classes", "mean", "std", "state_dict"}:
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def inspect_command(args: argparse.Namespace) -> int:
    if args.file.endswith(".pt"):
        if args.grid:
            print("error: a checkpoint holds no images; --grid needs an HDF5 artifact", file=sys.stderr)
            return 2
        print(describe_checkpoint(args.file))
        return 0
    print(describe(args.file))
    if args.grid:
        from notbugs import plots
        with hdf5.open_artifact(args.file) as art:
            if art.kind in hdf5.IMAGELESS_KINDS:
                print(f"error: {args.file} is an {art.kind!r} artifact and holds no images", file=sys.stderr)
                return 2
            split_name = args.split or hdf5.KINDS[art.kind][0]
            split = art.split(split_name)
            n = min(args.n, len(split))
            plots.inspect_grid(split.images[:n], split.labels[:n], art.class_names, args.grid, n=n,
                               source=f"{args.file} /{split_name}")
        print(f"grid of {n} images written to {args.grid}")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    import torch

    from notbugs import bench
    from notbugs.runtime import keep_freed_memory
    keep_freed_memory()  # as every pipeline job runs (runtime.start_job)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stages:
        bench.print_stage_profile(args.stages)
        return 0
    if args.operators:
        for arch in args.arch:
            bench.top_operators(arch, batch=args.batch, steps=args.steps, n=args.top, by_shape=args.by_shape)
        return 0
    if args.split:
        bench.thread_split(archs=args.arch, cores=args.split, batch=args.batch, steps=args.steps,
                           min_seconds=args.seconds)
        return 0
    if args.allocator:
        bench.allocator_effect(archs=args.arch, threads=args.threads or 1, batch=args.batch, steps=args.steps,
                               min_seconds=args.seconds)
        return 0
    if args.memory:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            bench.peak_rss(args.memory, tmp)
        return 0
    bench.run(archs=args.arch, batch=args.batch, steps=args.steps, device=args.device,
              min_seconds=args.seconds)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="notbugs", description=__doc__)
    parser.add_argument("--version", action="version", version=f"notbugs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="describe an HDF5 artifact (optionally save an image grid) or a model.pt")
    p.add_argument("file")
    p.add_argument("--grid", metavar="PNG", help="save a labelled image grid here")
    p.add_argument("--split", help="split to show in the grid (default: the first)")
    p.add_argument("-n", type=int, default=32, help="images in the grid (default 32)")
    p.set_defaults(func=inspect_command)
    b = sub.add_parser("bench", help="attack and training throughput against reference implementations")
    b.add_argument("--arch", nargs="+", default=["small_cnn", "resnet18"])
    b.add_argument("--batch", type=int, default=256)
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--device", default="cpu")
    b.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    b.add_argument("--seconds", type=float, default=3.0, help="minimum timing per measurement")
    b.add_argument("--memory", type=int, metavar="N", default=0,
                   help="instead: peak RSS of a construction and of training over N and 4N images")
    b.add_argument("--operators", action="store_true",
                   help="instead: the torch profiler's top operators of each job kind")
    b.add_argument("--by-shape", action="store_true",
                   help="with --operators: count each operator per input shapes, i.e. per layer")
    b.add_argument("--top", type=int, default=8, metavar="N", help="with --operators: how many to list (default 8)")
    b.add_argument("--split", type=int, metavar="CORES", default=0,
                   help="instead: CORES jobs x 1 thread against 1 job x CORES threads, per job kind")
    b.add_argument("--allocator", action="store_true",
                   help="instead: each job kind with malloc keeping freed memory (as pipeline jobs) against glibc's default")
    b.add_argument("--stages", metavar="DIR",
                   help="instead: sum a pipeline run's Snakemake benchmark files by rule (e.g. benchmarks/cifar10)")
    b.set_defaults(func=bench_command)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (hdf5.ArtifactError, ValueError) as exc:  # ValueError: CheckpointError and friends
        print(f"notbugs: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
