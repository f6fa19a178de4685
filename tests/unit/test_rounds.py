"""Leader bookkeeping: registration slots bound to credentials, and the round collector's counting rules."""

import time

import pytest
import torch

from federated.core.aggregation import Median
from federated.leader.collector import RoundCollector
from federated.leader.registry import (
    ACTIVE,
    DROPPED,
    JOINING,
    MAX_BACKOFF_EXPONENT,
    MAX_MISSED_ROUNDS,
    NOT_SERVING,
    SERVING,
    STARTING,
    Refusal,
    Registry,
    check_address,
)
from federated.net.rpc import session_id


@pytest.mark.parametrize("address", ["10.0.0.2:50052", "learner-1.local:1", "[::1]:8080", "host_a:65535"])
def test_valid_addresses(address):
    assert check_address(address) is None


@pytest.mark.parametrize("address", ["", "host", ":50051", "host:", "host:0", "host:65536", "a b:1", "host:12x"])
def test_invalid_addresses_say_why(address):
    assert repr(address) in (check_address(address) or "")


def test_an_overlong_address_is_refused_without_echoing_it():
    reason = check_address("h" * 10_000 + ":1")
    assert "10002 characters" in reason and len(reason) < 100


def register(registry: Registry, address: str, credential: str | None = None):
    member, _ = registry.register(address, credential)
    return member


def start(registry: Registry) -> dict:
    """What the round loop does with joiners, and their StartTraining accepted."""
    joiners = registry.take_joiners()
    for member in joiners.values():
        registry.started(member.learner_id, member.generation)
    return joiners


def test_registry_assigns_ids_and_distinct_credentials_and_refuses_beyond_capacity():
    registry = Registry(2, keep_s=30, reregister_s=0)
    first, second = register(registry, "a:1"), register(registry, "b:1")
    assert (first.learner_id, second.learner_id) == (0, 1) and first.credential != second.credential
    with pytest.raises(Refusal) as refusal:
        register(registry, "c:1")
    assert refusal.value.retry and "all 2 learner slots are held" in str(refusal.value)
    assert registry.wait_for(2, 0) and registry.count() == 2


def test_registered_learners_are_started_once_and_counted_on_from_then():
    registry = Registry(2, keep_s=30, reregister_s=0)
    member = register(registry, "a:1")
    assert not registry.is_active(0)
    assert registry.take_joiners() == {0: member}
    assert registry.active() == [0] and registry.take_joiners() == {}  # starting: rounds count on it
    assert registry.authenticate(member.credential, None)[1] == STARTING
    with pytest.raises(Refusal, match="being started"):  # one start at a time
        register(registry, "a:1", member.credential)
    registry.started(0, member.generation - 1)
    assert registry.authenticate(member.credential, None)[1] == STARTING
    registry.started(0, member.generation)
    assert registry.authenticate(member.credential, None)[1] == ACTIVE


def test_only_the_holders_credential_re_registers_a_held_address():
    registry = Registry(2, keep_s=30, reregister_s=0)
    holder = register(registry, "a:1")
    start(registry)
    for credential in (None, "guess"):
        with pytest.raises(Refusal) as refusal:
            register(registry, "a:1", credential)
        assert refusal.value.retry and refusal.value.probe == (0,)
    assert registry.is_active(0)
    again = register(registry, "a:1", holder.credential)
    assert (again.learner_id, again.credential) == (0, holder.credential) and again.generation == holder.generation + 1
    assert not registry.is_active(0) and registry.take_joiners() == {0: again}


def test_a_holder_may_move_to_a_new_address():
    registry = Registry(1, keep_s=30, reregister_s=0)
    holder = register(registry, "a:1")
    moved = register(registry, "b:2", holder.credential)
    assert moved.learner_id == 0 and registry.at("b:2") == moved and registry.at("a:1") is None


def test_a_dropped_slot_is_kept_for_its_holder_then_freed():
    registry = Registry(2, keep_s=0.3)
    register(registry, "a:1"), register(registry, "b:1")
    joined = registry.take_joiners()
    assert registry.drop(1, joined[1].generation)
    with pytest.raises(Refusal) as refusal:
        register(registry, "c:1")
    assert refusal.value.probe == (1,)  # the leader should check whether the holder is really gone
    time.sleep(0.35)
    member, message = registry.register("c:1")
    assert member.learner_id == 1 and "took over from b:1 the slot of learner 1" in message
    assert member.credential != joined[1].credential
    with pytest.raises(Refusal):  # the old holder's credential holds nothing any more...
        register(registry, "b:1", joined[1].credential)


def test_a_slot_found_gone_is_free_at_once_and_the_same_address_may_take_it():
    registry = Registry(1, keep_s=600)
    old = register(registry, "a:1")
    registry.take_joiners()
    assert registry.drop(0, old.generation, gone=True)
    new = register(registry, "a:1")  # a restarted learner that lost its credential
    assert new.learner_id == 0 and new.credential != old.credential


def test_news_about_an_earlier_registration_changes_nothing():
    registry = Registry(1, keep_s=30, reregister_s=0)
    first = register(registry, "a:1")
    second = register(registry, "a:1", first.credential)
    start(registry)
    assert not registry.drop(0, first.generation)  # a late failure of a push to the first registration
    assert registry.is_active(0)
    assert registry.drop(0, second.generation) and not registry.is_active(0)


def test_a_learner_the_leader_never_reached_at_its_address_is_told_so_when_it_registers_from_there_again():
    registry = Registry(2, keep_s=600, reregister_s=0)
    member = register(registry, "10.0.0.9:7001")
    registry.take_joiners()  # its start failed: nothing answers at 10.0.0.9
    assert registry.never_reached(member)
    assert registry.drop(0, member.generation, unreachable="StartTraining failed: UNAVAILABLE No route to host")
    with pytest.raises(Refusal) as refusal:
        register(registry, "10.0.0.9:7001", member.credential)
    assert not refusal.value.retry  # final: from there it would only be dropped again
    assert "cannot reach this learner at 10.0.0.9:7001" in str(refusal.value)
    assert "No route" not in str(refusal.value)  # why is the leader's to know: no port scans through it
    assert "--advertise" in str(refusal.value)
    assert register(registry, "10.0.0.9:7002", member.credential).learner_id == 0  # a new address is tried
    assert register(registry, "b:1").learner_id == 1


def test_a_slot_the_leader_could_not_dial_is_free_for_a_newcomer_at_once():
    registry = Registry(1, keep_s=600, reregister_s=0)
    member = register(registry, "a:1")
    registry.take_joiners()
    registry.drop(0, member.generation, unreachable="StartTraining failed: UNAVAILABLE")
    assert register(registry, "b:1").learner_id == 0


def test_a_learner_reached_at_its_address_before_is_never_taken_for_unreachable():
    registry = Registry(1, keep_s=600, reregister_s=0)
    member = register(registry, "a:1")
    start(registry)
    assert not registry.never_reached(member)
    again = register(registry, "a:1", member.credential)  # after a link went down, say
    assert not registry.never_reached(again)
    moved = register(registry, "b:2", member.credential)
    assert registry.never_reached(moved)


def test_sessions_report_held_dropped_and_unknown_registrations():
    registry = Registry(1, keep_s=30, reregister_s=0)
    member = register(registry, "a:1")
    session = session_id(member.credential)
    assert registry.session_status(session) == SERVING
    registry.drop(0, member.generation)
    assert registry.session_status(session) == NOT_SERVING
    assert registry.session_status(session_id("other")) is None


def test_restored_slots_wait_for_their_credentials():
    registry = Registry(
        2,
        keep_s=30,
        restored=[{"address": "a:1", "credential": "secret-a"}, {"address": "b:1", "credential": "secret-b"}],
    )
    assert registry.count() == 0
    with pytest.raises(Refusal):
        register(registry, "b:1")
    assert register(registry, "b:1", "secret-b").learner_id == 1
    assert register(registry, "a:1", "secret-a").learner_id == 0
    assert [record["credential"] for record in registry.records()] == ["secret-a", "secret-b"]


def test_states_move_from_joining_to_active_to_dropped():
    registry = Registry(1, keep_s=30, reregister_s=0)
    member = register(registry, "a:1")
    assert registry.authenticate(member.credential, None) == (member, JOINING)
    start(registry)
    assert registry.authenticate(member.credential, None)[1] == ACTIVE
    registry.drop(0, member.generation)
    assert registry.authenticate(member.credential, None)[1] == DROPPED
    assert registry.authenticate("wrong", None) is None and registry.authenticate(None, None) is None


def test_a_slot_registered_with_a_certificate_needs_it():
    registry = Registry(1, keep_s=30, reregister_s=0)
    member, _ = registry.register("a:1", None, "fingerprint-1")
    assert registry.authenticate(member.credential, "fingerprint-1") is not None
    assert registry.authenticate(member.credential, "fingerprint-2") is None
    assert registry.authenticate(member.credential, None) is None


def test_registry_refuses_malformed_addresses():
    registry = Registry(1, keep_s=30, reregister_s=0)
    with pytest.raises(Refusal) as refusal:
        register(registry, "")
    assert not refusal.value.retry and registry.records() == []


def test_collector_weights_by_samples_and_opens_the_next_round():
    collector = RoundCollector(2)
    collector.expect([0, 1])
    assert collector.submit(0, 0, [torch.tensor([1.0, 0.0])], samples=1, loss=1.0, wire_bytes=10) is None
    assert not collector.wait_complete(0)
    assert (
        collector.submit(1, 0, [torch.tensor([4.0]), torch.tensor([3.0]).half()], samples=3, loss=2.0, wire_bytes=10)
        is None
    )
    assert collector.wait_complete(0)
    mean = torch.empty(2)
    summary = collector.close(mean)
    assert torch.allclose(mean, torch.tensor([13 / 4, 9 / 4]))
    assert (summary.round, summary.learners, summary.samples, summary.bytes_in) == (0, 2, 4, 20)
    assert summary.loss == pytest.approx(7 / 4)
    assert collector.round == 1


def test_collector_ignores_duplicates_and_other_rounds():
    collector = RoundCollector(1, first_round=4)
    collector.expect([0, 1])
    assert collector.submit(0, 4, [torch.ones(1)], 1, 0.0, 1) is None
    assert "duplicate" in collector.submit(0, 4, [torch.ones(1)], 1, 0.0, 1)
    assert "round 5 ignored: round 4 is open" in collector.submit(1, 5, [torch.ones(1)], 1, 0.0, 1)
    assert collector.missing() == [1] and collector.reported() == 1
    mean = torch.empty(1)
    collector.close(mean)
    assert mean.item() == 1.0
    assert "round 4 ignored" in collector.submit(1, 4, [torch.ones(1)], 1, 0.0, 1)


def test_a_round_nobody_is_expected_in_is_never_complete_and_cannot_close_empty():
    collector = RoundCollector(1)
    collector.expect([])
    assert not collector.wait_complete(0)
    with pytest.raises(RuntimeError, match="no gradient"):
        collector.close(torch.empty(1))


def test_a_holder_registers_again_at_most_every_few_seconds():
    registry = Registry(1, keep_s=30, reregister_s=0.3)
    holder = register(registry, "a:1")
    start(registry)
    with pytest.raises(Refusal, match=r"registered 0\.0 s ago") as refusal:
        register(registry, "a:1", holder.credential)  # each registration costs the leader a start: no lever
    assert refusal.value.retry
    time.sleep(0.35)
    assert register(registry, "a:1", holder.credential).learner_id == 0


def miss(registry: Registry, learner_id: int, rounds: int) -> None:
    """The learner misses this many rounds in a row (rounds it held its slot for)."""
    for _ in range(rounds):
        registry.missed([learner_id], since=time.monotonic())


def test_a_holder_missing_round_after_round_is_given_up_on_until_an_update_of_its_counts():
    registry = Registry(2, keep_s=30, reregister_s=0)
    holder, other = register(registry, "a:1"), register(registry, "b:1")
    start(registry)
    miss(registry, 0, MAX_MISSED_ROUNDS - 1)
    assert registry.ready() == [0, 1]
    assert registry.missed([0], since=time.monotonic()) == {0: 1}  # given up on (once): announced once
    assert registry.missed([0], since=time.monotonic()) == {}
    assert registry.ready() == [1] and registry.given_up() == [0] and registry.active() == [0, 1]
    again = register(registry, "a:1", holder.credential)  # re-registering proves nothing: still given up on
    start(registry)
    assert registry.ready() == [1] and registry.given_up() == [0]
    registry.participated(0, holder.generation)  # news about an earlier registration changes nothing
    assert registry.given_up() == [0]
    registry.participated(0, again.generation)
    assert registry.ready() == [0, 1] and registry.given_up() == []
    miss(registry, 0, MAX_MISSED_ROUNDS - 1)
    registry.participated(1, other.generation)  # an update of another learner changes nothing for it
    assert registry.missed([0], since=time.monotonic()) == {0: 1}


def test_a_newcomer_may_take_the_slot_of_a_holder_given_up_on_and_is_one_miss_from_its_next_bench():
    registry = Registry(2, keep_s=30, reregister_s=0)
    given_up, _ = register(registry, "a:1"), register(registry, "b:1")
    start(registry)
    opened = time.monotonic()
    miss(registry, 0, MAX_MISSED_ROUNDS)
    newcomer, message = registry.register("c:1")
    assert newcomer.learner_id == 0 and "took over from a:1 the slot of learner 0" in message
    assert registry.given_up() == [] and registry.authenticate(given_up.credential, None) is None
    assert registry.missed([0], since=opened) == {}  # the round it joined in is not held against it...
    start(registry)
    assert registry.ready() == [0, 1]  # ...the next waits for it...
    miss(registry, 1, MAX_MISSED_ROUNDS - 1)
    with pytest.raises(Refusal, match="all 2 learner slots are held"):  # ...and a holder short of it keeps its slot
        register(registry, "d:1")
    with pytest.raises(Refusal):  # the old holder's credential holds nothing now
        register(registry, "a:1", given_up.credential)
    # the slot's strikes stay until an update counts: one miss and the newcomer sits out the next, longer bench
    assert registry.missed([0], since=time.monotonic()) == {0: 2}
    assert sit_out(registry, 0) == 4


def test_a_holder_given_up_on_gains_nothing_by_registering_again_as_a_newcomer():
    registry = Registry(1, keep_s=30, reregister_s=0)
    register(registry, "a:1")
    start(registry)
    miss(registry, 0, MAX_MISSED_ROUNDS)
    for strikes in range(1, 5):  # each time it comes back without its credential, from its address or another
        assert registry.given_up() == [0]
        again, message = registry.register("a:1" if strikes % 2 else "a:2")
        assert again.learner_id == 0 and "learner 0" in message
        start(registry)
        assert registry.ready() == [0] and registry.given_up() == []  # waited for once...
        assert registry.missed([0], since=time.monotonic()) == {0: strikes + 1}  # ...and benched longer at once
        assert sit_out(registry, 0) == 2 ** (strikes + 1)


def test_a_free_slot_goes_to_a_newcomer_before_that_of_a_holder_given_up_on():
    registry = Registry(2, keep_s=0, reregister_s=0)
    register(registry, "a:1"), register(registry, "b:1")
    joined = start(registry)
    miss(registry, 0, MAX_MISSED_ROUNDS)
    registry.drop(1, joined[1].generation, gone=True)
    assert register(registry, "c:1").learner_id == 1 and registry.given_up() == [0]


def sit_out(registry: Registry, learner_id: int) -> int:
    """Close rounds until the learner's bench ends (each round opened after it was given up on): how many it sat
    out, left out of every one of them."""
    for closed in range(1, 2 * 2**MAX_BACKOFF_EXPONENT):
        assert learner_id not in registry.ready()
        if learner_id in registry.round_closed(since=time.monotonic()):
            return closed
    raise AssertionError(f"learner {learner_id} sat out rounds without end")


def test_a_holder_given_up_on_sits_out_twice_as_many_rounds_each_time_in_a_row_then_one_round_waits_for_it():
    registry = Registry(2, keep_s=30, reregister_s=0)
    holder, _ = register(registry, "a:1"), register(registry, "b:1")
    start(registry)
    opened = time.monotonic()
    miss(registry, 0, MAX_MISSED_ROUNDS - 1)
    assert registry.missed([0], since=opened) == {0: 1}
    assert registry.round_closed(since=opened) == []  # the round it was given up in is not one it sat out
    assert registry.missed([0], since=time.monotonic()) == {}  # nor is a round that leaves it out held against it
    benches = [sit_out(registry, 0)]
    for times in range(2, MAX_BACKOFF_EXPONENT + 3):
        assert registry.ready() == [0, 1] and registry.given_up() == [0]  # on probation: waited for, drawn
        assert registry.missed([0], since=time.monotonic()) == {0: times}  # one miss, and it is out again
        benches.append(sit_out(registry, 0))
    assert benches == [2, 4, 8, 16, 32, 64, 64, 64]  # 2**k, at most 2**MAX_BACKOFF_EXPONENT
    assert registry.participated(0, holder.generation)  # its update counted on probation: it had been given up on
    assert registry.given_up() == [] and registry.ready() == [0, 1]
    assert not registry.participated(0, holder.generation)
    miss(registry, 0, MAX_MISSED_ROUNDS - 1)  # its record is clear: 3 misses again, then the shortest bench
    assert registry.missed([0], since=time.monotonic()) == {0: 1}
    assert sit_out(registry, 0) == 2


def test_a_newcomer_may_take_the_slot_of_a_holder_on_probation_and_keeps_its_strikes_until_it_takes_part():
    registry = Registry(1, keep_s=30, reregister_s=0)
    holder = register(registry, "a:1")
    start(registry)
    miss(registry, 0, MAX_MISSED_ROUNDS)
    sit_out(registry, 0)
    assert registry.missed([0], since=time.monotonic()) == {0: 2}
    sit_out(registry, 0)  # on probation again, given up on twice in a row
    newcomer, message = registry.register("c:1")
    assert newcomer.learner_id == 0 and "took over from a:1" in message
    assert registry.authenticate(holder.credential, None) is None and registry.given_up() == []
    joined = start(registry)
    assert registry.ready() == [0]
    registry.participated(0, joined[0].generation)  # an update of its counts: a clear record
    miss(registry, 0, MAX_MISSED_ROUNDS - 1)  # not given up on at its first miss, as its predecessor would be
    assert registry.missed([0], since=time.monotonic()) == {0: 1}
    assert sit_out(registry, 0) == 2


def test_a_deadline_names_the_missing_once_and_closing_names_only_the_others():
    collector = RoundCollector(1)
    collector.expect([0, 1, 2])
    collector.submit(0, 0, [torch.ones(1)], 1, 0.0, 1)
    assert collector.overdue() == [1, 2]
    assert collector.overdue() == [1, 2]  # a second deadline of the same round: missed again
    collector.expect([0, 1, 2, 3])  # (a draw again, say) 3 is expected from now on
    collector.stop_waiting_for([2])  # given up on
    assert collector.missing() == [1, 3]
    assert collector.submit(2, 0, [torch.ones(1)], 1, 0.0, 1) is None  # its update still counts
    assert collector.close(torch.empty(1)).missed == (3,)
    collector.expect([0])
    collector.submit(0, 1, [torch.ones(1)], 1, 0.0, 1)
    assert collector.close(torch.empty(1)).missed == ()


def test_a_round_short_of_what_its_rule_needs_is_not_complete_whoever_is_expected():
    collector = RoundCollector(1, rule=Median())
    collector.expect([0, 1])
    for learner in (0, 1):
        collector.submit(learner, 0, [torch.ones(1)], 1, 0.0, 1)
    assert not collector.wait_complete(0)  # closed, the round would only be discarded
    collector.submit(2, 0, [torch.ones(1)], 1, 0.0, 1)  # a newcomer's update counts in the open round
    assert collector.wait_complete(0)


def test_with_sampling_only_the_drawn_count_and_a_second_draw_keeps_the_first_ones():
    collector = RoundCollector(1)
    collector.expect([], sampled=[])  # before the first draw nobody's update counts
    assert "not sampled" in collector.submit(0, 0, [torch.ones(1)], 1, 0.0, 1)
    collector.expect([0, 1, 2], sampled=[0, 1])
    assert collector.missing() == [0, 1]
    assert "not sampled" in collector.submit(2, 0, [torch.ones(1)], 1, 0.0, 1)
    collector.expect([0, 1, 2], sampled=[2], widen=True)  # drawn again: 0 and 1 may still deliver
    assert collector.missing() == [2]
    assert collector.submit(1, 0, [torch.ones(1)], 1, 0.0, 1) is None
    assert collector.submit(2, 0, [torch.ones(1)], 1, 0.0, 1) is None
    assert collector.wait_complete(0)
    collector.close(torch.empty(1))
    collector.expect([0, 1, 2], sampled=[0])  # the next round's draw replaces the last
    assert "not sampled" in collector.submit(1, 1, [torch.ones(1)], 1, 0.0, 1)


def test_a_restored_slot_counts_its_address_as_reached():
    registry = Registry(1, keep_s=30, restored=[{"address": "10.0.0.5:7000", "credential": "secret"}], reregister_s=0)
    member, _ = registry.register("10.0.0.5:7000", "secret")
    assert not registry.never_reached(member)  # it trained there before the leader restarted
    moved, _ = registry.register("10.0.0.6:7000", "secret")
    assert registry.never_reached(moved)
