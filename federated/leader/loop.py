"""The round loop: open a round, wait for its updates, aggregate and step, evaluate, push the next state, and
record it all (metrics, evaluations, model.pt, checkpoints)."""

import dataclasses
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from federated.common import flags, runtime
from federated.core.training import evaluate
from federated.leader import checkpoint, progress
from federated.leader.collector import RoundCollector
from federated.leader.config import LeaderConfig
from federated.leader.data import LeaderData
from federated.leader.evaluation import Evaluations
from federated.leader.federation import Federation
from federated.leader.global_model import Diverged, GlobalModel
from federated.leader.metrics import MetricsLog, read_metrics
from federated.leader.planner import Planner
from federated.leader.privacy import LeaderPrivacy
from federated.leader.registry import Registry

log = logging.getLogger("leader")


class RoundLoop:
    """Rounds from the collector's open one to the schedule's end, and what each writes."""

    def __init__(
        self,
        config: LeaderConfig,
        planner: Planner,
        global_model: GlobalModel,
        collector: RoundCollector,
        federation: Federation,
        registry: Registry,
        evaluations: Evaluations,
        sampler: torch.Generator,
        data: LeaderData | None,
        privacy: LeaderPrivacy | None = None,
    ) -> None:
        self.config, self.out, self.planner, self.global_model = config, config.output_dir, planner, global_model
        self.collector, self.federation, self.registry = collector, federation, registry
        self.evaluations, self.sampler, self.data, self.privacy = evaluations, sampler, data, privacy
        # why --dp-target-epsilon ended the run before its schedule's end: the round that spent it was its last
        self.budget_spent: str | None = None

    def train(self, metrics: MetricsLog) -> int:
        """Run rounds until the schedule ends or a stop is requested; return the rounds done."""
        total = self.planner.schedule.total_rounds
        with logging_redirect_tqdm():  # log lines print above the bar instead of through it
            progress = tqdm(total=total, initial=self.collector.round, desc="rounds", unit="round", disable=None)
            self.federation.start()
            round_started = time.perf_counter()
            self.budget_spent = self.privacy.exhausted() if self.privacy else None
            if self.budget_spent:  # (a resume of a run that ended so, or a first round beyond the target)
                self.end_early(self.collector.round)
            while self.collector.round < total and not self.federation.stopping.is_set() and not self.budget_spent:
                ended = self.run_round(self.collector.round, round_started, metrics)
                if ended is None:
                    break
                round_started = ended
                progress.update()
            progress.close()
        return self.collector.round

    def run_round(self, round_index: int, round_started: float, metrics: MetricsLog) -> float | None:
        """Open round_index, wait for its updates, step, evaluate and push when due, checkpoint, and record it;
        returns when it ended (None if stopped while waiting)."""
        self.federation.open()
        if not self.federation.wait_for_round(round_index):
            return None
        schedule, sampled = self.planner.schedule, self.federation.participants
        updates_in, lr, done = time.perf_counter(), schedule.lr(round_index), round_index + 1
        summary = self.federation.close(self.global_model.mean_gradient)
        # a round released its noised aggregate unless secure aggregation discarded it before unmasking
        rate = self.federation.sample_rate()
        privacy = self.privacy.charge_round(summary.released, rate) if self.privacy else {}
        self.budget_spent = self.privacy.exhausted() if self.privacy else None
        final = done == schedule.total_rounds or self.budget_spent is not None  # the learners are told to exit
        too_few = summary.discarded or self.collector.rule.too_few(summary.learners)
        discarded = too_few or self.global_model.step(
            lr, schedule.steps_per_round, summary.learners, self.config.learners
        )
        if discarded:
            log.warning(
                "round %d discarded, the model is unchanged: %s (%d learners)", done, discarded, summary.learners
            )
        # a secure round discarded counts like a refused step: five in a row stop the run (a hostile learner?)
        recovery = self.global_model.count_round(
            discarded, stepped=too_few is None or summary.discarded is not None, secure=summary.discarded is not None
        )
        if recovery and not recovery.stops:
            log.warning("round %d: %s", done, recovery.message)
        if recovery and recovery.stops and self.privacy and not summary.discarded:  # the noise may be why
            size = self.global_model.layout.parameter_count
            recovery = dataclasses.replace(
                recovery, message=f"{recovery.message} ({self.privacy.swamped(summary.learners, size)})"
            )
        stepped = time.perf_counter()
        eval_seconds = self.evaluate(done, metrics) if self.planner.evaluation_due(done) or final else 0.0
        if final:
            self.save_model()
        pushing = time.perf_counter()
        bytes_out = self.push_state(done, final)
        pushed = time.perf_counter()
        if final or self.planner.due(done, self.config.checkpoint_every):
            self.save_checkpoint(done)
        now = time.perf_counter()
        record = {
            "round": done,
            "epoch": schedule.epoch_of(round_index),
            "train_loss": summary.loss,
            "learners": summary.learners,
            "samples": summary.samples,
            "lr": lr,
            "seconds": now - round_started - eval_seconds,
            "bytes_in": summary.bytes_in,
            "bytes_out": bytes_out + summary.bytes_out,
            "gradients_s": updates_in - round_started,
            "step_s": stepped - updates_in,
            "push_s": pushed - pushing,
            **privacy,
            **({"participants": sampled} if sampled is not None else {}),
            **({"discarded": discarded} if discarded else {}),
            **({"recovery": recovery.message} if recovery else {}),
        }
        if not self.config.secure_aggregation:  # a secure round's leader knows nobody's samples or loss
            record["per_learner"] = {
                str(learner): {"samples": samples, "loss": loss}
                for learner, (samples, loss) in sorted(summary.per_learner.items())
            }
        if done == progress.check_round(schedule.total_rounds, schedule.warmup_rounds):
            self.check_learning(record, metrics)
        metrics.write(record)
        self.write_evaluations(metrics, final=final)
        if done % max(1, schedule.total_rounds // 10) == 0:
            log.info(
                "round %d/%d (epoch %d): train loss %.4f from %d learners%s",
                done,
                schedule.total_rounds,
                schedule.epoch_of(round_index),
                summary.loss,
                summary.learners,
                f", epsilon {privacy['epsilon']:.4g}" if privacy else "",
            )
        if recovery and recovery.stops:  # after the round's record: app.Leader.run checkpoints and stops
            raise Diverged(recovery.message)
        return now

    def end_early(self, rounds_done: int) -> None:
        """The privacy budget was spent before this process ran a round: end as a last round ends (model.pt, a
        checkpoint, the final state to the learners)."""
        self.save_model()
        self.save_checkpoint(rounds_done)
        self.federation.push_state(rounds_done, finished=True)

    def check_learning(self, record: dict, metrics: MetricsLog) -> None:
        """A tenth of the way in: warn once, in the log and in the round's record, when neither the test loss nor
        the train loss has fallen (progress.not_learning) since the run began (read back from metrics.jsonl, which
        a resumed run keeps)."""
        suspects = self.global_model.strategy.suspects(self.planner.schedule.base_lr)
        if warning := progress.not_learning([*read_metrics(metrics.path), record], record["round"], suspects):
            log.warning("%s", warning)
            record["not_learning"] = warning

    def push_state(self, rounds_done: int, finished: bool) -> int:
        """Push the state after rounds_done, the last one if finished (opening the learners' evaluation of it when
        due); returns bytes sent."""
        evaluated = self.planner.evaluation_due(rounds_done)
        if evaluated:
            self.evaluations.open(rounds_done)
        bytes_out = self.federation.push_state(rounds_done, finished)
        if evaluated:
            held_out = {learner for learner, summary in self.registry.summaries().items() if summary.eval_samples}
            participants = self.federation.participants
            sent_to = self.registry.active() if finished or participants is None else participants
            self.evaluations.expect(rounds_done, sorted(held_out & set(sent_to)))
        return bytes_out

    def evaluate(self, round_index: int, metrics: MetricsLog) -> float:
        """Evaluate the global model on the leader's test split, if it has one, and record it; returns the
        seconds it took."""
        if self.data is None:
            return 0.0
        started = time.perf_counter()
        with runtime.torch_threads(self.config.threads or runtime.available_cores()):
            result = evaluate(self.global_model.model, self.data.test_images, self.data.test_labels)
        seconds = time.perf_counter() - started
        metrics.write(
            {
                "round": round_index,
                "epoch": self.planner.schedule.epoch_of(max(0, round_index - 1)),
                "source": "leader",
                "test_loss": result.loss,
                "test_accuracy": result.accuracy,
                "seconds": seconds,
            }
        )
        log.info("round %d: test loss %.4f, test accuracy %.4f", round_index, result.loss, result.accuracy)
        return seconds

    def write_evaluations(self, metrics: MetricsLog, final: bool = False) -> None:
        """Record the learners' evaluations that are over (at the end, after waiting for the last one)."""
        if final:
            self.evaluations.wait(self.collector.round, self.config.round_timeout)
        for record in self.evaluations.records(final):
            record["epoch"] = self.planner.schedule.epoch_of(max(0, record["round"] - 1))
            metrics.write(record)
            log.info(
                "round %d: learners' test loss %.4f, test accuracy %.4f on %d held-out images of %d learners%s",
                record["round"],
                record["test_loss"],
                record["test_accuracy"],
                record["test_samples"],
                len(record["per_learner"]),
                f" (no report from {record['missing']})" if "missing" in record else "",
            )

    def save_model(self) -> Path:
        """model.pt: the global model's state_dict."""
        path = self.out / "model.pt"
        checkpoint.save_atomically(self.global_model.model.state_dict(), path)
        return path

    def save_checkpoint(self, rounds_done: int) -> None:
        model, facts = self.global_model, self.planner.facts
        state = checkpoint.snapshot(
            model.model,
            model.optimizer,
            {**model.checkpoint(), **(self.privacy.checkpoint() if self.privacy else {})},
            rounds_done,
            self.registry.records(),
            self.sampler,
            self.federation.participants,
            # the classes the model tells apart: the dataset's where --num-classes was left out, as checkpoints
            # have always recorded, so that a resume may repeat the number; and the norm the model was built with,
            # --norm auto resolved, so that a resume builds that layer class whatever auto picks by then
            {**flags.trajectory(self.config), "num_classes": model.info.num_classes, "norm": model.info.norm},
            facts.record() if facts else None,
        )
        checkpoint.save_atomically(state, self.out / "checkpoint.pt")
        log.info("checkpoint at round %d", rounds_done)
