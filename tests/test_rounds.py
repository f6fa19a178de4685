"""Leader bookkeeping: registration slots and the round collector's counting rules."""

import pytest
import torch

from rounds import Registry, RoundCollector, check_address


@pytest.mark.parametrize("address", ["10.0.0.2:50052", "learner-1.local:1", "[::1]:8080", "host_a:65535"])
def test_valid_addresses(address):
    assert check_address(address) is None


@pytest.mark.parametrize("address", ["", "host", ":50051", "host:", "host:0", "host:65536", "a b:1", "host:12x"])
def test_invalid_addresses_say_why(address):
    assert repr(address) in (check_address(address) or "")


def test_registry_assigns_ids_in_order_and_refuses_beyond_capacity():
    registry = Registry(2)
    assert registry.register("a:1")[0] == 0
    assert registry.register("b:1")[0] == 1
    learner_id, message = registry.register("c:1")
    assert learner_id is None and "already has its 2 learners" in message
    assert registry.wait_for(2, 0) and registry.count() == 2


def test_registered_learners_join_once_and_then_count_as_active():
    registry = Registry(2)
    registry.register("a:1")
    assert not registry.is_active(0)
    assert registry.take_joiners() == {0: "a:1"}
    assert registry.active() == [0] and registry.take_joiners() == {}


def test_a_known_address_gets_its_slot_back_and_rejoins():
    registry = Registry(2)
    registry.register("a:1")
    registry.take_joiners()
    assert registry.register("a:1")[0] == 0
    assert registry.addresses() == ["a:1"] and not registry.is_active(0)
    assert registry.take_joiners() == {0: "a:1"}


def test_a_new_address_takes_a_dropped_slot():
    registry = Registry(2)
    registry.register("a:1"), registry.register("b:1")
    registry.take_joiners()
    assert registry.register("c:1")[0] is None
    registry.drop(1)
    learner_id, message = registry.register("c:1")
    assert learner_id == 1 and "took over the slot of b:1" in message
    assert registry.addresses() == ["a:1", "c:1"]


def test_restored_addresses_reclaim_their_slots():
    registry = Registry(2, ["x:1", "y:1"])
    assert registry.count() == 0
    assert registry.register("y:1")[0] == 1
    assert registry.register("x:1")[0] == 0


def test_registry_refuses_malformed_addresses():
    registry = Registry(1)
    assert registry.register("")[0] is None
    assert registry.addresses() == []


def test_collector_weights_by_samples_and_opens_the_next_round():
    collector = RoundCollector(2)
    collector.expect([0, 1])
    assert collector.submit(0, 0, torch.tensor([1.0, 0.0]), samples=1, loss=1.0, wire_bytes=10) is None
    assert not collector.wait_complete(0)
    assert collector.submit(1, 0, torch.tensor([4.0, 3.0]), samples=3, loss=2.0, wire_bytes=10) is None
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
    assert collector.submit(0, 4, torch.ones(1), 1, 0.0, 1) is None
    assert "duplicate" in collector.submit(0, 4, torch.ones(1), 1, 0.0, 1)
    assert "round 5 ignored: round 4 is open" in collector.submit(1, 5, torch.ones(1), 1, 0.0, 1)
    assert collector.missing() == [1] and collector.reported() == 1
    mean = torch.empty(1)
    collector.close(mean)
    assert mean.item() == 1.0
    assert "round 4 ignored" in collector.submit(1, 4, torch.ones(1), 1, 0.0, 1)
