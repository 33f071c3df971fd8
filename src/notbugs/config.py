"""Config validation: the JSON schema (with defaults) plus the cross-references a schema cannot
express. Errors name the offending key as a dotted path, e.g. ``constructions.d_det.eps``."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Mapping

import yaml

ORIGINAL_SET = "d"  # the unmodified training set, as a train_sets entry
MODEL_METHODS = ("inversion", "pgd")


class ConfigError(ValueError):
    pass


def _dotted(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def validate_config(config: dict, schema_path: str | Path) -> dict:
    """Validate ``config`` in place with Snakemake's validator (which fills defaults), then check
    references between sections. Raises :class:`ConfigError` naming the key."""
    import jsonschema
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    schema_path = Path(schema_path).resolve()
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
    check_references(config)
    return config


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
    for i, train_set in enumerate(config["targets"]["train_sets"]):
        if train_set != ORIGINAL_SET and train_set not in constructions:
            raise ConfigError(f"config key 'targets.train_sets.{i}': {train_set!r} is neither "
                              f"'{ORIGINAL_SET}' nor a construction ({sorted(constructions)})")


def load_config(path: str | Path, schema_path: str | Path) -> dict:
    """Read a YAML config file and validate it (for tools outside Snakemake)."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    return validate_config(copy.deepcopy(config), schema_path)
