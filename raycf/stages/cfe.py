"""Stage ``cfe``: train the MC (and MI) generator bank of every class on the cached vectors (METHOD §2).

Output ``<results>/cfe/``: ``bank.pt`` (see :class:`raycf.method.bank.CfeBank`;
loads with ``weights_only=True``), ``epochs.parquet`` (one row per reporting
epoch) and ``classes.parquet`` (per class: MC agreement and mask size, MI
agreement and size, on the plain training images).
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING

import pandas as pd

from raycf.results import storage
from raycf.results.artefacts import BANK_FILE
from raycf.models.checkpoint import CHECKPOINT_FILE, load_classifier_checkpoint
from raycf.runtime.cluster import ensure_ray
from raycf.runtime.console import log, verbose
from raycf.training.cfe import CfeJob, cfe_summary, cfe_train_loop
from raycf.training.trainer import fit, run_local

if TYPE_CHECKING:
    from raycf.stages.stage import StageRun


def run(run: "StageRun") -> dict:
    """Train the bank (on Ray: Ray Train workers or one Tune trial; this process with ``cfe.workers: 0``); write its three files."""
    study = run.study
    classifier = load_classifier_checkpoint(run.upstream("base", CHECKPOINT_FILE), expected_arch=study.model.arch)
    job = CfeJob(
        study=study,
        results=run.results,
        head_weight=classifier.state_dict["fc.weight"],
        head_bias=classifier.state_dict["fc.bias"],
        class_names=list(classifier.class_names),
        bank_location=run.path(BANK_FILE),
    )
    if study.cfe.workers == 0:
        with tempfile.TemporaryDirectory() as folder:
            outcome = run_local(cfe_train_loop, job, folder, use_gpu=study.cfe.use_gpu).return_value
    else:
        ensure_ray()
        trained = fit(
            cfe_train_loop,
            job,
            name=f"cfe-{run.stage_hash}",
            storage_path=run.ray_storage(),
            workers=study.cfe.workers,
            use_gpu=study.cfe.use_gpu,
            max_failures=study.cfe.max_failures,
        )
        if not storage.exists(job.bank_location):
            # A run that had finished before this attempt (its stage crashed after it) is returned, not run again:
            # the loop wrote its bank into that attempt's folder; its last checkpoint holds the same bank.
            storage.write_bytes(job.bank_location, trained.best_files[BANK_FILE])
        outcome = trained.return_value
    storage.write_frame(pd.DataFrame(outcome["history"]), run.path("epochs.parquet"))
    classes = pd.DataFrame({"class": range(len(classifier.class_names)), "class_name": classifier.class_names, **outcome["classes"]})
    storage.write_frame(classes, run.path("classes.parquet"))
    log_classes(classes)
    summary = {key: round(value, 6) for key, value in cfe_summary(outcome["classes"]).items()}
    log(
        f"cfe: {len(classes)} MC generators: masked prediction = target class for {100 * summary['mc_agreement']:.1f} % of "
        f"training images (worst class {100 * summary['mc_agreement_min']:.1f} %) at {summary['mc_size']:.1f} of "
        f"{classifier.num_filters} filters on average"
    )
    return {"epochs": study.cfe.epochs, **summary}


def log_classes(classes: pd.DataFrame) -> None:
    """One line per class in verbose mode; otherwise one line naming the three classes with the lowest MC agreement."""
    rows = sorted(classes.to_dict("records"), key=lambda row: row["mc_agreement"])
    if not verbose():
        worst = ", ".join(f"{row['class_name']} {100 * row['mc_agreement']:.1f} %" for row in rows[:3])
        log(f"cfe: lowest MC agreement: {worst} (every class: cfe/classes.parquet)")
        return
    for row in sorted(rows, key=lambda row: row["class"]):
        mi = f"; MI {100 * row['mi_agreement']:.1f} % at {row['mi_size']:.1f} filters" if "mi_agreement" in row else ""
        log(f"cfe: class {row['class']} ({row['class_name']}): MC {100 * row['mc_agreement']:.1f} % at {row['mc_size']:.1f} filters{mi}")
