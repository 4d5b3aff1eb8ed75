"""The study file: YAML in, a validated, typed :class:`StudyConfig` out.

Validation happens here, once, at the edge.  Everything inside raycf takes the
typed objects defined below.  Each field's default and meaning is written next
to it (``description=``); ``raycf study --help`` points to this module and the
README's study file reference is generated from the same descriptions.

Overrides:
  * ``--set KEY=VALUE``: a dotted path into the study (``base.epochs=3``); the
    value is parsed as YAML, so ``3`` is an int, ``1e-3`` a float, ``[1, 2]`` a
    list and ``none``/``null`` null.
  * ``--smoke``: applies the study file's own ``smoke:`` block (same dotted or
    nested form) before ``--set``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raycf.runtime import field_reads
from raycf.models.architectures import VGG_TINY, accepted_names, family_of, refused_names
from raycf.errors import UserError

DATASET_KINDS = ("digits", "fashion_mnist", "cub200", "imagefolder")

# Short names for the parameters the paper's method is searched over; any other
# searched parameter is named by its dotted path in the study (``debug.lr``,
# ``debug.indicator``).  ``tau`` and ``freq_threshold`` are the τ and f of
# retraining's global sets (``debug.tau``, ``debug.freq_threshold``), those the
# search's objective depends on; detection has its own (``analysis.*``).
PARAMETER_ALIASES = {
    "lambda1": "debug.lambda1",
    "lambda2": "debug.lambda2",
    "tau": "debug.tau",
    "freq_threshold": "debug.freq_threshold",
}

# The fields a search trial consumes: retraining's own settings.  Everything
# else is read upstream of the search (cfe.*, masks.*, base.*, data.*, the
# prefix cache's debug.views and debug.trainable), only displayed (analysis.*)
# or a resource: searching it would change nothing or mean something else.
SEARCHABLE_FIELDS = (
    "debug.lambda1",
    "debug.lambda2",
    "debug.tau",
    "debug.freq_threshold",
    "debug.indicator",
    "debug.epochs",
    "debug.lr",
    "debug.momentum",
    "debug.batch_size",
    "debug.suppress_weight",
)


def searchable_names() -> str:
    """What ``search.space`` accepts, as one comma-separated list (aliases first)."""
    aliased = set(PARAMETER_ALIASES.values())
    return ", ".join([*PARAMETER_ALIASES, *(path for path in SEARCHABLE_FIELDS if path not in aliased)])


# What --smoke applies before the study file's own smoke: block (tiny epochs and
# trial counts), so that any study, even one that names only its data and model,
# runs end to end on a CPU.
DEFAULT_SMOKE = {"base.epochs": 1, "cfe.epochs": 1, "debug.epochs": 2, "search.num_samples": 2}

UNHASHED = "not part of stage hashes"


def resource_field(default: Any, description: str, **constraints: Any) -> Any:
    """A field that changes where or how fast work runs, not its results: left out of every stage hash."""
    return Field(default, description=f"{description} (resource only: {UNHASHED})", json_schema_extra={"hashed": False}, **constraints)


def is_hashed(field: Any) -> bool:
    """Whether a model field enters stage hashes (see :func:`resource_field`)."""
    extra = field.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("hashed") is False)


def names_as_text(names: Any) -> Any:
    """YAML reads class names such as 0 … 9 as numbers: take them as the names they spell."""
    if isinstance(names, (list, tuple)):
        return tuple(str(name) if isinstance(name, int) and not isinstance(name, bool) else name for name in names)
    return names


class StrictModel(BaseModel):
    """Base of every config section: unknown fields are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


if field_reads.enabled():  # testing aid: record which fields each stage reads
    StrictModel.__getattribute__ = field_reads.recording_getattribute  # type: ignore[method-assign]


class AugmentConfig(StrictModel):
    """Training-time augmentation (METHOD §1: shift 0.2, rotation 15°, shear 0.2, zoom 0.2)."""

    rotation: float = Field(15.0, ge=0, le=180, description="max rotation in degrees")
    shift: float = Field(0.2, ge=0, lt=1, description="max shift as a fraction of the image size")
    shear: float = Field(0.2, ge=0, le=45, description="max shear angle in degrees (Keras semantics: the reference's 0.2 is a tiny shear)")
    zoom: float = Field(0.2, ge=0, lt=1, description="max zoom in or out, as a fraction")
    hflip: bool = Field(False, description="random horizontal flips")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS_FROM_WEIGHTS = ("resize", "interpolation", "mean", "std")


class PreprocessConfig(StrictModel):
    """How the evaluation image is made from a source image (:mod:`raycf.data.preprocess`); training augmentation comes after it."""

    mode: Literal["squash", "resize_crop", "weights"] = Field(
        "squash",
        description="squash: the whole image resized to a square (raycf's own models); resize_crop: torchvision's evaluation transform, "
        "the shorter side resized to resize, then a centre crop of data.image_size; weights: resize_crop with the resize ratio, "
        "interpolation, mean and std of model.arch's pretrained weights (torchvision's weights.transforms(), timm's resolve_data_config)",
    )
    resize: int = Field(0, ge=0, description="resize_crop: the shorter side before the centre crop; 0 picks data.image_size·256/224")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = Field("bilinear", description="how images are resized (antialiased)")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="per-channel mean of the normalisation (RGB, images in [0, 1])")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="per-channel standard deviation of the normalisation")

    @model_validator(mode="after")
    def _positive_std(self) -> "PreprocessConfig":
        if any(value <= 0 for value in self.std):
            raise ValueError(f"data.preprocess.std must be positive (got {list(self.std)})")
        return self


FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts it


class DataConfig(StrictModel):
    """Where the images come from, how they are split, stored and augmented."""

    kind: Literal["digits", "fashion_mnist", "cub200", "imagefolder"] = Field(
        "digits",
        description="digits (embedded, scikit-learn), fashion_mnist (IDX files, Debian's dataset-fashion-mnist), "
        "cub200 (official CUB_200_2011 folder) or imagefolder",
    )
    root: str | None = Field(
        None, description=f"dataset folder; required for cub200 and imagefolder; fashion_mnist defaults to {FASHION_MNIST_ROOT}"
    )
    image_size: int = Field(0, ge=0, description="side of the square model input in pixels; 0 picks 32 for digits and fashion_mnist, 224 otherwise")
    stored_side: int = Field(
        0, ge=0, description="side of the decoded uint8 images the images stage stores; 0 picks image_size for digits and fashion_mnist, 8/7 of it otherwise (256 for 224)"
    )
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of the training split held out for validation, by seed")
    test_fraction: float = Field(
        0.6, gt=0, lt=1, description="digits only: share of the 1,797 images held out as the test split (stratified)"
    )
    max_per_split: int = Field(
        0, ge=0, description="the most images kept per split, a stratified sample by seed (0: every image); for smoke runs of large datasets"
    )
    bbox_crop: bool = Field(False, description="cub200 only: crop each image to its bounding_boxes.txt box")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig, description="how evaluation images are made (augmentation comes after)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="training augmentation")
    decode_actors: int = resource_field(2, "CPU actors of the images stage that decode and resize the dataset", gt=0)
    loader_workers: int = resource_field(0, "DataLoader worker processes per training worker (they only slice the uint8 store)", ge=0)

    @model_validator(mode="after")
    def _root_and_size(self) -> "DataConfig":
        if self.kind == "fashion_mnist" and not self.root:
            object.__setattr__(self, "root", FASHION_MNIST_ROOT)
        if self.kind != "digits" and not self.root:
            raise ValueError(f"data.root is required for data.kind={self.kind} (expected the dataset folder)")
        if self.image_size == 0:
            object.__setattr__(self, "image_size", 32 if self.kind in ("digits", "fashion_mnist") else 224)
        if self.image_size < 8:
            raise ValueError(f"data.image_size must be at least 8 pixels (got {self.image_size})")
        if self.stored_side and self.stored_side < self.image_size:
            raise ValueError(f"data.stored_side must be at least data.image_size ({self.image_size}; got {self.stored_side})")
        if self.preprocess.mode != "squash" and self.stored_side not in (0, self.image_size):
            raise ValueError(f"data.stored_side: with data.preprocess.mode {self.preprocess.mode} the stored image is the crop (expected 0 or data.image_size, {self.image_size})")
        if self.preprocess.mode == "resize_crop" and self.preprocess.resize == 0:
            object.__setattr__(self.preprocess, "resize", round(self.image_size * 256 / 224))
        if self.preprocess.mode == "resize_crop" and self.preprocess.resize < self.image_size:
            raise ValueError(f"data.preprocess.resize must be at least data.image_size ({self.image_size}; got {self.preprocess.resize})")
        return self


class ModelConfig(StrictModel):
    """The classifier (METHOD §1 contract)."""

    arch: str = Field(
        VGG_TINY,
        description=f"{accepted_names(markdown=True)}; vgg_tiny is a small VGG-style net for CPUs, the others torchvision's names; "
        f"refused: {refused_names(markdown=True)} (their heads are not linear in pooled filters)",
    )
    weights: str = Field(
        "none",
        description="none (random init), imagenet (torchvision's or timm's weights from the local cache, under a new head), "
        "or a path: a raycf checkpoint, or a torchvision or timm state_dict of model.arch",
    )
    weights_trunk_only: bool = Field(
        False,
        description="with a state_dict in model.weights: adopt its trunk under a new head (its own head is dropped and its class count not "
        "checked); needed for a torchvision VGG state_dict, whose head is three FC layers",
    )
    weights_prefix: str | None = Field(
        None,
        description="the key prefix of the model's weights in model.weights (e.g. model. in a Lightning checkpoint, whose LightningModule holds "
        "the network as self.model): stripped, and keys outside it ignored; left out, a prefix is found when exactly one fits model.arch",
    )
    class_names: tuple[str, ...] | None = Field(
        None,
        description="the class order of a state_dict's head when it is not the dataset's sorted class order: the dataset's classes, "
        "each once; the head's rows are put in the dataset's order",
    )
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout before the linear head (training only)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="arithmetic of training and inference: auto is bf16 on a CUDA device that supports it, fp32 on the CPU; fp16 adds a GradScaler"
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        family_of(arch)  # a ValueError names the accepted families, or why this one is refused
        return arch

    _class_names_as_text = field_validator("class_names", mode="before")(names_as_text)


class BaseConfig(StrictModel):
    """Base training of the classifier (Ray Train, data-parallel)."""

    train: bool = Field(True, description="false: use model.weights as the base model as is (no training)")
    epochs: int = Field(20, gt=0, description="epochs of training all layers")
    lr: float = Field(0.01, gt=0, description="SGD learning rate for all layers")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="learning rate over each phase: constant (the reference) or cosine decay")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")
    batch_size: int = Field(64, gt=0, description="global batch size (split across workers)")
    head_epochs: int = Field(0, ge=0, description="epochs of head-only training before all layers (the CUB recipe: 50)")
    head_lr: float = Field(1e-3, gt=0, description="SGD learning rate of the head-only phase")
    workers: int = Field(2, ge=1, description="Ray Train data-parallel workers")
    eval_batch_size: int = resource_field(256, "images per validation batch", gt=0)
    use_gpu: bool = resource_field(False, "one GPU per worker")
    max_failures: int = resource_field(2, "worker-group restarts from the last checkpoint before giving up", ge=0)


class FeaturesConfig(StrictModel):
    """Pooled vectors and logits for every image (Ray Data actor pool)."""

    batch_size: int = resource_field(256, "images per inference batch", gt=0)
    actors: int = resource_field(2, "actors in the pool, each holding the classifier", gt=0)
    use_gpu: bool = resource_field(False, "one GPU per actor")


class CfeConfig(StrictModel):
    """The counterfactual filter generators (METHOD §2), one per class, trained as a bank."""

    sparsity: float = Field(2.0, ge=0, description="λ of the MC sparsity term, μ1 = 0.001·λ·ref_batch_size")
    logits_weight: float = Field(0.001, ge=0, description="per-reference-batch weight of the logits term, μ2 = logits_weight·ref_batch_size")
    ref_batch_size: int = Field(32, gt=0, description="the reference's batch size that turns its batch sums into per-sample weights")
    mi_sparsity: float = Field(2.0, ge=0, description="λ of the MI sparsity term")
    train_mi: bool = Field(True, description="also train the MI (additive) generators used by explanations")
    epochs: int = Field(10, gt=0, description="epochs over the cached training vectors")
    lr: float = Field(1e-3, gt=0, description="SGD learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    batch_size: int = Field(32, gt=0, description="vectors per step")
    views: int = Field(4, ge=1, description="views per training image: view 0 plain, the rest augmented")
    workers: int = Field(1, ge=0, description="Ray Train workers, each training the generators of its share of the classes (no all-reduce); 0: in the calling process, no worker start-up")
    use_gpu: bool = resource_field(False, "one GPU per worker")
    max_failures: int = resource_field(2, "worker-group restarts from the last checkpoint before giving up", ge=0)


class MasksConfig(StrictModel):
    """Per-image MC masks (Ray Data over the cached vectors)."""

    batch_size: int = resource_field(256, "vectors per batch", gt=0)
    actors: int = resource_field(2, "actors in the pool, each holding the generator bank", gt=0)
    topk: int = Field(5, gt=0, description="classes whose masks are computed per image")
    use_gpu: bool = resource_field(False, "one GPU per actor (vectors only: seconds of work, a GPU rarely pays)")


DetectionMetric = Literal["recall", "precision", "f1", "magnitude", "head_weight"]


class DetectionSetting(StrictModel):
    """One row of the detection table (paper Table 1)."""

    metric: DetectionMetric = Field(description="agreement score between the image's MC set and its class's global set")
    threshold: Union[Literal["avg"], float] = Field(
        "avg", description="avg: the mean score of the class's accepted training images; or an absolute value"
    )
    skip_threshold: float = Field(0.9, ge=0, le=1, description="predictions more confident than this are never flagged (0: none skipped)")
    freq_threshold: float = Field(0.15, ge=0, le=1, description="f of the global set used by this row")


PAPER_DETECTION_SETTINGS = (
    DetectionSetting(metric="recall", threshold="avg", skip_threshold=0.9, freq_threshold=0.15),
    DetectionSetting(metric="f1", threshold="avg", skip_threshold=0.9, freq_threshold=0.15),
    DetectionSetting(metric="recall", threshold=0.3, skip_threshold=0.0, freq_threshold=0.0),
)


class AnalysisConfig(StrictModel):
    """Global MC filters and misclassification detection (METHOD §3–4)."""

    tau: float = Field(0.9, ge=0, le=1, description="confidence gate τ of detection's global sets: training images accumulated when predicted right with at least this confidence (retraining has debug.tau)")
    freq_threshold: float = Field(0.15, ge=0, le=1, description="f of detection: a filter is in G_c if seen in more than f·max of the class's accepted images; the G of the AUROC scores and of the study's own detection row (retraining has debug.freq_threshold)")
    skip_threshold: float = Field(0.9, ge=0, le=1, description="skip threshold of the study's own detection score")
    settings: tuple[DetectionSetting, ...] = Field(PAPER_DETECTION_SETTINGS, description="rows of the detection table")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples (over images, seeded by the study seed) behind the 95 % intervals of AUROC and AUPR and of AUROC differences; 0: no intervals")


class DebugConfig(StrictModel):
    """Debug retraining with L_d and its λ = 0 control (METHOD §5)."""

    lambda1: float = Field(1.6e-2, ge=0, description="per-sample weight rewarding global-MC activity (reference: 1e-3 per batch of 16)")
    lambda2: float = Field(3.2e-4, ge=0, description="per-sample weight penalising non-MC activity (reference: 2e-5 per batch of 16)")
    tau: float = Field(0.9, ge=0, le=1, description="τ of retraining's global sets: the confidence gate for accumulating training images into G_c (the paper's 0.9; detection has analysis.tau)")
    freq_threshold: float = Field(0.0, ge=0, le=1, description="f of retraining: G_c = filters seen in more than f·max of the class's accepted images (the reference retrains with 0: any filter seen once)")
    indicator: Literal["paper", "centred"] = Field("paper", description="paper: thresholded sigmoid of a; centred: standardised per filter first")
    trainable: Literal["last_conv_and_head", "head", "all"] = Field("last_conv_and_head", description="layers retrained")
    epochs: int = Field(20, gt=0, description="epochs")
    views: int = Field(4, ge=1, description="views of each training image retraining draws from, one per image per epoch: view 0 plain, the rest augmented with fixed seeds (what the prefix cache holds)")
    lr: float = Field(1e-4, gt=0, description="SGD learning rate")
    suppress: tuple[int, ...] | dict[str, tuple[int, ...]] = Field(
        (),
        description="filters (indices < K, e.g. from `raycf atlas`) whose activity retraining penalises: a list for every image, or class name -> "
        "list for the images of that class; penalised in every debug retraining when suppress_weight > 0 (never in the control or the final stage's reference run)",
    )
    suppress_weight: float = Field(
        0.1, ge=0, description="w of the suppression penalty w · mean_i Σ_k S_{y_i,k} · max(a_ik, 0) (debug.suppress and final.treatments); searchable (debug.suppress_weight)"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    batch_size: int = Field(16, gt=0, description="global batch size")
    workers: int = Field(
        1,
        ge=1,
        description="data-parallel workers of each retraining; also decides how a search or final trial runs: 1 trains inside its own Tune trial "
        "(no worker group to start; Tune retries it and ASHA stops it), more drives a TorchTrainer (DDP) from a light driver (search.driver_cpus)",
    )
    eval_batch_size: int = resource_field(256, "images per batch of validation and of the final predictions", gt=0)
    use_gpu: bool = resource_field(False, "one GPU per worker")
    gpus_per_trial: float = resource_field(
        1.0, "with use_gpu, the share of a GPU a single-worker search trial reserves: 0.25 packs four small trials on one GPU", gt=0, le=1
    )
    max_failures: int = resource_field(2, "retries of a failed run or trial from its last checkpoint", ge=0)

    @field_validator("suppress", mode="before")
    @classmethod
    def _suppress_keys_as_text(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(key): filters if isinstance(filters, (list, tuple)) else [filters] for key, filters in value.items()}
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list of filter indices, or class name -> list of filter indices (got {value!r})")
        return value

    @field_validator("suppress")
    @classmethod
    def _suppress_filters(cls, value: Any) -> Any:
        for filters in value.values() if isinstance(value, dict) else [value]:
            if any(index < 0 for index in filters) or len(set(filters)) != len(filters):
                raise ValueError(f"expected distinct filter indices >= 0 (got {list(filters)})")
        return value


class PrefixConfig(StrictModel):
    """The frozen-prefix cache: what retraining's frozen layers compute, computed once per base model (Ray Data)."""

    enabled: bool = Field(True, description="retrain on the cache when debug.trainable leaves layers frozen (last_conv_and_head, head); all trains without it")
    dtype: Literal["float16", "float32"] = Field("float16", description="storage of the cached activations (float16: half the size, ~5e-4 relative error per value)")
    max_gb: float = resource_field(20.0, "the largest cache a study may write; a larger one is refused before anything runs", gt=0)
    batch_size: int = resource_field(128, "images per inference batch", gt=0)
    actors: int = resource_field(2, "actors in the pool, each holding the classifier", gt=0)
    use_gpu: bool = resource_field(False, "one GPU per actor")


class Distribution(StrictModel):
    """One searched parameter's distribution: exactly one of the keys."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    int: tuple[int, int] | None = None
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Distribution":
        given = [name for name in ("uniform", "loguniform", "int", "choice") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of uniform, loguniform, int, choice")
        bounds = getattr(self, given[0])
        if given[0] != "choice" and not bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]} bounds must be increasing (got {list(bounds)})")
        if given[0] == "loguniform" and bounds[0] <= 0:
            raise ValueError(f"loguniform bounds must be positive (got {list(bounds)})")
        if given[0] == "choice" and not bounds:
            raise ValueError("choice needs at least one value")
        return self


class AshaConfig(StrictModel):
    """Asynchronous successive halving on the per-epoch objective."""

    grace_period: int = Field(2, gt=0, description="epochs before a trial can be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA's halving rate")


class SchedulerConfig(StrictModel):
    """Early stopping of weak trials."""

    asha: AshaConfig | None = Field(default_factory=AshaConfig, description="ASHA early stopping on the per-epoch metric; null: none")


class SearchConfig(StrictModel):
    """Ray Tune + Optuna over the debugging parameters."""

    num_samples: int = Field(16, gt=0, description="trials, the control included")
    max_concurrent: int = Field(2, gt=0, description="trials running at once")
    metric: str = Field("val_acc", description="objective reported per epoch; also picks the best epoch of every retraining (debug, search, final)")
    seed: int | None = Field(None, ge=0, description="seed of the TPE sampler; null: the study's seed (a new search.seed searches again without re-splitting or retraining anything upstream)")
    mode: Literal["max", "min"] = Field("max", description="direction of the objective")
    space: dict[str, Distribution] | None = Field(
        None,
        description="searched parameters: lambda1, lambda2, tau, freq_threshold (= debug.lambda1, debug.lambda2, debug.tau, debug.freq_threshold) "
        f"or another field a trial consumes ({', '.join(SEARCHABLE_FIELDS[4:])}); "
        "left out: the default space (lambda1 loguniform [1e-4, 1], lambda2 loguniform [1e-6, 0.1], tau uniform [0.5, 0.99], freq_threshold uniform [0, 0.5])",
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="early stopping")
    storage: str | None = Field(None, description="Optuna storage URL (SQLAlchemy); default: sqlite optuna.db in the results folder")
    include_control: bool = Field(True, description="evaluate λ1 = λ2 = 0 as the first, fixed point")
    deterministic: bool = Field(
        False,
        description="one trial at a time (max_concurrent ignored): ASHA's stop decisions and TPE's proposals follow trial order, "
        "so a rerun reproduces the search; false: max_concurrent trials at once, and ASHA's asynchronous decisions depend on timing",
    )
    pareto: tuple[str, str] = Field(
        ("val_acc", "det_auroc"),
        description="the two metrics of `raycf leaderboard --pareto` and of the report's Pareto figure (both maximised); display only: "
        "hashed by the report stage alone, no search reruns for it",
        json_schema_extra={"hashed": False},
    )
    driver_cpus: float = resource_field(0.1, "CPUs reserved by the driver of a multi-worker trial (it only waits on its TorchTrainer)", gt=0)
    driver_resources: dict[str, float] = resource_field(
        {}, "extra Ray resources the driver of a multi-worker trial asks for (pins such drivers to the head on a cluster)"
    )

    @field_validator("space")
    @classmethod
    def _known_parameters(cls, space: dict[str, Distribution] | None) -> dict[str, Distribution] | None:
        if space is None:
            return None
        if not space:
            raise ValueError("no searched parameters (expected e.g. lambda1: {loguniform: [1.0e-4, 1.0]}; leave search.space out to search the default space)")
        for name in space:
            if PARAMETER_ALIASES.get(name, name) not in SEARCHABLE_FIELDS:
                raise ValueError(f"{name!r} cannot be searched: a trial does not consume it (searchable: {searchable_names()})")
        return space


    @property
    def concurrency(self) -> int:
        """Trials running at once: 1 in the deterministic mode, else ``max_concurrent``."""
        return 1 if self.deterministic else self.max_concurrent

    @property
    def searched_space(self) -> dict[str, Distribution]:
        """The space the search explores: ``space``, or :data:`DEFAULT_SPACE` when the study leaves it out."""
        return dict(self.space) if self.space is not None else dict(DEFAULT_SPACE)


# The search space of a study that names none: METHOD §5's λ (1.6e-2, 3.2e-4 per
# image) and the paper's τ = 0.9 and f ∈ {0, 0.15} lie inside it.
DEFAULT_SPACE = {
    "lambda1": Distribution(loguniform=(1e-4, 1.0)),
    "lambda2": Distribution(loguniform=(1e-6, 1e-1)),
    "tau": Distribution(uniform=(0.5, 0.99)),
    "freq_threshold": Distribution(uniform=(0.0, 0.5)),
}


class FinalConfig(StrictModel):
    """The final test evaluation: the best searched trial against the control, and optionally against it over several seeds."""

    seeds: int = Field(
        1,
        ge=1,
        description="retraining seeds per model: 1 evaluates the best searched trial and the control as the search trained them; "
        "n > 1 also retrains the control, the study's own λ (debug.lambda1, debug.lambda2) and the best trial's parameters n times "
        "each (seed 0's control and best trial are the search's own models), with the data order, the view drawn per epoch and dropout "
        "seeded by seed + 0 … n − 1, and reports paired 95 % intervals "
        "of their test and validation accuracy differences",
    )
    class_group: tuple[str, ...] = Field(
        (),
        description="class names (as the dataset names them, e.g. [Shirt, T-shirt/top, Pullover, Coat]) whose per-class test recall "
        "change over the seeds is summarised together (final/group_recall.parquet); needs seeds > 1; checked against the dataset's "
        "classes before anything runs",
    )

    treatments: tuple[Literal["suppress", "suppress_auto"], ...] = Field(
        (),
        description="retrained beside the control and the study's λ over the seeds (needs seeds > 1), each plain fine-tuning plus the suppression "
        "penalty at debug.suppress_weight: suppress (the filters of debug.suppress), suppress_auto (final.suppress_auto error-specific filters per class)",
    )

    suppress_auto: int = Field(
        3, gt=0, description="the suppress_auto treatment's filters per class: the k most error-specific (the atlas's ranking on the validation split's MC masks)"
    )

    _names_as_text = field_validator("class_group", mode="before")(names_as_text)

    @model_validator(mode="after")
    def _treatments_need_seeds(self) -> "FinalConfig":
        if len(set(self.treatments)) != len(self.treatments):
            raise ValueError(f"treatments names a treatment twice (got {list(self.treatments)})")
        if self.treatments and self.seeds == 1:
            raise ValueError("treatments need seeds > 1 (each is compared with the control over retraining seeds)")
        return self

    @model_validator(mode="after")
    def _group_needs_seeds(self) -> "FinalConfig":
        if len(set(self.class_group)) != len(self.class_group):
            raise ValueError(f"class_group names a class twice (got {list(self.class_group)})")
        if self.class_group and self.seeds == 1:
            raise ValueError("class_group needs seeds > 1 (the group's recall change is summarised over retraining seeds)")
        return self


class StudyConfig(StrictModel):
    """A whole study: data, model, and every stage's settings."""

    name: str = Field(description="study name; results go to <storage_path>/<name>/")
    storage_path: str = Field("results", description="local folder or pyarrow filesystem URI (s3://...) holding results")
    seed: int = Field(0, ge=0, description="seed of splits, initialisation, data order and the search")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    base: BaseConfig = Field(default_factory=BaseConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    cfe: CfeConfig = Field(default_factory=CfeConfig)
    masks: MasksConfig = Field(default_factory=MasksConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    prefix: PrefixConfig = Field(default_factory=PrefixConfig)
    debug: DebugConfig = Field(default_factory=DebugConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    final: FinalConfig = Field(default_factory=FinalConfig)
    smoke: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides applied by --smoke (tiny epochs and trial counts), after raycf's own: " + ", ".join(f"{key}={value}" for key, value in DEFAULT_SMOKE.items()),
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"name must be letters, digits, '_', '.', '-' (got {name!r})")
        return name

    @model_validator(mode="after")
    def _treatments_have_filters(self) -> "StudyConfig":
        treatments, debug = self.final.treatments, self.debug
        if "suppress" in treatments and not debug.suppress:
            raise ValueError("final.treatments: suppress needs the filters of debug.suppress (expected e.g. debug.suppress=[3, 17])")
        if treatments and debug.suppress_weight == 0 and "debug.suppress_weight" not in (self.search.space or {}):
            raise ValueError("final.treatments: the suppression penalty needs debug.suppress_weight > 0 (or debug.suppress_weight in search.space)")
        return self

    @model_validator(mode="after")
    def _searched_values_fit(self) -> "StudyConfig":
        """Every value the search may give a field is one the field accepts (checked here, not after the search)."""
        for name, spec in (self.search.space or {}).items():
            field = PARAMETER_ALIASES.get(name, name).split(".")[1]
            values = spec.choice if spec.choice is not None else next(bounds for bounds in (spec.uniform, spec.loguniform, spec.int) if bounds is not None)
            for value in values:
                try:
                    DebugConfig.model_validate({**self.debug.model_dump(), field: value})
                except ValidationError as error:
                    raise ValueError(f"search.space.{name}: {value!r} is not a value of debug.{field}: {error.errors()[0]['msg']}") from None
        return self

    @model_validator(mode="after")
    def _preprocess_from_weights(self) -> "StudyConfig":
        """``data.preprocess.mode: weights``: the weights' numbers written into the config (the images stage's key holds them)."""
        preprocess = self.data.preprocess
        if preprocess.mode != "weights":
            return self
        from raycf.data.preprocess import weights_preprocessing

        resolved = weights_preprocessing(self.model.arch, self.data.image_size)
        for name in sorted(preprocess.model_fields_set & set(PREPROCESS_FROM_WEIGHTS)):  # a resolved config read back gives the same
            if getattr(preprocess, name) != resolved[name]:
                raise ValueError(
                    f"data.preprocess.{name}: with mode: weights it is {resolved[name]} from {self.model.arch}'s weights "
                    f"(got {getattr(preprocess, name)}; expected it left out, or mode: resize_crop)"
                )
        for name, value in resolved.items():
            object.__setattr__(preprocess, name, value)
        return self

    @model_validator(mode="after")
    def _adopted_weights_exist(self) -> "StudyConfig":
        if not self.base.train and self.model.weights in ("none", "imagenet"):
            raise ValueError(
                f"base.train: false adopts model.weights as the base model, but model.weights is {self.model.weights} "
                "(expected a path to a trained model: a raycf checkpoint, a state_dict, a Lightning checkpoint or a safetensors file)"
            )
        return self

    @property
    def results_uri(self) -> str:
        """``<storage_path>/<name>``: a local path (absolute) or a URI."""
        from raycf.results.storage import join_uri, normalise_root

        return join_uri(normalise_root(self.storage_path), self.name)

    def config_hash(self) -> str:
        """Short hash of everything that defines the study's results (smoke block and resource fields excluded)."""
        return hash_object({key: value for key, value in result_fields(self).items() if key != "smoke"})

    def section_hash(self, *reads: str) -> str:
        """Short hash of some sections or dotted fields (plus the seed), resource fields excluded: a stage's inputs.

        A section leaves out its unhashed fields; a field named on its own
        (``search.pareto``, displayed by the report) is hashed whatever its kind.
        """
        dumped = result_fields(self)
        values = {}
        for path in reads:
            value: Any = dumped
            for part in path.split("."):
                value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
            values[path] = _json_ready(field_value_at(self, path)) if value is _MISSING else value
        return hash_object({"seed": object.__getattribute__(self, "seed"), **values})


_MISSING = object()


def field_value_at(model: BaseModel, path: str) -> Any:
    """The value of a dotted field of ``model``, read without recording it (:mod:`raycf.runtime.field_reads`)."""
    value: Any = model
    for part in path.split("."):
        value = object.__getattribute__(value, part)
    return value


def result_fields(model: BaseModel) -> dict[str, Any]:
    """``model`` as JSON-ready values without the fields that do not change results (:func:`resource_field`)."""
    dumped = {}
    for name, field in type(model).model_fields.items():
        if not is_hashed(field):
            continue
        value = object.__getattribute__(model, name)  # hashing is not a stage reading the field
        dumped[name] = result_fields(value) if isinstance(value, BaseModel) else _json_ready(value)
    return dumped


def _json_ready(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    return value


def hash_object(value: Any) -> str:
    """sha256 of the canonical JSON form of ``value``, first 16 hex digits."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------- loading


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = (), smoke: bool = False) -> StudyConfig:
    """Read, override and validate a study file.

    Raises :class:`UserError` (one line naming the file and field) for a
    missing file, a YAML syntax error, an unknown field, a wrong type or a bad
    value, in the file itself, in its ``smoke:`` block or in ``--set``.
    """
    path = Path(path)
    raw = read_yaml_mapping(path)
    return study_from_mapping(raw, overrides=overrides, smoke=smoke, source=str(path))


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Parse a YAML file that must hold a mapping."""
    if not path.is_file():
        raise UserError(f"{path}: study file not found (expected a YAML file, e.g. studies/digits.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise UserError(f"{path}: YAML syntax error{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of study fields at the top level (got {type(raw).__name__})")
    return raw


def study_from_mapping(
    raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), smoke: bool = False, source: str = "study"
) -> StudyConfig:
    """Validate a study given as a mapping (see :func:`load_study`)."""
    raw = copy.deepcopy(raw)
    smoke_block = raw.get("smoke") or {}
    if not isinstance(smoke_block, dict):
        raise UserError(f"{source}: smoke: expected a mapping of overrides (got {type(smoke_block).__name__})")
    study = _validate(raw, source)
    # The smoke variant is validated even when not applied, so a broken smoke
    # block is found before CI runs it.
    smoke_raw = apply_overrides(copy.deepcopy(raw), list(DEFAULT_SMOKE.items()) + _flatten(smoke_block), source=f"{source}: smoke")
    smoke_study = _validate(smoke_raw, f"{source} (with its smoke block)")
    if smoke:
        raw, study = smoke_raw, smoke_study
    if not overrides:
        return study
    raw = apply_overrides(raw, [_split_assignment(item) for item in overrides], source="--set")
    return _validate(raw, "--set")


def _validate(raw: dict[str, Any], source: str) -> StudyConfig:
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as error:
        raise UserError(f"{source}: {describe_validation_error(error)}") from None


def describe_validation_error(error: ValidationError) -> str:
    """One line for the first problem pydantic found: ``field: what was expected (got value)``."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"] if not str(part).startswith(("function-after", "literal")))
    location = re.sub(r"\.(tagged-union|union)\[[^\]]*\]", "", location)
    kind = first["type"]
    message = first["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        parent, _, field = location.rpartition(".")
        known = _known_fields(parent)
        return f"{location}: unknown field {field!r}" + (f" (expected one of: {', '.join(known)})" if known else "")
    if kind == "missing":
        return f"{location}: required field is missing"
    got = first.get("input")
    shown = "" if isinstance(got, dict) or kind.startswith("value_error") else f" (got {got!r})"
    prefix = f"{location}: " if location else ""
    return f"{prefix}{message}{shown}"


def _known_fields(dotted: str) -> list[str]:
    model: type[BaseModel] = StudyConfig
    for part in filter(None, dotted.split(".")):
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _split_assignment(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set base.epochs=3")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _flatten(block: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{base: {epochs: 2}}`` → ``[("base.epochs", 2)]``; leaves under ``search.space`` stay whole."""
    items: list[tuple[str, Any]] = []
    for key, value in block.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in ("search.space", "search.driver_resources"):
            items.extend(_flatten(value, f"{path}."))
        else:
            items.append((path, value))
    return items


def apply_overrides(raw: dict[str, Any], assignments: list[tuple[str, Any]], source: str) -> dict[str, Any]:
    """Set dotted keys in a raw study mapping; intermediate mappings are created."""
    for key, value in assignments:
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"{source}: {key}: {part!r} is not a section (got {child!r})")
            node = child
        node[parts[-1]] = value
    return raw


def with_values(config: StudyConfig, values: dict[str, Any]) -> StudyConfig:
    """A copy of ``config`` with dotted fields (or search aliases) replaced, re-validated."""
    raw = config.model_dump(mode="json")
    assignments = [(PARAMETER_ALIASES.get(key, key), value) for key, value in values.items()]
    return field_reads.carry_tag(config, _validate(apply_overrides(raw, assignments, source="values"), "values"))


def dump_yaml(config: StudyConfig) -> str:
    """The resolved study as YAML (what ``config.yaml`` in the results folder holds)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------ reference


def study_reference_markdown() -> str:
    """The README's study file reference: every field, its default and meaning, from the models above."""
    lines = ["| field | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel) and name != "smoke":
                lines.append(f"| `{prefix}{name}` | | {((annotation.__doc__ or '').strip().splitlines() or [''])[0]} |")
                walk(annotation, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else _shown_default(field)
            lines.append(f"| `{prefix}{name}` | {default} | {field.description or ''} |")
            item = getattr(annotation, "__args__", (None,))[0]
            if isinstance(item, type) and issubclass(item, BaseModel):
                walk(item, f"{prefix}{name}[].")

    walk(StudyConfig, "")
    return "\n".join(lines) + "\n"


def _shown_default(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, tuple) and value and isinstance(value[0], BaseModel):
        return f"{len(value)} rows (the paper's)"
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return f"`{text}`" if text not in ("", "{}") else f"`{text or chr(34) * 2}`"


README_MARKERS = ("<!-- study-reference:start -->\n", "<!-- study-reference:end -->")


def with_study_reference(readme: str) -> str:
    """``readme`` with the text between its study-reference markers replaced by the current reference."""
    start, end = README_MARKERS
    head, _, rest = readme.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}{study_reference_markdown()}{end}{tail}"


if __name__ == "__main__":  # python -m raycf.config [README.md]: print the reference, or rewrite it in place
    import sys

    if len(sys.argv) > 1:
        readme = Path(sys.argv[1])
        readme.write_text(with_study_reference(readme.read_text()))
    else:
        print(study_reference_markdown(), end="")
