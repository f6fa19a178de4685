"""How long training runs and how fast it learns: rounds, epochs and the learning-rate schedule."""

import math
from dataclasses import dataclass
from typing import Any

from federated.core.plan import steps_per_epoch as epoch_steps


def learning_rate(round_index: int, base_lr: float, warmup_rounds: int, total_rounds: int) -> float:
    """Linear warm-up to base_lr over warmup_rounds, then cosine decay towards zero."""
    if round_index < warmup_rounds:
        return base_lr * (round_index + 1) / warmup_rounds
    progress = (round_index - warmup_rounds) / max(1, total_rounds - warmup_rounds)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """How long training runs and how fast it learns. A round is steps_per_round batches on each learner
    (one for FedSGD); an epoch is a pass over a learner's shard, steps_per_epoch batches."""

    total_rounds: int
    steps_per_epoch: int
    steps_per_round: int
    warmup_rounds: int
    base_lr: float

    @classmethod
    def of(cls, config: Any, strategy: Any, shard_size: int) -> "Schedule":
        """The schedule of a run with these flags (the leader's configuration) and strategy (class), for learners
        holding shard_size images each (when sizes differ: the mean of the leader's shards, or the median of the
        sizes learners claim)."""
        steps_per_epoch = epoch_steps(shard_size, config.batch_size)
        steps_per_round = strategy.steps_per_round(config, steps_per_epoch)
        rounds_per_epoch = steps_per_epoch / steps_per_round
        total = config.rounds if config.rounds is not None else max(1, math.ceil(config.epochs * rounds_per_epoch))
        warmup = min(round(config.warmup_epochs * rounds_per_epoch), total // 5)
        return cls(total, steps_per_epoch, steps_per_round, warmup, strategy.peak_lr(config))

    def epoch_of(self, round_index: int) -> int:
        """The 1-based epoch that round_index (0-based) begins in."""
        return round_index * self.steps_per_round // self.steps_per_epoch + 1

    def ends_epoch(self, rounds_done: int) -> bool:
        """Whether the round that made rounds_done crossed the end of an epoch."""
        return self.epoch_of(rounds_done) > self.epoch_of(rounds_done - 1) if rounds_done > 0 else False

    @property
    def rounds_per_epoch(self) -> float:
        return self.steps_per_epoch / self.steps_per_round

    def lr(self, round_index: int) -> float:
        return learning_rate(round_index, self.base_lr, self.warmup_rounds, self.total_rounds)
