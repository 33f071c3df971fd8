# notbugs: "Adversarial Examples Are Not Bugs, They Are Features", as a pipeline.
# Stages: data -> train (sources) -> construct -> train (targets) -> evaluate -> tables -> plot.
import os
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

# The rules run the library that ships with this workflow (src/notbugs), installed or not: jobs
# in an environment built from envs/notbugs.yaml (--sdm conda), which holds only the
# dependencies, find it through PYTHONPATH, and so do SLURM jobs, which inherit it.
NOTBUGS_SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, NOTBUGS_SRC)
os.environ.update(PYTHONPATH=os.pathsep.join([NOTBUGS_SRC] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/construct.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/plot.smk"
include: "workflow/rules/studies.smk"


rule all:
    input:
        final_outputs(),
    default_target: True


onsuccess:
    summary = Path(f"{RESULTS}/summary.md")
    if summary.exists():
        print(summary.read_text())
        print(f"(written to {summary}; the figures are in {RESULTS}/figures/, the report: snakemake --report report.html)")
