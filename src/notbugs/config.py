"""Config validation: the JSON schema (with defaults) plus the cross-references a schema cannot
express. Errors name the offending key as a dotted path, e.g. ``constructions.d_det.eps``."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Mapping

import yaml

ORIGINAL_SET = "d"  # the unmodified training set, as a train_sets entry
MODEL_METHODS = ("inversion", "pgd", "nontransferable", "relabel")
LINEAR_SOURCE = "linear_robust"    # robust_leakage study
RELABEL_SOURCE = "brief"           # rebuttals study: the briefly trained model that relabels
RELABEL_SET = "d_relabel"


class ConfigError(ValueError):
    pass


def _dotted(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def validate_config(config: dict, schema_path: str | Path) -> dict:
    """Validate ``config`` in place with Snakemake's validator (which fills defaults), then check
    references between sections. Raises :class:`ConfigError` naming the key."""
    schema_path = Path(schema_path).resolve()
    _validate_with_schema(config, schema_path)
    if expand_studies(config):
        _validate_with_schema(config, schema_path)  # fills the defaults of what the studies added
    check_references(config)
    return config


def _validate_with_schema(config: dict, schema_path: Path) -> None:
    import jsonschema
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    try:
        validate(config, str(schema_path), set_default=True)
        # The validator inserts the schema's default objects without copying them, so sections
        # would share one dict; give every section its own (deepcopy would keep the aliasing).
        config.update(json.loads(json.dumps(config)))
    except WorkflowError as exc:
        schema = yaml.safe_load(schema_path.read_text())
        validator = jsonschema.Draft202012Validator(schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(config))
        if error is None:
            raise ConfigError(str(exc)) from exc
        path = list(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            # name the unknown key itself, not just the object that contains it
            unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            if unknown:
                path.append(",".join(map(str, unknown)))
        key = _dotted(path)
        raise ConfigError(f"config key '{key}': {error.message}") from None


def fresh_sources(k: int) -> list[str]:
    return [f"fresh_{i}" for i in range(1, k + 1)]


def nontransferable_set(construction: str) -> str:
    return f"{construction}_nontransferable"


def _add(section: dict, section_name: str, name: str, value) -> None:
    if name in section and section[name] != value:
        raise ConfigError(f"config key '{section_name}.{name}': the name is reserved for an enabled study "
                          "(rename your entry or disable the study)")
    section[name] = value


def _pgd_construction(config: Mapping, study: str) -> tuple[str, dict]:
    name = config["studies"][study]["construction"]
    cons = config["constructions"].get(name)
    if cons is None or cons["method"] != "pgd":
        raise ConfigError(f"config key 'studies.{study}.construction': {name!r} is not a pgd construction "
                          f"(constructions: {sorted(config['constructions'])})")
    return name, cons


def expand_studies(config: dict) -> bool:
    """Add what each enabled study needs: sources, constructions and training sets.
    Returns whether anything was added (the additions still need their defaults filled)."""
    studies = config.get("studies", {})
    sources, constructions = config["sources"], config["constructions"]
    train_sets = config["targets"]["train_sets"]
    before = json.dumps([sources, constructions, train_sets], sort_keys=True)

    def want_train_set(name):
        if name not in train_sets:
            train_sets.append(name)

    if studies.get("transfer", {}).get("enabled"):
        name, _ = _pgd_construction(config, "transfer")
        want_train_set(ORIGINAL_SET)
        want_train_set(name)
    if studies.get("robust_leakage", {}).get("enabled"):
        study = studies["robust_leakage"]
        eps = study["eps"]
        _add(sources, "sources", LINEAR_SOURCE, {"arch": "linear", "train": {
            "epochs": study["linear_epochs"], "lr": study["linear_lr"],
            "adversarial": {"norm": "l2", "eps": eps, "steps": 5, "step_size": 2.5 * eps / 5}}})
        for i, cons in enumerate(study["constructions"]):
            if cons not in constructions:
                raise ConfigError(f"config key 'studies.robust_leakage.constructions.{i}': no construction {cons!r}")
    if studies.get("rebuttals", {}).get("enabled"):
        study = studies["rebuttals"]
        name, cons = _pgd_construction(config, "rebuttals")
        base = sources[cons["source"]]
        fresh = fresh_sources(study["fresh_models"] + 1)  # the last one judges, it is not in the ensemble
        for i, fresh_name in enumerate(fresh, start=1):
            _add(sources, "sources", fresh_name, {**copy.deepcopy(base), "seed": config["seed"] + 1000 + i})
        _add(constructions, "constructions", nontransferable_set(name), {
            **{k: v for k, v in cons.items() if k in ("target", "eps", "steps", "step_size", "keep_best")},
            "method": "nontransferable", "source": cons["source"], "ensemble": fresh[:-1],
            "ensemble_weight": study["ensemble_weight"]})
        _add(sources, "sources", RELABEL_SOURCE,
             {**copy.deepcopy(base), "train": {**base["train"], "epochs": study["relabel_epochs"]}})
        _add(constructions, "constructions", RELABEL_SET, {"method": "relabel", "source": RELABEL_SOURCE})
        want_train_set(name)
        want_train_set(nontransferable_set(name))
        want_train_set(RELABEL_SET)
    return json.dumps([sources, constructions, train_sets], sort_keys=True) != before


def check_references(config: Mapping) -> None:
    sources = config["sources"]
    constructions = config["constructions"]
    for name, cons in constructions.items():
        if cons["method"] in MODEL_METHODS:
            if "source" not in cons:
                raise ConfigError(f"config key 'constructions.{name}.source': method "
                                  f"{cons['method']!r} needs a source model")
            if cons["source"] not in sources:
                raise ConfigError(f"config key 'constructions.{name}.source': no source named "
                                  f"{cons['source']!r} (sources: {sorted(sources)})")
        for i, member in enumerate(cons.get("ensemble", [])):
            if member not in sources:
                raise ConfigError(f"config key 'constructions.{name}.ensemble.{i}': no source named {member!r}")
        if cons["method"] == "nontransferable" and not cons.get("ensemble"):
            raise ConfigError(f"config key 'constructions.{name}.ensemble': method 'nontransferable' needs "
                              "at least one independently trained source model")
    for i, train_set in enumerate(config["targets"]["train_sets"]):
        if train_set != ORIGINAL_SET and train_set not in constructions:
            raise ConfigError(f"config key 'targets.train_sets.{i}': {train_set!r} is neither "
                              f"'{ORIGINAL_SET}' nor a construction ({sorted(constructions)})")


def load_config(path: str | Path, schema_path: str | Path) -> dict:
    """Read a YAML config file and validate it (for tools outside Snakemake)."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    return validate_config(copy.deepcopy(config), schema_path)
