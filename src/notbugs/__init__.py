"""notbugs: robust and non-robust features, reproduced as a Snakemake pipeline."""

__version__ = "0.1.0"
