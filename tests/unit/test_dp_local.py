"""Local differential privacy (--dp local): DP-SGD on the learner's real training path (per-example clipping, the
noise's calibration), BatchNorm refused on both sides, the learner's own accountant and --max-epsilon."""

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from federated.core.layout import wire_state
from federated.core.plan import TrainingPlan
from federated.leader.config import LOCAL_DP_NORM, command_line, configure
from federated.learner.state import Replica
from federated.privacy.accountant import Accountant
from federated.privacy.local import Budget, ExampleGradients, delta_for, hook_examples, sample_rate
from federated.wire import codec, messages
from model import build_model
from tests.support.live import learner_config

CLIP, BATCH, SHARD = 0.5, 8, 144
DP = {"dp": "local", "dp_clip": repr(CLIP), "dp_noise_multiplier": "1.0", "dp_delta": "1e-05"}


def state(norm: str, strategy: dict[str, str], dp: dict[str, str] = DP) -> codec.Payload:
    """A resnet20 state at 8 pixels that asks for a strategy (its plan's metadata) and local DP."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, norm)
    info = messages.StateInfo("resnet20", 10, BATCH, 0, (0.5,) * 3, (0.25,) * 3, "float32", image_size=8, norm=norm)
    return codec.decode(codec.encode(wire_state(model, torch.float32), {**info.to_metadata(), **strategy, **dp}))


FEDSGD: dict[str, str] = {}
FEDAVG = {
    "strategy": "fedavg",
    "local_steps": "1",
    "client_lr": "1.0",
    "client_momentum": "0.0",
    "weight_decay": "0.0",
    "mu": "0.0",
}  # fmt: skip  (one plain SGD step: the pseudo-gradient is the gradient)


def batch(outlier: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """BATCH digits-sized images; with outlier, the last is 1000 times brighter with another label."""
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(BATCH, 3, 8, 8, generator=generator), torch.arange(BATCH) % 10
    if outlier:
        images[-1] *= 1000
        labels[-1] = 9
    return images, labels


def update(replica: Replica, images: torch.Tensor, labels: torch.Tensor, plan: TrainingPlan) -> torch.Tensor:
    """The model part of the replica's update for one batch (its real local_update), from the state it holds."""
    snapshot = {name: tensor.clone() for name, tensor in replica.model.state_dict().items()}
    replica.local_update(lambda step: (images, labels), plan)
    replica.model.load_state_dict(snapshot)  # (FedAvg stepped: back to the round's weights)
    return replica.gradient[: replica.layout.parameter_count].clone()


@pytest.mark.parametrize("strategy", [FEDSGD, FEDAVG], ids=["fedsgd", "fedavg"])
def test_per_example_clipping_bounds_one_outliers_influence_on_the_update_to_clip_over_batch(strategy):
    # no noise, to see the clipping: B g(batch) - (B - 1) g(batch without the outlier) is the outlier's clipped
    # gradient, at most CLIP; without DP-SGD the same outlier moves the update by far more
    noiseless = state("group", strategy, {**DP, "dp_noise_multiplier": "1e-30"})
    replica = Replica(noiseless, "cpu")
    plan = replica.plan
    images, labels = batch(outlier=True)
    with_outlier = update(replica, images, labels, plan)
    without = update(replica, images[:-1], labels[:-1], plan)
    contribution = torch.linalg.vector_norm(BATCH * with_outlier - (BATCH - 1) * without).item()
    assert CLIP * 0.5 < contribution <= CLIP * (1 + 1e-4)  # clipped to C, and the outlier's gradient was above C
    plain = Replica(state("group", strategy, {}), "cpu")
    raw = BATCH * update(plain, images, labels, plain.plan) - (BATCH - 1) * update(plain, *batch(False), plain.plan)
    assert torch.linalg.vector_norm(raw).item() > 10 * CLIP


def test_the_noise_has_the_calibrated_standard_deviation_noise_multiplier_times_clip_over_batch():
    replica = Replica(state("group", FEDSGD), "cpu")
    clean = update(replica, *batch(False), TrainingPlan(dp="local", dp_clip=CLIP, dp_noise_multiplier=1e-30))
    for sigma in (0.5, 2.0):
        noised = update(replica, *batch(False), TrainingPlan(dp="local", dp_clip=CLIP, dp_noise_multiplier=sigma))
        # ~270,000 coordinates, each an independent draw of the noise: their spread is its standard deviation
        measured = ((noised - clean) * BATCH).std().item()
        assert measured == pytest.approx(sigma * CLIP, rel=0.05)


def test_each_learner_draws_its_own_noise_not_the_runs_seed():
    first, second = (Replica(state("group", FEDSGD), "cpu") for _ in range(2))
    plan = first.plan
    assert not torch.equal(update(first, *batch(False), plan), update(second, *batch(False), plan))


def test_example_gradients_leave_no_per_example_gradients_behind():
    replica = Replica(state("group", FEDSGD), "cpu")
    update(replica, *batch(False), replica.plan)
    assert all(getattr(p, "grad_sample", None) is None for p in replica.model.parameters())
    assert isinstance(replica.backward(replica.plan), ExampleGradients)


@pytest.mark.parametrize("norm", ["batch", "renorm"])
def test_a_learner_refuses_a_state_that_asks_for_local_dp_with_a_batch_norm_model(norm):
    with pytest.raises(codec.PayloadError, match=r"local differential privacy.*mix the examples.*--norm group"):
        Replica(state(norm, FEDSGD), "cpu")
    Replica(state(norm, FEDSGD, {}), "cpu")  # without local DP it trains as ever


def leader(*flags: str):
    return configure(command_line(["--dataset", "digits", "--image-size", "8", *flags]))


@pytest.mark.parametrize("norm", ["batch", "renorm"])
def test_the_leader_refuses_local_dp_with_batch_norm_and_advises_group_norm(norm, capsys):
    with pytest.raises(SystemExit):
        leader("--dp", "local", "--norm", norm)
    assert "mix the examples of a batch; use --norm group" in capsys.readouterr().err


@pytest.mark.parametrize("norm", ["group", "group-ws", "layer-ws"])
def test_the_leader_takes_local_dp_with_the_group_norms_and_auto_picks_group_norm(norm):
    assert leader("--dp", "local", "--norm", norm).model_norm == norm
    assert leader("--dp", "local").model_norm == LOCAL_DP_NORM == "group"
    assert leader("--dp", "local", "--partition", "dirichlet").model_norm == "group"
    assert leader().model_norm == "batch"  # (without it, auto is as it was)


def local_plan(steps: int, sigma: float = 1.1, delta: float = 1e-5) -> TrainingPlan:
    return TrainingPlan("fedavg", steps, dp="local", dp_clip=1.0, dp_noise_multiplier=sigma, dp_delta=delta)


def opacus_epsilon(schedule: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus' RDP analysis of (noise multiplier, sample rate, steps) entries, independently of the accountant."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # (Opacus' default orders)
    rdp = sum(compute_rdp(q=rate, noise_multiplier=sigma, steps=n, orders=orders) for sigma, rate, n in schedule)
    return get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


def test_the_learners_epsilon_equals_opacus_analysis_of_its_own_schedule():
    budget, epsilons = Budget(0.0), []
    for steps in (18, 18, 9, 18):  # its rounds' local steps (a round of half the steps, as --local-steps-per gives)
        epsilons.append(budget.charge(local_plan(steps), SHARD, 32))
    rate = 32 / 144
    assert epsilons[-1] == pytest.approx(opacus_epsilon([(1.1, rate, 63)], 1e-5), rel=1e-9)
    assert epsilons[1] == pytest.approx(opacus_epsilon([(1.1, rate, 36)], 1e-5), rel=1e-9)
    assert epsilons == sorted(epsilons) and 0 < epsilons[0]
    assert budget.charge(TrainingPlan(dp="local", dp_clip=1, dp_noise_multiplier=2.0, dp_delta=1e-5), SHARD, 32) == (
        pytest.approx(opacus_epsilon([(1.1, rate, 63), (2.0, rate, 1)], 1e-5), rel=1e-9)
    )


def test_the_learner_reports_at_most_at_delta_one_over_its_shard_whatever_delta_the_leader_names():
    assert (delta_for(1e-5, SHARD), delta_for(0.5, SHARD)) == (1e-5, 1 / SHARD)
    assert (sample_rate(SHARD, 32), sample_rate(20, 32)) == (32 / SHARD, 1.0)
    lenient, held = Budget(0.0), Budget(0.0)
    lenient.charge(local_plan(10), SHARD, 32)
    assert held.charge(local_plan(10, delta=0.5), SHARD, 32) == pytest.approx(
        Accountant(1 / SHARD, lenient.accountant.state()).epsilon()
    )


def test_max_epsilon_sits_out_the_round_that_would_exceed_it_whatever_the_leader_asks():
    budget, trained = Budget(4.0), 0
    while budget.refusal(local_plan(18, sigma=2.0), SHARD, 32) is None and trained < 50:
        budget.charge(local_plan(18, sigma=2.0), SHARD, 32)
        trained += 1
    assert 1 < trained < 50 and budget.accountant.epsilon() <= 4.0 < budget.accountant.epsilon_after(2.0, 32 / 144, 18)
    assert "past --max-epsilon 4" in (budget.refusal(local_plan(18, sigma=2.0), SHARD, 32) or "")
    # a hostile leader: less noise and a huge delta, or no local DP at all
    assert Budget(8.0).refusal(local_plan(18, sigma=0.3, delta=0.9), SHARD, 32) is not None
    assert "no local differential privacy" in (Budget(8.0).refusal(TrainingPlan("fedavg", 18), SHARD, 32) or "")
    assert Budget(0.0).refusal(TrainingPlan("fedavg", 18), SHARD, 32) is None  # (0: it trains as the leader asks)


@pytest.mark.parametrize("norm", ["group", "layer-ws"])  # (layer-ws: Opacus' fallback for standardised convolutions)
def test_the_hooked_models_per_example_gradients_are_each_images_own_gradient(norm):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, norm)
    hook_examples(model)
    images, labels = batch(False)
    torch.nn.functional.cross_entropy(model(images[:4]), labels[:4]).backward()
    parameters = [p for p in model.parameters() if p.requires_grad]
    examples = [p.grad_sample.clone() for p in parameters]
    for index in range(4):
        alone = torch.autograd.grad(
            torch.nn.functional.cross_entropy(model(images[index : index + 1]), labels[index : index + 1]), parameters
        )
        for per_example, gradient in zip(examples, alone):
            torch.testing.assert_close(per_example[index], gradient, rtol=1e-4, atol=1e-5)


def test_the_budgets_summary_says_what_it_spent_in_how_many_steps():
    budget = Budget(0.0)
    assert budget.summary() is None
    budget.charge(local_plan(18), SHARD, 32)
    budget.charge(local_plan(9), SHARD, 32)
    assert budget.summary() == f"spent epsilon {budget.accountant.epsilon():.3f} at delta 1e-05 in 27 DP-SGD steps"


def test_a_budget_file_keeps_the_spent_epsilon_across_restarts_and_a_foreign_file_is_refused(tmp_path, capsys):
    path = tmp_path / "budget.json"
    budget = Budget(4.0, path)
    for _ in range(3):
        budget.charge(local_plan(18, sigma=2.0), SHARD, 32)
    restarted = Budget(4.0, path)  # a new process: it goes on from the steps spent, not from 0
    assert restarted.at(budget.delta).epsilon() == budget.accountant.epsilon() > 0
    assert restarted.refusal(local_plan(18, sigma=2.0), SHARD, 32) == budget.refusal(
        local_plan(18, sigma=2.0), SHARD, 32
    )
    (tmp_path / "foreign.json").write_text('{"not": "a budget"}')
    with pytest.raises(SystemExit):
        learner_config(["--budget-file", str(tmp_path / "foreign.json")])
    assert "holds no budget" in capsys.readouterr().err
    assert learner_config(["--budget-file", str(path)]).budget_file == str(path)


@pytest.mark.parametrize(
    "entries", ["[[1.0, 1.0, -100000]]", "[[NaN, 0.5, 1]]", "[[1.0, 1.5, 3]]", "[[0.0, 0.5, 3]]", "[[1.0, 0.0, 3]]"]
)
def test_a_budget_file_whose_entries_would_spend_less_than_they_did_is_refused(tmp_path, entries):
    # (review: a negative step count passed the budget check where 100 steps were refused; a NaN hung the check)
    path = tmp_path / "budget.json"
    path.write_text(entries)
    with pytest.raises(ValueError, match="holds no budget"):
        Budget(1.0, path)
