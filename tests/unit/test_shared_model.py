"""Learners of one process on one SharedModel (learner/state.py), without sockets: trained interleaved they send
bit for bit what the same learners send on models of their own, each keeping its own state (SCAFFOLD's c_i and
control change, error feedback's residuals, local DP's noise); between rounds a learner holds no model-sized
tensor but its state, and one left out of a round keeps none of its state; the inbox forgets a state once taken;
--compress-down's ReferenceBook shares the tensors of learners in step and refuses a delta to one out of step; a
learner waiting for its secure round's commit leaves the model to the others."""

import gc
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from functools import partial
from types import SimpleNamespace

import pytest
import torch

import utils
from federated.core.compression.delta import state_hash
from federated.core.layout import wire_state
from federated.core.plan import SecureRound, TrainingPlan
from federated.leader.downlink import Downlink
from federated.learner.app import Member
from federated.learner.reference import ReferenceBook, StateReference
from federated.learner.secure import SecureParty
from federated.learner.servicer import StateInbox
from federated.learner.state import Replica, SharedModel
from federated.wire import codec, framing, messages
from model import build_model
from tests.unit.test_downlink import deliver

BATCH, SIZE, LEARNERS = 4, 8, 3


def local_plan(strategy: str = "fedavg", **extra) -> TrainingPlan:
    """One local SGD step with momentum (momentum restarts every round), and what the case adds."""
    return TrainingPlan(strategy, local_steps=1, client_lr=0.1, client_momentum=0.9, **extra)


CASES = {
    "fedavg with BatchNorm": ("batch", local_plan()),
    "scaffold": ("batch", local_plan("scaffold")),
    "top-k with error feedback": ("batch", local_plan(compress="topk", compress_ratio=0.05)),
    "local DP": ("group", local_plan(dp="local", dp_clip=1.0, dp_noise_multiplier=1.0, dp_delta=1e-5)),
}
# (event, learner, round): each round a new state; learner 0 evaluates round 3's state, then learner 2 trains on
# it before learner 0 does (the shared model then holds learner 2's weights); from round 4 on the states say that
# round 3 was discarded (SCAFFOLD: learner 0's control change of round 1 is committed when it adopts round 3's
# state, while the shared update vector holds learner 1's; the changes of rounds 2 and 3 are dropped)
SCHEDULE = [
    ("train", 0, 1),
    ("train", 1, 2),
    ("evaluate", 0, 3),
    ("train", 2, 3),
    ("train", 0, 3),
    ("train", 1, 4),
    ("train", 0, 5),
    ("evaluate", 2, 5),
]


def states(norm: str, plan: TrainingPlan) -> list[codec.Payload]:
    """A ResNet-20 state for each round 0-5, its weights moved a little each round (and the server control, for
    SCAFFOLD); from round 4 on, one discarded round."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, norm)
    count = sum(p.numel() for p in model.parameters())
    made = []
    for round_index in range(6):
        control = torch.full((count,), 0.01 * round_index) if plan.strategy == "scaffold" else None
        tensors = {
            name: tensor + 0.001 * round_index if tensor.is_floating_point() else tensor
            for name, tensor in wire_state(model, torch.float32, control).items()
        }
        info = messages.StateInfo(
            "resnet20", 10, BATCH, 0, (0.5,) * 3, (0.25,) * 3, "float32", round_index, plan=plan, image_size=SIZE,
            norm=norm, discarded=int(round_index >= 4),
        )  # fmt: skip
        made.append(codec.decode(codec.encode(tensors, info.to_metadata())))
    return made


def batch_at(learner: int, round_index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The learner's own batch: its data differs from every other learner's."""
    generator = torch.Generator().manual_seed(100 * learner + 10 * round_index + step)
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=generator), torch.randint(0, 10, (BATCH,), generator=generator)


@dataclass
class Run:
    replicas: list[Replica]
    sent: list[dict[str, torch.Tensor]] = field(default_factory=list)  # every update, as it travels
    evaluations: list[tuple[float, int]] = field(default_factory=list)


def run(norm: str, plan: TrainingPlan, shared: bool, state_budget: int | None = None) -> Run:
    """The schedule's rounds, the learners on one SharedModel (keeping state_budget bytes of their state in memory)
    or each on a model of its own (built from a state fetched each: a model of its own takes the tensors over); as
    Member does it, under the model's lock."""
    pushed = states(norm, plan)
    model = SharedModel(pushed[0], "cpu", state_budget) if shared else None
    fetched = lambda: codec.decode(codec.encode(pushed[0].tensors, pushed[0].metadata))
    replicas = [Replica(fetched(), "cpu", model) for _ in range(LEARNERS)]
    for learner, replica in enumerate(replicas):
        replica.noise = torch.Generator().manual_seed(learner)  # (local DP's: from the OS in a real learner)
    images = torch.randint(0, 256, (16, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(99))
    held_out = utils.ImageSet(images.to(torch.uint8), torch.arange(16) % 10, 10)
    result = Run(replicas)
    for event, learner, round_index in SCHEDULE:
        replica = replicas[learner]
        with replica.shared.lock:
            if replica.round != round_index:
                replica.adopt(pushed[round_index], fetched=False)
            if event == "evaluate":
                evaluation = replica.evaluate(held_out)
                result.evaluations.append((evaluation.loss, evaluation.correct))
                continue
            replica.local_update(partial(batch_at, learner, round_index), replica.plan)
            replica.keep_change()
            update = replica.update_tensors()
            if plan.compress != "none":
                update = replica.compressed(replica.layout.views(replica.gradient), plan, learner)
            result.sent.append({name: tensor.clone() for name, tensor in update.items()})
        replica.update_taken(round_index)
    return result


def learner_state(replica: Replica) -> list[torch.Tensor]:
    """What a learner keeps from round to round: its controls and pending change, its residuals, its noise."""
    kept = []
    if replica.controls is not None:
        kept += [replica.controls.own, replica.controls.server]
        kept += [] if replica.change is None else [replica.change]
    if replica.compressor is not None:
        kept += list(replica.compressor.residuals.values())
    if replica.noise is not None:
        kept.append(replica.noise.get_state())
    return kept


@pytest.fixture(scope="module", params=list(CASES))
def runs(request) -> tuple[str, Run, Run]:
    norm, plan = CASES[request.param]
    return request.param, run(norm, plan, shared=True), run(norm, plan, shared=False)


def test_learners_trained_interleaved_on_one_model_send_what_they_would_on_models_of_their_own(runs):
    case, shared, alone = runs
    assert len(shared.sent) == len(alone.sent) == 6 and shared.evaluations == alone.evaluations
    for ours, theirs in zip(shared.sent, alone.sent):
        assert list(ours) == list(theirs) and all(torch.equal(ours[name], theirs[name]) for name in theirs), case
    for ours, theirs in zip(shared.replicas, alone.replicas):  # and keep the same state
        assert len(learner_state(ours)) == len(learner_state(theirs))
        assert all(torch.equal(a, b) for a, b in zip(learner_state(ours), learner_state(theirs))), case
    assert all(replica.shared is shared.replicas[0].shared for replica in shared.replicas)
    if case == "scaffold":  # learner 0's change of round 1 committed; 1's and 2's dropped (round 3 discarded)
        owns = [replica.controls.own for replica in shared.replicas]
        assert owns[0].any() and not owns[1].any() and not owns[2].any()
        assert len({own.data_ptr() for own in owns}) == LEARNERS
    if case == "top-k with error feedback":
        assert len({id(replica.compressor) for replica in shared.replicas}) == LEARNERS


def tensors_held(thing: object, seen: set[int] | None = None) -> list[torch.Tensor]:
    """Every tensor a replica reaches through its attributes (dicts, lists, its controls, compressor, payloads),
    but its shared model's."""
    seen = set() if seen is None else seen
    if id(thing) in seen or isinstance(thing, SharedModel):
        return []
    seen.add(id(thing))
    if isinstance(thing, torch.Tensor):
        return [thing]
    if isinstance(thing, dict):
        children = list(thing.values())
    elif isinstance(thing, list | tuple):
        children = list(thing)
    elif type(thing).__module__.startswith("federated.") and hasattr(thing, "__dict__"):
        children = list(vars(thing).values())
    else:
        return []
    return [tensor for child in children for tensor in tensors_held(child, seen)]


def test_a_learner_between_rounds_holds_no_tensor_but_its_state(runs):
    """Nothing of the model: no state it trained on, no update; only its state (and, learner 2, the state it
    evaluated and would train on next)."""
    case, shared, _ = runs
    for learner, replica in enumerate(shared.replicas):
        assert (replica.state is None) == (learner != 2), case
        own = {id(tensor) for tensor in learner_state(replica)}
        pending = {id(tensor) for tensor in replica.state.tensors.values()} if replica.state is not None else set()
        others = [tensor for tensor in tensors_held(replica) if id(tensor) not in own | pending]
        assert not others, (case, learner, [tuple(tensor.shape) for tensor in others])


def test_a_learner_left_out_of_a_round_keeps_none_of_its_state_while_it_waits():
    """A pool's learner waiting for its next draw keeps nothing of the state last pushed to it (here one of a round
    it is left out of, as a rejoining learner is pushed): a thousand waiting would hold a thousand model copies."""
    made = states("batch", replace(local_plan(), participants=(0,)))
    pushed = codec.decode(codec.encode(made[1].tensors, made[1].metadata))
    final = codec.decode(codec.encode(made[2].tensors, {**made[2].metadata, "finished": "1"}))
    shared = SharedModel(made[0], "cpu")
    inbox, kept = StateInbox(), weakref.ref(next(iter(pushed.tensors.values())))
    inbox.put(1, pushed)
    del pushed
    held: list[object] = []

    def wait_until(ready, what, bounded):
        gc.collect()
        held.append((member.replica.state, kept()))
        return (2, final)

    member = object.__new__(Member)
    member.replica, member.learner_id, member.sent_round, member.held_out = Replica(made[0], "cpu", shared), 5, -1, None
    member.server = SimpleNamespace(inbox=inbox, stopped=threading.Event())  # type: ignore[assignment]
    member.session = SimpleNamespace(wait_until=wait_until)  # type: ignore[assignment]
    member.config = SimpleNamespace(log_every=1)  # type: ignore[assignment]
    member.data = utils.ImageSet(torch.zeros(8, 3, SIZE, SIZE, dtype=torch.uint8), torch.zeros(8, dtype=torch.long), 10)
    assert member.train() is final
    assert member.replica.round == 1 and held == [(None, None)]


def test_the_inbox_forgets_a_state_once_taken_and_keeps_the_final_one():
    inbox, state = StateInbox(), codec.decode(codec.encode({"w": torch.zeros(3)}, {"round": "1"}))
    gone = weakref.ref(state.tensors["w"])
    inbox.put(1, state)
    version, taken = inbox.take(0, timeout=0)  # type: ignore[misc]
    assert version == 1 and taken is state
    del state, taken
    gc.collect(0)
    assert gone() is None and inbox.take(version, timeout=0) is None  # the inbox kept no reference
    inbox.put(2, codec.decode(codec.encode({"w": torch.ones(3)}, {"round": "2"})))
    assert inbox.take(version, timeout=0)[0] == 2  # type: ignore[index]
    final = codec.decode(codec.encode({"w": torch.ones(3)}, {"round": "3", "finished": "1"}))
    inbox.put(3, final)
    assert inbox.take(2, timeout=0)[1] is final and inbox.take(3, timeout=0)[1] is final  # type: ignore[index]


def test_a_reference_book_shares_the_tensors_of_learners_in_step_and_refuses_a_delta_out_of_step():
    torch.manual_seed(0)
    model = build_model("resnet20")
    downlink, book = Downlink("topk", 0.1, 2, seed=3), ReferenceBook()
    learners = [StateReference(book) for _ in range(3)]

    def publish(round_index: int) -> tuple[bytes, bytes | None]:
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.add_(0.01) if tensor.is_floating_point() else None
        replica = downlink.advance(round_index, wire_state(model, torch.float32))
        full = framing.chunk_message(codec.encode(replica, downlink.publish({"round": str(round_index)})))
        return full, downlink.delta_message

    full, _ = publish(0)
    first, *_ = [deliver(reference, full) for reference in learners]  # each decodes its own push
    assert len(book.versions()) == 1 and all(reference.version == 0 for reference in learners)
    for reference in learners:  # the book keeps one set of tensors: the first learner's
        assert all(reference.tensors[name] is first.tensors[name] for name in first.tensors)  # type: ignore[index]
    _, delta = publish(1)
    assert delta is not None
    states = [deliver(reference, delta) for reference in learners[:2]]  # learner 2 misses round 1
    assert learners[0].tensors is learners[1].tensors and state_hash(states[1].tensors) == book.versions()[-1][1]
    assert all(states[0].tensors[name] is states[1].tensors[name] for name in states[0].tensors)
    _, delta = publish(2)
    with pytest.raises(codec.PayloadError, match="a delta from round 1, but this learner holds the state of round 0"):
        deliver(learners[2], delta)  # type: ignore[arg-type]
    assert learners[2].version == 0 and learners[2].tensors is not None  # untouched
    deliver(learners[0], delta)  # type: ignore[arg-type]
    for round_index in (3, 4):  # learner 1 stays at round 1, learner 2 at round 0: the book keeps what they hold
        _, delta = publish(round_index)
        deliver(learners[0], delta)  # type: ignore[arg-type]
    assert learners[1].tensors is not None and learners[2].tensors is not None
    assert [round_index for round_index, _ in book.versions()] == [0, 1, 4]  # rounds 2 and 3: nobody holds them


def test_a_learner_waiting_for_its_secure_rounds_commit_leaves_the_shared_model_to_the_others():
    """The wait for the leader's commit (up to --wait-timeout) happens with a copy of the update vector, outside the
    shared model's lock: the other learners of the pool train meanwhile; it ends once the learner is stopped."""
    plan = TrainingPlan("fedavg", local_steps=1, client_lr=0.1, secure=SecureRound(1.0, 8.0, 4))
    state = states("batch", plan)[0]
    replica = Replica(state, "cpu", SharedModel(state, "cpu"))
    party, stopped = SecureParty(), threading.Event()
    party.bind(0)  # registered, but the leader never commits it
    member = SimpleNamespace(
        learner_id=0,
        data=range(BATCH),
        replica=replica,
        sent_round=-1,
        config=SimpleNamespace(wait_timeout=60),
        server=SimpleNamespace(secure=party, inbox=SimpleNamespace(has_final=lambda: False), stopped=stopped),
    )
    for method in ("update_request", "send_request", "masked_input", "ended"):
        setattr(member, method, partial(getattr(Member, method), member))
    sending = threading.Thread(target=Member.send_update, args=(member, 0, 1.0, plan))
    sending.start()
    try:
        deadline = time.monotonic() + 30
        while member.sent_round != 0:  # its update taken from the shared vector: waiting for the commit
            assert time.monotonic() < deadline, "no update request"
            time.sleep(0.01)
        assert replica.shared.lock.acquire(timeout=10), "the wait for the commit holds the shared model"
        replica.shared.lock.release()
        assert sending.is_alive()  # still waiting
        stopped.set()  # the learner stopped (Pool.stop_learner): it waits no more (STOP_CHECK_S), sends nothing
        sending.join(10)
        assert not sending.is_alive()
    finally:
        stopped.set()


def test_a_reference_book_keeps_the_versions_its_learners_hold_and_drops_those_nobody_holds_lowest_first():
    """A resumed leader goes back in rounds: the learners' old versions, which nobody holds once they rejoined, go
    first, and the resumed run's versions stay (a book that kept only the highest rounds refused every delta after
    a resume). A version a learner holds goes only past twice keep: a leader cannot make a pool hold N states."""
    book, tensors = ReferenceBook(keep=3), {"w": torch.zeros(1)}
    book.move(None, (7, "h"), tensors)
    book.move(None, (7, "h"), {"w": torch.ones(1)})
    for round_index in (8, 9, 10):  # two learners in step
        for learner in range(2):
            book.move((round_index - 1, "h"), (round_index, "h"), tensors if learner == 0 else {"w": torch.ones(1)})
    first = second = (10, "h")
    assert [round_index for round_index, _ in book.versions()] == [8, 9, 10]
    assert book.get((10, "h"))["w"].item() == 0  # one set of tensors for both: the first put
    book.release(first)  # the leader was resumed at round 5: each learner forgets its reference, takes round 5
    book.move(None, (5, "h"), tensors)
    book.release(second)
    book.move(None, (5, "h"), tensors)
    book.move((5, "h"), (6, "h"), tensors)  # one learner's delta to round 6
    assert [round_index for round_index, _ in book.versions()] == [5, 6, 10]
    for learner in range(8):  # a leader putting each learner at a version of its own
        book.move(None, (100 + learner, "h"), tensors)
    assert len(book.versions()) == 6 and book.versions()[0][0] == 102


def test_a_learner_cannot_send_the_update_another_learner_of_its_process_trained():
    """Member.send_update is public (tests, hostile learners): in a pool it must not send the shared update vector
    when another learner trained last."""
    pushed = states("batch", local_plan())
    model = SharedModel(pushed[0], "cpu")
    first, second = Replica(pushed[0], "cpu", model), Replica(pushed[0], "cpu", model)
    with model.lock:
        first.local_update(partial(batch_at, 0, 0), first.plan)
    member = SimpleNamespace(replica=second, learner_id=1, data=range(8), sent_round=-1)
    with pytest.raises(RuntimeError, match="holds another learner's update"):
        Member.update_request(member, 0, 1.0, second.plan)  # type: ignore[arg-type]
    assert member.sent_round == -1
