"""Benchmark of quality control: where a QC cycle's time goes, fast path against the naive one.

    python -m dqc.bench --cohort demo_out/cohort --cycles 1 --compare
    python -m dqc.bench --synthetic 40,360 --shape 160x192x160 --cycles 1
    python -m dqc.bench --cohort demo_out/cohort --modes fast,unfolded -en ... -pd ...

Each mode runs in its own process (so its peak memory is its own) and writes a JSON record;
`--compare` runs the fast path and `--naive` (the authors' way: every validation image read
from disk and predicted alone, with the layers as trained, after every update, weights copied
to the host for undo) on the same data, checks that both made the same decisions, and
reports the speed-up. `unfolded` is the fast path predicting with the BatchNormalization
layers as trained (`dqc.folding`).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dqc import defaults
from dqc.cli import Parser, run_main
from dqc.data import array_to_image, parse_shape
from dqc.errors import DQCError

MODES = {"fast": [], "naive": ["--naive"], "nocache": ["--no-cache"],
         "mixed": ["--mixed-precision"], "unfolded": ["--unfolded"]}


def synthetic_cohort(out: Path, n_train: int, n_val: int, shape: tuple[int, int, int],
                     centers: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """Random smooth 8-bit volumes (uncompressed .nii, fast to write) for timing only."""
    from scipy.ndimage import zoom

    from dqc.io import write_csv, write_image

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    coarse = rng.integers(0, 200, size=(8, 8, 8)).astype(np.float32)
    template = zoom(coarse, [s / 8 for s in shape], order=1)[:shape[0], :shape[1], :shape[2]]
    noise = rng.normal(0, 10, shape).astype(np.float32)
    rows = []
    for i in range(n_train + n_val):
        path = out / f"syn-{i:04d}.nii"
        if not path.exists():  # one noise field, rolled: fast enough for 160x192x160
            volume = np.clip(template + np.roll(noise, 7 * i, axis=0), 0, 255).astype(np.uint8)
            write_image(path, array_to_image(volume))
        rows.append({"Subject": f"syn-{i:04d}", "Study": f"S{i % centers:02d}",
                     "Path": path.name, "Group_bin": i % 2, "Sex": "MF"[i % 2], "Age": 65})
    table = pd.DataFrame(rows)
    train, val = out / "train.csv", out / "val.csv"
    write_csv(train, table.iloc[:n_train])
    write_csv(val, table.iloc[n_train:])
    return train, val


def run_mode(args) -> dict:
    """One QC run with timings, in this process; returns the JSON record."""
    from dqc.runs import Execution, QCSpec, RunSpec, authors_way, run_quality_control

    out = Path(args.out) / args.mode_name
    spec = RunSpec(train_csv=args.train, out=str(out), prefix="bench",
                   cycles=range(args.start_cycle, args.start_cycle + args.cycles), seed=defaults.SEED,
                   encoder=args.en, classifier=args.pd, cache=not args.no_cache,
                   eval_batch_size=args.eval_batch_size, mixed_precision=args.mixed_precision,
                   verbose=not args.quiet,
                   echo=lambda line: print(line, file=sys.stderr))
    spec = authors_way(spec) if args.naive else spec
    if args.unfolded:  # the fast path, predicting with the BatchNorm layers as trained
        spec.execution = Execution(fold_batchnorm=False)
    timings = spec.execution.timings
    start = time.perf_counter()
    policy = run_quality_control(spec, QCSpec(val_csv=args.val, error=args.error,
                                              revisit=args.revisit, name="bench"))
    wall = time.perf_counter() - start
    log = pd.DataFrame(policy.state.log)
    qc_log = log[log.Cycle >= args.start_cycle]
    trained = len(qc_log[qc_log.Subject != "batch"]) + 5 * int((qc_log.Subject == "batch").sum())
    per_cycle = qc_log.groupby("Cycle").size().tolist()
    return {"mode": args.mode_name, "wall_s": wall, "qc_s": timings.seconds["cycle"],
            "cycle_s": timings.history["cycle"], "cycle_verifications": per_cycle,
            "seconds": dict(timings.seconds), "calls": dict(timings.calls),
            "verifications": int(len(qc_log)), "images_trained_approx": trained,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ignored": log.Ignored.tolist(), "eliminated": sorted(policy.eliminated()),
            "rows": log[["Cycle", "Subject", "ACC", "FP", "FN", "Ignored"]].values.tolist()}


def describe(r: dict, cycles: int) -> str:
    s = r["seconds"]
    model = s.get("train", 0) + s.get("evaluate", 0)
    qc_time = r["qc_s"]
    other = max(qc_time - model - s.get("data", 0), 0)
    steady = (f"  last cycle {r['cycle_s'][-1] / r['cycle_verifications'][-1]:.3f} "
              "s/verification") if len(r["cycle_s"]) > 1 else ""
    return (f"{r['mode']:>8}: {qc_time / cycles:7.1f} s/cycle  "
            f"{r['verifications'] / qc_time:6.2f} verifications/s  "
            f"{qc_time / max(r['verifications'], 1):6.3f} s/verification  "
            f"train {s.get('train', 0) / qc_time:5.1%}  evaluation {s.get('evaluate', 0) / qc_time:5.1%}  "
            f"data {s.get('data', 0) / qc_time:5.1%}  bookkeeping {other / qc_time:5.1%}  "
            f"(overhead beyond model compute {(qc_time - model) / qc_time:5.1%})  "
            f"peak RSS {r['peak_rss_mb']:.0f} MB{steady}")


def parse_args(argv=None):
    p = Parser(description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cohort", help="folder with train.csv and val.csv (e.g. the demo cohort)")
    src.add_argument("--synthetic", metavar="N_TRAIN,N_VAL",
                     help="generate random volumes instead: numbers of training and "
                          "validation images")
    p.add_argument("--shape", default="40x48x40", help="volume shape for --synthetic")
    p.add_argument("-en", default=None, help="start from this encoder (default: a fresh model)")
    p.add_argument("-pd", default=None, help="start from this classifier")
    p.add_argument("--cycles", type=int, default=1, help="QC cycles to time")
    p.add_argument("--start-cycle", type=int, default=defaults.START_CYCLE, help="cycle number of the first one")
    p.add_argument("-error", "--error", dest="error", type=float, default=defaults.ERROR,
                   help="QC -error")
    p.add_argument("-revisit", "--revisit", dest="revisit", type=int, default=defaults.REVISIT,
                   help="QC -revisit")
    p.add_argument("--eval-batch-size", type=int, default=defaults.EVAL_BATCH_SIZE, help="validation batch size")
    p.add_argument("--modes", default="fast", help=f"comma list of {', '.join(MODES)}; each "
                   "runs in its own process")
    p.add_argument("--compare", action="store_true", help="same as --modes fast,naive")
    p.add_argument("--out", default="bench_out", help="folder for runs and bench.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    # internal: one mode in this process
    p.add_argument("--mode-name", default=None, help=argparse_hidden())
    p.add_argument("--train", default=None, help=argparse_hidden())
    p.add_argument("--val", default=None, help=argparse_hidden())
    p.add_argument("--naive", action="store_true", help=argparse_hidden())
    p.add_argument("--no-cache", action="store_true", help=argparse_hidden())
    p.add_argument("--mixed-precision", action="store_true", help=argparse_hidden())
    p.add_argument("--unfolded", action="store_true", help=argparse_hidden())
    return p.parse_args(argv)


def argparse_hidden() -> str:
    import argparse
    return argparse.SUPPRESS


def main(argv=None):
    from dqc.io import write_json

    args = parse_args(argv)
    if args.mode_name:  # child process: one mode
        print(json.dumps(run_mode(args)))
        return 0
    out = Path(args.out)
    if args.synthetic:
        try:
            n_train, n_val = (int(v) for v in args.synthetic.split(","))
        except ValueError:
            raise DQCError(f"--synthetic: expected N_TRAIN,N_VAL, got {args.synthetic!r}") from None
        train, val = synthetic_cohort(out / "synthetic", n_train, n_val, parse_shape(args.shape))
    else:
        train, val = Path(args.cohort) / "train.csv", Path(args.cohort) / "val.csv"
    modes = ["fast", "naive"] if args.compare else args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise DQCError(f"--modes: unknown {', '.join(unknown)} (choose from {', '.join(MODES)})")
    results = []
    for mode in modes:
        command = [sys.executable, "-m", "dqc.bench", "--cohort", ".", "--mode-name", mode,
                   "--train", str(train), "--val", str(val), "--out", str(out),
                   "--cycles", str(args.cycles), "--start-cycle", str(args.start_cycle),
                   "-error", str(args.error), "-revisit", str(args.revisit),
                   "--eval-batch-size", str(args.eval_batch_size), *MODES[mode]]
        command += ["-en", args.en, "-pd", args.pd] if args.en else []
        command += ["--quiet"] if args.quiet else []
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        if done.returncode:
            raise DQCError(f"benchmark mode {mode} failed (exit {done.returncode})")
        record = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(record)
        print(describe(record, args.cycles), flush=True)
        write_json(out / "bench.json", results, indent=1)
    fast = next((r for r in results if r["mode"] == "fast"), None)
    for r in results:
        if fast is not None and r is not fast:
            same = r["ignored"] == fast["ignored"] and r["eliminated"] == fast["eliminated"]
            print(f"{r['mode']} / fast time ratio: {r['qc_s'] / fast['qc_s']:.2f}x; "
                  f"same decisions and eliminated set: {same}")
    print(f"wrote {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    run_main(main)
