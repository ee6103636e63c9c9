"""What travels between the server and a center's node, and nothing else.

Server -> node: the model state (weights, BatchNorm statistics, dropout seed state, Adam
state; `Trainer.state_arrays` order) and the subject ids of one update; to verify an update,
the model alone (weights and BatchNorm statistics, no Adam state) and how much to tell.
The server reads every reply through `dqc.federated.replies`, which checks it.
Node -> server: the updated state and that step's loss and accuracy; to "verify": its
validation images' `Tally` (counts; with criteria other than the paper's rule also its scores
sorted within each class; for McNemar its 0/1 predictions and labels in its own order); to
"who are you": the center name, its subject ids, label counts, its validation set's size by
class, image shape and, only when the server asks for it (simulation, or a run that asks
explicitly), the `Harmful` ground truth used for scoring. Never an image, never an image path,
never a validation image's id. After each cycle, server -> node: the QC decisions about that
center's own images (ids, cycles, statistics: `dqc.qc_page.center_payload`), for the node's own
report page.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from dqc.errors import DQCError
from dqc.qc import Tally

if TYPE_CHECKING:
    import pandas as pd

WHOAMI = "query.whoami"   # ClientApp handler @app.query("whoami")
STEP = "train.step"       # ClientApp handler @app.train("step")
VERIFY = "query.verify"   # ClientApp handler @app.query("verify")
REPORT = "query.report"   # ClientApp handler @app.query("report")
REFUSED = 4001            # Error code of a node's refusal (unknown ids, bad state, bad data)
MISSING = 4002            # Error code: the node does not hold the state named by a digest


Spec = Sequence[tuple[tuple[int, ...], str]]  # (shape, dtype) of each state array, in order


def pack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """All state arrays as one byte buffer: Flower moves every array (and every 5 MB chunk)
    as a separate object, so ~95 arrays cost ~190 requests per hop; one buffer costs ~8."""
    return np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays])


def unpack(buffer: np.ndarray, spec: Spec) -> list[np.ndarray]:
    """The arrays of `pack`, given the receiver's own (shape, dtype) list."""
    sizes = [int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in spec]
    if sum(sizes) != buffer.size:
        raise DQCError(f"state of {buffer.size} bytes, this model needs {sum(sizes)}: "
                       "the server's and the node's models differ")
    ends = np.cumsum(sizes)
    return [buffer[end - size:end].view(np.dtype(dtype)).reshape(shape)
            for (shape, dtype), size, end in zip(spec, sizes, ends)]


def digest(state: np.ndarray) -> str:
    """A short name for a packed state (BLAKE2b, 128 bits)."""
    return hashlib.blake2b(memoryview(state), digest_size=16).hexdigest()


class StateMissing(DQCError):
    """The node does not hold the state a request names by digest only."""


def step_request(state: np.ndarray | None, key: str, ids: Sequence[str]) -> RecordDict:
    """The ids of one update and the state to start from, `key` = `digest(state)`.

    `state` is None when the node holds that state already (the last one it was sent or
    sent back): then only the digest travels, not ~34 MB.
    """
    records = {"batch": ConfigRecord({"ids": [str(i) for i in ids], "state": key})}
    if state is not None:
        records["state"] = ArrayRecord([state])
    return RecordDict(records)


def read_step_request(content: RecordDict) -> tuple[np.ndarray | None, str, list[str]]:
    state = content["state"].to_numpy_ndarrays()[0] if "state" in content else None
    return state, str(content["batch"]["state"]), list(content["batch"]["ids"])


def step_reply(state: np.ndarray, key: str, loss: float, accuracy: float,
               model_key: str) -> RecordDict:
    """The new state and its digest, and the digest of its model part (`Trainer.model_arrays`),
    which the node keeps for the verification that follows."""
    return RecordDict({"state": ArrayRecord([state]),
                       "key": ConfigRecord({"state": key, "model": model_key}),
                       "metrics": MetricRecord({"loss": float(loss), "accuracy": float(accuracy)})})


def verify_request(model: np.ndarray | None, key: str, detail: str) -> RecordDict:
    """Score your validation images with this model (`key` = `digest(model)`; `model` None:
    the node holds it) and tell `detail` (`dqc.qc.DETAILS`)."""
    records = {"verify": ConfigRecord({"model": key, "detail": detail})}
    if model is not None:
        records["model"] = ArrayRecord([model])
    return RecordDict(records)


def read_verify_request(content: RecordDict) -> tuple[np.ndarray | None, str, str]:
    model = content["model"].to_numpy_ndarrays()[0] if "model" in content else None
    return model, str(content["verify"]["model"]), str(content["verify"]["detail"])


def verify_reply(t: Tally) -> RecordDict:
    records = {"tally": ConfigRecord({"n_hc": t.n_hc, "n_pd": t.n_pd, "fp": t.fp, "fn": t.fn,
                                      "pred": t.pred, "truth": t.truth})}
    if t.hc_scores is not None:
        records["scores"] = ArrayRecord([np.asarray(t.hc_scores), np.asarray(t.pd_scores)])
    return RecordDict(records)


def report_request(payload: dict) -> RecordDict:
    """The decisions about one center's images after a cycle (`dqc.qc_page.center_payload`)."""
    return RecordDict({"report": ConfigRecord({"json": json.dumps(payload)})})


def read_report_request(content: RecordDict) -> dict:
    try:
        payload = json.loads(str(content["report"]["json"]))
    except (KeyError, ValueError) as exc:
        raise DQCError(f"malformed report message ({exc})") from None
    if not isinstance(payload, dict):
        raise DQCError("malformed report message (not an object)")
    return payload


def payload_bytes(content: RecordDict) -> int:
    """The bytes of a message's arrays (states, scores): what dominates its size."""
    return sum(a.nbytes for record in content.values() if isinstance(record, ArrayRecord)
               for a in record.to_numpy_ndarrays())


@dataclass(frozen=True)
class Identity:
    """A node's answer to "who are you"."""

    center: str
    subjects: list[str]
    n_pd: int
    n_hc: int
    shape: tuple[int, int, int]
    harmful: list[int] | None = None  # simulated ground truth, only for scoring
    val_hc: int = 0                   # the node's validation images, by class
    val_pd: int = 0
    val_also_training: list[str] = field(default_factory=list)  # training ids among them


def identity_reply(identity: Identity) -> RecordDict:
    values = {"center": identity.center, "subjects": list(identity.subjects),
              "n_pd": identity.n_pd, "n_hc": identity.n_hc, "shape": list(identity.shape),
              "val_hc": identity.val_hc, "val_pd": identity.val_pd,
              "val_also_training": list(identity.val_also_training)}
    if identity.harmful is not None:
        values["harmful"] = list(identity.harmful)
    return RecordDict({"identity": ConfigRecord(values)})


def whoami_request(truth: bool = False) -> RecordDict:
    """"Who are you?"; with `truth`, also "what is your images' ground truth" (`Harmful`),
    which a node tells only when asked: in simulation, or when the run asks explicitly."""
    return RecordDict({"whoami": ConfigRecord({"truth": bool(truth)})})


def read_whoami_request(content: RecordDict) -> bool:
    """Whether the server asks for the ground truth (an old server's bare request: no)."""
    return "whoami" in content and content["whoami"].get("truth") is True


def roster_table(identities: Sequence[Identity]) -> "pd.DataFrame":
    """The server's view of the training set: Subject, Study (+ Harmful), no paths.

    Centers come in name order (a federation has no global CSV order); subjects in each
    node's own order. Two nodes with one center name, or one id at two centers, are errors.
    """
    import pandas as pd

    centers = [i.center for i in identities]
    twice = sorted({c for c in centers if centers.count(c) > 1})
    if twice:
        raise DQCError(f"two nodes say they are center {twice[0]!r}")
    seen: dict[str, str] = {}
    for ident in identities:
        for s in ident.subjects:
            if s in seen:
                raise DQCError(f"subject {s!r} is held by both {seen[s]!r} and {ident.center!r}")
            seen[s] = ident.center
    ordered = sorted(identities, key=lambda i: i.center)
    table = pd.DataFrame({"Subject": [s for i in ordered for s in i.subjects],
                          "Study": [i.center for i in ordered for _ in i.subjects]})
    if ordered and all(i.harmful is not None for i in ordered):
        table["Harmful"] = [h for i in ordered for h in i.harmful]
    return table
