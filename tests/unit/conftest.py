"""Fixtures of the unit tests: pure functions and objects, no servers and no processes (a test that starts
a process fails, saying so)."""

import pytest

from tests.support.tiers import forbid_processes


@pytest.fixture(autouse=True)
def no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_processes(monkeypatch)
