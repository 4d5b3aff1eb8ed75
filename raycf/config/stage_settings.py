"""The settings of each stage: base training, features, the CFE bank, masks, analysis, prefix, retraining, search, final."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from raycf.config.fields import (
    PARAMETER_ALIASES,
    SEARCHABLE_FIELDS,
    StrictModel,
    names_as_text,
    resource_field,
    searchable_names,
)


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
    workers: int = Field(2, ge=1, description="Ray Train data-parallel workers (1: one Tune trial, no worker group to start)")
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
    workers: int = Field(1, ge=0, description="Ray Train workers, each training the generators of its share of the classes (no all-reduce); 1: one Tune trial, no worker group to start; 0: in the calling process, no Ray")
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
    base_seeds: int = Field(
        1,
        ge=1,
        description="base models the control-vs-best comparison runs on: 1 is the study's own; n > 1 also trains base models 1 … n − 1 "
        "(each with the study's seed + 1000·s, on the same split and image store) with their own features, CFE bank, masks and prefix "
        "cache under <results>/base_seeds/seed<s>/, retrains the control and the best trial's parameters over final.seeds seeds on each, "
        "and reports the best − control test accuracy difference per base model and its t interval over base models "
        "(final/base_seeds.parquet, final/base_seed_summary.parquet)",
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

    dfr: bool = Field(
        False,
        description="also refit the base model's linear head by deep feature reweighting (DFR, Kirichenko et al. 2022) on a "
        "group-balanced half of the validation split (C chosen on the other half by worst-group accuracy) and compare it with the "
        "final models on the test split (final/dfr.parquet); needs groups (data.plant or data.groups)",
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
