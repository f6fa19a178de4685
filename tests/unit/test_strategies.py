"""Strategies against their papers: local training, server optimizers, aggregation rules, sampling."""

import copy
import threading
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from federated.core import aggregation, strategies
from federated.core.aggregation import (
    Mean,
    RoundUpdates,
    TrimmedMean,
    clip_to_norm,
    coordinate_median,
    multi_krum,
    trimmed_mean,
)
from federated.core.layout import GradientLayout
from federated.core.plan import TrainingPlan
from federated.core.sampling import sample_participants
from federated.core.schedule import Schedule
from federated.core.steps import GuardedStep, apply_mean_gradient, make_optimizer
from federated.core.strategies.adaptive import Adaptive
from federated.core.strategies.base import ServerOptimizer
from federated.core.strategies.scaffold import ControlCheck, Controls
from federated.core.training import compute_gradient, evaluate
from federated.leader import config
from federated.leader.config import LeaderConfig
from federated.leader.data import DataFacts
from federated.leader.global_model import MAX_DISCARDED_ROUNDS, Diverged, GlobalModel
from federated.leader.metrics import MetricsLog, read_metrics
from federated.leader.planner import Planner
from federated.leader.registry import Member
from federated.leader.servicer import LeaderServicer
from federated.learner import state as learner_state
from federated.learner.app import Member as LearnerMember
from federated.wire import codec, messages
from federated.wire.messages import StateInfo, UpdateInfo
from tests.support.live import leader_from
from tests.support.nets import assert_same_parameters, batch, small_net

ADAPTIVE = [name for name in strategies.names() if issubclass(strategies.named(name), Adaptive)]


def strategy_of(**flags) -> strategies.Strategy:
    """The strategy a leader with these flags runs."""
    return strategies.named(flags.get("strategy", "fedsgd"))(LeaderConfig(**flags))


def rule_of(aggregator: str, **flags) -> aggregation.Aggregator:
    """The aggregation rule a leader with these flags uses."""
    return aggregation.rules.named(aggregator).from_config(LeaderConfig(aggregator=aggregator, **flags))


def configure(flags: list[str]) -> LeaderConfig:
    return config.configure(config.command_line(flags))


def fedavg_plan(
    lr: float, steps: int = 1, momentum: float = 0.0, weight_decay: float = 5e-4, **changes
) -> TrainingPlan:
    return TrainingPlan(changes.pop("strategy", "fedavg"), steps, lr, momentum, weight_decay, **changes)


def run_round(
    model: nn.Module,
    batches: list[list[tuple]],
    plan: TrainingPlan,
    strategy: strategies.Strategy,
    optimizer: torch.optim.Optimizer | None = None,
) -> torch.optim.Optimizer:
    """One round of a local-training strategy through the leader's arithmetic: each learner's local_update on a
    copy of model, RoundUpdates, then the server optimizer on model."""
    layout = GradientLayout(model)
    mean = torch.zeros(layout.size)
    layout.bind_gradients(mean)
    optimizer = optimizer or strategy.make_optimizer(model)
    updates = RoundUpdates(layout.size, layout.parameter_count)
    for learner_batches in batches:
        learner = copy.deepcopy(model)
        learner_layout = GradientLayout(learner)
        flat = torch.zeros(learner_layout.size)
        learner_layout.bind_gradients(flat)
        loss = strategies.named(plan.strategy).local_update(
            learner, learner_layout, flat, learner_batches.__getitem__, plan
        )
        updates.add([flat], sum(len(labels) for _, labels in learner_batches[: plan.local_steps]), loss)
    updates.combine_into(mean)
    apply_mean_gradient(layout, optimizer, mean, strategy.server_lr, plan.local_steps)
    return optimizer


def test_fedavg_with_one_local_step_and_server_lr_1_is_fedsgd():
    model = small_net(batch_norm=True)
    batches = [[batch(8, seed)] for seed in (1, 2)]
    fedavg = copy.deepcopy(model)
    run_round(fedavg, batches, fedavg_plan(0.1), strategy_of(strategy="fedavg"))

    fedsgd_model = copy.deepcopy(model)
    layout = GradientLayout(fedsgd_model)
    mean = torch.zeros(layout.size)
    layout.bind_gradients(mean)
    updates = RoundUpdates(layout.size, layout.size, Mean())
    for ((images, labels),) in batches:
        learner = copy.deepcopy(model)
        learner_layout = GradientLayout(learner)
        flat = torch.zeros(learner_layout.size)
        learner_layout.bind_gradients(flat)
        updates.add([flat], len(labels), compute_gradient(learner, learner_layout, flat, images, labels))
    updates.combine_into(mean)
    optimizer = make_optimizer(fedsgd_model, 0.1, momentum=0.0, weight_decay=5e-4)
    apply_mean_gradient(layout, optimizer, mean, 0.1)

    assert_same_parameters(fedavg, fedsgd_model)
    for (name, ours), theirs in zip(fedavg.named_buffers(), fedsgd_model.buffers()):
        torch.testing.assert_close(ours, theirs, msg=name)


def test_learners_on_identical_data_equal_one_process_doing_the_same_local_steps():
    model = small_net(batch_norm=True)
    steps = [batch(8, seed) for seed in range(4)]
    plan = fedavg_plan(0.05, steps=4, momentum=0.9)
    federated = copy.deepcopy(model)
    run_round(federated, [steps] * 3, plan, strategy_of(strategy="fedavg"))

    alone = copy.deepcopy(model)
    optimizer = make_optimizer(alone, 0.05, momentum=0.9, weight_decay=5e-4)
    alone.train()
    for images, labels in steps:
        optimizer.zero_grad()
        nn.functional.cross_entropy(alone(images), labels).backward()
        optimizer.step()
    assert_same_parameters(federated, alone)


def by_hand(
    rule: str,
    grads: list[torch.Tensor],
    x: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
    corrected: bool,
) -> torch.Tensor:
    """Reddi et al. 2021, Algorithm 2, written out: Delta = -g; m = b1 m + (1-b1) Delta; v per rule;
    x = x + lr m / (sqrt(v) + tau); v starts at tau^2. Corrected (Kingma and Ba 2015): m / (1 - b1^t) for m, and
    v / (1 - b2^t) for v where v is a decaying mean (FedAdam's, FedYogi's; FedAdagrad's is a sum)."""
    m, v = torch.zeros_like(x), torch.full_like(x, tau**2)
    for t, g in enumerate(grads, start=1):
        delta = -g
        m = beta1 * m + (1 - beta1) * delta
        if rule == "fedadagrad":
            v = v + delta**2
        elif rule == "fedadam":
            v = beta2 * v + (1 - beta2) * delta**2
        else:
            v = v - (1 - beta2) * delta**2 * torch.sign(v - delta**2)
        if not corrected:
            x = x + lr * m / (torch.sqrt(v) + tau)
        else:
            unbiased_v = v if rule == "fedadagrad" else v / (1 - beta2**t)
            x = x + lr * (m / (1 - beta1**t)) / (torch.sqrt(unbiased_v) + tau)
    return x


@pytest.mark.parametrize("corrected", [True, False], ids=["bias-corrected", "as-written"])
@pytest.mark.parametrize("rule", ADAPTIVE)
def test_adaptive_server_steps_follow_reddi_et_al_algorithm_2(rule, corrected):
    torch.manual_seed(0)
    x = torch.randn(5)
    grads = [torch.randn(5) for _ in range(3)]
    parameter = nn.Parameter(x.clone())
    flags = {"server_lr": 0.03, "beta1": 0.8, "beta2": 0.95, "tau": 0.01, "no_bias_correction": not corrected}
    optimizer = ServerOptimizer([parameter], strategy_of(strategy=rule, **flags))
    for g in grads:
        parameter.grad = g.clone()
        optimizer.step()
    torch.testing.assert_close(parameter.detach(), by_hand(rule, grads, x, 0.03, 0.8, 0.95, 0.01, corrected))


@pytest.mark.parametrize("rule", ADAPTIVE)
def test_as_published_steps_as_the_paper_wrote_without_bias_correction_at_its_values(rule):
    torch.manual_seed(0)
    x = torch.randn(5)
    grads = [torch.randn(5) for _ in range(3)]
    parameter = nn.Parameter(x.clone())
    strategy = strategy_of(strategy=rule, as_published=True)
    optimizer = ServerOptimizer([parameter], strategy)
    for g in grads:
        parameter.grad = g.clone()
        optimizer.step()
    lr = strategy.published_server_lr
    torch.testing.assert_close(parameter.detach(), by_hand(rule, grads, x, lr, 0.9, 0.99, 1e-3, corrected=False))
    assert "no bias correction" in strategy.describe(0.1)


def test_bias_corrected_fedadams_first_step_is_the_server_lr_times_the_sign_of_the_pseudo_gradient():
    # m = 0.1 g and v = 0.001 g^2 + 0.99 tau^2, divided by 0.1 and 0.001: nearly g / |g|
    parameter = nn.Parameter(torch.zeros(3))
    optimizer = ServerOptimizer([parameter], strategy_of(strategy="fedadam", server_lr=0.1, beta2=0.999))
    parameter.grad = torch.tensor([4.0, -0.5, 0.3])
    optimizer.step()
    torch.testing.assert_close(parameter.detach(), torch.tensor([-0.1, 0.1, -0.1]), atol=0.1 * 0.01, rtol=0)


def guarded_server_steps(rule: str, updates: list[torch.Tensor]) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small model and its server optimizer after the leader's guarded steps on these mean updates; each
    update of 1e30 is refused, the others applied."""
    model = small_net()
    layout = GradientLayout(model)
    mean = torch.zeros(layout.size)
    layout.bind_gradients(mean)
    optimizer = strategy_of(strategy=rule, server_lr=0.03).make_optimizer(model)
    step = GuardedStep(model, layout, optimizer)
    for update in updates:
        mean.copy_(update)
        outcome = step(mean, lr=0.03)
        assert (outcome is None) == (update[0] < 1e30), outcome
    return model, optimizer


@pytest.mark.parametrize("rule", ADAPTIVE)
def test_a_refused_server_step_leaves_the_optimizer_as_it_was_its_step_counter_too(rule):
    size = GradientLayout(small_net()).size
    honest = [torch.randn(size, generator=torch.Generator().manual_seed(seed)) * 0.01 for seed in (1, 2)]
    overflowing = torch.full((size,), 1e30)  # g^2 overflows: Inf in the second moment, refused
    model, optimizer = guarded_server_steps(rule, [overflowing, honest[0], overflowing, overflowing, honest[1]])
    unrefused_model, unrefused_optimizer = guarded_server_steps(rule, honest)
    assert str(optimizer.state_dict()) == str(unrefused_optimizer.state_dict())  # no step counted for a refusal
    assert_same_parameters(model, unrefused_model)


@pytest.mark.parametrize(
    ("rule", "at_tau", "at_ten_tau"), [("fedadam", 1 / 11, 0.662), ("fedadagrad", 1 / 2.414, 0.906)]
)
def test_the_bias_corrected_first_step_is_the_server_lr_only_well_above_ten_tau(rule, at_tau, at_ten_tau):
    # v starts at tau^2 and FedAdam's correction divides that too: lr g / (sqrt(g^2 + 99 tau^2) + tau) (docs)
    parameter = nn.Parameter(torch.zeros(3))
    optimizer = ServerOptimizer([parameter], strategy_of(strategy=rule))
    tau, lr = LeaderConfig().tau, optimizer.strategy.server_lr
    parameter.grad = torch.tensor([tau, 10 * tau, 1.0])
    optimizer.step()
    torch.testing.assert_close(-parameter.detach() / lr, torch.tensor([at_tau, at_ten_tau, 1.0]), atol=2e-3, rtol=0)


def test_fedavgm_is_heavy_ball_on_pseudo_gradients_and_fedavg_a_plain_step():
    x, grads = torch.tensor([1.0, -2.0]), [torch.tensor([0.5, 0.5]), torch.tensor([-1.0, 2.0])]
    momentum = nn.Parameter(x.clone())
    plain = nn.Parameter(x.clone())
    with_momentum = ServerOptimizer([momentum], strategy_of(strategy="fedavgm", server_lr=0.5, server_momentum=0.9))
    without = ServerOptimizer([plain], strategy_of(strategy="fedavg", server_lr=1.0))
    for g in grads:
        momentum.grad, plain.grad = g.clone(), g.clone()
        with_momentum.step()
        without.step()
    velocity = 0.9 * grads[0] + grads[1]
    torch.testing.assert_close(momentum.detach(), x - 0.5 * grads[0] - 0.5 * velocity)
    torch.testing.assert_close(plain.detach(), x - grads[0] - grads[1])


def manual_steps(model: nn.Module, steps: list[tuple], lr: float, extra) -> torch.Tensor:
    """Plain SGD with extra(parameter index, parameter, w0) added to each gradient; the flat end weights."""
    model = copy.deepcopy(model)
    model.train()
    start = [p.detach().clone() for p in model.parameters()]
    for images, labels in steps:
        model.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        with torch.no_grad():
            for index, (p, origin) in enumerate(zip(model.parameters(), start)):
                p -= lr * (p.grad + extra(index, p, origin))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def local_pseudo_gradient(
    model: nn.Module, steps: list[tuple], plan: TrainingPlan, controls: Controls | None = None
) -> tuple[torch.Tensor, GradientLayout]:
    learner = copy.deepcopy(model)
    layout = GradientLayout(learner, controls=controls is not None)
    flat = torch.zeros(layout.size)
    layout.bind_gradients(flat)
    strategies.named(plan.strategy).local_update(learner, layout, flat, lambda step: steps[step], plan, controls)
    return flat, layout


def test_fedprox_adds_mu_times_the_distance_from_the_global_weights_to_each_gradient():
    model = small_net()
    steps = [batch(8, seed) for seed in range(3)]
    flat, layout = local_pseudo_gradient(
        model, steps, fedavg_plan(0.1, steps=3, weight_decay=0.0, strategy="fedprox", mu=0.5)
    )
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = manual_steps(model, steps, 0.1, lambda index, p, origin: 0.5 * (p - origin))
    torch.testing.assert_close(flat[: layout.parameter_count], start - expected)
    without_mu = manual_steps(model, steps, 0.1, lambda *_: 0.0)
    assert not torch.allclose(expected, without_mu)  # the proximal term made a difference


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_a_learner_follows_the_plans_proximal_term_whatever_its_strategy(strategy):
    # Every local strategy's plan carries mu on the wire, and a learner has always applied it when it is not 0
    # (FedProx's leader is the one that sends it; this one's SCAFFOLD controls are zero, so only mu acts).
    model = small_net()
    steps = [batch(8, seed) for seed in range(3)]
    controls = Controls(sum(p.numel() for p in model.parameters())) if strategy == "scaffold" else None
    plan = fedavg_plan(0.1, steps=3, weight_decay=0.0, strategy=strategy, mu=0.5)
    flat, layout = local_pseudo_gradient(model, steps, plan, controls)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = manual_steps(model, steps, 0.1, lambda index, p, origin: 0.5 * (p - origin))
    torch.testing.assert_close(flat[: layout.parameter_count], start - expected)


def test_scaffold_corrects_each_step_by_c_minus_c_i_and_updates_c_i_by_option_2():
    model = small_net()
    steps = [batch(8, seed) for seed in range(3)]
    count = sum(p.numel() for p in model.parameters())
    controls = Controls(count)
    torch.manual_seed(1)
    controls.server.copy_(torch.randn(count) * 0.1)
    controls.own.copy_(torch.randn(count) * 0.1)
    own_before = controls.own.clone()
    flat, layout = local_pseudo_gradient(
        model, steps, fedavg_plan(0.1, steps=3, weight_decay=0.0, strategy="scaffold"), controls
    )
    sizes = [p.numel() for p in model.parameters()]
    correction = (controls.server - own_before).split(sizes)
    expected_end = manual_steps(model, steps, 0.1, lambda index, p, origin: correction[index].view_as(p))
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(flat[: layout.parameter_count], start - expected_end)
    # option II: c_i+ = c_i - c + (x - y) / (K lr); the update carries c_i+ - c_i, committed once accepted
    expected_own = own_before - controls.server + (start - expected_end) / (3 * 0.1)
    torch.testing.assert_close(flat[layout.controls], expected_own - own_before, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(controls.own, own_before)
    controls.commit(flat[layout.controls])
    torch.testing.assert_close(controls.own, expected_own, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_an_honest_scaffold_control_change_is_within_its_pseudo_gradient_per_step_plus_c(momentum):
    # The control bound's argument: c_i+ - c_i = pseudo-gradient / (K lr gain) - c, exact under plain SGD
    model = small_net()
    count = sum(p.numel() for p in model.parameters())
    controls = Controls(count)
    torch.manual_seed(2)
    controls.server.copy_(torch.randn(count) * 0.1)
    controls.own.copy_(torch.randn(count) * 0.1)
    plan = fedavg_plan(0.1, steps=4, momentum=momentum, weight_decay=0.0, strategy="scaffold")
    flat, layout = local_pseudo_gradient(model, [batch(8, seed) for seed in range(4)], plan, controls)
    scaffold = strategy_of(strategy="scaffold", client_momentum=momentum)
    scaffold.bind(layout)
    scaffold.control.copy_(controls.server)
    if not momentum:
        expected = flat[: layout.parameter_count] / (4 * 0.1) - controls.server
        torch.testing.assert_close(flat[layout.controls], expected, rtol=1e-3, atol=1e-4)
    check = scaffold.check_control(layout, flat, 0.1, 4, participants=1, learners=1)
    assert check.change <= 1.0 and check.problem() is None


def test_a_clipped_honest_scaffold_update_keeps_its_control_within_the_bound():
    # --clip-norm shrinks the model part of an update; its control change must shrink alike, or an honest round
    # clipped to a quarter looks like a control change 4 times too large, and SCAFFOLD refuses every round
    model = small_net()
    controls = Controls(sum(p.numel() for p in model.parameters()))
    plan = fedavg_plan(0.1, steps=4, momentum=0.0, weight_decay=0.0, strategy="scaffold")
    flat, layout = local_pseudo_gradient(model, [batch(8, seed) for seed in range(4)], plan, controls)
    quarter = torch.linalg.vector_norm(flat[: layout.parameter_count]).item() / 4
    updates = RoundUpdates(layout.size, layout.parameter_count, clip_norm=quarter, controls=True)
    updates.add([flat], 8, 1.0)
    mean = torch.empty(layout.size)
    updates.combine_into(mean)
    scaffold = strategy_of(strategy="scaffold", client_momentum=0.0)
    scaffold.bind(layout)
    assert scaffold.check_control(layout, mean, 0.1, 4, participants=1, learners=1).problem() is None


def test_a_learner_commits_its_control_change_only_when_a_later_state_says_its_round_was_applied():
    controls, change = Controls(3), torch.tensor([1.0, 2.0, 3.0])
    server = torch.zeros(3)

    def sent(round_index: int) -> None:  # a state of round_index trained on, then its update taken
        controls.adopt(server, round_index, controls.counts, change, fetched=False)
        controls.taken(round_index)

    sent(0)
    assert controls.adopt(server, 0, (0, 0), change, fetched=False) is None  # the same state again: no word yet
    assert controls.adopt(server, 1, (0, 0), change, fetched=False) is True  # round 0 applied
    torch.testing.assert_close(controls.own, change)
    sent(1)
    assert controls.adopt(server, 2, (1, 0), change, fetched=False) is False  # round 1 discarded
    torch.testing.assert_close(controls.own, change)
    sent(2)
    assert controls.adopt(server, 7, (1, 0), change, fetched=False) is True  # states missed: nothing discarded since
    sent(7)
    assert controls.adopt(server, 9, (2, 0), change, fetched=False) is False  # states missed, one round discarded
    sent(9)
    assert controls.adopt(server, 10, (2, 0), change, fetched=True) is False  # fetched after losing the leader
    torch.testing.assert_close(controls.own, 2 * change)
    sent(10)
    assert controls.adopt(server, 11, (3, 1), change, fetched=False) is False  # the leader reset the controls
    assert not controls.own.any()


def global_model_of(strategy: str) -> GlobalModel:
    return GlobalModel(LeaderConfig(strategy=strategy), 10, strategy_of(strategy=strategy))


def test_after_five_refused_steps_in_a_row_the_leader_resets_the_scaffold_control_or_stops():
    model = global_model_of("scaffold")
    model.strategy.control.fill_(9.0)  # a control that passed its bounds, yet every honest round fails with it
    assert model.count_round("too few", stepped=False) is None  # no step tried: the streak neither grows nor ends
    for _ in range(MAX_DISCARDED_ROUNDS - 1):
        assert model.count_round("the step would change ...", stepped=True) is None
    assert model.count_round(None, stepped=True) is None  # an applied round ends the streak
    for _ in range(MAX_DISCARDED_ROUNDS - 1):
        assert model.count_round("the step would change ...", stepped=True) is None
    recovery = model.count_round("the step would change ...", stepped=True)
    assert recovery and not recovery.stops and "reset to zero" in recovery.message, recovery
    assert not model.strategy.control.any()
    model.publish(11, finished=False, plan=TrainingPlan("scaffold", 1, 0.1))
    metadata = codec.decode(model.encoded_state).metadata
    assert (metadata["discarded_rounds"], metadata["control_resets"]) == ("10", "1")
    resumed = global_model_of("scaffold")
    resumed.restore(model.checkpoint())
    assert (resumed.discarded, resumed.refused, resumed.control_resets) == (10, 0, 1)

    for _ in range(MAX_DISCARDED_ROUNDS - 1):  # nothing left to reset: the leader stops, saying why
        assert model.count_round("the step would change ...", stepped=True) is None
    recovery = model.count_round("the step would change ...", stepped=True)
    assert recovery and recovery.stops and "no sane step" in recovery.message
    fedavg = global_model_of("fedavg")
    for _ in range(MAX_DISCARDED_ROUNDS):
        recovery = fedavg.count_round("NaN or Inf in fc.bias", stepped=True)
    assert recovery and recovery.stops and "NaN or Inf in fc.bias" in recovery.message


@pytest.mark.parametrize("strategy", ["scaffold", "fedavg"])
def test_the_round_loop_records_a_reset_and_stops_after_the_rounds_record_when_nothing_can_be_reset(tmp_path, strategy):
    flags = ["--strategy", strategy, "--learners", "1", "--local-steps", "1", "--batch-size", "8", "--rounds", "20"]
    leader = leader_from(["--dataset", "synthetic", "--eval-every", "0", "--out", str(tmp_path), *flags])
    if strategy == "scaffold":
        leader.strategy.control.fill_(1.0)  # a control that passed its bounds, yet every round fails with it
    absurd = torch.full((leader.global_model.layout.size,), 1e30)  # every round refused by the guarded step
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    for round_index in range(MAX_DISCARDED_ROUNDS):
        leader.collector.submit(0, round_index, [absurd], 8, 1.0, 0)  # (no learner: the round waits for nobody)
        if strategy == "fedavg" and round_index == MAX_DISCARDED_ROUNDS - 1:
            with pytest.raises(Diverged, match="rounds in a row were discarded"):
                leader.rounds.run_round(round_index, 0.0, metrics)
        else:
            assert leader.rounds.run_round(round_index, 0.0, metrics) is not None
    metrics.close()
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert last["round"] == MAX_DISCARDED_ROUNDS and "discarded" in last, last
    assert ("reset to zero" if strategy == "scaffold" else "stopping") in last["recovery"], last
    if strategy == "scaffold":
        assert not leader.strategy.control.any()
        leader.rounds.save_checkpoint(MAX_DISCARDED_ROUNDS)
        resumed = leader_from(["--resume", str(tmp_path)]).global_model
        assert (resumed.discarded, resumed.refused, resumed.control_resets) == (MAX_DISCARDED_ROUNDS, 0, 1)


# --- aggregation rules as pure functions ----------------------------------------------------------------

updates_strategy = st.integers(3, 7).flatmap(
    lambda count: st.lists(
        st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=4, max_size=4),
        min_size=count,
        max_size=count,
    )
)


@settings(max_examples=50, deadline=None)
@given(updates_strategy, st.randoms(use_true_random=False))
def test_every_rule_ignores_the_order_of_updates(rows, random):
    updates = torch.tensor(rows)
    order = list(range(len(rows)))
    random.shuffle(order)
    weights = torch.ones(len(rows))
    for name in aggregation.rules.names():
        rule = rule_of(name, byzantine=1)
        torch.testing.assert_close(rule.combine(updates[order], weights), rule.combine(updates, weights), msg=name)


def test_trimmed_mean_without_trimming_is_the_mean_and_median_of_identical_updates_is_that_update():
    updates = torch.randn(5, 7)
    torch.testing.assert_close(trimmed_mean(updates, 0.0), updates.mean(dim=0))
    same = torch.randn(7).repeat(4, 1)
    torch.testing.assert_close(coordinate_median(same), same[0])
    torch.testing.assert_close(coordinate_median(torch.tensor([[1.0], [5.0], [2.0], [9.0]])), torch.tensor([3.5]))


@pytest.mark.parametrize("rule", ["krum", "multi-krum"])
def test_krum_picks_honest_updates_when_f_attackers_send_outliers(rule):
    torch.manual_seed(0)
    honest = torch.ones(5, 10) + 0.1 * torch.randn(5, 10)
    attackers = torch.full((2, 10), -50.0)
    updates = torch.cat([attackers[:1], honest, attackers[1:]])
    result = rule_of(rule, byzantine=2).combine(updates, torch.ones(7))
    assert (result - 1).abs().max() < 0.5
    _, chosen = multi_krum(updates, byzantine=2, selected=5)
    assert sorted(chosen) == [1, 2, 3, 4, 5]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=20), st.floats(0.01, 100))
def test_clipping_never_increases_a_norm(values, max_norm):
    update = torch.tensor(values)
    before = torch.linalg.vector_norm(update).item()
    clip_to_norm(update, max_norm)
    after = torch.linalg.vector_norm(update).item()
    assert after <= before * (1 + 1e-6)
    assert after <= max_norm * (1 + 1e-5) or before <= max_norm


def test_robust_rules_apply_to_batchnorm_statistics_too_so_one_learner_cannot_set_them():
    updates = RoundUpdates(size=3, model_size=1, rule=rule_of("median"))
    for row in ([1.0, 1.0, 2.0], [2.0, 3.0, 2.0], [9.0, 900.0, 900.0]):  # the last one is hostile
        updates.add([torch.tensor(row)], samples=4, loss=0.5)
    out = torch.zeros(3)
    updates.combine_into(out)
    torch.testing.assert_close(out, torch.tensor([2.0, 3.0, 2.0]))


def test_krum_chooses_on_the_model_part_and_takes_the_median_of_the_statistics():
    updates = torch.tensor([[1.0, 0.0, 5.0], [1.1, 0.0, 50.0], [0.9, 0.0, 9.0], [1.0, 0.1, 500.0], [-40.0, 0.0, 7.0]])
    for rule in ("krum", "multi-krum"):
        # on whole rows the statistics (last column) would decide; on the model part the outlier is row 4, and
        # an honest-looking model part (row 3) does not carry its hostile statistic through
        result = rule_of(rule, byzantine=1).combine(updates, torch.ones(5), 2)
        assert abs(result[0].item() - 1.0) < 0.2 and result[2].item() == 9.0, rule


def test_rounds_too_small_for_a_robust_rule_are_named():
    assert rule_of("krum", byzantine=1).too_few(4) is not None
    assert rule_of("krum", byzantine=1).too_few(5) is None
    assert rule_of("median").too_few(2) is not None
    assert rule_of("mean").too_few(1) is None


def test_a_scaffold_control_change_that_would_blow_up_is_named():
    assert "reach norm inf" in ControlCheck(float("inf"), 0.5, 0.5).problem()
    assert "change is 4 times" in ControlCheck(10.0, 4.0, 0.5).problem()
    assert "reach 11 times" in ControlCheck(10.0, 0.5, 11.0).problem()
    assert ControlCheck(10.0, 2.9, 9.9).problem() is None


def test_sampling_is_seeded_and_without_replacement():
    generator = torch.Generator().manual_seed(3)
    rounds = [sample_participants(list(range(6)), 2, generator) for _ in range(30)]
    assert all(len(set(chosen)) == 2 and set(chosen) <= set(range(6)) for chosen in rounds)
    assert len({tuple(chosen) for chosen in rounds}) > 5  # different learners in different rounds
    again = torch.Generator().manual_seed(3)
    assert rounds == [sample_participants(list(range(6)), 2, again) for _ in range(30)]
    assert sample_participants([4, 1], 5, generator) == [1, 4]


# --- Byzantine learners: one of five sends its update sign-flipped and scaled by 10 --------------------


def blobs(seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten well separated Gaussian classes in 16 dimensions."""
    centres = torch.randn(10, 16, generator=torch.Generator().manual_seed(99)) * 3
    rng = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=rng)
    return centres[labels] + torch.randn(count, 16, generator=rng), labels


def byzantine_accuracy(aggregator: str, attacked: bool, clip_norm: float = 0.0) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    strategy = strategy_of(strategy="fedavg")
    rule = rule_of(aggregator, byzantine=1, trim=0.2)
    plan = fedavg_plan(0.05, steps=2, weight_decay=0.0)
    layout = GradientLayout(model)
    mean = torch.zeros(layout.size)
    layout.bind_gradients(mean)
    optimizer = strategy.make_optimizer(model)
    for round_index in range(25):
        updates = RoundUpdates(layout.size, layout.parameter_count, rule, clip_norm)
        for learner_id in range(5):
            learner = copy.deepcopy(model)
            learner_layout = GradientLayout(learner)
            flat = torch.zeros(learner_layout.size)
            learner_layout.bind_gradients(flat)
            data = [blobs(1000 * round_index + 10 * learner_id + step, 32) for step in range(2)]
            loss = strategy.local_update(learner, learner_layout, flat, data.__getitem__, plan)
            if attacked and learner_id == 4:
                flat.mul_(-10)
            updates.add([flat], 64, loss)
        updates.combine_into(mean)
        apply_mean_gradient(layout, optimizer, mean, strategy.server_lr, 2)
    images, labels = blobs(7, 2000)
    return evaluate(model, images, labels).accuracy


def test_a_sign_flipping_learner_wrecks_the_mean_but_not_the_robust_rules():
    honest = byzantine_accuracy("mean", attacked=False)
    assert honest > 0.9
    assert byzantine_accuracy("mean", attacked=True) < honest - 0.3
    for aggregator in ("median", "trimmed-mean", "krum", "multi-krum"):
        assert byzantine_accuracy(aggregator, attacked=True) > honest - 0.05, aggregator
    assert byzantine_accuracy("mean", attacked=True, clip_norm=0.5) > honest - 0.05


# --- the leader's flags, schedule and claims for local strategies ---------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mu", "0.1"], "--mu is only with --strategy fedprox, not --strategy fedsgd"),
        (["--strategy", "fedavg", "--lr", "0.1"], "--lr is only with --strategy fedsgd, not --strategy fedavg"),
        (["--strategy", "fedavg", "--beta1", "0.5"], "--beta1 is only with --strategy fedadagrad, fedadam or fedyogi"),
        (["--aggregator", "median", "--byzantine", "2"], "--byzantine is only with --aggregator krum or multi-krum"),
        (["--strategy", "fedavg", "--local-epochs", "1", "--local-steps", "5"], "not both"),
        (["--strategy", "fedavg", "--client-lr", "5000"], "--client-lr: must be in (0, 1000]"),
        (["--aggregator", "krum", "--learners", "4"], "at least 5 updates in a round; the run has 4 learners a round"),
        (["--aggregator", "median", "--learners", "5", "--min-learners", "2"], "--min-learners 2"),
        (["--aggregator", "trimmed-mean", "--trim", "0"], "--trim 0 trims nothing"),
        (["--learners", "4", "--learners-per-round", "5"], "--learners-per-round exceeds --learners"),
    ],
)
def test_flags_a_run_would_ignore_or_learners_would_refuse_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        configure(flags)
    assert message in capsys.readouterr().err


def test_a_robust_rule_waits_for_enough_updates_unless_told_otherwise():
    assert config.min_learners(configure(["--aggregator", "krum", "--learners", "6"])) == 5
    assert config.min_learners(configure(["--aggregator", "trimmed-mean", "--trim", "0.1", "--learners", "12"])) == 10
    assert TrimmedMean(0.2).minimum_updates() == 5  # with fewer, floor(0.2 K) trims nothing
    assert trimmed_mean(torch.tensor([[0.0], [1.0], [2.0], [3.0], [1000.0]]), 0.2).item() == 2.0


@pytest.mark.parametrize("trim", [0.2, 0.1, 1 / 3, 1 / 161, 1 / 187, 1 / 322])
def test_at_its_own_minimum_the_trimmed_mean_trims_a_hostile_update_away(trim):
    rule = TrimmedMean(trim)
    count = rule.minimum_updates()
    updates = torch.zeros(count, 1)
    updates[0] = 1e6  # 1/161 * 161 is 0.999... in floating point: a cut taken from it alone trims nothing
    assert rule.too_few(count) is None and rule.too_few(count - 1) is not None
    assert rule.combine(updates, torch.ones(count)).item() == 0.0


def test_local_epochs_set_the_steps_per_round_and_epochs_keep_meaning_passes_over_the_shard():
    schedule = schedule_of(["--strategy", "fedavg", "--epochs", "3", "--batch-size", "32", "--learners", "2"], 5000)
    assert (schedule.steps_per_round, schedule.total_rounds) == (156, 3)
    assert schedule.base_lr == pytest.approx(0.1 * 32 / 128)
    steps = schedule_of(["--strategy", "fedavg", "--local-steps", "16", "--epochs", "2", "--batch-size", "32"], 5000)
    fedsgd_rounds = schedule_of(["--epochs", "2", "--batch-size", "32"], 5000)
    assert steps.total_rounds == -(-fedsgd_rounds.total_rounds // 16)  # a sixteenth of FedSGD's rounds
    assert [steps.ends_epoch(done) for done in (9, 10, 19, 20)] == [False, True, False, True]


def schedule_of(flags: list[str], shard_size: int) -> Schedule:
    run = configure(flags)
    return Schedule.of(run, strategies.named(run.strategy), shard_size)


def claims_checker(**flags) -> LeaderServicer:
    """A servicer that checks claims against what a leader with these flags asks for."""
    run = LeaderConfig(**flags)
    strategy = strategy_of(**flags)
    planner = Planner(run, strategy, DataFacts([0.5] * 3, [0.25] * 3, 5000))
    global_model = SimpleNamespace(strategy=strategy, layout=SimpleNamespace(spec={}))  # what the claims' check reads
    registry = SimpleNamespace(summary=lambda learner_id: None)  # nobody registered data of its own: a leader with data
    return LeaderServicer(registry, None, global_model, None, planner, None, None)


@pytest.mark.parametrize(
    "claims, message",
    [
        (UpdateInfo(0, 0, 32, 1.0), "takes a pseudo-gradient, not a gradient"),
        (UpdateInfo(0, 0, 32, 1.0, "pseudo-gradient", steps=11), "steps 11 exceeds the 10 local steps"),
        (UpdateInfo(0, 0, 321, 1.0, "pseudo-gradient", steps=10), "samples 321 exceeds the batch of 32"),
        (UpdateInfo(1, 0, 32, 1.0, "pseudo-gradient", steps=10), "not the caller's slot"),
    ],
)
def test_the_leader_refuses_updates_of_the_wrong_kind_or_claiming_more_than_it_asked_for(claims, message):
    checker = claims_checker(strategy="fedavg", local_steps=10, batch_size=32)
    payload = codec.decode(codec.encode({}, claims.to_metadata()))
    with pytest.raises(codec.PayloadError, match=message):
        checker.check_claims(payload, Member(0, "127.0.0.1:1", "", 1))
    honest = UpdateInfo(0, 0, 320, 1.0, "pseudo-gradient", steps=10)
    assert checker.check_claims(codec.decode(codec.encode({}, honest.to_metadata())), Member(0, "", "", 1)) == honest


def own_epochs_checker(knows_by: str) -> LeaderServicer:
    """A servicer of a leader whose learners take 2 passes over their own shards of 16 and 48 images, in batches
    of 8, which it knows from the shards it sent or from the learners' registrations (a leader without data)."""
    checker = claims_checker(strategy="fedavg", local_steps_per="learner", local_epochs=2.0, batch_size=8)
    sizes = [16, 48]
    if knows_by == "shards":
        checker.shards = SimpleNamespace(indices=[torch.arange(size) for size in sizes])
    else:
        summaries = {learner: SimpleNamespace(train_samples=size) for learner, size in enumerate(sizes)}
        checker.registry = SimpleNamespace(summary=summaries.get)
    return checker


@pytest.mark.parametrize("knows_by", ["shards", "registrations"])
def test_with_own_epochs_the_leader_holds_each_learner_to_its_own_shards_steps_and_samples(knows_by):
    checker = own_epochs_checker(knows_by)
    check = lambda learner, claims: checker.check_claims(
        codec.decode(codec.encode({}, claims.to_metadata())), Member(learner, "", "", 1)
    )
    small, large = (
        UpdateInfo(0, 0, 32, 1.0, "pseudo-gradient", steps=4),
        UpdateInfo(1, 0, 96, 1.0, "pseudo-gradient", steps=12),
    )
    assert check(0, small) == small and check(1, large) == large  # 2 x 16 / 8 and 2 x 48 / 8 steps
    # the small learner cannot weigh like the large one: neither by claiming its steps nor more samples
    with pytest.raises(codec.PayloadError, match="steps 12 exceeds the 4 local steps this leader asks of this"):
        check(0, UpdateInfo(0, 0, 96, 1.0, "pseudo-gradient", steps=12))
    with pytest.raises(codec.PayloadError, match="samples 33 exceeds the batch of 8 this leader asks for times 4"):
        check(0, UpdateInfo(0, 0, 33, 1.0, "pseudo-gradient", steps=4))


def check_of(checker: LeaderServicer):
    return lambda learner, claims: checker.check_claims(
        codec.decode(codec.encode({}, claims.to_metadata())), Member(learner, "", "", 1)
    )


def test_a_leader_without_data_weighs_a_registered_shard_up_to_4_typical_shards_and_keeps_large_learners():
    checker = own_epochs_checker("registrations")
    checker.planner.settle(DataFacts([0.5] * 3, [0.25] * 3, 16))  # the typical learner holds 16 images
    summaries = {0: SimpleNamespace(train_samples=16), 1: SimpleNamespace(train_samples=2**32)}
    summaries[2] = SimpleNamespace(train_samples=80)  # an honest learner of 5 typical shards
    checker.registry = SimpleNamespace(summary=summaries.get)
    check = check_of(checker)
    # 2^32 images claimed at registration: its steps are its own (2 passes of 2^32 / 8 batches), but it weighs
    # as 4 typical learners: 2 passes of 4 x 16 images
    liar = check(1, UpdateInfo(1, 0, 8 * 2**30, 1.0, "pseudo-gradient", steps=2**30))
    assert (liar.steps, liar.samples) == (2**30, 128)
    with pytest.raises(codec.PayloadError, match="steps 1073741825 exceeds the 1073741824 local steps"):
        check(1, UpdateInfo(1, 0, 8 * 2**30, 1.0, "pseudo-gradient", steps=2**30 + 1))
    large = check(2, UpdateInfo(2, 0, 160, 1.0, "pseudo-gradient", steps=20))  # honest: 2 passes of 80 / 8
    assert (large.steps, large.samples) == (20, 128)  # taken, weighed as 4 typical learners
    typical = UpdateInfo(0, 0, 32, 1.0, "pseudo-gradient", steps=4)
    assert check(0, typical) == typical
    # a typical shard of 15 images weighs what its whole batches cover, 2 passes of one batch of 8: 16 samples,
    # so 4 typical learners weigh 64 (4 typical shards of images, 60, would make 2 x 7 batches: 112, 7 learners)
    checker.planner.settle(DataFacts([0.5] * 3, [0.25] * 3, 15))
    assert check(1, UpdateInfo(1, 0, 8 * 2**30, 1.0, "pseudo-gradient", steps=2**30)).samples == 64


def test_a_learner_whose_shard_is_smaller_than_a_batch_claims_at_most_its_shard_a_step():
    checker = claims_checker(strategy="fedavg", local_steps=10, batch_size=8)
    checker.shards = SimpleNamespace(indices=[torch.arange(4)])  # the leader sent it 4 images
    with pytest.raises(codec.PayloadError, match="samples 80 exceeds the batch of 4 this leader asks for times 10"):
        check_of(checker)(0, UpdateInfo(0, 0, 80, 1.0, "pseudo-gradient", steps=10))
    honest = UpdateInfo(0, 0, 40, 1.0, "pseudo-gradient", steps=10)
    assert check_of(checker)(0, honest) == honest


def test_scaffold_and_infinite_local_epochs_are_refused_as_flags(capsys):
    with pytest.raises(SystemExit):
        configure(["--strategy", "scaffold", "--local-steps-per", "learner", "--local-epochs", "2"])
    assert "scaffold checks its control against the same local steps for every learner" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        configure(["--strategy", "fedavg", "--local-epochs", "1001"])


def claimed_samples(shard_size: int, plan: TrainingPlan) -> int:
    """The samples the update of a learner holding shard_size images claims (Member.send_update), as sent."""
    sent = []
    member = SimpleNamespace(
        learner_id=0,
        data=range(shard_size),
        replica=SimpleNamespace(
            info=SimpleNamespace(batch_size=8),
            strategy=strategies.named(plan.strategy),
            update_tensors=lambda: {"w": torch.zeros(2)},
            update_taken=lambda round_index: None,
            forget_compression=lambda why: None,
            keep_change=lambda: None,
            check_update_own=lambda: None,
            shared=SimpleNamespace(lock=threading.Lock()),
        ),
        session=SimpleNamespace(send_update=lambda round_index, request, stop: sent.append(request)),
        server=SimpleNamespace(inbox=SimpleNamespace(has_final=lambda: False)),
    )
    member.update_request = partial(LearnerMember.update_request, member)
    member.send_request = partial(LearnerMember.send_request, member)
    LearnerMember.send_update(member, 0, 1.0, plan)
    return UpdateInfo.from_payload(codec.decode(sent[0].chunk)).samples


def test_with_own_epochs_each_learner_takes_n_k_over_b_steps_and_the_mean_weighs_its_update_by_n_k():
    run = configure(
        [
            "--strategy",
            "fedavg",
            "--local-steps-per",
            "learner",
            "--local-epochs",
            "2",
            "--batch-size",
            "8",
            "--client-momentum",
            "0",
        ]
    )
    strategy = strategies.named("fedavg")(run)
    plan = strategy.plan(10, 0.1, None, False)  # 10: the steps of the typical shard, which own epochs replace
    shards = {0: [batch(8, seed) for seed in (1, 2)], 1: [batch(8, seed) for seed in (3, 4, 5, 6, 7, 8)]}
    plans = {learner: plan.for_shard(8 * len(batches), 8) for learner, batches in shards.items()}
    assert [plans[0].local_steps, plans[1].local_steps] == [4, 12]  # 2 epochs x n_k / B: 2 x 16 / 8, 2 x 48 / 8

    model = small_net()
    layout = GradientLayout(model)
    updates, mean = RoundUpdates(layout.size, layout.parameter_count), torch.zeros(layout.size)
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    by_hand = torch.zeros(layout.size)
    for learner, batches in shards.items():
        passes = batches * 2  # each learner goes through its own shard twice
        flat, _ = local_pseudo_gradient(model, passes, plans[learner])
        updates.add([flat], claimed_samples(8 * len(batches), plans[learner]), 0.0)  # as the learner claims
        decayed = lambda index, p, origin: 5e-4 * p if p.dim() > 1 else 0.0  # weight decay on weights, not biases
        by_hand += 8 * len(batches) * (w0 - manual_steps(model, passes, 0.1, decayed))
    updates.combine_into(mean)
    torch.testing.assert_close(mean, by_hand / (16 + 48))  # (16 pseudo-gradient_0 + 48 pseudo-gradient_1) / 64


def test_the_uniform_steps_stay_the_default_and_own_epochs_need_local_epochs():
    assert strategy_of(strategy="fedavg").plan(10, 0.1, None, False).for_shard(48, 8).local_steps == 10
    with pytest.raises(SystemExit):
        configure(["--strategy", "fedavg", "--local-steps-per", "learner", "--local-steps", "4"])


def test_fedsgd_metadata_is_what_the_articles_peers_send_and_expect():
    state = StateInfo("resnet20", 10, 64, 0, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "float32", round=3)
    assert list(state.to_metadata()) == [
        "architecture",
        "num_classes",
        "batch_size",
        "seed",
        "mean",
        "std",
        "wire_dtype",
        "round",
        "finished",
        "stopped",
    ]
    assert UpdateInfo(0, 3, 64, 0.5).to_metadata() == {"learner_id": "0", "round": "3", "samples": "64", "loss": "0.5"}


def test_a_plan_round_trips_through_metadata_even_with_nobody_sampled():
    for plan in (
        TrainingPlan(),
        TrainingPlan(participants=()),
        TrainingPlan(participants=(0, 4)),
        TrainingPlan("scaffold", 7, 0.0, 0.9, 5e-4, 0.0, (2,)),
        TrainingPlan("fedavg", 7, 0.1, 0.9, 5e-4, 0.0, None, False, 2.0),
    ):
        assert messages.plan_from_metadata(messages.plan_to_metadata(plan)) == plan
    with pytest.raises(codec.PayloadError):
        messages.plan_from_metadata(
            {
                "strategy": "fedavg",
                "local_steps": "1",
                "client_lr": "nan",
                "client_momentum": "0",
                "weight_decay": "0",
                "mu": "0",
            }
        )
    with pytest.raises(codec.PayloadError):
        messages.plan_from_metadata({"participants": "1,,2"})


@pytest.mark.parametrize("strategy", ["fedsgd", "scaffold"])
def test_a_learners_layout_holds_the_buffers_of_its_model_on_its_device(strategy):
    # Moving a model to another device replaces its buffers: a layout made before the move read stale BatchNorm
    # statistics into every update (on a GPU the global model's test loss was 400).
    info = StateInfo("resnet20", 10, 64, 0, (0.5,) * 3, (0.25,) * 3, "float32", plan=TrainingPlan(strategy, 1, 0.1))
    model, layout = learner_state.training_setup(info, torch.float32, "meta")
    buffers = dict(model.named_buffers())
    assert layout.buffers and all(buffer is buffers[name] for name, buffer in layout.buffers)
    assert all(buffer.device.type == "meta" for _, buffer in layout.buffers)
    assert (layout.size > layout.parameter_count + layout.statistics_count) == (strategy == "scaffold")


class NesterovAvg(strategies.LocalTraining):
    """A strategy written the way docs/architecture.md tells: FedAvg with Nesterov server momentum."""

    flags = (*strategies.LocalTraining.flags, "server_momentum")

    def __init__(self, config) -> None:
        super().__init__(config)
        self.server_momentum = 0.9 if config.server_momentum is None else config.server_momentum

    def optimizer_settings(self) -> dict[str, float]:
        return {"lr": self.server_lr, "momentum": self.server_momentum}

    def server_update(self, parameter, grad, state, group) -> None:
        velocity = state.setdefault("momentum_buffer", torch.zeros_like(parameter))
        velocity.mul_(group["momentum"]).add_(grad)
        parameter.add_(grad.add(velocity, alpha=group["momentum"]), alpha=-group["lr"])


@pytest.fixture
def nesterov():
    strategies.registry.register("nesterov-avg")(NesterovAvg)
    yield NesterovAvg
    del strategies.registry._entries["nesterov-avg"]


def test_a_new_strategy_is_its_class_alone_flags_plan_learner_and_server_step_follow(nesterov):
    run = configure(["--strategy", "nesterov-avg", "--server-momentum", "0.5", "--local-steps", "2"])
    with pytest.raises(SystemExit):
        configure(["--strategy", "nesterov-avg", "--mu", "0.1"])  # another strategy's flag is refused for it
    strategy = strategies.named(run.strategy)(run)
    plan = strategy.plan(2, 0.1, None, False)
    assert messages.plan_from_metadata(messages.plan_to_metadata(plan)) == plan  # a learner reads it back
    model, steps = small_net(), [batch(8, seed) for seed in range(2)]
    flat, layout = local_pseudo_gradient(model, steps, plan)  # the learner's local update, found by name
    parameter = nn.Parameter(torch.ones(3))
    optimizer = strategy.make_optimizer(nn.ParameterList([parameter]))
    for _ in range(2):
        parameter.grad = torch.ones(3)
        optimizer.step()
    torch.testing.assert_close(parameter.detach(), torch.full((3,), 1 - (1 + 0.5) - (1 + 0.5 * 1.5)))
    assert flat[: layout.parameter_count].abs().sum() > 0


def skewed_batch(learner: int, round_index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of learner's own labels only (learner 0: 0 and 1, learner 1: 2 and 3, learner 2: 4 to 9)."""
    rng = torch.Generator().manual_seed(1000 * round_index + 10 * learner + step)
    low, high = ((0, 2), (2, 4), (4, 10))[learner]
    return torch.randn(8, 3, 8, 8, generator=rng), torch.randint(low, high, (8,), generator=rng)


def gradient_at(model: nn.Module, weights: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss's gradient at these flat weights, by plain autograd."""
    probe = copy.deepcopy(model)
    nn.utils.vector_to_parameters(weights, probe.parameters())
    nn.functional.cross_entropy(probe(images), labels).backward()
    return torch.cat([p.grad.reshape(-1) for p in probe.parameters()])


def test_scaffold_over_rounds_of_skewed_shards_and_sampling_is_option_2_by_hand():
    # Karimireddy et al. 2020, option II, server step size eta_g: c_i+ = c_i - c + (x - y_i) / (K lr);
    # c += (1/N) sum over S of (c_i+ - c_i); x += eta_g mean over S of (y_i - x). The code under test is the real
    # learner side (Controls, local_update, the update vector kept until a later state settles its control
    # change) and the real leader side (RoundUpdates, Scaffold.apply on a GuardedStep), round after round.
    steps, lr, server_lr, learners = 3, 0.05, 0.5, 3
    model = small_net()
    scaffold = strategy_of(strategy="scaffold", client_momentum=0.0, weight_decay=0.0, server_lr=server_lr)
    layout = GradientLayout(model, controls=True)
    mean = torch.zeros(layout.size)
    layout.bind_gradients(mean)
    scaffold.bind(layout)
    step = GuardedStep(model, layout, scaffold.make_optimizer(model))
    plan = fedavg_plan(lr, steps=steps, weight_decay=0.0, strategy="scaffold")
    own = [Controls(layout.parameter_count) for _ in range(learners)]
    vectors = [torch.zeros(layout.size) for _ in range(learners)]  # each learner's update, kept as Replica does
    x = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    c, c_i = torch.zeros_like(x), [torch.zeros_like(x) for _ in range(learners)]
    for round_index, chosen in enumerate([(0, 1, 2), (0, 2), (1, 2), (0, 1, 2), (2,)]):
        for learner in range(learners):  # the state of this round reaches every learner
            own[learner].adopt(scaffold.control, round_index, (0, 0), vectors[learner][layout.controls], False)
            torch.testing.assert_close(own[learner].own, c_i[learner], rtol=1e-4, atol=1e-6)
        updates = RoundUpdates(layout.size, layout.parameter_count, controls=True)
        y = {}
        for learner in chosen:
            local = copy.deepcopy(model)
            local_layout = GradientLayout(local, controls=True)
            local_layout.bind_gradients(vectors[learner])
            batch_at = lambda k, learner=learner, round_index=round_index: skewed_batch(learner, round_index, k)
            loss = scaffold.local_update(local, local_layout, vectors[learner], batch_at, plan, own[learner])
            updates.add([vectors[learner]], 8 * steps, loss)
            own[learner].taken(round_index)
            y[learner] = x.clone()
            for k in range(steps):
                y[learner] -= lr * (gradient_at(model, y[learner], *batch_at(k)) + c - c_i[learner])
        updates.combine_into(mean)
        assert scaffold.apply(step, mean, lr, steps, len(chosen), learners) is None
        new_c_i = {i: c_i[i] - c + (x - y[i]) / (steps * lr) for i in chosen}
        c = c + sum(new_c_i[i] - c_i[i] for i in chosen) / learners
        x = x + server_lr * sum(y[i] - x for i in chosen) / len(chosen)
        c_i = [new_c_i.get(i, c_i[i]) for i in range(learners)]
        torch.testing.assert_close(scaffold.control, c, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(nn.utils.parameters_to_vector(model.parameters()), x, rtol=1e-4, atol=1e-6)
    for learner in range(learners):  # the last round's changes, committed once a later state says it was applied
        own[learner].adopt(scaffold.control, 5, (0, 0), vectors[learner][layout.controls], False)
        torch.testing.assert_close(own[learner].own, c_i[learner], rtol=1e-4, atol=1e-6)
    assert torch.linalg.vector_norm(c) > 0.1 and all(torch.linalg.vector_norm(ci) > 0.1 for ci in c_i)
