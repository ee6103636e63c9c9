"""Simulation engine: one simulated Flower node per center of a cohort CSV, on this machine.

The cohort CSV is split by `Study` into one CSV per node (what each hospital would hold),
and so is the validation CSV when the centers verify (the default): the server gets only the
pre-trained model (with `--verify-at server`, also the validation set).
"""

from __future__ import annotations

import argparse
import os
import warnings
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from flwr.app import Context
from flwr.clientapp.typing import Mod

if TYPE_CHECKING:
    import pandas as pd

from dqc.io import write_csv
from dqc.data import load_table
from dqc.errors import DQCError
from dqc.federated.node import NodeFiles, client_app, node_csv, node_report_dir
from dqc.federated.server import (check_server_inputs, server_app, server_config,
                                  specs_from_config)


#: One center's rows: (center, training rows, validation rows or None).
CenterRows = tuple[str, "pd.DataFrame", "pd.DataFrame | None"]


def rows_by_center(train_csv: str | Path, val_csv: str | Path | None = None) -> list[CenterRows]:
    """Each center's training rows (by `Study`, in name order) and, with `val_csv`, its
    validation rows; every check, nothing written."""
    table = load_table(train_csv, "train")
    centers = sorted(set(table.Study))
    val = None
    if val_csv is not None:
        val = load_table(val_csv, "validation")
        if "Study" not in val.columns:
            raise DQCError(f"{val_csv}: no Study column: the centers cannot tell their "
                           "validation rows (add it, or use --verify-at server)")
        orphans = sorted(set(val.Study) - set(centers))
        if orphans:
            raise DQCError(f"{val_csv}: validation rows of center {orphans[0]}, which has no "
                           f"training images in {train_csv} (so no node)")
    return [(c, table[table.Study == c],
             val[val.Study == c] if val is not None and (val.Study == c).any() else None)
            for c in centers]


def write_node_csvs(rows: list[CenterRows], folder: str | Path) -> list[tuple[Path, Path | None]]:
    """FOLDER/node_<i>.csv for the i-th center, with absolute image paths, and
    FOLDER/node_<i>_val.csv with its validation rows (None where it has none)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (_, train, val) in enumerate(rows):
        parts = [(folder / f"node_{i}.csv", train)]
        if val is not None:
            parts.append((folder / f"node_{i}_val.csv", val))
        for path, part in parts:
            write_csv(path, part)
        paths.append((parts[0][0], parts[1][0] if len(parts) > 1 else None))
    return paths


def split_by_center(train_csv: str | Path, folder: str | Path,
                    val_csv: str | Path | None = None) -> list[tuple[Path, Path | None]]:
    """`write_node_csvs` of `rows_by_center`: what each hospital would hold."""
    return write_node_csvs(rows_by_center(train_csv, val_csv), folder)


def backend_config(cpus: int | None = None) -> dict:
    """Ray on loopback, one actor using every core: the travelling model is sequential."""
    cpus = cpus or os.cpu_count() or 1
    return {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
            "init_args": {"_node_ip_address": "127.0.0.1", "include_dashboard": False,
                          "num_cpus": cpus}}


def simulate(args: argparse.Namespace,
             node_files: Callable[[Context], NodeFiles] | None = None,
             mods: Sequence[Mod] = (), engine: str = "ray") -> dict:
    """Run the federated QC in Flower's Simulation Engine; returns the network figures.

    `node_files` tells each simulated node its CSVs (default: the split of -fn_train and
    -fn_test in OUT/nodes, by partition id); each node writes its own report page there
    (NAME_report_CENTER.html); `mods`: Flower mods around every node's handlers; `engine`
    "inprocess": no Ray, every node called in this process (`dqc.federated.inprocess`)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    # flwr turns DeprecationWarnings on for everyone; Keras' own are not the user's business
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"keras(\.|$)")

    rows = rows_by_center(args.fn_train, args.fn_test if args.verify_at == "centers" else None)
    # a simulated study's ground truth is its own: the nodes are asked for it
    config = {**server_config(args), "min-nodes": len(rows), "ask-truth": True}
    check_server_inputs(*specs_from_config(config), args.verify_at)  # before Ray starts
    nodes_dir = Path(args.out) / "nodes"
    nodes = write_node_csvs(rows, nodes_dir)
    outcome: dict = {}
    server = server_app(config, outcome)
    nodes_app = client_app(node_files or partial(node_csv, nodes_dir=str(nodes_dir)), mods,
                           report_for=partial(node_report_dir, nodes_dir=str(nodes_dir)))
    if engine == "inprocess":
        from dqc.federated.inprocess import run_in_process

        run_in_process(server, nodes_app, len(nodes))
    else:
        run_simulation(server_app=server, client_app=nodes_app, num_supernodes=len(nodes),
                       backend_config=backend_config())
    if "error" in outcome:
        raise DQCError(outcome["error"])
    if "figures" not in outcome:
        raise DQCError("the simulation ended without a result (see Flower's log above)")
    return outcome["figures"]
