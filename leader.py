"""The leader: owns the global model, registers learners, serves model and data, and runs FedSGD rounds."""

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import grpc
import torch
from tqdm import tqdm

import fedsgd
import rpc
import runtime
import utils
import wire
from metrics import MetricsLog, plot_metrics, read_metrics
from model import ARCHITECTURES, build_model
from rounds import Registry, RoundCollector, RoundSummary
from rpc import leader_pb2, leader_pb2_grpc, learner_pb2, learner_pb2_grpc

log = logging.getLogger("leader")

WAIT_LOG_INTERVAL_S = 10.0
RPC_TIMEOUT_S = 60.0
REFERENCE_BATCH = 128  # the learning rate --lr means at this total batch; scaled linearly


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Federated learning leader: serves LeaderService, waits for --learners learners, "
        "then trains the global model with FedSGD (one synchronous gradient step per round).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--learners", type=int, default=2, help="number of learners to wait for and train with")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=50051, help="port to listen on")
    parser.add_argument("--dataset", choices=utils.DATASETS, default="cifar10",
                        help="training data to shard among learners, and the test split to evaluate on")
    parser.add_argument("--data-dir", default="data", help="where cifar10 lives (or is downloaded to), or the imagefolder root")
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="resnet20", help="architecture")
    parser.add_argument("--epochs", type=float, default=30, help="passes over each learner's shard")
    parser.add_argument("--rounds", type=int, help="number of rounds (unset: from --epochs); overrides --epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size per learner per round")
    parser.add_argument("--lr", type=float, help="peak learning rate (unset: 0.1 x total batch / 128, the linear scaling rule)")
    parser.add_argument("--warmup-epochs", type=float, default=1.0,
                        help="linear learning-rate warm-up before cosine decay (at most a fifth of training)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty on weights (not on biases or BatchNorm)")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N rounds (0: only at epoch ends and the end)")
    parser.add_argument("--round-timeout", type=float, default=120.0,
                        help="seconds to wait for all learners' gradients before closing a round with those that arrived")
    parser.add_argument("--min-learners", type=int, default=1, help="gradients needed to close a round after --round-timeout")
    parser.add_argument("--register-timeout", type=float, default=600.0, help="seconds to wait for all learners to register")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for evaluation (0: all cores); steps use one")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model, the shards and the learners' batches")
    parser.add_argument("--out", default="runs/latest", help="directory for model.pt, metrics.jsonl and metrics.png")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.learners < 1 or args.batch_size < 1 or not 1 <= args.min_learners <= args.learners:
        parser.error("--learners and --batch-size must be positive, and 1 <= --min-learners <= --learners")
    return args


@dataclass(frozen=True)
class Schedule:
    """How long training runs and how fast it learns."""

    total_rounds: int
    rounds_per_epoch: int
    warmup_rounds: int
    base_lr: float

    def epoch_of(self, round_index: int) -> int:
        """The 1-based epoch that round_index (0-based) belongs to."""
        return round_index // self.rounds_per_epoch + 1

    def lr(self, round_index: int) -> float:
        return fedsgd.learning_rate(round_index, self.base_lr, self.warmup_rounds, self.total_rounds)


def make_schedule(args: argparse.Namespace, shard_size: int) -> Schedule:
    rounds_per_epoch = shard_size // args.batch_size
    if rounds_per_epoch < 1:
        raise SystemExit(f"--batch-size {args.batch_size} exceeds the {shard_size} samples of each learner's shard")
    total = args.rounds or max(1, math.ceil(args.epochs * rounds_per_epoch))
    warmup = min(round(args.warmup_epochs * rounds_per_epoch), total // 5)
    base_lr = args.lr if args.lr is not None else 0.1 * args.learners * args.batch_size / REFERENCE_BATCH
    return Schedule(total, rounds_per_epoch, warmup, base_lr)


class GlobalModel:
    """The global model, its optimizer and the encoded state the learners fetch."""

    def __init__(self, architecture: str, num_classes: int, args: argparse.Namespace,
                 normalisation: tuple[list[float], list[float]]) -> None:
        torch.manual_seed(args.seed)
        self.model = build_model(architecture, num_classes)
        self.layout = fedsgd.GradientLayout(self.model)
        self.mean_gradient = torch.zeros(self.layout.size)
        self.layout.bind_gradients(self.mean_gradient)
        self.optimizer = fedsgd.make_optimizer(self.model, 0.0, args.momentum, args.weight_decay)
        mean, std = normalisation
        self.metadata = {
            "architecture": architecture, "num_classes": str(num_classes), "batch_size": str(args.batch_size),
            "seed": str(args.seed), "mean": ",".join(map(str, mean)), "std": ",".join(map(str, std)),
        }
        self.payload = self.encode(round_index=0, finished=False)

    def encode(self, round_index: int, finished: bool) -> bytes:
        """The state_dict with everything a learner needs to train on from round_index."""
        metadata = {**self.metadata, "round": str(round_index), "finished": "1" if finished else "0"}
        return wire.encode(self.model.state_dict(), metadata)

    def gradient_payload_bytes(self) -> int:
        """Size of a learner's gradient payload, to bound incoming messages."""
        return len(wire.encode(self.layout.views(self.mean_gradient), {"learner_id": "0"}))

    def step(self, collector: RoundCollector, lr: float) -> RoundSummary:
        summary = collector.close(self.mean_gradient)
        fedsgd.apply_mean_gradient(self.layout, self.optimizer, self.mean_gradient, lr)
        return summary


class LeaderServicer(leader_pb2_grpc.LeaderServiceServicer):
    """Translates LeaderService RPCs into calls on the registry, the shards and the round collector."""

    def __init__(self, registry: Registry, collector: RoundCollector, global_model: GlobalModel,
                 shard_payload: Callable[[int], bytes]) -> None:
        self.registry, self.collector, self.global_model = registry, collector, global_model
        self.shard_payload = shard_payload

    def RegisterLearner(self, request: leader_pb2.LearnerInfo, context: grpc.ServicerContext) -> leader_pb2.AckWithMetadata:
        learner_id, message = self.registry.register(request.network_addr)
        log.info("register %r: %s", request.network_addr, message)
        return leader_pb2.AckWithMetadata(success=learner_id is not None, message=message,
                                          learner_id=-1 if learner_id is None else learner_id,
                                          max_learners=self.registry.capacity)

    def GetModel(self, request: leader_pb2.Empty, context: grpc.ServicerContext) -> Iterator[leader_pb2.ModelChunk]:
        for chunk in wire.split(self.global_model.payload):
            yield leader_pb2.ModelChunk(chunk=chunk)

    def GetData(self, request: leader_pb2.LearnerDataRequest, context: grpc.ServicerContext) -> Iterator[leader_pb2.DataChunk]:
        learner_id = self.registry.id_of(request.network_addr)
        if learner_id is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"{request.network_addr!r} has not registered; call RegisterLearner with this address first")
        log.info("sending learner %d its data shard", learner_id)
        for chunk in wire.split(self.shard_payload(learner_id)):
            yield leader_pb2.DataChunk(chunk=chunk)

    def AccumulateGradients(self, request: leader_pb2.GradientData, context: grpc.ServicerContext) -> leader_pb2.Ack:
        try:
            payload = wire.decode(request.chunk)
            learner_id = wire.metadata_int(payload, "learner_id")
            round_index = wire.metadata_int(payload, "round")
            samples = wire.metadata_int(payload, "samples", minimum=1)
            loss = float(payload.metadata.get("loss", "nan"))
            if not math.isfinite(loss):
                raise wire.PayloadError(f"metadata 'loss' must be a finite number, got {payload.metadata.get('loss')!r}")
            if learner_id not in self.registry.addresses():
                context.abort(grpc.StatusCode.NOT_FOUND, f"no learner {learner_id} is registered; register first")
            wire.check_matches(payload, self.global_model.layout.spec)
        except (wire.PayloadError, ValueError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"gradient rejected: {error}")
        reason = self.collector.submit(learner_id, round_index, wire.flat_view(payload), samples, loss, len(request.chunk))
        if reason:
            log.warning("learner %d: %s", learner_id, reason)
            return leader_pb2.Ack(success=False, message=reason)
        return leader_pb2.Ack(success=True, message=f"gradient for round {round_index} accepted")


class Broadcaster:
    """Calls one RPC on every learner at once and reports who failed."""

    def __init__(self, addresses: dict[int, str]) -> None:
        self.stubs = {
            learner_id: learner_pb2_grpc.LearnerServiceStub(rpc.channel(address))
            for learner_id, address in addresses.items()
        }

    def call(self, method: str, request: object, timeout: float = RPC_TIMEOUT_S) -> list[int]:
        """Send request with stub.<method> to every learner concurrently; return the ids that succeeded."""
        pending = {learner_id: getattr(stub, method).future(request, timeout=timeout)
                   for learner_id, stub in self.stubs.items()}
        succeeded = []
        for learner_id, future in pending.items():
            try:
                ack = future.result(timeout=timeout + 5)
            except grpc.RpcError as error:
                log.warning("%s to learner %d failed: %s %s", method, learner_id, error.code().name, error.details())
                continue
            if ack.success:
                succeeded.append(learner_id)
            else:
                log.warning("%s refused by learner %d: %s", method, learner_id, ack.message)
        return succeeded


class Leader:
    """The training run: data, global model, server and the round loop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        log.info("loading %s data", args.dataset)
        self.train = utils.load_dataset(args.dataset, args.data_dir, train=True)
        test = utils.load_dataset(args.dataset, args.data_dir, train=False)
        normalisation = utils.channel_stats(self.train.images)
        self.test_images, self.test_labels = utils.normalize(test.images, *normalisation), test.labels
        self.shards = utils.shard_indices(len(self.train), args.learners, args.seed)
        self.schedule = make_schedule(args, len(self.shards[0]))
        self.global_model = GlobalModel(args.model, self.train.num_classes, args, normalisation)
        self.registry = Registry(args.learners)
        self.collector = RoundCollector(self.global_model.layout.size, args.learners)
        log.info("%s with %d parameters; %d train / %d test images, %d per learner; %d rounds "
                 "(%d per epoch), peak lr %.3g", args.model,
                 self.global_model.layout.parameter_count, len(self.train), len(test), len(self.shards[0]),
                 self.schedule.total_rounds, self.schedule.rounds_per_epoch, self.schedule.base_lr)

    def shard_payload(self, learner_id: int) -> bytes:
        shard = self.train.subset(self.shards[learner_id])
        metadata = {"learner_id": str(learner_id), "num_classes": str(shard.num_classes), "dataset": self.args.dataset}
        return wire.encode({"labels": shard.labels, "images": shard.images}, metadata)

    def serve(self) -> grpc.Server:
        servicer = LeaderServicer(self.registry, self.collector, self.global_model, self.shard_payload)
        limit = self.global_model.gradient_payload_bytes() + rpc.ENVELOPE_BYTES
        server, port = rpc.start_server(
            f"{self.args.host}:{self.args.port}",
            [(leader_pb2_grpc.add_LeaderServiceServicer_to_server, servicer)],
            [leader_pb2.DESCRIPTOR.services_by_name["LeaderService"].full_name], limit,
        )
        log.info("LeaderService listening on %s:%d; waiting for %d learners", self.args.host, port, self.args.learners)
        return server

    def wait_for_learners(self) -> None:
        deadline = time.monotonic() + self.args.register_timeout
        while not self.registry.wait_full(WAIT_LOG_INTERVAL_S):
            registered = len(self.registry.addresses())
            if time.monotonic() > deadline:
                raise SystemExit(f"only {registered} of {self.args.learners} learners registered within "
                                 f"--register-timeout {self.args.register_timeout:.0f} s; start more learners or lower --learners")
            log.info("%d of %d learners registered; waiting", registered, self.args.learners)

    def wait_for_round(self, round_index: int, learner_ids: list[int]) -> None:
        """Wait for every gradient, or after --round-timeout for --min-learners of them."""
        started = time.monotonic()
        while not self.collector.wait_complete(WAIT_LOG_INTERVAL_S):
            missing = self.collector.missing(learner_ids)
            arrived = len(learner_ids) - len(missing)
            waited = time.monotonic() - started
            if waited >= self.args.round_timeout and arrived >= self.args.min_learners:
                log.warning("round %d: closing after %.0f s with %d gradients; missing learners %s",
                            round_index, waited, arrived, missing)
                return
            log.info("round %d: waiting %.0f s so far for learners %s", round_index, waited, missing)

    def evaluate(self, round_index: int, metrics: MetricsLog) -> fedsgd.Evaluation:
        started = time.perf_counter()
        with runtime.torch_threads(self.args.threads or runtime.available_cores()):
            result = fedsgd.evaluate(self.global_model.model, self.test_images, self.test_labels)
        metrics.write({"round": round_index, "epoch": self.schedule.epoch_of(max(0, round_index - 1)),
                       "test_loss": result.loss, "test_accuracy": result.accuracy,
                       "seconds": time.perf_counter() - started})
        log.info("round %d: test loss %.4f, test accuracy %.4f", round_index, result.loss, result.accuracy)
        return result

    def eval_due(self, rounds_done: int) -> bool:
        every = self.args.eval_every
        return (every > 0 and rounds_done % every == 0) or rounds_done % self.schedule.rounds_per_epoch == 0

    def train_rounds(self, broadcaster: Broadcaster, metrics: MetricsLog) -> fedsgd.Evaluation:
        total = self.schedule.total_rounds
        learner_ids = sorted(broadcaster.stubs)
        evaluation = None
        round_started = time.perf_counter()
        for round_index in tqdm(range(total), desc="rounds", unit="round", disable=None):
            self.wait_for_round(round_index, learner_ids)
            lr = self.schedule.lr(round_index)
            summary = self.global_model.step(self.collector, lr)
            done = round_index + 1
            finished = done == total
            eval_seconds = 0.0
            if finished or self.eval_due(done):
                eval_started = time.perf_counter()
                evaluation = self.evaluate(done, metrics)
                eval_seconds = time.perf_counter() - eval_started
            if finished:
                self.save_model()
            self.global_model.payload = self.global_model.encode(done, finished)
            request = learner_pb2.ModelState(chunk=self.global_model.payload)
            synced = broadcaster.call("SyncModelState", request)
            now = time.perf_counter()
            metrics.write({"round": done, "epoch": self.schedule.epoch_of(round_index), "train_loss": summary.loss,
                           "learners": summary.learners, "samples": summary.samples, "lr": lr,
                           "seconds": now - round_started - eval_seconds, "bytes_in": summary.bytes_in,
                           "bytes_out": request.ByteSize() * len(synced)})
            round_started = now
            if done % max(1, total // 10) == 0:
                log.info("round %d/%d (epoch %d): train loss %.4f from %d learners", done, total,
                         self.schedule.epoch_of(round_index), summary.loss, summary.learners)
        return evaluation

    def save_model(self) -> None:
        path = self.out / "model.pt"
        temporary = path.with_suffix(".tmp")
        torch.save(self.global_model.model.state_dict(), temporary)
        os.replace(temporary, path)
        log.info("saved the global model to %s", path)

    def run(self) -> fedsgd.Evaluation:
        server = self.serve()
        metrics = MetricsLog(self.out / "metrics.jsonl")
        try:
            self.wait_for_learners()
            broadcaster = Broadcaster(self.registry.addresses())
            started = broadcaster.call("StartTraining", learner_pb2.Empty())
            log.info("training started on learners %s", started)
            evaluation = self.train_rounds(broadcaster, metrics)
        finally:
            metrics.close()
            server.stop(grace=2).wait(5)
        plot_metrics(read_metrics(metrics.path), self.out / "metrics.png")
        log.info("final test accuracy %.4f; model, metrics.jsonl and metrics.png are in %s", evaluation.accuracy, self.out)
        return evaluation


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runtime.configure_logging("leader", args.verbose)
    torch.set_num_threads(1)
    try:
        Leader(args).run()
    except utils.DatasetError as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
