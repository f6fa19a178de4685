"""The leader: owns the global model, registers learners, serves model and data, and runs FedSGD rounds."""

import argparse
import logging
import json
import math
import os
import signal
import sys
import threading
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
from rpc import leader_pb2, leader_pb2_grpc, learner_pb2

log = logging.getLogger("leader")

WAIT_LOG_INTERVAL_S = 10.0
WAIT_SLICE_S = 1.0  # how often waits look at stop requests and joiners
RPC_TIMEOUT_S = 60.0
MAX_IN_FLIGHT = 8  # concurrent pushes of a model state: bounds the leader's memory with many learners
# Bulk bytes bypass protobuf: GetModel and GetData yield serialised chunk messages (rpc.chunk_messages),
# AccumulateGradients gets an rpc.ChunkRequest.
ADD_LEADER_SERVICE = rpc.without_protobuf_copies(leader_pb2_grpc.add_LeaderServiceServicer_to_server,
                                                 replies={"GetModel", "GetData"}, requests={"AccumulateGradients"})
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
    parser.add_argument("--wire-dtype", choices=sorted(wire.WIRE_DTYPES), default="float32",
                        help="precision of model states and gradients on the wire (float16/bfloat16 halve the bytes)")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N rounds (0: only at epoch ends and the end)")
    parser.add_argument("--round-timeout", type=float, default=120.0,
                        help="seconds to wait for all learners' gradients before closing a round with those that arrived")
    parser.add_argument("--min-learners", type=int, default=1, help="gradients needed to close a round after --round-timeout")
    parser.add_argument("--register-timeout", type=float, default=600.0, help="seconds to wait for all learners to register")
    parser.add_argument("--sync-timeout", type=float, default=30.0,
                        help="seconds a learner may take to accept StartTraining or a model state before it is dropped")
    parser.add_argument("--checkpoint-every", type=int, default=50,
                        help="write DIR/checkpoint.pt every N rounds, at each epoch end and on stop (0: only those)")
    parser.add_argument("--resume", metavar="DIR", help="continue from DIR/checkpoint.pt (same flags as the run that wrote it)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for evaluation (0: all cores); steps use one")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model, the shards and the learners' batches")
    parser.add_argument("--out", help="directory for model.pt, checkpoint.pt, metrics.jsonl and metrics.png "
                        "(unset: the --resume DIR, else runs/latest)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    rpc.add_security_flags(parser, "leader")
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
        self.wire_dtype = wire.WIRE_DTYPES[args.wire_dtype]
        self.layout = fedsgd.GradientLayout(self.model, self.wire_dtype)
        self.mean_gradient = torch.zeros(self.layout.size)
        self.layout.bind_gradients(self.mean_gradient)
        self.optimizer = fedsgd.make_optimizer(self.model, 0.0, args.momentum, args.weight_decay)
        mean, std = normalisation
        self.metadata = {
            "architecture": architecture, "num_classes": str(num_classes), "batch_size": str(args.batch_size),
            "seed": str(args.seed), "mean": ",".join(map(str, mean)), "std": ",".join(map(str, std)),
            "wire_dtype": args.wire_dtype,
        }
        self.payload = self.encode(round_index=0, finished=False)
        self._messages: tuple[bytes, list[bytes]] = (b"", [])

    def model_messages(self) -> list[bytes]:
        """The current state as serialised ModelChunk messages, built once per state for all GetModel calls."""
        payload = self.payload
        cached_payload, messages = self._messages
        if cached_payload is not payload:
            messages = list(rpc.chunk_messages(payload))
            self._messages = (payload, messages)
        return messages

    def encode(self, round_index: int, finished: bool, stopped: bool = False) -> bytes:
        """The state_dict with everything a learner needs to train on from round_index; `finished`
        tells learners to exit, `stopped` that the leader was stopped early (it can be resumed)."""
        metadata = {**self.metadata, "round": str(round_index), "finished": "1" if finished else "0",
                    "stopped": "1" if stopped else "0"}
        return wire.encode(wire.cast_floats(self.model.state_dict(), self.wire_dtype), metadata)

    def gradient_payload_bytes(self) -> int:
        """Size of a learner's gradient payload, to bound incoming messages."""
        gradient = self.layout.views(self.mean_gradient.to(self.wire_dtype))
        return len(wire.encode(gradient, {"learner_id": "0"}))

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

    def GetModel(self, request: leader_pb2.Empty, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from self.global_model.model_messages()

    def GetData(self, request: leader_pb2.LearnerDataRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        learner_id = self.registry.id_of(request.network_addr)
        if learner_id is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"{request.network_addr!r} has not registered; call RegisterLearner with this address first")
        log.info("sending learner %d its data shard", learner_id)
        yield from rpc.chunk_messages(self.shard_payload(learner_id))  # serialised DataChunk messages

    def AccumulateGradients(self, request: rpc.ChunkRequest, context: grpc.ServicerContext) -> leader_pb2.Ack:
        try:
            payload = wire.decode(request.chunk)
            learner_id = wire.metadata_int(payload, "learner_id")
            round_index = wire.metadata_int(payload, "round")
            samples = wire.metadata_int(payload, "samples", minimum=1)
            loss = float(payload.metadata.get("loss", "nan"))
            if not math.isfinite(loss):
                raise wire.PayloadError(f"metadata 'loss' must be a finite number, got {payload.metadata.get('loss')!r}")
            if learner_id >= len(self.registry.addresses()):
                context.abort(grpc.StatusCode.NOT_FOUND, f"no learner {learner_id} is registered; register first")
            if not self.registry.is_active(learner_id):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"learner {learner_id} is not training (dropped, or not started yet); register again")
            wire.check_matches(payload, self.global_model.layout.spec)
        except (wire.PayloadError, ValueError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"gradient rejected: {error}")
        reason = self.collector.submit(learner_id, round_index, wire.flat_view(payload), samples, loss, len(request.chunk))
        if reason:
            log.warning("learner %d: %s", learner_id, reason)
            return leader_pb2.Ack(success=False, message=reason)
        return leader_pb2.Ack(success=True, message=f"gradient for round {round_index} accepted")


class Broadcaster:
    """Calls one RPC on many learners at once, without waiting on the slow ones."""

    def __init__(self, security: rpc.Security) -> None:
        self.security = security
        self._channels: dict[str, grpc.Channel] = {}

    def method(self, address: str, name: str) -> grpc.UnaryUnaryMultiCallable:
        if address not in self._channels:
            self._channels[address] = rpc.channel(address, self.security)
        return rpc.unary_call(self._channels[address], rpc.LEARNER_SERVICE, name, learner_pb2.Ack)

    def send(self, learners: dict[int, str], method: str, request: object, on_failure: Callable[[int, str], None],
             timeout: float = RPC_TIMEOUT_S) -> list[grpc.Future]:
        """Start <method>(request) on every learner, at most MAX_IN_FLIGHT at a time (gRPC holds a copy of
        each call's request until it is sent); request may be ready-serialised bytes, serialised once for
        all. on_failure(id, reason) runs for each call that fails."""
        slots, calls = threading.Semaphore(MAX_IN_FLIGHT), []
        for learner_id, address in learners.items():
            # After a timeout, send anyway without a slot: slow learners cannot stall the loop.
            release = slots.release if slots.acquire(timeout=timeout) else (lambda: None)
            call = self.method(address, method).future(request, timeout=timeout)
            call.add_done_callback(lambda done, learner_id=learner_id, release=release:
                                   (release(), _report(done, learner_id, method, on_failure)))
            calls.append(call)
        return calls


def _report(call: grpc.Future, learner_id: int, method: str, on_failure: Callable[[int, str], None]) -> None:
    error = call.exception()
    if error is not None:
        on_failure(learner_id, f"{method} failed: {error.code().name} {error.details()}")
    elif not (reply := call.result(timeout=0)).success:  # done: the callback runs after completion
        on_failure(learner_id, f"{method} refused: {reply.message}")


def wait_calls(calls: list[grpc.Future], timeout: float) -> None:
    """Wait until the calls are done or timeout seconds have passed."""
    deadline = time.monotonic() + timeout
    for call in calls:
        try:
            call.exception(timeout=max(0.0, deadline - time.monotonic()))
        except (grpc.FutureTimeoutError, grpc.FutureCancelledError):
            return


class Leader:
    """The training run: data, global model, checkpoints, server and the round loop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out or args.resume or "runs/latest")
        self.out.mkdir(parents=True, exist_ok=True)
        self.security = rpc.Security.from_args(args)
        log.info("loading %s data", args.dataset)
        self.train = utils.load_dataset(args.dataset, args.data_dir, train=True)
        test = utils.load_dataset(args.dataset, args.data_dir, train=False)
        normalisation = utils.channel_stats(self.train.images)
        self.test_images, self.test_labels = utils.normalize(test.images, *normalisation), test.labels
        self.shards = utils.shard_indices(len(self.train), args.learners, args.seed)
        self.schedule = make_schedule(args, len(self.shards[0]))
        self.global_model = GlobalModel(args.model, self.train.num_classes, args, normalisation)
        checkpoint = self.load_checkpoint() if args.resume else None
        first_round = checkpoint["round"] if checkpoint else 0
        self.registry = Registry(args.learners, checkpoint["addresses"] if checkpoint else [])
        self.collector = RoundCollector(self.global_model.layout.size, first_round)
        if checkpoint:
            self.global_model.payload = self.global_model.encode(first_round, finished=False)
        self.broadcaster = Broadcaster(self.security)
        self.stopping = threading.Event()
        log.info("%s with %d parameters; %d train / %d test images, %d per learner; %d rounds "
                 "(%d per epoch), peak lr %.3g", args.model,
                 self.global_model.layout.parameter_count, len(self.train), len(test), len(self.shards[0]),
                 self.schedule.total_rounds, self.schedule.rounds_per_epoch, self.schedule.base_lr)

    def config(self) -> dict:
        """What a checkpoint must agree with to be resumed."""
        return {key: getattr(self.args, key) for key in ("model", "dataset", "learners", "batch_size", "seed")}

    def save_checkpoint(self, rounds_done: int) -> None:
        """Everything needed to continue from rounds_done, written atomically. Learners' positions in
        their shards are a function of the round and the seed, so the round restores them."""
        checkpoint = {"model": self.global_model.model.state_dict(), "optimizer": self.global_model.optimizer.state_dict(),
                      "round": rounds_done, "addresses": self.registry.addresses(), "rng": torch.get_rng_state(),
                      "config": self.config()}
        save_atomically(checkpoint, self.out / "checkpoint.pt")
        log.info("checkpoint at round %d", rounds_done)

    def load_checkpoint(self) -> dict:
        path = Path(self.args.resume) / "checkpoint.pt"
        if not path.exists():
            raise SystemExit(f"--resume {self.args.resume}: no checkpoint.pt there")
        checkpoint = torch.load(path, weights_only=True)
        if checkpoint["config"] != self.config():
            raise SystemExit(f"--resume {self.args.resume}: the checkpoint was made with {checkpoint['config']}, "
                             f"not {self.config()}; pass the same flags")
        self.global_model.model.load_state_dict(checkpoint["model"])
        self.global_model.optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
        keep_metrics_until(self.out / "metrics.jsonl", checkpoint["round"])
        log.info("resuming from the checkpoint at round %d", checkpoint["round"])
        return checkpoint

    def shard_payload(self, learner_id: int) -> bytes:
        shard = self.train.subset(self.shards[learner_id])
        metadata = {"learner_id": str(learner_id), "num_classes": str(shard.num_classes), "dataset": self.args.dataset}
        return wire.encode({"labels": shard.labels, "images": shard.images}, metadata)

    def serve(self) -> grpc.Server:
        servicer = LeaderServicer(self.registry, self.collector, self.global_model, self.shard_payload)
        limit = self.global_model.gradient_payload_bytes() + rpc.ENVELOPE_BYTES
        server, port = rpc.start_server(
            f"{self.args.host}:{self.args.port}",
            [(ADD_LEADER_SERVICE, servicer)],
            [rpc.LEADER_SERVICE], limit, self.security,
        )
        log.info("LeaderService listening on %s:%d (%s); waiting for %d learners", self.args.host, port,
                 self.security.describe(), self.args.learners)
        return server

    def wait_for_learners(self) -> bool:
        """Wait until --learners learners registered (after a resume, --min-learners suffice once
        --round-timeout has passed); False if stopped first."""
        started, last_log = time.monotonic(), 0.0
        while not self.registry.wait_for(self.args.learners, WAIT_SLICE_S):
            waited = time.monotonic() - started
            present = self.registry.count()
            if self.stopping.is_set():
                return False
            if self.args.resume and waited >= self.args.round_timeout and present >= self.args.min_learners:
                return True
            if waited > self.args.register_timeout:
                raise SystemExit(f"only {present} of {self.args.learners} learners registered within "
                                 f"--register-timeout {self.args.register_timeout:.0f} s; start more learners or lower --learners")
            if waited - last_log >= WAIT_LOG_INTERVAL_S:
                last_log = waited
                log.info("%d of %d learners registered; waiting", present, self.args.learners)
        return True

    def drop(self, learner_id: int, reason: str) -> None:
        if self.registry.is_active(learner_id):
            self.registry.drop(learner_id)
            log.warning("dropped learner %d (%s); it can register again", learner_id, reason)

    def admit_joiners(self) -> None:
        """Start the learners that (re)registered, and give them the current model state."""
        joiners = self.registry.take_joiners()
        if not joiners:
            return
        log.info("starting learners %s at round %d", sorted(joiners), self.collector.round)
        calls = self.broadcaster.send(joiners, "StartTraining", learner_pb2.Empty(), self.drop, self.args.sync_timeout)
        wait_calls(calls, self.args.sync_timeout)
        if self.collector.round > 0:  # rounds may have passed since the joiner's GetModel
            state = rpc.chunk_message(self.global_model.payload)  # a serialised ModelState
            self.broadcaster.send(joiners, "SyncModelState", state, self.drop, self.args.sync_timeout)

    def wait_for_round(self, round_index: int) -> bool:
        """Wait for the expected gradients, or after --round-timeout for --min-learners of them;
        a round whose missing learners were all dropped closes at once. False if stopped first."""
        started, last_log = time.monotonic(), 0.0
        while not self.collector.wait_complete(WAIT_SLICE_S):
            if self.stopping.is_set():
                return False
            missing, arrived = self.collector.missing(), self.collector.reported()
            waited = time.monotonic() - started
            enough = arrived >= self.args.min_learners
            if enough and not set(missing) & set(self.registry.active()):
                return True
            if enough and waited >= self.args.round_timeout:
                log.warning("round %d: closing after %.0f s with %d gradients; missing learners %s",
                            round_index, waited, arrived, missing)
                return True
            if waited - last_log >= WAIT_LOG_INTERVAL_S:
                last_log = waited
                log.info("round %d: %d gradients after %.0f s; waiting for learners %s%s", round_index, arrived,
                         waited, missing, "" if enough else f" (need at least --min-learners {self.args.min_learners})")
            self.admit_joiners()
        return True

    def evaluate(self, round_index: int, metrics: MetricsLog) -> fedsgd.Evaluation:
        started = time.perf_counter()
        with runtime.torch_threads(self.args.threads or runtime.available_cores()):
            result = fedsgd.evaluate(self.global_model.model, self.test_images, self.test_labels)
        metrics.write({"round": round_index, "epoch": self.schedule.epoch_of(max(0, round_index - 1)),
                       "test_loss": result.loss, "test_accuracy": result.accuracy,
                       "seconds": time.perf_counter() - started})
        log.info("round %d: test loss %.4f, test accuracy %.4f", round_index, result.loss, result.accuracy)
        return result

    def due(self, rounds_done: int, every: int) -> bool:
        """Whether rounds_done ends an epoch or a period of `every` rounds (0: never)."""
        return (every > 0 and rounds_done % every == 0) or rounds_done % self.schedule.rounds_per_epoch == 0

    def train_rounds(self, metrics: MetricsLog) -> int:
        """Run rounds until the schedule ends or a stop is requested; return the rounds done."""
        total = self.schedule.total_rounds
        round_started = time.perf_counter()
        progress = tqdm(total=total, initial=self.collector.round, desc="rounds", unit="round", disable=None)
        while self.collector.round < total and not self.stopping.is_set():
            round_index = self.collector.round
            self.admit_joiners()
            self.collector.expect(self.registry.active())
            if not self.wait_for_round(round_index):
                break
            gradients_in = time.perf_counter()
            lr = self.schedule.lr(round_index)
            summary = self.global_model.step(self.collector, lr)
            stepped = time.perf_counter()
            done = round_index + 1
            eval_seconds = 0.0
            if done == total or self.due(done, self.args.eval_every):
                eval_started = time.perf_counter()
                self.evaluate(done, metrics)
                eval_seconds = time.perf_counter() - eval_started
            if done == total:
                save_atomically(self.global_model.model.state_dict(), self.out / "model.pt")
            pushing = time.perf_counter()
            bytes_out = self.push_state(done, finished=done == total)
            pushed = time.perf_counter()
            if done == total or self.due(done, self.args.checkpoint_every):
                self.save_checkpoint(done)
            now = time.perf_counter()
            metrics.write({"round": done, "epoch": self.schedule.epoch_of(round_index), "train_loss": summary.loss,
                           "learners": summary.learners, "samples": summary.samples, "lr": lr,
                           "seconds": now - round_started - eval_seconds, "bytes_in": summary.bytes_in,
                           "bytes_out": bytes_out, "gradients_s": gradients_in - round_started,
                           "step_s": stepped - gradients_in, "push_s": pushed - pushing})
            round_started = now
            progress.update()
            if done % max(1, total // 10) == 0:
                log.info("round %d/%d (epoch %d): train loss %.4f from %d learners", done, total,
                         self.schedule.epoch_of(round_index), summary.loss, summary.learners)
        progress.close()
        return self.collector.round

    def push_state(self, rounds_done: int, finished: bool, stopped: bool = False) -> int:
        """Encode the state after rounds_done once and send it to every active learner; return bytes sent."""
        self.global_model.payload = self.global_model.encode(rounds_done, finished, stopped)
        request = rpc.chunk_message(self.global_model.payload)  # a serialised ModelState, sent to all
        learners = self.registry.active_addresses()
        calls = self.broadcaster.send(learners, "SyncModelState", request, self.drop, timeout=self.args.sync_timeout)
        if finished:
            wait_calls(calls, self.args.sync_timeout)
        return len(request) * len(learners)

    def run(self) -> fedsgd.Evaluation | None:
        server = self.serve()
        metrics = MetricsLog(self.out / "metrics.jsonl", append=bool(self.args.resume))
        try:
            if not self.wait_for_learners():
                return None
            done = self.train_rounds(metrics)
            stopped = done < self.schedule.total_rounds
            if stopped:
                log.info("stopping on request after round %d", done)
                self.save_checkpoint(done)
                self.push_state(done, finished=True, stopped=True)
        finally:
            metrics.close()
            server.stop(grace=2).wait(5)
        records = read_metrics(metrics.path)
        plot_metrics(records, self.out / "metrics.png")
        evaluations = [r for r in records if "test_accuracy" in r]
        if not stopped and evaluations:
            log.info("final test accuracy %.4f; model.pt, metrics.jsonl and metrics.png are in %s",
                     evaluations[-1]["test_accuracy"], self.out)
        return evaluations[-1] if evaluations else None


def save_atomically(state: object, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash leaves the old file or the new, never half."""
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def keep_metrics_until(path: Path, rounds_done: int) -> None:
    """Drop the records of rounds after a checkpoint, which a resumed run does again."""
    if path.exists():
        kept = [r for r in read_metrics(path) if r["round"] <= rounds_done]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runtime.tune_allocator()
    runtime.configure_logging("leader", args.verbose)
    torch.set_num_threads(1)
    try:
        leader = Leader(args)
    except (utils.DatasetError, rpc.SecurityError) as error:
        log.error("%s", error)
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM):  # finish the round, checkpoint, tell the learners, exit 0
        signal.signal(signum, lambda *_: leader.stopping.set())
    leader.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
