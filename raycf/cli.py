"""The ``raycf`` command line.

Exit codes: 0 done, 1 failed while running, 2 bad input (one line on stderr
naming the file, field or value and what was expected; ``--debug`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import traceback
from typing import Callable

from raycf.errors import UserError, find_user_error

# Command → the stage it produces (its upstream stages run first when stale).
STAGE_COMMANDS = {
    "train": ("base", "train (or adopt) the base classifier on Ray Train"),
    "debug": ("debug", "retrain with the debugging loss and its fine-tuning control on Ray Train; print Tables 2 and 3"),
}

STUDY_HELP = "the study file (YAML); see the README's study file reference"


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="raycf",
        description="Debug and improve CNN classifiers with counterfactual filter explanations, as a study on Ray.",
        epilog="Exit codes: 0 done, 1 failed while running, 2 bad input. Results go to <storage_path>/<name>/ of the study.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, (stage, summary) in STAGE_COMMANDS.items():
        sub = commands.add_parser(
            command,
            help=summary,
            description=f"{summary[0].upper()}{summary[1:]}. Stages it depends on run first when their results are missing or stale.",
        )
        _add_study_options(sub)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
        sub.set_defaults(handler=_run_stage_command, stage=stage)
    return parser


def _load_checked_study(args: argparse.Namespace):
    """Validate the study, its data and its weights before anything is written."""
    from raycf.config import load_study
    from raycf.data import load_splits
    from raycf.models import check_model_weights

    study = load_study(args.study, args.overrides, smoke=args.smoke)
    splits = load_splits(study.data, study.seed, verify_images=True)
    check_model_weights(study.model, splits.num_classes)
    return study


def _run_stage_command(args: argparse.Namespace) -> int:
    from raycf.pipeline import run_stages, stages

    study = _load_checked_study(args)
    run_stages(study, [args.stage], force=set(args.force), command=_command_line())
    describe = stages()[args.stage].describe
    if describe is not None:  # the stage's result as a table (also when it was cached)
        print(describe(study.results_uri), flush=True)
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
