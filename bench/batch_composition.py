"""A batch's own training loss against the labels it holds: good batches and inverted ones.

    python bench/batch_composition.py --out study_out --seed 17

A benchmark, not a test. From a cohort seed's demo folder (`make study` or `bench/qc_seeds.py`
make it) it loads the clean run's model after `--cycle` (the model the QC runs start from),
and for every center of scenario A with ten images or more, good (scenario C) and inverted
(scenario A's harmful centers), draws `--n` batches of the demo's batch size for each number
of PD images in it, takes one training step on each at the next cycle's learning rate, and
undoes it. The step's loss is what the batch-loss criteria judge (`trainloss` and those
built on it): in training mode BatchNorm takes the batch's mean out, so the loss depends on
the labels the batch holds. Prints the median per kind and number of PD images, per center
too, and writes OUT/seed_N/batch_composition.csv.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dqc import defaults
from dqc.cli import Parser, check_positive, run_main
from dqc.demo import DemoConfig, Stages
from dqc.errors import DQCError
from dqc.io import write_csv

#: Centers smaller than this give too few batches of each mix.
MIN_CENTER = 10


def draw(rng: np.random.Generator, hc: list[str], pd_: list[str], size: int, n_pd: int
         ) -> list[str]:
    """`size` images of a center, `n_pd` of them PD, at random within each label."""
    return [*rng.choice(hc, size - n_pd, replace=False), *rng.choice(pd_, n_pd, replace=False)]


def measure(trainer, table: pd.DataFrame, kind: str, size: int, n: int,
            rng: np.random.Generator) -> list[dict]:
    """One row per batch drawn from `table`'s centers: its kind, center, PD count and loss."""
    from dqc.model import input_shape
    from dqc.volumes import VolumeStore

    store = VolumeStore(table, input_shape(trainer.encoder), verbose=False)
    rows = []
    for study, center in table.groupby("Study", sort=True):
        if len(center) < MIN_CENTER:
            continue
        hc = list(center[center.Group_bin == 0].Subject)
        pd_ = list(center[center.Group_bin == 1].Subject)
        for n_pd in range(size + 1):
            if n_pd > len(pd_) or size - n_pd > len(hc):
                continue
            for _ in range(n):
                ids = draw(rng, hc, pd_, size, n_pd)
                saved = trainer.snapshot()
                loss, _ = trainer.train_step(store.batch(ids), store.y(ids))
                trainer.restore(saved)
                rows.append({"kind": kind, "center": study, "n_pd": n_pd, "loss": loss})
    return rows


def main(argv=None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--out", default="study_out", help="folder: one demo folder per seed")
    p.add_argument("--seed", type=int, default=17, help="cohort seed (its demo folder is reused)")
    p.add_argument("--cycle", type=int, default=defaults.START_CYCLE - 1,
                   help="the clean run's model after this cycle (default: the one the QC "
                        "runs start from)")
    p.add_argument("--n", type=int, default=8, help="batches drawn per center and mix")
    args = p.parse_args(argv)
    check_positive("--n", args.n)
    check_positive("--cycle", args.cycle, 0)
    from dqc.checkpoint import cycle_paths, load_trainer
    from dqc.data import load_table
    from dqc.trainer import learning_rate

    st = Stages(DemoConfig(out=Path(args.out) / f"seed_{args.seed}", seed=args.seed))
    clean, prefix = st.runs()["clean"]
    files = cycle_paths(clean, prefix, args.cycle)
    scenarios = {s: st.scenario_csv(s) for s in ("A", "C")}
    for path in (files["encoder"], files["classifier"], *scenarios.values()):
        if not Path(path).is_file():
            raise DQCError(f"{path} not found: run the seed's demo first (make study, or "
                           "bench/qc_seeds.py --scenarios A,C)")
    trainer, _ = load_trainer(files["encoder"], files["classifier"])
    trainer.set_learning_rate(learning_rate(args.cycle + 1))
    a, c = (load_table(scenarios[s], "train") for s in ("A", "C"))
    rng = np.random.default_rng(0)
    size = defaults.BATCH_SIZE
    rows = measure(trainer, a[a.Harmful == 1], "inverted", size, args.n, rng) + \
        measure(trainer, c[c.Study.isin(set(a[a.Harmful == 1].Study))], "good", size, args.n, rng)
    table = pd.DataFrame(rows)
    write_csv(st.out / "batch_composition.csv", table)
    print(f"seed {args.seed}, the clean run's model after cycle {args.cycle}: the median "
          f"training loss of a batch of {size} by the number of PD images in it")
    print(table.groupby(["kind", "n_pd"]).loss.median().unstack().round(3).to_string())
    print(table.groupby(["kind", "center", "n_pd"]).loss.median().unstack().round(3).to_string())


if __name__ == "__main__":
    run_main(main)
