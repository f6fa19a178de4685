"""What each round asks of learners: the schedule, the strategy's plan at the schedule's learning rate, and when
the global model is evaluated and checkpointed."""

import dataclasses
import logging

from federated.core import compression
from federated.core.plan import SecureRound, TrainingPlan, steps_for_epochs, steps_per_epoch
from federated.core.schedule import Schedule
from federated.core.strategies import Strategy
from federated.leader.config import LeaderConfig
from federated.leader.data import MAX_SHARD_FACTOR, DataFacts

log = logging.getLogger("leader")


class Planner:
    """The run's schedule and plans. A leader without data plans with a provisional schedule (a shard of one
    batch) until it has settled on its learners' data (settle); nobody trains before that."""

    def __init__(self, config: LeaderConfig, strategy: Strategy, facts: DataFacts | None) -> None:
        self.config, self.strategy, self.facts = config, strategy, facts
        self.schedule = Schedule.of(config, strategy, facts.shard_size if facts else config.batch_size)

    def settle(self, facts: DataFacts) -> None:
        """The data's facts are known: plan for them from now on."""
        self.facts = facts
        self.schedule = Schedule.of(self.config, self.strategy, facts.shard_size)

    def plan(self, round_index: int, participants: list[int] | None) -> TrainingPlan:
        """How learners train round_index: the strategy's local training at the schedule's learning rate, after
        evaluating the state on their held-out images when an evaluation is due."""
        chosen = None if participants is None else tuple(participants)
        plan = self.strategy.plan(
            self.schedule.steps_per_round, self.schedule.lr(round_index), chosen, self.evaluation_due(round_index)
        )
        plan = dataclasses.replace(
            plan,
            secure=self.secure_round(),
            compress=self.config.compress,
            compress_ratio=self.config.compress_ratio,
            compress_rank=self.config.compress_rank,
        )
        if self.config.dp == "none":
            return plan
        return dataclasses.replace(
            plan,
            dp=self.config.dp,
            dp_clip=self.config.dp_clip,
            dp_noise_multiplier=self.config.dp_noise_multiplier,
            dp_delta=self.config.dp_delta,
        )

    def secure_round(self) -> SecureRound | None:
        """With --secure-aggregation, the quantisation every round's masked inputs follow: the clip range, the
        weight unit (the most samples one update may weigh: a batch times the round's steps, or with each
        learner's own epochs MAX_SHARD_FACTOR typical learners' steps, as a leader without data caps plain
        updates; the leader cannot cap a folded weight, so learners clamp their own), the least an honest update
        weighs (a learner holding one image: one image a step, its steps) and room for the sum of as many inputs
        as a round may have."""
        config = self.config
        if not config.secure_aggregation:
            return None
        batch = config.batch_size
        if self.strategy.own_epochs:
            typical = self.facts.shard_size if self.facts else batch
            unit = MAX_SHARD_FACTOR * min(batch, typical) * self.steps_of(typical)
        else:
            unit = batch * self.schedule.steps_per_round
        return SecureRound(
            config.secagg_clip_range,
            float(unit),
            config.learners_per_round or config.learners,
            compression.QUANTISED.get(config.compress, 0),
            float(self.steps_of(1)),
        )

    def steps_of(self, shard_size: int | None) -> int:
        """The local steps a round asks of a learner holding shard_size training images: the schedule's, or with
        learners' own epochs as many as they make on its shard (the schedule's where its size is unknown)."""
        if shard_size is None or not self.strategy.own_epochs:
            return self.schedule.steps_per_round
        return steps_for_epochs(self.strategy.own_epochs, steps_per_epoch(shard_size, self.config.batch_size))

    def evaluation_due(self, rounds_done: int) -> bool:
        """Whether the state after rounds_done gets evaluated (at the end, each epoch's end, every --eval-every)."""
        return rounds_done > 0 and (
            rounds_done == self.schedule.total_rounds or self.due(rounds_done, self.config.eval_every)
        )

    def due(self, rounds_done: int, every: int) -> bool:
        """Whether rounds_done ends an epoch or a period of `every` rounds (0: never)."""
        return (every > 0 and rounds_done % every == 0) or self.schedule.ends_epoch(rounds_done)

    def log(self) -> None:
        schedule, own = self.schedule, self.strategy.own_epochs
        log.info(
            "%s: %d rounds of %s (%.3g per epoch of %d images per learner), %s",
            self.strategy.name,
            schedule.total_rounds,
            f"{own:g} epochs of each learner's own shard" if own else f"{schedule.steps_per_round} local steps",
            schedule.rounds_per_epoch,
            self.facts.shard_size if self.facts else 0,
            self.strategy.describe(schedule.base_lr),
        )
