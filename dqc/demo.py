"""The paper's experiment end to end on the embedded cohort, with a report.

    python -m dqc.demo --out demo_out          # about 13 minutes on 2 cores
    python -m dqc.demo --out demo_quick --quick

Stages, each reused when its outputs exist (rerunning after an interruption continues):
cohort -> clean travelling model (pre-training 0..P-1, then on to the last cycle) -> two dirty
training sets (A: whole harmful centers, B: single harmful images in good centers) -> for
each, the dirty baseline and the QC run from the cycle P-1 model -> inference on the held-out
test set -> report (tables, detection figures, plots) in OUT/report.
"""

from __future__ import annotations

from dqc.cli import quiet_backend

quiet_backend()

import time  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

from dqc import checkpoint  # noqa: E402
from dqc.cli import Parser, run_main  # noqa: E402


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and settings of the demo; the defaults are the full run."""

    out: Path
    centers: int = 20
    n_train: int = 200
    n_val: int = 100       # >= 50 of each class: one extra error stays within -error 0.02
    n_test: int = 100
    downsample: int = 7    # 22x27x22 voxels: a QC cycle takes about a minute on 2 cores
    effect: float = 0.5
    pretrain: int = 10     # cycles 0..9, as in the paper
    cycles: int = 14       # clean, dirty and QC runs end at cycle 13 (QC cycles 10..13)
    revisit: int = 2
    error: float = 0.02
    whole_centers: int = 2
    single_images: int = 4
    pretrain_batch_size: int = 5
    seed: int = 0
    verbose: bool = True


QUICK = dict(centers=8, n_train=60, n_val=50, n_test=40, downsample=8, effect=0.6,
             pretrain=6, cycles=9, error=0.04, whole_centers=1, single_images=2,
             pretrain_batch_size=2)

SCENARIOS = {"A": "whole harmful centers", "B": "single harmful images"}


class Stages:
    """Runs the demo's stages in order, timing each and skipping those already done."""

    def __init__(self, config: DemoConfig):
        self.config = config
        self.out = Path(config.out)
        self.seconds: dict[str, float] = {}

    def stage(self, name: str, done: bool, work) -> None:
        if done:
            print(f"[demo] {name}: reused")
            return
        print(f"[demo] {name} ...", flush=True)
        start = time.perf_counter()
        work()
        self.seconds[name] = time.perf_counter() - start
        print(f"[demo] {name}: {self.seconds[name]:.0f} s", flush=True)

    # --- paths -------------------------------------------------------------------------
    @property
    def cohort(self) -> Path:
        return self.out / "cohort"

    def run_dir(self, kind: str, scenario: str = "") -> Path:
        return self.out / (f"{kind}_{scenario}" if scenario else kind)

    def pretrained(self) -> dict[str, Path]:
        return checkpoint.cycle_paths(self.run_dir("clean"), "tm", self.config.pretrain - 1)

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

    def train_clean(self) -> None:
        from dqc.runs import train_cycles

        train_cycles(self._spec(train_csv=str(self.cohort / "train.csv"),
                                out=str(self.run_dir("clean")), prefix="tm",
                                cycles=range(0, self.config.cycles), seed=40,
                                batch_size=self.config.pretrain_batch_size))

    def build_scenario(self, scenario: str) -> None:
        from dqc.harmful import build_scenario

        c = self.config
        counts = {"A": dict(centers=self.harmful_centers()),
                  "B": dict(single_images=c.single_images)}
        build_scenario(self.cohort / "train.csv", self.out / f"scenario_{scenario}",
                       types=["inverted", "noise"], seed=c.seed, verbose=c.verbose,
                       **counts[scenario])

    def harmful_centers(self) -> list[str]:
        """Scenario A's wholly harmful centers: the 2nd..(K+1)th largest training centers.

        On this cohort a few small harmful centers (about 10 of 200 images) changed nothing,
        for the dirty baseline as for QC; large ones carry enough weight to matter. The very
        largest center stays good so that the good data still dominates.
        """
        sizes = pd.read_csv(self.cohort / "train.csv", dtype={"Study": str}).Study.value_counts()
        return sorted(sizes.index[1:1 + self.config.whole_centers])

    def _continued(self, scenario: str, kind: str, prefix: str) -> dict:
        p = self.pretrained()
        return dict(train_csv=str(self.out / f"scenario_{scenario}" / "train.csv"),
                    out=str(self.run_dir(kind, scenario)), prefix=prefix,
                    cycles=range(self.config.pretrain, self.config.cycles), seed=42,
                    encoder=str(p["encoder"]), classifier=str(p["classifier"]))

    def train_dirty(self, scenario: str) -> None:
        from dqc.runs import train_cycles

        train_cycles(self._spec(**self._continued(scenario, "dirty", "dirty")))

    def quality_control(self, scenario: str) -> None:
        from dqc.runs import QCSpec, run_quality_control

        c = self.config
        run_quality_control(self._spec(**self._continued(scenario, "qc", "qc")),
                            QCSpec(val_csv=str(self.cohort / "val.csv"), error=c.error,
                                   revisit=c.revisit, name="qc"))

    def infer(self, name: str, folder: Path, prefix: str) -> None:
        from dqc.inference import find_cycle_models, output_paths, predict_cycles, write_outputs

        models = find_cycle_models(folder, folder, prefix=prefix)
        metrics, predictions = predict_cycles(self.cohort / "test.csv", models,
                                              verbose=self.config.verbose)
        write_outputs(metrics, predictions, output_paths(self.out / "inference", name))

    # --- the whole run -----------------------------------------------------------------
    def run(self) -> None:
        c = self.config
        last = c.cycles - 1
        self.stage("cohort", (self.cohort / "test.csv").is_file(), self.build_cohort)
        self.stage("clean travelling model",
                   checkpoint.last_complete_cycle(self.run_dir("clean"), "tm") == last,
                   self.train_clean)
        runs = {"clean": (self.run_dir("clean"), "tm")}
        for s in SCENARIOS:
            self.stage(f"scenario {s} ({SCENARIOS[s]})",
                       (self.out / f"scenario_{s}" / "train.csv").is_file(),
                       lambda s=s: self.build_scenario(s))
            self.stage(f"dirty baseline {s}",
                       checkpoint.last_complete_cycle(self.run_dir("dirty", s), "dirty") == last,
                       lambda s=s: self.train_dirty(s))
            self.stage(f"quality control {s}",
                       (self.run_dir("qc", s) / "qc_summary.json").is_file(),
                       lambda s=s: self.quality_control(s))
            runs[f"dirty_{s}"] = (self.run_dir("dirty", s), "dirty")
            runs[f"qc_{s}"] = (self.run_dir("qc", s), "qc")
        for name, (folder, prefix) in runs.items():
            self.stage(f"inference {name}",
                       (self.out / "inference" / f"{name}_metrics.csv").is_file(),
                       lambda n=name, f=folder, p=prefix: self.infer(n, f, p))
        from dqc.report import write_report

        start = time.perf_counter()
        path = write_report(self.out, c, SCENARIOS, self.seconds)
        print(f"[demo] report: {path} ({time.perf_counter() - start:.0f} s)")


def parse_args(argv=None):
    d = DemoConfig(out=Path("demo_out"))
    p = Parser(description=__doc__)
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    p.add_argument("--quick", action="store_true", help="a small, fast variant (about 3 "
                   "minutes): fewer, smaller images and cycles; numbers are only indicative")
    p.add_argument("--centers", type=int, help=f"number of centers (default {d.centers})")
    p.add_argument("--train", type=int, dest="n_train", help=f"training images ({d.n_train})")
    p.add_argument("--val", type=int, dest="n_val", help=f"validation images for QC ({d.n_val})")
    p.add_argument("--test", type=int, dest="n_test", help=f"held-out test images ({d.n_test})")
    p.add_argument("--downsample", type=int, help=f"integer factor from 160x192x160 "
                   f"({d.downsample}; 4 gives 40x48x40, ~4x slower)")
    p.add_argument("--effect", type=float, help=f"disease-effect strength ({d.effect})")
    p.add_argument("--pretrain", type=int, help=f"pre-training cycles ({d.pretrain})")
    p.add_argument("--cycles", type=int, help=f"total cycles; runs end at cycles-1 ({d.cycles})")
    p.add_argument("-revisit", type=int, dest="revisit", help=f"QC revisit R ({d.revisit})")
    p.add_argument("-error", type=float, dest="error", help=f"QC error e ({d.error})")
    p.add_argument("--whole-centers", type=int, help="scenario A: number of wholly harmful "
                   f"centers ({d.whole_centers})")
    p.add_argument("--single-images", type=int, help="scenario B: centers that get one harmful "
                   f"image each ({d.single_images})")
    p.add_argument("--seed", type=int, help=f"cohort and scenario seed ({d.seed})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def config_from_args(args) -> DemoConfig:
    config = DemoConfig(out=Path(args.out), verbose=not args.quiet)
    if args.quick:
        config = replace(config, **QUICK)
    given = {k: v for k, v in vars(args).items()
             if k in DemoConfig.__dataclass_fields__ and v is not None and k not in ("out",)}
    given.pop("verbose", None)
    return replace(config, **given)


def main(argv=None):
    config = config_from_args(parse_args(argv))
    start = time.perf_counter()
    print(f"[demo] settings: {', '.join(f'{k}={v}' for k, v in asdict(config).items())}")
    Stages(config).run()
    print(f"[demo] done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run_main(main)
