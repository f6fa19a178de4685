"""Fixtures of the e2e tests: whole runs of real processes that several tests inspect, each started once a
session (a run costs tens of seconds on two cores; its tests only read its folder)."""

from pathlib import Path

import pytest

from tests.support.processes import SYNTHETIC_RUN, run_federation


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int | None]]:
    """SYNTHETIC_RUN (tests/support/processes.py) to its end, uninterrupted: its folder and the exit codes
    of the leader and its two learners. Tests read the folder and never write to it (copy it to resume it)."""
    out = tmp_path_factory.mktemp("synthetic")
    return out, run_federation(out, 2, SYNTHETIC_RUN)
