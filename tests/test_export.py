"""raycf export of raycf's own VGG (the digits smoke study): TorchScript, and the state_dict formats refused with the reason."""

from __future__ import annotations

import json

import numpy as np
import torch

from raycf.results.artefacts import debugged_model_bytes, load_results_study
from raycf.models.checkpoint import parse_classifier_checkpoint
from raycf.cli import main
from raycf.data.image_store import ImageStore
from raycf.models.build import classifier_from_checkpoint
from raycf.data.views import model_inputs


def test_raycfs_vgg_exports_as_torchscript_and_refuses_a_state_dict(smoke_study_results, tmp_path, capsys):
    results = str(smoke_study_results)
    for fmt in ("pt", "safetensors"):
        out = tmp_path / f"model.{fmt}"
        code = main(["export", results, "--format", fmt, "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and f"--format {fmt}: raycf's vgg_tiny is its conv trunk, a 2×2 max pool, GAP" in err
        assert "expected --format torchscript" in err and not out.exists()
    code = main(["export", results, "--format", "onnx", "--out", str(tmp_path / "model.onnx")])
    assert code == 2 and "--format onnx: expected one of pt, safetensors, torchscript" in capsys.readouterr().err
    out = tmp_path / "model.ts"
    assert main(["export", results, "--format", "torchscript", "--out", str(out)]) == 0
    study = load_results_study(results)
    images = torch.from_numpy(np.array(ImageStore(smoke_study_results / "images").images("test")[:16])).permute(0, 3, 1, 2)
    inputs = model_inputs(images, study.data.image_size, preprocess=study.data.preprocess)
    trial_id, model_bytes = debugged_model_bytes(results)
    model = classifier_from_checkpoint(study.model, parse_classifier_checkpoint(model_bytes, "debugged"))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(out))(inputs), model(inputs), rtol=0, atol=1e-5)
    sidecar = json.loads((tmp_path / "model.ts.json").read_text())
    assert sidecar["arch"] == "vgg_tiny" and sidecar["trial_id"] == trial_id and sidecar["class_names"] == [str(d) for d in range(10)]
