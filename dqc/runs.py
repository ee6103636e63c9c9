"""The three training runs of the paper, wired from the shared pieces.

`train_cycles` is the standard travelling model (fresh model) and the dirty baseline (loaded
model); `run_quality_control` adds the QC policy. All use `travel.travel_cycle`, write each cycle
atomically through `checkpoint.save_cycle`, and resume from the last complete cycle.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np
import pandas as pd

from dqc import checkpoint, defaults, qc_page, qc_report
from dqc.authors import AuthorsPair
from dqc.data import image_shape, load_table, require_both_classes, row_source
from dqc.errors import DQCError
from dqc.model import Architecture, build_models, input_shape
from dqc.criteria import Criterion, make_criterion
from dqc.qc import (Evaluation, QCState, QualityControl, describe_calibration,
                    evaluate_predictions)
from dqc.runtime import setup_runtime
from dqc.trainer import LR_SCHEDULES, Trainer, cycle_learning_rate, predict_subjects
from dqc.travel import CycleStats, Step, centers_of, local_step, travel_cycle
from dqc.timing import Timings
from dqc.volumes import VolumeStore


@dataclass(frozen=True)
class Execution:
    """How a run computes, apart from what it computes (the decisions are the same either
    way), beyond `RunSpec.cache` and `eval_batch_size`: chosen once, by whoever builds the
    `RunSpec` (`dqc.bench` sets the authors' way to compare with the default fast path).

    Parameters
    ----------
    prefetch:
        Read the next batch's images in the background while the current one trains.
    validation_on_device:
        Move a cached validation set to the device once; else read it at every evaluation.
    host_snapshots:
        Undo through weights copied to the host (the authors' way) instead of on the device.
    fold_batchnorm:
        Predict with each BatchNormalization folded into the convolution before it
        (`dqc.folding`); the authors' way predicts with the layers as trained.
    timings:
        The run's stopwatches: where its time goes.
    """

    prefetch: bool = True
    validation_on_device: bool = True
    host_snapshots: bool = False
    fold_batchnorm: bool = True
    timings: Timings = field(default_factory=Timings)


@dataclass
class RunSpec:
    """What a training run needs, whatever its kind."""

    train_csv: str
    out: str
    prefix: str
    cycles: range
    seed: int
    batch_size: int = defaults.BATCH_SIZE
    epochs: int = defaults.EPOCHS
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
    lr_schedule: str = defaults.LR_SCHEDULE  # see trainer.cycle_learning_rate
    execution: Execution = field(default_factory=Execution)  # how it computes, not what

    def schedule(self) -> Callable[[int], float]:
        """Cycle -> learning rate; a restart counts from the run's start cycle, not from
        the cycle a resumed run continues with."""
        return partial(cycle_learning_rate, first=self.cycles.start, schedule=self.lr_schedule)


def authors_way(spec: RunSpec) -> RunSpec:
    """`spec` computed the authors' way, what `dqc.bench --naive` times against the fast
    path: every image read from disk at every use, each validation image predicted alone,
    undo through the host. Same decisions, same timings object."""
    return replace(spec, cache=False, eval_batch_size=1,
                   execution=Execution(prefetch=False, validation_on_device=False,
                                       host_snapshots=True, fold_batchnorm=False,
                                       timings=spec.execution.timings))


#: The models a run starts from, and their authors' pair when they came from their files.
Models = tuple[keras.Model, keras.Model, AuthorsPair | None]


def _start(spec: RunSpec, table: pd.DataFrame
           ) -> tuple[Models, int, Callable[[], tuple[Trainer, dict]]]:
    """The models to continue with, the first cycle to run, and the maker of their trainer
    (with the state's meta record).

    The models' input shape sizes the image stores, which read and check every image; the
    trainer (compiling and tracing: the slow part) is made after that, so a bad image is
    refused at once. A fresh model takes its input shape from `--image-shape` or the first
    training image.
    """
    options = {"eval_batch_size": spec.eval_batch_size,
               "host_snapshots": spec.execution.host_snapshots,
               "fold_batchnorm": spec.execution.fold_batchnorm}
    last = checkpoint.last_complete_cycle(spec.out, spec.prefix) if spec.resume else None
    if last is not None and last >= spec.cycles.start:
        paths = checkpoint.cycle_paths(spec.out, spec.prefix, last)
        models = checkpoint.load_models(paths["encoder"], paths["classifier"])
        spec.echo(f"resuming after cycle {last} from {paths['state']}")
        return models, last + 1, partial(checkpoint.trainer_for, models, paths["classifier"],
                                         **options)
    if spec.encoder or spec.classifier:
        if not (spec.encoder and spec.classifier):
            raise DQCError("give both -en (encoder) and -pd (classifier) model files")
        models = checkpoint.load_models(spec.encoder, spec.classifier)
        return models, spec.cycles.start, partial(checkpoint.trainer_for, models,
                                                  spec.classifier, **options)
    shape = spec.image_shape
    if shape is None:
        first = table.iloc[0]
        shape = image_shape(first.Path, first.Subject, row_source(table, table.index[0]))
    encoder, classifier = build_models(shape, spec.arch)
    return (encoder, classifier, None), spec.cycles.start, \
        lambda: (Trainer(encoder, classifier, **options), {})


def _store(spec: RunSpec, models: Models, table: pd.DataFrame, desc: str) -> VolumeStore:
    return VolumeStore(table, input_shape(models[0]), cache=spec.cache,
                       budget_mb=spec.cache_mb, desc=desc, verbose=spec.verbose)


def _local_step(spec: RunSpec, trainer: Trainer, store: VolumeStore
                ) -> tuple[Step, Callable[[list[str]], None] | None]:
    """A training step on this machine's images, and the prefetch of the next batch."""
    return (local_step(trainer, store, spec.execution.timings),
            store.prefetch if spec.execution.prefetch else None)


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
    models, first, make_trainer = _start(spec, table)
    store = _store(spec, models, table, "training images")
    trainer, _ = make_trainer()
    step, prefetch = _local_step(spec, trainer, store)
    return run_cycles(spec, trainer, centers_of(table), range(first, spec.cycles.stop), step,
                      prefetch, spec.execution.timings)


def run_cycles(spec: RunSpec, trainer: Trainer, centers: dict[str, list[str]], cycles: range,
               step: Step, prefetch: Callable[[list[str]], None] | None, clock: Timings,
               policy: QualityControl | None = None, log: Path | None = None,
               after: Callable[[QualityControl, int], None] | None = None
               ) -> list[CycleStats]:
    """The one loop of every run: each cycle travels the centers, then is checkpointed
    (atomically, so `--resume` continues after the last whole one) and reported in a line.

    With a QC `policy` each update is verified (`policy.verify_batch` instead of `step`),
    the cycle ends with the revisit pass, and the QC state and its log (`log`) are written
    with the cycle, then `after(policy, cycle)` runs (the report); without, the cycle's batch losses are kept (a later QC run's trainloss
    window starts with them).
    """
    history = []
    for cycle in cycles:
        with clock("cycle"):
            if policy is not None:
                policy.start_cycle(cycle)
            stats = travel_cycle(trainer, centers, cycle,
                                 step if policy is None else policy.verify_batch, seed=spec.seed,
                                 batch_size=spec.batch_size, epochs=spec.epochs,
                                 select=None if policy is None else policy.select,
                                 prefetch=prefetch, verbose=spec.verbose, schedule=spec.schedule(),
                                 labels=None if policy is None else policy.batch_labels())
            if policy is not None:
                policy.revisit_pass()
        meta = {"seed": spec.seed, "learning_rate": stats.learning_rate}
        if policy is None:
            meta.update(batch_losses=list(stats.batch_losses), batch_size=spec.batch_size)
        else:
            qc_report.write_log(policy, log)
            meta["qc"] = policy.state.to_json()
        checkpoint.save_cycle(trainer, spec.out, spec.prefix, cycle, meta)
        if after is not None:
            after(policy, cycle)
        spec.echo(stats.line() if policy is None
                  else qc_report.cycle_line(policy, cycle, stats, clock.last("cycle")))
        history.append(stats)
    return history


# --- quality control ---------------------------------------------------------------------

@dataclass
class QCSpec:
    """The QC run's own settings on top of a `RunSpec`: the criterion by name with the
    parameters given for it (`params`: the others take the criterion's defaults; one it does
    not take is refused), `error` being the paper's e (criterion `rates` only)."""

    val_csv: str
    error: float | None = None
    revisit: int = defaults.REVISIT
    name: str = "qc"
    legacy_rates: bool = False
    criterion: str = defaults.CRITERION  # see dqc.criteria.CRITERIA
    params: dict = field(default_factory=dict)
    report: bool = True  # NAME_report.html after every cycle (dqc.qc_page)

    def rule(self) -> Criterion:
        """The criterion object (`DQCError` for an unknown name or a bad parameter)."""
        given = dict(self.params) if self.error is None else {"error": self.error, **self.params}
        return make_criterion(self.criterion, **given)


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


def _check_qc_inputs(spec: RunSpec, qspec: QCSpec, validation: Validation) -> Criterion:
    """The settings checked before anything is loaded; returns the criterion."""
    if qspec.revisit < 1:
        raise DQCError(f"-revisit must be at least 1, got {qspec.revisit}")
    rule = qspec.rule()
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
    for problem in rule.problems(validation.n_hc, validation.n_pd, qspec.legacy_rates):
        spec.echo(f"warning: {problem}")
    return rule


def _calibrate(policy: QualityControl, spec: RunSpec, trainer: Trainer, meta: dict) -> None:
    """The cold start (`QualityControl.calibrate`) at the first cycle's learning rate, from
    the pre-training's batch losses where its state file kept them at this batch size."""
    pretraining = meta.get("batch_losses", ())
    if meta.get("batch_size", spec.batch_size) != spec.batch_size:
        pretraining = ()  # another scale
    trainer.set_learning_rate(spec.schedule()(spec.cycles.start))
    calibration = policy.calibrate(spec.batch_size, spec.seed, pretraining)
    if calibration["steps"] or calibration["windows"]:
        print(describe_calibration(calibration), file=sys.stderr, flush=True)


#: Makes "train one step at center X" for the server's trainer (local, or a network round trip).
StepFactory = Callable[[Trainer], Step]
#: Makes the check of an update for the server's trainer (local, or the centers' round).
EvaluatorFactory = Callable[[Trainer], Callable[[Sequence[str]], Evaluation]]


@dataclass(frozen=True)
class Federation:
    """What a federated run swaps in (`dqc.federated.server`), because the images stay on
    the centers' machines.

    Parameters
    ----------
    train:
        The training images' Subject, Study and optionally Harmful: no image paths.
    make_step:
        "Train one step at center X" as a round trip to that center's node.
    verify:
        When the centers verify each update on their own validation images: what is known
        of that set, and the evaluator of the centers' round (the validation CSV is then
        not read); None: the server verifies on `-fn_test`.
    left_out:
        The run resumes without a center it excluded (`train` lacks its images): their
        revisits are dropped and the reference is evaluated again, on the validation set
        that remains.
    on_cycle:
        Runs after each cycle's files and report, with the policy and the cycle (the
        server's news to the centers: which of their images were flagged).
    """

    train: pd.DataFrame
    make_step: StepFactory
    verify: tuple[Validation, EvaluatorFactory] | None = None
    left_out: bool = False
    on_cycle: Callable[[QualityControl, int], None] | None = None


def run_quality_control(spec: RunSpec, qspec: QCSpec,
                        evaluate: Callable[[Sequence[str]], Evaluation] | None = None, *,
                        federation: Federation | None = None) -> QualityControl:
    """Travelling model with verification, revisit, elimination (docs/method.md, "Quality control").

    `evaluate` replaces the validation-set evaluator (tests use a deterministic stand-in);
    a federated run passes its `federation`. The loop, the policy and the outputs are this
    same code; how it computes is `spec.execution`.
    """
    setup_runtime(spec.seed, spec.mixed_precision)
    train = load_table(spec.train_csv, "train") if federation is None else federation.train
    make_step = None if federation is None else federation.make_step
    verify = None if federation is None else federation.verify
    if verify is None:
        val = load_table(qspec.val_csv, "validation")
        validation = Validation.of_table(val, train, qspec.val_csv)
    else:
        validation, make_evaluate = verify
    rule = _check_qc_inputs(spec, qspec, validation)
    # a federation, whose table holds no labels, refused such a criterion before it started
    labels = dict(zip(train.Subject, train.Group_bin)) if rule.mixes_witnesses() else None
    models, first, make_trainer = _start(spec, train)
    store = None if make_step is not None else _store(spec, models, train, "training images")
    val_store = None if verify is not None or evaluate is not None else \
        _store(spec, models, val, "validation images")
    trainer, meta = make_trainer()
    if store is not None:
        step, prefetch = _local_step(spec, trainer, store)
    else:
        step, prefetch = make_step(trainer), None
    clock = spec.execution.timings
    if verify is not None:
        evaluate = evaluate or make_evaluate(trainer)
    elif evaluate is None:
        evaluate = validation_evaluator(trainer, val_store, list(val.Subject),
                                        qspec.legacy_rates, clock,
                                        on_device=spec.execution.validation_on_device)
    resumed = "qc" in meta and first > spec.cycles.start
    policy = QualityControl(step, evaluate, trainer.snapshot, trainer.restore,
                            criterion=rule, revisit=qspec.revisit,
                            studies=dict(zip(train.Subject, train.Study)),
                            state=QCState.from_json(meta["qc"]) if resumed else None,
                            on_event=spec.echo, hold_out_momentum=trainer.hold_out_momentum,
                            labels=labels)
    if not resumed:
        with clock.paused():  # timings are of the cycles only
            policy.baseline()
            _calibrate(policy, spec, trainer, meta)
    elif federation is not None and federation.left_out:
        policy.state.reference = None
        policy.state.schedule = {c: [s for s in subjects if s in policy.present]
                                 for c, subjects in policy.state.schedule.items()}
    out = Path(spec.out)
    run_cycles(spec, trainer, centers_of(train), range(first, spec.cycles.stop), step,
               prefetch, clock, policy=policy, log=out / f"{qspec.name}.csv",
               after=qc_page.cycle_hook(spec, qspec, train,
                                        federation.on_cycle if federation else None))
    qc_report.write_outputs(policy, train, out, qspec.name, spec.cycles)
    spec.echo(qc_report.summary_table(policy, train))
    return policy
