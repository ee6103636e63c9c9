"""Deployment on loopback: a real SuperLink and SuperNodes with TLS and node authentication.

Unregistered nodes are refused (in `make test`); a whole run gives the single-machine
script's results and every process it started is gone afterwards (`make test-deploy`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

from helpers import assert_same_qc_outputs
from dqc.federated.loopback import Processes, flower_env, make_node_key, start_federation

def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (e.g. a work folder)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass
    return pids


def test_unregistered_or_keyless_nodes_are_refused(tmp_path: Path):
    processes = Processes(flower_env(tmp_path), tmp_path / "logs")
    try:
        fed = start_federation(tmp_path, processes)
        assert fed.tls.ca.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        intruder_key, _ = make_node_key(tmp_path / "keys", "intruder")  # never registered
        intruder = fed.start_node("intruder", intruder_key, tmp_path / "no.sock")
        keyless = fed.start_node("keyless", None, tmp_path / "no.sock")
        member = fed.start_node("member", fed.register("member"), tmp_path / "no.sock")
        member_log = tmp_path / "logs" / "member.log"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (
                intruder.poll() is None or keyless.poll() is None
                or "SuperNode ID:" not in member_log.read_text()):
            time.sleep(0.5)
        assert intruder.returncode not in (None, 0) and keyless.returncode not in (None, 0)
        link_log = (tmp_path / "logs" / "superlink.log").read_text()
        assert "No SuperNode found with the given public key" in link_log
        assert "must be registered" in (tmp_path / "logs" / "keyless.log").read_text()
        assert member.poll() is None  # the registered node is connected and waiting
        assert "SuperNode ID:" in member_log.read_text()
    finally:
        processes.stop()
    assert not _processes_mentioning(str(tmp_path))


#: The simulation test's setting (tests/test_federated_simulation.py): C04's labels are flipped
#: (`federated_case`), and `trainloss` (its window starts with the pre-training's last cycle)
#: undoes C04's batch in cycle 3 and checks each of its images alone; which of them are
#: flagged (and eliminated on revisit in cycle 4) is not by construction: lower bounds.
CYCLES = 5  # cycles 3..4 after the pre-trained 0..2
FLAGS = ("--criterion", "trainloss", "--window", "10")


@pytest.mark.deploy  # ~6 min on 2 busy cores (45 remote updates): `make test-deploy`
def test_deployed_run_gives_the_single_machine_results(federated_case: dict, tmp_path: Path):
    from dqc.federated.__main__ import parse_args
    from dqc.federated.loopback import deploy

    work, out = tmp_path / "work", tmp_path / "out"
    args = parse_args(["deploy", *federated_case["common"], "-cycles", str(CYCLES), *FLAGS,
                       "--out", str(out), "--work", str(work), "--ask-truth"])
    summary = deploy(args, timeout=900)
    assert not _processes_mentioning(str(work))  # SuperLink, SuperNodes, workers: all stopped
    assert summary == out / "qc_summary.json"
    log = assert_same_qc_outputs(federated_case["single"](CYCLES, *FLAGS), out,
                                 last_cycle=CYCLES - 1)
    # non-trivial decisions by construction, not floating-point luck: lower bounds only
    assert (log.Ignored == 0).sum() >= 5 and log.Ignored.sum() >= 3
    images = pd.read_csv(out / "qc_images.csv")
    harmful = images.Subject[images.Harmful == 1]  # the nodes' ground truth reached the report
    flagged = images.Subject[images.times_flagged > 0]
    eliminated = images.Subject[images.eliminated == 1]
    assert len(harmful) == 4 and set(flagged) <= set(harmful) and len(eliminated) >= 1
    alone = log[log.Subject.isin(harmful)]  # each checked alone in cycle 3; flagged: revisited
    assert sorted(alone.Subject[alone.Cycle == 3]) == sorted(harmful)
    assert set(flagged) <= set(alone.Subject[alone.Cycle == 4])
    assert ((log.Subject == "batch") & (log.Study == "C04") & (log.Ignored == 1)).any()
    # each worker (--report OUT/nodes) wrote its center's page, the server's has no mosaic
    c04 = (out / "nodes" / "qc_report_C04.html").read_text()
    assert all(f'data-subject="{s}"' in c04 for s in eliminated) and 'class="mosaic"' in c04
    assert 'class="mosaic"' not in (out / "qc_report.html").read_text()
    network = json.loads((out / "qc_network.json").read_text())
    calibration = json.loads((out / "qc_summary.json").read_text())["calibration"]
    assert network["updates"] == len(log) - 1 + calibration["steps"]  # one remote step each
    # the nodes read the images, through their workers; the TLS material stayed in the work dir
    assert (work / "tls" / "server.key").stat().st_mode & 0o077 == 0


# --- a node that dies mid-run, a node that never connects: one line each ----------------------

def _deploy_line(case: dict, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch,
                 node: Callable[[str, subprocess.Popen, Path], None] | None,
                 *flags: str) -> str:
    """Deploy the tiny cohort (one QC cycle after the pre-trained ones; `node(name, process,
    out)` is told of each SuperNode started, or with None, node-3 is never started); the one
    error line it ends with, after checking that it is one line, exit status 2, and that
    every process it started is gone."""
    from dqc.cli import run_main
    from dqc.federated.__main__ import parse_args
    from dqc.federated.loopback import Federation, deploy

    work, out = tmp_path / "work", tmp_path / "out"
    start_node = Federation.start_node

    def started(fed, name, key, worker):
        if node is None and name == "node-3":
            return None  # this center never connects
        process = start_node(fed, name, key, worker)
        if node is not None:
            node(name, process, out)
        return process
    monkeypatch.setattr(Federation, "start_node", started)
    args = parse_args(["deploy", *case["common"], "-cycles", "5", "--out", str(out),
                       "--work", str(work), *flags])
    with pytest.raises(SystemExit) as stopped:
        run_main(lambda: deploy(args, timeout=900))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert stopped.value.code == 2 and len(errors) == 1 and "Traceback" not in err
    assert not _processes_mentioning(str(work))
    return errors[0]


@pytest.mark.deploy
def test_a_node_killed_mid_run_ends_the_run_in_one_line(federated_case: dict, tmp_path: Path,
                                                         capsys, monkeypatch):
    """Center C02's SuperNode (and its ClientApp) is killed once cycle 3 is saved: the
    server names it after --node-timeout-s, and cycle 3's files stay."""
    def kill_after_cycle_3(name: str, process: subprocess.Popen, out: Path) -> None:
        def watch():
            while process.poll() is None and not (out / "qc_encoder_003.keras").exists():
                time.sleep(0.2)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        if name == "node-1":
            threading.Thread(target=watch, daemon=True).start()

    line = _deploy_line(federated_case, tmp_path, capsys, monkeypatch, kill_after_cycle_3,
                        "--node-timeout-s", "30")
    assert "center C02" in line and "did not answer within 30 s" in line, line
    assert (tmp_path / "out" / "qc_encoder_003.keras").is_file()
    assert not (tmp_path / "out" / "qc_encoder_004.keras").exists()


@pytest.mark.deploy
def test_a_node_that_never_connects_ends_the_run_in_one_line(federated_case: dict,
                                                              tmp_path: Path, capsys,
                                                              monkeypatch):
    line = _deploy_line(federated_case, tmp_path, capsys, monkeypatch, None,
                        "--wait-nodes-s", "20")
    assert "1 of 4 center nodes missing after 20 s (connected: node " in line, line
    assert not (tmp_path / "out" / "qc.csv").exists()
