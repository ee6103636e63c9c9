"""The server's side: the roster of center nodes, the remote training step, the
verification at the centers, the ServerApp.

The server runs `dqc.runs.run_quality_control`, the single-machine loop and policy, with
three things swapped in: the training table comes from the nodes' "who are you" answers (ids
and centers, no image paths), a training step is a round trip to the center's node, and the
check of an update is a round to every node that holds validation images, whose tallies
the server adds up (with `--verify-at server` it evaluates a validation set it holds).
Undoing an update is not adopting it: the server restores its own snapshot, as on one machine.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import pandas as pd
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from dqc.errors import DQCError
from dqc.federated.messages import (MISSING, REPORT, STEP, VERIFY, WHOAMI, Identity,
                                    StateMissing, digest, pack, payload_bytes, report_request,
                                    roster_table, step_request, unpack, verify_request,
                                    whoami_request)
from dqc.federated.replies import ReplyFault, adam_step_bound, read_hello, read_step, read_tally
from dqc.federated.runconfig import (NETWORK_DEFAULTS, VERIFY_AT, config_from_args,
                                     read_config, server_config, specs_from_config)
from dqc.qc import Evaluation, combine

T = TypeVar("T")

__all__ = ["NETWORK_DEFAULTS", "VERIFY_AT", "config_from_args", "server_config",
           "specs_from_config", "serve", "server_app", "check_server_inputs", "FaultyNode"]


class FaultyNode(DQCError):
    """A node's reply failed the check (`dqc.federated.replies`): one line naming its
    center and the fault; `center` is None when the node never said which it is."""

    def __init__(self, who: str, center: str | None, fault: ReplyFault):
        self.center = center
        super().__init__(f"{who} is faulty: {fault}; nothing of it was adopted. Mend it and "
                         "rerun with --resume, or leave it out with --on-faulty-node exclude")

def check_server_inputs(spec, qspec, verify_at: str = "centers") -> None:
    """Fail before any node is contacted when the server's own files are unusable. With
    verification at the centers the server holds no validation CSV; at the server it must."""
    from dqc.data import load_table, require_both_classes

    if verify_at not in VERIFY_AT:
        raise DQCError(f"--verify-at must be one of {', '.join(VERIFY_AT)}, got {verify_at!r}")
    if qspec.rule().mixes_witnesses():
        raise DQCError(f"--criterion {qspec.criterion} draws a revisit's witnesses by label, "
                       "and a federation keeps the training labels at its centers; use anchored")
    if verify_at == "server":
        require_both_classes(load_table(qspec.val_csv, "validation"), qspec.val_csv)
    for path, what in ((spec.encoder, "encoder"), (spec.classifier, "classifier")):
        if not Path(path).is_file():
            raise DQCError(f"{path}: {what} model file not found")


@dataclass
class Fleet:
    """The center nodes of a run and how to talk to them; what each holds; what it cost."""

    grid: Grid
    nodes: dict[str, int]           # center -> node id
    timeout: float
    poll: float
    held: dict[str, set[str]] = field(default_factory=dict)  # center -> full states it holds
    verified: str | None = None  # the model every verifying node holds: the last verified
    produced: dict[str, str] = field(default_factory=dict)  # center -> last model it trained
    costs: list[dict] = field(default_factory=list)  # one record per step and verification

    def exchange(self, messages: Sequence[Message]) -> list[Message]:
        """Push messages and pull every reply, polling every `poll` s (the stock
        `send_and_receive` sleeps 3 s between checks). A node's error, or silence past the
        timeout, becomes a DQCError that names its center; never a partial answer."""
        names = {node: center for center, node in self.nodes.items()}
        pending = dict(zip(self.grid.push_messages(messages), (m.metadata.dst_node_id
                                                                for m in messages)))
        replies: list[Message] = []
        deadline = time.monotonic() + self.timeout
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                pending.pop(reply.metadata.reply_to_message_id, None)
                if reply.has_error():
                    kind = StateMissing if reply.error.code == MISSING else DQCError
                    raise kind(f"{self._name(reply.metadata.src_node_id, names)}: "
                               f"{reply.error.reason}")
                replies.append(reply)
            if pending and time.monotonic() > deadline:
                silent = sorted(self._name(n, names) for n in pending.values())
                raise DQCError(f"{silent[0]} did not answer within {self.timeout:g} s"
                               + (f" (nor {', '.join(silent[1:])})" if len(silent) > 1 else "")
                               + "; rerun with --resume to continue after the last complete cycle")
            if pending:
                time.sleep(self.poll)
        return replies

    def checked(self, reply: Message, read: Callable[[RecordDict], T]) -> T:
        """`read(reply.content)` (a `dqc.federated.replies` reader); a fault names the center."""
        try:
            return read(reply.content)
        except ReplyFault as fault:
            node = reply.metadata.src_node_id
            center = next((c for c, n in self.nodes.items() if n == node and c != str(node)), None)
            said = center or _claimed_center(reply.content)  # a faulty hello: what it says
            raise FaultyNode(self._name(node, {node: said} if said else {}), center,
                             fault) from None

    @staticmethod
    def _name(node: int, names: dict[int, str]) -> str:
        center = names.get(node)
        return f"center {center} (node {node})" if center and center != str(node) else f"node {node}"

    def record(self, kind: str, start: float, sent: Sequence[Message],
               received: Sequence[Message]) -> None:
        self.costs.append({"kind": kind, "seconds": time.perf_counter() - start,
                           "bytes_sent": sum(payload_bytes(m.content) for m in sent),
                           "bytes_received": sum(payload_bytes(m.content) for m in received)})


def _claimed_center(content: RecordDict) -> str | None:
    """The center a (faulty) hello names, if it names one: only to say who sent it."""
    try:
        center = content["identity"]["center"]
    except (KeyError, TypeError):
        return None
    return center if isinstance(center, str) and center.strip() else None


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """The ids of the connected nodes once `minimum` are; past `timeout` s, one line saying
    who connected and how many are missing (the server cannot name a node it never met)."""
    deadline = time.monotonic() + timeout
    while len(ids := sorted(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise DQCError(f"{minimum - len(ids)} of {minimum} center nodes missing after "
                           f"{timeout:g} s (connected: "
                           + (", ".join(f"node {i}" for i in ids) or "none")
                           + "); start them, or lower min-nodes")
        time.sleep(0.5)
    return ids


def roster(grid: Grid, node_ids: Sequence[int], timeout: float, poll: float,
           truth: bool = False) -> tuple[pd.DataFrame, Fleet, list[Identity]]:
    """Ask every node who it is (and, with `truth`, its images' ground truth): the training
    table, the fleet, the identities."""
    fleet = Fleet(grid, {str(n): n for n in node_ids}, timeout, poll)
    replies = fleet.exchange([Message(whoami_request(truth), node, WHOAMI) for node in node_ids])
    identities = [fleet.checked(r, read_hello) for r in replies]
    table = roster_table(identities)
    fleet.nodes = {i.center: r.metadata.src_node_id for i, r in zip(identities, replies)}
    return table, fleet, identities


class RemoteStep:
    """`travel.Step` over the network: send the state and ids, adopt the returned state.

    A node keeps the last state it was sent and the one it sent back; when the server's
    state is one of those (the next batch at the same center, a retry after an undo) only
    its digest travels. A node that lost it answers so, and gets the whole state.
    """

    def __init__(self, fleet: Fleet, trainer):
        self.fleet, self.trainer = fleet, trainer
        self.states_sent = 0
        trainable = {id(v) for v in trainer.model.trainable_variables}
        self.bounded = [id(v) in trainable for v in trainer.state_variables]

    def _send(self, center: str, state: np.ndarray | None, key: str, ids: list[str]):
        msg = Message(step_request(state, key, ids), self.fleet.nodes[center], STEP,
                      group_id=center)
        self.states_sent += state is not None
        reply = self.fleet.exchange([msg])
        return msg, reply

    def __call__(self, center: str, ids: list[str]) -> tuple[float, float]:
        start = time.perf_counter()
        state = pack(self.trainer.state_arrays())
        key = digest(state)
        try:
            held = key in self.fleet.held.get(center, set())
            msg, reply = self._send(center, None if held else state, key, ids)
        except StateMissing:
            msg, reply = self._send(center, state, key, ids)
        from keras import ops

        optimizer = self.trainer.optimizer
        lr = float(ops.convert_to_numpy(optimizer.learning_rate))
        sent = unpack(state, self.trainer.state_spec())
        arrays, out_key, loss, acc, model_key = self.fleet.checked(reply[0], partial(
            read_step, sent=sent, spec=self.trainer.state_spec(), bounded=self.bounded,
            max_step=adam_step_bound(lr, optimizer.beta_1, optimizer.beta_2),
            n_model=len(self.trainer.model.variables)))
        self.trainer.load_state_arrays(arrays)
        self.fleet.held[center] = {key, out_key}
        self.fleet.produced[center] = model_key
        self.fleet.record("step", start, [msg], reply)
        return loss, acc


class RemoteVerify:
    """The check of an update at the centers: every node that holds validation images
    scores them with the server's model and answers with its tally; the server adds the
    tallies up (`dqc.qc.combine`) in center order. The model travels only to nodes that do
    not hold it (the node that just trained it, or one that verified it already, gets its
    digest)."""

    def __init__(self, fleet: Fleet, trainer, declared: dict[str, tuple[int, int]], detail: str,
                 legacy_rates: bool):
        self.fleet, self.trainer = fleet, trainer
        self.centers, self.detail, self.legacy_rates = sorted(declared), detail, legacy_rates
        self.declared = declared  # center -> its validation images (HC, PD), from its hello

    def _round(self, model: np.ndarray, key: str, force: bool) -> tuple[list, list]:
        fleet = self.fleet

        def holds(center: str) -> bool:
            return not force and key in (fleet.verified, fleet.produced.get(center))
        sent = [Message(verify_request(None if holds(c) else model, key, self.detail),
                        fleet.nodes[c], VERIFY, group_id=c) for c in self.centers]
        return sent, fleet.exchange(sent)

    def __call__(self, update_ids: Sequence[str]) -> Evaluation:
        start = time.perf_counter()
        model = pack(self.trainer.model_arrays())
        key = digest(model)
        try:
            sent, replies = self._round(model, key, force=False)
        except StateMissing:  # a node lost what the server thought it held: send to all
            sent, replies = self._round(model, key, force=True)
        names = {n: c for c, n in self.fleet.nodes.items()}
        by_node = {r.metadata.src_node_id: self.fleet.checked(r, partial(
            read_tally, declared=self.declared[names[r.metadata.src_node_id]],
            detail=self.detail)) for r in replies}
        self.fleet.verified = key
        self.fleet.record("verify", start, sent, replies)
        return combine([by_node[self.fleet.nodes[c]] for c in self.centers], self.legacy_rates)


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


def centers_validation(identities: Sequence[Identity]):
    """What the server knows of the validation set held at the centers: sizes by class."""
    from dqc.runs import Validation

    holders = [i for i in identities if i.val_hc + i.val_pd]
    if not holders:
        raise DQCError("no center node holds validation images: give each node its validation "
                       "CSV (deploy: -fn_test rows by Study) or use --verify-at server")
    where = "the centers' validation images (" + ", ".join(
        f"{i.center} {i.val_hc} HC/{i.val_pd} PD" for i in holders) + ")"
    also = tuple(sorted(s for i in holders for s in i.val_also_training))
    return Validation(sum(i.val_hc for i in holders), sum(i.val_pd for i in holders), where,
                      also), {i.center: (i.val_hc, i.val_pd) for i in holders}


def network_figures(fleet: Fleet, states_sent: int) -> dict:
    """Per update: the training round trip, the verification round that follows it, total."""
    steps = [c for c in fleet.costs if c["kind"] == "step"]
    checks = [c for c in fleet.costs if c["kind"] == "verify"]

    def median(records: list[dict], key: str):
        return statistics.median(r[key] for r in records) if records else None

    seconds = [c["seconds"] for c in steps]
    return {"updates": len(steps), "states_sent": states_sent, "verifications": len(checks),
            "median_update_s": median(steps, "seconds"),
            "mean_update_s": float(np.mean(seconds)) if seconds else None,
            "max_update_s": max(seconds) if seconds else None,
            "median_step_bytes": median(steps, "bytes_sent"),
            "median_verify_s": median(checks, "seconds"),
            "median_verify_bytes_sent": median(checks, "bytes_sent"),
            "median_verify_bytes_received": median(checks, "bytes_received"),
            "median_total_s": (median(steps, "seconds") or 0) + (median(checks, "seconds") or 0),
            "verifications_detail": [{k: c[k] for k in ("seconds", "bytes_sent", "bytes_received")}
                                     for c in checks]}


def tell_centers(fleet: Fleet, train: pd.DataFrame, spec, qspec):
    """The `on_cycle` hook that sends each center the decisions about its own images (for
    its node's page: `dqc.qc_page.center_payload`), never another center's, never a pixel."""
    from dqc.qc_page import center_payload, settings

    shown, planned = settings(spec, qspec), (spec.cycles.start, spec.cycles.stop - 1)

    def tell(policy, cycle: int) -> None:
        fleet.exchange([Message(report_request(center_payload(policy, train, center, cycle,
                                                              shown, planned, qspec.name)),
                                node, REPORT, group_id=center)
                        for center, node in sorted(fleet.nodes.items())])
    return tell


def serve(grid: Grid, config: dict) -> dict:
    """Run quality control with the nodes of `grid`; returns the network figures."""
    from dqc.io import write_text

    values = read_config(config)
    verify_at = values["verify-at"]
    spec, qspec = specs_from_config(config)
    check_server_inputs(spec, qspec, verify_at)
    if values["no-own-word"]:
        check_no_own_word(qspec, spec.batch_size)
    timeout, wait = values["node-timeout-s"], values["wait-nodes-s"]
    node_ids = wait_for_nodes(grid, values["min-nodes"], wait)
    # a node loads its images and builds its model when first asked who it is: that answer
    # may take as long as a node may take to connect
    _, fleet, identities = roster(grid, node_ids, max(timeout, wait), values["poll-s"],
                                  truth=values["ask-truth"])
    fleet.timeout = timeout
    spec.echo(f"{len(fleet.nodes)} center nodes: " + ", ".join(
        f"{i.center} ({len(i.subjects)} images, {i.n_pd} PD"
        + (f"; validation {i.val_hc + i.val_pd}" if i.val_hc + i.val_pd else "") + ")"
        for i in sorted(identities, key=lambda i: i.center)))
    steps: list[RemoteStep] = []
    excluded: dict[str, dict] = {}
    while True:
        try:
            _run(spec, qspec, fleet, identities, verify_at, steps, bool(excluded),
                 values["no-own-word"])
            break
        except FaultyNode as fault:
            if values["on-faulty-node"] == "stop" or fault.center is None:
                raise
            identities = [i for i in identities if i.center != fault.center]
            excluded[fault.center] = _exclude(spec, fleet, fault)
    figures = {"verify_at": verify_at, **network_figures(fleet, sum(s.states_sent for s in steps)),
               "excluded_centers": excluded}
    write_text(Path(spec.out) / f"{qspec.name}_network.json", json.dumps(figures, indent=2))
    if excluded:
        _note_exclusions(Path(spec.out) / f"{qspec.name}_summary.json", excluded)
    spec.echo(f"{figures['updates']} remote updates, median {figures['median_update_s'] or 0:.3f} s"
              f" per training round trip"
              + (f", {figures['median_verify_s']:.3f} s per verification at the centers"
                 if figures["verifications"] else ""))
    return figures


def check_no_own_word(qspec, batch_size: int) -> None:
    """With no-own-word, every update, a batch or one image, is judged on validation images
    (at the centers, all of them together, or at the server), never on the loss its own
    center reports for it (docs/threat-model.md).

    Parameters
    ----------
    qspec: the run's `QCSpec` (its criterion); batch_size: images per regular update.
    """
    rule = qspec.rule()
    if not (rule.needs_evaluation(batch_size) and rule.needs_evaluation(1)):
        raise DQCError(f"no-own-word: criterion {qspec.criterion} accepts a batch on its own "
                       "center's training loss; use rates, loss, mcnemar or heldout")


def _run(spec, qspec, fleet: Fleet, identities: Sequence[Identity], verify_at: str,
         steps: list[RemoteStep], left_out: bool, no_own_word: bool) -> None:
    """One `run_quality_control` with these centers (resumed after an exclusion)."""
    from dqc.runs import Federation, run_quality_control

    def make_step(trainer) -> RemoteStep:
        _check_shapes(identities, trainer)
        steps.append(RemoteStep(fleet, trainer))
        return steps[-1]

    verify = None
    if verify_at == "centers":
        validation, declared = centers_validation(identities)
        if no_own_word and len(declared) < 2:
            raise DQCError(f"no-own-word: only {', '.join(declared)} holds validation images, "
                           "so its tallies alone would judge its own updates; give a second "
                           "center validation images, or use --verify-at server")
        verify = (validation, lambda trainer: RemoteVerify(
            fleet, trainer, declared, qspec.rule().evaluation_detail(), qspec.legacy_rates))
    table = roster_table(identities)
    news = tell_centers(fleet, table, spec, qspec) if qspec.report else None
    run_quality_control(spec, qspec, federation=Federation(table, make_step, verify, left_out,
                                                           on_cycle=news))


def _exclude(spec, fleet: Fleet, fault: FaultyNode) -> dict:
    """Leave a faulty center out: the run goes on from its last complete cycle without it."""
    from dqc.checkpoint import last_complete_cycle

    last = last_complete_cycle(spec.out, spec.prefix)
    start = spec.cycles.start if last is None else last + 1
    fleet.nodes.pop(fault.center)
    spec.resume = True
    spec.echo(f"warning: {fault}: center {fault.center} excluded, its images left out from "
              f"cycle {start} on")
    return {"from_cycle": start, "fault": str(fault)}


def _note_exclusions(path: Path, excluded: dict[str, dict]) -> None:
    """The summary names the centers left out, and why."""
    from dqc.io import write_json

    summary = json.loads(path.read_text())
    summary["excluded_centers"] = excluded
    write_json(path, summary)


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
                # stdout: what `flwr run --stream` relays; an Exception, not SystemExit, so
                # that Flower marks the run failed and uploads its log (SystemExit skips both)
                print(f"error: {exc}", flush=True)
                raise RuntimeError(f"error: {exc}") from None

    return app
