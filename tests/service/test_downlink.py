"""--compress-down over real gRPC in the test process: a live learner servicer takes a full state of the leader's
replica as its reference, refuses a hostile leader's deltas with its reference and inbox untouched, and takes a
good delta from the leader's dispatch (LearnerClient), which lands in its inbox bit-exact."""

import threading

import pytest
import torch

from federated.core.compression.codecs import INDEX_OFFSET
from federated.core.compression.delta import apply_delta, make_delta, round_generator, state_hash
from federated.core.layout import wire_state
from federated.leader.dispatch import LearnerClient
from federated.leader.downlink import Downlink
from federated.leader.registry import Member
from federated.learner.limits import Limits
from federated.learner.servicer import ADD_LEARNER_SERVICE, LearnerServicer, StateInbox, method_limits
from federated.learner.session import LeaderCredential
from federated.learner.state import state_spec
from federated.net import rpc
from federated.net.rpc import learner_pb2, learner_pb2_grpc
from federated.wire import codec, framing
from federated.wire.messages import DELTA_KEYS, DeltaInfo
from model import build_model

HUGE = 3e38  # a finite float32 that, added to itself, is not
BIG = "layers.8.conv1.weight"  # compressed (64 x 64 x 3 x 3)
VARIANCE = "layers.8.bn1.running_var"  # whole in every delta


@pytest.fixture
def learner():
    """A live learner servicer for ResNet-20 in float32, and a stub and Member to call it as its leader."""
    credential = LeaderCredential()
    credential.registered("credential")
    servicer = LearnerServicer(
        state_spec(build_model("resnet20"), torch.float32),
        StateInbox(),
        threading.Event(),
        credential,
        None,
        Limits(64, 64, 100, 1 << 30),
    )
    server, port = rpc.start_server(
        "127.0.0.1:0",
        [(ADD_LEARNER_SERVICE, servicer)],
        [rpc.LEARNER_SERVICE],
        8 << 20,
        limits=method_limits(30),
        identify=credential.caller,
        named_callers=1,
    )
    channel = rpc.channel(f"127.0.0.1:{port}")
    yield servicer, learner_pb2_grpc.LearnerServiceStub(channel), Member(0, f"127.0.0.1:{port}", "credential", 1)
    channel.close()
    server.stop(0)


def push(stub, chunk: bytes) -> learner_pb2.Ack:
    return stub.SyncModelState(
        learner_pb2.ModelState(chunk=chunk), timeout=10, metadata=rpc.with_credential("credential")
    )


def delta_chunk(entries: dict[str, torch.Tensor], info: DeltaInfo, round_index: int) -> bytes:
    return codec.encode(entries, {"round": str(round_index), **info.to_metadata()})


def hostile_deltas(reference: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, tuple[bytes, str]]:
    """Each hostile delta from the reference (round 1) to round 2, and what the refusal must say."""

    def delta(codec_name: str, change=lambda entries: None, ratio: float = 0.01, **fields) -> bytes:
        entries = make_delta(target, reference, codec_name, ratio, 2, {}, round_generator(0, 2))
        made = apply_delta(reference, entries, codec_name, ratio, 2)
        info = DeltaInfo(codec_name, ratio, 2, 1, state_hash(made))
        change(entries)
        metadata = {"round": "2", **info.to_metadata(), **fields}
        return codec.encode(entries, metadata)

    def set_at(name: str, index: int, value: float):
        return lambda entries: entries.__setitem__(name, with_value(entries[name], index, value))

    def top_index(entries: dict[str, torch.Tensor]) -> int:  # where the top-k values hold BIG's first value
        return int((entries[f"{BIG}:indices"] == -INDEX_OFFSET).nonzero()[0])  # int16: position - INDEX_OFFSET

    overflow = lambda entries: entries.__setitem__(
        f"{BIG}:values", with_value(entries[f"{BIG}:values"], top_index(entries), HUGE)
    )
    wider = lambda entries: entries.__setitem__(f"{BIG}:P", torch.zeros(64, 3, dtype=torch.bfloat16))
    shorter = lambda entries: entries.__setitem__(f"{BIG}:levels", entries[f"{BIG}:levels"][:-1].clone())
    return {
        "a wrong base version": (delta("int8", delta_from="0"), "holds the state of round 1"),
        "an unknown codec": (delta("int8", delta_codec="zstd"), "unknown codec 'zstd'"),
        "an index out of range": (  # the position numel, as BIG's int16 index
            delta("topk", set_at(f"{BIG}:indices", 0, 64 * 64 * 9 - INDEX_OFFSET)),
            "an index outside",
        ),
        "a repeated index": (
            delta("topk", lambda e: e[f"{BIG}:indices"].__setitem__(1, e[f"{BIG}:indices"][0])),
            "a repeated index",
        ),
        "a NaN scale": (delta("int8", set_at(f"{BIG}:scales", 0, float("nan"))), "NaN or Inf in scales"),
        "factors wider than the header's rank": (delta("powersgd", wider), f"{BIG}:P is"),
        "a length not the header's": (delta("int8", shorter), f"{BIG}:levels is"),
        "a wrong state_hash": (delta("int8", state_hash="0" * 32), "not the leader's"),
        "a delta that overflows": (delta("topk", overflow), "it makes NaN or Inf"),
        "a delta to a round not after its base": (delta("int8", round="1"), "to round 1 from round 1"),
        "a negative running variance": (delta("int8", set_at(VARIANCE, 0, -1.0)), "a negative variance in"),
        # (a correct delta, but its k positions are a Python loop's work: about a microsecond each)
        "a random-k ratio above the cap": (delta("randk", ratio=0.5), "a random-k ratio of 0.5"),
    }


def with_value(tensor: torch.Tensor, index: int, value: float) -> torch.Tensor:
    changed = tensor.clone()
    changed.view(-1)[index] = value
    return changed


def test_hostile_deltas_are_refused_and_a_good_one_lands_bit_exact(learner):
    servicer, stub, member = learner
    torch.manual_seed(0)
    model = build_model("resnet20")
    reference = {name: tensor.clone() for name, tensor in wire_state(model, torch.float32).items()}
    reference[BIG].view(-1)[0] = HUGE  # finite: a hostile full state may hold it
    target = {name: tensor + 0.01 if tensor.is_floating_point() else tensor for name, tensor in reference.items()}
    target[BIG].view(-1)[0] = HUGE + 1e36  # the largest change: in every top-k delta
    full = codec.encode(reference, {"round": "1", **DeltaInfo("int8").to_metadata()})
    hostile = hostile_deltas(reference, target)
    unknown = codec.encode(reference, {"round": "0", "delta_codec": "zstd"})  # (matters only to deltas)
    assert push(stub, unknown).success and servicer.reference.tensors is None
    refused = push(stub, hostile["a NaN scale"][0])  # (a delta to a learner with no reference)
    assert not refused.success and "holds the state of round -1" in refused.message
    assert push(stub, full).success and servicer.reference.version == 1
    version, state = servicer.inbox.take(0, timeout=0)  # type: ignore[misc]
    assert not set(DELTA_KEYS) & set(state.metadata)  # (the training thread never sees --compress-down's keys)
    for case, (chunk, why) in hostile.items():
        reply = push(stub, chunk)
        assert not reply.success and "rejected" in reply.message and why in reply.message, (case, reply.message)
        assert servicer.reference.version == 1, case
        assert all(torch.equal(servicer.reference.tensors[name], reference[name]) for name in reference), case  # type: ignore[index]
        assert servicer.inbox.take(version, timeout=0) is None, case

    # The leader's side: its replica, a delta to a learner that acknowledged the base, sent by its dispatch
    downlink, client, acknowledged = Downlink("topk", 0.01, 2, 0), LearnerClient(rpc.Security()), threading.Event()
    downlink.advance(1, reference)
    downlink.publish({"round": "1"})
    downlink.acknowledged(member, 1)
    replica = downlink.advance(2, target)
    full = framing.chunk_message(codec.encode(replica, downlink.publish({"round": "2"})))
    requests = downlink.requests({0: member}, full)
    assert requests[0] == downlink.delta_message
    client.send(
        {0: member},
        "SyncModelState",
        requests,
        lambda *failure: pytest.fail(str(failure)),
        10,
        succeeded=lambda m: acknowledged.set(),
    ).wait(10)
    assert acknowledged.is_set() and servicer.reference.version == 2
    version, state = servicer.inbox.take(version, timeout=0)  # type: ignore[misc]
    assert list(state.tensors) == list(replica) and not set(DELTA_KEYS) & set(state.metadata)
    assert all(torch.equal(state.tensors[name], replica[name]) for name in replica)
