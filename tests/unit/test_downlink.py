"""--compress-down without sockets: the leader's replica (leader/downlink.py) and its learners' references
(learner/reference.py) stay bit-identical over 100 rounds of a changing ResNet-20, a learner that misses rounds
included; the replica tracks the model; who is sent the delta and who the full state; a resume makes the same
deltas."""

import copy
import math

import pytest
import torch

from federated.core.compression.delta import apply_delta, make_delta, round_generator, state_hash
from federated.core.layout import wire_state
from federated.leader.downlink import Downlink
from federated.leader.global_model import MAX_DISCARDED_ROUNDS
from federated.leader.registry import Member
from federated.learner.reference import StateReference
from federated.wire import codec, framing, messages
from model import build_model
from tests.support.live import leader_config, leader_from

ROUNDS = 100
AWAY = range(20, 90)  # the rounds learner 1 misses (sampled out, say): it gets the full state when back
IN_STEP, AWAY_LEARNER = Member(0, "a", "c0", 1), Member(1, "b", "c1", 1)
STEP = 0.01  # each round, every parameter and running statistic takes a random step of this size


def random_step(model: torch.nn.Module, generator: torch.Generator) -> None:
    """An SGD-like change of every float tensor, and one more batch counted."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):  # (a variance stays a variance)
                tensor.mul_(1 + STEP)
            elif tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator), alpha=STEP)
            else:
                tensor.add_(1)


def deliver(reference: StateReference, message: bytes) -> codec.Payload:
    """What the learner's SyncModelState does with a pushed state, without gRPC: a delta applied, a full state
    taken as the reference."""
    payload = codec.decode(framing.chunk_field(message))
    delta, round_index = messages.DeltaInfo.from_metadata(payload.metadata), messages.round_of(payload)
    assert delta is not None
    if delta.base is None:
        reference.take_full(payload, round_index)
        return payload
    return reference.apply(payload, delta, round_index)


def distance(state: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    """The Euclidean distance between two states' float tensors."""
    return math.sqrt(sum(float((t - other[name]).square().sum()) for name, t in state.items() if t.is_floating_point()))


def advance_and_push(
    downlink: Downlink, round_index: int, model_state: dict[str, torch.Tensor], members: dict[int, Member]
) -> tuple[bytes, dict[int, bytes]]:
    """The leader's publish of a round: R moved, its full state and its delta encoded, each member's push chosen."""
    replica = downlink.advance(round_index, model_state)
    full = framing.chunk_message(codec.encode(replica, downlink.publish({"round": str(round_index)})))
    return full, downlink.requests(members, full)


def same(reference: StateReference, replica: dict[str, torch.Tensor]) -> bool:
    assert reference.tensors is not None
    return same_state(reference.tensors, replica)


def same_state(state: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> bool:
    """Bit for bit, name for name, in order; and the hashes agree."""
    equal = list(state) == list(other) and all(torch.equal(state[name], other[name]) for name in other)
    return equal and state_hash(state) == state_hash(other)


@pytest.mark.parametrize("codec_name, ratio", [("int4", 0.01), ("topk", 0.1), ("powersgd", 0.01)])
def test_the_replica_and_learners_references_stay_bit_identical_over_100_rounds(codec_name, ratio):
    """Every delta a learner applies is checked against the hash of the leader's R (StateReference.apply): that
    each was accepted means its reference equals R, every round; at the end, and when learner 1 is back, the
    tensors are compared too. Quantised and top-k deltas keep R close to the model (see assert_tracks)."""
    torch.manual_seed(0)
    model, generator = build_model("resnet20"), torch.Generator().manual_seed(1)
    downlink, references = Downlink(codec_name, ratio, 2, seed=3), [StateReference(), StateReference()]
    sent: dict[int, list[str]] = {0: [], 1: []}
    start, errors = {name: tensor.clone() for name, tensor in wire_state(model, torch.float32).items()}, []
    for round_index in range(ROUNDS):
        random_step(model, generator)
        members = {0: IN_STEP, **({} if round_index in AWAY else {1: AWAY_LEARNER})}
        model_state = wire_state(model, torch.float32)
        full, requests = advance_and_push(downlink, round_index, model_state, members)
        errors.append(distance(model_state, downlink.replica))  # type: ignore[arg-type]
        for learner, message in requests.items():
            deliver(references[learner], message)
            downlink.acknowledged(members[learner], round_index)
            sent[learner].append("full" if message is full else "delta")
            assert references[learner].version == round_index
        if round_index == AWAY.stop:
            assert same(references[1], downlink.replica)  # type: ignore[arg-type]
    assert sent[0] == ["full"] + ["delta"] * (ROUNDS - 1)
    assert sent[1] == ["full"] + ["delta"] * (AWAY.start - 1) + ["full"] + ["delta"] * (ROUNDS - AWAY.stop - 1)
    assert same(references[0], downlink.replica) and same(references[1], downlink.replica)  # type: ignore[arg-type]
    if codec_name != "powersgd":  # (rank 2 of full-rank random steps: R catches up far more slowly)
        assert_tracks(errors, distance(wire_state(model, torch.float32), start))


def assert_tracks(errors: list[float], drift: float) -> None:
    """R tracks the model: the error ||x - R|| levels off (no growth over the second half) well below the drift."""
    assert max(errors[ROUNDS // 2 :]) <= 1.5 * max(errors[ROUNDS // 4 : ROUNDS // 2]), errors
    assert errors[-1] < 0.5 * drift, (errors[-1], drift)


def test_an_int8_replica_tracks_the_model():
    torch.manual_seed(0)
    model, generator, downlink = build_model("resnet20"), torch.Generator().manual_seed(1), Downlink("int8", 0.01, 2, 3)
    start, errors = {name: tensor.clone() for name, tensor in wire_state(model, torch.float32).items()}, []
    for round_index in range(ROUNDS):
        random_step(model, generator)
        model_state = wire_state(model, torch.float32)
        errors.append(distance(model_state, downlink.advance(round_index, model_state)))
    assert_tracks(errors, distance(wire_state(model, torch.float32), start))


def test_a_push_unanswered_or_failed_or_to_a_new_registration_is_followed_by_the_full_state():
    torch.manual_seed(0)
    model, generator, downlink = build_model("resnet20"), torch.Generator().manual_seed(1), Downlink("int8", 0.01, 2, 3)
    members = {0: IN_STEP, 1: AWAY_LEARNER}

    def push(round_index: int) -> tuple[bytes, dict[int, bytes]]:
        random_step(model, generator)
        replica = downlink.advance(round_index, wire_state(model, torch.float32))
        full = framing.chunk_message(codec.encode(replica, downlink.publish({"round": str(round_index)})))
        return full, downlink.requests(members, full)

    full, requests = push(0)
    assert requests == {0: full, 1: full}
    downlink.acknowledged(IN_STEP, 0)
    downlink.acknowledged(AWAY_LEARNER, 0)
    full, requests = push(1)
    assert requests[0] == requests[1] == downlink.delta_message and len(requests[0]) < len(full) / 3
    downlink.acknowledged(IN_STEP, 1)  # learner 1 never answers: no delta builds on it
    downlink.acknowledged(IN_STEP, 0)  # a late answer to an older push changes nothing
    full, requests = push(2)
    assert requests == {0: downlink.delta_message, 1: full}
    downlink.forget(IN_STEP)  # its push failed
    members[1] = Member(1, "b", "c1", 2)  # re-registered: a new generation
    downlink.acknowledged(AWAY_LEARNER, 2)  # (the old registration's answer)
    full, requests = push(3)
    assert requests == {0: full, 1: full}
    downlink.acknowledged(IN_STEP, 3)
    full, requests = push(4)
    assert requests == {0: downlink.delta_message, 1: full}
    replica, delta = downlink.replica, downlink.delta_message
    random_step(model, generator)  # the model moves; the same round pushed again builds nothing new
    assert downlink.advance(4, wire_state(model, torch.float32)) is replica
    downlink.publish({"round": "4"})
    assert downlink.delta_message == delta
    downlink.publish_final()
    assert not downlink.sending_replica and downlink.delta_message is None


def test_a_resumed_leader_makes_the_same_deltas():
    torch.manual_seed(0)
    model, generator, downlink = (
        build_model("resnet20"),
        torch.Generator().manual_seed(1),
        Downlink("powersgd", 0.01, 2, 3),
    )
    for round_index in range(3):
        random_step(model, generator)
        downlink.advance(round_index, wire_state(model, torch.float32))
    resumed = Downlink("powersgd", 0.01, 2, 3)
    resumed.restore(copy.deepcopy(downlink.checkpoint()))
    for round_index in range(3, 6):
        random_step(model, generator)
        state = wire_state(model, torch.float32)
        replicas = downlink.advance(round_index, state), resumed.advance(round_index, state)
        assert downlink.entries is not None and resumed.entries is not None
        assert all(torch.equal(downlink.entries[name], resumed.entries[name]) for name in downlink.entries)
        assert state_hash(replicas[0]) == state_hash(replicas[1])


def test_compress_down_is_refused_with_a_wire_dtype_other_than_float32(capsys):
    with pytest.raises(SystemExit):
        leader_config(["--compress-down", "int8", "--wire-dtype", "float16"])
    assert "--compress-down int8 with --wire-dtype float16" in capsys.readouterr().err
    assert leader_config(["--compress-down", "int8", "--compress", "topk"]).compress_down == "int8"


def test_a_resumed_leader_holds_the_checkpoints_replica_and_pushes_the_same_delta(tmp_path):
    """R and its version travel in the leader's checkpoint (GlobalModel.checkpoint), and the learners'
    acknowledged versions do not: after the resume, everyone gets the full state first."""
    run = [
        "--dataset",
        "none",
        "--num-classes",
        "10",
        "--rounds",
        "10",
        "--compress-down",
        "powersgd",
        "--out",
        str(tmp_path),
    ]
    leader, generator = leader_from(run), torch.Generator().manual_seed(1)
    for round_index in (1, 2):
        random_step(leader.global_model.model, generator)
        leader.global_model.publish(round_index, finished=False)
    leader.rounds.save_checkpoint(2)
    resumed = leader_from(["--resume", str(tmp_path)])
    downlinks = leader.global_model.downlink, resumed.global_model.downlink
    assert downlinks[0] is not None and downlinks[1] is not None and downlinks[1].version == 2
    assert same_state(downlinks[0].replica, downlinks[1].replica)  # type: ignore[arg-type]
    step = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for model, generator in zip((leader.global_model, resumed.global_model), step):
        random_step(model.model, generator)
        model.publish(3, finished=False)
    assert downlinks[0].delta_message == downlinks[1].delta_message is not None
    assert downlinks[1].requests({0: IN_STEP}, b"full") == {0: b"full"}


def test_powersgds_delta_adds_the_float64_sum_of_its_products_rounded_once():
    """The same bits on every CPU: addmm's float32 sums depend on BLAS blocking and vector width (MKL_CBWR), so
    a delta's P Q^T is summed in float64 over the rank, in rank order (products of float32s are exact there),
    rounded once to float32, then added."""
    torch.manual_seed(0)
    reference = {name: tensor.clone() for name, tensor in wire_state(build_model("resnet20"), torch.float32).items()}
    target = {
        name: tensor + torch.randn(tensor.shape) if tensor.is_floating_point() else tensor
        for name, tensor in reference.items()
    }
    entries = make_delta(target, reference, "powersgd", 0.01, 4, {}, round_generator(0, 1))
    updated = apply_delta(reference, entries, "powersgd", 0.01, 4)
    big = "layers.8.conv1.weight"
    p, q = entries[f"{big}:P"].double(), entries[f"{big}:Q"].double()
    product = sum(
        (torch.outer(p[:, column], q[:, column]) for column in range(1, p.shape[1])), torch.outer(p[:, 0], q[:, 0])
    )
    assert torch.equal(updated[big], reference[big] + product.float().view(reference[big].shape))


def test_a_repush_after_the_model_changed_still_applies():
    """A delta's whole tensors are copies: the model changing after the round's delta was made (the same round
    pushed again, re-encoded) changes neither it nor the hash it must make."""
    torch.manual_seed(0)
    state = {name: tensor.clone() for name, tensor in wire_state(build_model("resnet20"), torch.float32).items()}
    downlink, reference = Downlink("int8", 0.01, 2, 3), StateReference()
    full, _ = advance_and_push(downlink, 1, state, {})
    deliver(reference, full)
    state = {name: tensor + 0.01 if tensor.is_floating_point() else tensor for name, tensor in state.items()}
    advance_and_push(downlink, 2, state, {})
    state["fc.bias"].add_(1.0)  # a whole tensor of the live model, changed in place
    downlink.advance(2, state)
    downlink.publish({"round": "2"})
    assert downlink.delta_message is not None
    deliver(reference, downlink.delta_message)
    assert same(reference, downlink.replica)  # type: ignore[arg-type]


def test_news_of_an_older_registration_leaves_the_newer_ones_entry():
    downlink, old, new = Downlink("int8", 0.01, 2, 3), Member(0, "a", "c0", 1), Member(0, "a", "c0", 2)
    state = {"w": torch.zeros(64, 64)}
    downlink.advance(1, state)
    downlink.acknowledged(new, 1)
    downlink.acknowledged(old, 1)  # a late Ack to the old registration's push
    downlink.forget(old)  # a late failure of the old registration's push
    downlink.advance(2, {"w": torch.ones(64, 64)})
    full = b"x" * 10**6
    downlink.publish({"round": "2"})
    assert downlink.requests({0: new}, full) == {0: downlink.delta_message}


def test_a_learner_that_refused_a_delta_gets_full_states_until_it_registers_again():
    downlink, member = Downlink("int8", 0.01, 2, 3), Member(0, "a", "c0", 1)
    full = b"x" * 10**6
    for round_index in range(1, 4):
        downlink.advance(round_index, {"w": torch.full((64, 64), float(round_index))})
        downlink.publish({"round": str(round_index)})
        if round_index == 2:
            downlink.refused_delta(member)
        downlink.acknowledged(member, round_index)
    assert downlink.requests({0: member}, full) == {0: full}
    downlink.acknowledged(again := Member(0, "a", "c0", 2), 2)  # (in step with the delta's base)
    assert downlink.requests({0: again}, full) == {0: downlink.delta_message}


def test_a_scaffold_control_reset_goes_whole_to_every_learner(tmp_path):
    """A reset of SCAFFOLD's control (count_round -> Strategy.recover) drops the replica: a lossy delta would
    bring the learners the reset only slowly; the next state is the model's own, whole, to everyone."""
    run = [
        "--dataset",
        "none",
        "--num-classes",
        "10",
        "--rounds",
        "10",
        "--strategy",
        "scaffold",
        "--local-steps",
        "2",
        "--compress-down",
        "topk",
    ]
    leader = leader_from([*run, "--out", str(tmp_path)])
    global_model = leader.global_model
    downlink = global_model.downlink
    assert downlink is not None
    global_model.strategy.control.fill_(1.0)  # type: ignore[attr-defined]
    for round_index in (1, 2):
        global_model.publish(round_index, finished=False)
    assert downlink.delta_message is not None
    for _ in range(MAX_DISCARDED_ROUNDS):
        recovery = global_model.count_round("a NaN", stepped=True)
    assert recovery is not None and "reset" in recovery.message
    global_model.publish(3, finished=False)
    assert downlink.delta_message is None
    assert same_state(downlink.replica, wire_state(global_model.model, torch.float32, global_model.strategy.control))  # type: ignore[arg-type]


def test_compress_down_randk_is_refused_above_the_learners_ratio_cap(capsys):
    with pytest.raises(SystemExit):
        leader_config(["--compress-down", "randk", "--compress-ratio", "0.5"])
    assert "--compress-down randk with --compress-ratio 0.5" in capsys.readouterr().err
    assert leader_config(["--compress-down", "randk", "--compress-ratio", "0.1"]).compress_ratio == 0.1
