"""Fixtures of the e2e tests: whole runs of real processes that several tests inspect, each started once a
session (a run costs tens of seconds on two cores; its tests only read its folder)."""

from pathlib import Path

import pytest

from federated.net import guard
from federated.tools import launch
from tests.support.certs import TOKEN, tls_flags
from tests.support.processes import SYNTHETIC_RUN, run_federation

# A run over mutual TLS with the token from the environment; float16 on the wire, whose bytes a test compares
# with the synthetic run's float32 ones
TLS_RUN = ["--dataset", "synthetic", "--rounds", "20", "--batch-size", "16", "--wire-dtype", "float16"]


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int | None]]:
    """SYNTHETIC_RUN (tests/support/processes.py) to its end, uninterrupted, started as launch.py (make demo)
    starts a federation: its folder and the exit codes of the leader and its two learners. Tests read the folder
    and never write to it (copy it to resume it). One thread a learner, as tests/support/processes.py's learners
    have: a run compared with this one step for step must compute alike."""
    out = tmp_path_factory.mktemp("synthetic")
    leader, learners = launch.start_federation(2, SYNTHETIC_RUN, launch.free_port(), out, ["--threads", "1"])
    return out, launch.wait_all([leader, *learners], 400)


@pytest.fixture(scope="session")
def tls_run(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> tuple[Path, list[int | None]]:
    """TLS_RUN to its end: a leader and two learners under mutual TLS, the token in FL_TOKEN (not a flag); the two
    in one process (--virtual 2: the tests are about the leader, and a pool's server takes TLS as a learner's)."""
    out = tmp_path_factory.mktemp("tls")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(guard.TOKEN_VARIABLE, TOKEN)
        leader_flags, learner_flags = [*TLS_RUN, *tls_flags(certs, "leader")], tls_flags(certs, "learner")
        return out, run_federation(out, 2, leader_flags, learner_flags, virtual=2)
