"""FedSGD arithmetic: equivalence with centralised SGD, weighting, BatchNorm statistics, schedule, and the
project's models (group norm, torchvision's) through the update layout."""

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from federated.core.aggregation import RoundUpdates
from federated.core.layout import GradientLayout, wire_state
from federated.core.schedule import learning_rate
from federated.core.steps import GuardedStep, apply_mean_gradient, make_optimizer
from federated.core.training import compute_gradient, evaluate
from federated.leader.collector import RoundCollector
from federated.wire import codec
from model import build_model
from tests.support.nets import assert_same_parameters, batch, small_net


class SimulatedLearner:
    """What learner.py does per round, minus gRPC: gradient into a bound flat buffer, then encode."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model)
        self.layout = GradientLayout(self.model)
        self.flat = torch.zeros(self.layout.size)
        self.layout.bind_gradients(self.flat)

    def gradient_payload(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[bytes, float]:
        loss = compute_gradient(self.model, self.layout, self.flat, images, labels)
        return codec.encode(self.layout.wire_tensors(self.flat)), loss

    def load(self, model: nn.Module) -> None:
        self.model.load_state_dict(model.state_dict())


def federated_rounds(model: nn.Module, batches_per_round: list[list[tuple]], lr: float = 0.1) -> nn.Module:
    """Run FedSGD rounds through the wire format and the leader's collector; return the global model."""
    global_model = copy.deepcopy(model)
    layout = GradientLayout(global_model)
    mean = torch.zeros(layout.size)
    layout.bind_gradients(mean)
    optimizer = make_optimizer(global_model, lr, momentum=0.9, weight_decay=5e-4)
    learners = [SimulatedLearner(model) for _ in batches_per_round[0]]
    collector = RoundCollector(layout.size)
    collector.expect(list(range(len(learners))))
    for round_index, batches in enumerate(batches_per_round):
        for learner_id, (learner, (images, labels)) in enumerate(zip(learners, batches)):
            payload, loss = learner.gradient_payload(images, labels)
            decoded = codec.decode(payload)
            codec.check_matches(decoded, layout.spec)
            assert (
                collector.submit(learner_id, round_index, codec.flat_runs(decoded), len(labels), loss, len(payload))
                is None
            )
        collector.close(mean)
        apply_mean_gradient(layout, optimizer, mean, lr)
        for learner in learners:
            learner.load(global_model)
    return global_model


def centralised_steps(model: nn.Module, batches_per_round: list[list[tuple]], lr: float = 0.1) -> nn.Module:
    model = copy.deepcopy(model)
    optimizer = make_optimizer(model, lr, momentum=0.9, weight_decay=5e-4)
    for batches in batches_per_round:
        images = torch.cat([images for images, _ in batches])
        labels = torch.cat([labels for _, labels in batches])
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model


def test_k_learners_of_batch_b_equal_one_centralised_step_on_k_times_b():
    model = small_net()
    rounds = [[batch(8, seed=10 * r + k) for k in range(3)] for r in range(3)]
    assert_same_parameters(federated_rounds(model, rounds), centralised_steps(model, rounds))


def test_unequal_batches_are_weighted_by_their_size():
    model = small_net()
    rounds = [[batch(2, seed=1), batch(9, seed=2)]]
    assert_same_parameters(federated_rounds(model, rounds), centralised_steps(model, rounds))
    equal_weights = centralised_steps(model, [[batch(2, seed=1)]])
    assert not torch.allclose(federated_rounds(model, rounds)[0].weight, equal_weights[0].weight)


def test_batchnorm_statistics_are_the_sample_weighted_average_of_the_learners():
    model = small_net(batch_norm=True)
    batches = [batch(4, seed=1), batch(12, seed=2)]
    learner_stats = []
    for images, labels in batches:
        learner = SimulatedLearner(model)
        learner.gradient_payload(images, labels)
        bn = learner.model[1]
        learner_stats.append((bn.running_mean.clone(), bn.running_var.clone()))
    bn = federated_rounds(model, [batches])[1]
    torch.testing.assert_close(bn.running_mean, (4 * learner_stats[0][0] + 12 * learner_stats[1][0]) / 16)
    torch.testing.assert_close(bn.running_var, (4 * learner_stats[0][1] + 12 * learner_stats[1][1]) / 16)
    assert bn.num_batches_tracked.item() == 1
    assert not torch.equal(bn.running_mean, torch.zeros(4))


def test_bound_gradients_equal_autograd_and_do_not_accumulate_across_calls():
    model = small_net()
    layout = GradientLayout(model)
    flat = torch.zeros(layout.size)
    layout.bind_gradients(flat)
    images, labels = batch(5, seed=3)
    compute_gradient(model, layout, flat, images, labels)
    compute_gradient(model, layout, flat, images, labels)
    reference = copy.deepcopy(model)
    expected = torch.autograd.grad(nn.functional.cross_entropy(reference(images), labels), list(reference.parameters()))
    torch.testing.assert_close(flat[: layout.parameter_count], torch.cat([g.flatten() for g in expected]))


def test_layout_puts_parameters_before_float_buffers():
    layout = GradientLayout(small_net(batch_norm=True))
    names = list(layout.spec)
    assert names[-2:] == ["1.running_mean", "1.running_var"]
    assert "1.num_batches_tracked" not in names
    assert layout.size == layout.parameter_count + 8


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    rates = [learning_rate(r, 0.4, warmup_rounds=4, total_rounds=20) for r in range(20)]
    assert rates[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert rates[4] == pytest.approx(0.4)
    assert all(a >= b for a, b in itertools.pairwise(rates[4:])) and rates[-1] < 0.01


def test_weight_decay_spares_biases_and_batchnorm():
    optimizer = make_optimizer(small_net(batch_norm=True), 0.1, 0.9, 5e-4)
    decayed, spared = optimizer.param_groups
    assert all(p.ndim > 1 for p in decayed["params"]) and spared["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in spared["params"])


def test_evaluate_reports_loss_and_accuracy_as_a_fraction():
    logits = torch.eye(10)[[0, 1, 2, 3]] * 20
    result = evaluate(nn.Identity(), logits, torch.tensor([0, 1, 2, 9]), batch_size=3)
    assert result.accuracy == 0.75
    assert result.loss == pytest.approx(5.0, abs=0.01)


@pytest.mark.parametrize("wire_dtype", [torch.float16, torch.bfloat16])
def test_batchnorm_statistics_travel_in_float32_whatever_the_wire_dtype(wire_dtype):
    model = small_net(batch_norm=True)
    layout = GradientLayout(model, wire_dtype)
    flat = torch.zeros(layout.size)
    layout.bind_gradients(flat)
    compute_gradient(model, layout, flat, *batch(4, seed=1))
    flat[-4:] = 1.0 + 1e-4  # running variances a small step from 1.0: bfloat16 would round them to 1.0
    payload = codec.decode(codec.encode(layout.wire_tensors(flat)))
    codec.check_matches(payload, layout.spec)
    assert payload.tensors["1.running_var"].dtype == torch.float32
    assert payload.tensors["0.weight"].dtype == wire_dtype
    received = torch.zeros(layout.size)
    accumulator = RoundUpdates(layout.size, layout.size)
    accumulator.add(codec.flat_runs(payload), samples=1, loss=0.0)
    accumulator.combine_into(received)
    assert torch.equal(received[layout.parameter_count :], flat[layout.parameter_count :])
    state = wire_state(model, wire_dtype)
    assert state["1.running_var"].dtype == torch.float32 and state["0.weight"].dtype == wire_dtype


def stepped_model(momentum: float = 0.9):
    model = small_net(batch_norm=True)
    layout = GradientLayout(model)
    mean = torch.zeros(layout.size)
    layout.bind_gradients(mean)
    optimizer = make_optimizer(model, 0.1, momentum, 5e-4)
    layout.read_buffers(mean)
    return model, layout, mean, optimizer, GuardedStep(model, layout, optimizer)


def momentum_of(optimizer) -> list[torch.Tensor]:
    return [state["momentum_buffer"].clone() for state in optimizer.state.values() if "momentum_buffer" in state]


def test_a_finite_step_is_applied():
    model, layout, mean, optimizer, step = stepped_model()
    before = copy.deepcopy(model.state_dict())
    mean[: layout.parameter_count] = 0.01
    assert step(mean, lr=0.1) is None
    assert not torch.equal(model[0].weight, before["0.weight"]) and len(momentum_of(optimizer)) > 0


@pytest.mark.parametrize("poison", ["nan mean", "overflowing momentum", "negative variance"])
def test_a_step_that_would_leave_a_non_finite_value_is_undone_exactly(poison):
    model, layout, mean, optimizer, step = stepped_model()
    mean[: layout.parameter_count] = 1.0
    assert step(mean, lr=0.1) is None  # a first step creates the momentum
    if poison == "nan mean":
        mean[0] = float("nan")
    elif poison == "overflowing momentum":  # finite, but momentum 0.9 * 3e38 + 3e38 is not
        optimizer.state[model[0].weight]["momentum_buffer"].fill_(3e38)
        mean[: layout.parameter_count] = 3e38
    else:
        mean[-1] = -1.0
    before, momentum = copy.deepcopy(model.state_dict()), momentum_of(optimizer)
    assert step(mean, lr=0.1)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(momentum, momentum_of(optimizer)))


def test_an_undone_first_step_leaves_no_momentum_behind():
    model, layout, mean, optimizer, step = stepped_model()
    mean[: layout.parameter_count] = 3e38
    optimizer.param_groups[0]["lr"] = 0.1
    assert step(mean, lr=1e10)  # the weights overflow
    assert momentum_of(optimizer) == [] and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "architecture, norm",
    [
        ("resnet20", "group"),
        ("resnet20", "batch"),
        ("torchvision:mobilenet_v3_small", "batch"),
        ("torchvision:resnet18", "batch"),
    ],
)
@pytest.mark.parametrize("size", [32, 64])
def test_a_round_of_the_projects_models_goes_through_the_layout_and_the_wire(architecture, norm, size):
    torch.manual_seed(0)
    model = build_model(architecture, num_classes=7, norm=norm)
    learner = SimulatedLearner(model)
    images, labels = torch.randn(4, 3, size, size), torch.arange(4) % 7
    _, loss = learner.gradient_payload(images, labels)
    layout = GradientLayout(model, torch.bfloat16)  # the leader's, over the global model
    decoded = codec.decode(codec.encode(layout.wire_tensors(learner.flat)))
    codec.check_matches(decoded, layout.spec)
    assert layout.update_problem(decoded.tensors) is None
    statistics = [name for name, buffer in model.named_buffers() if buffer.is_floating_point()]
    assert list(layout.spec)[len(layout.parameters) :] == statistics  # every one, after the gradients
    assert (norm == "group") == (statistics == [] and layout.counters == [])
    mean = torch.zeros(layout.size)
    layout.bind_gradients(mean)
    accumulator = RoundUpdates(layout.size, layout.parameter_count)
    accumulator.add(codec.flat_runs(decoded), samples=len(labels), loss=loss)
    accumulator.combine_into(mean)
    optimizer = make_optimizer(model, 0.01, 0.9, 5e-4)
    before = copy.deepcopy(model.state_dict())
    # lr 0.01, a warm-up's: torchvision's ResNet-18 pools 32x32 images down to 1x1 maps, where BatchNorm over
    # 4 images gives its stem a gradient of 119 times its norm (12.8 over 32 images), which the guard refuses at 0.1
    assert GuardedStep(model, layout, optimizer)(mean, lr=0.01) is None
    assert not all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert all(counter.item() == 1 for counter in layout.counters)
    result = evaluate(model, images, labels, batch_size=3)
    assert math.isfinite(result.loss) and 0.0 <= result.accuracy <= 1.0


class ConstantTable(nn.Module):
    """A layer with a constant float buffer beside its weights, as Swin V2's attention has."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 10)
        self.register_buffer("relative_coords_table", torch.linspace(-8, 8, 15) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean((2, 3))) + self.relative_coords_table.sum()


def test_constant_float_buffers_travel_in_the_state_but_not_in_updates():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), ConstantTable())
    layout = GradientLayout(model)
    assert "2.relative_coords_table" not in layout.spec and "1.running_var" in layout.spec
    assert "2.relative_coords_table" in wire_state(model, torch.float32)
    table = model[2].relative_coords_table.clone()
    rounds = [[batch(3, seed=1), batch(5, seed=2), batch(7, seed=3)] for _ in range(3)]
    assert torch.equal(federated_rounds(model, rounds)[2].relative_coords_table, table)
    with torch.device("meta"):
        swin = build_model("torchvision:swin_v2_t", num_classes=7)
    assert not any("relative_coords_table" in name for name in GradientLayout(swin).spec)
