"""Poisoning figures, in one process with the leader's real arithmetic (RoundUpdates, GlobalModel's GuardedStep,
the strategies): how far one hostile learner moves the model inside the guarded step's bounds, and what honest
SCAFFOLD rounds give for the ratios its control bounds check. Not timed, so not in the registry's table:
`python -m federated.tools.bench.poisoning drift` and `... controls` print their figures (docs/security.md)."""

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from federated.core import strategies
from federated.core.aggregation import RoundUpdates, rules
from federated.core.layout import GradientLayout
from federated.core.plan import TrainingPlan
from federated.core.sampling import sample_participants
from federated.core.steps import MAX_RELATIVE_STEP, MAX_TENSOR_STEP
from federated.core.strategies.scaffold import MAX_CONTROL_CHANGE, MAX_CONTROL_REACH, Controls, Scaffold
from federated.core.training import evaluate
from federated.leader import config as leader_flags
from federated.leader import data
from federated.leader.config import LeaderConfig
from federated.leader.global_model import GlobalModel
from federated.leader.planner import Planner
from federated.learner.data import Batches


def leader(argv: list[str]) -> LeaderConfig:
    return leader_flags.configure(leader_flags.command_line(["--dataset", "synthetic", *argv]))


def weights_of(model: GlobalModel) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in model.layout.parameters])


def drift(aggregator: str, learners: int, rounds: int, target: str | None) -> list[tuple[int, float, float]]:
    """One hostile learner among `learners` under FedAvg: every round it sends the update that grows the target
    tensor (None: every weight) as far as the guarded step lets the aggregate go (0.95 of each bound); the honest
    ones send small random updates. The target's norm and the weights' norm after each round, with the round."""
    config = leader(["--strategy", "fedavg", "--learners", str(learners), "--aggregator", aggregator])
    model = GlobalModel(config, 10, strategies.named("fedavg")(config))
    layout, generator = model.layout, torch.Generator().manual_seed(0)
    rule = rules.named(aggregator).from_config(config)
    names = [name for name, _ in layout.parameters]
    start = sum(p.numel() for _, p in layout.parameters[: names.index(target)]) if target else 0
    aimed = slice(start, start + dict(layout.parameters)[target].numel()) if target else slice(0, None)
    history = []
    for round_index in range(rounds + 1):
        weights = weights_of(model)
        history.append((round_index, weights[aimed].norm().item(), weights.norm().item()))
        updates = RoundUpdates(layout.size, layout.parameter_count, rule)
        statistics = torch.cat([b.reshape(-1) for _, b in layout.buffers])
        for _ in range(learners - 1):  # honest: a step of 0.04 times the weights' norm, as sane runs measured
            honest = torch.randn(layout.parameter_count, generator=generator)
            updates.add([honest.mul_(0.04 * weights.norm() / honest.norm()), statistics], 1, 0.0)
        growth = torch.zeros(layout.parameter_count)  # the aggregate's step: -growth, 0.95 of what the bounds allow
        part = weights[aimed]
        room = 0.95 * min(MAX_RELATIVE_STEP * weights.norm().item(), MAX_TENSOR_STEP * max(part.norm().item(), 1.0))
        growth[aimed] = part / part.norm() * room
        updates.add([-growth * learners, statistics], 1, 0.0)  # the mean divides it by the learners
        updates.combine_into(model.mean_gradient)
        model.step(lr=0.1, steps=1, participants=learners, learners=learners)
    return history


def print_drift(rounds: int) -> None:
    print("One hostile learner, FedAvg, inside the guarded step's bounds: norms after N rounds (synthetic ResNet-20)")
    for aggregator, learners in (("mean", 2), ("median", 3), ("krum", 5)):
        for target in ("fc.bias", None):
            history = drift(aggregator, learners, rounds, target)
            picked = [history[index] for index in (0, 10, rounds) if index <= rounds]
            what = target or "all weights"
            cells = ", ".join(f"round {r}: {aimed:.3g} (weights {whole:.3g})" for r, aimed, whole in picked)
            print(f"  {aggregator:6} {learners} learners, aimed at {what:11}: {cells}")


def honest_update(
    model: GlobalModel, strategy: Scaffold, plan: TrainingPlan, batches: Batches, controls: Controls, first: int
) -> tuple[torch.Tensor, float]:
    """One honest learner's SCAFFOLD round on a copy of the global model (its batches from the first-th step on):
    its update vector and loss."""
    local = copy.deepcopy(model.model)
    layout = GradientLayout(local, controls=True)
    flat = torch.zeros(layout.size)
    layout.bind_gradients(flat)
    controls.server.copy_(strategy.control)
    mean, std = list(model.info.mean), list(model.info.std)
    batch_at = lambda step: batches.at(first + step, mean, std)
    return flat, Scaffold.local_update(local, layout, flat, batch_at, plan, controls)


def controls(learners: int, per_round: int, partition: str, rounds: int, local_steps: int) -> dict:
    """An honest SCAFFOLD run (synthetic set, real local updates and leader arithmetic): the largest ratios its
    control bounds check (Scaffold.check_control), the rounds discarded, and the final test accuracy."""
    sampled = str(per_round if per_round < learners else 0)
    run = ["--strategy", "scaffold", "--learners", str(learners), "--learners-per-round", sampled, "--batch-size", "32"]
    config = leader([*run, "--partition", partition, "--rounds", str(rounds), "--local-steps", str(local_steps)])
    with tempfile.TemporaryDirectory() as out:
        loaded = data.load(config, Path(out))
    strategy = Scaffold(config)
    model = GlobalModel(config, loaded.num_classes, strategy, (loaded.facts.mean, loaded.facts.std))
    planner, layout, sampler = Planner(config, strategy, loaded.facts), model.layout, torch.Generator().manual_seed(0)
    own = [Controls(layout.parameter_count) for _ in range(learners)]
    batches = [
        Batches(loaded.shards.train.subset(indices), 32, config.seed, learner, "cpu")
        for learner, indices in enumerate(loaded.shards.indices)
    ]
    change, reach, discarded = 0.0, 0.0, []
    for round_index in range(planner.schedule.total_rounds):
        chosen = sample_participants(list(range(learners)), per_round, sampler)
        plan, updates = planner.plan(round_index, chosen), RoundUpdates(layout.size, layout.parameter_count)
        changes = {}
        for learner in chosen:
            first = round_index * plan.local_steps
            flat, loss = honest_update(model, strategy, plan, batches[learner], own[learner], first)
            updates.add([flat], 32 * plan.local_steps, loss)
            changes[learner] = flat[layout.controls]
        updates.combine_into(model.mean_gradient)
        lr, steps = planner.schedule.lr(round_index), plan.local_steps
        check = strategy.check_control(layout, model.mean_gradient, lr, steps, len(chosen), learners)
        change, reach = max(change, check.change), max(reach, check.reach)
        if problem := model.step(lr, steps, len(chosen), learners):
            discarded.append((round_index, problem))
            continue
        for learner, learner_change in changes.items():
            own[learner].commit(learner_change)
    accuracy = evaluate(model.model, loaded.test_images, loaded.test_labels).accuracy
    return {"change": change, "reach": reach, "discarded": discarded, "accuracy": accuracy}


def print_controls(rounds: int) -> None:
    print("Honest SCAFFOLD runs, synthetic set, ResNet-20, batch 32, client momentum 0.9: the largest ratios")
    for learners, per_round, partition in ((2, 2, "iid"), (4, 2, "dirichlet"), (6, 3, "classes")):
        found = controls(learners, per_round, partition, rounds, local_steps=10)
        print(
            f"  {learners} learners, {per_round} a round, {partition:9}: change {found['change']:.3g} "
            f"(bound {MAX_CONTROL_CHANGE:g}), reach {found['reach']:.3g} (bound {MAX_CONTROL_REACH:g}), "
            f"discarded {found['discarded']}, accuracy {found['accuracy']:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=("drift", "controls"))
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    (print_drift if args.figure == "drift" else print_controls)(args.rounds)


if __name__ == "__main__":
    main()
