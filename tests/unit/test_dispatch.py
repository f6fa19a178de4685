"""The server of a process's learners (learner/dispatch.py) without sockets: health checks of registrations its
learners left."""

import threading
from types import SimpleNamespace

from grpc_health.v1 import health_pb2

from federated.learner.dispatch import Directory, PoolServer
from federated.learner.session import LeaderCredential
from federated.net import rpc


def test_a_registration_a_learner_left_is_gone_even_while_another_registers():
    """While any learner of the pool registered, a health check of an unknown session got SERVING (the leader may
    ask before the learner has its reply): a registration that a learner left, by rejoining in another slot, went
    on looking alive to the leader for as long as the pool's 1,000 registrations took."""
    learners = [SimpleNamespace(credential=LeaderCredential(), stopped=threading.Event()) for _ in range(2)]
    directory = Directory(learners)  # type: ignore[arg-type]
    server = SimpleNamespace(directory=directory)
    learners[0].credential.registered("first-credential-of-learner-0")
    left = rpc.session_id("first-credential-of-learner-0")
    assert directory.holder(left) is learners[0]
    learners[0].credential.registered("its-credential-after-rejoining")
    learners[1].credential.in_flight = True  # the other learner's registration is on its way
    unknown = rpc.session_id("a-registration-on-its-way")
    assert PoolServer.session_status(server, unknown) == health_pb2.HealthCheckResponse.SERVING  # type: ignore[arg-type]
    assert PoolServer.session_status(server, left) is None  # type: ignore[arg-type]
    assert directory.find("first-credential-of-learner-0", wait=True) is None  # no wait for a left registration
