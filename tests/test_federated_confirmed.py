"""`confirmed` across machines, in Flower's in-process engine: batches judged by their
center's own loss, and an image found harmful again at its revisit confirmed by a held-out
check step verified at the centers. Its own xdist group (tests/conftest.py, OWN_GROUP): it
builds its own `federated_case` (seconds) rather than lengthen the longest group's."""

from __future__ import annotations

import pandas as pd
import pytest

from helpers import assert_same_qc_outputs

CYCLES = 5  # cycles 3..4 after the pre-trained 0..2; R = 1: cycle 3's suspects revisit in 4


@pytest.mark.decisions  # make test runs it again with oneDNN off: the federated decisions,
# in process (the Ray run of tests/test_federated_simulation.py would take minutes more)
def test_confirmed_gives_one_machines_decisions_with_confirmation_at_the_centers(
        federated_case: dict):
    """The log, the eliminated set and the models are one machine's."""
    from dqc.federated.__main__ import parse_args
    from dqc.federated.simulate import simulate

    flags = ("--criterion", "confirmed", "--window", "10")
    single = federated_case["single"](CYCLES, *flags)
    out = federated_case["root"] / "confirmed_inprocess"
    simulate(parse_args(["simulate", *federated_case["common"], "-cycles", str(CYCLES),
                         *flags, "--out", str(out)]), engine="inprocess")
    assert_same_qc_outputs(single, out, last_cycle=CYCLES - 1)
    fed = pd.read_csv(out / "qc.csv")
    # C04's flipped batch is flagged in cycle 3 (its labels are flipped after pre-training:
    # its loss is far above the others'); C04 has no kept image, so each revisit in cycle 4 is that batch again and
    # finds it harmful again; then one check of the four together, verified at the centers
    c04 = fed[(fed.Study == "C04") & (fed.Cycle == 4)]
    revisits, confirmation = c04[c04.VAL_LOSS.isna()], c04[c04.VAL_LOSS.notna()]
    assert len(revisits) == 4 and revisits.Ignored.all()
    assert list(confirmation.Subject) == list(revisits.Subject)
    assert confirmation.STATISTIC.nunique() == 1 and confirmation.LIMIT.notna().all()
    confirmed = confirmation.STATISTIC > confirmation.LIMIT + 1e-9
    assert (confirmation.Ignored == confirmed.astype(int)).all()
    images = pd.read_csv(out / "qc_images.csv")
    assert set(images.Subject[images.eliminated == 1]) == \
        set(confirmation.Subject[confirmed])
