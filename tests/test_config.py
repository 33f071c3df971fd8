"""Config validation: the repository's config.yaml, defaults, and errors that name the dotted key."""

from __future__ import annotations

import copy

import pytest
import yaml

from helpers import DEFAULT_CONFIG as CONFIG
from helpers import SCHEMA
from notbugs.config import ConfigError, complete, load_config, validate_config


@pytest.fixture(scope="module")
def raw_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture
def config(raw_config) -> dict:
    return copy.deepcopy(raw_config)  # validate_config mutates its argument


def _error(config: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(config, SCHEMA)
    return str(info.value)


def test_repository_config_validates_and_gets_defaults(config, raw_config):
    assert "momentum" not in raw_config["sources"]["standard"]["train"]
    assert "keep_best" not in raw_config["constructions"]["d_det"]
    out = validate_config(config, SCHEMA)
    assert out is config  # filled in place
    # values from config.yaml survive
    assert config["evaluation"]["steps"] == 20
    assert config["evaluation"]["eps"] == [0.25, 0.5]
    assert config["dataset"]["n_train"] == 2000
    assert config["sources"]["robust"]["train"]["adversarial"]["eps"] == 0.5
    assert config["targets"]["train"]["epochs"] == 8
    # schema defaults are filled at every level
    assert config["evaluation"]["step_size_factor"] == 2.5
    assert config["evaluation"]["restarts"] == 1
    assert config["evaluation"]["norm"] == "l2"
    assert config["sources"]["standard"]["train"]["momentum"] == 0.9
    assert config["sources"]["standard"]["train"]["schedule"] == "triangle"
    assert config["sources"]["standard"]["train"]["augment"] == {"crop": False, "padding": 4, "flip": False}
    assert config["sources"]["standard"]["train"]["adversarial"] is None
    assert config["constructions"]["d_det"]["keep_best"] is True
    assert config["constructions"]["d_r"]["start"] == "image"
    assert "start" not in config["constructions"]["d_det"]  # each method takes only its own settings
    assert config["constructions"]["d_rand"]["steps"] == 20 and "steps" not in config["constructions"]["d_leak_det"]
    assert "target" not in config["constructions"]["d_r"]
    assert config["dataset"]["root"] == "resources"
    assert config["dataset"]["synthetic"]["nonrobust_norm"] == 0.1
    assert config["targets"]["archs"] == ["small_cnn"]
    assert config["figures"]["grid_examples"] == 8
    assert config["chunk_size"] == 512 and config["threads"] == 1


def test_evaluation_section_defaults_when_missing(config):
    del config["evaluation"]
    validate_config(config, SCHEMA)
    assert config["evaluation"]["steps"] == 20
    assert config["evaluation"]["eps"] == [0.25, 0.5]


def test_load_config_does_not_touch_file_contents(raw_config, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw_config))
    loaded = load_config(path, SCHEMA)
    assert loaded["sources"]["standard"]["train"]["momentum"] == 0.9
    assert yaml.safe_load(path.read_text()) == raw_config


def test_unknown_top_level_key(config):
    config["evalution"] = {"steps": 3}
    message = _error(config)
    assert message.startswith("config key 'evalution':"), message
    assert "<top level>" not in message


def test_unknown_nested_key(config):
    config["sources"]["standard"]["train"]["foo"] = 1
    message = _error(config)
    assert message.startswith("config key 'sources.standard.train.foo':"), message


def test_wrong_type(config):
    config["evaluation"]["steps"] = "many"
    message = _error(config)
    assert "evaluation.steps" in message
    assert "integer" in message


def test_negative_eps(config):
    config["constructions"]["d_det"]["eps"] = -0.5
    message = _error(config)
    assert "constructions.d_det.eps" in message
    assert "-0.5" in message


def test_bad_enum_in_list_item(config):
    config["evaluation"]["eps"] = [0.25, 0]
    message = _error(config)
    assert "evaluation.eps.1" in message


def test_missing_required_section(config):
    del config["targets"]
    message = _error(config)
    assert "targets" in message


def test_construction_naming_missing_source(config):
    config["constructions"]["d_det"]["source"] = "nonexistent"
    message = _error(config)
    assert "constructions.d_det.source" in message
    assert "'nonexistent'" in message


def test_a_pgd_ensemble_names_other_existing_sources(config):
    config["constructions"]["d_det"]["ensemble"] = ["robust", "nonexistent"]
    assert "constructions.d_det.ensemble.1" in _error(config)
    config["constructions"]["d_det"]["ensemble"] = [config["constructions"]["d_det"]["source"]]
    message = _error(config)
    assert "constructions.d_det.ensemble.0" in message and "source already" in message
    config["constructions"]["d_det"]["ensemble"] = ["robust"]
    validate_config(config, SCHEMA)


def test_a_pgd_set_drops_rows_read_as_t_only_by_an_existing_source(config):
    config["constructions"]["d_det"]["drop_read_as_target_by"] = "nonexistent"
    message = _error(config)
    assert "constructions.d_det.drop_read_as_target_by" in message and "'nonexistent'" in message
    config["constructions"]["d_det"]["drop_read_as_target_by"] = config["constructions"]["d_det"]["source"]
    assert "turns towards t" in _error(config)
    config["constructions"]["d_det"]["drop_read_as_target_by"] = "robust"
    for study in ("rebuttals", "transfer"):
        config["studies"] = {study: {"enabled": True, "construction": "d_det"}}
        assert f"studies.{study}.construction" in _error(config)
    config["studies"] = {}
    validate_config(config, SCHEMA)
    config["constructions"]["d_r"]["drop_read_as_target_by"] = "robust"  # pgd sets only
    assert "constructions.d_r" in _error(config)


def test_a_set_that_drops_rows_repeats_the_attack_of_the_set_with_every_other_setting_the_same(config):
    from notbugs.config import attack_repeated_by
    constructions = config["constructions"]
    constructions["d_det_judged"] = {**constructions["d_det"], "drop_read_as_target_by": "robust"}
    validate_config(config, SCHEMA)
    assert attack_repeated_by(constructions, "d_det_judged") == "d_det"
    assert attack_repeated_by(constructions, "d_det") is None  # it drops nothing
    constructions["d_det_judged"]["steps"] += 1
    assert attack_repeated_by(constructions, "d_det_judged") is None


def test_a_source_seed_offset_follows_the_run_seed(config):
    from notbugs.config import source_seed
    config["seed"] = 7
    config["sources"]["robust"]["seed_offset"] = 1000
    validate_config(config, SCHEMA)
    assert source_seed(config, "robust") == 1007 and source_seed(config, "standard") == 7
    config["sources"]["robust"]["seed"] = 3
    assert "sources.robust.seed_offset" in _error(config)


def test_a_source_uses_extra_training_images_only_if_the_data_has_them(config):
    config["sources"]["standard"]["use_extra_train"] = True
    assert "sources.standard.use_extra_train" in _error(copy.deepcopy(config))
    config["dataset"]["n_extra_train"] = 1000
    validated = validate_config(copy.deepcopy(config), SCHEMA)
    assert validated["sources"]["standard"]["use_extra_train"] and not validated["sources"]["robust"]["use_extra_train"]
    config["sources"]["standard"]["train"]["loader"] = "stream"
    assert "train.loader: stream" in _error(copy.deepcopy(config))
    del config["sources"]["standard"]["train"]["loader"]
    config["dataset"].update(source="restricted_imagenet", root=".")
    assert "dataset.n_extra_train" in _error(config)


def test_rebuttals_on_an_ensemble_pgd_set_compare_against_a_one_source_copy(config):
    from notbugs.config import rebuttal_sets
    config["sources"]["standard"]["seed_offset"] = 5
    config["constructions"]["d_det"]["ensemble"] = ["robust"]
    config["studies"] = {"rebuttals": {"enabled": True, "construction": "d_det"}}
    validate_config(config, SCHEMA)
    plain, nontransferable = rebuttal_sets(config)
    assert (plain, nontransferable) == ("d_det_one_source", "d_det_nontransferable")
    assert "ensemble" not in config["constructions"][plain]
    assert config["constructions"][plain]["target"] == config["constructions"]["d_det"]["target"]
    assert {plain, nontransferable} <= set(config["targets"]["train_sets"])
    fresh = config["sources"]["fresh_1"]
    assert "seed_offset" not in fresh and fresh["seed"] == config["seed"] + 1001


def test_model_construction_without_source(config):
    del config["constructions"]["d_rand"]["source"]
    message = _error(config)
    assert "constructions.d_rand.source" in message


def test_train_set_naming_missing_construction(config):
    config["targets"]["train_sets"] = ["d", "d_r", "d_typo"]
    message = _error(config)
    assert "targets.train_sets.2" in message
    assert "'d_typo'" in message


def test_leakage_needs_no_source(config):
    config["constructions"] = {"d_leak": {"method": "leakage"}}
    config["targets"]["train_sets"] = ["d", "d_leak"]
    config["comparisons"] = [{"better": "d", "worse": "d_leak", "metric": "clean"}]
    config["figures"] = {"figure2": {label: "targets/d/small_cnn" for label in
                                     ("standard_on_d", "standard_on_d_r", "standard_on_d_nr")}}
    validate_config(config, SCHEMA)
    assert config["constructions"]["d_leak"]["eps"] == 0.5


def test_adversarial_training_gets_its_defaults(config):
    validate_config(config, SCHEMA)
    adversarial = config["sources"]["robust"]["train"]["adversarial"]
    assert adversarial["norm"] == "l2" and adversarial["random_start"] is False
    assert config["sources"]["standard"]["train"]["adversarial"] is None


def test_figure2_radius_must_be_evaluated(config):
    config["evaluation"] = {"eps": [0.5]}
    message = _error(config)
    assert "figures.figure2_eps" in message and "0.25" in message


def test_unknown_construction_setting_is_named(config):
    config["constructions"]["d_det"]["epz"] = 0.5
    message = _error(config)
    assert "constructions.d_det.epz" in message


def test_complete_fills_one_section_and_names_bad_keys():
    train = complete("targets.train", {"epochs": 3})
    assert train["epochs"] == 3 and train["augment"] == {"crop": False, "padding": 4, "flip": False}
    assert complete("constructions.anything", {"method": "leakage"}) == {
        "method": "leakage", "target": "random", "eps": 0.5, "pattern": "deconv", "mask": "none"}
    with pytest.raises(ConfigError, match=r"'targets.train.epochs'"):
        complete("targets.train", {"epochs": 0})
    with pytest.raises(KeyError, match="no key"):
        complete("targets.nothing")


def test_defaults_are_copies_not_shared_objects(config):
    validate_config(config, SCHEMA)
    config["sources"]["standard"]["train"]["augment"]["crop"] = True
    assert config["sources"]["robust"]["train"]["augment"]["crop"] is False
    assert config["targets"]["train"]["augment"]["crop"] is False


def test_restarts_without_random_start_are_refused(config):
    config["evaluation"] = {"restarts": 3, "random_start": False}
    message = _error(config)
    assert "evaluation.restarts" in message and "random_start" in message
    config["evaluation"] = {"restarts": 3, "random_start": True}
    validate_config(config, SCHEMA)


def test_comparisons_must_name_trained_sets(config):
    config["comparisons"] = [{"better": "d_rand", "worse": "d_typo", "metric": "clean"}]
    message = _error(config)
    assert "comparisons.0.worse" in message and "'d_typo'" in message


def test_validation_attack_needs_a_validation_split(config):
    config["dataset"]["n_val"] = 0
    config["validation"] = {"robust_examples": 50}
    assert "validation.robust_examples" in _error(config)


def test_figure2_rows_must_name_trained_models(config):
    config["targets"]["archs"] = ["small_cnn_wide"]
    message = _error(config)
    assert "figures.figure2.standard_on_d" in message and "targets/d/small_cnn" in message


def test_a_twin_must_be_built_at_its_pgd_sets_eps(config):
    config["constructions"]["d_leak_det"]["eps"] = 1.0
    message = _error(config)
    assert "constructions.d_leak_det.eps" in message and "twin" in message


def test_a_twin_must_name_a_targeted_attack(config):
    config["constructions"]["d_leak_det"]["twin_of"] = "d_r"
    assert "constructions.d_leak_det.twin_of" in _error(config)


def test_a_clean_model_mask_needs_its_model(config):
    del config["constructions"]["d_leak_det"]["source"]
    assert "constructions.d_leak_det.source" in _error(config)


def test_comparisons_across_eps_are_refused(config):
    config["constructions"]["d_det"]["eps"] = 1.0
    config["constructions"]["d_leak_det"]["eps"] = 1.0
    config["comparisons"].append({"better": "d_det", "worse": "d_leak_rand", "metric": "clean"})
    message = _error(config)
    assert "comparisons." in message and "different eps" in message


def test_a_blend_must_copy_an_inversion_from_images(config):
    config["constructions"]["d_r_blend"]["twin_of"] = "d_rand"
    assert "constructions.d_r_blend.twin_of" in _error(config)
    config["constructions"]["d_r_blend"]["twin_of"] = "d_r"
    config["constructions"]["d_r"]["start"] = "noise"
    assert "constructions.d_r_blend.twin_of" in _error(config)


def test_a_jpeg_set_must_code_another_construction(config):
    config["constructions"]["d_det_jpeg"] = {"method": "jpeg", "twin_of": "d_det"}
    config["targets"]["train_sets"].append("d_det_jpeg")
    from notbugs.config import validate_config
    assert validate_config(config)["constructions"]["d_det_jpeg"]["quality"] == 75
    config["constructions"]["d_det_jpeg_again"] = {"method": "jpeg", "twin_of": "d_det_jpeg"}
    validate_config(config)  # a coded set may be coded again
    for twin in ("d_missing", "d_det_jpeg", "d_det_jpeg_again"):  # nothing, itself, a cycle
        config["constructions"]["d_det_jpeg"]["twin_of"] = twin
        assert "constructions.d_det_jpeg.twin_of" in _error(config)


# --------------------------------------------------------------------------- checks before any job runs

def test_an_architecture_typo_is_named_at_parse_time(config):
    config["sources"]["standard"]["arch"] = "small_cnnn"
    assert "sources.standard.arch" in _error(config)
    config["sources"]["standard"]["arch"] = "small_cnn"
    config["targets"]["archs"] = ["resnet-18"]
    assert "targets.archs.0" in _error(config)


def test_the_schema_names_exactly_the_model_registry():
    from notbugs.config import schema
    from notbugs.models import ARCHITECTURES
    assert set(schema()["$defs"]["arch"]["enum"]) == set(ARCHITECTURES)


def _imagefolder(tmp_path, classes=("a", "b", "c")):
    for split in ("train", "test"):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
    return tmp_path


def test_an_imagefolder_root_must_hold_both_splits(config, tmp_path):
    config["dataset"] = {"name": "x", "source": "imagefolder", "root": str(tmp_path / "missing"), "n_train": 30}
    message = _error(config)
    assert "dataset.root" in message and "train" in message
    root = _imagefolder(tmp_path / "ok")
    config["dataset"]["root"] = str(root)
    (root / "test" / "a").rmdir(), (root / "test" / "b").rmdir(), (root / "test" / "c").rmdir(), (root / "test").rmdir()
    assert "test" in _error(config)


@pytest.mark.parametrize("key", ["n_train", "n_test", "n_val"])
def test_subset_sizes_must_be_multiples_of_the_classes(config, tmp_path, key):
    root = _imagefolder(tmp_path)
    config["dataset"] = {"name": "x", "source": "imagefolder", "root": str(root), "n_train": 30, "n_test": 30,
                         "n_val": 30, key: 31}
    message = _error(config)
    assert f"dataset.{key}" in message and "3 classes" in message
    config["dataset"][key] = 33
    config["figures"] = {}
    validate_config(config, SCHEMA)  # a multiple of 3 passes
    config["dataset"] = {"name": "c", "source": "cifar10", "n_train": 1005}
    assert "dataset.n_train" in _error(config) and "10 classes" in _error(config)


def test_command_line_overrides_keep_their_types(config):
    """Snakemake's --config evaluation='{steps: 100}' delivers '100' as a string."""
    config["evaluation"] = {"steps": "100", "batch_size": "250", "random_start": "true", "eps": ["0.25"]}
    config["chunk_size"] = "250"
    validate_config(config, SCHEMA)
    assert config["evaluation"]["steps"] == 100 and config["evaluation"]["batch_size"] == 250
    assert config["evaluation"]["random_start"] is True and config["evaluation"]["eps"] == [0.25]
    assert config["chunk_size"] == 250
    config["evaluation"].update(eps=["2.5e-1", "5e-1"], figure2_autoattack="null")
    config["evaluation"]["steps"] = 100
    validate_config(config, SCHEMA)
    assert config["evaluation"]["eps"] == [0.25, 0.5] and config["evaluation"]["figure2_autoattack"] is None
    config["evaluation"]["steps"] = "many"
    assert "evaluation.steps" in _error(config)


def test_epochs_by_set_sets_one_training_sets_epochs(config):
    from notbugs.config import target_train_config
    config["targets"]["epochs_by_set"] = {"d_rand": 30, "d_leak_rand": 30}
    validate_config(config, SCHEMA)
    assert target_train_config(config, "d_rand") == {**config["targets"]["train"], "epochs": 30}
    assert target_train_config(config, "d")["epochs"] == config["targets"]["train"]["epochs"] != 30


def test_epochs_by_set_must_name_a_training_set(config):
    config["targets"]["epochs_by_set"] = {"d_nope": 30}
    assert "targets.epochs_by_set.d_nope" in _error(config)


def test_augment_by_set_changes_one_training_sets_augmentation(config):
    from notbugs.config import target_train_config
    config["targets"]["train"]["augment"] = {"crop": False, "flip": True}
    config["targets"]["augment_by_set"] = {s: {"crop": True} for s in ("d", "d_r", "d_r_blend")}
    validate_config(config, SCHEMA)
    assert target_train_config(config, "d")["augment"] == {"crop": True, "padding": 4, "flip": True}
    assert target_train_config(config, "d_rand")["augment"] == {"crop": False, "padding": 4, "flip": True}
    config["targets"]["augment_by_set"] = {"d_nope": {"crop": True}}
    assert "targets.augment_by_set.d_nope" in _error(config)
    config["targets"]["augment_by_set"] = {"d_rand": {"crop": True}}
    message = _error(copy.deepcopy(config))
    assert "comparisons." in message and "d_leak_rand" in message and "augment" in message
    # Without crops the padding does nothing, so a claim and its control may differ in it.
    config["targets"]["augment_by_set"] = {"d_rand": {"padding": 2}}
    validate_config(copy.deepcopy(config), SCHEMA)
    config["targets"]["augment_by_set"] = {"d_rand": {"crop": True, "padding": 2}, "d_leak_rand": {"crop": True}}
    assert "d_leak_rand" in _error(config)  # with crops the padding counts


def test_a_claim_and_its_control_must_train_for_the_same_epochs(config):
    config["targets"]["epochs_by_set"] = {"d_rand": 30}
    message = _error(config)
    assert "comparisons." in message and "d_leak_rand" in message and "same recipe" in message
