"""Simulation engine: one simulated Flower node per center of a cohort CSV, on this machine.

The cohort CSV is split by `Study` into one CSV per node (what each hospital would hold);
the server gets only its validation set and the pre-trained model.
"""

from __future__ import annotations

import argparse
import os
import warnings
from functools import partial
from pathlib import Path

from dqc.checkpoint import atomic_write
from dqc.data import load_table
from dqc.errors import DQCError
from dqc.federated.node import client_app, node_csv
from dqc.federated.server import (check_server_inputs, config_from_args, server_app,
                                  specs_from_config)


def split_by_center(train_csv: str | Path, folder: str | Path) -> list[Path]:
    """NODES/node_<i>.csv for the i-th center in name order, with absolute image paths."""
    table = load_table(train_csv, "train")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, center in enumerate(sorted(set(table.Study))):
        path = folder / f"node_{i}.csv"
        rows = table[table.Study == center]
        atomic_write(path, lambda tmp, rows=rows: rows.to_csv(tmp, index=False))
        paths.append(path)
    return paths


def backend_config(cpus: int | None = None) -> dict:
    """Ray on loopback, one actor using every core: the travelling model is sequential."""
    cpus = cpus or os.cpu_count() or 1
    return {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
            "init_args": {"_node_ip_address": "127.0.0.1", "include_dashboard": False,
                          "num_cpus": cpus}}


def simulate(args: argparse.Namespace) -> dict:
    """Run the federated QC in Flower's Simulation Engine; returns the network figures."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    # flwr turns DeprecationWarnings on for everyone; Keras' own are not the user's business
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"keras(\.|$)")

    config = config_from_args(args)
    check_server_inputs(*specs_from_config(config))  # before Ray starts
    nodes_dir = Path(args.out) / "nodes"
    nodes = split_by_center(args.fn_train, nodes_dir)
    outcome: dict = {}
    run_simulation(server_app=server_app(config, outcome),
                   client_app=client_app(partial(node_csv, nodes_dir=str(nodes_dir))),
                   num_supernodes=len(nodes), backend_config=backend_config())
    if "error" in outcome:
        raise DQCError(outcome["error"])
    if "figures" not in outcome:
        raise DQCError("the simulation ended without a result (see Flower's log above)")
    return outcome["figures"]
