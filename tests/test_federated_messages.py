"""What travels between server and nodes: packing, identities, the server's roster (no TF)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dqc.errors import DQCError
from dqc.federated.messages import (Identity, digest, identity_reply, pack, read_step_request,
                                    roster_table, step_reply, step_request, unpack)
from dqc.federated.replies import read_hello, read_step, read_tally


def _state() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(3, 3, 3, 1, 4)).astype(np.float32), np.array(7, np.int64),
            np.array([11, 12], np.uint32), rng.normal(size=5).astype(np.float32)]


def test_pack_unpack_is_exact_for_mixed_dtypes():
    state = _state()
    spec = [(a.shape, str(a.dtype)) for a in state]
    buffer = pack(state)
    assert buffer.dtype == np.uint8 and buffer.size == sum(a.nbytes for a in state)
    back = unpack(buffer, spec)
    for a, b in zip(state, back):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_unpack_refuses_a_state_of_another_model():
    state = _state()
    spec = [(a.shape, str(a.dtype)) for a in state] + [((2,), "float32")]
    with pytest.raises(DQCError, match="models differ"):
        unpack(pack(state), spec)


def test_step_messages_round_trip():
    buffer = pack(_state())
    key = digest(buffer)
    got, got_key, ids = read_step_request(step_request(buffer, key, ["s1", "s2"]))
    assert ids == ["s1", "s2"] and got_key == key and np.array_equal(got, buffer)
    state = _state()
    model_key = digest(pack(state[:2]))
    got, got_key, loss, acc, got_model = read_step(
        step_reply(buffer, key, 0.25, 0.8, model_key), state,
        [(a.shape, str(a.dtype)) for a in state], [False] * len(state), 0.0, n_model=2)
    assert np.array_equal(pack(got), buffer) and got_key == key and got_model == model_key
    assert loss == pytest.approx(0.25) and acc == pytest.approx(0.8)
    # only the ids, a digest and one opaque buffer travel: no path, no image
    content = step_request(buffer, key, ["s1"])
    assert set(content.keys()) == {"state", "batch"}
    assert set(content["batch"].keys()) == {"ids", "state"}
    # a state the node holds travels by its digest alone
    assert read_step_request(step_request(None, key, ["s1"]))[:2] == (None, key)
    assert "state" not in step_request(None, key, ["s1"]).keys()


def test_digest_names_the_bytes():
    buffer = pack(_state())
    changed = buffer.copy()
    changed[-1] ^= 1
    assert digest(buffer) == digest(buffer.copy()) != digest(changed) and len(digest(buffer)) == 32


def _ident(center: str, subjects: list[str], harmful: list[int] | None = None) -> Identity:
    return Identity(center, subjects, 1, len(subjects) - 1, (20, 24, 20), harmful)


def test_identity_round_trip_carries_no_paths():
    ident = _ident("B", ["b1", "b2"], [0, 1])
    content = identity_reply(ident)
    assert read_hello(content) == ident
    assert set(content["identity"].keys()) == {"center", "subjects", "n_pd", "n_hc", "shape",
                                               "harmful", "val_hc", "val_pd",
                                               "val_also_training"}
    assert read_hello(identity_reply(_ident("A", ["a1"]))).harmful is None


def test_roster_orders_centers_by_name_and_keeps_each_nodes_order():
    table = roster_table([_ident("C2", ["z", "a"], [1, 0]), _ident("C1", ["m", "b"], [0, 0])])
    assert list(table.Study) == ["C1", "C1", "C2", "C2"]
    assert list(table.Subject) == ["m", "b", "z", "a"]
    assert list(table.Harmful) == [0, 0, 1, 0]
    assert "Path" not in table.columns
    without = roster_table([_ident("C2", ["z"]), _ident("C1", ["m"], [0])])
    assert "Harmful" not in without.columns  # only when every node knows it


def test_roster_refuses_duplicate_centers_and_shared_subjects():
    with pytest.raises(DQCError, match="two nodes say they are center 'A'"):
        roster_table([_ident("A", ["a1"]), _ident("A", ["a2"])])
    with pytest.raises(DQCError, match="subject 'x' is held by both 'A' and 'B'"):
        roster_table([_ident("A", ["x"]), _ident("B", ["x"])])


def test_client_side_modules_import_no_tensorflow():
    """A deployed node starts a ClientApp process per message; with a worker it must stay light."""
    code = ("import sys, dqc.federated.messages, dqc.federated.node; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'SimpleITK') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_verify_messages_carry_a_tally_and_nothing_else():
    from dqc.federated.messages import read_verify_request, verify_reply, verify_request
    from dqc.qc import tally

    model = pack(_state())
    key = digest(model)
    assert read_verify_request(verify_request(model, key, "counts"))[1:] == (key, "counts")
    assert read_verify_request(verify_request(None, key, "scores"))[0] is None
    y, s = np.array([0, 1, 1, 0]), np.array([0.2, 0.9, 0.4, 0.7], np.float32)
    counts = verify_reply(tally(y, s, "counts"))
    assert set(counts.keys()) == {"tally"}  # the paper's rule: counts only
    back = read_tally(counts, (2, 2), "counts")
    assert (back.n_hc, back.n_pd, back.fp, back.fn) == (2, 2, 1, 1) and back.hc_scores is None
    scores = read_tally(verify_reply(tally(y, s, "scores")), (2, 2), "scores")
    assert list(scores.hc_scores) == pytest.approx([0.2, 0.7]) and scores.pred == ""


def test_a_node_process_keeps_only_its_last_arrays():
    """HeldArrays: a process serving 83 simulated centers keeps a few states, not 83 centers'
    worth; the least recently used goes first, and one that is read again stays."""
    from dqc.federated.node import HeldArrays

    held = HeldArrays(4)
    arrays = {k: np.full(3, i, np.float32) for i, k in enumerate("abcdef")}
    for k in "abcd":
        held.put(k, arrays[k])
    assert held.get("a") is arrays["a"]          # read: now the most recent
    held.put("e", arrays["e"])                    # drops b, the least recently used
    held.put("f", arrays["f"])                    # drops c
    assert [k for k in "abcdef" if held.get(k) is not None] == ["a", "d", "e", "f"]
    assert len(held) == 4 and held.get("b") is None
    with pytest.raises(ValueError, match="at least 4"):
        HeldArrays(3)
