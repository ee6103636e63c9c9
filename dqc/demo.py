"""The paper's experiment end to end on the embedded cohort, with a report.

    python -m dqc.demo --out demo_out          # about 20 minutes on 2 cores
    python -m dqc.demo --out demo_quick --quick

Stages, each reused when its outputs exist (rerunning after an interruption continues):
cohort -> clean travelling model (pre-training 0..P-1, then continued from the cycle P-1 model
as every other run is: the no-QC run of clean data) -> detectability of single updates from
the pre-trained model -> one dirty baseline per harmful type (how much each type harms) ->
three training sets (A: whole harmful centers, B: single harmful images in good centers, C:
no harmful image) -> for each, the dirty baseline (C: the clean run) and one QC run per
criterion from the cycle P-1 model -> inference on the held-out test set -> report (tables,
findings, plots, summary.json) in OUT/report.

The criteria are fixed before anything runs (`RULES`: the paper's rule and the recommended
criterion, each at its default settings, as `--criterion X` with no other flag runs it); each
run's seconds per cycle are kept beside its checkpoints (`CYCLE_SECONDS`), so the report can
set QC's cost against a training cycle.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from dqc import defaults
from dqc.cli import Parser, run_main
from dqc.errors import DQCError
from dqc.io import write_csv, write_json

#: The criteria the demo runs, named before any result exists: the paper's rule (the scripts'
#: default criterion) and the recommended one, both at their default settings.
RULES = (defaults.CRITERION, defaults.RECOMMENDED_CRITERION)
#: The pre-training's seed: the authors' standard travelling model script's.
PRETRAIN_SEED = 40
#: Each run's wall seconds per cycle, {cycle: seconds}, in its folder.
CYCLE_SECONDS = "cycle_seconds.json"
#: Each stage's wall seconds, {stage: seconds}, in the demo's folder.
STAGE_SECONDS = "stage_seconds.json"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and settings of the demo; the defaults are the full run."""

    out: Path
    centers: int = 20
    n_train: int = 200
    n_val: int = 240       # 120 of each class: the QC rule's tolerances resolve single images
    n_test: int = 200
    downsample: int = 4    # 40x48x40 voxels: above the 33-voxel limit of one-image steps
    effect: float = 0.5
    width: float = 0.5     # half the paper's filter counts: ~0.05 s per step on 2 cores
    intensity: str = "raw"  # the authors' raw intensities (see README: what harms here)
    pretrain: int = 10     # cycles 0..9, as in the paper
    cycles: int = 14       # runs end at cycle 13: QC cycles 10..13; images flagged in
    #                        10..11 are revisited (R = 2), later ones end pending
    revisit: int = defaults.REVISIT
    criteria: tuple[str, ...] = RULES
    finding_cycles: int = 3  # the findings' test AUROC: the mean over the last K cycles
    whole_centers: int = 2
    whole_types: tuple[str, ...] = ("inverted",)  # the type that harms here (see README)
    single_images: int = 4
    types: tuple[str, ...] = ("inverted", "noise")  # measured one by one; scenario B's
    instrument_n: int = 6  # candidates per detectability group (6 groups: its time)
    pretrain_batch_size: int = defaults.BATCH_SIZE
    seed: int = 0
    verbose: bool = True


QUICK = dict(centers=8, n_train=60, n_val=100, n_test=40, downsample=5, effect=0.6, width=0.25,
             pretrain=6, cycles=9, whole_centers=1, single_images=2,
             pretrain_batch_size=2, instrument_n=4)


@dataclass(frozen=True)
class Scenario:
    """A training set of the demo: its name in summary.json, its title, and whether it holds
    harmful images (without, its no-QC run is the clean run)."""

    key: str
    title: str
    harmful: bool = True


SCENARIOS = {"A": Scenario("whole_centers", "whole harmful centers"),
             "B": Scenario("single_images", "single harmful images"),
             "C": Scenario("clean", "no harmful image", harmful=False)}


def without_harm(scenario: str) -> bool:
    """Whether `scenario` names a scenario with no harmful image (C)."""
    return scenario in SCENARIOS and not SCENARIOS[scenario].harmful


def record_cycle_seconds(folder: Path, seconds: Sequence[float], stop: int) -> None:
    """Add the seconds of the cycles just run, the last len(seconds) before `stop`, to the
    folder's CYCLE_SECONDS."""
    if not len(seconds):
        return
    known = cycle_seconds(folder)
    known.update({stop - len(seconds) + i: float(s) for i, s in enumerate(seconds)})
    write_json(folder / CYCLE_SECONDS, {str(k): v for k, v in sorted(known.items())})


def cycle_seconds(folder: Path) -> dict[int, float]:
    """{cycle: wall seconds} of a run folder (empty when it was not timed)."""
    path = Path(folder) / CYCLE_SECONDS
    if not path.is_file():
        return {}
    return {int(k): float(v) for k, v in json.loads(path.read_text()).items()}


class Stages:
    """Runs the demo's stages in order, timing each and skipping those already done."""

    def __init__(self, config: DemoConfig):
        self.config = config
        self.out = Path(config.out)

    @property
    def seconds(self) -> dict[str, float]:
        """Wall seconds of every stage run so far, in this process or an earlier one."""
        path = self.out / STAGE_SECONDS
        return json.loads(path.read_text()) if path.is_file() else {}

    def stage(self, name: str, done: bool, work) -> None:
        """Run `work` unless `done`; its seconds go to OUT/STAGE_SECONDS."""
        if done:
            print(f"[demo] {name}: reused")
            return
        print(f"[demo] {name} ...", flush=True)
        start = time.perf_counter()
        work()
        seconds = time.perf_counter() - start
        write_json(self.out / STAGE_SECONDS, {**self.seconds, name: seconds})
        print(f"[demo] {name}: {seconds:.0f} s", flush=True)

    # --- paths -------------------------------------------------------------------------
    @property
    def cohort(self) -> Path:
        return self.out / "cohort"

    @property
    def detectability(self) -> Path:
        return self.out / "detectability"

    def run_dir(self, kind: str, scenario: str = "") -> Path:
        return self.out / (f"{kind}_{scenario}" if scenario else kind)

    def scenario_csv(self, scenario: str) -> Path:
        return self.out / f"scenario_{scenario}" / "train.csv"

    def own_type_runs(self) -> list[str]:
        """The harmful types that need a dirty baseline of their own: all but the one that
        scenario A already is (its whole centers of that one type)."""
        c = self.config
        return [t for t in c.types if (t,) != tuple(c.whole_types)]

    def type_run(self, kind: str) -> str:
        """The dirty run that shows what whole centers of one harmful type do."""
        return f"dirty_{kind}" if kind in self.own_type_runs() else "dirty_A"

    def pretrained(self) -> dict[str, Path]:
        from dqc import checkpoint  # imports Keras: after run_main chose the backend

        return checkpoint.cycle_paths(self.run_dir("clean"), "tm", self.config.pretrain - 1)

    def no_qc_run(self, scenario: str) -> str:
        """The run a scenario's QC runs are set against: its dirty baseline, or for a
        scenario without harmful images the clean run (the same data, continued alike)."""
        return "clean" if without_harm(scenario) else f"dirty_{scenario}"

    def qc_dir(self, scenario: str, criterion: str) -> Path:
        return self.run_dir("qc", f"{scenario}_{criterion}")

    def runs(self) -> dict[str, tuple[Path, str]]:
        """Every trained run the report compares: name -> (folder, file prefix)."""
        runs = {"clean": (self.run_dir("clean"), "tm")}
        for t in self.own_type_runs():
            runs[f"dirty_{t}"] = (self.run_dir("dirty", t), "dirty")
        for s, scenario in SCENARIOS.items():
            if scenario.harmful:
                runs[f"dirty_{s}"] = (self.run_dir("dirty", s), "dirty")
            for criterion in self.config.criteria:
                runs[f"qc_{s}_{criterion}"] = (self.qc_dir(s, criterion), "qc")
        return runs

    # --- stages ------------------------------------------------------------------------
    def build_cohort(self) -> None:
        from dqc.cohort import build_cohort

        c = self.config
        build_cohort(self.cohort, centers=c.centers, n_train=c.n_train, n_val=c.n_val,
                     n_test=c.n_test, downsample=c.downsample, effect=c.effect, seed=c.seed,
                     verbose=c.verbose)

    def _spec(self, **kwargs):
        from dqc.runs import RunSpec

        return RunSpec(verbose=self.config.verbose, resume=True, **kwargs)

    def _timed(self, run: Callable, spec, *args) -> None:
        """run(spec, *args) with the cycles timed (the spec's own stopwatch); their seconds
        are added to the run folder's CYCLE_SECONDS (a resumed run times only the cycles it
        trains)."""
        run(spec, *args)
        record_cycle_seconds(Path(spec.out), spec.execution.timings.history["cycle"],
                             spec.cycles.stop)

    def train_clean(self) -> None:
        """Pre-training (the authors' standard script: its seed, the pre-training batch size),
        then cycles P.. continued from the cycle P-1 model exactly as the dirty and QC runs
        are, so that the clean run is scenario C's no-QC run."""
        from dqc import checkpoint
        from dqc.model import Architecture
        from dqc.runs import train_cycles

        c = self.config
        train, out = self.cohort / "train.csv", self.run_dir("clean")
        done = checkpoint.last_complete_cycle(out, "tm")
        if done is None or done < c.pretrain - 1:
            self._timed(train_cycles, self._spec(
                train_csv=str(train), out=str(out), prefix="tm", cycles=range(0, c.pretrain),
                seed=PRETRAIN_SEED, batch_size=c.pretrain_batch_size,
                arch=Architecture(width=c.width, intensity=c.intensity)))
        self._timed(train_cycles, self._spec(**self._continued(train, out, "tm")))

    def measure_detectability(self) -> None:
        from dqc import checkpoint
        from dqc.data import load_table
        from dqc.detectability import run_instrument
        from dqc.runtime import setup_runtime

        c, p = self.config, self.pretrained()
        setup_runtime(c.seed)
        trainer, _ = checkpoint.load_trainer(p["encoder"], p["classifier"])
        run_instrument(trainer, load_table(self.cohort / "train.csv", "train"),
                       load_table(self.cohort / "val.csv", "validation"), types=list(c.types),
                       n=c.instrument_n, error=defaults.ERROR, cycle=c.pretrain, seed=c.seed,
                       out=self.detectability, verbose=c.verbose)

    def build_scenario(self, scenario: str) -> None:
        """A and B as in the paper; C: the cohort's training set as it is, every image marked
        good (so that QC's summary counts good images eliminated); a harmful type's name: its
        whole centers, that type only."""
        from dqc.data import load_table
        from dqc.harmful import build_scenario

        c = self.config
        if without_harm(scenario):
            table = load_table(self.cohort / "train.csv", "train")
            write_csv(self.scenario_csv(scenario), table.assign(Harmful=0, HarmfulType=""))
            return
        counts = {"A": dict(centers=self.harmful_centers(), types=list(c.whole_types)),
                  "B": dict(single_images=c.single_images, types=list(c.types))}
        kwargs = counts.get(scenario, dict(centers=self.harmful_centers(), types=[scenario]))
        build_scenario(self.cohort / "train.csv", self.scenario_csv(scenario).parent,
                       seed=c.seed, verbose=c.verbose, **kwargs)

    def harmful_centers(self) -> list[str]:
        """The wholly harmful centers: the 2nd..(K+1)th largest training centers, largest first
        (the harmful types are dealt out in this order).

        Small harmful centers (about 10 of 200 images) changed nothing on this cohort, for the
        dirty baseline as for QC; large ones carry enough weight to matter. The very largest
        center stays good so that the good data still dominates.
        """
        table = pd.read_csv(self.cohort / "train.csv", dtype={"Study": str})
        sizes = table.Study.value_counts(sort=False)
        order = sorted(sizes.index, key=lambda center: (-sizes[center], center))
        return order[1:1 + self.config.whole_centers]

    def _continued(self, train_csv: Path, out: Path, prefix: str) -> dict:
        """A run from the cycle P-1 model over cycles P..: the dirty, QC and clean runs."""
        p = self.pretrained()
        return dict(train_csv=str(train_csv), out=str(out), prefix=prefix,
                    cycles=range(self.config.pretrain, self.config.cycles), seed=defaults.SEED,
                    encoder=str(p["encoder"]), classifier=str(p["classifier"]))

    def train_dirty(self, scenario: str) -> None:
        from dqc.runs import train_cycles

        self._timed(train_cycles, self._spec(**self._continued(
            self.scenario_csv(scenario), self.run_dir("dirty", scenario), "dirty")))

    def qc_spec(self, criterion: str):
        """The QC settings of one criterion: its defaults (as `--criterion X` alone), with the
        demo's validation set and revisit R."""
        from dqc.runs import QCSpec

        return QCSpec(val_csv=str(self.cohort / "val.csv"), revisit=self.config.revisit,
                      name="qc", criterion=criterion)

    def quality_control(self, scenario: str, criterion: str) -> None:
        from dqc.runs import run_quality_control

        self._timed(run_quality_control, self._spec(**self._continued(
            self.scenario_csv(scenario), self.qc_dir(scenario, criterion), "qc")),
            self.qc_spec(criterion))

    def infer(self, name: str, folder: Path, prefix: str, cycles: range | None = None) -> None:
        """Score a run's cycle models (those in `cycles`; all by default) on the test set."""
        from dqc.inference import find_cycle_models, output_paths, predict_cycles, write_outputs

        models = find_cycle_models(folder, folder, prefix=prefix, cycles=cycles)
        metrics, predictions = predict_cycles(self.cohort / "test.csv", models,
                                              verbose=self.config.verbose)
        write_outputs(metrics, predictions, output_paths(self.out / "inference", name))

    def scored(self, name: str, folder: Path, prefix: str) -> bool:
        """Whether run `name`'s test metrics exist and are newer than each of its cycle
        models: a run trained again after it was scored (its folder removed and rerun) is
        scored again, never reported with the earlier run's metrics."""
        metrics = self.out / "inference" / f"{name}_metrics.csv"
        if not metrics.is_file():
            return False
        stamp = metrics.stat().st_mtime
        return all(m.stat().st_mtime <= stamp for part in ("encoder", "classifier")
                   for m in Path(folder).glob(f"{prefix}_{part}_*"))

    def score(self, name: str, folder: Path, prefix: str, cycles: range | None = None) -> None:
        """The stage that scores run `name` on the test set unless it is `scored`."""
        self.stage(f"inference {name}", self.scored(name, folder, prefix),
                   lambda: self.infer(name, folder, prefix, cycles))

    # --- the whole run -----------------------------------------------------------------
    def _dirty(self, scenario: str) -> None:
        from dqc import checkpoint

        last = self.config.cycles - 1
        self.stage(f"scenario {scenario}", self.scenario_csv(scenario).is_file(),
                   lambda: self.build_scenario(scenario))
        if without_harm(scenario):
            return
        self.stage(f"dirty baseline {scenario}",
                   checkpoint.last_complete_cycle(self.run_dir("dirty", scenario),
                                                  "dirty") == last,
                   lambda: self.train_dirty(scenario))

    def run(self) -> None:
        from dqc import checkpoint

        c = self.config
        last = c.cycles - 1
        self.stage("cohort", (self.cohort / "test.csv").is_file(), self.build_cohort)
        self.stage("clean travelling model",
                   checkpoint.last_complete_cycle(self.run_dir("clean"), "tm") == last,
                   self.train_clean)
        self.stage("detectability of single updates",
                   (self.detectability / "detectability.json").is_file(),
                   self.measure_detectability)
        for t in self.own_type_runs():
            self._dirty(t)
        for s in SCENARIOS:
            self._dirty(s)
            for criterion in c.criteria:
                self.stage(f"quality control {s} ({criterion})",
                           (self.qc_dir(s, criterion) / "qc_summary.json").is_file(),
                           lambda s=s, k=criterion: self.quality_control(s, k))
        for name, (folder, prefix) in self.runs().items():
            self.score(name, folder, prefix)
        from dqc.report import write_report

        start = time.perf_counter()
        path = write_report(self, SCENARIOS)
        print(f"[demo] report: {path} ({time.perf_counter() - start:.0f} s)")


def parse_args(argv=None):
    """The demo's command line; a flag left out keeps `DemoConfig`'s value."""
    d = DemoConfig(out=Path("demo_out"))
    p = Parser(description=__doc__)
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    add_variant_flags(p)
    p.add_argument("--centers", type=int, help=f"number of centers (default {d.centers})")
    p.add_argument("--train", type=int, dest="n_train", help=f"training images ({d.n_train})")
    p.add_argument("--val", type=int, dest="n_val", help=f"validation images for QC ({d.n_val})")
    p.add_argument("--test", type=int, dest="n_test", help=f"held-out test images ({d.n_test})")
    p.add_argument("--downsample", type=int, help=f"integer factor from 160x192x160 "
                   f"({d.downsample}: 40x48x40)")
    p.add_argument("--effect", type=float, help=f"disease-effect strength ({d.effect})")
    p.add_argument("--width", type=float, help=f"model filter-count scale ({d.width}; 1 = the "
                   "paper's SFCN)")
    p.add_argument("--intensity", choices=("raw", "zscore"), help=f"model input ({d.intensity})")
    p.add_argument("--pretrain", type=int, help=f"pre-training cycles ({d.pretrain})")
    p.add_argument("-cycles", "--cycles", dest="cycles", type=int,
                   help=f"total cycles; runs end at cycles-1 ({d.cycles})")
    p.add_argument("-revisit", type=int, dest="revisit", help=f"QC revisit R ({d.revisit})")
    p.add_argument("--criteria", type=lambda s: tuple(s.split(",")), help="QC criteria to run, "
                   "comma-separated, each at its default settings (the paper's rule and the "
                   f"recommended criterion: {','.join(d.criteria)})")
    p.add_argument("--finding-cycles", type=int, help="the findings' test AUROC: the mean "
                   f"over the last K cycles ({d.finding_cycles})")
    p.add_argument("--whole-centers", type=int, help="scenario A: number of wholly harmful "
                   f"centers ({d.whole_centers})")
    p.add_argument("--single-images", type=int, help="scenario B: centers that get one harmful "
                   f"image each ({d.single_images})")
    p.add_argument("--types", type=lambda s: tuple(s.split(",")), help="harmful types "
                   "measured one by one (a dirty baseline each) and used in scenario B, "
                   f"comma-separated ({','.join(d.types)})")
    p.add_argument("--whole-types", type=lambda s: tuple(s.split(",")), help="scenario A's "
                   "types, dealt out to its centers from the largest "
                   f"({','.join(d.whole_types)})")
    p.add_argument("--seed", type=int, help=f"cohort and scenario seed ({d.seed})")
    return p.parse_args(argv)


def add_variant_flags(p: Parser) -> None:
    """--quick and --quiet: the demo's and the study's."""
    p.add_argument("--quick", action="store_true", help="a small, fast variant (about 1 "
                   "minute a demo): fewer, smaller images and cycles; numbers only indicative")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args) -> DemoConfig:
    config = DemoConfig(out=Path(args.out), verbose=not args.quiet)
    if args.quick:
        config = replace(config, **QUICK)
    given = {k: v for k, v in vars(args).items()
             if k in DemoConfig.__dataclass_fields__ and v is not None and k not in ("out",)}
    given.pop("verbose", None)
    config = replace(config, **given)
    check_config(config)
    return config


def check_config(config: DemoConfig) -> None:
    """One-line errors for settings the demo cannot run with."""
    from dqc.harmful import check_types
    from dqc.criteria import CRITERIA

    check_types(config.types)
    check_types(config.whole_types)
    unknown = [k for k in config.criteria if k not in CRITERIA]
    if unknown or not config.criteria:
        raise DQCError(f"--criteria: unknown {', '.join(unknown) or '(none given)'} "
                       f"(known: {', '.join(CRITERIA)})")
    if set(config.types) & set(SCENARIOS):
        raise DQCError(f"--types: {', '.join(SCENARIOS)} name the scenarios")
    if not 1 <= config.finding_cycles <= config.cycles - config.pretrain:
        raise DQCError(f"--finding-cycles {config.finding_cycles}: the findings average 1 to "
                       f"{config.cycles - config.pretrain} cycles (those after pre-training)")


def main(argv=None):
    config = config_from_args(parse_args(argv))
    start = time.perf_counter()
    print(f"[demo] settings: {', '.join(f'{k}={v}' for k, v in asdict(config).items())}")
    Stages(config).run()
    print(f"[demo] done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run_main(main)
