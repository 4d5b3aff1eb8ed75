"""The study's stages, in order: one declarative table.

Each stage module holds a ``run(StageRun) -> summary`` function that reads
its upstream stages' artefacts, runs the method (:mod:`raycf.method`) or a
training loop (:mod:`raycf.training`) on Ray, and writes its folder;
:mod:`raycf.pipeline` decides which stages run and publishes what they write.
The table names those functions (:func:`~raycf.stages.stage.entry`) and
imports a stage's module when it runs, so reading the table (the CLI's
parser does) loads neither torch nor Ray.
"""

from __future__ import annotations

from raycf.stages.stage import Stage, StageRun, entry

__all__ = ["STAGES", "Stage", "StageRun", "stage_named"]

# What the images stage decodes by: every data field but the augmentation and the normalisation (applied later, on the device).
IMAGE_FIELDS = (
    "data.kind", "data.root", "data.image_size", "data.stored_side", "data.val_fraction", "data.test_fraction", "data.max_per_split", "data.bbox_crop",
    "data.preprocess.mode", "data.preprocess.resize", "data.preprocess.interpolation", "data.plant", "data.groups",
)

STAGES: tuple[Stage, ...] = (
    Stage(
        "images", reads=IMAGE_FIELDS, upstream=(), run=entry("images", "run"), folder="images",
        summary="decode every image once into the uint8 image store (Ray Data on CPUs)",
    ),
    Stage(
        "base", reads=("data", "model", "base"), upstream=("images",), run=entry("base", "run"), folder="base",
        command="train", summary="train (or adopt) the base classifier on Ray Train",
    ),
    Stage(
        "features", reads=("data", "model", "features", "cfe.views"), upstream=("base",), run=entry("features", "run"), folder="features",
        command="features", summary="pooled filter vectors and logits of every image (Ray Data actor pool)",
    ),
    Stage(
        "cfe", reads=("cfe",), upstream=("features",), run=entry("cfe", "run"), folder="cfe",
        command="cfe", summary="train the MC and MI generator bank of all classes on the cached vectors (on Ray)",
    ),
    Stage(
        "masks", reads=("masks",), upstream=("cfe",), run=entry("masks", "run"), folder="masks",
        command="masks", summary="per-image MC masks of the inferred and top-k classes (Ray Data)",
    ),
    Stage(
        "analyze", reads=("analysis", "data.plant"), upstream=("masks",), run=entry("analyze", "run"), folder="analysis", describe=entry("analyze", "describe"),
        command="analyze", summary="global MC filters, misclassification detection (paper Table 1) and AUROC vs max-softmax",
    ),
    Stage(
        "prefix", reads=("prefix", "debug.trainable", "debug.views"), upstream=("base",), run=entry("prefix", "run"), folder="prefix",
        summary="the activations entering the first retrained layer, for every view of every training image (Ray Data)",
    ),
    Stage(
        "debug", reads=("debug", "search.metric", "search.mode"), upstream=("masks", "prefix"), run=entry("debug", "run"), folder="debug", describe=entry("debug", "describe"),
        command="debug", summary="retrain with the debugging loss and its fine-tuning control on Ray Train; print Tables 2 and 3",
    ),
    Stage(
        "search", reads=("search", "debug"), upstream=("masks", "prefix"), run=entry("search", "run"), folder="search",
        summary="Ray Tune + Optuna over lambda1, lambda2, tau and f; the control first",
    ),
    Stage(
        "final", reads=("final",), upstream=("search",), run=entry("final", "run"), folder="final", describe=entry("final", "describe"),
        summary="the best searched trial and the control evaluated on test once (Tables 2 and 3); with final.seeds > 1, the control, "
        "the study's lambda and the best trial's retrained over seeds (paired intervals)",
    ),
    Stage(
        "report", reads=("search.pareto",), upstream=("final", "analyze"), run=entry("report", "run"), folder="report", describe=entry("report", "describe"),
        summary="one self-contained HTML page with the study's tables and figures",
    ),
)  # fmt: skip


def stage_named(name: str) -> Stage:
    """The stage called ``name`` (KeyError when there is none)."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(name)
