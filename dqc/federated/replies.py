"""The one check of everything a center's node sends back: hello, step and verify replies.

The server trusts nothing a node returns until it has passed here. A reply that fails is a
*faulty node* (`ReplyFault`, which the server names with the center); nothing of it is
adopted. What is checked, and why each bound holds for an honest node (docs/threat-model.md):

- hello: every field of the right type; counts non-negative, adding up to the ids; the
  image shape three positive sizes; ground-truth flags, when sent, 0/1 and one per id.
- step: one byte buffer of exactly the sent layout; every float of the new state finite;
  the loss finite and non-negative, the accuracy in [0, 1]; the digests it names those of
  the state it sent; and every trainable weight
  moved by at most what one Adam step at the cycle's learning rate can move
  (`adam_step_bound`).
- verify: counts non-negative integers, as many images of each class as the node declared
  in its hello, errors no more than the images of their class; when the criterion needs
  scores, one finite score in [0, 1] per image of each class; predictions and labels 0/1
  strings, one per image, that give the same counts.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from dqc.errors import DQCError
from dqc.federated.messages import Identity, Spec, digest, pack, unpack
from dqc.qc import Tally

#: Relative slack on the Adam bound, and ulps of the weight, for float32 rounding.
BOUND_SLACK, ULPS = 1e-3, 4


class ReplyFault(DQCError):
    """What is wrong with one reply; the server adds which center sent it."""


def adam_step_bound(lr: float, beta_1: float, beta_2: float) -> float:
    """The most one Adam step can move one weight, whatever the gradients: `lr` times
    (1 - beta_1) / sqrt((1 - beta_2) (1 - beta_1^2 / beta_2)) (7.27 lr for 0.9, 0.999).

    Why: Adam moves a weight by lr * m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - beta_1^t),
    v_hat = v / (1 - beta_2^t), with m = (1 - beta_1) sum_k beta_1^k g_k and v = (1 - beta_2)
    sum_k beta_2^k g_k^2 over the past gradients. Cauchy-Schwarz on
    sum_k (beta_1^k / beta_2^(k/2)) (beta_2^(k/2) g_k) gives |m| <= (1 - beta_1)
    sqrt(v / (1 - beta_2)) / sqrt(1 - beta_1^2 / beta_2) (needs beta_1^2 < beta_2), and the
    bias correction sqrt(1 - beta_2^t) / (1 - beta_1^t) is at most 1 for such betas (checked
    for t up to 2e6: its maximum tends to 1 from below). Zeroed first moments (`heldout`)
    only shrink the step; eps only shrinks it. The bound does not depend on the history's
    learning rates, only on this step's.
    """
    if not beta_1 ** 2 < beta_2:
        raise ValueError(f"no step bound for beta_1 {beta_1}, beta_2 {beta_2}")
    return lr * (1 - beta_1) / math.sqrt((1 - beta_2) * (1 - beta_1 ** 2 / beta_2))


# --- field readers ---------------------------------------------------------------------------

def _record(content: RecordDict, key: str, kind: type, what: str):
    if not isinstance(content, RecordDict) or key not in content:
        raise ReplyFault(f"{what} reply lacks its {key!r} record")
    record = content[key]
    if not isinstance(record, kind):
        raise ReplyFault(f"{what} reply: {key!r} is a {type(record).__name__}, "
                         f"not a {kind.__name__}")
    return record


def _field(record, key: str, what: str):
    if key not in record:
        raise ReplyFault(f"{what} reply lacks {key!r}")
    return record[key]


def _count(value, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ReplyFault(f"{what} reply: {name} {value!r} is not a non-negative integer")
    return int(value)


def _text(value, name: str, what: str) -> str:
    if not isinstance(value, str):
        raise ReplyFault(f"{what} reply: {name} is not text")
    return value


def _texts(value, name: str, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ReplyFault(f"{what} reply: {name} is not a list of text")
    return list(value)


def _number(value, name: str, what: str, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
            or not low <= float(value) <= high:  # also refuses NaN
        raise ReplyFault(f"{what} reply: {name} {value!r} is not a finite number"
                         + (f" in [{low:g}, {high:g}]" if math.isfinite(low + high) else ""))
    return float(value)


def _one_array(content: RecordDict, key: str, what: str) -> np.ndarray:
    arrays = _record(content, key, ArrayRecord, what).to_numpy_ndarrays()
    if len(arrays) != 1 or arrays[0].dtype != np.uint8 or arrays[0].ndim != 1:
        raise ReplyFault(f"{what} reply: {key!r} is not one byte buffer")
    return arrays[0]


# --- hello -------------------------------------------------------------------------------------

def read_hello(content: RecordDict) -> Identity:
    """A node's answer to "who are you", checked (`messages.identity_reply`)."""
    what = "hello"
    r = _record(content, "identity", ConfigRecord, what)
    center = _text(_field(r, "center", what), "center", what)
    if not center.strip():
        raise ReplyFault("hello reply: empty center name")
    subjects = _texts(_field(r, "subjects", what), "subjects", what)
    if not subjects or len(set(subjects)) != len(subjects):
        raise ReplyFault(f"hello reply of {center}: {len(subjects)} subject ids, "
                         f"{len(set(subjects))} distinct; at least one, each once")
    n_pd, n_hc = (_count(_field(r, k, what), k, what) for k in ("n_pd", "n_hc"))
    if n_pd + n_hc != len(subjects):
        raise ReplyFault(f"hello reply of {center}: {n_hc} HC + {n_pd} PD labels for "
                         f"{len(subjects)} subjects")
    shape = _field(r, "shape", what)
    if not isinstance(shape, list) or len(shape) != 3 or \
            not all(_count(s, "shape", what) > 0 for s in shape):
        raise ReplyFault(f"hello reply of {center}: image shape {shape!r} is not 3 sizes")
    val_hc, val_pd = (_count(_field(r, k, what), k, what) for k in ("val_hc", "val_pd"))
    also = _texts(_field(r, "val_also_training", what), "val_also_training", what)
    if not set(also) <= set(subjects):
        raise ReplyFault(f"hello reply of {center}: validation ids said to be training "
                         "images that it does not hold")
    harmful = None
    if "harmful" in r:
        harmful = [_count(h, "harmful", what) for h in _field(r, "harmful", what)] \
            if isinstance(r["harmful"], list) else None
        if harmful is None or len(harmful) != len(subjects) or max(harmful, default=0) > 1:
            raise ReplyFault(f"hello reply of {center}: harmful is not one 0/1 per subject")
    return Identity(center, subjects, n_pd, n_hc, tuple(int(s) for s in shape), harmful,
                    val_hc, val_pd, also)


# --- step --------------------------------------------------------------------------------------

def read_step(content: RecordDict, sent: Sequence[np.ndarray], spec: Spec,
              bounded: Sequence[bool], max_step: float, n_model: int
              ) -> tuple[list[np.ndarray], str, float, float, str]:
    """A step reply checked against the state that was sent (`messages.step_reply`): the
    new state's arrays, its digest, the loss, the accuracy and the model part's digest.

    `bounded[i]`: whether array i is a trainable weight, which may move by at most
    `max_step` (`adam_step_bound`), plus float32 rounding. The first `n_model` arrays are
    the model part, whose digest the reply names (the node verifies it next by digest)."""
    what = "step"
    buffer = _one_array(content, "state", what)
    try:
        arrays = unpack(buffer, spec)
    except DQCError:
        size = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in spec)
        raise ReplyFault(f"step reply: a state of {buffer.size} bytes, not the sent layout "
                         f"of {size}") from None
    keys = _record(content, "key", ConfigRecord, what)
    key, model_key = (_text(_field(keys, k, what), k, what) for k in ("state", "model"))
    metrics = _record(content, "metrics", MetricRecord, what)
    loss = _number(_field(metrics, "loss", what), "loss", what, 0.0)
    accuracy = _number(_field(metrics, "accuracy", what), "accuracy", what, 0.0, 1.0)
    for i, (new, old, weight) in enumerate(zip(arrays, sent, bounded)):
        if new.dtype.kind == "f" and not np.isfinite(new).all():
            raise ReplyFault(f"step reply: state array {i} {new.shape} holds "
                             f"{int((~np.isfinite(new)).sum())} non-finite value(s)")
        if weight:
            moved = np.abs(new.astype(np.float64) - old.astype(np.float64))
            allowed = max_step * (1 + BOUND_SLACK) + ULPS * np.spacing(np.abs(old))
            if (moved > allowed).any():
                raise ReplyFault(f"step reply: weight array {i} {new.shape} moved by up to "
                                 f"{moved.max():.3g}, one Adam step moves at most "
                                 f"{max_step:.3g}")
    if key != digest(buffer) or model_key != digest(pack(arrays[:n_model])):
        raise ReplyFault("step reply: the digests it names are not those of its state")
    return arrays, key, loss, accuracy, model_key


# --- verify ------------------------------------------------------------------------------------

def _scores(content: RecordDict, n_hc: int, n_pd: int) -> tuple[np.ndarray, np.ndarray]:
    what = "verify"
    arrays = _record(content, "scores", ArrayRecord, what).to_numpy_ndarrays()
    if len(arrays) != 2:
        raise ReplyFault(f"verify reply: {len(arrays)} score arrays, not 2 (HC, PD)")
    for name, a, n in (("HC", arrays[0], n_hc), ("PD", arrays[1], n_pd)):
        if a.dtype.kind != "f" or a.shape != (n,):
            raise ReplyFault(f"verify reply: {name} scores of shape {a.shape} and type "
                             f"{a.dtype}, not {n} floats")
        if not (np.isfinite(a) & (a >= 0) & (a <= 1)).all():
            raise ReplyFault(f"verify reply: {name} scores outside [0, 1] or not finite")
    return arrays[0], arrays[1]


def _bits(value, name: str, n: int) -> np.ndarray:
    text = _text(value, name, "verify")
    if len(text) != n or set(text) - {"0", "1"}:
        raise ReplyFault(f"verify reply: {name} is not {n} 0/1 digits")
    return np.frombuffer(text.encode(), np.uint8) - ord("0")


def read_tally(content: RecordDict, declared: tuple[int, int], detail: str) -> Tally:
    """A verify reply checked (`messages.verify_reply`): the counts of as many HC and PD
    images as the node `declared` in its hello, and what `detail` asks for."""
    what = "verify"
    r = _record(content, "tally", ConfigRecord, what)
    n_hc, n_pd, fp, fn = (_count(_field(r, k, what), k, what) for k in ("n_hc", "n_pd", "fp", "fn"))
    if (n_hc, n_pd) != tuple(declared):
        raise ReplyFault(f"verify reply: counts of {n_hc} HC and {n_pd} PD images, it declared "
                         f"{declared[0]} HC and {declared[1]} PD")
    if fp > n_hc or fn > n_pd:
        raise ReplyFault(f"verify reply: {fp} false positives of {n_hc} HC, {fn} false "
                         f"negatives of {n_pd} PD")
    if detail == "counts":
        return Tally(n_hc, n_pd, fp, fn)
    hc, pd_ = _scores(content, n_hc, n_pd)
    if detail == "scores":
        return Tally(n_hc, n_pd, fp, fn, hc, pd_)
    pred_text, truth_text = (_field(r, k, what) for k in ("pred", "truth"))
    pred, truth = _bits(pred_text, "pred", n_hc + n_pd), _bits(truth_text, "truth", n_hc + n_pd)
    if (int(truth.sum()), int((pred & ~truth & 1).sum()), int((~pred & truth & 1).sum())) \
            != (n_pd, fp, fn):
        raise ReplyFault("verify reply: predictions and labels do not give its counts")
    return Tally(n_hc, n_pd, fp, fn, hc, pd_, pred_text, truth_text)
