"""TLS, mutual TLS and the shared token, on live servers."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federated.learner import app as learner_module
from federated.net import rpc
from federated.net.rpc import leader_pb2, leader_pb2_grpc, learner_pb2, learner_pb2_grpc
from federated.wire import codec
from tests.support.certs import TOKEN, tls_flags
from tests.support.live import leader_from, learner_config


def security(certs, name: str | None, token: str | None = None) -> rpc.Security:
    read = lambda file: (certs / file).read_bytes()
    if name is None:
        return rpc.Security(ca=read("ca.pem"), token=token)
    return rpc.Security(read(f"{name}.pem"), read(f"{name}.key"), read("ca.pem"), token)


@pytest.fixture
def secure_leader(tmp_path, port, certs):
    """A live leader requiring mutual TLS and the token."""
    leader = leader_from(
        [
            "--learners",
            "2",
            "--dataset",
            "synthetic",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--out",
            str(tmp_path),
            "--token",
            TOKEN,
            *tls_flags(certs, "leader"),
        ]
    )
    leader.registry.reregister_s = 0  # these tests register again at once
    server = leader.serve()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def register(address: str, credentials: rpc.Security, credential: str | None = None):
    stub = leader_pb2_grpc.LeaderServiceStub(rpc.channel(address, credentials))
    return stub.RegisterLearner(
        leader_pb2.LearnerInfo(network_addr="127.0.0.1:7001"), timeout=10, metadata=rpc.with_credential(credential)
    )


def test_leader_accepts_a_learner_certificate_with_the_token(secure_leader, certs):
    assert register(secure_leader, security(certs, "learner", TOKEN)).success


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_leader_refuses_a_missing_or_wrong_token(secure_leader, certs, token):
    with pytest.raises(grpc.RpcError) as error:
        register(secure_leader, security(certs, "learner", token))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED and "token" in error.value.details()


def test_under_mutual_tls_a_credential_holds_only_with_the_certificate_it_was_issued_with(secure_leader, certs):
    credential = register(secure_leader, security(certs, "learner", TOKEN)).credential
    with pytest.raises(grpc.RpcError) as error:  # another certificate of the same CA, with the stolen credential
        register(secure_leader, security(certs, "leader", TOKEN), credential)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "still counts on" in error.value.details()
    stub = leader_pb2_grpc.LeaderServiceStub(rpc.channel(secure_leader, security(certs, "leader", TOKEN)))
    with pytest.raises(grpc.RpcError) as error:
        list(
            stub.GetData(
                leader_pb2.LearnerDataRequest(network_addr="127.0.0.1:7001"),
                timeout=10,
                metadata=rpc.with_credential(credential),
            )
        )
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    again = register(secure_leader, security(certs, "learner", TOKEN), credential)
    assert again.success and again.credential == credential


def test_leader_refuses_a_client_without_a_certificate(secure_leader, certs):
    with pytest.raises(grpc.RpcError) as error:
        register(secure_leader, security(certs, None, TOKEN))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_leader_refuses_plaintext(secure_leader):
    with pytest.raises(grpc.RpcError) as error:
        register(secure_leader, rpc.Security(token=TOKEN))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_needs_tls_but_no_token(secure_leader, certs):
    health = health_pb2_grpc.HealthStub(rpc.channel(secure_leader, security(certs, "learner")))
    reply = health.Check(health_pb2.HealthCheckRequest(service="leader.LeaderService"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def secure_learner(secure_leader, certs):
    args = learner_config(
        ["--leader", secure_leader, "--host", "127.0.0.1", "--token", TOKEN, *tls_flags(certs, "learner")]
    )
    pool = learner_module.Learner(args).connect()
    assert isinstance(pool, learner_module.Pool)
    learner = pool.members[0]
    yield learner
    pool.stop(0)


def sync(learner, credentials: rpc.Security):
    """SyncModelState with the learner's own credential, so that only TLS and the token are in question."""
    stub = learner_pb2_grpc.LearnerServiceStub(rpc.channel(learner.server.address, credentials, 1 << 20))
    state = codec.encode(learner.replica.model.state_dict(), {"round": "5"})
    return stub.SyncModelState(
        learner_pb2.ModelState(chunk=state), timeout=10, metadata=rpc.with_credential(learner.session.credential.value)
    )


def start(learner, credentials: rpc.Security):
    stub = learner_pb2_grpc.LearnerServiceStub(rpc.channel(learner.server.address, credentials))
    return stub.StartTraining(
        learner_pb2.Empty(), timeout=10, metadata=rpc.with_credential(learner.session.credential.value)
    )


def test_learner_takes_orders_only_from_the_leaders_certificate(secure_learner, certs):
    for impostor in (security(certs, "learner", TOKEN), security(certs, "learner", None), rpc.Security(token=TOKEN)):
        for call in (sync, start):
            with pytest.raises(grpc.RpcError) as error:
                call(secure_learner, impostor)
            assert error.value.code() in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.UNAVAILABLE,
            )
    with pytest.raises(grpc.RpcError) as error:
        sync(secure_learner, security(certs, "learner", TOKEN))
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED and "only the leader" in error.value.details()
    assert not secure_learner.server.started.is_set()
    assert secure_learner.server.inbox.take(0, timeout=0) is None
    assert sync(secure_learner, security(certs, "leader", TOKEN)).success
    assert secure_learner.server.inbox.take(0, timeout=0) is not None
    assert start(secure_learner, security(certs, "leader", TOKEN)).success and secure_learner.server.started.is_set()


def test_learner_with_a_certificate_but_no_token_gets_unauthenticated(secure_learner, certs):
    with pytest.raises(grpc.RpcError) as error:
        sync(secure_learner, security(certs, "leader", None))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "host, tls, token, warning",
    [
        ("127.0.0.1", None, None, None),
        ("0.0.0.0", None, None, "anyone who can reach"),
        ("0.0.0.0", "server", None, "anyone who can reach"),
        ("0.0.0.0", None, TOKEN, "the token crosses the network"),
        ("0.0.0.0", "server", TOKEN, None),
        ("0.0.0.0", "mutual", None, None),
    ],
)
def test_a_server_reachable_beyond_loopback_says_who_can_call_it(caplog, certs, host, tls, token, warning):
    read = lambda file: (certs / file).read_bytes()
    tls_files = {
        None: (None, None, None),
        "server": (read("leader.pem"), read("leader.key"), None),
        "mutual": (read("leader.pem"), read("leader.key"), read("ca.pem")),
    }[tls]
    server, _ = rpc.start_server(f"{host}:0", [], [], 1 << 20, rpc.Security(*tls_files, token))
    server.stop(0)
    logged = [record.getMessage() for record in caplog.records if record.name == "rpc"]
    assert (warning is None and not logged) or (warning and any(warning in line for line in logged)), logged
