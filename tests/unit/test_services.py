"""The pure parts of the leader's and learner's services: a fetched state adopted in place, the caller's IP
read from grpcio's peer string, a registered address matched against it, a learner's session status, and whom a
learner gives its leader's turns."""

import pytest
import torch
from grpc_health.v1 import health_pb2

from federated.core.layout import GradientLayout
from federated.leader import servicer
from federated.learner import session as learner_session
from federated.learner import state as learner_state
from federated.net import guard, rpc
from federated.wire import codec
from model import build_model


def test_a_fetched_state_becomes_the_models_memory_keeping_its_parameters_and_gradients():
    torch.manual_seed(0)
    model, source = build_model("resnet20"), build_model("resnet20")
    layout = GradientLayout(model)
    gradient = torch.zeros(layout.size)
    layout.bind_gradients(gradient)
    parameters = list(model.parameters())
    data = codec.encode(source.state_dict())
    payload = codec.receive([data[:1000], data[1000:]], len(data), check_finite=True)
    learner_state.load_state(model, payload, take_over=True)
    assert all(now is before for now, before in zip(model.parameters(), parameters))
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in source.state_dict().items())
    start = payload.buffer.ctypes.data
    assert all(start <= t.data_ptr() < start + len(payload.buffer) for t in model.state_dict().values() if t.numel())
    start = gradient.data_ptr()
    assert all(start <= p.grad.data_ptr() < start + gradient.numel() * 4 for p in model.parameters())
    learner_state.load_state(model, codec.decode(codec.encode(model.state_dict())))  # a later, copying load
    assert torch.equal(model.fc.weight, source.fc.weight)


class Peer:
    """What guard.peer_host reads of a server context: the peer string grpcio gives."""

    def __init__(self, peer: str) -> None:
        self.peer = lambda: peer


@pytest.mark.parametrize(
    "peer, host",
    [
        ("ipv4:10.0.0.2:5000", "10.0.0.2"),
        ("ipv6:%5B::1%5D:39414", "::1"),
        ("ipv6:[fe80::1]:1", "fe80::1"),
        ("unix:/tmp/socket", None),
    ],
)
def test_the_callers_ip_is_read_from_grpcs_peer_string(peer, host):
    assert guard.peer_host(Peer(peer)) == host


@pytest.mark.parametrize(
    "address, peer, same",
    [
        ("127.0.0.1:7001", "127.0.0.1", True),
        ("[::1]:7001", "::1", True),
        ("10.0.0.2:1", "::ffff:10.0.0.2", True),
        ("10.0.0.2:1", "10.0.0.3", False),
        ("localhost:7001", "127.0.0.1", False),
        ("10.0.0.2:1", None, False),
    ],
)
def test_a_registered_address_matches_only_its_own_ip(address, peer, same):
    assert servicer.same_host(address, peer) == same


def test_a_learner_registering_does_not_look_gone_to_the_leaders_health_check():
    credential = learner_session.LeaderCredential()
    assert credential.session_status("0" * 32) is None  # not registered: any session it is asked about is not its own
    with credential.registering():  # the leader may check on it before the reply is here
        assert credential.session_status("0" * 32) == health_pb2.HealthCheckResponse.SERVING
    assert credential.session_status("0" * 32) is None


def test_a_learner_gives_the_leaders_turns_only_to_the_credential_it_registered_with():
    credential = learner_session.LeaderCredential()
    anyone = ({}, {rpc.CREDENTIAL_HEADER: ""}, {rpc.CREDENTIAL_HEADER: "forged"})
    assert all(credential.caller(headers) is None for headers in anyone)  # not registered: nobody is its leader
    credential.registered("secret")
    assert credential.caller({rpc.CREDENTIAL_HEADER: "secret"}) == "leader"
    assert all(credential.caller(headers) is None for headers in anyone)
    article = learner_session.LeaderCredential()
    article.registered("")  # a leader built from the article's protos gives no credential
    assert all(article.caller(headers) is None for headers in anyone)  # its calls take the turns of callers without
    assert article.refusal(NoCredential()) is None  # ... and are served


class NoCredential:
    """The call context of a caller that sends no credential (all refusal reads of it)."""

    def invocation_metadata(self) -> tuple:
        return ()
