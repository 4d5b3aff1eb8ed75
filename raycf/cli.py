"""The ``raycf`` command line.

Exit codes: 0 done, 1 failed while running, 2 bad input (one line on stderr
naming the file, field or value and what was expected; ``--debug`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
import traceback
from typing import Callable

from raycf.errors import UserError, find_user_error

STUDY_HELP = "the study file (YAML); see docs/study-file.md for every field"


def _add_study_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY", help=STUDY_HELP)
    parser.add_argument("--smoke", action="store_true", help="apply the study file's smoke: block (tiny epochs and trial counts)")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        nargs="+",
        action="extend",
        default=[],
        help="override a study field by dotted path, value parsed as YAML (e.g. --set base.epochs=3 debug.lambda1=0.01)",
    )
    parser.add_argument(
        "--force",
        metavar="STAGE",
        action="append",
        default=[],
        help="rerun STAGE even if its cached result is up to date (repeatable)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own console output too (its warnings and logs, its workers' output, Tune's status tables), as "
        "RAYCF_VERBOSE=1 does; without it that output goes to <results>/logs/ray.log and only raycf's lines are shown",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="raycf",
        description="Debug and improve CNN classifiers with counterfactual filter explanations, as a study on Ray.",
        epilog="Exit codes: 0 done, 1 failed while running, 2 bad input. Results go to <storage_path>/<name>/ of the study.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    # Every subcommand takes --debug too; SUPPRESS keeps `raycf --debug CMD` from being reset by CMD's default.
    debug_option = argparse.ArgumentParser(add_help=False)
    debug_option.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_command = functools.partial(commands.add_parser, parents=[debug_option])
    study = add_command(
        "study",
        help="run the whole study: base → features → cfe → masks → analyze → search → final → report",
        description="Run every stage of the study in order, skipping those whose cached results are up to date.",
    )
    _add_study_options(study)
    study.add_argument("--resume", action="store_true", help="continue an interrupted search, retrying its errored trials too")
    study.set_defaults(handler=_run_study_command)

    board = add_command(
        "leaderboard",
        help="print a study's leaderboard (local folder or s3:// URI; no Ray cluster needed)",
        description="Print the trials of a study's search, best first by its objective.",
    )
    board.add_argument("results", metavar="RESULTS", help="the study's results folder or URI, e.g. results/digits or s3://bucket/runs/cub_vgg16")
    board.add_argument("--top", type=int, metavar="N", default=None, help="only the N best trials")
    board.add_argument("--pareto", action="store_true", help="only the Pareto front of validation accuracy vs detection AUROC (search.pareto)")
    board.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format (default: table)")
    board.set_defaults(handler=_run_leaderboard_command)

    rerun = add_command(
        "rerun",
        help="rerun one trial locally, without a cluster, and compare with its recorded metrics",
        description="Rerun a trial's exact configuration (same seed, same G) in this process and print its metrics next to the recorded ones.",
    )
    rerun.add_argument("results", metavar="RESULTS", help="the study's results folder or URI")
    which = rerun.add_mutually_exclusive_group(required=True)
    which.add_argument("--best", action="store_true", help="the best trial by the study's objective")
    which.add_argument("--trial", metavar="ID", help="a trial id from the leaderboard")
    rerun.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where to run (default: cpu); the trial's recorded precision is used where the device runs it (bf16 on CPUs too). "
        "A difference that the change of device or precision explains is reported as such, not as a failure",
    )
    rerun.set_defaults(handler=_run_rerun_command)

    report = add_command(
        "report",
        help="write RESULTS/report/index.html (one self-contained page) and its figures as PNG, from the results folder alone",
        description="Build the study's report from its results folder alone (no study file, no cluster): Tables 1-3, the leaderboard, "
        "Optuna's importances, the global MC filters and a gallery with Grad-CAM before and after debugging.",
    )
    report.add_argument("results", metavar="RESULTS", help="the study's results folder or URI, e.g. results/digits")
    report.set_defaults(handler=_run_report_command)

    explain = add_command(
        "explain",
        help="explain the base model's prediction on images: a small bundle per image (CPU, no cluster)",
        description="For each IMAGE, write OUT/<name>/ with explanation.json (every number), explanation.md (a summary), "
        "explanation.png (Grad-CAM and the top MC filters' feature maps) and manifest.json. Runs on the CPU without a Ray cluster.",
    )
    explain.add_argument("results", metavar="RESULTS", help="the study's results folder (its base model, CFE bank and masks)")
    explain.add_argument(
        "images",
        metavar="IMAGE",
        nargs="*",
        help="an image file (any format Pillow reads; preprocessed with the study's evaluation transform), or an image id of "
        "the study's dataset as in the Parquet files' image_id column (e.g. digits-0042, cub-17, test/cat/0.jpg): its numbers "
        "then equal its row in masks/<split>/",
    )
    explain.add_argument("--flagged", type=int, metavar="N", default=None, help="also the N most suspicious test images (the first rows of analysis/flagged.parquet)")
    explain.add_argument("--out", metavar="DIR", default="explanations", help="where the bundles go (default: ./explanations)")
    explain.set_defaults(handler=_run_explain_command)

    atlas = add_command(
        "atlas",
        help="a class's filter atlas: its top filters (by MC frequency, by contribution W·a, error-specific), each with its top-activating training images (CPU, no cluster)",
        description="Write OUT/<class>/ with atlas.png (one row per filter: its top-activating training images and its feature map over them), "
        "atlas.json (every number) and atlas.md. Runs on the CPU without a Ray cluster.",
    )
    atlas.add_argument("results", metavar="RESULTS", help="the study's results folder (its base model, CFE bank and masks)")
    atlas.add_argument("--class", dest="class_name", metavar="NAME", required=True, help="the class, as the dataset names it (e.g. Coat)")
    atlas.add_argument("--out", metavar="DIR", default="atlas", help="where the class's folder goes (default: ./atlas)")
    atlas.set_defaults(handler=_run_atlas_command)

    export = add_command(
        "export",
        help="write a study's model as its library loads it (a torchvision/timm state_dict, or TorchScript) with a JSON sidecar",
        description="Write the debugged model (or the control, the base model or a trial) of a study: for a torchvision or timm "
        "architecture a state_dict with the library's key names and the user's class order; TorchScript for any architecture. "
        "Beside it, FILE.json: arch, class names, preprocessing, the trial's parameters and its metrics.",
    )
    export.add_argument("results", metavar="RESULTS", help="the study's results folder or URI")
    export.add_argument("--model", default="debugged", metavar="WHICH", help="debugged (default), control, base, or a trial id from the leaderboard")
    export.add_argument("--format", default="pt", metavar="FORMAT", help="pt (default), safetensors or torchscript")
    export.add_argument("--out", required=True, metavar="FILE", help="where the model goes (FILE.json beside it)")
    export.set_defaults(handler=_run_export_command)

    from raycf.stages import STAGES

    for stage in (stage for stage in STAGES if stage.command):
        command, summary = stage.command, stage.summary
        sub = add_command(
            command,
            help=summary,
            description=f"{summary[0].upper()}{summary[1:]}. Stages it depends on run first when their results are missing or stale.",
        )
        _add_study_options(sub)
        sub.set_defaults(handler=_run_stage_command, stage=stage.name)
    return parser


def _load_checked_study(args: argparse.Namespace):
    """Validate the study, its data and its weights before anything is written."""
    from raycf.runtime import console
    from raycf.config import load_study
    from raycf.data.datasets import load_splits

    study = load_study(args.study, args.overrides, smoke=args.smoke)
    console.configure(study.results_uri, verbose=args.verbose)  # before any stage starts Ray (cluster.ensure_ray)
    splits = load_splits(study.data, study.seed, verify_images=True)
    check_study_inputs(study, splits.class_names)
    check_groups_input(study, splits)
    return study


def check_groups_input(study, splits) -> None:
    """``data.plant``'s class is one of the dataset's; ``data.groups`` names only the dataset's images (UserError, one line)."""
    from raycf.data.groups import check_groups_table, read_groups_table
    from raycf.method.plant import class_index_of

    if study.data.plant is not None:
        try:
            class_index_of(study.data.plant, splits.class_names)
        except ValueError as error:
            raise UserError(str(error)) from None
    if study.data.groups:
        ids = [image_id for name in ("train", "val", "test") for image_id in splits.split(name).ids]
        check_groups_table(read_groups_table(study.data.groups), ids, capped=study.data.max_per_split > 0)


def check_study_inputs(study, class_names: list[str]) -> None:
    """The pre-checks of a validated study against its dataset's classes (UserError, one line): the model and its weights, the class group."""
    from raycf.method.replication import check_class_group
    from raycf.models.build import check_model_weights

    from raycf.stages.treatments import check_treatment_inputs

    check_model_weights(study.model, len(class_names), class_names)
    check_class_group(study.final.class_group, class_names)
    check_treatment_inputs(study, class_names)


def _run_stage_command(args: argparse.Namespace) -> int:
    from raycf.pipeline import run_stages
    from raycf.stages import stage_named

    study = _load_checked_study(args)
    run_stages(study, [args.stage], force=set(args.force), command=_command_line())
    describe = stage_named(args.stage).describe
    if describe is not None:  # the stage's result as a table (also when it was cached)
        print(describe(study.results_uri), flush=True)
    return 0


def _run_study_command(args: argparse.Namespace) -> int:
    from raycf.pipeline import run_stages

    study = _load_checked_study(args)
    run_stages(study, ["analyze", "final", "report"], force=set(args.force), command=_command_line(), resume=args.resume)
    return 0


def _run_leaderboard_command(args: argparse.Namespace) -> int:
    from raycf.search.leaderboard import objective_of, pareto_front, read_leaderboard, render, sort_by_objective

    if args.top is not None and args.top <= 0:
        raise UserError(f"--top {args.top}: expected a positive number of trials")
    board = read_leaderboard(args.results)
    metric, mode = objective_of(args.results)
    ordered = sort_by_objective(board, metric, mode)
    if args.pareto:
        x, y = _pareto_axes(args.results)
        ordered = pareto_front(ordered, x, y)
    if args.top is not None:
        ordered = ordered.head(args.top)
    ordered.attrs = board.attrs
    print(render(ordered, args.format))
    return 0


def _pareto_axes(results: str) -> tuple[str, str]:
    import yaml

    from raycf.results import storage

    location = storage.join_uri(storage.normalise_root(results), "config.yaml")
    search = (yaml.safe_load(storage.read_text(location)) or {}).get("search", {}) if storage.exists(location) else {}
    x, y = search.get("pareto", ["val_acc", "det_auroc"])
    return x, y


def _run_rerun_command(args: argparse.Namespace) -> int:
    import os

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    else:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is visible here (expected an NVIDIA GPU with a working driver, or --device cpu)")
    from raycf.outputs.rerun import rerun_trial

    report = rerun_trial(args.results, None if args.best else args.trial, args.device)
    print(
        f"trial {report.trial_id} recorded with {report.recorded}, rerun with {report.rerun} "
        f"(tolerance: one validation image = {report.tolerance:.4f} in accuracy; explained_tolerance: what a change of device or precision explains)"
    )
    print(report.comparison.to_string(index=False, float_format="{:.6g}".format))
    print(report.verdict)
    return 0 if report.matches or report.explained else 1


def _run_report_command(args: argparse.Namespace) -> int:
    from raycf.outputs.report.page import write_report

    print(write_report(args.results), flush=True)
    return 0


def _run_explain_command(args: argparse.Namespace) -> int:
    from raycf.outputs.explain import explain_images, most_suspicious, summary_line

    if args.flagged is not None and args.flagged <= 0:
        raise UserError(f"--flagged {args.flagged}: expected a positive number of images")
    images = list(args.images) + (most_suspicious(args.results, args.flagged) if args.flagged else [])
    if not images:
        raise UserError("explain: expected IMAGE arguments or --flagged N")
    for folder in explain_images(args.results, images, args.out, command=_command_line()):
        print(summary_line(folder), flush=True)
    return 0


def _run_atlas_command(args: argparse.Namespace) -> int:
    from raycf.outputs.atlas import write_class_atlas

    folder = write_class_atlas(args.results, args.class_name, args.out)
    print(f"{folder}: atlas.png, atlas.json, atlas.md", flush=True)
    return 0


def _run_export_command(args: argparse.Namespace) -> int:
    from raycf.outputs.export import export_model

    written, sidecar = export_model(args.results, args.model, args.format, args.out)
    print(f"{written} ({args.format}) and {sidecar}", flush=True)
    return 0


def _command_line() -> str:
    return " ".join(shlex.quote(part) for part in ["raycf", *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``raycf`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("raycf: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the edge of the program
        user_error = error if isinstance(error, UserError) else find_user_error(error)
        if args.debug:
            traceback.print_exc()
        if user_error is not None:
            print(f"raycf: error: {user_error}", file=sys.stderr)
            return 2
        first_line = (str(error).strip().splitlines() or [""])[0]
        print(f"raycf: failed: {type(error).__name__}: {first_line}" + ("" if args.debug else " (--debug shows the traceback)"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
