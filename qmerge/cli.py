"""Merge a QLoRA adapter into its NF4 base exactly, optionally GPTQ re-quantize it, and promote the result
only when a gate against the model as trained passes. Exit codes: 0 pass, 1 internal error, 2 bad config or
input, 3 gate rejected."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings

from qmerge import __version__
from qmerge.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, QmergeError

log = logging.getLogger("qmerge")


def _offline() -> None:
    # qmerge never reaches a network; a user who sets these explicitly keeps their choice.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmerge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"qmerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help="run the pipeline described by a TOML config")
    p.add_argument("config")
    p.add_argument("--dry-run", action="store_true", help="print the plan; load no weights, write nothing")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--from", dest="from_stage", metavar="STAGE", help="redo STAGE and everything after it")
    group.add_argument("--only", metavar="STAGE", help="redo only STAGE (its inputs must be finished)")
    p.add_argument("--force", action="store_true", help="redo every stage, ignoring finished artifacts")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings and errors only")
    p.add_argument("--release-version", metavar="V", help="release version (default: output.version)")
    p.add_argument("--summary-json", metavar="FILE", help="also write the run's summary (stages, results, exit "
                   "code) as JSON to FILE")
    m = sub.add_parser("matrix", help="build a release matrix: bases x adapters x targets, sharing stages")
    m.add_argument("matrix")
    m.add_argument("--dry-run", action="store_true", help="list the builds and their memory estimates; run nothing")
    m.add_argument("--jobs", type=_positive(int), metavar="N",
                   help="builds at once (default: CPU count, within memory)")
    m.add_argument("--memory-gib", type=_positive(float), metavar="G",
                   help="memory budget (default: 90%% of available)")
    m.add_argument("--quiet", action="store_true", help="no progress lines, warnings and errors only")
    m.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the builds as Ray tasks on the cluster at ADDRESS (default: $RAY_ADDRESS, else a local "
                        "Ray instance started for this run); needs pip install 'qmerge[ray]'")
    return parser


def _positive(kind):
    """An argparse type: a number of `kind` above zero (argparse's error is exit 2, like any bad input)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    """The one entry point of `qmerge` and `python -m qmerge`: process defaults first (before torch loads)."""
    from qmerge.runtime import set_process_defaults

    set_process_defaults()
    _offline()
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)  # a fresh one per call: sys.stderr may have been swapped
    handler.setFormatter(logging.Formatter("qmerge: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    warnings.filterwarnings("ignore", module="transformers|peft|bitsandbytes|torch")
    if args.quiet:
        from qmerge.runtime import silence_third_party

        silence_third_party()
    try:
        if args.command == "matrix":
            from qmerge.matrix import run_matrix_command

            return run_matrix_command(args)
        from qmerge.report import run_pipeline_command

        return run_pipeline_command(args)
    except QmergeError as e:
        print(f"qmerge: error: {e}", file=sys.stderr)
        return e.exit_code
    except PermissionError as e:  # a file or folder this user may not read or write: theirs to fix, not a bug
        print(f"qmerge: error: {e.filename or ''}: permission denied ({e.strerror})\n  fix: make it readable "
              "(inputs) or writable (work_dir, output.dir, the cache) by this user", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("qmerge: interrupted; finished stages are kept, rerun to resume", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("qmerge: internal error (exit 1): this is a bug, please report it with the traceback above",
              file=sys.stderr)
        return EXIT_INTERNAL
