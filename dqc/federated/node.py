"""A center's side of the federation: its images, one training step on them, and the
verification of an update on its own validation images.

Every step starts from the state the server names, so the server can undo an update by
simply not adopting the reply. The node keeps state of its own: its images, its compiled
model, and (per process: `held_arrays`) the last model states it was sent and sent back (a
cache: the server may then send a digest instead of the state; a node without the named state
says so). The images
and their paths stay here; the node answers only with ids, label counts, model states and
its validation images' tally (counts, and what the QC criterion needs). It refuses ids it
does not hold.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from dqc.errors import DQCError
from dqc.federated.messages import (MISSING, REFUSED, Identity, StateMissing, digest,
                                    identity_reply, pack, read_report_request,
                                    read_step_request, read_verify_request, read_whoami_request,
                                    step_reply, unpack, verify_reply)
from dqc.qc import DETAILS, Tally


class CenterNode:
    """One center's training images (from its own CSV), its validation images (from its
    validation CSV, if it holds any) and a trainer over them."""

    def __init__(self, csv_path: str | Path, val_csv: str | Path | None = None):
        from dqc.data import image_shape, load_table, row_source  # not in a worker's ClientApp

        self.table = load_table(csv_path, "train")
        centers = sorted(set(self.table.Study))
        if len(centers) != 1:
            raise DQCError(f"{csv_path}: a node holds one center, this CSV has {len(centers)} "
                           f"({', '.join(centers[:5])})")
        self.center = centers[0]
        self.ids = set(self.table.Subject)
        first = self.table.iloc[0]
        self.shape = image_shape(first.Path, first.Subject, row_source(self.table, self.table.index[0]))
        self.val = load_table(val_csv, "validation") if val_csv else None
        if self.val is not None and "Study" in self.val.columns:
            other = sorted(set(self.val.Study) - {self.center})
            if other:
                raise DQCError(f"{val_csv}: validation rows of center {other[0]} at the node "
                               f"of center {self.center}")
        from dqc.volumes import VolumeStore

        # every image checked (and read) when the node starts, not at its first step
        self._store = VolumeStore(self.table, self.shape, verbose=False)
        self._val_store = VolumeStore(self.val, self.shape, verbose=False) \
            if self.val is not None else None
        self._val_x = None

    def identity(self, truth: bool = False) -> Identity:
        """Who this center is; its ground truth (`Harmful`) only when `truth` is asked for."""
        t, v = self.table, self.val
        harmful = [int(h) for h in t.Harmful] if truth and "Harmful" in t.columns else None
        n_pd = int(t.Group_bin.sum())
        val_pd = int(v.Group_bin.sum()) if v is not None else 0
        return Identity(self.center, list(t.Subject), n_pd, len(t) - n_pd, self.shape, harmful,
                        val_hc=(len(v) - val_pd) if v is not None else 0, val_pd=val_pd,
                        val_also_training=sorted(self.ids & set(v.Subject)) if v is not None
                        else [])

    def ready(self):
        """The trainer (built on first use, kept while the process lives) and the image
        store; the validation images moved to the device once, as stored."""
        trainer = shared_trainer(self.shape)
        if self._val_store is not None and self._val_x is None:
            self._val_x = trainer.on_device(self._val_store.stacked(list(self.val.Subject)))
        return trainer, self._store

    def train_step(self, state: np.ndarray | None, key: str,
                   ids: Sequence[str]) -> tuple[np.ndarray, str, float, float, str]:
        """One optimizer step on `ids` from the server's packed state (or, when `state` is
        None, the held state named `key`); the new packed state and its digest, the loss
        and accuracy, and the digest of the new model part (kept for the verification).

        The process keeps the last input and output states (`held_arrays`): a cache that
        spares sending the state back to the node that produced it (the next batch at the
        same center) or that was just sent it (a retry after an undo). The server stays the
        authority.
        """
        unknown = [i for i in ids if i not in self.ids]
        if unknown:
            raise DQCError(f"center {self.center} does not hold subject(s) "
                           f"{', '.join(unknown[:5])}: refused")
        if not ids:
            raise DQCError(f"center {self.center}: empty batch refused")
        held = held_arrays()
        if state is None:
            state = held.get(key)
            if state is None:
                raise StateMissing(f"center {self.center} does not hold state {key}")
        trainer, store = self.ready()
        self._load(trainer, state, model_only=False)
        loss, acc = trainer.train_step(store.batch(ids), store.y(ids))
        out = pack(trainer.state_arrays())
        out_key = digest(out)
        model = pack(trainer.model_arrays())
        model_key = digest(model)
        held.put(key, state)
        held.put(out_key, out)
        held.put(model_key, model)  # the verification round names it by digest only
        return out, out_key, loss, acc, model_key

    def _load(self, trainer, arrays: np.ndarray, model_only: bool) -> None:
        try:
            trainer.load_state_arrays(unpack(arrays, trainer.state_spec(model_only)), model_only)
        except (ValueError, DQCError) as exc:
            raise DQCError(f"center {self.center}: the server's model does not fit ({exc})") from None

    def verify(self, model: np.ndarray | None, key: str, detail: str) -> Tally:
        """Score this center's validation images with the server's model (`model_arrays`,
        packed; None: the held model named `key`) and tally them (`dqc.qc.tally`)."""
        from dqc.qc import tally

        if self.val is None:
            raise DQCError(f"center {self.center} holds no validation images")
        if detail not in DETAILS:
            raise DQCError(f"center {self.center}: unknown detail {detail!r} refused")
        held = held_arrays()
        if model is None:
            model = held.get(key)
            if model is None:
                raise StateMissing(f"center {self.center} does not hold model {key}")
        trainer, _ = self.ready()
        self._load(trainer, model, model_only=True)
        scores = trainer.predict(self._val_x)
        held.put(key, model)
        return tally(self.val.Group_bin.to_numpy(), scores, detail)

    def report(self, payload: dict, folder: str | Path | None) -> None:
        """Write this center's own page (`dqc.qc_page.write_center_page`) into `folder`
        from the server's decisions about its images, with their mosaics; nothing without
        a folder. Decisions about another center's images are refused."""
        from dqc.qc_page import write_center_page

        try:
            ids = {str(row["Subject"]) for row in payload["images"]}
            mine = payload["center"] == self.center and ids <= self.ids
        except (KeyError, TypeError) as exc:
            raise DQCError(f"center {self.center}: malformed report message ({exc})") from None
        if not mine:
            raise DQCError(f"center {self.center}: report about another center's images refused")
        if folder:
            try:
                write_center_page(folder, payload, dict(zip(self.table.Subject, self.table.Path)),
                                  dict(zip(self.table.Subject, self.table.Group_bin)))
            except (KeyError, TypeError, ValueError) as exc:
                raise DQCError(f"center {self.center}: malformed report message ({exc})") from None


#: A node's data: its training CSV and its validation CSV ("" when it holds none).
NodeFiles = tuple[str, str]


def node_csv(context: Context, nodes_dir: str | None = None) -> NodeFiles:
    """The node's CSVs: `data-csv` and `val-csv` from its node config (deployment), else, in
    simulation, NODES_DIR/node_<partition-id>.csv and node_<partition-id>_val.csv."""
    config = context.node_config
    if "data-csv" in config:
        return str(config["data-csv"]), str(config.get("val-csv", ""))
    if nodes_dir and "partition-id" in config:
        stem = Path(nodes_dir) / f"node_{int(config['partition-id'])}"
        val = Path(f"{stem}_val.csv")
        return f"{stem}.csv", str(val) if val.is_file() else ""
    raise DQCError("this node has no data: start it with --node-config 'data-csv=\"CSV\"'")


def node_report_dir(context: Context, nodes_dir: str | None = None) -> str | None:
    """Where the node writes its own report page: `report-dir` from its node config, else,
    in simulation, NODES_DIR (beside its CSVs); None: no page."""
    return str(context.node_config.get("report-dir", "")) or nodes_dir


class HeldArrays:
    """The last `limit` packed states and models a process was sent or produced, by digest
    (least recently used first out).

    One per process, shared by the centers it serves: a deployed node holds its own last
    input and output states and models; a simulation actor that serves 83 centers holds the
    same few, not 83 centers' worth (each state of the paper's model is 35 MB). A request
    naming an array that was dropped is answered "missing", and the server sends it whole.
    """

    def __init__(self, limit: int):
        if limit < 4:
            raise ValueError("HeldArrays keeps at least 4 arrays: a step's input and output "
                             "states, its model and the last model verified")
        self.limit = limit
        self._arrays: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, key: str) -> np.ndarray | None:
        array = self._arrays.get(key)
        if array is not None:
            self._arrays.move_to_end(key)
        return array

    def put(self, key: str, array: np.ndarray) -> None:
        self._arrays[key] = array
        self._arrays.move_to_end(key)
        while len(self._arrays) > self.limit:
            self._arrays.popitem(last=False)

    def __len__(self) -> int:
        return len(self._arrays)


#: Arrays a node process keeps by digest (`HeldArrays`): for the paper's model at most
#: 6 x 35.4 MB (a state with Adam's moments; a model alone is 11.8 MB).
HELD_ARRAYS = 6


@functools.lru_cache(maxsize=1)
def held_arrays() -> HeldArrays:
    """The process's `HeldArrays`, shared by every center it serves."""
    return HeldArrays(HELD_ARRAYS)


@functools.lru_cache(maxsize=2)
def shared_trainer(shape: tuple[int, int, int]):
    """One compiled model per process and input shape, shared by the centers it serves:
    every step overwrites its whole state with the server's, so sharing changes nothing."""
    from dqc.model import build_models
    from dqc.trainer import Trainer

    setup_node_runtime()
    return Trainer(*build_models(shape))


def setup_node_runtime() -> None:
    """The global Keras settings of a node process, set before it builds its model: float32
    and seed 0. Nothing random is kept from them: every random state arrives with the
    server's state, and a verification only predicts."""
    from dqc.runtime import setup_runtime

    setup_runtime(seed=0)


@functools.lru_cache(maxsize=None)
def center_node(files: NodeFiles) -> CenterNode:
    """The node of its CSVs, built once per process (images read, model compiled).

    A process-wide cache on purpose: Flower hands a simulation actor a fresh copy of the
    ClientApp with every message, so a cache inside the app would be rebuilt every time.
    Unbounded: a simulation actor serves every center (83 in the paper), and a bounded cache
    visited in travelling order would evict each node just before it is needed again.
    """
    node = CenterNode(files[0], files[1] or None)
    node.ready()  # the model too: a node is slow once, when it first answers "who are you"
    return node


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

    def identity(self, truth: bool = False) -> Identity:
        return self._call(("whoami", truth))[0]

    def train_step(self, state: np.ndarray | None, key: str,
                   ids: Sequence[str]) -> tuple[np.ndarray, str, float, float, str]:
        return tuple(self._call(("step", state, key, list(ids))))

    def verify(self, model: np.ndarray | None, key: str, detail: str) -> Tally:
        return self._call(("verify", model, key, detail))[0]

    def report(self, payload: dict, folder: str | None) -> None:
        """The worker writes the page into its own --report folder (`folder` is ignored)."""
        self._call(("report", payload))


def worker_key(socket_path: str | Path) -> bytes:
    """The shared secret beside the worker's socket (readable by the node's user only)."""
    return Path(f"{socket_path}.key").read_bytes()


def serve_worker(csv_path: str | Path, socket_path: str | Path,
                 ready: Callable[[], None] | None = None,
                 val_csv: str | Path | None = None, report: str | Path | None = None) -> None:
    """Serve "who are you", steps, verifications and the server's decisions (the page is
    written into `report`, if given) for one center over a local socket, until killed."""
    import os
    import secrets
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Listener

    node = CenterNode(csv_path, val_csv)
    node.ready()  # TensorFlow, the model and the images, once
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
                        conn.send(("ok", node.identity(*request[1:])))
                    elif request[0] == "verify":
                        conn.send(("ok", node.verify(*request[1:])))
                    elif request[0] == "report":
                        conn.send(("ok", node.report(request[1], report)))
                    else:
                        conn.send(("ok", *node.train_step(*request[1:])))
                except DQCError as exc:
                    conn.send(("missing" if isinstance(exc, StateMissing) else "error", str(exc)))


def node_for(context: Context, csv_for: Callable[[Context], NodeFiles]):
    """The node behind a message: its worker when `worker-socket` is configured, else one
    built in this process."""
    socket_path = context.node_config.get("worker-socket")
    if socket_path:
        return WorkerNode(str(socket_path))
    return center_node(csv_for(context))


def client_app(csv_for: Callable[[Context], NodeFiles] = node_csv,
               mods: Sequence[Mod] = (),
               report_for: Callable[[Context], str | None] = node_report_dir) -> ClientApp:
    """The ClientApp: "who are you", "train one step on these ids", "verify this model" and
    "here is what QC decided about your images" (written to `report_for`'s folder).
    `mods`: Flower mods wrapped around every handler (e.g. differential privacy)."""
    app = ClientApp(mods=list(mods))

    def answer(msg: Message, work: Callable[[], object]) -> Message:
        try:
            return Message(work(), reply_to=msg)
        except DQCError as exc:
            code = MISSING if isinstance(exc, StateMissing) else REFUSED
            return Message(Error(code=code, reason=str(exc)), reply_to=msg)

    @app.query("whoami")
    def whoami(msg: Message, context: Context) -> Message:
        truth = read_whoami_request(msg.content)
        return answer(msg, lambda: identity_reply(node_for(context, csv_for).identity(truth)))

    @app.train("step")
    def step(msg: Message, context: Context) -> Message:
        def work():
            return step_reply(*node_for(context, csv_for).train_step(*read_step_request(msg.content)))
        return answer(msg, work)

    @app.query("verify")
    def verify(msg: Message, context: Context) -> Message:
        def work():
            return verify_reply(node_for(context, csv_for).verify(*read_verify_request(msg.content)))
        return answer(msg, work)

    @app.query("report")
    def report(msg: Message, context: Context) -> Message:
        def work():
            node_for(context, csv_for).report(read_report_request(msg.content),
                                              report_for(context))
            return RecordDict()
        return answer(msg, work)

    return app
