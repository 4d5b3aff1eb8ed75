"""The CFE generator bank (raycf.method.bank) and its training on cached vectors (raycf.training.cfe)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raycf.results.arrow import vector_column
from raycf.results.artefacts import AUGMENTED_FOLDER, EMPTY_MARKER, load_bank
from raycf.config import CfeConfig, study_from_mapping
from raycf.errors import UserError
from raycf.method.bank import (
    CfeBank,
    CfeModel,
    LossWeights,
    bank_from_model,
    bank_loss,
    class_statistics,
    mc_loss,
    mi_loss,
    parse_bank,
    thresholded_relu,
)
from raycf.training.cfe import CfeJob, cfe_train_loop, epoch_order, report_epochs
from raycf.training.trainer import run_local

# Two filters, two classes; the weights are zero so the masks come from the biases alone:
# generator 0: s = sigmoid([2, -2]) = [0.881, 0.119] -> m = [0.881, 0]
# generator 1: s = sigmoid([0, 1])  = [0.5, 0.731]   -> m = [0 (0.5 is not > 0.5), 0.731]
BIAS = torch.tensor([[2.0, -2.0], [0.0, 1.0]])
HEAD_W = torch.eye(2)
HEAD_B = torch.zeros(2)
WEIGHTS = LossWeights(mc_sparsity=0.064, mc_logits=0.032, mi_sparsity=0.064)


def tiny_model() -> CfeModel:
    model = CfeModel(num_classes=2, num_filters=2, train_mi=True, seed=0)
    with torch.no_grad():
        model.mc.weight.zero_()
        model.mc.bias.copy_(BIAS)
        model.mi.weight.zero_()
        model.mi.bias.copy_(torch.tensor([[0.5, -1.0], [-1.0, 2.0]]))
    return model


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_loss_weights_are_the_reference_batch_sums_made_per_sample():
    weights = LossWeights.from_config(CfeConfig(sparsity=2.0, logits_weight=0.001, ref_batch_size=32, mi_sparsity=1.0))
    assert weights.mc_sparsity == pytest.approx(0.064)
    assert weights.mc_logits == pytest.approx(0.032)
    assert weights.mi_sparsity == pytest.approx(0.032)


def test_thresholded_relu_keeps_only_values_above_one_half_and_passes_gradient_only_there():
    values = torch.tensor([0.2, 0.5, 0.5001, 0.9], requires_grad=True)
    out = thresholded_relu(values)
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.5001, 0.9])
    out.sum().backward()
    assert values.grad.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_mc_loss_terms_match_a_hand_computation():
    model = tiny_model()
    a = torch.tensor([[1.0, 2.0]])
    masks, _ = model(a)
    assert masks[0].flatten().tolist() == pytest.approx([sigmoid(2), 0.0, 0.0, sigmoid(1)])
    loss, parts = mc_loss(masks, a, HEAD_W, HEAD_B, WEIGHTS)
    # generator 0: logits [0.881, 0] target 0; generator 1: logits [0, 2·0.731] target 1
    z0, z1 = sigmoid(2), 2 * sigmoid(1)
    ce0, ce1 = math.log(1 + math.exp(-z0)), math.log(1 + math.exp(-z1))
    expected = (ce0 + 0.064 * sigmoid(2) - 0.032 * z0) + (ce1 + 0.064 * sigmoid(1) - 0.032 * z1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert float(parts["mc_ce"]) == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    assert float(parts["mc_l1"]) == pytest.approx((sigmoid(2) + sigmoid(1)) / 2, rel=1e-6)
    assert float(parts["mc_logit"]) == pytest.approx((z0 + z1) / 2, rel=1e-6)


def test_mc_loss_is_a_per_sample_mean_so_it_does_not_depend_on_the_batch_size():
    model = tiny_model()
    with torch.no_grad():
        model.mc.weight.copy_(torch.tensor([[[0.3, -0.2], [0.1, 0.4]], [[-0.5, 0.2], [0.3, 0.1]]]))
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 3.0]])
    single = [mc_loss(model(x)[0], x, HEAD_W, HEAD_B, WEIGHTS)[0].item() for x in (a, b)]
    both = torch.cat([a, b])
    assert mc_loss(model(both)[0], both, HEAD_W, HEAD_B, WEIGHTS)[0].item() == pytest.approx(sum(single) / 2, rel=1e-6)


def test_masked_out_filters_get_no_gradient():
    model = tiny_model()
    a = torch.tensor([[1.0, 2.0]])
    loss, _ = bank_loss(model, a, HEAD_W, HEAD_B, WEIGHTS)
    loss.backward()
    bias_grad = model.mc.bias.grad
    assert bias_grad[0, 1] == 0 and bias_grad[1, 0] == 0  # s ≤ 0.5: thresholded away
    assert bias_grad[0, 0] != 0 and bias_grad[1, 1] != 0


def test_mi_loss_terms_match_a_hand_computation():
    model = tiny_model()
    a = torch.tensor([[1.0, 2.0]])
    _, deltas = model(a)
    assert deltas[0].flatten().tolist() == pytest.approx([0.5, 0.0, 0.0, 2.0])
    loss, parts = mi_loss(deltas, a, HEAD_W, HEAD_B, WEIGHTS)
    # generator 0: logits a + δ = [1.5, 2] target 0; generator 1: [1, 4] target 1
    ce0, ce1 = math.log(1 + math.exp(0.5)), math.log(1 + math.exp(-3.0))
    assert loss.item() == pytest.approx(ce0 + 0.064 * 0.5 + ce1 + 0.064 * 2.0, rel=1e-6)
    assert float(parts["mi_l1"]) == pytest.approx(1.25)


def bank_of(model: CfeModel) -> CfeBank:
    return bank_from_model(model, HEAD_W, HEAD_B, ["zero", "one"])


def test_bank_binarises_masks_and_selects_classes():
    bank = bank_of(tiny_model())
    a = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
    assert bank.mc_masks(a).shape == (2, 2, 2)
    assert bank.mc_masks(a, torch.tensor([0, 1])).tolist() == [[True, False], [False, True]]
    assert bank.mc_masks(a, torch.tensor([[1, 0], [0, 1]])).tolist() == [[[False, True], [True, False]], [[True, False], [False, True]]]
    # masked prediction uses the 0/1 mask: a ⊙ [1, 0] = [1, 0] -> class 0
    masks = bank.mc_masks(a, torch.tensor([0, 0]))
    assert bank.masked_logits(a, masks).tolist() == [[1.0, 0.0], [3.0, 0.0]]
    assert bank.mi_filters(a, torch.tensor([1, 1])).tolist() == [[False, True], [False, True]]
    assert bank.empty_mask_prediction() == 0


def test_bank_file_round_trip_and_bad_files(tmp_path: Path):
    bank = bank_of(tiny_model())
    again = parse_bank(bank.to_bytes())
    assert torch.equal(again.mc_weight, bank.mc_weight) and torch.equal(again.mi_bias, bank.mi_bias)
    assert again.class_names == ["zero", "one"]
    (tmp_path / "cfe").mkdir()
    with pytest.raises(UserError, match="CFE bank not found"):
        load_bank(str(tmp_path))
    with pytest.raises(UserError, match="not a loadable raycf CFE bank"):
        parse_bank(b"not a torch file")
    with pytest.raises(UserError, match="not a raycf CFE bank"):
        parse_bank(_saved({"format": "other"}))
    without_mi = parse_bank(CfeBank(bank.mc_weight, bank.mc_bias, HEAD_W, HEAD_B).to_bytes())
    with pytest.raises(UserError, match="no MI generators"):
        without_mi.mi_deltas(torch.ones(1, 2))


def _saved(payload) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    order = epoch_order(10, seed=3, epoch=1)
    assert sorted(order.tolist()) == list(range(10))
    assert torch.equal(order, epoch_order(10, 3, 1))
    assert not torch.equal(order, epoch_order(10, 3, 2))


def test_report_epochs_are_few_and_include_the_last():
    assert report_epochs(40) == {8, 16, 24, 32, 40}
    assert report_epochs(3) == {1, 2, 3}
    assert report_epochs(7) == {1, 2, 3, 4, 5, 6, 7}


# ------------------------------------------------------ training (local mode)

NUM_CLASSES, NUM_FILTERS = 3, 6


def synthetic_results(folder: Path) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A results folder with cached training vectors: class c is carried by filters 2c and 2c+1."""
    generator = np.random.default_rng(0)
    labels = np.repeat(np.arange(NUM_CLASSES), 20)
    a = generator.uniform(0.0, 0.3, size=(len(labels), NUM_FILTERS)).astype(np.float32)
    a[np.arange(len(labels)), 2 * labels] += 1.0
    a[np.arange(len(labels)), 2 * labels + 1] += 1.0
    head_weight = torch.zeros(NUM_CLASSES, NUM_FILTERS)
    for c in range(NUM_CLASSES):
        head_weight[c, 2 * c : 2 * c + 2] = 2.0
    head_bias = torch.zeros(NUM_CLASSES)
    logits = a @ head_weight.numpy().T
    table = pa.table(
        {
            "image_index": pa.array(np.arange(len(labels)), pa.int64()),
            "image_id": pa.array([f"img-{i}" for i in range(len(labels))]),
            "split": pa.array(["train"] * len(labels)),
            "label": pa.array(labels, pa.int64()),
            "view": pa.array(np.zeros(len(labels)), pa.int32()),
            "pred": pa.array(logits.argmax(1), pa.int64()),
            "confidence": pa.array(np.ones(len(labels)), pa.float32()),
            "logits": vector_column(logits, pa.float32()),
            "a": vector_column(a, pa.float32()),
        }
    )
    (folder / "features" / "train").mkdir(parents=True)
    pq.write_table(table, folder / "features" / "train" / "part-0.parquet")
    (folder / "features" / AUGMENTED_FOLDER).mkdir()
    (folder / "features" / AUGMENTED_FOLDER / EMPTY_MARKER).write_text("")  # one view per image
    return str(folder), head_weight, head_bias


def without_speed(history: list[dict]) -> list[dict]:
    """A history without its measured speeds (images_per_s), which no two runs share."""
    return [{key: value for key, value in row.items() if key != "images_per_s"} for row in history]


def train_bank(results: str, head_weight: torch.Tensor, head_bias: torch.Tensor, out: Path, seed: int = 0) -> dict:
    study = study_from_mapping(
        {"name": "t", "seed": seed, "cfe": {"epochs": 30, "lr": 0.05, "batch_size": 8, "sparsity": 2.0, "workers": 0}}
    )
    job = CfeJob(study=study, results=results, head_weight=head_weight, head_bias=head_bias, class_names=["a", "b", "c"], bank_location=str(out))
    return run_local(cfe_train_loop, job, out.parent / f"run-{out.stem}").return_value


def test_bank_training_on_cached_vectors_learns_sparse_masks_and_is_deterministic(tmp_path: Path):
    results, head_weight, head_bias = synthetic_results(tmp_path)
    outcome = train_bank(results, head_weight, head_bias, tmp_path / "bank1.pt")
    again = train_bank(results, head_weight, head_bias, tmp_path / "bank2.pt")
    first, second = parse_bank((tmp_path / "bank1.pt").read_bytes()), parse_bank((tmp_path / "bank2.pt").read_bytes())
    assert torch.equal(first.mc_weight, second.mc_weight) and torch.equal(first.mi_weight, second.mi_weight)
    assert without_speed(outcome["history"]) == without_speed(again["history"])
    assert [row["epoch"] for row in outcome["history"]] == sorted(report_epochs(30))
    assert min(outcome["classes"]["mc_agreement"]) >= 0.95
    # Generator c keeps (one of) class c's two filters and almost nothing else.
    a = torch.from_numpy(pq.read_table(tmp_path / "features" / "train").column("a").combine_chunks().flatten().to_numpy().reshape(-1, NUM_FILTERS).copy())
    masks = first.mc_masks(a).float()  # N×C×K
    for c in range(NUM_CLASSES):
        own = masks[:, c, 2 * c : 2 * c + 2]
        assert (own.sum(dim=1) > 0).float().mean() >= 0.95
        assert own.sum() / masks[:, c].sum() >= 0.9
    assert float(masks.sum(dim=2).mean()) < 2
    statistics = class_statistics(first, a)
    assert statistics["mc_agreement"].tolist() == pytest.approx(outcome["classes"]["mc_agreement"])
