"""What every script shares: `run_main` (the runtime setup; one-line errors and warnings), the
parser, the common flags."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Sequence

from dqc import defaults
from dqc.errors import DQCError
from dqc.criteria import CRITERIA, FLAGS, make_criterion
from dqc.runtime import BACKENDS, VERBOSE_ENV, choose_backend, quiet_start, wants_verbose


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def setup_process(argv: Sequence[str] | None = None) -> None:
    """The runtime setup every entry point shares, done by `run_main` before its `main`:
    warnings as one `warning:` line, TensorFlow's start-up lines off unless `--verbose` or
    DQC_VERBOSE=1 (`dqc.runtime.quiet_start`), and the Keras backend chosen
    (`dqc.runtime.choose_backend`: --backend, KERAS_BACKEND, `make setup GPU=1`'s choice,
    tensorflow), which must happen before Keras is first imported. A backend that cannot
    start raises `DQCError`. The dtype policy and seeds belong to a run
    (`dqc.runtime.setup_runtime`, called where a run starts)."""
    warnings.showwarning = _one_line_warning
    quiet_start(wants_verbose(sys.argv[1:] if argv is None else argv, os.environ))
    choose_backend(argv)


def run_main(main: Callable[[], object], argv: Sequence[str] | None = None) -> None:
    """Every entry point's `if __name__ == "__main__"`: `setup_process(argv)` (argv: the
    command line, default sys.argv[1:]), then `main()`, then exit with its status. A
    `DQCError` becomes `error: ...` on stderr and exit status 2; Ctrl-C exit status 130.

    Scripts import only Keras-free modules at the top (this one, `dqc.errors`,
    `dqc.defaults`, ...) and the Keras-using ones inside `main`, after parsing."""
    try:
        setup_process(argv)
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
    """argparse with defaults shown in --help and usage errors as one `error:` line (after
    the usage block, unless `usage_on_error=False`), exit status 2."""

    def __init__(self, *, usage_on_error: bool = True, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(**kwargs)
        self.usage_on_error = usage_on_error
        # read by `run_main` (a pre-parse) before Keras starts; here for --help and to be accepted
        self.add_argument("--backend", choices=BACKENDS, default=None,
                          help="Keras backend (default: KERAS_BACKEND, else the one `make "
                               "setup GPU=1` chose, else tensorflow); the start line on stderr "
                               "names it with the device and precision")
        # read by `run_main` (a pre-parse) before TensorFlow starts; a setting of the process,
        # not of the run, so not in the parsed values (`parse_known_args`)
        self.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                          help=f"keep TensorFlow's start-up lines on stderr (also "
                               f"{VERBOSE_ENV}=1)")

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 - argparse API
        parsed, extras = super().parse_known_args(args, namespace)
        if hasattr(parsed, "verbose"):
            delattr(parsed, "verbose")
        return parsed, extras

    def error(self, message: str):  # noqa: D102 - argparse API
        if self.usage_on_error:
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
    parser.add_argument("--eval-batch-size", type=int, default=defaults.EVAL_BATCH_SIZE,
                        help="images per forward pass when evaluating")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="compute in bfloat16 (weights stay float32); faster where the "
                             "hardware supports it, but QC decisions may differ slightly from "
                             "the float32 default")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_batch_size_flag(parser: argparse.ArgumentParser, help: str,
                        default: int = defaults.BATCH_SIZE) -> None:
    """The authors' `-batch_size`, in every script that takes a batch size (`--batch-size`,
    an earlier spelling of ours, is accepted too)."""
    parser.add_argument("-batch_size", "--batch-size", dest="batch_size", type=int,
                        default=default, help=help)


def add_lr_schedule_flag(parser: argparse.ArgumentParser) -> None:
    """For runs that continue a pre-trained model (dirty baseline, QC)."""
    parser.add_argument("--lr-schedule", choices=defaults.LR_SCHEDULES,
                        default=defaults.LR_SCHEDULE,
                        help="continue: cycle c trains at 1e-4 * exp(-0.1 c); restart (the "
                        "authors' dirty/QC scripts): the first cycle keeps the loaded rate "
                        "1e-4 * exp(-0.1 START), each later cycle c trains at "
                        "1e-4 * exp(-0.1 (c - START)): exp(0.1 START) times the continued "
                        "rate (2.7x from START 10)")


def run_options(args: argparse.Namespace) -> dict:
    """The `add_run_flags` values as `dqc.runs.RunSpec` keyword arguments."""
    return {"out": args.out, "seed": args.seed, "resume": args.resume,
            "cache": not args.no_cache, "cache_mb": args.cache_mb,
            "eval_batch_size": args.eval_batch_size,
            "mixed_precision": args.mixed_precision, "verbose": not args.quiet}


def add_qc_flags(parser: argparse.ArgumentParser) -> None:
    """The quality-control flags (the authors' single-dash ones first), shared by the
    single-machine script and the federated run."""
    p = parser
    p.add_argument("-fn_train", required=True, help="training CSV (Subject, Study, Path, "
                   "Group_bin; optional Harmful = ground truth, used only for reporting)")
    p.add_argument("-fn_test", required=True, help="the server's validation CSV used to verify "
                   "every update (keep it apart from the final test set); needs both classes, "
                   "ideally >= 1/error images of each")
    p.add_argument("-cycles", type=int, required=True, help="train cycles START..cycles-1")
    p.add_argument("-en", required=True, help="pre-trained encoder file (.keras or .h5)")
    p.add_argument("-pd", required=True, help="pre-trained classifier file (.keras or .h5); "
                   "its PREFIX_state_CCC.npz beside it carries the optimizer state")
    p.add_argument("-revisit", type=int, default=defaults.REVISIT, help="R: a flagged image is left out and "
                   "retried alone R cycles later; harmful again means eliminated")
    p.add_argument("-error", type=float, default=None, help="e, criterion rates only: "
                   "tolerated rise of either rate per image in the update (k * e for k "
                   f"images; default {defaults.ERROR}, the paper's)")
    p.add_argument("-fn_save", default="qc", help="NAME of the outputs: NAME.csv (log), "
                   "NAME_images.csv, NAME_summary.json and NAME_*_CCC model files")
    add_batch_size_flag(p, help="images per update")
    p.add_argument("--start-cycle", type=int, default=defaults.START_CYCLE, help="first cycle (the pre-trained "
                   "model ends at START-1)")
    p.add_argument("--legacy-rates", action="store_true", help="the authors' denominators: "
                   "FP / number of PD and FN / number of HC (default: FP / HC, FN / PD)")
    p.add_argument("--criterion", choices=list(CRITERIA), default=defaults.CRITERION,
                   help="what makes an update harmful. " + "; ".join(
                       f"{name}: {kind.summary}" for name, kind in CRITERIA.items())
                   + ". All but rates and mcnemar set their own threshold from the run's own "
                   "accepted updates (median + z * 1.4826 * MAD of the last --window of the "
                   "same kind: batches and single images apart), calibrated before the first "
                   "decision by a few steps, each undone (their cost is in the summary); an "
                   "image retried alone or revisited is judged against single-image steps on "
                   "images of batches the criterion accepts, calibrated in each cycle; "
                   "confirmed's validation check, against heldout check steps on kept "
                   "batches, calibrated in each cycle that confirms. "
                   f"Recommended: {defaults.RECOMMENDED_CRITERION}, because "
                   f"{defaults.RECOMMENDED_WHY}. Other than rates, the log gains VAL_LOSS, "
                   "VAL_AUROC, TRAIN_LOSS, STATISTIC, LIMIT. A flag of another criterion is "
                   "refused")
    p.add_argument("--alpha", type=float, default=None, help="mcnemar only: significance "
                   f"level (default {defaults.ALPHA})")
    self_set = ", ".join(name for name, kind in CRITERIA.items()
                         if "z" in kind.parameter_names())
    p.add_argument("--z", type=float, default=None, help=f"{self_set}: "
                   "the self-set threshold's robust z-score; nominal one-sided false-flag "
                   "rate under normality 1 - Phi(z): z=2 2.3%%, z=3 0.13%%, z=4 0.003%% "
                   f"(default {defaults.Z})")
    p.add_argument("--window", type=int, default=None, help=f"{self_set}: how many "
                   "accepted updates' statistics (of the same kind) the "
                   f"threshold looks back on (default {defaults.WINDOW}; at least 10)")
    p.add_argument("--no-report", action="store_true", help="do not write NAME_report.html "
                   "(the run's page: settings, validation figure, per-center table, the "
                   "eliminated and pending images; rewritten after every cycle)")
    add_lr_schedule_flag(p)
    add_run_flags(p, seed=defaults.SEED, prefix=None)


def qc_specs(args: argparse.Namespace):
    """(`RunSpec`, `QCSpec`) from `add_qc_flags` values. The criterion's flags are checked
    first (`DQCError`: a flag of another criterion, an impossible value), before Keras starts."""
    given = {k: getattr(args, k) for k in FLAGS if getattr(args, k, None) is not None}
    make_criterion(args.criterion, **given)
    from dqc.runs import QCSpec, RunSpec  # imports Keras: only once the flags are parsed

    spec = RunSpec(train_csv=args.fn_train, prefix=args.fn_save,
                   cycles=range(args.start_cycle, args.cycles), batch_size=args.batch_size,
                   encoder=args.en, classifier=args.pd, lr_schedule=args.lr_schedule,
                   **run_options(args))
    qspec = QCSpec(val_csv=args.fn_test, revisit=args.revisit, name=args.fn_save,
                   legacy_rates=args.legacy_rates, criterion=args.criterion, params=given,
                   report=not args.no_report)
    return spec, qspec


def check_positive(name: str, value: float, minimum: float = 1) -> None:
    if value < minimum:
        raise DQCError(f"{name} must be at least {minimum}, got {value}")
