"""The three training runs of the paper, wired from the shared pieces.

`train_cycles` is the standard travelling model (fresh model) and the dirty baseline (loaded
model); `run_quality_control` adds the QC policy. All use `travel.run_cycle`, write each cycle
atomically through `checkpoint.save_cycle`, and resume from the last complete cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from dqc import defaults
from dqc import checkpoint, qc_report
from dqc.data import image_shape, load_table, require_both_classes, row_source
from dqc.errors import DQCError
from dqc.model import Architecture, build_models, input_shape
from dqc.qc import (CRITERIA, MIN_WINDOW, Criterion, Evaluation, QCState, QualityControl,
                    evaluate_predictions, per_image_tolerance_problems)
from dqc.runtime import setup_runtime
from dqc.trainer import LR_SCHEDULES, Trainer, cycle_learning_rate, predict_subjects
from dqc.travel import CycleStats, Step, centers_of, local_step, run_cycle
from dqc.timing import Timings
from dqc.volumes import VolumeStore


@dataclass
class RunSpec:
    """What a training run needs, whatever its kind."""

    train_csv: str
    out: str
    prefix: str
    cycles: range
    seed: int
    batch_size: int = defaults.BATCH_SIZE
    epochs: int = 1
    encoder: str | None = None      # continue from these files (dirty / QC runs)
    classifier: str | None = None
    image_shape: tuple[int, int, int] | None = None
    arch: Architecture = field(default_factory=Architecture)  # a fresh model's width, intensity
    resume: bool = False
    cache: bool = True
    cache_mb: float | None = None
    eval_batch_size: int = defaults.EVAL_BATCH_SIZE
    mixed_precision: bool = False
    verbose: bool = True
    echo: Callable[[str], None] = field(default=print)
    naive: bool = False             # benchmark only: the authors' way (see dqc.bench)
    timings: Timings | None = None  # where the time goes, for the benchmark
    lr_schedule: str = defaults.LR_SCHEDULE  # see trainer.cycle_learning_rate

    def trainer_options(self) -> dict:
        return {"eval_batch_size": 1 if self.naive else self.eval_batch_size,
                "host_snapshots": self.naive}

    def schedule(self) -> Callable[[int], float]:
        """Cycle -> learning rate; a restart counts from the run's start cycle, not from
        the cycle a resumed run continues with."""
        return partial(cycle_learning_rate, first=self.cycles.start, schedule=self.lr_schedule)


def _start(spec: RunSpec, table: pd.DataFrame) -> tuple[Trainer, int, dict]:
    """The trainer to continue with, the first cycle to run and the state's meta record.

    A fresh model takes its input shape from `--image-shape` or the first training image.
    """
    last = checkpoint.last_complete_cycle(spec.out, spec.prefix) if spec.resume else None
    if last is not None and last >= spec.cycles.start:
        paths = checkpoint.cycle_paths(spec.out, spec.prefix, last)
        trainer, meta = checkpoint.load_trainer(paths["encoder"], paths["classifier"],
                                                **spec.trainer_options())
        spec.echo(f"resuming after cycle {last} from {paths['state']}")
        return trainer, last + 1, meta
    if spec.encoder or spec.classifier:
        if not (spec.encoder and spec.classifier):
            raise DQCError("give both -en (encoder) and -pd (classifier) model files")
        trainer, meta = checkpoint.load_trainer(spec.encoder, spec.classifier,
                                                **spec.trainer_options())
        return trainer, spec.cycles.start, meta
    shape = spec.image_shape
    if shape is None:
        first = table.iloc[0]
        shape = image_shape(first.Path, first.Subject, row_source(table, table.index[0]))
    encoder, classifier = build_models(shape, spec.arch)
    return Trainer(encoder, classifier, **spec.trainer_options()), spec.cycles.start, {}


def _store(spec: RunSpec, trainer: Trainer, table: pd.DataFrame, desc: str) -> VolumeStore:
    return VolumeStore(table, input_shape(trainer.encoder), cache=spec.cache and not spec.naive,
                       budget_mb=spec.cache_mb, desc=desc, verbose=spec.verbose)


def _prefetch(spec: RunSpec, store: VolumeStore) -> Callable[[list[str]], None] | None:
    return None if spec.naive else store.prefetch


def _check_cycles(spec: RunSpec) -> None:
    if len(spec.cycles) == 0:
        raise DQCError(f"-cycles {spec.cycles.stop} leaves nothing to train after start cycle "
                       f"{spec.cycles.start}")
    if spec.batch_size < 1 or spec.epochs < 1:
        raise DQCError("-batch_size and -epochs must be at least 1")
    if spec.lr_schedule not in LR_SCHEDULES:
        raise DQCError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got "
                       f"{spec.lr_schedule!r}")


def train_cycles(spec: RunSpec) -> list[CycleStats]:
    """Standard travelling model (fresh) or dirty baseline (from -en/-pd), no quality control."""
    setup_runtime(spec.seed, spec.mixed_precision)
    _check_cycles(spec)
    table = load_table(spec.train_csv, "train")
    trainer, first, _ = _start(spec, table)
    store = _store(spec, trainer, table, "training images")
    centers = centers_of(table)
    step = local_step(trainer, store, spec.timings)
    history = []
    for cycle in range(first, spec.cycles.stop):
        stats = run_cycle(trainer, centers, cycle, step, seed=spec.seed,
                          batch_size=spec.batch_size, epochs=spec.epochs,
                          prefetch=_prefetch(spec, store), verbose=spec.verbose,
                          schedule=spec.schedule())
        checkpoint.save_cycle(trainer, spec.out, spec.prefix, cycle,
                              {"seed": spec.seed, "learning_rate": stats.learning_rate,
                               "batch_losses": list(stats.batch_losses)})
        spec.echo(stats.line())
        history.append(stats)
    return history


# --- quality control ---------------------------------------------------------------------

@dataclass
class QCSpec:
    """The QC run's own settings on top of a `RunSpec`."""

    val_csv: str
    error: float = defaults.ERROR
    revisit: int = defaults.REVISIT
    name: str = "qc"
    legacy_rates: bool = False
    criterion: str = defaults.CRITERION  # see dqc.qc.Criterion
    alpha: float = defaults.ALPHA
    z: float = defaults.Z
    window: int = defaults.WINDOW

    def rule(self) -> Criterion:
        return Criterion(self.criterion, error=self.error, alpha=self.alpha, z=self.z,
                         window=self.window)


def validation_evaluator(trainer: Trainer, store: VolumeStore, subjects: Sequence[str],
                         legacy_rates: bool = False, timings: Timings | None = None,
                         on_device: bool = True) -> Callable[[Sequence[str]], Evaluation]:
    """The server's check: predict the whole validation set in batches, count errors.

    A cached validation set is moved to the device once, as stored (uint8 for 8-bit
    images); each evaluation is then only compiled forward passes. Uncached (or naive), the
    images are read from disk at every evaluation, in batches of `eval_batch_size`.
    """
    y = store.y(subjects)
    clock = timings or Timings()
    if store.cached and on_device:
        x = trainer.on_device(store.stacked(subjects))

        def scores() -> np.ndarray:
            with clock("evaluate"):
                return trainer.predict(x)
    else:
        def scores() -> np.ndarray:
            return predict_subjects(trainer, store, subjects, timings)

    def evaluate(update_ids: Sequence[str]) -> Evaluation:
        return evaluate_predictions(y, scores(), legacy_rates=legacy_rates)
    return evaluate


@dataclass(frozen=True)
class Validation:
    """What the QC run knows of its validation set before it starts: its size by class, the
    ids that are training images too (a warning), and where it is (for messages)."""

    n_hc: int
    n_pd: int
    where: str
    also_training: tuple[str, ...] = ()

    @classmethod
    def of_table(cls, val: pd.DataFrame, train: pd.DataFrame, where: str) -> "Validation":
        require_both_classes(val, where)
        n_pd = int(val.Group_bin.sum())
        return cls(len(val) - n_pd, n_pd, where,
                   tuple(sorted(set(train.Subject) & set(val.Subject))))


def _check_qc_inputs(spec: RunSpec, qspec: QCSpec, validation: Validation) -> None:
    if qspec.revisit < 1:
        raise DQCError(f"-revisit must be at least 1, got {qspec.revisit}")
    if qspec.error < 0:
        raise DQCError(f"-error must be 0 or more, got {qspec.error}")
    _check_criterion(qspec)
    if spec.cycles.stop <= spec.cycles.start:
        raise DQCError(f"-cycles {spec.cycles.stop} must be greater than the start cycle "
                       f"{spec.cycles.start}")
    _check_cycles(spec)
    if not (validation.n_hc and validation.n_pd):
        raise DQCError(f"{validation.where}: {validation.n_hc} HC and {validation.n_pd} PD "
                       "images; both classes (0 = HC, 1 = PD) are needed")
    both = validation.also_training
    if both:
        shown = ", ".join(both[:10]) + (f" and {len(both) - 10} more" if len(both) > 10 else "")
        spec.echo(f"warning: {len(both)} image(s) are in both the training and the validation "
                  f"CSV: {shown}")
    if qspec.criterion != "rates":
        return
    for problem in per_image_tolerance_problems(validation.n_hc, validation.n_pd, qspec.error,
                                                qspec.legacy_rates):
        spec.echo(f"warning: validation set too small for -error {qspec.error}: {problem}; "
                  "every single-image check is then zero-tolerance and good images get "
                  "eliminated for one flipped prediction")


def _check_criterion(qspec: QCSpec) -> None:
    """The criterion flags, also when they come from a federated run config (no argparse)."""
    if qspec.criterion not in CRITERIA:
        raise DQCError(f"--criterion must be one of {', '.join(CRITERIA)}, got "
                       f"{qspec.criterion!r}")
    if not 0 < qspec.alpha < 1:
        raise DQCError(f"--alpha must be between 0 and 1, got {qspec.alpha}")
    if not qspec.z > 0:
        raise DQCError(f"--z must be greater than 0, got {qspec.z}")
    if qspec.window < MIN_WINDOW:
        raise DQCError(f"--window must be at least {MIN_WINDOW}, got {qspec.window}")


#: Makes "train one step at center X" for the server's trainer (local, or a network round trip).
StepFactory = Callable[[Trainer], Step]
#: Makes the check of an update for the server's trainer (local, or the centers' round).
EvaluatorFactory = Callable[[Trainer], Callable[[Sequence[str]], Evaluation]]


def run_quality_control(spec: RunSpec, qspec: QCSpec,
                        evaluate: Callable[[Sequence[str]], Evaluation] | None = None, *,
                        train: pd.DataFrame | None = None,
                        make_step: StepFactory | None = None,
                        verify: tuple[Validation, EvaluatorFactory] | None = None
                        ) -> QualityControl:
    """The travelling model with verification, revisit and elimination (ALGORITHM.md).

    `evaluate` replaces the validation-set evaluator (tests use a deterministic stand-in).
    Federated runs pass `train` (Subject, Study and optionally Harmful: no image paths) and
    `make_step`, because the training images stay on the centers' machines, and, when the
    centers verify each update on their own validation images, `verify`: what is known of
    that set and the evaluator of the centers' round; the validation CSV is then not read.
    The loop, the policy and the outputs are this same code.
    """
    setup_runtime(spec.seed, spec.mixed_precision)
    if train is None:
        train = load_table(spec.train_csv, "train")
    if verify is None:
        val = load_table(qspec.val_csv, "validation")
        validation = Validation.of_table(val, train, qspec.val_csv)
    else:
        validation, make_evaluate = verify
    _check_qc_inputs(spec, qspec, validation)
    trainer, first, meta = _start(spec, train)
    if make_step is None:
        store = _store(spec, trainer, train, "training images")
        step, prefetch = local_step(trainer, store, spec.timings), _prefetch(spec, store)
    else:
        step, prefetch = make_step(trainer), None
    if verify is not None:
        evaluate = evaluate or make_evaluate(trainer)
    elif evaluate is None:
        val_store = _store(spec, trainer, val, "validation images")
        evaluate = validation_evaluator(trainer, val_store, list(val.Subject),
                                        qspec.legacy_rates, spec.timings,
                                        on_device=not spec.naive)
    resumed = "qc" in meta and first > spec.cycles.start
    clock = spec.timings or Timings()
    policy = QualityControl(step, evaluate, trainer.snapshot, trainer.restore,
                            criterion=qspec.rule(), revisit=qspec.revisit,
                            studies=dict(zip(train.Subject, train.Study)),
                            state=QCState.from_json(meta["qc"]) if resumed else None,
                            on_event=spec.echo, hold_out_momentum=trainer.hold_out_momentum,
                            train_losses=meta.get("batch_losses", ()))
    if not resumed:
        with clock.paused():  # timings are of the cycles only
            policy.baseline()
    centers = centers_of(train)
    out = Path(spec.out)
    for cycle in range(first, spec.cycles.stop):
        with clock("cycle"):
            policy.cycle = cycle
            stats = run_cycle(trainer, centers, cycle, policy.verify_batch, seed=spec.seed,
                              batch_size=spec.batch_size, epochs=spec.epochs,
                              select=policy.select, prefetch=prefetch,
                              verbose=spec.verbose, schedule=spec.schedule())
            policy.revisit_pass()
        qc_report.write_log(policy, out / f"{qspec.name}.csv")
        checkpoint.save_cycle(trainer, out, spec.prefix, cycle,
                              {"seed": spec.seed, "learning_rate": stats.learning_rate,
                               "qc": policy.state.to_json()})
        spec.echo(qc_report.cycle_line(policy, cycle, stats, clock.last("cycle")))
    qc_report.write_outputs(policy, train, out, qspec.name, spec.cycles)
    spec.echo(qc_report.summary_table(policy, train))
    return policy
