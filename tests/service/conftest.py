"""Fixtures of the service tests: gRPC servers in the test process, on localhost."""

import pytest

from federated.tools import launch


@pytest.fixture
def port() -> int:
    """A free port on localhost for the test's server."""
    return launch.free_port()
