"""make test's `-n auto --dist loadgroup` (tests/conftest.py): each test reaches xdist's
scheduler with its group, so the tests that share an expensive fixture run in one worker and
the fixture is built once. pytest 9.2 broke this without a word (its node ids no longer take
xdist's group suffix, pytest-xdist#1386): every worker built every shared fixture, and the
TensorFlow set cost about twice its CPU time."""

from __future__ import annotations

import pytest

from conftest import xdist_group


def test_this_test_reaches_the_scheduler_with_its_group(request: pytest.FixtureRequest):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("runs under make test's xdist --dist loadgroup (make test-tensorflow)")
    assert request.node.nodeid.endswith(f"@{xdist_group(request.node)}")

