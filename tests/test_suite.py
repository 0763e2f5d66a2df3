"""The suite's own arrangement under pytest-xdist (pyproject's addopts): what the conftest groups stays grouped."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ONE_WORKER


def test_tests_sharing_the_sessions_state_run_on_one_worker(request: pytest.FixtureRequest, probe_cache: Path) -> None:
    """A test that uses `probe_cache` carries the group's suffix in its id, which is what sends it to the worker that
    holds the bundled sample's probe answers (without it each worker would run the models again)."""
    if not hasattr(request.config, "workerinput"):
        pytest.skip("the suite runs in this process (-n 0): there is one worker")
    assert request.config.getvalue("loadgroup")
    assert request.node.nodeid.endswith(f"@{ONE_WORKER}"), request.node.nodeid
