"""Study file loading: defaults, overrides, smoke, the resolved copy, and every bad-input message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raycf.config import (
    PAPER_DETECTION_SETTINGS,
    StudyConfig,
    dump_yaml,
    load_study,
    study_from_mapping,
    with_values,
)
from raycf.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def test_shipped_studies_load_with_and_without_smoke():
    for path in sorted((REPO / "studies").glob("*.yaml")):
        full = load_study(path)
        smoke = load_study(path, smoke=True)
        assert full.name == path.stem
        assert smoke.config_hash() != full.config_hash()


def test_defaults_are_the_papers_values():
    study = study_from_mapping({"name": "x"})
    assert study.data.kind == "digits" and study.data.image_size == 32
    assert study.cfe.sparsity == 2.0 and study.cfe.ref_batch_size == 32
    assert study.analysis.tau == 0.9
    assert study.analysis.settings == PAPER_DETECTION_SETTINGS
    assert (study.debug.lambda1, study.debug.lambda2) == (1.6e-2, 3.2e-4)  # 1e-3 and 2e-5 per batch of 16
    assert study.debug.trainable == "last_conv_and_head" and study.debug.lr == 1e-4


def test_image_size_default_depends_on_the_dataset(tmp_path):
    assert study_from_mapping({"name": "x", "data": {"kind": "cub200", "root": str(tmp_path)}}).data.image_size == 224


def test_set_overrides_are_typed_and_dotted():
    study = study_from_mapping(
        {"name": "x"},
        overrides=["base.epochs=3", "debug.lambda1=1e-3", "base.use_gpu=true", "search.space.tau={uniform: [0.5, 0.9]}"],
    )
    assert study.base.epochs == 3 and isinstance(study.base.epochs, int)
    assert study.debug.lambda1 == pytest.approx(1e-3)
    assert study.base.use_gpu is True
    assert study.search.space["tau"].uniform == (0.5, 0.9)


def test_smoke_block_applies_only_with_smoke_and_set_wins():
    raw = {"name": "x", "base": {"epochs": 20}, "smoke": {"base": {"epochs": 2}, "search.num_samples": 2}}
    assert study_from_mapping(raw).base.epochs == 20
    smoke = study_from_mapping(raw, smoke=True)
    assert smoke.base.epochs == 2 and smoke.search.num_samples == 2
    assert study_from_mapping(raw, smoke=True, overrides=["base.epochs=5"]).base.epochs == 5


def test_resolved_yaml_round_trips_to_the_same_hash():
    study = study_from_mapping({"name": "x", "base": {"epochs": 7}})
    again = StudyConfig.model_validate(yaml.safe_load(dump_yaml(study)))
    assert again == study and again.config_hash() == study.config_hash()


def test_with_values_maps_search_aliases_to_fields():
    study = with_values(study_from_mapping({"name": "x"}), {"lambda1": 0.5, "tau": 0.8, "debug.lr": 0.01})
    assert (study.debug.lambda1, study.debug.tau, study.analysis.tau, study.debug.lr) == (0.5, 0.8, 0.9, 0.01)  # tau: retraining's, not detection's


def test_results_uri_is_absolute_for_local_and_kept_for_s3(tmp_path):
    assert study_from_mapping({"name": "x", "storage_path": "rel"}).results_uri == str(Path("rel").resolve() / "x")
    assert study_from_mapping({"name": "x", "storage_path": "s3://bucket/runs/"}).results_uri == "s3://bucket/runs/x"


def _message(raw_text: str, tmp_path: Path, **kwargs) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(raw_text)
    with pytest.raises(UserError) as caught:
        load_study(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\nbase:\n  epochs: 3\n   lr: 1\n", "YAML syntax error at line 4"),
        ("name: x\nbase: {epoch: 3}\n", "base.epoch: unknown field 'epoch' (expected one of: train, epochs"),
        ("name: x\nbase: {epochs: three}\n", "base.epochs: Input should be a valid integer"),
        ("name: x\nbase: {epochs: 0}\n", "base.epochs: Input should be greater than 0 (got 0)"),
        ("name: x\nbase: {lr: -0.1}\n", "base.lr: Input should be greater than 0 (got -0.1)"),
        ("name: x\ndebug: {lambda1: -1}\n", "debug.lambda1: Input should be greater than or equal to 0 (got -1)"),
        ("name: x\nmodel: {arch: vgg19x}\n", "model.arch: unknown architecture 'vgg19x' (expected vgg_tiny, vgg11 … vgg19, vgg*_bn, resnet*"),
        ("name: x\nmodel: {arch: squeezenet1_0}\n", "model.arch: squeezenet1_0 is refused: its head is a 1×1 conv and a ReLU before pooling"),
        ("name: x\ndata: {kind: mnist}\n", "data.kind: Input should be 'digits', 'fashion_mnist', 'cub200' or 'imagefolder' (got 'mnist')"),
        ("name: x\ndata: {kind: cub200}\n", "data.root is required for data.kind=cub200"),
        ("base: {epochs: 3}\n", "name: required field is missing"),
        ("- a\n- b\n", "expected a mapping of study fields"),
        ("name: x\nsearch: {space: {lambda3: {uniform: [0, 1]}}}\n", "'lambda3' cannot be searched: a trial does not consume it (searchable: lambda1, lambda2, tau, freq_threshold, debug.indicator"),
        ("name: x\nsearch: {space: {lambda1: {loguniform: [0, 1]}}}\n", "loguniform bounds must be positive"),
        ("name: x\nsmoke: {base: {epochs: -1}}\n", "(with its smoke block): base.epochs: Input should be greater than 0"),
    ],
)
def test_bad_study_files_get_one_line_naming_the_field(tmp_path, text, expected):
    message = _message(text, tmp_path)
    assert message.startswith(str(tmp_path / "bad.yaml"))
    assert expected in message


def test_missing_study_file(tmp_path):
    with pytest.raises(UserError, match="nope.yaml: study file not found"):
        load_study(tmp_path / "nope.yaml")


def test_bad_set_override_names_the_flag():
    with pytest.raises(UserError, match="--set: base.epochs: Input should be greater than 0"):
        study_from_mapping({"name": "x"}, overrides=["base.epochs=0"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        study_from_mapping({"name": "x"}, overrides=["base.epochs"])


def test_the_study_reference_lists_every_field_with_its_default_and_meaning():
    from raycf.config import StudyConfig, study_reference_markdown

    rows = {line.split(" | ")[0].removeprefix("| `").rstrip("`"): line for line in study_reference_markdown().splitlines()[2:]}
    assert rows["name"] == "| `name` | required | study name; results go to <storage_path>/<name>/ |"
    assert rows["debug.lambda1"].split(" | ")[1] == f"`{StudyConfig.model_fields['debug'].default_factory().lambda1}`"
    assert rows["analysis.settings"].split(" | ")[1] == "3 rows (the paper's)"
    assert "analysis.settings[].metric" in rows  # rows of a list of models are walked too
    assert set(StudyConfig.model_fields) - {"smoke"} <= set(rows)


def test_two_frequency_thresholds_one_per_job():
    study = study_from_mapping({"name": "x"})
    assert study.debug.freq_threshold == 0.0  # retraining: the reference's f = 0
    assert study.analysis.freq_threshold == 0.15  # detection: the paper's f = 0.15
    searched = with_values(study, {"freq_threshold": 0.3, "analysis.freq_threshold": 0.2})
    assert (searched.debug.freq_threshold, searched.analysis.freq_threshold) == (0.3, 0.2)
    assert (study.debug.tau, study.analysis.tau) == (0.9, 0.9)  # retraining's and detection's τ: the paper's, apart


@pytest.mark.parametrize(
    "field", ["cfe.epochs", "masks.topk", "analysis.freq_threshold", "analysis.tau", "base.lr", "data.augment.rotation", "seed", "debug.views", "debug.workers"]
)
def test_a_field_no_trial_consumes_cannot_be_searched(field):
    with pytest.raises(UserError) as error:
        study_from_mapping({"name": "x", "search": {"space": {field: {"choice": [1, 2]}}}})
    message = str(error.value)
    assert "\n" not in message and f"{field!r} cannot be searched" in message
    assert message.endswith("(searchable: lambda1, lambda2, tau, freq_threshold, debug.indicator, debug.epochs, debug.lr, debug.momentum, debug.batch_size, debug.suppress_weight)")


def test_a_searched_value_the_field_refuses_is_refused_before_the_search():
    with pytest.raises(UserError, match=r"search.space.debug.indicator: 'bogus' is not a value of debug.indicator"):
        study_from_mapping({"name": "x", "search": {"space": {"debug.indicator": {"choice": ["paper", "bogus"]}}}})
    with pytest.raises(UserError, match=r"search.space.lambda1: -1.0 is not a value of debug.lambda1"):
        study_from_mapping({"name": "x", "search": {"space": {"lambda1": {"uniform": [-1, 1]}}}})


def test_a_study_without_a_search_space_searches_the_default_one():
    from raycf.config import DEFAULT_SPACE
    from raycf.search.searcher import parameter_names

    study = study_from_mapping({"name": "x", "data": {"kind": "digits"}, "model": {"arch": "vgg_tiny"}})
    assert study.search.space is None and study.search.searched_space == DEFAULT_SPACE
    assert parameter_names(study) == ["lambda1", "lambda2", "tau", "freq_threshold"]
    assert DEFAULT_SPACE["lambda1"].loguniform[0] < study.debug.lambda1 < DEFAULT_SPACE["lambda1"].loguniform[1]
    assert DEFAULT_SPACE["lambda2"].loguniform[0] < study.debug.lambda2 < DEFAULT_SPACE["lambda2"].loguniform[1]
    with pytest.raises(UserError, match=r"search.space: no searched parameters .*leave search.space out to search the default space"):
        study_from_mapping({"name": "x", "search": {"space": {}}})


def test_smoke_has_defaults_of_its_own_for_a_file_without_a_smoke_block():
    from raycf.config import DEFAULT_SMOKE

    smoke = study_from_mapping({"name": "x"}, smoke=True)
    read = (smoke.base.epochs, smoke.base.workers, smoke.cfe.epochs, smoke.debug.epochs, smoke.search.num_samples)
    pools = (smoke.data.decode_actors, smoke.features.actors, smoke.masks.actors, smoke.prefix.actors)
    assert (*read, *pools) == tuple(DEFAULT_SMOKE.values()) == (1, 1, 1, 2, 2, 1, 1, 1, 1)
    full = study_from_mapping({"name": "x"})
    # one base worker and one actor per Ray Data pool only in the smoke variant
    assert full.base.workers > 1 and min(full.data.decode_actors, full.features.actors, full.masks.actors, full.prefix.actors) > 1
    assert smoke.config_hash() == study_from_mapping({"name": "x"}, smoke=True, overrides=["features.actors=3", "prefix.actors=2"]).config_hash()  # resources only
    assert study_from_mapping({"name": "x", "smoke": {"debug": {"epochs": 3}}}, smoke=True).debug.epochs == 3  # the file's block wins
