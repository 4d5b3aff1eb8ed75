"""``raycf explain``: bundles whose numbers are the study's masks Parquet rows, any image file without a cluster, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import run_cli_without_ray
from raycf.cli import main
from raycf.outputs.explain import BUNDLE_FILES
from raycf.results.artefacts import load_masks_frame

REPO = Path(__file__).resolve().parent.parent


def _with_lower_tau(results: Path, tmp_path: Path) -> tuple[Path, float]:
    """A copy of the smoke study whose analysis.tau lets a quarter of the good training images in.

    The smoke study's 2-epoch model is never 90 % sure, so at the study's τ every
    global set is empty and every agreement score 0; a lower τ makes them real.
    """
    copy = tmp_path / "digits"
    shutil.copytree(results, copy, ignore=shutil.ignore_patterns("_ray", "report", "features", "search", "final"))
    train = load_masks_frame(str(copy), "train")
    good = train[(train["pred"] == train["label"]) & (train["masked_pred"] == train["label"])]
    tau = float(np.quantile(good["confidence"], 0.25))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["analysis"]["tau"] = tau
    (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return copy, tau


def _global_sets(train, num_classes: int, tau: float, freq: float) -> tuple[np.ndarray, np.ndarray]:
    """METHOD §3 written out again: counts of MC filters over accepted training images, G_c = counts > f · max."""
    accepted = (train["pred"] == train["label"]) & (train["confidence"] >= tau) & (train["masked_pred"] == train["label"])
    counts = np.zeros((num_classes, len(train["mc_mask"].iloc[0])))
    for label, mask in zip(train["label"][accepted], train["mc_mask"][accepted]):
        counts[label] += mask
    return counts > freq * counts.max(axis=1, keepdims=True), accepted


def _f1(local: np.ndarray, reference: np.ndarray) -> float:
    total = local.sum() + reference.sum()
    return 2 * (local & reference).sum() / total if total else 0.0


def test_bundle_numbers_are_the_masks_parquet_rows(smoke_study_results, tmp_path):
    results, tau = _with_lower_tau(smoke_study_results, tmp_path)
    config = yaml.safe_load((results / "config.yaml").read_text())
    freq, skip = config["analysis"]["freq_threshold"], config["analysis"]["skip_threshold"]
    train = load_masks_frame(str(results), "train")
    sets, accepted = _global_sets(train, 10, tau, freq)
    test, val = load_masks_frame(str(results), "test"), load_masks_frame(str(results), "val")
    covered = test[[bool(sets[p].any()) for p in test["pred"]]]
    rows = [covered[covered["pred"] == covered["label"]].iloc[0], covered[covered["pred"] != covered["label"]].iloc[0], val.iloc[0]]
    out = tmp_path / "bundles"
    assert main(["explain", str(results), *(row["image_id"] for row in rows), "--out", str(out)]) == 0

    # The study's own detection row (Avg. F1 at the study's skip and f): class averages over accepted training images.
    train_f1 = np.array([_f1(mask, sets[label]) for mask, label in zip(train["mc_mask"], train["label"])])
    for row in rows:
        bundle = out / row["image_id"]
        assert sorted(p.name for p in bundle.iterdir()) == sorted(BUNDLE_FILES)
        explanation = json.loads((bundle / "explanation.json").read_text())
        assert explanation["input"] == {
            "argument": row["image_id"], "kind": "dataset", "image_id": row["image_id"], "split": row["split"],
            "image_index": int(row["image_index"]), "label": int(row["label"]), "label_name": str(row["label"]),
        }  # fmt: skip
        prediction = explanation["prediction"]
        assert prediction["class"] == row["pred"] and prediction["correct"] == (row["pred"] == row["label"])
        assert prediction["confidence"] == pytest.approx(float(row["confidence"]), abs=1e-5)
        assert sorted(f["filter"] for f in explanation["mc_filters"]) == np.flatnonzero(row["mc_mask"]).tolist()
        assert explanation["mc_size"] == row["mc_size"] == len(explanation["mc_filters"])
        for entry in explanation["mc_filters"]:
            assert entry["activation"] == pytest.approx(float(row["a"][entry["filter"]]), rel=1e-4, abs=1e-5)
            assert entry["in_global"] == bool(sets[row["pred"], entry["filter"]])
        contributions = [f["contribution"] for f in explanation["mc_filters"]]
        assert contributions == sorted(contributions, reverse=True)
        assert explanation["masked_prediction"]["class"] == row["masked_pred"]
        assert explanation["masked_prediction"]["confidence"] == pytest.approx(float(row["masked_confidence"]), abs=1e-5)
        topk = explanation["topk"]
        assert [c["class"] for c in topk] == row["topk_classes"].tolist()
        assert [c["probability"] for c in topk] == pytest.approx(row["topk_probs"].tolist(), abs=1e-5)
        assert [c["mc_filters"] for c in topk] == [np.flatnonzero(mask).tolist() for mask in row["topk_mc_masks"]]
        assert [c["masked_pred"] for c in topk] == row["topk_masked_preds"].tolist()

        local, reference = np.asarray(row["mc_mask"]), sets[row["pred"]]
        assert explanation["global_filters"]["filters"] == np.flatnonzero(reference).tolist()
        intersection = (local & reference).sum()
        assert explanation["agreement"]["f1"] == pytest.approx(_f1(local, reference))
        assert explanation["agreement"]["recall"] == pytest.approx(intersection / reference.sum())
        assert explanation["agreement"]["precision"] == pytest.approx(intersection / local.sum() if local.sum() else 0.0)
        of_class = accepted & (train["label"] == row["pred"])
        threshold = train_f1[of_class].mean() if of_class.any() else np.nan
        flagged = bool(row["confidence"] <= skip and _f1(local, reference) < threshold)
        own = explanation["detection"][-1]
        assert own["setting"] == "study: Avg. F1" and own["flagged"] == flagged == explanation["flagged"]
        assert own["threshold"] == (None if np.isnan(threshold) else pytest.approx(threshold))
        candidates = [_f1(np.asarray(mask), sets[c]) for mask, c in zip(row["topk_mc_masks"], row["topk_classes"])]
        assert [c["score"] for c in topk] == pytest.approx(candidates)
        expected_class = int(row["topk_classes"][int(np.argmax(candidates))]) if flagged else int(row["pred"])
        assert explanation["reranking"]["class"] == expected_class

        runner = explanation["runner_up"]
        assert runner["class"] == row["topk_classes"][1]
        assert all(f["delta"] > 0 for f in runner["mi_filters"])
        assert sum(explanation["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        text = (bundle / "explanation.md").read_text()
        assert f"predicted **{row['pred']}**" in text and "MC filters" in text
        image = Image.open(bundle / "explanation.png")
        assert image.width > 3 * image.height  # image, Grad-CAM and the top MC filters side by side

    manifest = json.loads((out / rows[0]["image_id"] / "manifest.json").read_text())
    from raycf.models.checkpoint import load_classifier_checkpoint
    from raycf.results.artefacts import load_results_study
    from raycf.results.manifest import versions

    assert manifest["checkpoint_config_hash"] == load_classifier_checkpoint(str(results / "base" / "model.pt")).config_hash
    assert manifest["study_config_hash"] == load_results_study(str(results)).config_hash()
    assert manifest["versions"] == versions()


def test_explain_any_image_file_on_cpu_without_ray(smoke_study_results, tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, size=(30, 41, 3), dtype=np.uint8)
    first, second = tmp_path / "a" / "photo.png", tmp_path / "b" / "photo.jpg"
    for path in (first, second):
        path.parent.mkdir()
        Image.fromarray(pixels).save(path)
    out = tmp_path / "bundles"
    completed = run_cli_without_ray("explain", str(smoke_study_results), str(first), str(second), "--out", str(out))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert len(completed.stdout.strip().splitlines()) == 2
    assert sorted(p.name for p in out.iterdir()) == ["photo", "photo-2"]  # same stem, two bundles
    for path, name in ((first, "photo"), (second, "photo-2")):
        explanation = json.loads((out / name / "explanation.json").read_text())
        assert explanation["input"]["kind"] == "file" and explanation["input"]["path"] == str(path.resolve())
        assert explanation["input"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        probabilities = np.array(explanation["probabilities"])
        assert probabilities.sum() == pytest.approx(1.0, abs=1e-5)
        assert explanation["prediction"]["class"] == probabilities.argmax()
        assert explanation["prediction"]["confidence"] == pytest.approx(probabilities.max(), abs=1e-6)
        assert explanation["prediction"]["correct"] is None
        assert explanation["mc_size"] == len(explanation["mc_filters"])
        assert explanation["topk"][0]["mc_filters"] == sorted(f["filter"] for f in explanation["mc_filters"])
        Image.open(out / name / "explanation.png").verify()


@pytest.mark.parametrize("kind", ["corrupt png", "text file", "unknown id", "folder"])
def test_bad_image_is_one_line_and_exit_2(smoke_study_results, tmp_path, capsys, kind):
    bad = {
        "corrupt png": tmp_path / "broken.png",
        "text file": tmp_path / "notes.txt",
        "unknown id": "digits-99999",
        "folder": tmp_path / "folder",
    }[kind]
    if kind == "corrupt png":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    elif kind == "text file":
        bad.write_text("not an image\n")
    elif kind == "folder":
        bad.mkdir()
    out = tmp_path / "bundles"
    # A good image first: nothing is written when any argument is bad.
    code = main(["explain", str(smoke_study_results), "digits-0000", str(bad), "--out", str(out)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("raycf: error: ") and str(bad) in lines[0]
    assert not out.exists()
