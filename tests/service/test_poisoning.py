"""Poisoning through the mean against a live leader (tests/support/live.py): a hostile SCAFFOLD control, a float16
state pushed past its range, losses a poisoned model gives, and learners that must not quit over the global state."""

import logging
import math

import pytest
import torch

from federated.learner import app as learner_module
from federated.wire import codec
from federated.wire.messages import MAX_LOSS
from tests.support.live import LR, LiveLeader, learner_config, model_hash

PSEUDO = {"kind": "pseudo-gradient", "steps": "1"}  # what a local strategy's update claims (LiveLeader steps once)


def scaffold_update(live: LiveLeader, model_part: float, control: torch.Tensor | None = None) -> dict:
    """An update's tensors for SCAFFOLD: a pseudo-gradient of model_part everywhere, the statistics the leader's
    model holds, and the control change an honest learner sends (pseudo-gradient / (K lr) - c, K = 1) unless
    control gives another."""
    model = live.leader.global_model
    layout = model.layout
    flat = torch.zeros(layout.size)
    flat[: layout.parameter_count] = model_part
    layout.read_buffers(flat)
    flat[layout.controls] = model_part / LR - model.strategy.control if control is None else control
    return layout.wire_tensors(flat)


@pytest.fixture
def scaffold(tmp_path, port):
    live = LiveLeader.start(tmp_path, port, "--learners", "2", "--batch-size", "8", "--strategy", "scaffold")
    yield live
    live.stop()


def test_a_hostile_scaffold_control_is_discarded_and_honest_rounds_after_it_apply(scaffold):
    live, credentials = scaffold, scaffold.enrol(2)
    control = live.leader.global_model.strategy.control

    def round_of(*controls: torch.Tensor | None) -> str | None:
        for learner, (credential, change) in enumerate(zip(credentials, controls)):
            chunk = live.gradient(learner, tensors=scaffold_update(live, 1e-3, change), **PSEUDO)
            live.send_counted(chunk, credential)
        return live.close_round()[1]

    for _ in range(3):
        assert round_of(None, None) is None
    honest_norm = torch.linalg.vector_norm(control).item()
    layout = live.leader.global_model.layout
    weights = torch.linalg.vector_norm(torch.cat([p.detach().reshape(-1) for _, p in layout.parameters])).item()
    # one hostile update (of two) that sets |c| to 8 times the weights' norm: inside the old bound (10 times)
    hostile = torch.full_like(control, 2 * 8 * weights / control.numel() ** 0.5) - control
    refused = round_of(None, hostile)
    assert refused is not None and "control variate's change" in refused, refused
    assert torch.linalg.vector_norm(control).item() == pytest.approx(honest_norm)
    for _ in range(3):  # honest rounds after it apply, and the control stays what honest rounds make it
        assert round_of(None, None) is None
    assert torch.linalg.vector_norm(control).item() < 2 * honest_norm


def test_a_learner_commits_its_control_change_only_for_an_applied_round(scaffold):
    live = scaffold
    pool = learner_module.Learner(learner_config(["--leader", live.address, "--host", "127.0.0.1"])).connect()
    assert isinstance(pool, learner_module.Pool)
    learner = pool.members[0]
    try:
        (hostile,) = live.enrol(1)  # (starts the real learner too)
        replica, model = learner.replica, live.leader.global_model
        for round_index, poison, applied in ((0, 1e30, False), (1, 1e-3, True)):
            replica.gradient[:] = 1e-3
            replica.gradient[replica.layout.controls] = 1e-3 / LR - model.strategy.control
            change = replica.gradient[replica.layout.controls].clone()
            # taken: its control change awaits the leader's word
            learner.send_update(round_index, 1.0, learner.round_plan())
            live.accumulate(live.gradient(1, tensors=scaffold_update(live, poison), **PSEUDO), hostile)
            live.leader.collector.close(model.mean_gradient)
            discarded = model.step(LR)
            assert (discarded is None) == applied, discarded
            model.count_round(discarded, stepped=True)
            model.publish(round_index + 1, finished=False, plan=live.leader.planner.plan(round_index + 1, None))
            own = replica.controls.own.clone()
            replica.adopt(codec.decode(model.encoded_state), fetched=False)
            torch.testing.assert_close(replica.controls.own, own + change if applied else own)
    finally:
        pool.stop(0)


def test_a_float16_step_that_would_overflow_the_wire_is_discarded_and_the_model_unchanged(tmp_path, port):
    live = LiveLeader.start(
        tmp_path, port, "--learners", "1", "--batch-size", "8", "--strategy", "fedavg", "--wire-dtype", "float16"
    )
    try:
        (credential,) = live.enrol(1)
        model = live.leader.global_model
        layout = model.layout
        name, bias = layout.parameters[-1]  # the classifier's bias, grown 1.5 times a round from 5
        where = layout.parameter_count - bias.numel()
        target, refused, largest = 5.0, None, torch.finfo(torch.float16).max
        while refused is None and bias[0].item() <= largest:
            flat = torch.zeros(layout.size)
            layout.read_buffers(flat)
            flat[where] = bias[0].item() - target  # w0 - w: the bias becomes target
            before = model_hash(model.model)
            live.send_counted(live.gradient(0, tensors=layout.wire_tensors(flat), **PSEUDO), credential)
            refused = live.close_round()[1]
            target = 1.5 * bias[0].item()
        assert refused is not None and f"{name} beyond float16's range" in refused, refused
        assert target > largest > bias[0].item(), (target, bias[0].item())
        assert model_hash(model.model) == before
        model.publish(live.leader.collector.round, finished=False, plan=live.leader.planner.plan(0, None))
        state = codec.decode(model.encoded_state)
        assert all(torch.isfinite(tensor).all() for tensor in state.tensors.values() if tensor.is_floating_point())
    finally:
        live.stop()


def test_a_loss_is_advisory_clamped_or_left_out_never_a_reason_to_refuse_an_update(live):
    credentials = live.enrol(2)
    for losses, train_loss, recorded in (
        (("3.2e6", "nan"), MAX_LOSS, (MAX_LOSS, math.nan)),
        (("-3", "inf"), MAX_LOSS / 2, (0.0, MAX_LOSS)),
    ):
        for learner, (credential, loss) in enumerate(zip(credentials, losses)):
            live.send_counted(live.gradient(learner, loss=loss), credential)
        summary, refused = live.close_round()
        assert (summary.learners, refused, summary.loss) == (2, None, train_loss)
        torch.testing.assert_close([loss for _, loss in summary.per_learner.values()], list(recorded), equal_nan=True)


def test_a_learner_whose_update_the_global_model_makes_non_finite_sits_the_round_out(live, caplog):
    pool = learner_module.Learner(learner_config(["--leader", live.address, "--host", "127.0.0.1"])).connect()
    assert isinstance(pool, learner_module.Pool)
    learner = pool.members[0]
    try:
        live.leader.registry.take_joiners()
        learner.replica.gradient.fill_(float("nan"))  # what a poisoned state gives on this learner's data
        with caplog.at_level(logging.WARNING, logger="learner"):
            learner.send_update(0, float("nan"), learner.round_plan())  # no GradientRefused: it goes on
        assert "sits this round out" in caplog.text and live.leader.collector.reported() == 0
        assert learner.sent_round == 0  # the same state pushed again is no new round for it
    finally:
        pool.stop(0)
