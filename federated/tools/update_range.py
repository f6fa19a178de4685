"""The largest |value| in a strategy's updates over the first rounds of a small federation, run in one process:
what --secagg-clip-range must cover for secure rounds to clip nothing (docs/secure-aggregation.md).

`python -m federated.tools.update_range [leader.py flags]`, e.g. `--strategy fedavg --rounds 10`: prints, per
part of the update vector (gradients or pseudo-gradients, BatchNorm statistics, SCAFFOLD's control changes), the
largest |value| any learner sent in any round.
"""

import sys
from functools import partial

import utils
from federated.common import runtime
from federated.core import strategies
from federated.leader import config as leader_flags
from federated.leader.data import DataFacts
from federated.leader.global_model import GlobalModel
from federated.leader.planner import Planner
from federated.learner.app import round_batch
from federated.learner.data import Batches
from federated.learner.state import Replica
from federated.wire import codec


def largest_values(argv: list[str]) -> dict[str, float]:
    """Run the flags' federation (its --learners, each with its shard of the training split) for its rounds, the
    plain mean stepping the model; the largest |value| of each part of any learner's update."""
    config = leader_flags.configure(leader_flags.command_line(argv))
    train = utils.load_dataset(config.dataset, config.data_dir, True, config.image_size)
    shards = [train.subset(indices) for indices in utils.shard_indices(len(train), config.learners, config.seed)]
    mean, std = utils.channel_stats(train.images)
    strategy = strategies.named(config.strategy)(config)
    planner = Planner(config, strategy, DataFacts(mean, std, len(shards[0])))
    model = GlobalModel(config, train.num_classes, strategy, (mean, std))
    layout = model.layout
    parts = {
        "update": slice(0, layout.parameter_count),
        "statistics": slice(layout.parameter_count, layout.parameter_count + layout.statistics_count),
        "controls": layout.controls,
    }
    largest = dict.fromkeys(parts, 0.0)
    model.publish(0, False, plan=planner.plan(0, None))
    replicas = [Replica(codec.decode(model.encoded_state), "cpu") for _ in shards]
    batches = [Batches(shard, config.batch_size, config.seed, learner, "cpu") for learner, shard in enumerate(shards)]
    for round_index in range(planner.schedule.total_rounds):
        plan, state = planner.plan(round_index, None), codec.decode(model.encoded_state)
        model.mean_gradient.zero_()
        for replica, shard, its_batches in zip(replicas, shards, batches):
            replica.adopt(state, fetched=False)
            own = plan.for_shard(len(shard), config.batch_size)
            replica.local_update(partial(round_batch, its_batches, replica, own.local_steps), own)
            for name, part in parts.items():
                values = replica.gradient[part]
                largest[name] = max(largest[name], values.abs().max().item() if values.numel() else 0.0)
            model.mean_gradient.add_(replica.gradient, alpha=1 / len(shards))
        model.step(planner.schedule.lr(round_index), planner.schedule.steps_per_round, len(shards), len(shards))
        model.publish(round_index + 1, False, plan=planner.plan(round_index + 1, None))
    return {name: value for name, value in largest.items() if parts[name].stop > parts[name].start}


def main(argv: list[str] | None = None) -> int:
    runtime.set_threads(runtime.available_cores())
    argv = sys.argv[1:] if argv is None else argv
    for name, value in largest_values(argv).items():
        print(f"largest |value| of the {name}: {value:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
