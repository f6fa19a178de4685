"""Compressed updates learner -> leader, without sockets: the plan's codec on the wire, the update's claim, the
flags that combine, and the running sum a compressed update is decoded into."""

import dataclasses
import logging
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from federated.core import compression, strategies
from federated.core.aggregation import Median, RoundUpdates
from federated.core.layout import GradientLayout, wire_state
from federated.core.plan import TrainingPlan
from federated.leader.config import LeaderConfig, compression_caveat
from federated.leader.data import DataFacts
from federated.leader.planner import Planner
from federated.leader.servicer import decode_update
from federated.learner.app import Member
from federated.learner.state import Replica
from federated.wire import codec, messages
from federated.wire.messages import StateInfo, UpdateInfo
from model import build_model
from tests.support.live import leader_config


def planned(**flags) -> TrainingPlan:
    """Round 0's plan of a leader with these flags."""
    run = LeaderConfig(**flags)
    return Planner(run, strategies.named(run.strategy)(run), DataFacts([0.5] * 3, [0.25] * 3, 5000)).plan(0, None)


@pytest.mark.parametrize("strategy", ["fedsgd", "fedavg"])
def test_a_plan_without_compression_carries_the_metadata_it_carried_before(strategy):
    metadata = messages.plan_to_metadata(planned(strategy=strategy))
    assert not [key for key in metadata if key.startswith("compress")]
    assert messages.plan_to_metadata(planned(strategy=strategy, compress="none")) == metadata


@pytest.mark.parametrize("strategy", ["fedsgd", "scaffold"])
@pytest.mark.parametrize(
    "flags",
    [{"compress": "topk", "compress_ratio": 0.05}, {"compress": "powersgd", "compress_rank": 4}, {"compress": "int4"}],
)
def test_a_compressed_plan_tells_learners_its_codec_and_round_trips(strategy, flags):
    plan = planned(strategy=strategy, **flags)
    assert plan.compress == flags["compress"]
    assert messages.plan_to_metadata(plan)["compress"] == flags["compress"]
    assert messages.plan_from_metadata(messages.plan_to_metadata(plan)) == plan


@pytest.mark.parametrize(
    "fields, says",
    [
        ({"compress": "zstd"}, "unknown codec 'zstd'"),
        ({"compress": "topk", "compress_ratio": "0", "compress_rank": "2"}, "compress_ratio"),
        ({"compress": "topk", "compress_ratio": "nan", "compress_rank": "2"}, "compress_ratio"),
        ({"compress": "powersgd", "compress_ratio": "0.01", "compress_rank": "65"}, "compress_rank"),
        ({"compress": "powersgd", "compress_ratio": "0.01"}, "compress_rank"),
    ],
)
def test_a_learner_refuses_a_plan_whose_codec_it_does_not_know_or_whose_settings_are_out_of_bounds(fields, says):
    with pytest.raises(codec.PayloadError, match=says):
        messages.plan_from_metadata(fields)


def test_an_update_names_its_codec_only_when_compressed():
    plain = UpdateInfo(0, 3, 64, 0.5)
    assert plain.to_metadata() == {"learner_id": "0", "round": "3", "samples": "64", "loss": "0.5"}
    compressed = UpdateInfo(0, 3, 64, 0.5, "pseudo-gradient", 2, "topk")
    payload = codec.decode(codec.encode({}, compressed.to_metadata()))
    assert UpdateInfo.from_payload(payload) == compressed
    with pytest.raises(codec.PayloadError, match="must name a codec"):
        UpdateInfo.from_payload(codec.decode(codec.encode({}, {**plain.to_metadata(), "compress": "zip"})))


def test_compression_is_refused_under_secure_aggregation_and_combines_with_robust_rules_and_dp():
    with pytest.raises(SystemExit):
        leader_config(["--compress", "topk", "--secure-aggregation", "--learners", "3"])
    for flags in (
        ["--aggregator", "median", "--learners", "3"],
        ["--dp", "central", "--norm", "group"],
        ["--strategy", "scaffold"],
    ):
        assert leader_config(["--compress", "powersgd", *flags]).compress == "powersgd"


def update_layout() -> GradientLayout:
    """A layout with a tensor large enough to be compressed (a 32x64 linear weight) beside small ones."""
    return GradientLayout(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32)))


@pytest.mark.parametrize("name", ["topk", "powersgd", "int8"])
def test_a_compressed_update_is_summed_in_place_as_a_robust_rule_sees_it_whole(name):
    torch.manual_seed(0)
    layout = update_layout()
    settings = (name, 0.1, 2)
    assert compression.compressed_names(layout.shapes, name)  # (something is compressed)
    sent = [compression.Compressor(*settings, layout.shapes, seed=0).compress(layout.views(torch.rand(layout.size)))]
    sent.append(
        compression.Compressor(*settings, layout.shapes, seed=0).compress(layout.views(torch.rand(layout.size)))
    )
    decoded = []
    for entries in sent:
        dense = torch.zeros(layout.size)
        compression.decode_add(entries, layout.views(dense), 1.0, *settings)
        decoded.append(dense)
    streamed, robust = RoundUpdates(layout.size, layout.size), RoundUpdates(layout.size, layout.size, Median())
    for samples, entries in zip((3, 5), sent):
        streamed.add_decoded(partial(decode_update, layout, entries, settings), samples, 0.5)
        robust.add_decoded(partial(decode_update, layout, entries, settings), samples, 0.5)
    mean, kept = torch.empty(layout.size), torch.stack(robust.kept)
    streamed.combine_into(mean)
    torch.testing.assert_close(mean, (3 * decoded[0] + 5 * decoded[1]) / 8)
    torch.testing.assert_close(kept, torch.stack(decoded))
    assert streamed.samples == robust.samples == 8


def test_a_malformed_compressed_update_leaves_the_running_sum_as_it_was():
    layout, settings = update_layout(), ("topk", 0.1, 2)
    entries = compression.Compressor(*settings, layout.shapes, seed=0).compress(layout.views(torch.rand(layout.size)))
    updates = RoundUpdates(layout.size, layout.size)
    updates.add_decoded(partial(decode_update, layout, entries, settings), 1, 0.5)
    before = updates.total.clone()
    name = next(key for key in entries if key.endswith(":indices"))
    entries[name] = entries[name].clone()
    entries[name][0] = entries[name][1]  # a repeated index
    with pytest.raises(compression.CompressionError, match="repeated"):  # (checked decoding, as tests use)
        updates.add_decoded(
            lambda out, weight: compression.decode_add(entries, layout.views(out), weight, *settings), 1, 0.5
        )
    assert torch.equal(updates.total, before) and updates.samples == 1


def test_a_learner_keeps_its_residuals_from_round_to_round_and_starts_from_zero_when_the_codec_changes(caplog):
    plan = TrainingPlan(compress="topk")
    info = StateInfo("resnet20", 10, 8, 0, (0.5,) * 3, (0.25,) * 3, "float32", image_size=8, plan=plan)
    state = codec.encode(wire_state(build_model("resnet20"), torch.float32), info.to_metadata())
    replica = Replica(codec.decode(state), "cpu")
    assert replica.plan == plan
    replica.gradient.copy_(torch.rand(replica.layout.size))
    with caplog.at_level(logging.INFO, logger="learner"):
        sent = replica.compressed(replica.layout.views(replica.gradient), plan, 0)
        compressor = replica.compressor
        assert compressor is not None and compressor.residuals
        replica.compressed(replica.layout.views(replica.gradient), plan, 0)
        assert replica.compressor is compressor  # the residuals carry over
        replica.compressed(replica.layout.views(replica.gradient), dataclasses.replace(plan, compress_ratio=0.05), 0)
        assert replica.compressor is not compressor
    assert caplog.text.count("error feedback starts from zero residuals") == 2
    # what the learner sends is what the leader admits: every entry, in order, of its dtype and shape
    assert codec.spec_of(sent) == compression.expected(replica.layout.shapes, "topk", 0.01, 2)


@pytest.mark.parametrize("codec_name", ["int8", "powersgd"])
def test_a_learners_compressed_update_repeats_with_the_runs_seed_and_its_id(codec_name):
    plan = TrainingPlan(compress=codec_name)
    info = StateInfo("resnet20", 10, 8, 0, (0.5,) * 3, (0.25,) * 3, "float32", image_size=8, plan=plan)
    state = codec.encode(wire_state(build_model("resnet20"), torch.float32), info.to_metadata())
    update = torch.rand(Replica(codec.decode(state), "cpu").layout.size, generator=torch.Generator().manual_seed(1))

    def sent(learner_id: int) -> dict[str, torch.Tensor]:
        replica = Replica(codec.decode(state), "cpu")
        replica.gradient.copy_(update)
        return replica.compressed(replica.layout.views(replica.gradient), plan, learner_id)

    first, again, other = sent(3), sent(3), sent(4)
    replica = Replica(codec.decode(state), "cpu")
    replica.compressed(replica.layout.views(replica.gradient), plan, 3)
    assert replica.compressor is not None
    # not a small integer: the run's other generators (batches, sampling, the model's start) use those
    assert replica.compressor.generator.initial_seed() >= 2**32
    assert all(torch.equal(first[name], again[name]) for name in first)  # a rerun sends the same bytes
    assert not all(torch.equal(first[name], other[name]) for name in first)  # another learner draws its own


def scaffold_state(round_index: int, plan: TrainingPlan, discarded: int = 0, resets: int = 0) -> codec.Payload:
    """A SCAFFOLD state of round_index (zero server control) with the leader's counts of discarded rounds and
    control resets."""
    info = StateInfo(
        "resnet20", 10, 8, 0, (0.5,) * 3, (0.25,) * 3, "float32", round_index, image_size=8, plan=plan,
        discarded=discarded, control_resets=resets,
    )  # fmt: skip
    model = build_model("resnet20")
    control = torch.zeros(sum(p.numel() for p in model.parameters()))
    return codec.decode(codec.encode(wire_state(model, torch.float32, control), info.to_metadata()))


def control_residuals(replica: Replica) -> list[str]:
    assert replica.compressor is not None
    return [name for name in replica.compressor.residuals if name.startswith("control.")]


def test_a_dropped_or_reset_scaffold_control_change_leaves_no_residual_to_send_later():
    plan = TrainingPlan(strategy="scaffold", compress="topk")
    replica = Replica(scaffold_state(0, plan), "cpu")
    # a discarded round; the controls reset (no change pending: an earlier one's residual); fetched after a loss
    for discarded, resets, fetched, taken in ((1, 0, False, True), (1, 1, False, False), (1, 1, True, True)):
        replica.gradient.copy_(torch.rand(replica.layout.size))
        replica.compressed(replica.layout.views(replica.gradient), plan, 0)
        if taken:
            replica.update_taken(replica.round)
        assert control_residuals(replica) and len(replica.compressor.residuals) > len(control_residuals(replica))
        replica.adopt(scaffold_state(replica.round + 1, plan, discarded, resets), fetched=fetched)
        assert not control_residuals(replica), (discarded, resets, fetched, taken)  # dropped (or reset) with the change
        assert replica.compressor.residuals  # the model's own residuals stay


def test_a_learner_drops_its_residuals_after_an_uncompressed_round_and_when_it_rejoins_another_slot(caplog):
    """Stale residuals never come back: not after a round sent uncompressed, nor in another slot's updates."""
    plan = TrainingPlan(compress="topk")
    info = StateInfo("resnet20", 10, 8, 0, (0.5,) * 3, (0.25,) * 3, "float32", image_size=8, plan=plan)
    replica = Replica(
        codec.decode(codec.encode(wire_state(build_model("resnet20"), torch.float32), info.to_metadata())), "cpu"
    )
    replica.gradient.copy_(torch.rand(replica.layout.size))
    sent: list = []
    member = SimpleNamespace(
        learner_id=0,
        data=range(8),
        replica=replica,
        config=SimpleNamespace(dataset="synthetic"),
        register=lambda deadline: 1,  # another slot
        session=SimpleNamespace(send_update=lambda round_index, request, stop: sent.append(request)),
        server=SimpleNamespace(inbox=SimpleNamespace(has_final=lambda: False)),
    )
    member.update_request, member.send_request = (
        partial(Member.update_request, member),
        partial(Member.send_request, member),
    )
    with caplog.at_level(logging.INFO, logger="learner"):
        Member.send_update(member, 0, 1.0, plan)
        assert replica.compressor is not None and replica.compressor.residuals
        Member.send_update(member, 1, 1.0, TrainingPlan())  # uncompressed
        Member.send_update(member, 2, 1.0, TrainingPlan())
        assert replica.compressor is None
        Member.send_update(member, 3, 1.0, plan)
        Member.rejoin(member, 0.0)
        assert replica.compressor is None and member.learner_id == 1
    assert caplog.text.count("this round's update travels uncompressed; error feedback's residuals are dropped") == 1
    assert "rejoined in another slot" in caplog.text and len(sent) == 4


def test_the_leader_warns_of_robust_aggregators_with_sparse_codecs_only():
    def caveat(**flags) -> str | None:
        return compression_caveat(LeaderConfig(**flags))

    assert "zero wherever fewer than half" in (caveat(compress="topk", aggregator="median") or "")
    assert "Krum's distances" in (caveat(compress="randk", aggregator="krum") or "")
    assert caveat(compress="topk") is None and caveat(compress="int8", aggregator="median") is None
