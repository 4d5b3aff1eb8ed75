"""The CFE bank loop on several ranks: classes split across ranks, no DDP, the single worker's bank.

Two (or four) local processes with a gloo process group stand in for Ray
Train's workers; a small :class:`Session` gives each its rank and keeps rank
0's checkpoints, one folder per reporting epoch.
"""

from __future__ import annotations

import contextlib
import functools
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raycf.config import study_from_mapping
from raycf.method.bank import CfeModel, parse_bank
from raycf.method.selection import SCORE_KEY
from raycf.training.cfe import CfeJob, _class_part, cfe_train_loop, rank_classes, report_epochs
from raycf.training.session import LocalSession, Session
from test_bank import synthetic_results, train_bank, without_speed  # tests/ is on sys.path (rootdir-relative, no __init__.py)

EPOCHS = 30  # as test_bank.train_bank
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "gather", "scatter", "barrier")
TOLERANCE = 1e-5


def make_job(results: str, head_weight: torch.Tensor, head_bias: torch.Tensor, bank_location: Path, epochs: int = EPOCHS) -> CfeJob:
    """The job of test_bank.train_bank (same study and seed), for ``workers`` ranks."""
    study = study_from_mapping({"name": "t", "seed": 0, "cfe": {"epochs": epochs, "lr": 0.05, "batch_size": 8, "sparsity": 2.0, "workers": 2}})
    names = ["a", "b", "c"][: len(head_weight)]
    return CfeJob(study=study, results=results, head_weight=head_weight, head_bias=head_bias, class_names=names, bank_location=str(bank_location))


class RankSession(Session):
    """One rank of a local process group: CPU, resumes from ``resume``, rank 0 keeps every checkpoint under ``folder``."""

    def __init__(self, rank: int, world_size: int, folder: Path, resume: Path | None, counts: dict[str, int]):
        self.rank, self.world_size, self.device = rank, world_size, torch.device("cpu")
        self.folder, self.resume, self.counts = folder, resume, counts
        self.reports: list[dict[str, Any]] = []

    def prepare_model(self, model):
        raise AssertionError("the class-split bank must not be wrapped in DDP")

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Path | None]:
        yield self.resume

    def report(self, metrics: dict[str, Any], files: dict[str, bytes] | None = None) -> None:
        assert (files is not None) == (self.rank == 0)
        self.reports.append({"metrics": dict(metrics), "collectives": dict(self.counts)})
        if files:
            folder = self.folder / f"checkpoint_{int(metrics['epoch']):03d}"
            folder.mkdir(parents=True)
            for name, data in files.items():
                (folder / name).write_bytes(data)


def _count_collectives() -> dict[str, int]:
    """Count every call of torch.distributed's collectives in this process."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for name in COLLECTIVES:
        original = getattr(dist, name)

        @functools.wraps(original)
        def counted(*args, __name=name, __original=original, **kwargs):
            counts[__name] += 1
            return __original(*args, **kwargs)

        setattr(dist, name, counted)
    return counts


def _rank_main(rank: int, world_size: int, port: int, results: str, runs: list[dict]) -> None:
    """One rank: the ``runs`` one after the other in one gloo process group (process start-up is most of the cost)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        counts = _count_collectives()
        for run in runs:
            dist.barrier()  # the previous run's checkpoints are all written
            counts.update(dict.fromkeys(COLLECTIVES, 0))
            out = Path(run["out"])
            session = RankSession(rank, world_size, out, Path(run["resume"]) if run["resume"] else None, counts)
            job = make_job(results, run["head_weight"], run["head_bias"], out / "bank.pt", run["epochs"])
            value = cfe_train_loop(job, session)
            torch.save({"value": value, "reports": session.reports, "counts": dict(counts)}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(world_size: int, results: str, runs: list[dict]) -> list[list[dict]]:
    """The loop on ``world_size`` local processes, once per run; per run, each rank's return value, reports and collective counts."""
    for run in runs:
        Path(run["out"]).mkdir(parents=True)
    mp.spawn(_rank_main, args=(world_size, _free_port(), results, runs), nprocs=world_size, join=True)
    return [[torch.load(Path(run["out"]) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)] for run in runs]


def assert_same_bank(bank_file: Path, reference_file: Path, exact: bool = False) -> None:
    bank, reference = parse_bank(bank_file.read_bytes()), parse_bank(reference_file.read_bytes())
    assert bank.class_names == reference.class_names
    for name in ("mc_weight", "mc_bias", "mi_weight", "mi_bias", "head_weight", "head_bias"):
        got, want = getattr(bank, name), getattr(reference, name)
        assert got.shape == want.shape, name
        if exact:
            assert torch.equal(got, want), name
        else:
            assert torch.allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE), (name, float((got - want).abs().max()))


def assert_same_history(history: list[dict], reference: list[dict]) -> None:
    assert [row["epoch"] for row in history] == [row["epoch"] for row in reference]
    for row, want in zip(history, reference):
        assert set(row) == set(want)
        for key, value in want.items():
            if key != "images_per_s":  # a measured speed, not a result
                assert row[key] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), (row["epoch"], key)


ONE_CLASS_EPOCHS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The single worker's banks and the same jobs on two ranks.

    Two ranks run, in one process group: test_bank.train_bank's job; the same
    job restarted from its epoch-12 checkpoint; a one-class bank (the first
    class of the same head, a few epochs), where rank 1 holds no class.
    """
    folder = tmp_path_factory.mktemp("cfe_workers")
    results, head_weight, head_bias = synthetic_results(folder)
    single = train_bank(results, head_weight, head_bias, folder / "single.pt")
    one_class_job = make_job(results, head_weight[:1], head_bias[:1], folder / "single_one_class.pt", ONE_CLASS_EPOCHS)
    single_one_class = cfe_train_loop(one_class_job, LocalSession(folder / "run_one_class"))
    runs = [
        {"out": str(folder / "two"), "resume": None, "epochs": EPOCHS, "head_weight": head_weight, "head_bias": head_bias},
        {"out": str(folder / "resumed"), "resume": str(folder / "two" / "checkpoint_012"), "epochs": EPOCHS, "head_weight": head_weight, "head_bias": head_bias},
        {"out": str(folder / "one_class"), "resume": None, "epochs": ONE_CLASS_EPOCHS, "head_weight": head_weight[:1], "head_bias": head_bias[:1]},
    ]
    two, resumed, one_class = run_ranks(2, results, runs)
    return {
        "folder": folder,
        "results": results,
        "head": (head_weight, head_bias),
        "single": single,
        "ranks": two,
        "resumed": resumed,
        "single_one_class": single_one_class,
        "one_class": one_class,
    }


def test_each_rank_starts_from_its_slices_of_the_single_workers_draw():
    whole = CfeModel(3, 6, True, seed=0)
    assert rank_classes(3, 0, 2).tolist() == [0, 2] and rank_classes(3, 1, 2).tolist() == [1] and rank_classes(3, 3, 4).tolist() == []
    for rank in range(2):
        part = _class_part(whole, rank_classes(3, rank, 2))
        assert [name for name, _ in part.named_parameters()] == [name for name, _ in whole.named_parameters()]
        for (_, mine), (_, all_of_them) in zip(part.named_parameters(), whole.named_parameters()):
            assert torch.equal(mine, all_of_them[rank::2])


def test_two_ranks_split_the_classes_and_train_the_single_workers_bank(trained):
    folder, single, ranks = trained["folder"], trained["single"], trained["ranks"]
    assert_same_bank(folder / "two" / "bank.pt", folder / "single.pt")
    for rank in ranks:  # every rank reports and returns the single worker's numbers
        assert_same_history(rank["value"]["history"], single["history"])
        reported = [dict(report["metrics"]) for report in rank["reports"]]
        assert [row.pop(SCORE_KEY) for row in reported] == [float(row["epoch"]) for row in single["history"]]
        assert_same_history(reported, single["history"])
        for key, values in single["classes"].items():
            assert rank["value"]["classes"][key] == pytest.approx(values, abs=TOLERANCE)
    # Rank 0 checkpointed each reporting epoch: the whole bank and the whole optimiser state.
    saved = sorted(path.name for path in (folder / "two").glob("checkpoint_*"))
    assert saved == [f"checkpoint_{epoch:03d}" for epoch in sorted(report_epochs(EPOCHS))]
    state = torch.load(folder / "two" / "checkpoint_030" / "train_state.pt", weights_only=True)
    bank = parse_bank((folder / "two" / "checkpoint_030" / "bank.pt").read_bytes())
    assert state["next_epoch"] == EPOCHS and len(state["history"]) == len(report_epochs(EPOCHS))
    buffers = [state["optimizer"]["state"][index]["momentum_buffer"] for index in range(4)]
    assert [tuple(buffer.shape) for buffer in buffers] == [tuple(bank.mc_weight.shape), tuple(bank.mc_bias.shape), tuple(bank.mi_weight.shape), tuple(bank.mi_bias.shape)]


def test_no_collective_runs_per_step_only_per_report(trained):
    reports = len(report_epochs(EPOCHS))
    steps_between_reports = (EPOCHS // reports) * 60 // 8  # 60 vectors, batches of 8 (the last one 4)
    for rank in trained["ranks"]:
        snapshots = [dict.fromkeys(COLLECTIVES, 0)] + [report["collectives"] for report in rank["reports"]]
        deltas = [{name: after[name] - before[name] for name in COLLECTIVES} for before, after in zip(snapshots, snapshots[1:])]
        assert all(delta == deltas[0] for delta in deltas)  # the same few per report...
        assert sum(deltas[0].values()) < steps_between_reports  # ...not one per step
        assert deltas[0]["all_reduce"] == 1  # the loss parts, once
        assert rank["counts"] == snapshots[-1]  # nothing after the last report: its gathered bank is the final one


def test_two_ranks_resume_from_a_checkpoint_to_the_same_bank(trained):
    folder = trained["folder"]
    assert_same_bank(folder / "resumed" / "bank.pt", folder / "two" / "bank.pt", exact=True)
    for rank, uninterrupted in zip(trained["resumed"], trained["ranks"]):
        assert without_speed(rank["value"]["history"]) == without_speed(uninterrupted["value"]["history"])
        assert [report["metrics"]["epoch"] for report in rank["reports"]] == [18, 24, 30]


def test_one_worker_resumes_a_two_rank_checkpoint(trained, tmp_path):
    # The checkpoint holds the whole bank and optimiser state: any number of workers can resume it.
    head_weight, head_bias = trained["head"]
    session = LocalSession(tmp_path / "run")
    session.latest = trained["folder"] / "two" / "checkpoint_012"
    value = cfe_train_loop(make_job(trained["results"], head_weight, head_bias, tmp_path / "bank.pt"), session)
    assert_same_bank(tmp_path / "bank.pt", trained["folder"] / "single.pt")
    assert_same_history(value["history"], trained["single"]["history"])


def test_a_rank_beyond_the_number_of_classes_holds_nothing_and_only_joins_the_reports(trained):
    folder = trained["folder"]
    assert_same_bank(folder / "one_class" / "bank.pt", folder / "single_one_class.pt")
    for rank in trained["one_class"]:
        assert_same_history(rank["value"]["history"], trained["single_one_class"]["history"])
