"""The study file: YAML in, a validated, typed :class:`StudyConfig` out.

Validation happens here, once, at the edge.  Everything inside raycf takes the
typed objects defined in this package.  Each field's default and meaning is
written next to it (``description=``); ``raycf study --help`` points here and
the docs' study file reference is generated from the same descriptions.

* :mod:`~raycf.config.fields`: what every section shares (strict models, resource fields, search aliases);
* :mod:`~raycf.config.inputs`: data, preprocessing, augmentation and the model;
* :mod:`~raycf.config.stage_settings`: each stage's settings;
* :mod:`~raycf.config.study`: the whole study and its stage hashes;
* :mod:`~raycf.config.loader`: reading YAML and applying overrides;
* :mod:`~raycf.config.messages`: validation errors as one line;
* :mod:`~raycf.config.reference`: the field reference the docs build prints.

Overrides:
  * ``--set KEY=VALUE``: a dotted path into the study (``base.epochs=3``); the
    value is parsed as YAML, so ``3`` is an int, ``1e-3`` a float, ``[1, 2]`` a
    list and ``none``/``null`` null.
  * ``--smoke``: applies the study file's own ``smoke:`` block (same dotted or
    nested form) before ``--set``.
"""

from raycf.config.fields import (
    DATASET_KINDS,
    DEFAULT_SMOKE,
    PARAMETER_ALIASES,
    SEARCHABLE_FIELDS,
    UNHASHED,
    StrictModel,
    is_hashed,
    names_as_text,
    resource_field,
    searchable_names,
)
from raycf.config.inputs import (
    FASHION_MNIST_ROOT,
    GROUP_METRICS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PLANT_CORNERS,
    PREPROCESS_FROM_WEIGHTS,
    AugmentConfig,
    DataConfig,
    ModelConfig,
    PlantConfig,
    PreprocessConfig,
)
from raycf.config.loader import (
    apply_overrides,
    dump_yaml,
    load_study,
    read_yaml_mapping,
    study_from_mapping,
    with_values,
)
from raycf.config.messages import describe_validation_error
from raycf.config.reference import study_reference_markdown
from raycf.config.stage_settings import (
    DEFAULT_SPACE,
    PAPER_DETECTION_SETTINGS,
    AnalysisConfig,
    AshaConfig,
    BaseConfig,
    CfeConfig,
    DebugConfig,
    DetectionMetric,
    DetectionSetting,
    Distribution,
    FeaturesConfig,
    FinalConfig,
    MasksConfig,
    PrefixConfig,
    SchedulerConfig,
    SearchConfig,
)
from raycf.config.study import StudyConfig, field_value_at, hash_object, result_fields

__all__ = [
    "DATASET_KINDS",
    "PARAMETER_ALIASES",
    "SEARCHABLE_FIELDS",
    "searchable_names",
    "DEFAULT_SMOKE",
    "UNHASHED",
    "resource_field",
    "is_hashed",
    "names_as_text",
    "StrictModel",
    "AugmentConfig",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PREPROCESS_FROM_WEIGHTS",
    "PreprocessConfig",
    "FASHION_MNIST_ROOT",
    "GROUP_METRICS",
    "PLANT_CORNERS",
    "PlantConfig",
    "DataConfig",
    "ModelConfig",
    "BaseConfig",
    "FeaturesConfig",
    "CfeConfig",
    "MasksConfig",
    "DetectionMetric",
    "DetectionSetting",
    "PAPER_DETECTION_SETTINGS",
    "AnalysisConfig",
    "DebugConfig",
    "PrefixConfig",
    "Distribution",
    "AshaConfig",
    "SchedulerConfig",
    "SearchConfig",
    "DEFAULT_SPACE",
    "FinalConfig",
    "StudyConfig",
    "field_value_at",
    "result_fields",
    "hash_object",
    "load_study",
    "read_yaml_mapping",
    "study_from_mapping",
    "apply_overrides",
    "with_values",
    "dump_yaml",
    "describe_validation_error",
    "study_reference_markdown",
]
