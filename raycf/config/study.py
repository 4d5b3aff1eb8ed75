"""A whole study (:class:`StudyConfig`) and the hashes that key stages' caches."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from raycf.config.fields import DEFAULT_SMOKE, PARAMETER_ALIASES, StrictModel, is_hashed
from raycf.config.inputs import GROUP_METRICS, PREPROCESS_FROM_WEIGHTS, DataConfig, ModelConfig
from raycf.config.stage_settings import (
    AnalysisConfig,
    BaseConfig,
    CfeConfig,
    DebugConfig,
    FeaturesConfig,
    FinalConfig,
    MasksConfig,
    PrefixConfig,
    SearchConfig,
)


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
    def _group_metric_needs_groups(self) -> "StudyConfig":
        if self.search.metric in GROUP_METRICS and self.data.plant is None and not self.data.groups:
            raise ValueError(f"search.metric: {self.search.metric} needs groups (expected data.plant or data.groups, or another metric)")
        if self.search.metric in GROUP_METRICS and self.debug.workers > 1:
            # each worker holds only its share of the validation predictions: no worker can compute a group's accuracy
            raise ValueError(f"search.metric: {self.search.metric} is computed by one retraining worker (expected debug.workers: 1; got {self.debug.workers})")
        if self.final.dfr and self.data.plant is None and not self.data.groups:
            raise ValueError("final.dfr: DFR refits the head on group-balanced validation images and needs groups (expected data.plant or data.groups, or final.dfr: false)")
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

    @model_validator(mode="after")
    def _base_seeds_train(self) -> "StudyConfig":
        if self.final.base_seeds > 1 and not self.base.train:
            raise ValueError(f"final.base_seeds: {self.final.base_seeds} needs base.train: true (an adopted base model is one model, whatever the seed)")
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
