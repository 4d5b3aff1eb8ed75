"""The search space and the searcher: Optuna's TPE behind the fixed control point.

The study's ``search.searched_space`` becomes Optuna distributions; the
control (λ1 = λ2 = 0, plain fine-tuning) is proposed first, as a fixed point
outside Optuna's space (λ = 0 is outside a log range), and is never told to
Optuna.  Optuna's TPE sampler (seeded) keeps its history in an RDB storage;
each trial's value is its best epoch's objective under
:mod:`raycf.method.selection`'s rule.  No Ray Tune object is built at import.
"""

from __future__ import annotations

from typing import Any

from raycf.runtime import kill_points
from raycf.config import PARAMETER_ALIASES, Distribution, StudyConfig, with_values
from raycf.method.selection import TIE_BREAK, selection_key

CONTROL_LAMBDAS = {"lambda1": 0.0, "lambda2": 0.0, "debug.suppress_weight": 0.0}  # the control: plain fine-tuning, nothing suppressed


def optuna_distributions(space: dict[str, Distribution]) -> dict[str, Any]:
    """The study file's ``search.space`` as Optuna distributions."""
    import optuna.distributions as od

    distributions = {}
    for name, spec in space.items():
        if spec.uniform is not None:
            distributions[name] = od.FloatDistribution(*spec.uniform)
        elif spec.loguniform is not None:
            distributions[name] = od.FloatDistribution(*spec.loguniform, log=True)
        elif spec.int is not None:
            distributions[name] = od.IntDistribution(*spec.int)
        else:
            distributions[name] = od.CategoricalDistribution(spec.choice)
    return distributions


def field_value(study: StudyConfig, name: str) -> Any:
    """The study's current value of a searched parameter (alias or dotted path)."""
    value: Any = study
    for part in PARAMETER_ALIASES.get(name, name).split("."):
        value = getattr(value, part)
    return value


def control_point(study: StudyConfig) -> dict[str, Any]:
    """λ1 = λ2 = 0; every other searched parameter at the study's own value."""
    return {name: CONTROL_LAMBDAS.get(name, field_value(study, name)) for name in parameter_names(study)}


def parameter_names(study: StudyConfig) -> list[str]:
    """Searched parameters, always including λ1 and λ2 (the control sets them to 0), and the suppression weight when the study suppresses."""
    suppresses = bool(study.debug.suppress) and study.debug.suppress_weight > 0
    return list(dict.fromkeys(["lambda1", "lambda2", *(["debug.suppress_weight"] if suppresses else []), *study.search.searched_space]))


def control_first_searcher(study: StudyConfig, storage_url: str, study_name: str):
    """OptunaSearch (TPE, seeded, RDB storage) behind the fixed control point and a concurrency limit."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter, Searcher
    from ray.tune.search.optuna import OptunaSearch

    class ControlFirst(Searcher):
        """Suggests the control first, then delegates to the wrapped searcher.

        The control's result is not told to Optuna: λ = 0 lies outside the
        log-uniform space, and Optuna's study holds exactly the trials it
        proposed.  Optuna records each trial's best epoch (the leaderboard's
        objective and the checkpoint the trial keeps), not its last one.
        """

        def __init__(self, searcher: Searcher, control: dict[str, Any] | None, space: dict[str, Any]):
            self.searcher = searcher
            self.space = space
            self.control = control
            self.control_trial_id: str | None = None
            self.best_epochs: dict[str, dict] = {}  # trial id -> its best epoch so far: objective, val_loss, epoch
            super().__init__(metric=searcher.metric, mode=searcher.mode)

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return self.searcher.set_search_properties(metric, mode, config, **spec)

        def set_max_concurrency(self, max_concurrent: int) -> bool:
            return self.searcher.set_max_concurrency(max_concurrent)

        def suggest(self, trial_id: str):
            if self.control is not None and self.control_trial_id is None:
                self.control_trial_id = trial_id
                return dict(self.control)
            point = self.adopt_orphan(trial_id) or self.searcher.suggest(trial_id)
            if isinstance(point, dict):
                kill_points.reached("proposed")
            return point

        def adopt_orphan(self, trial_id: str) -> dict[str, Any] | None:
            """Hand out again a point Optuna proposed just before the driver died.

            Optuna writes a proposal to its storage at once; Tune saves the
            searcher's state a moment later.  A driver killed in between leaves
            a RUNNING trial in the storage that the restored searcher does not
            know: it becomes this trial, so the storage holds each trial once.
            """
            study, known = getattr(self.searcher, "_ot_study", None), getattr(self.searcher, "_ot_trials", None)
            if study is None or known is None:
                return None
            numbers = {trial.number for trial in known.values()}
            for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if frozen.number not in numbers:
                    trial = known[trial_id] = optuna.trial.Trial(study, frozen._trial_id)
                    # Optuna writes a proposal one parameter at a time: a
                    # driver killed midway leaves some unset, sampled now.
                    return {name: suggest_again(trial, name, distribution) for name, distribution in self.space.items()}
            return None

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            self.remember_best(trial_id, result)
            if trial_id != self.control_trial_id:
                self.searcher.on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if result is not None:
                self.remember_best(trial_id, result)
                if trial_id in self.best_epochs:
                    result = {**result, self.metric: self.best_epochs[trial_id][self.metric]}
            if trial_id != self.control_trial_id:
                self.searcher.on_trial_complete(trial_id, result=result, error=error)

        def remember_best(self, trial_id: str, result: dict) -> None:
            """Keep the trial's best epoch so far (objective, validation loss, epoch) under the tie rule."""
            if result.get(self.metric) is None:
                return
            epoch = {key: result.get(key) for key in (self.metric, TIE_BREAK, "epoch")}
            known = self.best_epochs.get(trial_id)
            if known is None or selection_key(epoch, self.metric, self.mode, epoch["epoch"] or 0) < selection_key(known, self.metric, self.mode, known["epoch"] or 0):
                self.best_epochs[trial_id] = epoch

        # Tune saves wrappers (objects with a ``searcher``) through get_state /
        # set_state and the wrapped OptunaSearch through its own save_to_dir.
        def get_state(self) -> dict:
            return {"control": self.control, "control_trial_id": self.control_trial_id, "best_epochs": self.best_epochs}

        def set_state(self, state: dict) -> None:
            self.control, self.control_trial_id = state["control"], state["control_trial_id"]
            self.best_epochs = dict(state.get("best_epochs", {}))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = optuna_distributions(study.search.searched_space)
    searcher = OptunaSearch(
        space=space,
        metric=study.search.metric,
        mode=study.search.mode,
        sampler=trial_seeded_sampler(sampler_seed(study)),
        study_name=study_name,
        storage=optuna.storages.RDBStorage(storage_url),
    )
    control = control_point(study) if study.search.include_control else None
    return ConcurrencyLimiter(ControlFirst(searcher, control, space), max_concurrent=study.search.concurrency)


def suggest_again(trial, name: str, distribution) -> Any:
    """An Optuna trial's value for ``name``: the stored one if set, else a new sample from ``distribution``."""
    import optuna.distributions as od

    if isinstance(distribution, od.CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    suggest = trial.suggest_int if isinstance(distribution, od.IntDistribution) else trial.suggest_float
    return suggest(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)


def trial_seeded_sampler(seed: int):
    """Optuna's TPE sampler whose random draws for trial n depend only on (seed, n).

    A seeded sampler's draws otherwise follow its random state, which a
    resumed search rebuilds from the seed: it drew again the points of the
    trials made before the driver died (two trials at one point).
    """
    import numpy as np
    import optuna

    class TrialSeededTPESampler(optuna.samplers.TPESampler):
        def before_trial(self, study, trial) -> None:
            draws = int(np.random.SeedSequence([seed, trial.number]).generate_state(1)[0])
            self._rng.rng.seed(draws)
            self._random_sampler._rng.rng.seed(draws)
            super().before_trial(study, trial)

        def __reduce__(self):
            # A local class does not pickle by name (Tune pickles the searcher into its driver state);
            # rebuilding from the seed loses nothing, as every draw depends on (seed, n) alone.
            return trial_seeded_sampler, (seed,)

    return TrialSeededTPESampler(seed=seed)


def sampler_seed(study: StudyConfig) -> int:
    """The TPE sampler's seed: ``search.seed``, else the study's."""
    return study.search.seed if study.search.seed is not None else study.seed


def trial_values(row: Any, names: list[str]) -> dict[str, Any]:
    """A leaderboard row's searched values as plain Python values (a text choice stays text, a boolean a boolean).

    An empty cell is a parameter the trial was not given: it is left out, so
    the study's own value stands (an empty cell is not a value).
    """
    import math

    import numpy as np

    values = {}
    for name in names:
        value = row[name] if name in row else None
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        values[name] = value.item() if isinstance(value, np.generic) else value
    return values


def trial_study(study: StudyConfig, params: dict[str, Any]) -> StudyConfig:
    """The study with one trial's parameter values."""
    return with_values(study, params)
