"""A center's side of the federation: its images, and one training step on them.

The node is a stateless trainer: every step starts from the state the server sends, so the
server can undo an update by simply not adopting the reply. The images and their paths stay
here; the node answers only with ids, label counts and model states. It refuses ids it does
not hold.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from dqc.errors import DQCError
from dqc.federated.messages import (MISSING, REFUSED, Identity, StateMissing, digest,
                                    identity_reply, pack, read_step_request, step_reply, unpack)


class CenterNode:
    """One center's training images (from its own CSV) and a trainer over them."""

    def __init__(self, csv_path: str | Path):
        from dqc.data import image_shape, load_table  # not needed by a worker's ClientApp

        self.table = load_table(csv_path, "train")
        centers = sorted(set(self.table.Study))
        if len(centers) != 1:
            raise DQCError(f"{csv_path}: a node holds one center, this CSV has {len(centers)} "
                           f"({', '.join(centers[:5])})")
        self.center = centers[0]
        self.ids = set(self.table.Subject)
        first = self.table.iloc[0]
        self.shape = image_shape(first.Path, first.Subject)
        self._store = None
        self._held: dict[str, np.ndarray] = {}

    def identity(self) -> Identity:
        t = self.table
        harmful = [int(h) for h in t.Harmful] if "Harmful" in t.columns else None
        n_pd = int(t.Group_bin.sum())
        return Identity(self.center, list(t.Subject), n_pd, len(t) - n_pd, self.shape, harmful)

    def _ready(self):
        """The trainer and image store, built on first use and kept while the process lives."""
        if self._store is None:
            from dqc.volumes import VolumeStore

            self._store = VolumeStore(self.table, self.shape, verbose=False)
        return shared_trainer(self.shape), self._store

    def train_step(self, state: np.ndarray | None, key: str,
                   ids: Sequence[str]) -> tuple[np.ndarray, str, float, float]:
        """One optimizer step on `ids` from the server's packed state (or, when `state` is
        None, the held state named `key`); the new packed state and its digest.

        The node keeps its last input and output states: a cache that spares sending the
        state back to the node that produced it (the next batch at the same center) or that
        was just sent it (a retry after an undo). The server stays the authority.
        """
        unknown = [i for i in ids if i not in self.ids]
        if unknown:
            raise DQCError(f"center {self.center} does not hold subject(s) "
                           f"{', '.join(unknown[:5])}: refused")
        if not ids:
            raise DQCError(f"center {self.center}: empty batch refused")
        if state is None:
            state = self._held.get(key)
            if state is None:
                raise StateMissing(f"center {self.center} does not hold state {key}")
        trainer, store = self._ready()
        try:
            trainer.load_state_arrays(unpack(state, trainer.state_spec()))
        except (ValueError, DQCError) as exc:
            raise DQCError(f"center {self.center}: the server's model does not fit ({exc})") from None
        loss, acc = trainer.train_step(store.batch(ids), store.y(ids))
        out = pack(trainer.state_arrays())
        out_key = digest(out)
        self._held = {key: state, out_key: out}
        return out, out_key, loss, acc


def node_csv(context: Context, nodes_dir: str | None = None) -> str:
    """The node's CSV: `data-csv` from its node config (deployment), else, in simulation,
    NODES_DIR/node_<partition-id>.csv."""
    config = context.node_config
    if "data-csv" in config:
        return str(config["data-csv"])
    if nodes_dir and "partition-id" in config:
        return str(Path(nodes_dir) / f"node_{int(config['partition-id'])}.csv")
    raise DQCError("this node has no data: start it with --node-config 'data-csv=\"CSV\"'")


@functools.lru_cache(maxsize=2)
def shared_trainer(shape: tuple[int, int, int]):
    """One compiled model per process and input shape, shared by the centers it serves:
    every step overwrites its whole state with the server's, so sharing changes nothing."""
    from dqc.model import build_models
    from dqc.runs import setup_runtime
    from dqc.trainer import Trainer

    setup_runtime(seed=0)  # float32; every random state arrives with the server's state
    return Trainer(*build_models(shape))


@functools.lru_cache(maxsize=64)
def center_node(csv_path: str) -> CenterNode:
    """The node of a CSV, built once per process (images read, model compiled).

    A process-wide cache on purpose: Flower hands a simulation actor a fresh copy of the
    ClientApp with every message, so a cache inside the app would be rebuilt every time.
    """
    return CenterNode(csv_path)


class WorkerNode:
    """The ClientApp side of a long-running node worker (`python -m dqc.federated worker`).

    A deployed SuperNode starts a fresh ClientApp process for every message; importing
    TensorFlow, building the model and reading the images there would cost seconds each
    time. The worker does that once and serves steps over a local socket; images stay in it.
    """

    def __init__(self, socket_path: str):
        self.socket_path = socket_path

    def _call(self, request: tuple):
        from multiprocessing import AuthenticationError
        from multiprocessing.connection import Client

        try:
            with Client(self.socket_path, "AF_UNIX", authkey=worker_key(self.socket_path)) as c:
                c.send(request)
                status, *result = c.recv()
        except (OSError, EOFError, AuthenticationError) as exc:
            raise DQCError(f"node worker at {self.socket_path} is not answering ({exc})") from None
        if status != "ok":
            raise (StateMissing if status == "missing" else DQCError)(result[0])
        return result

    def identity(self) -> Identity:
        return self._call(("whoami",))[0]

    def train_step(self, state: np.ndarray | None, key: str,
                   ids: Sequence[str]) -> tuple[np.ndarray, str, float, float]:
        return tuple(self._call(("step", state, key, list(ids))))


def worker_key(socket_path: str | Path) -> bytes:
    """The shared secret beside the worker's socket (readable by the node's user only)."""
    return Path(f"{socket_path}.key").read_bytes()


def serve_worker(csv_path: str | Path, socket_path: str | Path,
                 ready: Callable[[], None] | None = None) -> None:
    """Serve "who are you" and steps for one center over a local socket, until killed."""
    import os
    import secrets
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Listener

    node = CenterNode(csv_path)
    node._ready()  # TensorFlow, the model and the images, once
    key_path, secret = Path(f"{socket_path}.key"), secrets.token_bytes(32)
    key_path.touch(mode=0o600)  # private before the secret goes in
    key_path.chmod(0o600)
    key_path.write_bytes(secret)
    with Listener(str(socket_path), "AF_UNIX", authkey=secret) as listener:
        os.chmod(socket_path, 0o600)
        if ready:
            ready()
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError, AuthenticationError):  # failed the handshake: ignore it
                continue
            with conn:
                request = conn.recv()
                try:
                    if request[0] == "whoami":
                        conn.send(("ok", node.identity()))
                    else:
                        conn.send(("ok", *node.train_step(*request[1:])))
                except DQCError as exc:
                    conn.send(("missing" if isinstance(exc, StateMissing) else "error", str(exc)))


def node_for(context: Context, csv_for: Callable[[Context], str]):
    """The node behind a message: its worker when `worker-socket` is configured, else one
    built in this process."""
    socket_path = context.node_config.get("worker-socket")
    if socket_path:
        return WorkerNode(str(socket_path))
    return center_node(csv_for(context))


def client_app(csv_for: Callable[[Context], str] = node_csv) -> ClientApp:
    """The ClientApp: "who are you" and "train one step on these ids"."""
    app = ClientApp()

    def answer(msg: Message, work: Callable[[], object]) -> Message:
        try:
            return Message(work(), reply_to=msg)
        except DQCError as exc:
            code = MISSING if isinstance(exc, StateMissing) else REFUSED
            return Message(Error(code=code, reason=str(exc)), reply_to=msg)

    @app.query("whoami")
    def whoami(msg: Message, context: Context) -> Message:
        return answer(msg, lambda: identity_reply(node_for(context, csv_for).identity()))

    @app.train("step")
    def step(msg: Message, context: Context) -> Message:
        def work():
            return step_reply(*node_for(context, csv_for).train_step(*read_step_request(msg.content)))
        return answer(msg, work)

    return app
