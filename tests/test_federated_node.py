"""A center's node: who it is, refusals, and one step equal to the same step on one machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dqc.errors import DQCError
from dqc.federated.messages import StateMissing, digest, pack, unpack
from dqc.federated.node import CenterNode, WorkerNode
from dqc.federated.simulate import split_by_center


@pytest.fixture(scope="module")
def node_csvs(cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return [train for train, _ in split_by_center(cohort["train"], tmp_path_factory.mktemp("nodes"))]


def test_split_gives_one_csv_per_center_in_name_order(cohort: dict, node_csvs: list[Path]):
    train = pd.read_csv(cohort["train"], dtype={"Subject": str})
    centers = sorted(train.Study.unique())
    assert len(node_csvs) == len(centers)
    for center, csv in zip(centers, node_csvs):
        part = pd.read_csv(csv, dtype={"Subject": str})
        assert set(part.Study) == {center}
        assert list(part.Subject) == list(train.Subject[train.Study == center])
        assert all(Path(p).is_absolute() for p in part.Path)


def test_identity_counts_and_refusals(node_csvs: list[Path]):
    table = pd.read_csv(node_csvs[0], dtype={"Subject": str})
    node = CenterNode(node_csvs[0])
    ident = node.identity()
    assert ident.center == table.Study[0] and ident.subjects == list(table.Subject)
    assert (ident.n_pd, ident.n_hc) == (int(table.Group_bin.sum()), int((1 - table.Group_bin).sum()))
    assert ident.shape == (20, 24, 20) and ident.harmful is None
    other = pd.read_csv(node_csvs[1], dtype={"Subject": str}).Subject[0]
    with pytest.raises(DQCError, match=rf"does not hold subject\(s\) {other}: refused"):
        node.train_step(np.zeros(4, np.uint8), "k", [table.Subject[0], other])


def test_a_node_holds_one_center(cohort: dict):
    with pytest.raises(DQCError, match="a node holds one center, this CSV has 4"):
        CenterNode(cohort["train"])


def _local_step(csv: Path, ids: list[str]):
    """The same step on this machine: a fresh model, one `train_on_batch`."""
    from dqc.model import build_models
    from dqc.runtime import setup_runtime
    from dqc.trainer import Trainer
    from dqc.volumes import VolumeStore

    setup_runtime(seed=3)
    trainer = Trainer(*build_models((20, 24, 20)))
    start = trainer.state_arrays()
    store = VolumeStore(pd.read_csv(csv, dtype={"Subject": str}), (20, 24, 20), verbose=False)
    loss, _ = trainer.train_step(store.batch(ids), store.y(ids))
    return start, trainer.state_arrays(), trainer.state_spec(), loss


def test_node_step_equals_the_local_step_bit_for_bit(node_csvs: list[Path]):
    ids = list(pd.read_csv(node_csvs[0], dtype={"Subject": str}).Subject[:3])
    start, local, spec, local_loss = _local_step(node_csvs[0], ids)
    node = CenterNode(node_csvs[0])
    with pytest.raises(StateMissing):  # a digest alone is refused until the node holds it
        node.train_step(None, digest(pack(start)), ids)
    state, key, loss, *_ = node.train_step(pack(start), digest(pack(start)), ids)
    remote = unpack(state, spec)
    assert loss == local_loss and key == digest(state)
    assert all(np.array_equal(a, b) for a, b in zip(local, remote))
    assert not all(np.array_equal(a, b) for a, b in zip(start, remote))  # it did train
    # the node holds its last input and output: by digest alone it repeats the same step
    again, again_key, again_loss, *_ = node.train_step(None, digest(pack(start)), ids)
    assert again_key == key and again_loss == loss and np.array_equal(again, state)
    assert node.train_step(None, key, ids)[1] != key  # and continues from its output


def test_worker_serves_the_same_answers_over_its_socket(node_csvs: list[Path],
                                                        tmp_path: Path):
    csv = node_csvs[1]
    socket_path = tmp_path / "w.sock"
    worker = subprocess.Popen([sys.executable, "-m", "dqc.federated", "worker", "--csv",
                               str(csv), "--socket", str(socket_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert worker.stdout.readline().strip() == "ready"
        assert oct(socket_path.stat().st_mode & 0o777) == "0o600"
        remote = WorkerNode(str(socket_path))
        assert remote.identity() == CenterNode(csv).identity()
        ids = list(pd.read_csv(csv, dtype={"Subject": str}).Subject[:2])
        start, local, spec, local_loss = _local_step(csv, ids)
        with pytest.raises(StateMissing):
            remote.train_step(None, "no such state", ids)
        state, _, loss, *_ = remote.train_step(pack(start), digest(pack(start)), ids)
        assert loss == local_loss
        assert all(np.array_equal(a, b) for a, b in zip(local, unpack(state, spec)))
        with pytest.raises(DQCError, match="does not hold subject"):
            remote.train_step(pack(start), "k", ["nobody"])
        key = tmp_path / "w.sock.key"
        secret = key.read_bytes()
        key.write_bytes(b"wrong key")  # a local intruder without the secret
        with pytest.raises(DQCError, match="not answering"):
            remote.identity()
        key.write_bytes(secret)  # the worker survived the intruder and still answers
        assert remote.identity().center == CenterNode(csv).center
    finally:
        worker.kill()
        worker.wait()


def test_simulate_with_a_bad_server_input_fails_in_one_line(cohort: dict, capsys,
                                                            tmp_path: Path):
    from helpers import call_script

    main = Path(__file__).resolve().parents[1] / "dqc" / "federated" / "__main__.py"
    run = call_script(["simulate", "-fn_train", str(cohort["train"]), "-fn_test",
                       str(tmp_path / "missing.csv"), "-cycles", "3", "-en", "e.keras",
                       "-pd", "c.keras", "--out", str(tmp_path / "out")], capsys,
                      tmp_path / "out", main)
    assert run.returncode == 2
    assert run.error_lines() == [f"error: {tmp_path / 'missing.csv'}: CSV file not found"]
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()
