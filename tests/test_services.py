"""Live gRPC servers on localhost: the leader's and learner's RPCs, their refusals, and standard tooling."""

import hashlib
import re
from types import SimpleNamespace

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import fedsgd
import launch
import leader as leader_module
import learner as learner_module
import rpc
import wire
from model import build_model
from rpc import leader_pb2, leader_pb2_grpc, learner_pb2, learner_pb2_grpc


@pytest.fixture
def live_leader(tmp_path, port):
    """A real leader (capacity 2, synthetic data) serving on localhost, without its round loop."""
    args = leader_module.parse_args(["--learners", "2", "--dataset", "synthetic", "--host", "127.0.0.1",
                                     "--port", str(port), "--out", str(tmp_path)])
    leader = leader_module.Leader(args)
    server = leader.serve()
    channel = rpc.channel(f"127.0.0.1:{port}")
    yield SimpleNamespace(leader=leader, stub=leader_pb2_grpc.LeaderServiceStub(channel), channel=channel,
                          address=f"127.0.0.1:{port}")
    channel.close()
    server.stop(0)


def model_hash(leader) -> str:
    state = leader.global_model.model.state_dict()
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in state.values())).hexdigest()


def register(stub, address: str):
    return stub.RegisterLearner(leader_pb2.LearnerInfo(network_addr=address), timeout=10)


def gradient(leader, learner_id=0, round_index=0, samples=8, loss="1.5", tensors=None, **extra) -> bytes:
    layout = leader.global_model.layout
    tensors = tensors if tensors is not None else layout.views(torch.full((layout.size,), 0.01))
    metadata = {"learner_id": str(learner_id), "round": str(round_index), "samples": str(samples), "loss": loss, **extra}
    return wire.encode(tensors, metadata)


def accumulate(stub, chunk: bytes):
    return stub.AccumulateGradients(leader_pb2.GradientData(chunk=chunk), timeout=10)


def test_registration_assigns_ids_and_refuses_past_the_limit(live_leader):
    stub = live_leader.stub
    before = model_hash(live_leader.leader)
    first, second = register(stub, "127.0.0.1:7001"), register(stub, "127.0.0.1:7002")
    assert (first.success, first.learner_id, first.max_learners) == (True, 0, 2)
    assert (second.success, second.learner_id) == (True, 1)
    third = register(stub, "127.0.0.1:7003")
    assert not third.success and "already has its 2 learners" in third.message
    assert register(stub, "127.0.0.1:7001").learner_id == 0
    assert model_hash(live_leader.leader) == before


@pytest.mark.parametrize("address", ["", "no-port", "host:99999"])
def test_registration_refuses_malformed_addresses(live_leader, address):
    stub = live_leader.stub
    before = model_hash(live_leader.leader)
    reply = register(stub, address)
    assert not reply.success and "network_addr" in reply.message
    assert model_hash(live_leader.leader) == before and live_leader.leader.registry.addresses() == []


def test_get_model_streams_the_checked_global_state(live_leader):
    leader, stub = live_leader.leader, live_leader.stub
    chunks = [message.chunk for message in stub.GetModel(leader_pb2.Empty(), timeout=10)]
    assert len(chunks) >= 2 and max(map(len, chunks)) <= rpc.CHUNK_BYTES
    payload = wire.decode(b"".join(chunks))
    wire.check_matches(payload, wire.spec_of(leader.global_model.model.state_dict()))
    assert payload.metadata["architecture"] == "resnet20" and payload.metadata["round"] == "0"


def test_get_data_sends_the_registered_learners_shard_as_uint8(live_leader):
    leader, stub = live_leader.leader, live_leader.stub
    register(stub, "127.0.0.1:7001")
    request = leader_pb2.LearnerDataRequest(network_addr="127.0.0.1:7001")
    payload = wire.decode(b"".join(m.chunk for m in stub.GetData(request, timeout=10)))
    shard = learner_module.shard_from_payload(payload, 10)
    assert len(shard) == 5000 and shard.images.dtype == torch.uint8
    assert torch.equal(shard.labels, leader.train.labels[leader.shards[0]])


def test_get_data_from_an_unregistered_address_is_not_found(live_leader):
    stub = live_leader.stub
    before = model_hash(live_leader.leader)
    with pytest.raises(grpc.RpcError) as error:
        list(stub.GetData(leader_pb2.LearnerDataRequest(network_addr="127.0.0.1:9"), timeout=10))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "RegisterLearner" in error.value.details()
    assert model_hash(live_leader.leader) == before


def start(leader, stub, address: str = "127.0.0.1:7001") -> None:
    """Register and admit a learner, as the leader's round loop does."""
    register(stub, address)
    leader.registry.take_joiners()


def test_a_gradient_before_start_or_after_drop_says_register_again(live_leader):
    leader, stub = live_leader.leader, live_leader.stub
    register(stub, "127.0.0.1:7001")
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as error:
            accumulate(stub, gradient(leader))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "register again" in error.value.details()
        leader.registry.take_joiners()
        leader.registry.drop(0)


def test_a_valid_gradient_is_counted_once(live_leader):
    leader, stub = live_leader.leader, live_leader.stub
    start(leader, stub)
    assert accumulate(stub, gradient(leader)).success
    duplicate = accumulate(stub, gradient(leader))
    assert not duplicate.success and "duplicate" in duplicate.message
    stale = accumulate(stub, gradient(leader, round_index=3))
    assert not stale.success and "round 0 is open" in stale.message
    assert leader.collector.reported() == 1


def bad_gradients(leader):
    layout = leader.global_model.layout
    views = layout.views(torch.zeros(layout.size))
    name = next(iter(views))
    nan = dict(views, **{name: torch.full_like(views[name], float("nan"))})
    wrong_shape = dict(views, **{name: torch.zeros(3)})
    wrong_dtype = dict(views, **{name: views[name].double()})
    renamed = {("x" + key if key == name else key): value for key, value in views.items()}
    return {
        "garbage": (b"\x00garbage", grpc.StatusCode.INVALID_ARGUMENT, "shorter|exceeds"),
        "truncated": (gradient(leader)[:-5], grpc.StatusCode.INVALID_ARGUMENT, "describe"),
        "nan": (gradient(leader, tensors=nan), grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
        "shape": (gradient(leader, tensors=wrong_shape), grpc.StatusCode.INVALID_ARGUMENT, "expected F32"),
        "dtype": (gradient(leader, tensors=wrong_dtype), grpc.StatusCode.INVALID_ARGUMENT, "F64"),
        "names": (gradient(leader, tensors=renamed), grpc.StatusCode.INVALID_ARGUMENT, "missing"),
        "zero samples": (gradient(leader, samples=0), grpc.StatusCode.INVALID_ARGUMENT, "samples"),
        "negative samples": (gradient(leader, samples=-4), grpc.StatusCode.INVALID_ARGUMENT, "samples"),
        "nan loss": (gradient(leader, loss="nan"), grpc.StatusCode.INVALID_ARGUMENT, "loss"),
        "no learner id": (wire.encode(views, {"round": "0"}), grpc.StatusCode.INVALID_ARGUMENT, "learner_id"),
        "unknown learner": (gradient(leader, learner_id=7), grpc.StatusCode.NOT_FOUND, "no learner 7"),
        "oversized": (b"\x00" * (leader.global_model.gradient_payload_bytes() + rpc.ENVELOPE_BYTES + 1),
                      grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    }


def test_bad_gradients_get_a_specific_status_and_change_nothing(live_leader):
    leader, stub = live_leader.leader, live_leader.stub
    start(leader, stub)
    before = model_hash(leader)
    for case, (chunk, code, message) in bad_gradients(leader).items():
        with pytest.raises(grpc.RpcError) as error:
            accumulate(stub, chunk)
        assert error.value.code() == code, case
        assert re.search(message, error.value.details() or ""), (case, error.value.details())
    assert model_hash(leader) == before
    assert leader.collector.reported() == 0
    assert accumulate(stub, gradient(leader)).success  # the leader still serves


@pytest.mark.parametrize("message", [b"\x0a\x05abc", b"\x0b", b"\x0a" + b"\xff" * 11])
def test_a_gradient_message_that_is_not_protobuf_is_refused_and_changes_nothing(live_leader, message):
    leader, stub = live_leader.leader, live_leader.stub
    start(leader, stub)
    before = model_hash(leader)
    send_raw = rpc.unary_call(live_leader.channel, rpc.LEADER_SERVICE, "AccumulateGradients", leader_pb2.Ack)
    with pytest.raises(grpc.RpcError) as error:
        send_raw(message, timeout=10)
    assert error.value.code() == grpc.StatusCode.INTERNAL  # what grpcio answers when a request does not parse
    assert model_hash(leader) == before and leader.collector.reported() == 0
    assert accumulate(stub, gradient(leader)).success


def test_health_and_reflection_describe_the_leader(live_leader):
    channel = live_leader.channel
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="leader.LeaderService"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {service.name for response in responses for service in response.list_services_response.service}
    assert {"leader.LeaderService", "grpc.health.v1.Health"} <= names


@pytest.fixture
def live_learner(live_leader):
    """A real learner, constructed against the live leader, with its LearnerService up."""
    args = learner_module.parse_args(["--leader", live_leader.address, "--host", "127.0.0.1"])
    learner = learner_module.Learner(args)
    channel = rpc.channel(learner.address, max_receive_bytes=1 << 20)
    yield learner, learner_pb2_grpc.LearnerServiceStub(channel)
    channel.close()
    learner.server.stop(0)


def test_learner_registers_and_gets_its_shard(live_leader, live_learner):
    leader = live_leader.leader
    learner, _ = live_learner
    assert leader.registry.addresses()[learner.learner_id] == learner.address
    assert torch.equal(learner.data.labels, leader.train.labels[leader.shards[learner.learner_id]])


def test_a_fetched_state_becomes_the_models_memory_keeping_its_parameters_and_gradients():
    torch.manual_seed(0)
    model, source = build_model("resnet20"), build_model("resnet20")
    layout = fedsgd.GradientLayout(model)
    gradient = torch.zeros(layout.size)
    layout.bind_gradients(gradient)
    parameters = list(model.parameters())
    data = wire.encode(source.state_dict())
    payload = wire.receive([data[:1000], data[1000:]], len(data), check_finite=True)
    learner_module.load_state(model, payload, take_over=True)
    assert all(now is before for now, before in zip(model.parameters(), parameters))
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in source.state_dict().items())
    start = payload.buffer.ctypes.data
    assert all(start <= t.data_ptr() < start + len(payload.buffer) for t in model.state_dict().values() if t.numel())
    start = gradient.data_ptr()
    assert all(start <= p.grad.data_ptr() < start + gradient.numel() * 4 for p in model.parameters())
    learner_module.load_state(model, wire.decode(wire.encode(model.state_dict())))  # a later, copying load
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_learner_refuses_bad_model_states_and_keeps_its_model(live_leader, live_learner):
    leader = live_leader.leader
    learner, stub = live_learner
    state = {k: v.clone() for k, v in leader.global_model.model.state_dict().items()}
    name = next(iter(state))
    bad = {
        "garbage": b"not a payload",
        "nan": wire.encode(dict(state, **{name: torch.full_like(state[name], float("inf"))}), {"round": "1"}),
        "shape": wire.encode(dict(state, **{name: torch.zeros(1)}), {"round": "1"}),
        "no round": wire.encode(state, {}),
    }
    before = [t.clone() for t in learner.model.state_dict().values()]
    for case, chunk in bad.items():
        reply = stub.SyncModelState(learner_pb2.ModelState(chunk=chunk), timeout=10)
        assert not reply.success and "rejected" in reply.message, case
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.state_dict().values()))
    assert learner.inbox.take(1, timeout=0) is None
    good = stub.SyncModelState(learner_pb2.ModelState(chunk=wire.encode(state, {"round": "1"})), timeout=10)
    assert good.success and learner.inbox.take(1, timeout=0) is not None


def test_learner_start_training_sets_it_going(live_learner):
    learner, stub = live_learner
    assert stub.StartTraining(learner_pb2.Empty(), timeout=10).success
    assert learner.started.is_set()


def test_learner_serves_health_checks(live_learner):
    learner, _ = live_learner
    health = health_pb2_grpc.HealthStub(rpc.channel(learner.address))
    reply = health.Check(health_pb2.HealthCheckRequest(service="learner.LearnerService"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    """A live leader with one started learner, shared by every generated example."""
    port = launch.free_port()
    args = leader_module.parse_args(["--learners", "1", "--dataset", "synthetic", "--host", "127.0.0.1",
                                     "--port", str(port), "--out", str(tmp_path_factory.mktemp("fuzz"))])
    leader = leader_module.Leader(args)
    server = leader.serve()
    stub = leader_pb2_grpc.LeaderServiceStub(rpc.channel(f"127.0.0.1:{port}"))
    start(leader, stub)
    yield leader, stub, gradient(leader)
    server.stop(0)


REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}


def send_and_check_untouched(fuzz_target, chunk: bytes) -> None:
    leader, stub, _ = fuzz_target
    before = model_hash(leader)
    try:
        accumulate(stub, chunk)
    except grpc.RpcError as error:
        assert error.code() in REFUSALS, (error.code(), error.details())
    assert model_hash(leader) == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_live_leader_refuses_random_bytes_and_keeps_its_model(fuzz_target, chunk):
    send_and_check_untouched(fuzz_target, chunk)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=6),
       st.sampled_from([None, 100, 4096, -1]))
def test_live_leader_handles_mutated_gradients_and_keeps_its_model(fuzz_target, mutations, cut):
    data = bytearray(fuzz_target[2])
    for position, value in mutations:
        data[position] = value
    send_and_check_untouched(fuzz_target, bytes(data[:cut] if cut else data))
