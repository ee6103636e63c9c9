"""How far a cohort seed's clean test AUROC moves with the order of training alone.

    python bench/order_noise.py --out study_out --seeds 16,17,18 --orders 43,44,45,46

A benchmark, not a test. The study's clean-data finding compares one QC run's mean test AUROC
(the demo's last `finding_cycles` cycles) with one no-QC run's, both continued from the
cycle-9 model with the continued runs' seed (`defaults.SEED`: the order of centers and
images, dropout). This repeats scenario C's two runs, no QC and a criterion (the recommended
one by default), with other seeds of the continued runs, in each cohort seed's demo folder
(its cohort and pre-training reused; `make study` or `bench/qc_seeds.py` make them), and
prints each order's AUROC and the difference. The no-QC runs' spread is how far the clean
AUROC moves when only the order changes; the mean difference is QC's cost apart from it.
Writes OUT/order_noise.csv.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dqc import defaults
from dqc.cli import Parser, run_main
from dqc.demo import DemoConfig, Stages
from dqc.errors import DQCError
from dqc.io import write_csv
from dqc.report import auroc, finding_cycles


def order_runs(st: Stages, order: int, criterion: str) -> dict[str, tuple[Path, str]]:
    """Scenario C's no-QC and QC runs continued with seed `order` (the study's own at
    `defaults.SEED`); each trained once, then reused. Name -> (folder, file prefix)."""
    from dqc import checkpoint  # Keras: after parsing (`dqc.cli.run_main`)
    from dqc.runs import run_quality_control, train_cycles

    if order == defaults.SEED:
        return {"clean": (st.run_dir("clean"), "tm"),
                f"qc_C_{criterion}": (st.qc_dir("C", criterion), "qc")}
    base, last = st.out / f"order_{order}", st.config.cycles - 1
    runs = {f"order_{order}_clean": (base / "clean", "tm"),
            f"order_{order}_qc_C_{criterion}": (base / f"qc_C_{criterion}", "qc")}
    (clean, _), (qc, _) = runs.values()
    train = st.cohort / "train.csv"
    if checkpoint.last_complete_cycle(clean, "tm") != last:
        st._timed(train_cycles, st._spec(**{**st._continued(train, clean, "tm"), "seed": order}))
    if not (qc / "qc_summary.json").is_file():
        st._timed(run_quality_control,
                  st._spec(**{**st._continued(train, qc, "qc"), "seed": order}),
                  st.qc_spec(criterion))
    return runs


def run_seed(seed: int, out: Path, orders: list[int], criterion: str) -> list[dict]:
    """One row per order of one cohort seed: the no-QC and QC runs' mean test AUROC."""
    from dqc import checkpoint  # Keras: after parsing (`dqc.cli.run_main`)

    c = DemoConfig(out=out / f"seed_{seed}", seed=seed, criteria=(criterion,), verbose=False)
    st, cycles = Stages(c), finding_cycles(c)
    if checkpoint.last_complete_cycle(st.run_dir("clean"), "tm") != c.cycles - 1:
        raise DQCError(f"{st.run_dir('clean')}: no finished clean run; run the seed's demo "
                       "first (make study, or bench/qc_seeds.py)")
    rows = []
    for order in orders:
        runs = order_runs(st, order, criterion)
        for name, (folder, prefix) in runs.items():
            st.stage(f"inference {name}", (st.out / "inference" / f"{name}_metrics.csv")
                     .is_file(), lambda n=name, f=folder, x=prefix: st.infer(n, f, x, cycles))
        no_qc, qc = runs
        summary = json.loads((runs[qc][0] / "qc_summary.json").read_text())
        a, b = auroc(st.out, no_qc, cycles)[0], auroc(st.out, qc, cycles)[0]
        rows.append({"seed": seed, "order": order, "no QC": round(a, 4),
                     criterion: round(b, 4), "difference": round(b - a, 4),
                     "good eliminated": summary["eliminated"],
                     "good pending": summary["pending"]})
    return rows


def main(argv=None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--out", default="study_out", help="folder: one demo folder per seed")
    p.add_argument("--seeds", default="16,17,18", help="cohort seeds, comma-separated")
    p.add_argument("--orders", default=f"{defaults.SEED},43,44,45,46",
                   help="seeds of the continued runs, comma-separated (the study's own is "
                        f"{defaults.SEED})")
    p.add_argument("--criterion", default=defaults.RECOMMENDED_CRITERION,
                   help="QC criterion, at its defaults")
    args = p.parse_args(argv)
    out, orders = Path(args.out), [int(o) for o in args.orders.split(",")]
    table = pd.DataFrame([row for seed in args.seeds.split(",")
                          for row in run_seed(int(seed), out, orders, args.criterion)])
    write_csv(out / "order_noise.csv", table)
    print(table.to_string(index=False))
    print(table.groupby("seed")[["no QC", args.criterion, "difference"]]
          .agg(["mean", "std", "min", "max"]).round(4).to_string())


if __name__ == "__main__":
    run_main(main)
