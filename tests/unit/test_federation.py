"""The leader's round state machine without processes or sockets: a real Federation, Registry and RoundCollector
with short timeouts, learners that answer every call, and updates taken as the servicer takes them. Sampling,
draws again, deadlines, the quorum, and learners given up on for missing rounds."""

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures

import pytest
import torch

from federated.core import aggregation, strategies
from federated.leader import config, dispatch
from federated.leader import federation as federation_module
from federated.leader.collector import RoundCollector
from federated.leader.federation import Federation, Settings, Stalled
from federated.leader.global_model import GlobalModel
from federated.leader.planner import Planner
from federated.leader.registry import MAX_MISSED_ROUNDS, Member, Registry
from federated.net import rpc
from federated.wire import codec, framing

ROUND_S = 0.2  # --round-timeout
PATIENCE_S = 10.0  # how long a test waits for what must happen within a few deadlines (and --register-timeout)
STALL_S = 0.5  # --register-timeout where a test waits for the round to stall


class AnsweringLearners(dispatch.LearnerClient):
    """The leader's calls to its learners, answered here: every learner is there when checked on and accepts
    every state and StartTraining. Only the calling methods are replaced (channels, silence bookkeeping are the
    real ones): a real LearnerClient drops a learner that nothing answers for at its address (a push refused, or
    two health checks), so keeping learners without sockets takes a stand-in for what they answer."""

    def __init__(self) -> None:
        super().__init__(rpc.Security())
        self.pushed: list[list[int]] = []  # to whom each SyncModelState went

    def send(
        self, members, method, request, on_failure, timeout, then=lambda member: None, succeeded=lambda member: None
    ) -> dispatch.Broadcast:
        if method == "SyncModelState":
            self.pushed.append(sorted(members))
        broadcast = dispatch.Broadcast(list(members.values()))
        for member in members.values():
            succeeded(member)
            then(member)
            broadcast.ended(True)
        return broadcast

    def start(self, members, state, on_started, on_failure, timeout, took_state=lambda member: None) -> None:
        for member in members.values():
            on_started(member)

    def probe(self, members, on_failure, silent_limit_s) -> None:
        """Every learner checked on is there."""


@dataclasses.dataclass
class Rounds:
    federation: Federation
    registry: Registry
    collector: RoundCollector
    learners: AnsweringLearners


@pytest.fixture(autouse=True)
def short_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(federation_module, "WAIT_SLICE_S", 0.01)


@pytest.fixture
def background():
    with futures.ThreadPoolExecutor(1) as pool:
        yield pool


def rounds_of(tmp_path, *flags: str, register_s: float = PATIENCE_S, round_s: float = ROUND_S, learners=None) -> Rounds:
    """The round state machine of a leader with these flags, --round-timeout round_s and --register-timeout
    register_s, calling learners (AnsweringLearners unless given); updates are one number (the machine never
    looks at them)."""
    run = config.configure(
        config.command_line(["--dataset", "none", "--num-classes", "10", "--out", str(tmp_path), *flags])
    )
    strategy = strategies.named(run.strategy)(run)
    settings = dataclasses.replace(Settings.of(run), round_timeout=round_s, register_timeout=register_s)
    registry = Registry(run.learners, run.rejoin_grace, reregister_s=0)
    collector = RoundCollector(1, rule=aggregation.rules.named(run.aggregator).from_config(run))
    learners = learners or AnsweringLearners()
    federation = Federation(
        settings,
        registry,
        collector,
        GlobalModel(run, 10, strategy, ([0.5] * 3, [0.25] * 3)),
        Planner(run, strategy, None),
        learners,
        torch.Generator().manual_seed(run.seed),
        threading.Event(),
    )
    return Rounds(federation, registry, collector, learners)


def join(rounds: Rounds, *hosts: int) -> list[Member]:
    """Learners register (at addresses nobody dials) and are started, as the round loop starts joiners."""
    members = [rounds.registry.register(f"10.0.0.{host}:7000")[0] for host in hosts]
    rounds.federation.admit_joiners()
    return members


def deliver(rounds: Rounds, member: Member, round_index: int | None = None) -> str | None:
    """An update of the learner (for the open round, unless round_index says otherwise), taken as the servicer
    takes it; why it was ignored, or None if it counted."""
    collector = rounds.collector
    claimed = collector.round if round_index is None else round_index
    reason = collector.submit(member.learner_id, claimed, [torch.ones(1)], 1, 0.0, 1)
    rounds.federation.received(member, counted=reason is None)
    return reason


def play(rounds: Rounds, *members: Member) -> tuple[bool, tuple[int, ...]]:
    """One round as the round loop plays it, in which these learners deliver: whether it closed, and who missed it."""
    rounds.federation.open()
    for member in members:
        assert deliver(rounds, member) is None
    closed = rounds.federation.wait_for_round(rounds.collector.round)
    return closed, rounds.federation.close(torch.empty(1)).missed


def eventually(condition: Callable[[], object]) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < deadline, "it did not happen within a few deadlines"
        time.sleep(0.01)


def misses_left(registry: Registry, learner_id: int) -> int:
    """How many more rounds the learner may miss before it is given up on (charging them)."""
    for left in range(1, MAX_MISSED_ROUNDS + 1):
        if registry.missed([learner_id], since=time.monotonic()):
            return left
    raise AssertionError(f"learner {learner_id} was given up on already")


def test_a_round_closes_as_soon_as_every_expected_update_is_in(tmp_path):
    rounds = rounds_of(tmp_path, "--learners", "3")
    members = join(rounds, 1, 2, 3)
    assert play(rounds, *members) == (True, ())
    assert misses_left(rounds.registry, 0) == MAX_MISSED_ROUNDS


def test_past_its_deadline_a_round_closes_with_min_learners_and_the_missing_one_misses_it_once(tmp_path):
    rounds = rounds_of(tmp_path, "--learners", "3", "--min-learners", "2")
    first, second, _ = join(rounds, 1, 2, 3)
    assert play(rounds, first, second) == (True, ())  # named at the deadline, not again when it closed
    assert misses_left(rounds.registry, 2) == MAX_MISSED_ROUNDS - 1


@pytest.mark.parametrize("answer", ["late", "never"])
def test_a_learner_missing_every_deadline_is_given_up_on_and_rounds_stop_waiting_for_it(tmp_path, answer):
    rounds = rounds_of(tmp_path, "--learners", "3", "--min-learners", "2")
    first, second, laggard = join(rounds, 1, 2, 3)
    for _ in range(MAX_MISSED_ROUNDS):
        rounds.federation.open()
        if answer == "late":  # every round, a well-formed update for the round just closed
            assert "ignored" in deliver(rounds, laggard, rounds.collector.round - 1)
        for member in (first, second):
            deliver(rounds, member)
        assert rounds.federation.wait_for_round(rounds.collector.round)  # at the deadline
        rounds.federation.close(torch.empty(1))
    assert rounds.registry.given_up() == [2]
    rounds.federation.open()
    assert rounds.collector.missing() == [0, 1]  # the next round does not wait for it


def test_an_unmet_quorum_gives_up_on_the_learner_that_delivers_nothing_and_a_newcomer_makes_it_up(tmp_path, background):
    rounds = rounds_of(tmp_path, "--learners", "3", "--aggregator", "median")  # --min-learners 3
    silent, *others = join(rounds, 1, 2, 3)
    rounds.federation.open()
    for member in others:
        deliver(rounds, member)
    waiting = background.submit(rounds.federation.wait_for_round, 0)
    eventually(lambda: rounds.registry.given_up() == [0])  # after MAX_MISSED_ROUNDS deadlines of this round
    newcomer, message = rounds.registry.register("10.0.0.9:7000")
    assert newcomer.learner_id == 0 and "took over" in message
    assert rounds.registry.authenticate(silent.credential, None) is None
    eventually(lambda: 0 in rounds.registry.ready())  # started by the waiting round
    assert deliver(rounds, newcomer) is None
    assert waiting.result(PATIENCE_S)
    summary = rounds.federation.close(torch.empty(1))
    assert summary.learners == 3 and rounds.collector.rule.too_few(summary.learners) is None


def test_an_unmet_quorum_nobody_makes_up_stalls_naming_the_learners_given_up_on(tmp_path):
    rounds = rounds_of(tmp_path, "--learners", "3", "--aggregator", "median", register_s=STALL_S)
    _, *others = join(rounds, 1, 2, 3)
    rounds.federation.open()
    for member in others:
        deliver(rounds, member)
    with pytest.raises(Stalled) as stalled:
        rounds.federation.wait_for_round(0)
    message = str(stalled.value)
    assert "2 gradients" in message and "fewer than --min-learners 3" in message
    assert f"learners [0] were given up on for missing {MAX_MISSED_ROUNDS} rounds in a row" in message
    assert "no new learner took their slots" in message and f"--resume {tmp_path}" in message


def test_a_robust_round_below_its_rules_minimum_waits_though_everyone_expected_has_reported(tmp_path):
    rounds = rounds_of(tmp_path, "--learners", "3", "--aggregator", "median", register_s=STALL_S)
    members = join(rounds, 1, 2)  # the third never registers
    rounds.federation.open()
    for member in members:
        deliver(rounds, member)
    with pytest.raises(Stalled, match="2 gradients"):  # closed, the round would only be discarded
        rounds.federation.wait_for_round(0)


def test_a_newcomer_taking_a_slot_mid_round_is_not_charged_with_the_round_its_predecessor_missed(tmp_path):
    rounds = rounds_of(tmp_path, "--learners", "2", "--rounds", "10")
    prompt, gone = join(rounds, 1, 2)
    rounds.federation.open()
    deliver(rounds, prompt)
    rounds.registry.drop(1, gone.generation, gone=True)
    newcomer, _ = rounds.registry.register("10.0.0.9:7000")
    assert newcomer.learner_id == 1
    assert rounds.federation.wait_for_round(0)  # at once: the learner it waited for is gone
    rounds.federation.close(torch.empty(1))
    assert misses_left(rounds.registry, 1) == MAX_MISSED_ROUNDS


def test_with_sampling_only_the_drawn_learners_get_the_state_and_count(tmp_path):
    rounds = rounds_of(tmp_path, "--learners", "4", "--learners-per-round", "2")
    members = join(rounds, 1, 2, 3, 4)
    rounds.federation.start()  # the first draw
    drawn = rounds.federation.participants
    assert len(drawn) == 2 and rounds.learners.pushed == [drawn]
    rounds.federation.open()
    assert rounds.collector.missing() == drawn
    idle = next(member for member in members if member.learner_id not in drawn)
    assert "not sampled" in deliver(rounds, idle)
    for learner_id in drawn:
        deliver(rounds, members[learner_id])
    assert rounds.federation.wait_for_round(0)


def test_a_draw_short_of_min_learners_at_the_deadline_is_drawn_again_and_the_first_draws_updates_still_count(
    tmp_path, background
):
    rounds = rounds_of(tmp_path, "--learners", "4", "--learners-per-round", "2", "--min-learners", "2")
    members = join(rounds, 1, 2, 3, 4)
    rounds.federation.start()
    first = rounds.federation.participants
    rounds.federation.open()
    waiting = background.submit(rounds.federation.wait_for_round, 0)
    eventually(lambda: len(rounds.learners.pushed) == 2)  # nothing came by the deadline: drawn again
    second = rounds.federation.participants
    assert rounds.learners.pushed[1] == second
    assert deliver(rounds, members[first[0]]) is None  # a learner of the first draw delivers late: it counts
    for learner_id in sorted(set(second) - {first[0]}):
        deliver(rounds, members[learner_id])
    assert waiting.result(PATIENCE_S)


def test_when_none_of_the_drawn_learners_is_left_the_round_draws_among_the_others(tmp_path, background):
    rounds = rounds_of(tmp_path, "--learners", "4", "--learners-per-round", "2")
    members = join(rounds, 1, 2, 3, 4)
    rounds.federation.start()
    first = rounds.federation.participants
    rounds.federation.open()
    for learner_id in first:
        rounds.registry.drop(learner_id, members[learner_id].generation, gone=True)
    waiting = background.submit(rounds.federation.wait_for_round, 0)
    eventually(lambda: len(rounds.learners.pushed) == 2)
    second = rounds.federation.participants
    assert not set(second) & set(first) and len(second) == 2
    for learner_id in second:
        deliver(rounds, members[learner_id])
    assert waiting.result(PATIENCE_S)


def test_learners_drawn_again_mid_round_get_a_whole_deadline_before_a_miss_counts(tmp_path, background):
    round_s = 1.0  # (long enough to place the draw again and the deliveries between deadlines)
    rounds = rounds_of(tmp_path, "--learners", "4", "--learners-per-round", "2", round_s=round_s)
    members = join(rounds, 1, 2, 3, 4)
    rounds.federation.start()
    first = rounds.federation.participants
    rounds.federation.open()
    waiting = background.submit(rounds.federation.wait_for_round, 0)
    time.sleep(0.5 * round_s)
    for learner_id in first:  # found gone late in the round: the round draws again, a moment before its deadline
        rounds.registry.drop(learner_id, members[learner_id].generation, gone=True)
    eventually(lambda: len(rounds.learners.pushed) == 2)
    second = rounds.federation.participants
    time.sleep(0.8 * round_s)  # past the first deadline, before the second: not charged at it
    assert [misses_left(rounds.registry, learner_id) for learner_id in second] == [MAX_MISSED_ROUNDS] * 2
    for learner_id in second:  # (an update that counts clears what misses_left charged)
        deliver(rounds, members[learner_id])
    assert waiting.result(PATIENCE_S)


class DiallingLearners(AnsweringLearners):
    """AnsweringLearners that dial each learner they answer for, as a real call does (the channel is lazy: no
    socket until a call goes out, and none goes out here)."""

    def send(
        self, members, method, request, on_failure, timeout, then=lambda member: None, succeeded=lambda member: None
    ) -> dispatch.Broadcast:
        for member in members.values():
            self._dial(member.address)
            self._hang_up(member.address)
        return super().send(members, method, request, on_failure, timeout, then, succeeded)

    def start(self, members, state, on_started, on_failure, timeout, took_state=lambda member: None) -> None:
        self.send(members, "StartTraining", None, on_failure, timeout, on_started)


def test_with_sampling_the_leader_keeps_channels_only_to_the_learners_drawn(tmp_path):
    rounds = rounds_of(tmp_path, "--learners", "6", "--learners-per-round", "2", learners=DiallingLearners())
    members = join(rounds, *range(1, 7))  # each was dialled for its start
    rounds.federation.start()
    for _ in range(4):
        rounds.federation.open()
        drawn = rounds.federation.participants
        assert set(rounds.learners._channels) == {members[learner].address for learner in drawn}
        for learner in drawn:
            deliver(rounds, members[learner])
        assert rounds.federation.wait_for_round(rounds.collector.round)
        rounds.federation.close(torch.empty(1))
        rounds.federation.push_state(rounds.collector.round, finished=False)


def test_a_channel_with_a_call_in_flight_stays_open_until_the_call_ends():
    client = dispatch.LearnerClient(rpc.Security())
    client._dial("10.0.0.1:7000")  # a call in flight
    client._dial("10.0.0.2:7000")
    client._hang_up("10.0.0.2:7000")  # one that ended
    client.keep_only(set())
    assert set(client._channels) == {"10.0.0.1:7000"}
    client._hang_up("10.0.0.1:7000")
    client.keep_only(set())
    assert not client._channels


def test_learners_given_up_on_are_not_drawn(tmp_path):
    rounds = rounds_of(tmp_path, "--learners", "3", "--learners-per-round", "2")
    join(rounds, 1, 2, 3)
    for _ in range(MAX_MISSED_ROUNDS):
        rounds.registry.missed([0], since=time.monotonic())
    for _ in range(8):
        rounds.federation.open_round(0)
        assert rounds.federation.participants == [1, 2]


def test_a_learner_given_up_on_is_still_checked_on_and_dropped_once_gone(tmp_path):
    rounds = rounds_of(tmp_path, "--learners", "1", "--rounds", "10", register_s=STALL_S)
    (only,) = join(rounds, 1)
    found_gone: list[int] = []

    def probe(members, on_failure, silent_limit_s) -> None:  # it answers until the round gave up on it, then is gone
        for member in members.values():
            if rounds.registry.given_up():
                found_gone.append(member.learner_id)
                on_failure(member, "health check: UNAVAILABLE", dispatch.GONE)

    rounds.learners.probe = probe  # type: ignore[method-assign]
    rounds.federation.open()
    with pytest.raises(Stalled, match="fewer than --min-learners 1") as stalled:
        rounds.federation.wait_for_round(0)
    # the round no longer waits for it, but a dead learner is still found dead: its slot is free, and the leader
    # says nobody is left rather than blaming rounds it could not have sent
    assert found_gone == [only.learner_id] and rounds.registry.count() == 0
    assert "were given up on" not in str(stalled.value)


def test_a_learner_always_late_holds_only_about_log2_of_the_rounds_to_their_deadline(tmp_path, caplog):
    rounds = rounds_of(tmp_path, "--learners", "3", "--min-learners", "2")
    *prompt, laggard = join(rounds, 1, 2, 3)
    held = []
    for round_index in range(40):
        rounds.federation.open()
        if round_index:  # every round, a well-formed update for the round just closed
            assert "ignored" in deliver(rounds, laggard, round_index - 1)
        for member in prompt:
            assert deliver(rounds, member) is None
        if rounds.collector.missing():  # the round waits for the laggard: to its deadline
            held.append(round_index)
        assert rounds.federation.wait_for_round(round_index)
        rounds.federation.close(torch.empty(1))
    # the first 3, then one on probation after each bench of 2, 4, 8 and 16 rounds (the next would be after 32)
    assert held == [0, 1, 2, 5, 10, 19, 36]
    assert "learners [2] missed 3 rounds in a row: rounds leave them out for the next 2 rounds" in caplog.text
    assert "on probation (given up on 4 times in a row): rounds leave them out for the next 16 rounds" in caplog.text


def test_an_honest_learner_given_up_on_after_a_pause_is_drawn_and_waited_for_again_after_its_bench(tmp_path):
    rounds = rounds_of(tmp_path, "--learners", "3", "--min-learners", "2", "--learners-per-round", "3")
    members = join(rounds, 1, 2, 3)
    paused = members[2]
    rounds.federation.start()

    def play_drawn(paused_in_time: bool) -> list[int]:
        """A round as the round loop plays it, its state then pushed to the next draw: the learners deliver, the
        paused one in time or once the others closed the round. Returns whom the round waited for."""
        rounds.federation.open()
        waited_for = rounds.collector.missing()
        for member in members:
            if member is not paused or paused_in_time:  # only the drawn learners' updates count
                assert (deliver(rounds, member) is None) == (member.learner_id in rounds.federation.participants)
        assert rounds.federation.wait_for_round(rounds.collector.round)
        rounds.federation.close(torch.empty(1))
        if not paused_in_time:
            assert "ignored" in deliver(rounds, paused, rounds.collector.round - 1)
        rounds.federation.push_state(rounds.collector.round, finished=False)
        return waited_for

    for _ in range(MAX_MISSED_ROUNDS):  # a pause, then a little slower than the others
        assert play_drawn(paused_in_time=False) == [0, 1, 2]
    assert rounds.registry.given_up() == [2]
    for _ in range(2):  # its bench: not drawn, so nothing of its counts, however fast it is
        assert rounds.learners.pushed[-1] == [0, 1]
        assert play_drawn(paused_in_time=True) == [0, 1]
    assert rounds.learners.pushed[-1] == [0, 1, 2]  # drawn again, on probation
    assert play_drawn(paused_in_time=True) == [0, 1, 2]  # and waited for: its update counts
    assert rounds.registry.given_up() == [] and rounds.learners.pushed[-1] == [0, 1, 2]
    assert misses_left(rounds.registry, 2) == MAX_MISSED_ROUNDS  # its record is clear


class CommitsAll:
    """A secure round's setup that commits every learner it is given (the protocol itself: test_secure_rounds)."""

    def __init__(self) -> None:
        self.begun: list[list[int]] = []

    def begin(self, round_index, members, unable):
        self.begun.append(sorted(members))
        return sorted(members)


def test_a_secure_round_waits_for_three_learners_taking_joiners_and_stalls_without_them(tmp_path, background):
    rounds = rounds_of(tmp_path, "--learners", "3", "--secure-aggregation")
    rounds.federation.secure = secure = CommitsAll()  # type: ignore[assignment]
    join(rounds, 1, 2)
    opening = background.submit(rounds.federation.open)
    time.sleep(0.1)
    assert not opening.done() and secure.begun == [], "two learners: the phases wait"
    join(rounds, 3)
    opening.result(timeout=PATIENCE_S)
    assert secure.begun == [[0, 1, 2]], "the joiner takes part"
    stalling = rounds_of(tmp_path / "stall", "--learners", "3", "--secure-aggregation", register_s=STALL_S)
    stalling.federation.secure = CommitsAll()  # type: ignore[assignment]
    join(stalling, 1, 2)
    with pytest.raises(Stalled, match="fewer than 3 learners for a secure round"):
        stalling.federation.open()


class RefusingDeltas(AnsweringLearners):
    """Learners that refuse every delta (as one that cannot take them does), answering: Ack(success=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: list[str] = []  # what each state pushed was

    def send(
        self, members, method, request, on_failure, timeout, then=lambda member: None, succeeded=lambda member: None
    ) -> dispatch.Broadcast:
        if method != "SyncModelState":
            return super().send(members, method, request, on_failure, timeout, then, succeeded)
        broadcast = dispatch.Broadcast(list(members.values()))
        for learner_id, member in members.items():
            body = request[learner_id] if isinstance(request, Mapping) else request
            is_delta = "delta_from" in codec.decode(framing.chunk_field(body)).metadata
            self.kinds.append("delta" if is_delta else "full")
            if is_delta:
                on_failure(member, "SyncModelState refused: model state rejected: a delta", dispatch.THERE)
            else:
                succeeded(member)
                then(member)
            broadcast.ended(not is_delta)
        return broadcast


def test_a_learner_that_refuses_a_delta_is_kept_and_sent_full_states_from_then_on(tmp_path, caplog):
    """Not dropped (it would rejoin, take the full state and refuse the next delta, round after round): the full
    state goes to it at once, and only full states after, with one warning saying why."""
    learners = RefusingDeltas()
    rounds = rounds_of(tmp_path, "--rounds", "10", "--compress-down", "int8", learners=learners)
    (member,) = join(rounds, 1)
    for round_index in range(4):
        rounds.federation.push_state(round_index, finished=False)
    assert learners.kinds == ["full", "delta", "full", "full", "full"]
    assert member.learner_id in rounds.registry.members()
    assert "learner 0 refused a delta" in caplog.text and "full states from now on" in caplog.text
