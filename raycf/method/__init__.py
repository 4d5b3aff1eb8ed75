"""The method itself, as pure functions: torch, numpy and pandas only.

Nothing here imports Ray or reads a results folder; the stages
(:mod:`raycf.stages`) feed these functions arrays and write what they return.

* :mod:`~raycf.method.bank`: the CFE generator bank, its losses and format (METHOD §2);
* :mod:`~raycf.method.masks`: per-image MC masks from vectors;
* :mod:`~raycf.method.global_mc`: global MC filters of each class (§3);
* :mod:`~raycf.method.detection`: agreement scores and misclassification detection (§4, Table 1);
* :mod:`~raycf.method.bootstrap`: percentile-bootstrap intervals of AUROC and AUPR;
* :mod:`~raycf.method.class_centred`: class-centred error scores and the within-class AUROC;
* :mod:`~raycf.method.multiple`: Holm's adjustment of a family of p-values;
* :mod:`~raycf.method.learned_detector`: a learned error detector, confidence alone vs confidence + CFE signals;
* :mod:`~raycf.method.debug_loss`: the debugging loss L_d and its indicators (§5);
* :mod:`~raycf.method.treatment`: Tables 2 and 3 from per-image predictions;
* :mod:`~raycf.method.selection`: which epoch and which trial is best (one tie rule);
* :mod:`~raycf.method.search_noise`: whether the search's trials differ by more than validation noise (McNemar against the best trial);
* :mod:`~raycf.method.atlas`: the filter atlas's rankings (MC frequency, contribution W·a, error-specific filters);
* :mod:`~raycf.method.suppress`: the suppression treatments' filter matrix and worst-group accuracy.
"""
