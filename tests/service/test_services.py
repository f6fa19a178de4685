"""Live gRPC servers on localhost: the leader's and learner's RPCs, their refusals, and standard tooling.

Refusals are checked where rounds really happen (tests/support/live.py): each test closes rounds and compares
the leader's model with a reference stepped with only the gradients that should count.
"""

import json
import re
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federated.core.plan import TrainingPlan
from federated.leader import cli as leader_cli
from federated.leader import config as leader_flags
from federated.leader.metrics import MetricsLog
from federated.leader.registry import MAX_MISSED_ROUNDS
from federated.learner import app as learner_module
from federated.learner import data as learner_data
from federated.learner import session as learner_session
from federated.learner import state as learner_state
from federated.net import rpc
from federated.net.rpc import leader_pb2, learner_pb2, learner_pb2_grpc
from federated.tools import launch
from federated.wire import codec, framing, messages
from federated.wire.messages import StateInfo
from tests.support.live import LR, LiveLeader, learner_config, model_hash


def test_registration_assigns_ids_and_credentials_and_refuses_past_the_limit(live):
    first, second = live.register("127.0.0.1:7001"), live.register("127.0.0.1:7002")
    assert (first.success, first.learner_id, first.max_learners) == (True, 0, 2)
    assert (second.success, second.learner_id) == (True, 1)
    assert len({first.credential, second.credential}) == 2 and len(first.credential) >= 32
    with pytest.raises(grpc.RpcError) as error:
        live.register("127.0.0.1:7003")
    assert (
        error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and "all 2 learner slots are held" in error.value.details()
    )
    again = live.register("127.0.0.1:7001", credential=first.credential)
    assert (again.learner_id, again.credential) == (0, first.credential)


def test_registrations_past_the_first_twenty_are_counted_not_logged_one_by_one(tmp_path, port, caplog):
    leader = LiveLeader.start(tmp_path, port, "--learners", "25", "--batch-size", "8", "--image-size", "8")
    try:
        with caplog.at_level("INFO", logger="leader"):
            ids = [leader.register(f"127.0.0.1:{7000 + index}").learner_id for index in range(25)]
    finally:
        leader.stop()
    assert ids == list(range(25))
    lines = [record.getMessage() for record in caplog.records if "registered as learner" in record.getMessage()]
    # ids 0-19 one line each; then one line lets the next through, and the rest wait for the next interval's count
    assert len(lines) == 21 and lines[-1].startswith("127.0.0.1:7020 registered as learner 20"), lines[-3:]


@pytest.mark.parametrize("address", ["", "no-port", "host:99999", "h" * 5000 + ":1"])
def test_registration_refuses_malformed_addresses(live, address):
    reply = live.register(address)
    assert not reply.success and "network_addr" in reply.message and len(reply.message) < 200
    assert live.leader.registry.records() == []


def test_get_model_streams_the_checked_global_state(live):
    chunks = [message.chunk for message in live.stub.GetModel(leader_pb2.Empty(), timeout=10)]
    assert len(chunks) >= 2 and max(map(len, chunks)) <= framing.CHUNK_BYTES
    payload = codec.decode(b"".join(chunks))
    model = live.leader.global_model.model
    codec.check_matches(payload, learner_state.state_spec(model, torch.float32))
    assert payload.metadata["architecture"] == "resnet20" and payload.metadata["round"] == "0"


def get_data(live, address: str, credential: str | None = None) -> codec.Payload:
    request = leader_pb2.LearnerDataRequest(network_addr=address)
    messages = live.stub.GetData(request, timeout=10, metadata=rpc.with_credential(credential))
    return codec.decode(b"".join(message.chunk for message in messages))


def test_get_data_sends_the_registered_learners_shard_as_uint8_encoded_once(live):
    credential = live.register("127.0.0.1:7001").credential
    leader = live.leader
    shard = learner_data.shard_from_payload(get_data(live, "127.0.0.1:7001", credential), 10)
    assert len(shard) == 5000 and shard.images.dtype == torch.uint8
    assert torch.equal(shard.labels, leader.data.shards.train.labels[leader.data.shards.indices[0]])
    assert leader.data.shards.messages(0) is leader.data.shards.messages(0)  # one encoded copy, kept


def test_get_data_without_a_credential_needs_the_registered_address_and_its_ip(live):
    live.register("127.0.0.1:7001")
    live.register("10.9.8.7:7002")
    assert len(get_data(live, "127.0.0.1:7001").tensors["labels"]) == 5000  # a peer of the article's protos
    with pytest.raises(grpc.RpcError) as error:
        get_data(live, "10.9.8.7:7002")  # someone else's shard, asked from another IP
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED and rpc.CREDENTIAL_HEADER in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        get_data(live, "127.0.0.1:9")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "RegisterLearner" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        get_data(live, "127.0.0.1:7001", credential="forged")
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_gradient_before_start_or_after_drop_says_register_again(live):
    credential = live.register("127.0.0.1:7001").credential
    registry = live.leader.registry
    for change in (lambda: registry.drop(0, registry.take_joiners()[0].generation), lambda: None):
        with pytest.raises(grpc.RpcError) as error:
            live.accumulate(live.gradient(), credential)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "register again" in error.value.details()
        change()


def test_a_valid_gradient_is_counted_once_per_round(live):
    first, second = live.enrol(2)
    live.send_counted(live.gradient(0), first)
    duplicate = live.accumulate(live.gradient(0, scale=0.5), first)
    assert not duplicate.success and "duplicate" in duplicate.message
    stale = live.accumulate(live.gradient(1, round_index=3), second)
    assert not stale.success and "round 0 is open" in stale.message
    summary, refused = live.close_round()
    assert (summary.learners, summary.samples, refused) == (1, 8, None)
    live.send_counted(live.gradient(1, samples=3), second)
    assert live.close_round()[0].learners == 1


@pytest.mark.parametrize("answer", ["late", "never"])
def test_a_learner_that_answers_every_round_late_is_given_up_on_like_a_silent_one(live, answer):
    prompt, laggard = live.enrol(2)
    federation, collector, registry = live.leader.federation, live.leader.collector, live.leader.registry
    federation.open()
    live.send_counted(live.gradient(0), prompt)
    live.send_counted(live.gradient(1), laggard)
    live.close_round()
    for _ in range(MAX_MISSED_ROUNDS):
        federation.open()
        assert collector.missing() == [0, 1]
        live.send_counted(live.gradient(0), prompt)
        if answer == "late":  # a well-formed update for the round just closed: a sign of life, not of taking part
            reply = live.accumulate(live.gradient(1, round_index=collector.round - 1), laggard)
            assert not reply.success and f"round {collector.round} is open" in reply.message
        live.close_round()
    federation.open()
    assert collector.missing() == [0] and registry.given_up() == [1]  # the rounds wait for learner 1 no more
    live.send_counted(live.gradient(1), laggard)  # until an update of its counts
    live.close_round()
    federation.open()
    assert collector.missing() == [0, 1] and registry.given_up() == []


def header_only(header: dict) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text


def bad_gradients(live) -> dict:
    layout = live.leader.global_model.layout
    views = layout.wire_tensors(torch.zeros(layout.size))
    name = next(iter(views))
    variance = next(key for key in views if key.endswith("running_var"))
    nan = dict(views, **{name: torch.full_like(views[name], float("nan"))})
    wrong_shape = dict(views, **{name: torch.zeros(3)})
    wrong_dtype = dict(views, **{name: views[name].double()})
    renamed = {("x" + key if key == name else key): value for key, value in views.items()}
    negative = dict(views, **{variance: -torch.ones_like(views[variance])})
    deep = b"[" * 3_000 + b"]" * 3_000  # deeper than Python's recursion limit, shorter than a gradient's header
    huge = b"\xff" * (512 << 10)  # not even JSON: refused for its length alone, before anything parses it
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return {
        "garbage": (b"\x00garbage", invalid, "ends inside|exceeds"),
        "truncated": (live.gradient(1)[:-5], invalid, "describe"),
        "nan": (live.gradient(1, tensors=nan), invalid, "NaN or Inf"),
        "shape": (live.gradient(1, tensors=wrong_shape), invalid, "expected F32"),
        "dtype": (live.gradient(1, tensors=wrong_dtype), invalid, "F64"),
        "names": (live.gradient(1, tensors=renamed), invalid, "missing"),
        "negative variance": (live.gradient(1, tensors=negative), invalid, "negative variance"),
        "zero samples": (live.gradient(1, samples=0), invalid, "samples"),
        "negative samples": (live.gradient(1, samples=-4), invalid, "samples"),
        "samples beyond the batch": (live.gradient(1, samples=10**17), invalid, "exceeds the batch of 8"),
        "a loss that is no number": (live.gradient(1, loss="much"), invalid, "loss"),
        "no learner id": (codec.encode(views, {"round": "0"}), invalid, "learner_id"),
        "another learner's id": (live.gradient(0), invalid, "not the caller's slot, 1"),
        "shape overflowing torch": (
            header_only({"t": {"dtype": "F32", "shape": [0, 10**30], "data_offsets": [0, 0]}}),
            invalid,
            "more than",
        ),
        "shape overflowing int64": (
            header_only({"t": {"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}}),
            invalid,
            "more than",
        ),
        "deep JSON": (struct.pack("<Q", len(deep)) + deep, invalid, "not valid JSON"),
        "huge header": (struct.pack("<Q", len(huge)) + huge, invalid, f"header length {len(huge)} exceeds the"),
        "huge integer": (
            header_only({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).replace(
                b"[1]", b"[" + b"9" * 5000 + b"]"
            ),
            invalid,
            "not valid JSON",
        ),
        "oversized": (
            b"\x00" * (live.leader.global_model.gradient_payload_bytes() + rpc.ENVELOPE_BYTES + 1),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "",
        ),
    }


def test_bad_gradients_get_a_specific_status_and_are_not_counted(live):
    credentials = live.enrol(2)
    for case, (chunk, code, message) in bad_gradients(live).items():
        live.send_counted(live.gradient(0), credentials[0])
        with pytest.raises(grpc.RpcError) as error:
            live.accumulate(chunk, credentials[1])
        assert error.value.code() == code, case
        assert re.search(message, error.value.details() or ""), (case, error.value.details())
        assert len(error.value.details() or "") < 500, case
        summary, refused = live.close_round()
        assert (summary.learners, refused) == (1, None), case
    live.send_counted(live.gradient(1), credentials[1])  # the leader still counts the learner it refused
    assert live.close_round()[0].learners == 1


def test_gradients_without_the_callers_credential_are_refused_and_not_counted(live):
    real = live.enrol(2)
    for credential, code in (
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("forged", grpc.StatusCode.UNAUTHENTICATED),
        (real[1], grpc.StatusCode.INVALID_ARGUMENT),
    ):  # nothing, a guess, learner 1's own
        with pytest.raises(grpc.RpcError) as error:
            live.accumulate(live.gradient(0), credential)
        assert error.value.code() == code, credential
    live.send_counted(live.gradient(0), real[0])  # the real learner 0 is not answered "duplicate"
    summary, _ = live.close_round()
    assert summary.learners == 1


def test_registering_an_active_learners_address_does_not_evict_it(live):
    real = live.enrol(2)
    address = live.leader.registry.members()[0].address
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as error:
            live.register(address, credential="stolen?")
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "still counts on" in error.value.details()
    assert live.leader.registry.is_active(0)
    live.send_counted(live.gradient(0), real[0])
    assert live.close_round()[0].learners == 1
    again = live.register(address, credential=real[0])  # its holder may
    assert again.success and again.learner_id == 0


def test_a_round_that_would_make_the_model_non_finite_is_discarded(live):
    credentials = live.enrol(2)
    before = model_hash(live.leader.global_model.model)
    for learner_id, credential in enumerate(credentials):  # finite, but their weighted sum overflows float32
        live.send_counted(live.gradient(learner_id, samples=8, scale=3e38), credential)
    summary, refused = live.close_round()
    assert summary.learners == 2 and "NaN or Inf" in refused
    assert model_hash(live.leader.global_model.model) == before
    live.send_counted(live.gradient(0), credentials[0])
    assert live.close_round()[1] is None and model_hash(live.leader.global_model.model) != before


@pytest.mark.parametrize("message", [b"\x0a\x05abc", b"\x0b", b"\x0a" + b"\xff" * 11])
def test_a_gradient_message_that_is_not_protobuf_is_invalid_and_not_counted(live, message, caplog):
    credentials = live.enrol(2)
    live.send_counted(live.gradient(0), credentials[0])
    send_raw = framing.unary_call(live.channel, rpc.LEADER_SERVICE, "AccumulateGradients", leader_pb2.Ack)
    with pytest.raises(grpc.RpcError) as error:
        send_raw(message, timeout=10, metadata=rpc.with_credential(credentials[1]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not parse" in error.value.details()
    assert live.close_round()[0].learners == 1
    assert "Traceback" not in caplog.text  # grpcio logs one for every request its parser refuses


def test_a_registration_or_health_check_that_is_not_protobuf_is_invalid(live):
    for method in (f"/{rpc.LEADER_SERVICE}/RegisterLearner", "/grpc.health.v1.Health/Check"):
        with pytest.raises(grpc.RpcError) as error:
            live.channel.unary_unary(method)(b"\x0a\x05abc", timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method


@pytest.mark.parametrize("poison", ["huge gradient", "aimed at one tensor", "huge statistic"])
def test_a_finite_but_absurd_update_is_discarded_before_it_wrecks_the_run(live, poison):
    credentials = live.enrol(2)
    layout = live.leader.global_model.layout
    flat = torch.full((layout.size,), 1e-3)
    if poison == "huge gradient":
        flat[: layout.parameter_count] = 1e30
    elif poison == "aimed at one tensor":  # under the whole model's norm, but 40 times fc.bias's (or 1)
        flat[layout.parameter_count - 10 : layout.parameter_count] = 40 / LR / 10**0.5
    else:
        flat[layout.parameter_count :] = 1e30  # running means and variances
    before = model_hash(live.leader.global_model.model)
    live.send_counted(live.gradient(0, tensors=layout.wire_tensors(flat)), credentials[0])
    live.send_counted(live.gradient(1), credentials[1])
    summary, refused = live.close_round()
    assert summary.learners == 2 and "the step would change" in refused, refused
    assert model_hash(live.leader.global_model.model) == before


def test_a_stop_request_gives_up_the_open_round_and_checkpoints_the_rounds_done(live):
    # SIGINT and SIGTERM set leader.stopping (federated/leader/cli.py); the round loop looks at it while it waits
    # for a round's updates, as Leader.run then stops: an update already in is not applied, a resume redoes the round
    credentials = live.enrol(2)
    assert live.accumulate(live.gradient(0), credentials[0]).success  # learner 1's never comes
    before, leader = model_hash(live.leader.global_model.model), live.leader
    with ThreadPoolExecutor(1) as pool:
        rounds = pool.submit(leader.rounds.train, MetricsLog(leader.out / "metrics.jsonl"))
        deadline = time.monotonic() + 10
        while leader.collector.missing() != [1] and time.monotonic() < deadline:  # round 0 waits for learner 1
            time.sleep(0.05)
        leader.stopping.set()
        assert rounds.result(timeout=10) == 0
    leader.stop(0)
    saved = torch.load(leader.out / "checkpoint.pt", weights_only=True)
    assert saved["round"] == 0 and model_hash(leader.global_model.model) == before
    assert all(
        torch.equal(saved["model"][name], value) for name, value in leader.global_model.model.state_dict().items()
    )
    assert StateInfo.from_payload(codec.decode(leader.global_model.encoded_state)).stopped
    assert (leader.out / "metrics.jsonl").read_text() == ""  # no round was recorded


def test_starting_a_learner_never_holds_up_the_round_loop(tmp_path, port):
    live = LiveLeader.start(tmp_path, port, "--learners", "1", "--sync-timeout", "2")
    try:
        with socket.socket() as tarpit:  # accepts connections and never says a word
            tarpit.bind(("127.0.0.1", 0))
            tarpit.listen(8)
            address = f"127.0.0.1:{tarpit.getsockname()[1]}"
            credential = live.register(address).credential
            started = time.monotonic()
            live.leader.federation.admit_joiners()
            assert time.monotonic() - started < 0.5
            with pytest.raises(grpc.RpcError) as error:  # re-registering is no way to start it again and again
                live.register(address, credential)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "being started" in error.value.details()
            deadline = time.monotonic() + 10
            while live.leader.registry.is_active(0) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not live.leader.registry.is_active(0)  # StartTraining timed out: dropped, slot kept for it
    finally:
        live.stop()


def test_health_reflection_and_sessions_describe_the_leader(live):
    health = health_pb2_grpc.HealthStub(live.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="leader.LeaderService"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    credential = live.enrol(1)[0]
    session = health_pb2.HealthCheckRequest(service=rpc.SESSION_PREFIX + rpc.session_id(credential))
    assert health.Check(session, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    live.leader.registry.drop(0, live.leader.registry.members()[0].generation)
    assert health.Check(session, timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
    for unknown in ("0" * 32, "é" * 40):
        with pytest.raises(grpc.RpcError) as error:
            health.Check(health_pb2.HealthCheckRequest(service=rpc.SESSION_PREFIX + unknown), timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    watch = list(health.Watch(health_pb2.HealthCheckRequest(service="leader.LeaderService"), timeout=10))
    assert [reply.status for reply in watch] == [health_pb2.HealthCheckResponse.SERVING]  # once, then the end
    reflection = reflection_pb2_grpc.ServerReflectionStub(live.channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {service.name for response in responses for service in response.list_services_response.service}
    assert {"leader.LeaderService", "grpc.health.v1.Health"} <= names


@pytest.fixture
def live_learner(live):
    """A real learner connected to the live leader, with its LearnerService up."""
    pool = learner_module.Learner(learner_config(["--leader", live.address, "--host", "127.0.0.1"])).connect()
    assert isinstance(pool, learner_module.Pool)
    learner = pool.members[0]
    channel = rpc.channel(learner.server.address, max_receive_bytes=1 << 20)
    yield learner, learner_pb2_grpc.LearnerServiceStub(channel)
    channel.close()
    pool.stop(0)


def test_learner_registers_and_gets_its_shard(live, live_learner):
    leader = live.leader
    learner, _ = live_learner
    assert leader.registry.at(learner.server.address).learner_id == learner.learner_id
    assert torch.equal(
        learner.data.labels, leader.data.shards.train.labels[leader.data.shards.indices[learner.learner_id]]
    )


def test_a_second_leader_or_learner_on_a_taken_port_is_refused(live, live_learner, tmp_path):
    # gRPC's servers share a port by default (SO_REUSEPORT): the second would start and split the callers
    # The second leader is refused before it touches the first one's folder (a new run sets an earlier one aside)
    leader_port, out = live.address.rsplit(":", 1)[1], live.leader.out
    before = sorted(path.name for path in out.iterdir())
    dataless = ["--dataset", "none", "--num-classes", "10", "--learners", "3", "--out", str(out)]
    with pytest.raises(rpc.ListenError, match=f"^port {leader_port} is already in use$") as taken:
        leader_cli.build(leader_flags.command_line([*dataless, "--host", "127.0.0.1", "--port", leader_port]), True)
    assert taken.value.in_use and sorted(path.name for path in out.iterdir()) == before
    learner, _ = live_learner
    again = learner_config(["--leader", live.address, "--host", "127.0.0.1", "--port", str(learner.server.port)])
    with pytest.raises(rpc.ListenError, match=f"^port {learner.server.port} is already in use$"):
        learner_module.Learner(again).connect()
    with pytest.raises(rpc.ListenError, match=re.escape("cannot listen on 192.0.2.1:0")) as elsewhere:
        rpc.start_server("192.0.2.1:0", [], [], 1 << 20)  # an address that is not this machine's
    assert not elsewhere.value.in_use


def leader_call(learner) -> list[tuple[str, str]]:
    """Call metadata as the learner's leader sends it."""
    return rpc.with_credential(learner.session.credential.value)


def test_learner_refuses_bad_model_states_and_keeps_its_model(live, live_learner):
    learner, stub = live_learner
    state = {k: v.clone() for k, v in live.leader.global_model.model.state_dict().items()}
    name = next(iter(state))
    bad = {
        "garbage": b"not a payload",
        "nan": codec.encode(dict(state, **{name: torch.full_like(state[name], float("inf"))}), {"round": "1"}),
        "shape": codec.encode(dict(state, **{name: torch.zeros(1)}), {"round": "1"}),
        "no round": codec.encode(state, {}),
        "a plan beyond --max-local-steps": codec.encode(
            state, {"round": "1", **messages.plan_to_metadata(TrainingPlan("fedavg", 10**17, 0.1))}
        ),
        "own epochs beyond --max-local-steps on its shard": codec.encode(
            state,
            {
                "round": "1",
                "batch_size": "1",
                **messages.plan_to_metadata(TrainingPlan("fedavg", 1, 0.1, local_epochs=1000.0)),
            },
        ),
        "huge header": codec.encode(state, {"round": "1", "padding": " " * (1 << 20)}),  # refused unparsed
        "a codec it does not know": codec.encode(state, {"round": "1", "compress": "zstd"}),
    }
    before = [t.clone() for t in learner.replica.model.state_dict().values()]
    for case, chunk in bad.items():
        reply = stub.SyncModelState(learner_pb2.ModelState(chunk=chunk), timeout=10, metadata=leader_call(learner))
        assert not reply.success and "rejected" in reply.message, case
        assert case != "huge header" or "exceeds the" in reply.message, reply.message
        assert not case.startswith("own epochs") or "passes over its" in reply.message, reply.message
        assert not case.startswith("a codec") or "unknown codec 'zstd'" in reply.message, reply.message
    assert all(torch.equal(a, b) for a, b in zip(before, learner.replica.model.state_dict().values()))
    assert learner.server.inbox.take(0, timeout=0) is None
    good = codec.encode(state, {"round": "1"})
    assert stub.SyncModelState(learner_pb2.ModelState(chunk=good), timeout=10, metadata=leader_call(learner)).success
    assert learner.server.inbox.take(0, timeout=0) is not None


def test_learner_takes_states_and_orders_only_with_its_leaders_credential(live, live_learner):
    learner, stub = live_learner
    state = codec.encode(live.leader.global_model.model.state_dict(), {"round": "7"})
    for metadata in ([], rpc.with_credential("forged")):
        for call in (
            partial(stub.SyncModelState, learner_pb2.ModelState(chunk=state), timeout=10, metadata=metadata),
            partial(stub.StartTraining, learner_pb2.Empty(), timeout=10, metadata=metadata),
        ):
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert (
                error.value.code() == grpc.StatusCode.PERMISSION_DENIED and "only the leader" in error.value.details()
            )
    assert learner.server.inbox.take(0, timeout=0) is None and not learner.server.started.is_set()
    assert stub.StartTraining(learner_pb2.Empty(), timeout=10, metadata=leader_call(learner)).success
    assert learner.server.started.is_set()


def test_a_dropped_learner_learns_it_from_the_leaders_health_service(live, live_learner):
    learner, _ = live_learner
    learner.session.check_leader()  # registered: nothing to say
    registry = live.leader.registry
    registry.drop(learner.learner_id, registry.at(learner.server.address).generation)
    with pytest.raises(learner_session.LeaderLost, match="the leader dropped this learner"):
        learner.session.check_leader()


def test_a_learner_whose_gradient_is_refused_says_so(live, live_learner):
    learner, _ = live_learner
    live.leader.registry.take_joiners()
    learner.replica.plan = TrainingPlan(local_steps=2)  # more than the leader asked for: this learner's own bug
    with pytest.raises(
        learner_session.GradientRefused, match="refused this learner's update for round 0: INVALID_ARGUMENT"
    ):
        learner.send_update(0, 1.0, learner.round_plan())


def test_learner_serves_health_checks_and_its_session(live_learner):
    learner, _ = live_learner
    health = health_pb2_grpc.HealthStub(rpc.channel(learner.server.address))
    reply = health.Check(health_pb2.HealthCheckRequest(service="learner.LearnerService"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    session = rpc.SESSION_PREFIX + rpc.session_id(learner.session.credential.value)
    assert health.Check(health_pb2.HealthCheckRequest(service=session), timeout=10).status == reply.status
    with pytest.raises(grpc.RpcError) as error:
        health.Check(health_pb2.HealthCheckRequest(service=rpc.SESSION_PREFIX + "f" * 32), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    """A live leader with one started learner, shared by every generated example."""
    live = LiveLeader.start(tmp_path_factory.mktemp("fuzz"), launch.free_port(), "--learners", "1", "--batch-size", "8")
    yield live, live.enrol(1)[0]
    live.stop()


REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def send_in_a_round(fuzz_target, chunk: bytes) -> None:
    """A round in which the learner sends chunk, then a valid gradient; the leader must count exactly one of
    them (chunk, if it acknowledged it) and refuse the other or ignore it as a duplicate."""
    live, credential = fuzz_target
    try:
        if live.accumulate(chunk, credential).success:
            live.expect_counted(chunk)
    except grpc.RpcError as error:
        assert error.code() in REFUSALS, (error.code(), error.details())
    valid = live.gradient(0)
    if live.accumulate(valid, credential).success:
        live.expect_counted(valid)
    assert live.close_round()[0].learners == 1


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=4096))
def test_live_leader_refuses_random_bytes_and_counts_only_valid_gradients(fuzz_target, chunk):
    send_in_a_round(fuzz_target, chunk)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=6),
    st.sampled_from([None, 100, 4096, -1]),
)
def test_live_leader_handles_mutated_gradients_and_counts_only_valid_ones(fuzz_target, mutations, cut):
    live = fuzz_target[0]
    data = bytearray(live.gradient(0))
    for position, value in mutations:
        data[position] = value
    send_in_a_round(fuzz_target, bytes(data[:cut] if cut else data))


def test_a_peer_whose_health_service_knows_no_sessions_is_not_taken_for_gone():
    from concurrent import futures

    from grpc_health.v1 import health as grpc_health

    from federated.leader import dispatch

    standard = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(grpc_health.HealthServicer(), standard)
    ours, ours_port = rpc.start_server("127.0.0.1:0", [], [], 1 << 20, sessions=lambda session: None)
    standard_port = standard.add_insecure_port("127.0.0.1:0")
    standard.start()
    try:
        request = health_pb2.HealthCheckRequest(service=rpc.SESSION_PREFIX + "0" * 32)
        for port, verdict in ((standard_port, dispatch.THERE), (ours_port, dispatch.GONE)):
            call = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}")).Check.future(
                request, timeout=5
            )
            assert dispatch.probe_verdict(call)[0] == verdict
    finally:
        standard.stop(0)
        ours.stop(0)


def test_a_learner_whose_address_refuses_connections_is_dropped_and_its_slot_freed(live):
    live.enrol(2)
    registry = live.leader.registry
    live.hosts[0].stop(0)  # the first learner's process is gone: its port refuses connections
    deadline = time.monotonic() + 10
    while registry.is_active(0) and time.monotonic() < deadline:
        live.leader.federation.probe([0, 1])  # as a round waiting for them does; twice refused, 2 s apart, means gone
        time.sleep(0.2)
    assert not registry.is_active(0) and registry.is_active(1)
    assert live.register("127.0.0.1:7999").learner_id == 0  # a newcomer takes the freed slot at once


def test_a_learner_the_leader_cannot_dial_is_dropped_and_told_why_when_it_registers_again(live, caplog):
    address = f"127.0.0.1:{launch.free_port()}"  # the address it advertises: nothing listens there
    credential = live.register(address).credential
    registry = live.leader.registry
    live.leader.federation.admit_joiners()  # StartTraining finds nothing at the address
    deadline = time.monotonic() + 10
    while registry.is_active(0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not registry.is_active(0)
    assert "cannot reach learner 0 at " + address in caplog.text and "--advertise" in caplog.text
    [why] = re.findall(r"the address it registered \((StartTraining failed: UNAVAILABLE[^)]*)\)", caplog.text)
    reply = live.register(address, credential)  # from there it would only be dropped again
    assert not reply.success and f"cannot reach this learner at {address}" in reply.message, reply.message
    # what a dial of any HOST:PORT found (refused, no route, no handshake) stays in the leader's log: no port scans
    assert "UNAVAILABLE" not in reply.message and why.split(": ", 1)[1][:40] not in reply.message
    assert "--advertise" in reply.message and "the leader's log says why" in reply.message
    newcomers = [live.register(f"127.0.0.1:{port}").learner_id for port in (7998, 7999)]
    assert sorted(newcomers) == [0, 1]  # its slot is free at once


def test_nobody_can_make_an_address_look_unreachable_to_the_learner_that_listens_there(live):
    """An attacker registers a victim's address while nothing listens there, so that the leader's channel to
    it fails and backs off; the victim then listens and registers: its start dials afresh and reaches it."""
    address, registry = f"127.0.0.1:{launch.free_port()}", live.leader.registry
    for _ in range(3):
        live.register(address)
        live.leader.federation.admit_joiners()
        deadline = time.monotonic() + 10
        while registry.is_active(0) and time.monotonic() < deadline:
            time.sleep(0.05)
    victim, _ = rpc.start_server(address, [], [], 1 << 20)  # listening (without the learner service: it answers)
    live.hosts.append(victim)
    credential = live.register(address).credential
    live.leader.federation.admit_joiners()
    deadline = time.monotonic() + 10
    while registry.is_active(0) and time.monotonic() < deadline:
        time.sleep(0.05)
    reply = live.register(address, credential)
    assert reply.success, reply.message  # not told that the leader cannot reach it
