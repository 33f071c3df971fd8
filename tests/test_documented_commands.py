"""Every Snakemake command that README.md, docs/ and the presets' comments show, run as a dry run
(`-n`) exactly as written, in a scratch copy of the repository's layout. Placeholders are filled
the way a reader would fill them (a config file `my.yaml`, a JPEG-copy override pointing at an
ImageFolder tree the test makes, a tiny ImageNet tree for `/path/to/imagenet`). Commands that need a finished run (`--report`) or the README's
first command (which CI runs for real) are left to those runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import REPO, SNAKEMAKE, make_imagenet_tree

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def _bash_commands(text: str) -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split("  #")[0].strip() for line in joined.splitlines()]
    return [c for c in commands if c and not c.startswith("#")]


def _comment_commands(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^#\s+(\.venv/bin/snakemake .*)$", text, re.M)]


def documented_snakemake_commands() -> list[tuple[str, str]]:
    found, previous = [], ""
    for path in DOCS:
        for command in _bash_commands(path.read_text()):
            if command.startswith("..."):  # "the same command, plus ..."
                command = previous + command[3:]
            if "snakemake" in command.split()[0] or command.startswith("time .venv/bin/snakemake"):
                previous = command
                found.append((path.name, command))
    for path in PRESETS:
        found += [(path.name, c) for c in _comment_commands(path.read_text())]
    return found


COMMANDS = documented_snakemake_commands()


def _scratch(tmp_path: Path) -> Path:
    """The repository's layout (symlinked) plus what readers create themselves."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("Snakefile", "workflow", "configs", "profiles", "config.yaml"):
        (work / name).symlink_to(REPO / name)
    jpeg = tmp_path / "cifar10-jpeg"
    for split in ("train", "test"):
        for c in range(10):
            (jpeg / split / f"class{c}").mkdir(parents=True)
    (work / "cifar10-jpeg.yaml").write_text(yaml.safe_dump({"dataset": {"source": "imagefolder", "root": str(jpeg)}}))
    mine = yaml.safe_load((REPO / "config.yaml").read_text())
    mine["dataset"] = {"name": "cifar10jpeg", "source": "imagefolder", "root": str(jpeg), "n_train": 1000,
                       "n_test": 500, "n_val": 100}
    (work / "my.yaml").write_text(yaml.safe_dump(mine))
    (work / "epochs15.yaml").write_text(yaml.safe_dump({"targets": {"train": {"epochs": 15}}}))
    make_imagenet_tree(tmp_path / "imagenet", per_wnid={"train": 1, "val": 1})
    return work


def test_the_docs_show_snakemake_commands():
    assert len(COMMANDS) >= 15, COMMANDS


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}:{i}" for i, (w, _) in enumerate(COMMANDS)])
def test_documented_command_plans_without_error(where, command, tmp_path):
    if "--report" in command:
        pytest.skip("a report needs a finished run (tests/test_default_pipeline.py builds one)")
    if "pip install" in command:
        pytest.skip("the README's first command: CI runs it for real (.ci/run)")
    work = _scratch(tmp_path)
    command = command.removeprefix("time ")
    command = command.replace(".venv/bin/snakemake", SNAKEMAKE).replace("/path/to/notbugs/Snakefile", "Snakefile")
    command = command.replace("<target>", "results/cifar10jpeg/data.h5")  # the dataset my.yaml names
    command = command.replace("/path/to/imagenet", str(tmp_path / "imagenet"))
    if " -- " in command:  # targets after "--": the dry-run flag goes before them
        head, tail = command.split(" -- ", 1)
        command = f"{head} -n -- {tail}"
    else:
        command += " -n"
    result = subprocess.run(["bash", "-c", command], cwd=work, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{where}: {command}\n{output[-3000:]}"
    assert "Job stats" in output or "Nothing to be done" in output, output[-2000:]
