"""Training loops (base classifier, CFE bank, debug retraining) and where they run.

The loops are plain functions of a job and a :class:`~raycf.training.session.Session`;
:mod:`~raycf.training.trainer` runs them on Ray Train workers, inside one Tune trial (one worker)
or in this process, and the search runs a single-worker debug loop inside its Tune trial.
"""
