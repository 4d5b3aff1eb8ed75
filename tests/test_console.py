"""What a search prints (raycf.search.console.TrialConsole) and where Ray's own output goes (raycf.runtime.console), without Ray running."""

from __future__ import annotations

import io
import logging
import os
import pickle
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

from raycf.runtime import cluster, console
from raycf.cli import build_parser
from raycf.search.console import TrialConsole, error_summary, format_value

NAMES = ["lambda1", "lambda2", "tau", "freq_threshold"]
CONTROL = {"lambda1": 0.0, "lambda2": 0.0, "tau": 0.5, "freq_threshold": 0.2}
POINT = {"lambda1": 0.0123, "lambda2": 4.1e-05, "tau": 0.83, "freq_threshold": 0.21}
ENVIRONMENT = ("RAYCF_VERBOSE", "RAY_AIR_NEW_OUTPUT", "RAY_BACKEND_LOG_LEVEL", "RAY_ADDRESS", "RAY_TRAIN_V2_ENABLED")


class FakeTrial:
    """What the callback reads of a Tune trial."""

    def __init__(self, trial_id: str, config: dict, error_msg: str = ""):
        self.trial_id = trial_id
        self.config = dict(config)
        self.error_msg = error_msg
        self.last_result: dict = {}


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    """Each test starts without verbose mode, results folder or redirection, and leaves none behind."""
    for name in ENVIRONMENT:
        monkeypatch.setenv(name, "x")  # remembered, so that teardown restores the variable's absence too
        monkeypatch.delenv(name)
    monkeypatch.setattr(console, "_results", None)
    yield
    console.restore_ray_logging()
    for bar in list(console._bars):
        console.close_bar(bar)


def lines_of(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def epoch(trials: TrialConsole, trial: FakeTrial, number: int, val_acc: float, val_loss: float, seconds: float) -> None:
    result = {"epoch": number, "training_iteration": number, "val_acc": val_acc, "val_loss": val_loss, "time_total_s": seconds}
    trial.last_result = result
    trials.on_trial_result(iteration=number, trials=[trial], trial=trial, result=result)


def run_trial(trials: TrialConsole, trial: FakeTrial, history: list[tuple[float, float]], seconds_per_epoch: float = 1.0) -> None:
    trials.on_trial_start(iteration=0, trials=[trial], trial=trial)
    for number, (acc, loss) in enumerate(history, start=1):
        epoch(trials, trial, number, acc, loss, number * seconds_per_epoch)


def test_one_line_when_a_trial_starts_and_one_when_it_ends(capsys):
    trials = TrialConsole(NAMES, "val_acc", "max", total_trials=12, epochs=3, progress_bar=False)
    control, point = FakeTrial("c", CONTROL), FakeTrial("p", POINT)
    run_trial(trials, control, [(0.90, 0.30), (0.95, 0.20), (0.94, 0.10)], seconds_per_epoch=4.7)
    trials.on_trial_complete(iteration=3, trials=[control], trial=control)
    run_trial(trials, point, [(0.96, 0.12)], seconds_per_epoch=4.1)
    trials.on_trial_complete(iteration=4, trials=[control, point], trial=point)
    trials.on_experiment_end(trials=[control, point])
    assert lines_of(capsys) == [
        "[raycf] search: trial 1/12 started (the control): lambda1 0  lambda2 0  tau 0.5  freq_threshold 0.2",
        "[raycf] search: trial 1/12 (control) completed in 14.1 s: val_acc 0.9500 (best epoch 2 of 3, val_loss 0.2000)",
        "[raycf] search: trial 2/12 started: lambda1 0.0123  lambda2 4.1e-05  tau 0.83  freq_threshold 0.21",
        "[raycf] search: trial 2/12 stopped by ASHA after 1 of 3 epochs in 4.1 s: val_acc 0.9600 (best epoch 1, val_loss 0.1200)",
        "[raycf] search: 2 trials: 1 completed, 1 stopped by ASHA; best val_acc 0.9600 (trial 2/12)",
    ]


def test_the_best_epoch_follows_the_tie_rule_not_the_last_epoch(capsys):
    trials = TrialConsole(NAMES, "val_acc", "max", total_trials=2, epochs=4, progress_bar=False)
    trial = FakeTrial("t", POINT)
    # val_acc ties at 0.9 (epochs 2, 3, 4): the lower val_loss wins (3 and 4 tie), then the earlier epoch (3).
    run_trial(trials, trial, [(0.8, 0.1), (0.9, 0.5), (0.9, 0.3), (0.9, 0.3)])
    trials.on_trial_complete(iteration=4, trials=[trial], trial=trial)
    assert lines_of(capsys)[-1] == "[raycf] search: trial 1/2 completed in 4.0 s: val_acc 0.9000 (best epoch 3 of 4, val_loss 0.3000)"


def test_a_minimised_objective_and_a_rerun_epoch(capsys):
    trials = TrialConsole(NAMES, "val_loss", "min", total_trials=1, epochs=2, progress_bar=False)
    trial = FakeTrial("t", POINT)
    run_trial(trials, trial, [(0.8, 0.4), (0.9, 0.2)])
    epoch(trials, trial, 2, 0.7, 0.6, 3.0)  # epoch 2 again, after a retry: replaces the first run of it
    trials.on_trial_complete(iteration=3, trials=[trial], trial=trial)
    assert lines_of(capsys)[-1] == "[raycf] search: trial 1/1 completed in 3.0 s: val_loss 0.4000 (best epoch 1 of 2)"


def test_failures_retries_and_their_messages(capsys):
    trials = TrialConsole(NAMES, "val_acc", "max", total_trials=3, epochs=3, progress_bar=False)
    early = FakeTrial("a", POINT, error_msg="Traceback (most recent call last):\n  File 'x.py'\nRuntimeError: CUDA out of memory\n")
    trials.on_trial_start(iteration=0, trials=[early], trial=early)
    trials.on_trial_error(iteration=1, trials=[early], trial=early)
    late = FakeTrial("b", POINT, error_msg="ValueError: nan loss")
    late.checkpoint = object()  # Tune restores a retried trial from its latest checkpoint, when it has one
    run_trial(trials, late, [(0.5, 1.0), (0.6, 0.9)], seconds_per_epoch=1.5)
    trials.on_trial_recover(iteration=2, trials=[late], trial=late)
    trials.on_trial_start(iteration=3, trials=[late], trial=late)
    epoch(trials, late, 3, 0.7, 0.8, 5.0)
    trials.on_trial_complete(iteration=4, trials=[late], trial=late)
    printed = lines_of(capsys)
    assert printed[1].startswith("[raycf] search: trial 1/3 failed after ") and printed[1].endswith(" s: RuntimeError: CUDA out of memory")
    assert printed[3] == "[raycf] search: trial 2/3 failed after 3.0 s, retrying from its last checkpoint: ValueError: nan loss"
    assert printed[4] == "[raycf] search: trial 2/3 restarted after failure 1"
    assert printed[5] == "[raycf] search: trial 2/3 completed in 5.0 s: val_acc 0.7000 (best epoch 3 of 3, val_loss 0.8000)"
    failed = FakeTrial("c", POINT, error_msg="boom")
    run_trial(trials, failed, [(0.5, 1.0), (0.9, 0.9)])
    trials.on_trial_error(iteration=5, trials=[failed], trial=failed)
    trials.on_experiment_end(trials=[early, late, failed])
    assert lines_of(capsys)[-2:] == [
        "[raycf] search: trial 3/3 failed after 2 epochs in 2.0 s: boom",
        "[raycf] search: 3 trials: 1 completed, 2 failed; best val_acc 0.7000 (trial 2/3)",  # a failed trial's epochs do not count
    ]


def test_a_trial_retried_from_scratch_starts_its_epochs_over(capsys):
    trials = TrialConsole(NAMES, "val_acc", "max", total_trials=1, epochs=3, progress_bar=False)
    trial = FakeTrial("t", POINT, error_msg="OSError: node died")  # no checkpoint yet
    run_trial(trials, trial, [(0.9, 0.1), (0.95, 0.1)])
    trials.on_trial_recover(iteration=2, trials=[trial], trial=trial)
    run_trial(trials, trial, [(0.5, 0.5)])
    trials.on_trial_complete(iteration=3, trials=[trial], trial=trial)
    printed = lines_of(capsys)
    assert ", retrying: OSError: node died" in printed[1] and "from its last checkpoint" not in printed[1]
    assert printed[-1] == "[raycf] search: trial 1/1 stopped by ASHA after 1 of 3 epochs in 1.0 s: val_acc 0.5000 (best epoch 1, val_loss 0.5000)"


def test_error_summary_unwraps_the_pickled_exception():
    class TaskError(Exception):
        def __init__(self, cause):
            super().__init__("ray::ImplicitFunc.train() (pid=1)\nTraceback ...\nRuntimeError: boom")
            self.cause = cause

    class Trial:
        trial_id, config, error_file = "t", {}, None

        def get_pickled_error(self):
            return TaskError(RuntimeError("boom\nmore"))

    assert error_summary(Trial()) == "RuntimeError: boom"
    assert error_summary(FakeTrial("t", {})) == "no error message"


def test_a_resumed_search_keeps_its_numbers_and_histories(capsys):
    first = TrialConsole(NAMES, "val_acc", "max", total_trials=3, epochs=3, progress_bar=False)
    done, running = FakeTrial("a", CONTROL), FakeTrial("b", POINT)
    run_trial(first, done, [(0.9, 0.2)] * 3)
    first.on_trial_complete(iteration=3, trials=[done], trial=done)
    run_trial(first, running, [(0.95, 0.1)])
    saved = pickle.loads(pickle.dumps(first.get_state()))  # Tune pickles callback states
    capsys.readouterr()

    resumed = pickle.loads(pickle.dumps(first))  # Tuner.restore unpickles the callbacks it was built with ...
    resumed.set_state(saved)  # ... then restores their state
    resumed.on_trial_start(iteration=0, trials=[running], trial=running)
    epoch(resumed, running, 2, 0.93, 0.1, 2.0)
    epoch(resumed, running, 3, 0.92, 0.1, 3.0)
    resumed.on_trial_complete(iteration=2, trials=[running], trial=running)
    new = FakeTrial("c", POINT)
    resumed.on_trial_start(iteration=3, trials=[new], trial=new)
    assert lines_of(capsys) == [
        "[raycf] search: trial 2/3 resumed",
        "[raycf] search: trial 2/3 completed in 3.0 s: val_acc 0.9500 (best epoch 1 of 3, val_loss 0.1000)",
        "[raycf] search: trial 3/3 started: lambda1 0.0123  lambda2 4.1e-05  tau 0.83  freq_threshold 0.21",
    ]


def test_no_bar_when_stderr_is_not_a_terminal(capsys):
    trials = TrialConsole(NAMES, "val_acc", "max", total_trials=2, epochs=1)  # progress_bar=None: decide from stderr
    trial = FakeTrial("t", POINT)
    run_trial(trials, trial, [(0.9, 0.2)])
    trials.on_trial_complete(iteration=1, trials=[trial], trial=trial)
    trials.on_experiment_end(trials=[trial])
    err = capsys.readouterr().err
    assert console._bars == [] and trials._bar is None
    assert "\r" not in err and all(line.startswith("[raycf] ") for line in err.splitlines())


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_on_a_terminal_counts_trials_and_shows_the_best(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    trials = TrialConsole(NAMES, "val_acc", "max", total_trials=4, epochs=1)
    trial = FakeTrial("t", POINT)
    run_trial(trials, trial, [(0.9125, 0.2)])
    trials.on_trial_complete(iteration=1, trials=[trial], trial=trial)
    shown = screen.getvalue()
    assert "1/4" in shown and "best val_acc 0.9125" in shown
    assert "[raycf] search: trial 1/4 completed in 1.0 s" in shown  # lines go above the bar
    trials.on_experiment_end(trials=[trial])
    assert console._bars == []


def test_verbose_mode_draws_no_bar(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    console.set_verbose(True)
    trials = TrialConsole(NAMES, total_trials=1, epochs=1)
    run_trial(trials, FakeTrial("t", POINT), [(0.9, 0.2)])
    assert trials._bar is None


def test_format_value():
    assert [format_value(value) for value in (0.0, 0.0123, 4.1e-05, 0.83, 32, "relu", True)] == ["0", "0.0123", "4.1e-05", "0.83", "32", "relu", "True"]


# ---------------------------------------------------------------- Ray's own output


@pytest.fixture
def ray_screen():
    """What Ray's own console handlers print, in one buffer (they hold the stderr they found when Ray was imported)."""
    import ray.data  # noqa: F401 - its logger's console handler too

    screen = io.StringIO()
    found = [handler for logger in console._ray_loggers() for handler in logger.handlers if console._is_console_handler(handler)]
    handlers = list({id(handler): handler for handler in found}.values())
    assert handlers, "expected Ray's console handlers"
    streams = [handler.setStream(screen) for handler in handlers]
    yield screen
    for handler, stream in zip(handlers, streams):
        handler.setStream(stream)


def test_ray_warnings_go_to_the_log_file_not_the_screen(tmp_path, capsys, ray_screen):
    before = {logger.name: list(logger.handlers) for logger in console._ray_loggers()}
    path = console.quiet_ray_logging(tmp_path / "logs" / "ray.log")
    logging.getLogger("ray.tune").warning("tune says hello")
    logging.getLogger("ray.data").warning("Progress bars disabled")
    logging.getLogger("ray._private.authentication.authentication_token_setup").warning("Token authentication is enabled")
    console.log("raycf's own line")
    import ray

    warnings.warn_explicit("a deprecation", DeprecationWarning, str(Path(ray.__file__).parent / "tune" / "x.py"), 1)
    assert capsys.readouterr().err == "[raycf] raycf's own line\n" and ray_screen.getvalue() == ""
    logged = path.read_text()
    for text in ("WARNING ray.tune", "tune says hello", "WARNING ray.data", "Progress bars disabled", "Token authentication", "(python warning)", "a deprecation"):
        assert text in logged, text

    console.restore_ray_logging()
    logging.getLogger("ray.tune").warning("back on the console")
    logging.getLogger("ray.data").warning("data too")
    assert "back on the console" in ray_screen.getvalue() and "data too" in ray_screen.getvalue()
    assert "back on the console" not in path.read_text()
    assert {name: list(logging.getLogger(name).handlers) for name in before} == before  # pytest's capture handlers untouched too


def test_worker_output_keeps_raycf_lines_and_logs_the_rest(tmp_path, capsys):
    path = console.quiet_ray_logging(tmp_path / "ray.log")
    console.route_worker_output(
        {
            "pid": 4242,
            "ip": "10.0.0.2",
            "localhost": "10.0.0.1",
            "actor_name": "RayTrainWorker",
            "is_err": True,
            "lines": [
                "[raycf] base epoch 1/3  val_acc 0.9000",
                "[2026-12-01 10:00:00,000 E 4242 4242] core_worker.cc:2465: Actor with class name ...",
                '{"__ray_tqdm_magic_token__": true}',
            ],
        }
    )
    console.route_worker_output({"pid": "raylet", "ip": "10.0.0.1", "localhost": "10.0.0.1", "lines": ["[raycf] not from a worker"]})
    console.route_worker_output({"pid": "autoscaler", "ip": "10.0.0.1", "localhost": "10.0.0.1", "lines": ["[raycf] nor from the autoscaler"]})
    assert capsys.readouterr().err == "[raycf] base epoch 1/3  val_acc 0.9000\n"
    logged = path.read_text()
    assert "(RayTrainWorker pid=4242, ip=10.0.0.2) [2026-12-01 10:00:00,000 E 4242 4242] core_worker.cc:2465" in logged
    assert "(raylet) [raycf] not from a worker" in logged and "tqdm" not in logged


def test_worker_output_filter_replaces_rays_printer():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    ray_printer = ("ray_print_logs", lambda data: None)
    dispatcher.handlers.append(ray_printer)
    try:
        assert console.filter_worker_output()
        assert [name for name, _ in dispatcher.handlers].count(console.RAYCF_PRINT_HANDLER) == 1
        assert "ray_print_logs" not in [name for name, _ in dispatcher.handlers]
    finally:
        dispatcher.remove_handler("ray_print_logs")
        console.restore_ray_logging()
    assert console.RAYCF_PRINT_HANDLER not in [name for name, _ in dispatcher.handlers]
    assert not console.filter_worker_output()  # log_to_driver=False: nothing to replace


def test_ray_log_path_local_and_uri(tmp_path):
    assert console.ray_log_path(str(tmp_path / "digits")) == tmp_path / "digits" / "logs" / "ray.log"
    remote = console.ray_log_path("s3://bucket/runs/cub_vgg16")
    assert remote.name == "ray.log" and remote.parent.name.startswith("cub_vgg16-") and remote.parent.parent == Path(tempfile.gettempdir(), "raycf-logs")


# ---------------------------------------------------------------- --verbose plumbing


def test_verbose_is_an_option_of_the_study_and_stage_commands():
    from raycf.stages import STAGES

    parser = build_parser()
    commands = ["study", *(stage.command for stage in STAGES if stage.command)]
    assert "train" in commands
    for command in commands:
        assert parser.parse_args([command, "s.yaml", "--verbose"]).verbose is True
        assert parser.parse_args([command, "s.yaml"]).verbose is False


def test_the_cli_hands_verbose_and_the_results_folder_to_the_console(monkeypatch, tmp_path):
    import raycf.config
    import raycf.data.datasets
    import raycf.models.build
    from raycf.cli import _load_checked_study

    study = raycf.config.study_from_mapping({"name": "digits", "storage_path": str(tmp_path)})

    class Splits:
        num_classes = 10
        class_names = [str(digit) for digit in range(10)]

    monkeypatch.setattr(raycf.config, "load_study", lambda *args, **kwargs: study)
    monkeypatch.setattr(raycf.data.datasets, "load_splits", lambda *args, **kwargs: Splits())
    monkeypatch.setattr(raycf.models.build, "check_model_weights", lambda *args: None)
    _load_checked_study(build_parser().parse_args(["study", "s.yaml"]))
    assert console.configured_results() == study.results_uri and not console.verbose()
    _load_checked_study(build_parser().parse_args(["study", "s.yaml", "--verbose"]))
    assert console.verbose() and os.environ["RAYCF_VERBOSE"] == "1"


class FakeInit:
    """Stands in for ray.init: what it was called with, and the environment at that moment."""

    def __init__(self):
        self.kwargs: dict = {}
        self.environment: dict = {}

    def __call__(self, **kwargs):
        self.kwargs, self.environment = kwargs, dict(os.environ)
        os.write(2, b"[2026-12-01 10:00:00,000 I 1 1] logging.cc:303: Set ray log level from environment variable\n")  # the C++ core worker


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    init = FakeInit()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    for name in [name for name in os.environ if name.startswith(cluster.FORWARDED_PREFIX)]:  # the suite's S3 endpoint: tested apart
        monkeypatch.delenv(name)
    return init


def test_ensure_ray_quiet_mode(fake_ray, tmp_path, capfd, ray_screen):
    results = str(tmp_path / "digits")
    console.configure(results)
    cluster.ensure_ray()
    env_vars = fake_ray.kwargs["runtime_env"]["env_vars"]
    assert fake_ray.environment["RAY_BACKEND_LOG_LEVEL"] == "fatal" and "RAY_BACKEND_LOG_LEVEL" not in os.environ  # only while Ray starts
    assert env_vars == {"RAY_BACKEND_LOG_LEVEL": "info"}  # a local cluster's workers get Ray's default back
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0" and fake_ray.kwargs["log_to_driver"] is True
    log_file = tmp_path / "digits" / "logs" / "ray.log"
    assert lines_of(capfd) == [f"[raycf] Ray's own messages go to {log_file} (--verbose shows them here)"]
    logging.getLogger("ray.train").warning("PlacementGroupCleaner: nothing to clean")
    assert "logging.cc:303" in log_file.read_text()  # what the core worker printed while Ray started
    assert "PlacementGroupCleaner" in log_file.read_text() and capfd.readouterr().err == "" and ray_screen.getvalue() == ""


def test_ensure_ray_joining_a_cluster_quietly_leaves_its_workers_alone(fake_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    console.configure(str(tmp_path / "digits"))
    cluster.ensure_ray()
    assert fake_ray.kwargs["address"] == "auto" and fake_ray.kwargs["runtime_env"] is None
    assert fake_ray.environment["RAY_BACKEND_LOG_LEVEL"] == "fatal"


def test_ensure_ray_verbose_mode_forwards_it_and_changes_nothing(fake_ray, tmp_path, capfd):
    console.configure(str(tmp_path / "digits"), verbose=True)
    cluster.ensure_ray()
    assert fake_ray.kwargs["runtime_env"] == {"env_vars": {"RAYCF_VERBOSE": "1"}}  # Ray workers (a cluster's job too) see it
    assert "RAY_BACKEND_LOG_LEVEL" not in fake_ray.environment and "RAY_AIR_NEW_OUTPUT" not in os.environ
    assert "logging.cc:303" in capfd.readouterr().err and not (tmp_path / "digits" / "logs").exists()


def test_ensure_ray_without_a_results_folder_leaves_ray_as_it_is(fake_ray, capfd):
    cluster.ensure_ray()  # e.g. the Python API, not the command line
    assert fake_ray.kwargs["runtime_env"] is None and capfd.readouterr().err.startswith("[2026-12-01")


def test_a_users_own_backend_level_wins(fake_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_BACKEND_LOG_LEVEL", "debug")
    console.configure(str(tmp_path / "digits"))
    cluster.ensure_ray()
    assert fake_ray.environment["RAY_BACKEND_LOG_LEVEL"] == "debug" and fake_ray.kwargs["runtime_env"] is None


def test_an_s3_endpoint_reaches_a_local_clusters_workers(fake_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # a bucket that is not AWS's: every worker must reach the same one
    console.configure(str(tmp_path / "digits"), verbose=True)
    cluster.ensure_ray()
    assert fake_ray.kwargs["runtime_env"] == {"env_vars": {"RAYCF_VERBOSE": "1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}}
