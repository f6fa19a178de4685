"""The leader's run: builds its parts from the configuration (or a checkpoint), serves, waits for learners, runs
the rounds to the end and writes the final plot and model."""

import dataclasses
import logging
import threading
import typing

import grpc
import torch

from federated.core import aggregation, strategies
from federated.core.plan import TrainingPlan
from federated.leader import checkpoint, data, dispatch, evaluation
from federated.leader.collector import RoundCollector
from federated.leader.config import LeaderConfig, compression_caveat, secure_compression_caveats
from federated.leader.data import DataFacts
from federated.leader.federation import Federation, Settings, Stalled
from federated.leader.global_model import Diverged, GlobalModel
from federated.leader.loop import RoundLoop
from federated.leader.metrics import MetricsLog, plot_metrics, read_metrics
from federated.leader.planner import Planner
from federated.leader.privacy import LeaderPrivacy
from federated.leader.registry import Registry
from federated.leader.secure import SecureRounds
from federated.leader.servicer import ADD_LEADER_SERVICE, LeaderServicer, method_limits
from federated.net import rpc
from federated.privacy.secagg import Quantisation
from federated.wire import codec

log = logging.getLogger("leader")


class Leader:
    """The training run: its data, strategy, plans, global model, learners' slots, rounds and server."""

    def __init__(self, config: LeaderConfig, saved: dict | None = None) -> None:
        """A run of this configuration; saved: the checkpoint it resumes from."""
        self.config, self.out = config, config.output_dir
        self.out.mkdir(parents=True, exist_ok=True)
        if saved is None:
            checkpoint.set_aside_earlier_run(self.out)
        self.security = rpc.Security.of(config)
        # A leader without data learns normalisation and shard size from its learners once they registered
        # (settle); a resumed one has them in its checkpoint.
        self.data = data.load(config, self.out) if config.dataset != "none" else None
        facts = self.data.facts if self.data else recorded_facts(saved)
        self.strategy = strategies.named(config.strategy)(config)
        self.planner = Planner(config, self.strategy, facts)
        num_classes = self.data.num_classes if self.data else typing.cast(int, config.num_classes)  # (configure
        # refuses --dataset none without --num-classes)
        self.global_model = GlobalModel(
            config, num_classes, self.strategy, (facts.mean, facts.std) if facts else ([], [])
        )
        self.sampler = torch.Generator().manual_seed(config.seed)  # who takes part in each round
        first_round = self.restore(saved) if saved else 0
        self.registry = Registry(config.learners, config.rejoin_grace, restored_slots(saved))
        layout = self.global_model.layout
        # (under --dp local each learner accounts for its own DP-SGD steps: the leader adds no noise to charge)
        self.privacy = LeaderPrivacy(config, saved) if config.dp in ("central", "distributed") else None
        if self.privacy and layout.size != layout.parameter_count:
            raise SystemExit(
                f"--dp {config.dp}: {config.model} keeps running statistics (BatchNorm), which would reach the "
                "leader without noise; choose a model without them (resnet20 or resnet18 with --norm group)"
            )
        client = dispatch.LearnerClient(self.security)
        secure_round = self.planner.secure_round()
        secure = (
            SecureRounds(
                client,
                config.secagg_threshold,
                Quantisation(**dataclasses.asdict(secure_round), wide=layout.statistics).ring(layout.size),
                config.sync_timeout,
            )
            if secure_round
            else None
        )
        self.collector = RoundCollector(
            layout.size,
            first_round,
            aggregation.rules.named(config.aggregator).from_config(config),
            config.clip_norm,
            layout.parameter_count,
            self.global_model.strategy.controls,
            self.privacy.mechanism if self.privacy else None,
            secure.add_masked if secure else None,
        )
        # With sampling, those the checkpoint drew for this round train on this state; in a new run nobody does
        # until the first round draws its participants and pushes it to them.
        self.participants = ((saved or {}).get("participants") or []) if config.learners_per_round else None
        self.publish_first_state()
        self.evaluations = evaluation.Evaluations()
        self.federation = Federation(
            Settings.of(config),
            self.registry,
            self.collector,
            self.global_model,
            self.planner,
            client,
            self.sampler,
            threading.Event(),
            self.participants or None,
            secure,
        )
        self.rounds = RoundLoop(
            config,
            self.planner,
            self.global_model,
            self.collector,
            self.federation,
            self.registry,
            self.evaluations,
            self.sampler,
            self.data,
            self.privacy,
        )
        log.info(
            "%s with %d parameters%s",
            config.model,
            layout.parameter_count,
            "; no data: waiting for the learners' summaries" if not facts else "",
        )
        if facts:
            self.planner.log()
        for caveat in [compression_caveat(config), *secure_compression_caveats(config)]:
            if caveat:
                log.warning("%s", caveat)

    @property
    def stopping(self) -> threading.Event:
        """Set it to stop: a round still waiting for updates is given up (a resume does it again); then checkpoint
        the rounds done, tell the learners and exit."""
        return self.federation.stopping

    def restore(self, saved: dict) -> int:
        """Continue from a checkpoint: its model, optimizer, strategy and random states; return its round."""
        model = self.global_model
        rounds_done = checkpoint.restore(saved, model.model, model.optimizer, self.sampler)
        model.restore(saved)
        checkpoint.keep_metrics_until(self.out / "metrics.jsonl", rounds_done)
        log.info("resuming from the checkpoint at round %d", rounds_done)
        return rounds_done

    def publish_first_state(self) -> None:
        """The state learners start (or a resumed run goes on) from; its evaluation, if due, was done before."""
        first_round = self.collector.round
        finished = first_round >= self.planner.schedule.total_rounds
        plan = self.planner.plan(first_round, self.participants)
        self.global_model.publish(
            first_round, finished, plan=TrainingPlan() if finished else dataclasses.replace(plan, evaluate=False)
        )

    def settle(self) -> bool:
        """A leader without data: combine the registered learners' summaries into the normalisation and the
        epoch's length, then publish the state the learners will start from; False if no learner is left."""
        summaries = list(self.registry.summaries().values())
        if not summaries:  # all dropped since they registered
            return False
        facts = data.settle(summaries, self.config.image_size, self.config.batch_size)
        self.planner.settle(facts)
        self.global_model.adopt_normalisation(facts.mean, facts.std)
        self.publish_first_state()
        self.planner.log()
        return True

    def serve(self) -> grpc.Server:
        config = self.config
        servicer = LeaderServicer(
            self.registry,
            self.collector,
            self.global_model,
            self.data.shards if self.data else None,
            self.planner,
            self.federation,
            self.evaluations,
        )
        if self.federation.secure:  # only masked inputs come in (a plain update is refused): the ring's bytes
            limit = codec.payload_limit(self.federation.secure.ring.spec) + rpc.ENVELOPE_BYTES
        else:  # a compressed update may take more than a plain one (top-k of most of a large tensor: 6 bytes a value)
            limit = max(self.global_model.gradient_payload_bytes(), codec.payload_limit(servicer.compressed_spec))
            limit += rpc.ENVELOPE_BYTES
        server, port = rpc.start_server(
            f"{config.host}:{config.port}",
            [(ADD_LEADER_SERVICE, servicer)],
            [rpc.LEADER_SERVICE],
            limit,
            self.security,
            method_limits(config.idle_timeout),
            config.idle_timeout,
            self.registry.session_status,
            self.registry.caller_name,
            config.learners,
        )
        log.info(
            "LeaderService listening on %s:%d (%s); waiting for %d learners",
            config.host,
            port,
            self.security.describe(),
            config.learners,
        )
        return server

    def wait_for_learners(self) -> bool:
        """Wait for the learners to register (a leader without data: until it could settle on their summaries);
        False if stopped first."""
        while self.federation.wait_for_learners():
            if self.planner.facts or self.settle():
                return True
        return False

    def release_learners(self) -> None:
        """The checkpoint is at the final round: save model.pt if missing, and tell the learners it is over."""
        log.info(
            "the checkpoint is at the final round %d: training is complete; telling its learners", self.collector.round
        )
        if not (self.out / "model.pt").exists():
            self.rounds.save_model()
        self.federation.release()

    def run(self) -> int:
        """Serve and train to the end; return the exit status (1: stalled for lack of learners, or every round
        discarded)."""
        server = self.serve()
        metrics = MetricsLog(
            self.out / "metrics.jsonl", append=bool(self.config.resume), tensorboard=self.config.tensorboard
        )
        status, total = 0, self.planner.schedule.total_rounds
        try:
            if self.collector.round >= total:
                self.release_learners()
            elif self.wait_for_learners():
                done = self.rounds.train(metrics)
                if self.rounds.budget_spent:
                    log.info("the run ended after round %d: %s", done, self.rounds.budget_spent)
                elif done < self.planner.schedule.total_rounds:
                    log.info("stopping on request after round %d", done)
                    self.stop(done)
        except (Stalled, Diverged) as ended:  # checkpointed and resumable: say why, and exit 1
            log.error("%s", ended)
            self.stop(self.collector.round)
            status = 1
        finally:
            metrics.close()
            server.stop(grace=2).wait(5)
        self.report(read_metrics(metrics.path))
        return status

    def stop(self, rounds_done: int) -> None:
        """Checkpoint and tell the learners the leader stopped (it can be resumed)."""
        self.rounds.save_checkpoint(rounds_done)
        self.federation.push_state(rounds_done, finished=True, stopped=True)

    def report(self, records: list[dict]) -> None:
        """Plot the run and, when it is complete, log its final accuracies and where its files are."""
        config = self.config
        if records:
            plot_metrics(
                records,
                self.out / "metrics.png",
                f"{config.strategy} on {config.dataset}, {config.model}, {config.learners} learners",
            )
        if self.collector.round < self.planner.schedule.total_rounds and not self.rounds.budget_spent:
            return
        if self.privacy:
            log.info(
                "privacy spent: epsilon %.4g at delta %g (--dp %s, noise multiplier %g)",
                self.privacy.accountant.epsilon(),
                config.dp_delta,
                config.dp,
                config.dp_noise_multiplier,
            )
        warned = [r["round"] for r in records if "not_learning" in r]
        for source in ("leader", "learners"):
            evaluations = [r for r in records if r.get("source", "leader") == source and "test_accuracy" in r]
            if evaluations:
                log.info(
                    "final test accuracy %.4f (%s)%s; model.pt, metrics.jsonl and metrics.png are in %s",
                    evaluations[-1]["test_accuracy"],
                    "the leader's test split" if source == "leader" else "the learners' held-out images",
                    f", after a warning at round {warned[0]} that the model was not learning" if warned else "",
                    self.out,
                )


def recorded_facts(saved: dict | None) -> DataFacts | None:
    """The data facts a checkpoint recorded (none before a leader without data had settled, nor for one with)."""
    recorded = saved.get("data") if saved else None
    return DataFacts(**recorded) if recorded else None


def restored_slots(saved: dict | None) -> list[dict]:
    """The learners' slots a checkpoint recorded (an older one: addresses alone)."""
    if not saved:
        return []
    return (
        saved["slots"]
        if "slots" in saved
        else [{"address": address, "credential": ""} for address in saved["addresses"]]
    )
