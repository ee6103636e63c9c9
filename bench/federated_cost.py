"""Bytes and latency per update of the federated QC, verification at the centers.

Builds a tiny cohort with N centers (20x24x20 volumes: the model is the paper's, so the bytes
are the paper's; the compute is small), pre-trains cycle 0, then runs one QC cycle in
Flower's Simulation Engine and on loopback (SuperLink + N SuperNodes, TLS, node auth) and
prints one table row per run from NAME_network.json.

    python bench/federated_cost.py --nodes 4,8 --engines simulate,deploy --out fed_bench
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dqc.cli import Parser, run_main
from dqc.io import write_text


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--nodes", default="4,8", help="comma-separated numbers of centers")
    p.add_argument("--engines", default="simulate,deploy", help="simulate, deploy or both")
    p.add_argument("--criterion", default="rates", help="QC criterion (rates: counts only)")
    p.add_argument("--out", default="fed_bench", help="work folder")
    return p.parse_args(argv)


def case(root: Path, centers: int) -> list[str]:
    """A pre-trained tiny cohort of `centers` centers; the QC flags for one cycle."""
    from dqc.cohort import build_cohort
    from dqc.runs import RunSpec, train_cycles

    cohort = build_cohort(root / "cohort", verbose=False, centers=centers, n_train=6 * centers,
                          n_val=3 * centers, n_test=centers, downsample=8, seed=0)
    train_cycles(RunSpec(train_csv=str(cohort["train"]), out=str(root / "pre"), prefix="tm",
                         cycles=range(0, 1), seed=40, verbose=False, echo=lambda line: None))
    return ["-fn_train", str(cohort["train"]), "-fn_test", str(cohort["val"]),
            "-en", str(root / "pre" / "tm_encoder_000.keras"),
            "-pd", str(root / "pre" / "tm_classifier_000.keras"),
            "--start-cycle", "1", "-cycles", "2", "--quiet"]


def main(argv=None) -> None:
    from dqc.federated.__main__ import parse_args as federated_args

    args = parse_args(argv)
    out = Path(args.out)
    rows = ["| engine | nodes | updates | training round trip s | verification s | total s "
            "| bytes per step (out) | bytes per verification (out / back) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in [int(v) for v in args.nodes.split(",")]:
        flags = case(out / f"n{n}", n)
        for engine in args.engines.split(","):
            run_out = out / f"n{n}" / engine
            fed = federated_args([engine, *flags, "--criterion", args.criterion,
                                  "--out", str(run_out)])
            if engine == "simulate":
                from dqc.federated.simulate import simulate
                simulate(fed)
            else:
                from dqc.federated.loopback import deploy
                deploy(fed)
            f = json.loads((run_out / "qc_network.json").read_text())
            rows.append(f"| {engine} | {n} | {f['updates']} | {f['median_update_s']:.2f} | "
                        f"{f['median_verify_s']:.2f} | {f['median_total_s']:.2f} | "
                        f"{f['median_step_bytes'] / 1e6:.1f} MB | "
                        f"{f['median_verify_bytes_sent'] / 1e6:.1f} MB / "
                        f"{f['median_verify_bytes_received']:.0f} B |")
            print("\n".join(rows), flush=True)
    write_text(out / "federated_cost.md", "\n".join(rows) + "\n")
    print(f"medians per update; table in {out / 'federated_cost.md'}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
