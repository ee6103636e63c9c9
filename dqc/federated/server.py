"""The server's side: the roster of center nodes, the remote training step, the ServerApp.

The server runs `dqc.runs.run_quality_control`, the single-machine loop and policy, with two
things swapped in: the training table comes from the nodes' "who are you" answers (ids and
centers, no image paths) and a training step is a round trip to the center's node. Undoing
an update is not adopting it: the server restores its own snapshot, as on one machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from dqc.errors import DQCError
from dqc.federated.messages import (MISSING, STEP, WHOAMI, Identity, StateMissing, digest,
                                    pack, read_identity, read_step_reply, roster_table,
                                    step_request, unpack)

#: Run-config keys of the ServerApp beyond the QC flags (see federated/pyproject.toml).
NETWORK_DEFAULTS = {"min-nodes": 1, "wait-nodes-s": 120.0, "step-timeout-s": 600.0,
                    "poll-s": 0.005}


def config_from_args(args: argparse.Namespace) -> dict:
    """Run config (Flower style keys) from `dqc.cli.add_qc_flags` values; no training CSV."""
    skip = {"fn_train", "cache_mb", "no_cache", "mixed_precision", "command", "work", "port"}
    return {k.replace("_", "-"): v for k, v in vars(args).items()
            if k not in skip and v is not None}


def specs_from_config(config: dict):
    """(`RunSpec`, `QCSpec`) for the server from a run config: the QC script's flags with
    their defaults, overridden by the config's keys (float32, images cached)."""
    from dqc.cli import Parser, add_qc_flags, qc_specs

    values = {k.replace("-", "_"): v for k, v in config.items()}
    missing = [k for k in ("fn_test", "en", "pd", "cycles") if not values.get(k)]
    if missing:
        raise DQCError("run config lacks " + ", ".join(k.replace("_", "-") for k in missing))
    parser = Parser()
    add_qc_flags(parser)
    args = parser.parse_args(["-fn_train", "", "-fn_test", "", "-cycles", "0", "-en", "",
                              "-pd", ""])
    vars(args).update({k: v for k, v in values.items() if k in vars(args) and k != "fn_train"})
    args.cycles, args.start_cycle = int(args.cycles), int(args.start_cycle)
    return qc_specs(args)


def check_server_inputs(spec, qspec) -> None:
    """Fail before any node is contacted when the server's own files are unusable."""
    from dqc.data import load_table, require_both_classes

    require_both_classes(load_table(qspec.val_csv, "validation"), qspec.val_csv)
    for path, what in ((spec.encoder, "encoder"), (spec.classifier, "classifier")):
        if not Path(path).is_file():
            raise DQCError(f"{path}: {what} model file not found")


def exchange(grid: Grid, messages: Sequence[Message], timeout: float,
             poll: float) -> list[Message]:
    """Push messages and pull every reply, polling every `poll` s (the stock
    `send_and_receive` sleeps 3 s between checks). A node's error becomes a DQCError."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            if reply.has_error():
                kind = StateMissing if reply.error.code == MISSING else DQCError
                raise kind(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            replies.append(reply)
        if pending and time.monotonic() > deadline:
            raise DQCError(f"{len(pending)} node(s) did not answer within {timeout:.0f} s")
        if pending:
            time.sleep(poll)
    return replies


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(ids := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise DQCError(f"{len(ids)} of {minimum} center nodes connected within {timeout:.0f} s")
        time.sleep(0.5)
    return ids


def roster(grid: Grid, node_ids: Sequence[int], timeout: float,
           poll: float) -> tuple[pd.DataFrame, dict[str, int], list[Identity]]:
    """Ask every node who it is: the training table, center -> node id, the identities."""
    asks = [Message(RecordDict(), node, WHOAMI) for node in node_ids]
    replies = exchange(grid, asks, timeout, poll)
    identities = [read_identity(r.content) for r in replies]
    table = roster_table(identities)
    nodes = {i.center: r.metadata.src_node_id for i, r in zip(identities, replies)}
    return table, nodes, identities


class RemoteStep:
    """`travel.Step` over the network: send the state and ids, adopt the returned state.

    A node keeps the last state it was sent and the one it sent back; when the server's
    state is one of those (the next batch at the same center, a retry after an undo) only
    its digest travels. A node that lost it answers so, and gets the whole state.
    """

    def __init__(self, grid: Grid, nodes: dict[str, int], trainer, timeout: float,
                 poll: float):
        self.grid, self.nodes, self.trainer = grid, nodes, trainer
        self.timeout, self.poll = timeout, poll
        self.held: dict[str, set[str]] = {}  # center -> digests of the states its node holds
        self.seconds: list[float] = []  # per update: serialise, round trip, adopt
        self.states_sent = 0

    def _send(self, center: str, state: np.ndarray | None, key: str, ids: list[str]):
        msg = Message(step_request(state, key, ids), self.nodes[center], STEP, group_id=center)
        self.states_sent += state is not None
        return read_step_reply(exchange(self.grid, [msg], self.timeout, self.poll)[0].content)

    def __call__(self, center: str, ids: list[str]) -> tuple[float, float]:
        start = time.perf_counter()
        state = pack(self.trainer.state_arrays())
        key = digest(state)
        try:
            held = key in self.held.get(center, set())
            out, out_key, loss, acc = self._send(center, None if held else state, key, ids)
        except StateMissing:
            out, out_key, loss, acc = self._send(center, state, key, ids)
        self.trainer.load_state_arrays(unpack(out, self.trainer.state_spec()))
        self.held[center] = {key, out_key}
        self.seconds.append(time.perf_counter() - start)
        return loss, acc


def _check_shapes(identities: Sequence[Identity], trainer) -> None:
    from dqc.model import Architecture, architecture, input_shape

    arch = architecture(trainer.encoder)
    if arch != Architecture():  # the nodes build the paper's model and take its state
        raise DQCError(f"the federated run takes the paper's model (width 1, raw intensities); "
                       f"this one has width {arch.width:g}, intensity {arch.intensity}")
    want = tuple(input_shape(trainer.encoder))
    for ident in identities:
        if tuple(ident.shape) != want:
            raise DQCError(f"center {ident.center}: images are {ident.shape}, the model takes {want}")


def serve(grid: Grid, config: dict) -> dict:
    """Run quality control with the nodes of `grid`; returns the network figures."""
    from dqc.checkpoint import write_text
    from dqc.runs import run_quality_control

    config = {**NETWORK_DEFAULTS, **config}
    spec, qspec = specs_from_config(config)
    check_server_inputs(spec, qspec)
    poll, timeout = float(config["poll-s"]), float(config["step-timeout-s"])
    node_ids = wait_for_nodes(grid, int(config["min-nodes"]), float(config["wait-nodes-s"]))
    table, nodes, identities = roster(grid, node_ids, timeout, poll)
    spec.echo(f"{len(nodes)} center nodes: " + ", ".join(
        f"{i.center} ({len(i.subjects)} images, {i.n_pd} PD)" for i in
        sorted(identities, key=lambda i: i.center)))
    steps: list[RemoteStep] = []

    def make_step(trainer) -> RemoteStep:
        _check_shapes(identities, trainer)
        steps.append(RemoteStep(grid, nodes, trainer, timeout, poll))
        return steps[-1]

    run_quality_control(spec, qspec, train=table, make_step=make_step)
    seconds = steps[0].seconds
    figures = {"updates": len(seconds), "states_sent": steps[0].states_sent,
               "median_update_s": statistics.median(seconds) if seconds else None,
               "mean_update_s": float(np.mean(seconds)) if seconds else None,
               "max_update_s": max(seconds) if seconds else None}
    write_text(Path(spec.out) / f"{qspec.name}_network.json", json.dumps(figures, indent=2))
    spec.echo(f"{figures['updates']} remote updates, median {figures['median_update_s'] or 0:.3f} s"
              f" per update (state, ids, round trip, adopt)")
    return figures


def server_app(config: dict | None = None, outcome: dict | None = None) -> ServerApp:
    """The ServerApp. `config` (simulation) overrides the run config; `outcome` receives
    the error or the figures, for a caller in the same process."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        sink = outcome if outcome is not None else {}
        try:
            sink["figures"] = serve(grid, {**dict(context.run_config), **(config or {})})
        except DQCError as exc:
            sink["error"] = str(exc)
            if outcome is None:  # deployed: say it in the run's log, fail the run
                print(f"error: {exc}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None

    return app
