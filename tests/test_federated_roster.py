"""Before a federated run starts: the consortium is complete (min-nodes, required), each node
says who it is and keeps its ground truth home unless asked, and the run config becomes the
run's specs without argparse (each value checked, one line)."""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from pathlib import Path

import pytest
from flwr.serverapp import ServerApp

from dqc.cli import Parser, add_qc_flags, qc_specs
from dqc.errors import DQCError
from dqc.federated.runconfig import config_from_args, read_config, specs_from_config


def _roster(case: dict, tmp_path: Path, truth: bool, num_nodes: int | None = None,
            minimum: int = 4) -> tuple[dict, list]:
    """Ask the tiny cohort's 4 center nodes who they are, all in this process; every reply
    content that leaves a node is recorded (a Flower mod on the node's ClientApp)."""
    from dqc.federated.inprocess import run_in_process
    from dqc.federated.node import client_app, node_csv
    from dqc.federated.server import roster, wait_for_nodes
    from dqc.federated.simulate import split_by_center

    nodes = split_by_center(case["root"] / "train_by_center.csv", tmp_path / "nodes")
    sent: list = []

    def record(msg, context, call_next):
        reply = call_next(msg, context)
        sent.append(reply.content)
        return reply

    got: dict = {}
    app = ServerApp()

    @app.main()
    def main(grid, context):
        try:
            ids = wait_for_nodes(grid, minimum, timeout=0.2)
            got["table"], _, got["identities"] = roster(grid, ids, 60, 0.001, truth=truth)
        except DQCError as exc:
            got["error"] = str(exc)
    run_in_process(app, client_app(partial(node_csv, nodes_dir=str(tmp_path / "nodes")),
                                   mods=[record]), num_nodes or len(nodes))
    return got, sent


def test_a_node_keeps_its_ground_truth_home_unless_asked(federated_case: dict, tmp_path: Path):
    """The node CSVs hold a Harmful column (C04's images): without the setting nothing the
    server's process receives carries it, and the run's table has no Harmful column (so the
    summary reports no detection rates)."""
    got, sent = _roster(federated_case, tmp_path, truth=False)
    assert len(sent) == 4 and "Harmful" not in got["table"].columns
    assert all("harmful" not in content["identity"] for content in sent)
    assert all(i.harmful is None for i in got["identities"])

    asked, sent = _roster(federated_case, tmp_path / "asked", truth=True)
    assert all("harmful" in content["identity"] for content in sent)
    table = asked["table"]
    assert list(table.Harmful) == [int(s == "C04") for s in table.Study]


def test_a_deployed_run_asks_for_no_ground_truth_unless_told():
    from dqc.federated.__main__ import parse_args
    from dqc.federated.runconfig import server_config

    common = ["deploy", "-fn_train", "t.csv", "-fn_test", "v.csv", "-cycles", "5", "-en", "e",
              "-pd", "p"]
    assert server_config(parse_args(common))["ask-truth"] is False
    assert server_config(parse_args([*common, "--ask-truth"]))["ask-truth"] is True
    assert read_config({"en": "e", "pd": "p", "cycles": 5, "min-nodes": 2})["ask-truth"] is False


def test_the_run_waits_for_every_center_and_says_who_is_missing(federated_case: dict,
                                                                tmp_path: Path):
    got, _ = _roster(federated_case, tmp_path, truth=False, num_nodes=3)
    assert got["error"] == ("1 of 4 center nodes missing after 0.2 s (connected: node 1, "
                            "node 2, node 3); start them, or lower min-nodes")


def test_min_nodes_has_no_default():
    with pytest.raises(DQCError, match=r"^run config lacks min-nodes \(the number of center"):
        read_config({"en": "e", "pd": "p", "cycles": 5})
    specs_from_config({"en": "e", "pd": "p", "cycles": 5})  # the specs alone do not need it


def _args(*extra: str):
    parser = Parser()
    add_qc_flags(parser)
    return parser.parse_args(["-fn_train", "t.csv", "-fn_test", "v.csv", "-cycles", "12", "-en",
                              "e.keras", "-pd", "c.keras", *extra])


@pytest.mark.parametrize("extra", [(), ("--criterion", "combined", "--z", "2.5", "--window",
                                        "20", "--seed", "7", "--quiet",
                                        "--lr-schedule", "restart", "--start-cycle", "4",
                                        "-batch_size", "3", "--resume", "-fn_save", "x")])
def test_the_specs_from_a_run_config_are_the_qc_scripts(extra: tuple[str, ...]):
    """The same specs as the QC script's parser gives for the same flags (the server holds
    no training CSV: its rows come from the nodes)."""
    args = _args(*extra)
    spec, qspec = specs_from_config(config_from_args(args))
    want_spec, want_qspec = qc_specs(args)
    assert qspec == want_qspec
    assert _plain(spec, train_csv="t.csv") == _plain(want_spec)


def _plain(spec, **changes) -> dict:
    """A RunSpec's settings as a dict, without its stopwatch (a fresh `Timings` each)."""
    values = {**asdict(spec), **changes}
    values["execution"].pop("timings")
    return values


@pytest.mark.parametrize("key, value, says", [
    ("cycles", "12", "cycles must be an integer, got '12'"),
    ("error", True, "error must be a number, got True"),
    ("resume", 1, "resume must be true or false, got 1"),
    ("criterion", 3, "criterion must be text, got 3"),
    ("cyles", 12, "unknown key 'cyles'"),
    ("verify-at", "anywhere", "verify-at must be one of centers, server, got 'anywhere'"),
])
def test_a_bad_run_config_value_is_one_line(key: str, value, says: str):
    config = {"en": "e", "pd": "p", "cycles": 12, "min-nodes": 4, key: value}
    with pytest.raises(DQCError) as error:
        specs_from_config(config)
    assert str(error.value).endswith(says) and "\n" not in str(error.value)


@pytest.mark.parametrize("criterion", ["rates", "loss", "mcnemar", "heldout", "trainloss",
                                       "combined"])
def test_no_own_word_refuses_criteria_that_take_a_centers_loss_for_its_batch(criterion: str):
    from dqc.federated.server import check_no_own_word

    _, qspec = specs_from_config({"en": "e", "pd": "p", "cycles": 5, "criterion": criterion})
    if criterion in ("trainloss", "combined"):
        with pytest.raises(DQCError, match=f"^no-own-word: criterion {criterion} accepts a "
                           "batch on its own center's training loss"):
            check_no_own_word(qspec, batch_size=5)
    else:
        check_no_own_word(qspec, batch_size=5)


def test_a_criterion_that_draws_witnesses_by_label_is_refused_before_any_node_is_asked():
    """`balanced` needs every training image's label at the server; the federation keeps
    them at the centers, so it says so in one line (the model files are never looked at)."""
    from dqc.federated.server import check_server_inputs

    spec, qspec = specs_from_config({"en": "e", "pd": "p", "cycles": 5,
                                     "criterion": "balanced"})
    with pytest.raises(DQCError, match="^--criterion balanced draws a revisit's witnesses by "
                       "label, and a federation keeps the training labels at its centers"):
        check_server_inputs(spec, qspec)
