"""Stage ``report`` and ``raycf report RESULTS``: the study's tables and figures in one HTML file.

Everything comes from the results folder alone: ``config.yaml``,
``manifest.json``, the Parquet tables (the final stage's per-image
predictions among them), the ``model.pt`` checkpoints (the base model and
the best trial's, for the gallery's Grad-CAM) and ``optuna.db``.  Nothing is
trained and no split is scored again: the gallery's few images are read
only to draw them.  Output, ``<results>/report/``:

* ``index.html``: one self-contained page (tables as HTML, figures as
  base64 PNG data URIs, no external resource);
* every figure as a PNG file beside it (``auroc.png``, ``class_recall.png``,
  ``pareto.png``, ``param_importances.png``, ``parallel_coordinate.png``,
  ``global_mc.png``, ``gallery_fixed.png``, ``gallery_broken.png``,
  ``gallery_confidence.png``);
* ``search_noise.json``: the search's spread against validation noise and
  Optuna's parameter importances, as numbers (:func:`search_noise_section`).

Contents: the study (manifest, stages, config); Table 1 (detection) with the
threshold-free AUROC of every agreement score against max softmax (bootstrap
intervals); the learned detector (confidence alone vs confidence + CFE
signals); Tables 2 and 3 and the per-class recall change; with ``final.seeds`` > 1, debug retraining
against the control over seeds (paired t intervals, the class group); the leaderboard's
top 10 and its Pareto front; Optuna's parameter importances and parallel
coordinates; whether the trials differ by more than validation noise (also
``search_noise.json``, with the importances as numbers); the global MC
filters of every class (class × filter counts); and a gallery in the manner of
the paper's Figure 2: test images the debugged model fixed, broke, or became
more confident on, each with Grad-CAM before and after and its MC filters.
A section whose inputs are missing (a study not run to the end) says so
instead of failing.
"""

from __future__ import annotations
