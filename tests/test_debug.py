"""Debug retraining (METHOD §5, raycf.training.debug): the loop, its control, ties, recovery.

Unit tests run the loop in this process (``workers=0``) on 16-pixel digits and
a random-init vgg_tiny; only the 2-worker DDP run, the tie run and the fault
injection run use the shared Ray cluster.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import write_image_store
from raycf.models.checkpoint import ClassifierCheckpoint, parse_classifier_checkpoint
from raycf.config import study_from_mapping, with_values
from raycf.data.image_store import StoredImages, open_store
from raycf.method.debug_loss import DebugLoss
from raycf.models.build import build_model
from raycf.training import debug
from raycf.training.loops import train_one_epoch
from raycf.data.views import model_inputs

METRICS = {"epoch", "train_loss", "train_ce", "train_mc", "train_nonmc", "train_acc", "val_loss", "val_acc", "active_mc", "active_nonmc"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny digits study (16 px, 288 training images) with its image store, a random-init base model and random G."""
    folder = tmp_path_factory.mktemp("debug")
    study = study_from_mapping(
        {
            "name": "t",
            "storage_path": str(folder / "results"),
            "data": {"kind": "digits", "image_size": 16, "test_fraction": 0.8, "val_fraction": 0.2},
            "model": {"arch": "vgg_tiny", "dropout": 0.2},
            "debug": {"epochs": 2, "batch_size": 32, "lr": 0.01, "workers": 1, "max_failures": 1},
        }
    )
    images = write_image_store(study, folder / "images")
    torch.manual_seed(0)
    model = build_model(study.model, 10)
    calibrate_batchnorm(model, PlainImages(images, "train", 16))
    base_bytes = ClassifierCheckpoint(
        arch="vgg_tiny", num_filters=64, num_classes=10, class_names=[str(d) for d in range(10)], image_size=16, config_hash="x", state_dict=model.state_dict()
    ).to_bytes()
    global_filters = np.random.default_rng(0).random((10, 64)) < 0.4
    return study, images, base_bytes, global_filters, folder


class PlainImages(torch.utils.data.Dataset):
    """A split of the image store as plain model inputs: ``(3×size×size float, label)``."""

    def __init__(self, images, split: str, size: int):
        self.stored, self.size = StoredImages(open_store(images), split), size

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, index: int):
        image, label, _ = self.stored[index]
        return model_inputs(image[None], self.size)[0], label


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, dataset) -> None:
    """Running statistics of every BatchNorm over ``dataset``, as a trained model would have them."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size=96):
        model(images)
    for norm in norms:
        norm.momentum = 0.1
    model.eval()


def _run(tiny, lambdas, name, workers=0, fail_once=None, prefix=None):
    study, images, base_bytes, global_filters, folder = tiny
    job = debug.DebugJob(
        study=study, global_filters=global_filters, base_model=base_bytes, lambda1=lambdas[0], lambda2=lambdas[1], fail_once=fail_once, images=images, prefix=prefix
    )
    return debug.run_debug_training(job, name=name, storage_path=str(folder / "ray"), workers=workers)


# ------------------------------------------------------------- the training loop


def _assert_best_is_the_highest_val_acc_then_the_lowest_val_loss(result) -> None:
    """The run's best epoch, checked from its history without the code that chose it."""
    top = max(row["val_acc"] for row in result.history)
    lowest_loss = min(row["val_loss"] for row in result.history if row["val_acc"] == top)
    chosen = next(row for row in result.history if row["epoch"] == result.best_epoch)
    assert (chosen["val_acc"], chosen["val_loss"]) == (top, lowest_loss) and result.best_val_acc == top
    assert parse_classifier_checkpoint(result.best_model_bytes).metrics["epoch"] == result.best_epoch  # the kept checkpoint is that epoch's


def test_control_and_debugged_runs_see_the_same_batches(tiny, monkeypatch):
    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    real = debug.train_one_epoch

    def recording(model, loader, optimizer, loss_fn, *args, **options):
        epoch: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen.append(epoch)

        def passthrough():
            for images, labels in loader:
                epoch.append((images.clone(), labels.clone()))
                yield images, labels

        return real(model, passthrough(), optimizer, loss_fn, *args, **options)

    monkeypatch.setattr(debug, "train_one_epoch", recording)
    control = _run(tiny, (0.0, 0.0), "order-control")
    debugged = _run(tiny, (0.5, 0.5), "order-debug")
    assert len(seen) == 4  # two runs × two epochs
    for control_epoch, debugged_epoch in zip(seen[:2], seen[2:]):
        assert len(control_epoch) == len(debugged_epoch) == math.ceil(288 / 32)
        for (images_c, labels_c), (images_d, labels_d) in zip(control_epoch, debugged_epoch):
            assert torch.equal(labels_c, labels_d)
            assert torch.equal(images_c, images_d)  # same order and same augmentation draws
    assert not torch.equal(seen[0][0][1], seen[1][0][1])  # the order changes from epoch to epoch
    # on the same data, the debugging terms did their job: the reward λ1·mc − λ2·nonmc rose more
    def reward(row):
        return 0.5 * row["train_mc"] - 0.5 * row["train_nonmc"]

    assert reward(debugged.history[-1]) - reward(debugged.history[0]) > reward(control.history[-1]) - reward(control.history[0])
    assert debugged.history[-1]["train_nonmc"] < control.history[-1]["train_nonmc"]


def test_an_order_seed_draws_another_data_order_and_the_studys_seed_the_same(tiny, monkeypatch):
    """The final stage's retraining seeds (``DebugJob.order_seed``): the study's own seed is today's run, another one another draw."""
    labels: list[torch.Tensor] = []
    real = debug.train_one_epoch

    def recording(model, loader, optimizer, loss_fn, *args, **options):
        def passthrough():
            for images, batch_labels in loader:
                labels.append(batch_labels.clone())
                yield images, batch_labels

        return real(model, passthrough(), optimizer, loss_fn, *args, **options)

    monkeypatch.setattr(debug, "train_one_epoch", recording)
    study, images, base_bytes, global_filters, folder = tiny
    runs = {}
    for order_seed in (None, study.seed, study.seed + 1):
        labels.clear()
        job = debug.DebugJob(study=study, global_filters=global_filters, base_model=base_bytes, lambda1=0.0, lambda2=0.0, images=images, order_seed=order_seed)
        result = debug.run_debug_training(job, name=f"order-seed-{order_seed}", storage_path=str(folder / "ray"), workers=0)
        runs[order_seed] = (torch.cat(labels), result.history[-1]["train_loss"])
    assert torch.equal(runs[None][0], runs[study.seed][0]) and runs[None][1] == runs[study.seed][1]
    assert not torch.equal(runs[None][0], runs[study.seed + 1][0]) and runs[None][1] != runs[study.seed + 1][1]


def test_in_process_run_reports_every_metric_and_keeps_the_best_checkpoint(tiny):
    result = _run(tiny, (0.016, 3.2e-4), "local", workers=0)
    assert parse_classifier_checkpoint(result.best_model_bytes).metrics["epoch"] == result.best_epoch
    assert [row["epoch"] for row in result.history] == [1, 2]
    for row in result.history:
        assert METRICS <= set(row)
        assert 0 <= row["active_mc"] <= 64 and 0 <= row["active_nonmc"] <= 64
        assert row["active_mc"] + row["active_nonmc"] <= 64
        assert row["train_loss"] == pytest.approx(row["train_ce"] - 0.016 * row["train_mc"] + 3.2e-4 * row["train_nonmc"], rel=1e-6)
    _assert_best_is_the_highest_val_acc_then_the_lowest_val_loss(result)


def test_centred_indicator_counts_fewer_active_filters_than_the_paper_one(tiny):
    study = tiny[0]
    centred_study = with_values(study, {"debug.indicator": "centred", "debug.epochs": 1})
    paper = _run((with_values(study, {"debug.epochs": 1}), *tiny[1:]), (0.016, 3.2e-4), "paper")
    centred = _run((centred_study, *tiny[1:]), (0.016, 3.2e-4), "centred")
    paper_active = paper.history[0]["active_mc"] + paper.history[0]["active_nonmc"]
    centred_active = centred.history[0]["active_mc"] + centred.history[0]["active_nonmc"]
    # paper: every non-zero filter is active; centred: those above their training mean, about half
    assert centred_active < paper_active
    assert 0.2 * 64 < centred_active < 0.8 * 64


def test_filter_statistics_are_the_training_mean_and_std(tiny):
    study, images, base_bytes, _, _ = tiny
    checkpoint = parse_classifier_checkpoint(base_bytes)
    model = build_model(study.model, 10, load_weights=False)
    model.load_state_dict(checkpoint.state_dict)
    loader = torch.utils.data.DataLoader(PlainImages(images, "train", 16), batch_size=100)
    stats = debug.filter_statistics(model, loader, torch.device("cpu"))
    with torch.no_grad():
        activations = torch.cat([model.features(images) for images, _ in loader])
    assert torch.allclose(stats.mean, activations.mean(0), atol=1e-5)
    assert torch.allclose(stats.std, activations.std(0, unbiased=False), atol=1e-5)


@pytest.mark.parametrize("scope", ["head", "last_conv_and_head", "all"])
def test_gradients_reach_the_trainable_scope_only(tiny, scope):
    study, images, base_bytes, global_filters, _ = tiny
    train = PlainImages(images, "train", 16)
    checkpoint = parse_classifier_checkpoint(base_bytes)
    model = build_model(study.model, 10, load_weights=False)
    model.load_state_dict(checkpoint.state_dict)
    trainable = {id(p) for p in model.set_trainable(scope)}
    before = {name: value.clone() for name, value in model.state_dict().items()}
    images = torch.stack([train[i][0] for i in range(32)])
    labels = torch.tensor([train[i][1] for i in range(32)])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    loss_fn = DebugLoss(torch.as_tensor(global_filters, dtype=torch.float32), 0.5, 0.05)
    train_one_epoch(model, [(images, labels)] * 2, optimizer, loss_fn, freeze_frozen_norms=True)
    after = model.state_dict()
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], after[name])
        assert changed == (id(parameter) in trainable), name
        assert (parameter.grad is not None) == (id(parameter) in trainable), name
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d) and not module.weight.requires_grad:
            assert torch.equal(before[f"{name}.running_mean"], after[f"{name}.running_mean"]), name  # frozen layers stay frozen


def test_head_only_debugging_equals_the_control(tiny):
    """The MC terms act on the pooled vector, which the head does not change: same update as λ = 0."""
    study, store, base_bytes, global_filters, _ = tiny
    train = PlainImages(store, "train", 16)
    images = torch.stack([train[i][0] for i in range(16)])
    labels = torch.tensor([train[i][1] for i in range(16)])
    heads = []
    for lambdas in ((0.0, 0.0), (0.5, 0.05)):
        model = build_model(study.model, 10, load_weights=False)
        model.load_state_dict(parse_classifier_checkpoint(base_bytes).state_dict)
        optimizer = torch.optim.SGD(model.set_trainable("head"), lr=0.1)
        torch.manual_seed(1)
        train_one_epoch(model, [(images, labels)], optimizer, DebugLoss(torch.as_tensor(global_filters, dtype=torch.float32), *lambdas))
        heads.append(model.fc.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])


# ------------------------------------------------------------- Ray cluster runs


def test_two_worker_ddp_run_keeps_the_best_validation_checkpoint(tiny, ray_session):
    study, _, base_bytes, _, _ = tiny
    result = _run(tiny, (0.016, 3.2e-4), "ddp", workers=2)
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert all(METRICS <= set(row) for row in result.history)
    _assert_best_is_the_highest_val_acc_then_the_lowest_val_loss(result)
    saved = parse_classifier_checkpoint(result.best_model_bytes, expected_arch="vgg_tiny", expected_classes=10)
    assert saved.metrics["epoch"] == result.best_epoch
    # last_conv_and_head: the trunk below the last conv block is the base's, bit for bit
    base = parse_classifier_checkpoint(base_bytes).state_dict
    model = build_model(study.model, 10, load_weights=False)
    # (the state dict names the last conv block twice: as trunk.<i> and as last_conv.<j>)
    in_scope = tuple(f"trunk.{i}." for i, layer in enumerate(model.trunk) if any(layer is part for part in model.last_conv)) + ("last_conv.", "fc.")
    assert len(in_scope) == 4
    frozen = [name for name in base if not name.startswith(in_scope)]
    assert all(torch.equal(base[name], saved.state_dict[name]) for name in frozen)
    assert all(not torch.equal(base[name], saved.state_dict[name]) for name in base if name.startswith(in_scope) and "num_batches" not in name)


def test_a_run_whose_epochs_all_tie_keeps_its_first_epochs_checkpoint(tiny, ray_session):
    # head only at a vanishing learning rate: the weights, hence val_acc and val_loss, never change
    study = with_values(tiny[0], {"debug.epochs": 3, "debug.trainable": "head", "debug.lr": 1e-12})
    result = _run((study, *tiny[1:]), (0.0, 0.0), "ties", workers=1)
    assert len({(row["val_acc"], row["val_loss"]) for row in result.history}) == 1  # every epoch tied
    assert result.best_epoch == 1  # the rule: the earlier epoch
    assert parse_classifier_checkpoint(result.best_model_bytes).metrics["epoch"] == 1  # and Ray kept that one


def test_worker_failure_resumes_from_the_checkpoint(tiny, ray_session, tmp_path):
    study = with_values(tiny[0], {"debug.epochs": 3})
    marker = tmp_path / "failed-once"
    result = _run((study, *tiny[1:]), (0.016, 3.2e-4), "fault", workers=1, fail_once=debug.FailOnce(epoch=1, marker=str(marker)))
    assert marker.exists()  # the failure did happen
    assert [row["epoch"] for row in result.history] == [1, 2, 3]  # every epoch exactly once
    failed_at = marker.stat().st_mtime
    # epoch 1 was trained before the failure and restored, not retrained; 2 and 3 after it
    assert result.history[0]["time"] < failed_at < result.history[1]["time"] < result.history[2]["time"]
    # the kept model is the best epoch's under the tie rule, epochs before the failure included
    _assert_best_is_the_highest_val_acc_then_the_lowest_val_loss(result)


def test_a_one_worker_run_that_failed_resumes_from_its_checkpoint_when_started_again(tiny, ray_session, tmp_path):
    # No retries: the run's one Tune trial fails at epoch 2 and fit raises; the same run started again
    # (as a resubmitted stage is) restores the trial and trains epochs 2 and 3 only.
    study = with_values(tiny[0], {"debug.epochs": 3, "debug.max_failures": 0})
    marker = tmp_path / "failed-once"
    with pytest.raises(RuntimeError, match="^resume: the training run failed: RuntimeError: injected failure at the start of epoch 2$"):
        _run((study, *tiny[1:]), (0.016, 3.2e-4), "resume", workers=1, fail_once=debug.FailOnce(epoch=1, marker=str(marker)))
    failed_at = marker.stat().st_mtime
    result = _run((study, *tiny[1:]), (0.016, 3.2e-4), "resume", workers=1, fail_once=debug.FailOnce(epoch=1, marker=str(marker)))
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert result.history[0]["time"] < failed_at < result.history[1]["time"]  # epoch 1 restored, not retrained
    _assert_best_is_the_highest_val_acc_then_the_lowest_val_loss(result)


# ---------------------------------------------------------------- stage and CLI


def test_debug_stage_and_command_are_registered():
    from raycf.cli import build_parser
    from raycf.config import StudyConfig
    from raycf.stages import stage_named

    stage = stage_named("debug")
    assert stage.upstream == ("masks", "prefix")  # what it reads: tests/test_stage_reads.py, from the fields its code reads
    study = StudyConfig(name="t")
    assert study.section_hash(*stage.reads) != with_values(study, {"tau": 0.5}).section_hash(*stage.reads)  # debug.tau
    assert study.section_hash(*stage.reads) != with_values(study, {"freq_threshold": 0.1}).section_hash(*stage.reads)  # debug.freq_threshold
    for detection in ({"analysis.freq_threshold": 0.3}, {"analysis.tau": 0.5}):  # detection's τ and f retrain nothing
        assert study.section_hash(*stage.reads) == with_values(study, detection).section_hash(*stage.reads)
    args = build_parser().parse_args(["debug", "s.yaml", "--set", "debug.lambda1=0.1", "analysis.tau=0.8"])
    assert args.stage == "debug" and args.overrides == ["debug.lambda1=0.1", "analysis.tau=0.8"]
