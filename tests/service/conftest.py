"""Fixtures of the service tests: gRPC servers in the test process, on localhost, and no processes (a test
that starts one fails, saying so; the session's certificates are made before, by tests/conftest.py)."""

import pytest

from tests.support.live import LiveLeader
from tests.support.tiers import forbid_processes


@pytest.fixture(autouse=True)
def no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_processes(monkeypatch)


@pytest.fixture
def live(tmp_path, port):
    """A real leader (capacity 2, synthetic data) serving on localhost; the test plays its round loop."""
    live = LiveLeader.start(tmp_path, port, "--learners", "2", "--batch-size", "8")
    yield live
    live.stop()
