"""How far a cohort seed's QC figures move with the order of training alone.

    python bench/order_noise.py --out study_out --seeds 16,17,18 --orders 43,44,45,46
    python bench/order_noise.py --out study_out --scenario A

A benchmark, not a test. The study's findings compare one QC run with one no-QC run (mean
test AUROC over the demo's last `finding_cycles` cycles; the images eliminated), both
continued from the cycle-9 model with the continued runs' seed (`defaults.SEED`: the order
of centers and images, dropout). This repeats a scenario's two runs (C by default), no QC
and a criterion (the recommended one by default), with other seeds of the continued runs,
in each cohort seed's demo folder (its cohort, pre-training and QC run reused: `make study`
or `bench/qc_seeds.py` make them), and prints each order's AUROC, the difference, and the
images the QC run eliminated and left pending. The no-QC runs' spread is how far the AUROC
moves when only the order changes. Writes OUT/order_noise_SCENARIO_CRITERION.csv.
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
from dqc.study import UNTUNED_SEEDS


def order_runs(st: Stages, scenario: str, order: int, criterion: str
               ) -> dict[str, tuple[Path, str]]:
    """The scenario's no-QC and QC runs continued with seed `order` (the study's own at
    `defaults.SEED`); each trained once, then reused. Name -> (folder, file prefix)."""
    from dqc import checkpoint  # Keras: after parsing (`dqc.cli.run_main`)
    from dqc.runs import run_quality_control, train_cycles

    known = st.runs()
    own = {name: known[name] for name in (st.no_qc_run(scenario), f"qc_{scenario}_{criterion}")}
    if order == defaults.SEED:
        return own
    base, last = st.out / f"order_{order}", st.config.cycles - 1
    runs = {f"order_{order}_{name}": (base / folder.name, prefix)
            for name, (folder, prefix) in own.items()}
    (plain, prefix), (qc, _) = runs.values()
    train = st.scenario_csv(scenario)
    if checkpoint.last_complete_cycle(plain, prefix) != last:
        st._timed(train_cycles,
                  st._spec(**{**st._continued(train, plain, prefix), "seed": order}))
    if not (qc / "qc_summary.json").is_file():
        st._timed(run_quality_control,
                  st._spec(**{**st._continued(train, qc, "qc"), "seed": order}),
                  st.qc_spec(criterion))
    return runs


def run_seed(seed: int, out: Path, scenario: str, orders: list[int], criterion: str
             ) -> list[dict]:
    """One row per order of one cohort seed: the no-QC and QC runs' mean test AUROC, and
    the images the QC run eliminated and left pending."""
    c = DemoConfig(out=out / f"seed_{seed}", seed=seed, criteria=(criterion,), verbose=False)
    st, cycles = Stages(c), finding_cycles(c)
    if not (st.qc_dir(scenario, criterion) / "qc_summary.json").is_file():
        raise DQCError(f"{st.qc_dir(scenario, criterion)}: no finished QC run; run the seed's "
                       "demo first (make study, or bench/qc_seeds.py)")
    rows = []
    for order in orders:
        runs = order_runs(st, scenario, order, criterion)
        for name, (folder, prefix) in runs.items():
            st.score(name, folder, prefix, cycles)
        no_qc, qc = runs
        found = json.loads((runs[qc][0] / "qc_summary.json").read_text())["detection"]
        a, b = auroc(st.out, no_qc, cycles)[0], auroc(st.out, qc, cycles)[0]
        rows.append({"seed": seed, "order": order, "no QC": round(a, 4),
                     criterion: round(b, 4), "difference": round(b - a, 4),
                     **{f"{kind} {what}": f"{found[f'{kind}_{what}']}/{found[kind]}"
                        for kind in ("harmful", "good") for what in ("eliminated", "pending")
                        if found[kind]}})
    return rows


def main(argv=None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--out", default="study_out", help="folder: one demo folder per seed")
    p.add_argument("--seeds", default=",".join(map(str, UNTUNED_SEEDS)),
                   help="cohort seeds, comma-separated (default: the study's untuned ones)")
    p.add_argument("--scenario", default="C", choices=("A", "B", "C"),
                   help="the demo's scenario (A whole harmful centers, B single harmful "
                        "images, C none)")
    p.add_argument("--orders", default=f"{defaults.SEED},43,44,45,46",
                   help="seeds of the continued runs, comma-separated (the study's own is "
                        f"{defaults.SEED})")
    p.add_argument("--criterion", default=defaults.RECOMMENDED_CRITERION,
                   help="QC criterion, at its defaults")
    args = p.parse_args(argv)
    out, orders = Path(args.out), [int(o) for o in args.orders.split(",")]
    table = pd.DataFrame([row for seed in args.seeds.split(",") for row in run_seed(
        int(seed), out, args.scenario, orders, args.criterion)])
    write_csv(out / f"order_noise_{args.scenario}_{args.criterion}.csv", table)
    print(table.to_string(index=False))
    print(table.groupby("seed")[["no QC", args.criterion, "difference"]]
          .agg(["mean", "std", "min", "max"]).round(4).to_string())


if __name__ == "__main__":
    run_main(main)
