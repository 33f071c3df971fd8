"""Config validation: the JSON schema (``config.schema.yaml`` beside this module, the one home of
every default) plus the cross-references a schema cannot express. Errors name the offending key
as a dotted path, e.g. ``constructions.d_det.eps``.

Library code indexes configs strictly; whoever builds a config (Snakemake, the tests, the bench)
passes it through :func:`validate_config` or, for one section, :func:`complete`.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
from pathlib import Path
from typing import Mapping

import yaml

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
ORIGINAL_SET = "d"  # the unmodified training set, as a train_sets entry
LINEAR_SOURCE = "linear_robust"    # robust_leakage study
RELABEL_SOURCE = "brief"           # rebuttals study: the briefly trained model that relabels
RELABEL_SET = "d_relabel"
TARGETED_ATTACK_METHODS = ("pgd", "nontransferable")  # pinned to construct.METHODS by a test
RESTRICTED_IMAGENET_CLASSES = 9  # len(data.RESTRICTED_IMAGENET_RANGES), pinned by a test (data imports torch)


class ConfigError(ValueError):
    pass


def _dotted(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


@functools.lru_cache(maxsize=4)
def _load_schema(path: str) -> dict:
    return yaml.safe_load(Path(path).read_text())


def schema(schema_path: str | Path | None = None) -> dict:
    """The config schema (a fresh copy)."""
    return copy.deepcopy(_load_schema(str(Path(schema_path or SCHEMA_PATH).resolve())))


def _filling_validator(schema_doc: dict):
    """A Draft 2020-12 validator that also inserts each missing property's ``default`` (a copy)
    into objects, including objects it has just inserted, and never into null or other types."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    check_properties = base.VALIDATORS["properties"]

    def properties_with_defaults(validator, properties, instance, subschema):
        if validator.is_type(instance, "object"):
            for name, prop in properties.items():
                if "default" in prop and name not in instance:
                    instance[name] = copy.deepcopy(prop["default"])
        yield from check_properties(validator, properties, instance, subschema)

    return jsonschema.validators.extend(base, {"properties": properties_with_defaults})(schema_doc)


_SCALAR_TYPES = {"integer": int, "number": (int, float), "boolean": bool}


def _coerce_command_line_scalars(instance, errors) -> bool:
    """Snakemake's ``--config key='{a: 100}'`` hands nested values over as strings ('100'): read
    such a string as YAML where the schema wants a number or a boolean and the YAML value is one.
    Returns whether anything changed."""
    changed = False
    for error in errors:
        wanted = error.validator_value if error.validator == "type" else None
        wanted = [wanted] if isinstance(wanted, str) else (wanted or [])
        if not isinstance(error.instance, str) or not any(t in _SCALAR_TYPES or t == "null" for t in wanted):
            continue
        try:
            value = yaml.safe_load(error.instance)
        except yaml.YAMLError:
            continue
        if isinstance(value, str) and "number" in wanted:
            try:  # YAML 1.1 reads '1e-3' (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if (value is None and "null" in wanted) or any(
                isinstance(value, _SCALAR_TYPES[t]) and not (t != "boolean" and isinstance(value, bool))
                for t in wanted if t in _SCALAR_TYPES):
            parent = instance
            for key in list(error.absolute_path)[:-1]:
                parent = parent[key]
            parent[list(error.absolute_path)[-1]] = value
            changed = True
    return changed


def _fill_and_check(instance, schema_doc: dict, key_prefix: tuple = ()) -> None:
    import jsonschema

    validator = _filling_validator(schema_doc)
    while _coerce_command_line_scalars(instance, list(validator.iter_errors(instance))):
        pass
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is None:
        return
    path = [*key_prefix, *error.absolute_path]
    if error.validator == "required" and isinstance(error.instance, dict):
        path.append(next(name for name in error.validator_value if name not in error.instance))
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        # name the unknown key itself, not just the object that contains it
        unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        if unknown:
            path.append(",".join(map(str, unknown)))
    raise ConfigError(f"config key '{_dotted(path)}': {error.message}")


def validate_config(config: dict, schema_path: str | Path | None = None) -> dict:
    """Validate ``config`` in place, filling the schema's defaults, then check references
    between sections. Raises :class:`ConfigError` naming the key."""
    schema_doc = schema(schema_path)
    _fill_and_check(config, schema_doc)
    if expand_studies(config):
        _fill_and_check(config, schema_doc)  # fills the defaults of what the studies added
    check_references(config)
    check_dataset(config["dataset"])
    check_image_size(config)
    return config


def _subschema(schema_doc: dict, section: str) -> dict:
    node = schema_doc
    for part in section.split("."):
        while "$ref" in node:
            node = schema_doc["$defs"][node["$ref"].rsplit("/", 1)[1]]
        if part in node.get("properties", {}):
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            raise KeyError(f"the config schema has no key {section!r}")
    return {**node, "$defs": schema_doc["$defs"]}


def complete(section: str, value: Mapping | None = None) -> dict:
    """One config section (a dotted key such as ``targets.train``, ``fast_paths`` or
    ``constructions.<any name>``) with every schema default filled in, validated."""
    filled = copy.deepcopy(dict(value or {}))
    _fill_and_check(filled, _subschema(schema(), section), tuple(section.split(".")))
    return filled


def fresh_sources(k: int) -> list[str]:
    return [f"fresh_{i}" for i in range(1, k + 1)]


def nontransferable_set(construction: str) -> str:
    return f"{construction}_nontransferable"


def _add(section: dict, section_name: str, name: str, value) -> None:
    if name in section and section[name] != value:
        raise ConfigError(f"config key '{section_name}.{name}': the name is reserved for an enabled study "
                          "(rename your entry or disable the study)")
    section[name] = value


def rebuttal_sets(config: Mapping) -> list[str]:
    """The rebuttals study's plain pgd set and its non-transferable version. The non-transferable
    attack fools one source, so a construction that attacks an ensemble gets a one-source copy
    (``<name>_one_source``) as its plain set: the two then differ in transferability alone."""
    name = config["studies"]["rebuttals"]["construction"]
    plain = f"{name}_one_source" if config["constructions"].get(name, {}).get("ensemble") else name
    return [plain, nontransferable_set(name)]


def _pgd_construction(config: Mapping, study: str) -> tuple[str, dict]:
    name = config["studies"][study]["construction"]
    cons = config["constructions"].get(name)
    if cons is None or cons["method"] != "pgd":
        raise ConfigError(f"config key 'studies.{study}.construction': {name!r} is not a pgd construction "
                          f"(constructions: {sorted(config['constructions'])})")
    if "drop_read_as_target_by" in cons:  # the studies replay or rebuild the attack on every row
        raise ConfigError(f"config key 'studies.{study}.construction': {name!r} drops the rows a robust model "
                          "reads as t, which the study's replayed attack cannot; name a pgd set without "
                          "drop_read_as_target_by")
    return name, cons


def expand_studies(config: dict) -> bool:
    """Add what each enabled study needs: sources, constructions and training sets.
    Returns whether anything was added (the additions still need their defaults filled)."""
    studies = config["studies"]
    sources, constructions = config["sources"], config["constructions"]
    train_sets = config["targets"]["train_sets"]
    before = json.dumps([sources, constructions, train_sets], sort_keys=True)

    def want_train_set(name):
        if name not in train_sets:
            train_sets.append(name)

    if studies["transfer"]["enabled"]:
        name, _ = _pgd_construction(config, "transfer")
        want_train_set(ORIGINAL_SET)
        want_train_set(name)
    if studies["robust_leakage"]["enabled"]:
        study = studies["robust_leakage"]
        eps = study["eps"]
        _add(sources, "sources", LINEAR_SOURCE, {"arch": "linear", "train": {
            "epochs": study["linear_epochs"], "lr": study["linear_lr"],
            "adversarial": {"norm": "l2", "eps": eps, "steps": 5, "step_size": 2.5 * eps / 5}}})
        for i, cons in enumerate(study["constructions"]):
            if cons not in constructions:
                raise ConfigError(f"config key 'studies.robust_leakage.constructions.{i}': no construction {cons!r}")
    if studies["rebuttals"]["enabled"]:
        study = studies["rebuttals"]
        name, cons = _pgd_construction(config, "rebuttals")
        plain = rebuttal_sets(config)[0]
        if plain != name:  # the non-transferable set attacks one source, so its plain twin does too
            _add(constructions, "constructions", plain, {k: v for k, v in cons.items() if k != "ensemble"})
        base = sources[cons["source"]]
        fresh = fresh_sources(study["fresh_models"] + 1)  # the last one judges, it is not in the ensemble
        for i, fresh_name in enumerate(fresh, start=1):
            copy_of_base = {k: v for k, v in copy.deepcopy(base).items() if k != "seed_offset"}
            _add(sources, "sources", fresh_name, {**copy_of_base, "seed": config["seed"] + 1000 + i})
        _add(constructions, "constructions", nontransferable_set(name), {
            **{k: v for k, v in cons.items() if k in ("target", "eps", "steps", "step_size", "keep_best", "keep")},
            "method": "nontransferable", "source": cons["source"], "ensemble": fresh[:-1],
            "ensemble_weight": study["ensemble_weight"]})
        _add(sources, "sources", RELABEL_SOURCE,
             {**copy.deepcopy(base), "train": {**base["train"], "epochs": study["relabel_epochs"]}})
        _add(constructions, "constructions", RELABEL_SET, {"method": "relabel", "source": RELABEL_SOURCE})
        want_train_set(plain)
        want_train_set(nontransferable_set(name))
        want_train_set(RELABEL_SET)
    return json.dumps([sources, constructions, train_sets], sort_keys=True) != before


def natural_classes(dataset: Mapping) -> int | None:
    """The class count of a natural dataset, where it is known before loading: CIFAR-10's ten,
    Restricted ImageNet's nine super-classes, an ImageFolder's class folders (None if its root is
    unreadable, and for synthetic data, whose draws need no balancing)."""
    if dataset["source"] == "synthetic":
        return None
    if dataset["source"] == "cifar10":
        return 10
    if dataset["source"] == "restricted_imagenet":
        return RESTRICTED_IMAGENET_CLASSES
    train = Path(dataset["root"]) / "train"
    return sum(1 for p in train.iterdir() if p.is_dir()) if train.is_dir() else None


def check_dataset(dataset: Mapping) -> None:
    """What would otherwise fail only when prepare_data runs (on a cluster, after queueing)."""
    if dataset["n_extra_train"] and dataset["source"] == "restricted_imagenet":
        raise ConfigError("config key 'dataset.n_extra_train': restricted_imagenet streams its training split "
                          "and has no extra_train split; set n_train instead")
    if dataset["source"] == "imagefolder":
        for split in ("train", "test"):
            if not (Path(dataset["root"]) / split).is_dir():
                raise ConfigError(f"config key 'dataset.root': {Path(dataset['root']).resolve() / split} is not a "
                                  "directory; an imagefolder root holds train/<class>/* and test/<class>/*")
    if dataset["source"] == "restricted_imagenet":
        for split in ("train", "val"):
            if not (Path(dataset["root"]) / split).is_dir():
                raise ConfigError(f"config key 'dataset.root': {Path(dataset['root']).resolve() / split} is not a "
                                  "directory; a restricted_imagenet root is an ImageNet tree holding "
                                  "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
        settings = dataset["restricted_imagenet"]
        if settings["resize"] < settings["resolution"]:
            raise ConfigError(f"config key 'dataset.restricted_imagenet.resize': {settings['resize']} is smaller "
                              f"than resolution {settings['resolution']}; the shorter side is resized to `resize` "
                              "before a centre crop of `resolution`")
    n_classes = natural_classes(dataset)
    for key in ("n_train", "n_test", "n_val", "n_extra_train"):
        if n_classes and dataset[key] and dataset[key] % n_classes:
            raise ConfigError(f"config key 'dataset.{key}': {dataset[key]} is not a multiple of the {n_classes} "
                              "classes; subsets are class-balanced")


PIXEL_ARCHS = ("mlp", "linear")  # models with a fixed 3x32x32 input (notbugs.models.PIXELS)


def image_side(dataset: Mapping) -> int | None:
    """The side of the data's square images where it is known before loading."""
    if dataset["source"] == "restricted_imagenet":
        return dataset["restricted_imagenet"]["resolution"]
    return None if dataset["source"] == "imagefolder" else 32


def check_image_size(config: Mapping) -> None:
    """Models on raw pixels take 32x32 images only: refuse them (also where a study adds them:
    Goh's robust-leakage study trains a linear model, the transfer study an mlp) on larger data."""
    side = image_side(config["dataset"])
    if side in (None, 32):
        return
    uses = [(f"sources.{name}.arch", src["arch"]) for name, src in config["sources"].items()]
    uses += [(f"targets.archs.{i}", arch) for i, arch in enumerate(config["targets"]["archs"])]
    transfer = config["studies"]["transfer"]
    if transfer["enabled"]:
        uses += [(f"studies.transfer.archs.{i}", arch) for i, arch in enumerate(transfer["archs"])]
    for key, arch in uses:
        if arch in PIXEL_ARCHS:
            added = " (added by studies.robust_leakage)" if key == f"sources.{LINEAR_SOURCE}.arch" else ""
            raise ConfigError(f"config key '{key}': {arch!r}{added} takes 3x32x32 images, and this data set's "
                              f"images are {side}x{side} (dataset.restricted_imagenet.resolution)")


def attack_repeated_by(constructions: Mapping, name: str) -> str | None:
    """The construction whose attack ``name`` repeats: for a set with ``drop_read_as_target_by``,
    another construction with every other setting the same. Its rows are those ``name`` would
    attack again, so ``name`` judges them instead (the workflow makes it an input)."""
    settings = constructions[name]
    if "drop_read_as_target_by" not in settings:
        return None
    attack = {key: value for key, value in settings.items() if key != "drop_read_as_target_by"}
    return next((other for other, cons in constructions.items() if other != name and cons == attack), None)


def source_seed(config: Mapping, name: str) -> int:
    """The seed source ``name`` trains with: its own ``seed``, or the run's plus its ``seed_offset``."""
    source = config["sources"][name]
    return source["seed"] if "seed" in source else config["seed"] + source.get("seed_offset", 0)


def check_references(config: Mapping) -> None:
    sources = config["sources"]
    for name, source in sources.items():
        if "seed" in source and "seed_offset" in source:
            raise ConfigError(f"config key 'sources.{name}.seed_offset': give seed or seed_offset, not both")
        if source["use_extra_train"] and not config["dataset"]["n_extra_train"]:
            raise ConfigError(f"config key 'sources.{name}.use_extra_train': the data has no extra_train split; "
                              "set dataset.n_extra_train to the number of extra training images")
        if source["use_extra_train"] and source["train"]["loader"] == "stream":
            raise ConfigError(f"config key 'sources.{name}.use_extra_train': the extra images are read into "
                              "memory with the subset, so it does not go with train.loader: stream")
    constructions = config["constructions"]
    for name, cons in constructions.items():
        # The schema says which methods need a source and an ensemble; here only the names are checked.
        if "source" in cons and cons["source"] not in sources:
            raise ConfigError(f"config key 'constructions.{name}.source': no source named "
                              f"{cons['source']!r} (sources: {sorted(sources)})")
        judge = cons.get("drop_read_as_target_by")
        if judge is not None and judge not in sources:
            raise ConfigError(f"config key 'constructions.{name}.drop_read_as_target_by': no source named "
                              f"{judge!r} (sources: {sorted(sources)})")
        if judge is not None and (judge == cons.get("source") or judge in cons.get("ensemble", [])):
            raise ConfigError(f"config key 'constructions.{name}.drop_read_as_target_by': {judge!r} is a model the "
                              "attack itself turns towards t; name another (robust) source")
        for i, member in enumerate(cons.get("ensemble", [])):
            if member not in sources:
                raise ConfigError(f"config key 'constructions.{name}.ensemble.{i}': no source named {member!r}")
            if member == cons.get("source"):
                raise ConfigError(f"config key 'constructions.{name}.ensemble.{i}': {member!r} is the "
                                  "construction's source already; the ensemble lists the other models")
    for i, train_set in enumerate(config["targets"]["train_sets"]):
        if train_set != ORIGINAL_SET and train_set not in constructions:
            raise ConfigError(f"config key 'targets.train_sets.{i}': {train_set!r} is neither "
                              f"'{ORIGINAL_SET}' nor a construction ({sorted(constructions)})")
    for name, cons in constructions.items():
        twin = cons.get("twin_of")
        if twin is None:
            continue
        if cons["method"] == "blend":
            if twin not in constructions or constructions[twin]["method"] != "inversion" \
                    or constructions[twin]["start"] != "image":
                raise ConfigError(f"config key 'constructions.{name}.twin_of': {twin!r} is not an inversion that "
                                  f"starts from images (constructions: {sorted(constructions)})")
            continue
        if cons["method"] == "jpeg":
            chain = [name]
            while twin in constructions and twin not in chain and constructions[twin]["method"] == "jpeg":
                chain.append(twin)
                twin = constructions[twin]["twin_of"]
            if twin not in constructions or twin in chain:
                raise ConfigError(f"config key 'constructions.{name}.twin_of': {cons['twin_of']!r} does not lead "
                                  f"to another construction ({' -> '.join(chain + [twin])}; constructions: "
                                  f"{sorted(constructions)})")
            continue
        if twin not in constructions or constructions[twin]["method"] not in TARGETED_ATTACK_METHODS:
            raise ConfigError(f"config key 'constructions.{name}.twin_of': {twin!r} is not a targeted-attack "
                              f"construction (constructions: {sorted(constructions)})")
        if cons["eps"] != constructions[twin]["eps"]:
            raise ConfigError(f"config key 'constructions.{name}.eps': {cons['eps']} differs from its twin {twin!r} "
                              f"({constructions[twin]['eps']}); a control at another eps controls nothing")
    check = config["robust_leakage_check"]
    if check is not None and check not in sources:
        raise ConfigError(f"config key 'robust_leakage_check': no source named {check!r} (sources: {sorted(sources)})")
    train_sets = config["targets"]["train_sets"]
    for key in ("epochs_by_set", "augment_by_set"):
        for train_set in config["targets"][key]:
            if train_set not in train_sets:
                raise ConfigError(f"config key 'targets.{key}.{train_set}': not one of targets.train_sets "
                                  f"({train_sets})")
    for i, comparison in enumerate(config["comparisons"]):
        pair = (comparison["better"], comparison["worse"])
        for key, by_set in (("epochs", "epochs_by_set"), ("augment", "augment_by_set")):
            recipes = {s: _effective(key, target_train_config(config, s)[key]) for s in pair}
            if recipes[pair[0]] != recipes[pair[1]]:
                raise ConfigError(f"config key 'comparisons.{i}': {pair[0]} and {pair[1]} train with different "
                                  f"{key} ({recipes}, targets.{by_set}); a claim and its control need the same recipe")
        radii = {constructions[s]["eps"] for s in (comparison["better"], comparison["worse"])
                 if s in constructions and "eps" in constructions[s]}
        if len(radii) > 1:
            raise ConfigError(f"config key 'comparisons.{i}': {comparison['better']} and {comparison['worse']} are "
                              f"built at different eps ({sorted(radii)}); compare sets at the same eps")
        for side in ("better", "worse"):
            if comparison[side] not in train_sets:
                raise ConfigError(f"config key 'comparisons.{i}.{side}': {comparison[side]!r} is not one of "
                                  f"targets.train_sets ({train_sets})")
    evaluation = config["evaluation"]
    if evaluation["restarts"] > 1 and not evaluation["random_start"]:
        raise ConfigError(f"config key 'evaluation.restarts': {evaluation['restarts']} restarts without "
                          "evaluation.random_start would repeat the same attack; set random_start: true or restarts: 1")
    for key, uses in (("attack", evaluation["attack"] == "autoattack"),
                      ("figure2_autoattack", evaluation["figure2_autoattack"] is not None)):
        if uses and importlib.util.find_spec("torchattacks") is None:
            raise ConfigError(f"config key 'evaluation.{key}': AutoAttack needs the torchattacks package; "
                              "install it with: pip install -e '.[autoattack]'")
    if config["validation"]["robust_examples"] and not config["dataset"]["n_val"]:
        raise ConfigError("config key 'validation.robust_examples': there is no validation split to attack; "
                          "set dataset.n_val")
    trained = {f"sources/{name}" for name in sources} | {
        f"targets/{t}/{a}" for t in train_sets for a in config["targets"]["archs"]}
    for label, group in config["figures"]["figure2"].items():
        if group not in trained:
            raise ConfigError(f"config key 'figures.figure2.{label}': {group!r} is not a model this config trains "
                              f"(sources/<source> or targets/<train set>/<arch>; trained: {sorted(trained)})")
    eps = config["figures"]["figure2_eps"]
    if eps not in config["evaluation"]["eps"]:
        raise ConfigError(f"config key 'figures.figure2_eps': {eps} is not one of the radii that evaluation "
                          f"computes (evaluation.eps: {config['evaluation']['eps']})")


def _effective(key: str, value):
    """A recipe setting as it acts: without crops, the crop padding does nothing."""
    if key == "augment" and not value.get("crop"):
        return {k: v for k, v in value.items() if k != "padding"}
    return value


def target_train_config(config: Mapping, train_set: str) -> dict:
    """The training settings of the targets trained on ``train_set``: targets.train, with the
    epochs of targets.epochs_by_set and the augmentation of targets.augment_by_set where they name the set."""
    targets = config["targets"]
    train = targets["train"]
    return {**train, "epochs": targets["epochs_by_set"].get(train_set, train["epochs"]),
            "augment": {**train["augment"], **targets["augment_by_set"].get(train_set, {})}}


def load_config(path: str | Path, schema_path: str | Path | None = None) -> dict:
    """Read a YAML config file and validate it (for tools outside Snakemake)."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    return validate_config(copy.deepcopy(config), schema_path)


def autoattack_config(eval_cfg: Mapping, eps: float) -> dict:
    """The evaluation config of the Figure 2 AutoAttack check (``evaluation.figure2_autoattack``):
    only what AutoAttack uses, so that changing PGD's settings does not rerun it."""
    check = eval_cfg["figure2_autoattack"]
    return {"attack": "autoattack", "autoattack_version": check["version"], "norm": eval_cfg["norm"], "eps": [eps],
            "n_test": check["n_test"], "batch_size": eval_cfg["batch_size"]}


def pgd_config(eval_cfg: Mapping) -> dict:
    """The evaluation config of the PGD rules: without the AutoAttack check's settings, so that
    changing those does not rerun every PGD evaluation."""
    return {k: v for k, v in eval_cfg.items() if k != "figure2_autoattack"}
