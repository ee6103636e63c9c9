"""The paper's scale in simulation: `federated_cost.py` for N centers (default 83, the paper's
count) in Flower's Simulation Engine, one QC cycle verified at the centers, and the peak
resident memory of the run's whole process tree (driver, Ray's daemons and actor), sampled
every second from /proc.

    nice python bench/federated_scale.py --nodes 83 --out fed_scale
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import federated_cost  # noqa: E402  (the bench next to this one)

from dqc.cli import Parser, run_main  # noqa: E402


def _tree_rss_bytes(root: int) -> int:
    """Resident bytes of `root` and every process descending from it (/proc, Linux)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
            parents[pid], rss[pid] = int(fields[1]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier and p not in tree]
        tree.update(frontier)
    return sum(rss.get(p, 0) for p in tree)


def main(argv=None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--nodes", type=int, default=83)
    p.add_argument("--out", default="fed_scale")
    args = p.parse_args(argv)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            peak[0] = max(peak[0], _tree_rss_bytes(os.getpid()))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        federated_cost.main(["--nodes", str(args.nodes), "--engines", "simulate",
                             "--out", args.out])
    finally:
        done.set()
        sampler.join()
    print(f"{args.nodes} centers: {time.perf_counter() - started:.0f} s in all (cohort, "
          f"pre-training, QC cycle); peak resident memory of the process tree "
          f"{peak[0] / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    run_main(main)
