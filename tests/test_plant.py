"""The planted bug (``data.plant``), groups and group accuracy: known answers, rates within binomial bounds, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom

from conftest import run_cli_without_ray
from raycf.config import PlantConfig, study_from_mapping
from raycf.errors import UserError
from raycf.method.groups import group_accuracy, group_metrics, group_summary, planted_group_names, user_group_names
from raycf.method.plant import apply_feature, class_index_of, plant_images, planted_flags


def _plant(**fields) -> PlantConfig:
    return PlantConfig.model_validate({"class": "Coat", **fields})


@pytest.mark.parametrize(
    ("corner", "rows", "cols"),
    [("top_left", slice(0, 3), slice(0, 3)), ("top_right", slice(0, 3), slice(7, 10)), ("bottom_left", slice(7, 10), slice(0, 3)), ("bottom_right", slice(7, 10), slice(7, 10))],
)
def test_patch_sets_exactly_its_square_and_nothing_else(corner, rows, cols):
    images = np.random.default_rng(0).integers(0, 200, size=(2, 10, 10, 3), dtype=np.uint8)
    out = apply_feature(images, _plant(kind="patch", size=3, corner=corner, value=1.0))
    assert (out[:, rows, cols, :] == 255).all()
    changed = np.zeros((10, 10), dtype=bool)
    changed[rows, cols] = True
    assert np.array_equal(out[:, ~changed], images[:, ~changed])  # every other pixel untouched
    half = apply_feature(images, _plant(kind="patch", size=3, corner=corner, value=0.5))
    assert (half[:, rows, cols, :] == 128).all()  # round(0.5 · 255)


def test_tint_blends_every_pixel_towards_the_colour():
    images = np.full((1, 4, 4, 3), 100, dtype=np.uint8)
    out = apply_feature(images, _plant(kind="tint", value=0.25, colour=(1.0, 0.0, 0.5)))
    # 0.75 · 100 + 0.25 · (255, 0, 127.5) = (138.75, 75, 106.875) → rounded
    assert out[0, 2, 3].tolist() == [139, 75, 107]
    assert (out == out[0, 0]).all()


def test_rates_are_realised_within_binomial_bounds_and_the_draw_is_seeded():
    labels = np.repeat(np.arange(10), 2000)  # class 4 is Coat
    config = _plant(train_rate=0.95, other_rate=0.05, eval_rate=0.5)
    train = planted_flags(labels, "train", config, 4, seed=3)
    for flags, rate, count in ((train[labels == 4], 0.95, 2000), (train[labels != 4], 0.05, 18000)):
        low, high = binom.ppf([1e-4, 1 - 1e-4], count, rate)
        assert low <= flags.sum() <= high
    test = planted_flags(labels, "test", config, 4, seed=3)
    for label in range(10):  # every class at eval_rate in val and test
        low, high = binom.ppf([1e-4, 1 - 1e-4], 2000, 0.5)
        assert low <= test[labels == label].sum() <= high
    assert np.array_equal(train, planted_flags(labels, "train", config, 4, seed=3))
    assert not np.array_equal(train, planted_flags(labels, "train", config, 4, seed=4))
    assert not np.array_equal(planted_flags(labels, "val", config, 4, seed=3), test)  # each split its own draw


def test_plant_images_changes_only_the_planted_images_in_place():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 200, size=(50, 8, 8, 3), dtype=np.uint8)
    original = images.copy()
    labels = rng.integers(0, 3, size=50)
    config = _plant(size=2, train_rate=1.0, other_rate=0.0)
    out, planted = plant_images(images, labels, "train", config, seed=0, class_index=1, chunk=7)
    assert out is images
    assert np.array_equal(planted, labels == 1)  # rates 1 and 0: exactly the class
    assert (images[planted, :2, :2] == 255).all()
    assert np.array_equal(images[~planted], original[~planted])


def test_worst_and_mean_group_accuracy_on_a_two_by_two_case():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    planted = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
    preds = np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 0])
    groups = planted_group_names(labels, planted, ["Coat", "Bag"])
    table = group_accuracy(groups, labels, preds).set_index("group")
    assert table.loc["Coat | planted", ["images", "correct"]].tolist() == [3, 3]
    assert table.loc["Coat | clean", "acc"] == 0.0
    assert table.loc["Bag | planted", "acc"] == 0.0
    assert table.loc["Bag | clean", "acc"] == pytest.approx(4 / 5)
    summary = group_summary(group_accuracy(groups, labels, preds))
    assert summary["worst_group_acc"] == 0.0 and summary["worst_group"] == "Bag | planted"  # the first of the tied, by name
    assert summary["mean_group_acc"] == pytest.approx((1 + 0 + 0 + 0.8) / 4)
    assert group_metrics(groups, labels, preds, "val_") == {"val_worst_group_acc": 0.0, "val_mean_group_acc": pytest.approx(0.45)}


def test_user_groups_fall_back_to_the_class_name():
    assert user_group_names(["a", "b"], np.array([0, 1]), ["x", "y"], {"a": "g1"}).tolist() == ["g1", "y"]


def test_plant_config_reads_class_by_alias_and_refuses_bad_values():
    study = study_from_mapping({"name": "t", "data": {"kind": "digits", "plant": {"class": 3, "kind": "tint"}}})
    assert study.data.plant.class_name == "3" and study.data.plant.kind == "tint"
    assert class_index_of(study.data.plant, [str(d) for d in range(10)]) == 3
    with pytest.raises(ValueError, match=r"data.plant.class: unknown class 'Coat'"):
        class_index_of(_plant(), ["a", "b"])
    for plant, field in (({"class": 1, "other_rate": -0.1}, "data.plant.other_rate"), ({"class": 1, "eval_rate": 2}, "data.plant.eval_rate"), ({"class": 1, "kind": "stripe"}, "data.plant.kind"), ({"class": 1, "size": 33}, "data.plant.size")):
        with pytest.raises(UserError, match=field.replace(".", r"\.")):
            study_from_mapping({"name": "t", "data": {"kind": "digits", "plant": plant}})
    with pytest.raises(UserError, match="search.metric: val_worst_group_acc needs groups"):
        study_from_mapping({"name": "t", "search": {"metric": "val_worst_group_acc"}})
    with pytest.raises(UserError, match=r"search.metric: val_mean_group_acc is computed by one retraining worker \(expected debug.workers: 1; got 2\)"):
        study_from_mapping({"name": "t", "data": {"kind": "digits", "plant": {"class": 1}}, "search": {"metric": "val_mean_group_acc"}, "debug": {"workers": 2}})


def _study(tmp_path: Path, data: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"name: t\nstorage_path: {tmp_path / 'results'}\ndata:\n  kind: digits\n{data}")
    return path


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("  plant: {class: Coat}\n", "raycf: error: data.plant.class: unknown class 'Coat' (the dataset's classes: 0, 1, 2"),
        ("  plant: {class: 3, train_rate: 1.5}\n", "data.plant.train_rate: Input should be less than or equal to 1 (got 1.5)"),
        ("  plant: {class: 3, size: 40}\n", "data.plant.size: the patch must fit the stored image (expected at most 32 pixels; got 40)"),
        ("  groups: GROUPS\n", "raycf: error: data.groups: 1 image ids are not in the dataset (e.g. 'nobody'"),
    ],
)
def test_bad_plant_or_groups_exit_2_with_one_line_before_anything_runs(tmp_path, data, message):
    groups = tmp_path / "groups.csv"
    pd.DataFrame({"image_id": ["digits-0000", "nobody"], "group": ["a", "b"]}).to_csv(groups, index=False)
    completed = run_cli_without_ray("train", str(_study(tmp_path, data.replace("GROUPS", str(groups)))))
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], completed.stderr
    assert not (tmp_path / "results").exists()  # nothing ran


def test_store_records_planted_and_groups_and_the_images_carry_the_patch(tmp_path):
    from conftest import write_image_store
    from raycf.data.image_store import ImageStore, read_groups, read_planted

    plain = study_from_mapping({"name": "t", "data": {"kind": "digits"}})
    planted = study_from_mapping({"name": "t", "data": {"kind": "digits", "plant": {"class": 3, "size": 5, "corner": "bottom_right", "train_rate": 1.0, "other_rate": 0.0}}})
    clean_store = ImageStore(write_image_store(plain, tmp_path / "clean").location)
    store = ImageStore(write_image_store(planted, tmp_path / "planted").location)
    assert read_groups(clean_store, "train") is None and not read_planted(clean_store, "train").any()
    for split in ("train", "val", "test"):
        flags, labels, groups = read_planted(store, split), store.labels(split), read_groups(store, split)
        if split == "train":
            assert np.array_equal(flags, labels == 3)
        assert (store.images(split)[flags][:, -5:, -5:] == 255).all()
        assert np.array_equal(store.images(split)[~flags], clean_store.images(split)[~flags])
        assert set(groups[flags & (labels == 3)]) == {"3 | planted"} and set(groups[~flags & (labels == 0)]) <= {"0 | clean"}


def test_plant_check_rankings_and_top_k_sensitivity_on_a_known_case():
    from raycf.method.plant_check import filter_scores, sensitivity_table

    counts = np.array([[0, 5, 9, 1], [0, 5, 0, 1]])  # class 0 planted; filter 2 is MC for it only, filter 1 for both
    scores = filter_scores(counts, np.array([10, 5]), 0, np.array([[1.0, 1.0, 1.0, 4.0], [1.0, 1.0, 1.0, 4.0]]), np.array([[0.0, 1.0, 0.5, 1.0], [1.0, 0.0, 0.0, 0.0]]))
    assert scores["cfe_frequency"].tolist() == [0, 5, 9, 1]
    assert scores["cfe_specificity"] == pytest.approx([0.0, 0.5 - 1.0, 0.9, 0.1 - 0.2])
    assert scores["attribution"].tolist() == [0.0, 1.0, 0.5, 4.0]
    # Three images; the feature drives filter 2 by 3 and filter 3 by 1.
    sensitivity = np.array([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 3.0, 1.0], [0.0, 0.0, 4.0, 1.0]])
    table = sensitivity_table(sensitivity, scores, ks=(1, 2), bootstrap=500, seed=0).set_index(["ranking", "k"])
    assert table.loc[("cfe_frequency", 1), "sensitivity"] == 3.0 and table.loc[("cfe_frequency", 1), "filters"] == "2"
    assert table.loc[("cfe_specificity", 2), ["sensitivity", "filters"]].tolist() == [1.5, "2,0"]  # specificity 0.9 and 0.0
    assert table.loc[("attribution", 1), "sensitivity"] == 1.0  # a·W ranks filter 3 first
    assert table.loc[("random", 1), "sensitivity"] == pytest.approx(1.0)  # (0 + 0 + 3 + 1) / 4: the expectation
    assert table.loc[("oracle", 1), "sensitivity"] == 3.0
    low, high = table.loc[("cfe_frequency", 1), ["lo", "hi"]]
    assert 2.0 <= low < 3.0 < high <= 4.0  # resampled means of {2, 3, 4}
    assert table.loc[("attribution", 1), "lo"] == table.loc[("attribution", 1), "hi"] == 1.0  # no spread over images
    assert (table["images"] == 3).all()


def test_effect_frame_counts_the_shortcut():
    from raycf.stages.plant_analysis import effect_frame

    labels = np.array([4, 4, 1, 1, 1, 1])
    clean = np.array([1, 4, 1, 1, 1, 1])  # one Coat missed
    planted = np.array([4, 4, 4, 4, 1, 1])  # the patch makes both Coats Coat and two others Coat
    effect = effect_frame(labels, clean, planted, 4, "Coat").set_index("measure")
    assert effect.loc["class_recall", ["clean", "planted"]].tolist() == [0.5, 1.0]
    assert effect.loc["others_as_class", ["clean", "planted"]].tolist() == [0.0, 0.5]
    assert effect.loc["accuracy", "change"] == pytest.approx(4 / 6 - 5 / 6)


def test_the_images_stage_hash_covers_the_plant_and_the_groups_file_by_content(tmp_path):
    from raycf.pipeline import stage_hash

    groups = tmp_path / "groups.csv"
    groups.write_text("image_id,group\ndigits-0000,a\n")
    plain = study_from_mapping({"name": "t", "data": {"kind": "digits"}})
    planted = study_from_mapping({"name": "t", "data": {"kind": "digits", "plant": {"class": 3}}})
    moved = study_from_mapping({"name": "t", "data": {"kind": "digits", "plant": {"class": 3, "corner": "bottom_left"}}})
    grouped = study_from_mapping({"name": "t", "data": {"kind": "digits", "groups": str(groups)}})
    hashes = {stage_hash(study, "images") for study in (plain, planted, moved, grouped)}
    assert len(hashes) == 4
    before = stage_hash(grouped, "images")
    groups.write_text("image_id,group\ndigits-0000,b\n")  # same path, new content
    assert stage_hash(grouped, "images") != before
    assert stage_hash(planted, "analyze") != stage_hash(plain, "analyze")  # downstream follows


def test_a_user_groups_table_reaches_the_store(tmp_path):
    from conftest import write_image_store
    from raycf.data.datasets import load_splits
    from raycf.data.image_store import ImageStore, read_groups, read_planted

    study = study_from_mapping({"name": "t", "data": {"kind": "digits"}})
    chosen = load_splits(study.data, study.seed).test.ids[:3]
    groups = tmp_path / "groups.parquet"
    pd.DataFrame({"image_id": chosen, "group": ["odd", "odd", "even"]}).to_parquet(groups)
    store = ImageStore(write_image_store(study_from_mapping({"name": "t", "data": {"kind": "digits", "groups": str(groups)}}), tmp_path / "store").location)
    test = read_groups(store, "test")
    assert test[:3].tolist() == ["odd", "odd", "even"]
    assert test[3] == str(store.labels("test")[3])  # left out: its class name
    assert not read_planted(store, "test").any()


def test_group_tables_of_several_models_and_seeds_and_their_wide_form():
    from raycf.method.groups import predictions_group_table, split_group_metrics, wide_group_metrics

    groups_of = {"val": np.array(["a", "a", "b", "b"], dtype=object), "test": np.array(["a", "b", "b"], dtype=object)}
    rows = []
    for model, seed, val_preds, test_preds in (("control", 0, [0, 0, 1, 1], [0, 1, 1]), ("control", 1, [0, 1, 1, 0], [1, 1, 1]), ("best", 0, [1, 1, 1, 1], [0, 0, 0])):
        rows += [{"model": model, "seed": seed, "split": "val", "image_index": i, "label": [0, 0, 1, 1][i], "pred": p} for i, p in enumerate(val_preds)]
        rows += [{"model": model, "seed": seed, "split": "test", "image_index": i, "label": [0, 1, 1][i], "pred": p} for i, p in enumerate(test_preds)]
    table = predictions_group_table(pd.DataFrame(rows), groups_of)
    assert len(table) == 3 * 2 * 2 and (table.groupby(["model", "seed", "split"])["images"].sum().unstack()[["val", "test"]] == [4, 3]).all().all()
    wide = wide_group_metrics(table).set_index(["model", "seed"])
    assert wide.loc[("control", 0), ["val_worst_group_acc", "test_worst_group_acc"]].tolist() == [1.0, 1.0]
    assert wide.loc[("control", 1), ["val_worst_group_acc", "val_mean_group_acc", "test_worst_group_acc"]].tolist() == [0.5, 0.5, 0.0]
    assert wide.loc[("best", 0), ["val_worst_group_acc", "val_mean_group_acc", "test_mean_group_acc"]].tolist() == [0.0, 0.5, 0.5]
    one = predictions_group_table(pd.DataFrame(rows).query("model == 'best'").drop(columns=["model", "seed"]), groups_of)
    assert split_group_metrics(one) == {"val_worst_group_acc": 0.0, "val_mean_group_acc": 0.5, "test_worst_group_acc": 0.0, "test_mean_group_acc": 0.5}
