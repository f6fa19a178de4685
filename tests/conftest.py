"""Set-up for every test: one torch thread, each test marked with its tier (the folder it lives in), and the
throw-away certificates that TLS tests on localhost share.

Tiers: tests/unit (pure functions and objects: no servers, no processes), tests/service (gRPC servers in the
test process; no leader, learner or peer processes), tests/e2e (real leader, learner and peer processes).
`make test-fast` runs unit and service; `long` marks what is too long for `make test`. Helpers live in
tests/support, peer programs in tests/peers.
"""

from pathlib import Path

import pytest
import torch

from federated.tools import launch
from tests.support.certs import make_certs

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "service", "e2e")

# Tests run beside the leader and learner processes they start, on as few as two cores: torch's default of a
# thread per core would have them all compete for every core.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its folder's tier; a test outside the tier folders is an error, not a silent
    member of no tier (`-m unit` and friends would miss it)."""
    for item in items:
        tier = item.path.relative_to(TESTS).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/{{{','.join(TIERS)}}}/, by tier")
        item.add_marker(tier)


@pytest.fixture
def port() -> int:
    """A free port on localhost for the test's server or leader."""
    return launch.free_port()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates of a CA, a leader and a learner for localhost (tests/support/certs.py), made once."""
    return make_certs(tmp_path_factory.mktemp("certs"))
