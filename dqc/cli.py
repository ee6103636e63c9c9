"""What every script shares: quiet TensorFlow, one-line errors and warnings, common flags."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable

from dqc.errors import DQCError


def quiet_backend() -> None:
    """Silence TensorFlow's start-up chatter (call before keras is imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def run_main(main: Callable[[], object]) -> None:
    """Run a script's main: a `DQCError` becomes `error: ...` on stderr and exit status 2."""
    warnings.showwarning = _one_line_warning
    try:
        status = main()
    except DQCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: outputs of completed cycles are kept; rerun with --resume",
              file=sys.stderr)
        sys.exit(130)
    sys.exit(int(status or 0))


class _DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows `(default: X)` after a flag's help, except when there is no default to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS) and "default" not in text
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and usage errors as one `error:` line."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(**kwargs)

    def error(self, message: str):  # noqa: D102 - argparse API
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def add_run_flags(parser: argparse.ArgumentParser, seed: int, prefix: str | None) -> None:
    """Flags of every training script: output folder, seed, file prefix, resume, speed."""
    parser.add_argument("--out", default=".", help="folder for the per-cycle model files and "
                        "logs (created if missing)")
    parser.add_argument("--seed", type=int, default=seed,
                        help="cycle c shuffles centers and images with seed + c; also seeds "
                             "weight initialisation and dropout")
    if prefix is not None:
        parser.add_argument("--prefix", default=prefix, help="model file names: "
                            "PREFIX_encoder_CCC.keras, PREFIX_classifier_CCC.keras, "
                            "PREFIX_state_CCC.npz (optimizer state, to continue exactly)")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete "
                        "cycle found in --out instead of starting over")
    parser.add_argument("--no-cache", action="store_true", help="read images from disk at every "
                        "use instead of once (slow; for memory-starved machines)")
    parser.add_argument("--cache-mb", type=float, default=None, help="memory budget for cached "
                        "training images; above it they stream from disk with prefetch")
    parser.add_argument("--eval-batch-size", type=int, default=16,
                        help="images per forward pass when evaluating")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="compute in bfloat16 (CPU) / float16 (GPU); faster where the "
                             "hardware supports it, but QC decisions may differ slightly from "
                             "the float32 default")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_options(args: argparse.Namespace) -> dict:
    """The `add_run_flags` values as `dqc.runs.RunSpec` keyword arguments."""
    return {"out": args.out, "seed": args.seed, "resume": args.resume,
            "cache": not args.no_cache, "cache_mb": args.cache_mb,
            "eval_batch_size": args.eval_batch_size,
            "mixed_precision": args.mixed_precision, "verbose": not args.quiet}


def check_positive(name: str, value: float, minimum: float = 1) -> None:
    if value < minimum:
        raise DQCError(f"{name} must be at least {minimum}, got {value}")
