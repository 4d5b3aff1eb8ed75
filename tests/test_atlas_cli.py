"""``raycf atlas`` and the report's atlas section on the digits smoke study, and the suppression treatment's study checks.

The atlas tests run on a copy of the session's smoke study (``smoke_study_results``): the CLI in a fresh process
that must not start Ray, its cards checked against the study's own masks.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli_without_ray
from raycf.config import study_from_mapping
from raycf.errors import UserError


@pytest.fixture(scope="module")
def atlas_results(smoke_study_results, tmp_path_factory):
    """A copy of the smoke study's results (the atlas reads masks, the CFE bank, the base model and the image store)."""
    folder = tmp_path_factory.mktemp("atlas") / "digits"
    shutil.copytree(smoke_study_results, folder, ignore=shutil.ignore_patterns("report", ".staging", "_ray", "logs", "search", "prefix"))
    return folder


def test_raycf_atlas_writes_a_classs_cards_and_their_numbers_are_the_studys(atlas_results, tmp_path):
    from raycf.results.artefacts import load_masks

    done = run_cli_without_ray("atlas", str(atlas_results), "--class", "3", "--out", str(tmp_path / "atlas"))
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "atlas" / "3"
    assert done.stdout.strip() == f"{folder}: atlas.png, atlas.json, atlas.md"
    assert (folder / "atlas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((folder / "atlas.json").read_text())
    assert record["class"] == "3" and record["class_index"] == 3 and record["cards"]
    # counts: the analysis's global-MC accumulation at analysis.tau
    global_mc = pd.read_parquet(atlas_results / "analysis" / "global_mc.parquet")
    counts = global_mc[global_mc["class"] == 3].set_index("filter")["count"]
    assert record["accepted_train_images"] == int(global_mc[global_mc["class"] == 3]["images"].iloc[0])
    train = load_masks(str(atlas_results), "train", ["a", "label", "image_id"])
    val = load_masks(str(atlas_results), "val", ["label", "pred"])
    assert record["val_errors_predicted_as_class"] == int(((val["pred"] == 3) & (val["label"] != 3)).sum())
    by_id = {str(image_id): row for row, image_id in enumerate(train["image_id"])}
    for card in record["cards"]:
        assert card["count"] == int(counts.loc[card["filter"]])
        rows = [by_id[image_id] for image_id in card["image_ids"]]
        shown = train["a"][rows, card["filter"]]
        np.testing.assert_allclose(card["activations"], shown, rtol=1e-6)
        # the top-activating images: no training image outside them activates the filter more than the last one shown
        assert list(shown) == sorted(shown, reverse=True)
        others = np.delete(train["a"][:, card["filter"]], rows)
        assert others.max() <= shown[-1]
        assert card["image_labels"] == [str(train["label"][row]) for row in rows]
        assert card["planted_share"] is None and card["planted_response"] is None  # not a planted study
    for card in record["cards"]:
        if card["ranking"] == "error":
            assert card["error_share"] > card["correct_share"]
    assert (folder / "atlas.md").read_text().startswith("# Filter atlas of class 3\n")


def test_raycf_atlas_refuses_an_unknown_class_in_one_line_listing_the_classes(atlas_results, tmp_path):
    done = run_cli_without_ray("atlas", str(atlas_results), "--class", "Coat", "--out", str(tmp_path / "atlas"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["raycf: error: --class Coat: unknown class 'Coat' (the study's classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9)"]
    assert not (tmp_path / "atlas").exists()


def test_the_reports_atlas_section_draws_every_class(atlas_results):
    from raycf.outputs.atlas import atlas_section
    from raycf.outputs.report.blocks import ReportContext
    from raycf.results.artefacts import load_results_study

    section = atlas_section(ReportContext(str(atlas_results), load_results_study(str(atlas_results))))
    assert [figure.name for figure in section.figures] == [f"atlas_{index}" for index in range(10)]
    assert all(figure.png[:4] == b"\x89PNG" for figure in section.figures)


# ------------------------------------------------------------------ the treatments' study checks


def study(**sections):
    return study_from_mapping({"name": "t", **sections})


def test_treatments_need_seeds_filters_and_a_weight_each_in_one_line():
    cases = [
        ({"final": {"treatments": ["suppress_auto"]}}, "treatments need seeds > 1"),
        ({"final": {"seeds": 2, "treatments": ["suppress"]}}, "final.treatments: suppress needs the filters of debug.suppress"),
        ({"final": {"seeds": 2, "treatments": ["suppress_auto"]}, "debug": {"suppress_weight": 0}}, "needs debug.suppress_weight > 0"),
        ({"final": {"seeds": 2, "treatments": ["suppress", "suppress"]}, "debug": {"suppress": [1]}}, "treatments names a treatment twice"),
        ({"debug": {"suppress": {"Coat": [2, 2]}}}, "expected distinct filter indices >= 0 (got [2, 2])"),
    ]
    for sections, message in cases:
        with pytest.raises(UserError) as error:
            study(**sections)
        assert message in str(error.value) and "\n" not in str(error.value)
    searched = study(final={"seeds": 2, "treatments": ["suppress_auto"]}, debug={"suppress_weight": 0}, search={"space": {"debug.suppress_weight": {"loguniform": [1e-3, 1]}}})
    assert searched.final.treatments == ("suppress_auto",)
    assert study(debug={"suppress": {3: [1, 2]}}).debug.suppress == {"3": (1, 2)}  # YAML reads class 3 as a number


def test_a_filter_index_beyond_k_stops_the_study_before_anything_runs(tmp_path, capsys):
    from raycf.cli import main

    code = main(["study", "studies/digits.yaml", "--smoke", "--set", f"storage_path={tmp_path}", "debug.suppress={3: [5, 64]}"])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["raycf: error: debug.suppress.3: filter 64 does not exist (the model has K = 64 filters: expected indices 0 to 63)"]
    assert list(tmp_path.iterdir()) == []


def test_treatment_points_are_the_control_plus_the_suppression_weight_and_the_best_trials_weight_when_searched():
    from raycf.stages.final import seed_points
    from raycf.stages.treatments import treatment_points

    best = pd.Series({"lambda1": 0.5, "lambda2": 0.01, "tau": 0.8, "freq_threshold": 0.1, "debug.suppress_weight": 0.7})
    plain = study(debug={"suppress": [4], "suppress_weight": 0.2}, final={"seeds": 2, "treatments": ["suppress"]})
    points = seed_points(plain, best) | treatment_points(plain, "unused", best)
    assert points["suppress"] == {"lambda1": 0.0, "lambda2": 0.0, "debug.suppress_weight": 0.2, "tau": 0.9, "freq_threshold": 0.0}
    assert points["control"]["debug.suppress_weight"] == 0.0 and points["reference"]["debug.suppress_weight"] == 0.0
    assert points["best"]["debug.suppress_weight"] == 0.7  # the best trial's own value
    unsearched = best.copy()
    unsearched["debug.suppress_weight"] = None  # the leaderboard's cell of a parameter a trial was not given
    assert (seed_points(plain, unsearched) | treatment_points(plain, "unused", unsearched))["best"]["debug.suppress_weight"] == 0.2
    searched = study(debug={"suppress": [4]}, final={"seeds": 2, "treatments": ["suppress"]}, search={"space": {"debug.suppress_weight": {"uniform": [0.1, 1]}}})
    assert treatment_points(searched, "unused", best)["suppress"]["debug.suppress_weight"] == 0.7


def test_the_planted_hooks_give_each_card_its_planted_share_and_response(atlas_results, monkeypatch):
    """What a planted study wires in: the planted flag per training image and each image with and without the feature."""
    from raycf.outputs import atlas as atlas_module

    source = atlas_module.AtlasSource.load(str(atlas_results))
    planted = np.zeros(len(source.train["label"]), dtype=bool)
    planted[::2] = True  # every other training image
    pixels = source.store.images("train")
    monkeypatch.setattr(atlas_module, "planted_mask", lambda results: planted)
    monkeypatch.setattr(atlas_module, "planted_versions", lambda results, indices: (pixels[indices], np.zeros_like(pixels[indices])))
    atlas = source.atlas(3, top_filters=1, top_images=4)
    assert atlas.cards
    for card in atlas.cards:
        assert card.planted_share == pytest.approx(np.mean([row % 2 == 0 for row in card.image_rows]))
        # the images as the model sees them give the card's own activations; a black image gives the filter's floor
        black = source.activations(np.zeros_like(pixels[:1]), card.filter)[0]
        assert card.planted_response == pytest.approx(np.mean(card.activations) - black, abs=1e-3)
