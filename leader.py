"""The leader: owns the global model, registers learners, serves model and data, and runs FedSGD rounds."""

import argparse
import ipaddress
import logging
import math
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

import checkpoint
import dispatch
import fedsgd
import framing
import guard
import rpc
import runtime
import utils
import wire
from metrics import MetricsLog, plot_metrics, read_metrics
from model import ARCHITECTURES, build_model
from rounds import COUNTED_ON, MAX_MISSED_ROUNDS, Member, Refusal, Registry, RoundCollector
from rpc import leader_pb2, leader_pb2_grpc

log = logging.getLogger("leader")

WAIT_LOG_INTERVAL_S = 10.0
WAIT_SLICE_S = 1.0  # how often waits look at stop requests, joiners and missing learners
MAX_LOSS = 1e6  # a claimed batch loss beyond this is not a cross-entropy of a real batch
GRADIENT_WORKERS = 4
LOG_INTERVAL_S = 10.0  # at most one line this often for what callers can make happen at will
# Bulk bytes bypass protobuf: GetModel and GetData yield serialised chunk messages (framing.chunk_messages),
# AccumulateGradients gets a framing.ChunkRequest.
ADD_LEADER_SERVICE = framing.without_protobuf_copies(leader_pb2_grpc.add_LeaderServiceServicer_to_server,
                                                     replies={"GetModel", "GetData"},
                                                     requests={"AccumulateGradients"})
REFERENCE_BATCH = 128  # the learning rate --lr means at this total batch; scaled linearly


def build_parser() -> argparse.ArgumentParser:
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
                        help="precision of weights and gradients on the wire (float16/bfloat16 halve the bytes; "
                        "BatchNorm statistics always travel in float32)")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N rounds (0: only at epoch ends and the end)")
    parser.add_argument("--round-timeout", type=float, default=120.0,
                        help="seconds to wait for all learners' gradients before closing a round with those that arrived")
    parser.add_argument("--min-learners", type=int, default=1, help="gradients needed to close a round after --round-timeout")
    parser.add_argument("--register-timeout", type=float, default=600.0,
                        help="seconds to wait for learners to register, at the start and whenever too few are left "
                        "to close a round")
    parser.add_argument("--sync-timeout", type=float, default=30.0,
                        help="seconds a learner may take to accept StartTraining or a model state, or stay silent "
                        "to health checks, before it is dropped")
    parser.add_argument("--rejoin-grace", type=float, default=30.0,
                        help="seconds a dropped learner's slot is kept for it to register again before a new learner "
                        "may take it (none when the leader finds it gone)")
    parser.add_argument("--idle-timeout", type=float, default=guard.IDLE_TIMEOUT_S,
                        help="seconds a caller may send or read nothing (or take to send a whole gradient) before "
                        "its call is cancelled")
    parser.add_argument("--checkpoint-every", type=int, default=50,
                        help="write DIR/checkpoint.pt every N rounds, at each epoch end and on stop (0: only those)")
    parser.add_argument("--resume", metavar="DIR", help="continue from DIR/checkpoint.pt, with the training flags it "
                        "was started with (flags that change training may be left out)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for evaluation (0: all cores); steps use one")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model, the shards and the learners' batches")
    parser.add_argument("--out", help="directory for model.pt, checkpoint.pt, metrics.jsonl and metrics.png "
                        "(unset: the --resume DIR, else runs/latest; an earlier run's files there are moved aside)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    rpc.add_security_flags(parser, "leader")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked; args.explicit names those given on the command line (a resume takes the others
    from the checkpoint)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = [
        (args.learners < 1 or args.batch_size < 1, "--learners and --batch-size must be positive"),
        (args.min_learners < 1 or (not args.resume and args.min_learners > args.learners),
         "--min-learners must lie between 1 and --learners"),
        (args.rounds is not None and args.rounds < 1, "--rounds must be at least 1 (leave it out to train for --epochs)"),
        (args.epochs <= 0 or (args.lr is not None and args.lr <= 0), "--epochs and --lr must be positive"),
        (not 0 <= args.momentum < 1 or args.weight_decay < 0 or args.warmup_epochs < 0,
         "--momentum must lie in [0, 1), --weight-decay and --warmup-epochs must not be negative"),
        (min(args.eval_every, args.checkpoint_every, args.threads) < 0,
         "--eval-every, --checkpoint-every and --threads must not be negative"),
        (min(args.round_timeout, args.register_timeout, args.sync_timeout, args.idle_timeout) <= 0 or args.rejoin_grace < 0,
         "timeouts must be positive and --rejoin-grace must not be negative"),
    ]
    for failed, message in problems:
        if failed:
            parser.error(message)
    unset = object()  # argparse leaves attributes a namespace already has alone unless the flag is given
    given = parser.parse_args(argv, namespace=argparse.Namespace(**{key: unset for key in vars(args)}))
    args.explicit = {key for key, value in vars(given).items() if value is not unset}
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
    total = args.rounds if args.rounds is not None else max(1, math.ceil(args.epochs * rounds_per_epoch))
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
        self.step_safely = fedsgd.GuardedStep(self.model, self.layout, self.optimizer)
        mean, std = normalisation
        self.metadata = {
            "architecture": architecture, "num_classes": str(num_classes), "batch_size": str(args.batch_size),
            "seed": str(args.seed), "mean": ",".join(map(str, mean)), "std": ",".join(map(str, std)),
            "wire_dtype": args.wire_dtype,
        }
        self.encoded_state = b""
        self._messages: tuple[bytes, list[bytes]] = (b"", [])
        self.publish(round_index=0, finished=False)

    def publish(self, round_index: int, finished: bool, stopped: bool = False) -> bytes:
        """Encode the state after round_index with everything a learner needs to train on from there; GetModel
        serves it from now on. `finished` tells learners to exit, `stopped` that the leader was stopped early
        (it can be resumed). Returns the state as one serialised ModelState, ready to push to every learner."""
        metadata = {**self.metadata, "round": str(round_index), "finished": "1" if finished else "0",
                    "stopped": "1" if stopped else "0"}
        self.encoded_state = wire.encode(fedsgd.wire_state(self.model, self.wire_dtype), metadata)
        return framing.chunk_message(self.encoded_state)

    def model_messages(self) -> list[bytes]:
        """The current state as serialised ModelChunk messages, built once per state for all GetModel calls."""
        state = self.encoded_state
        cached_state, messages = self._messages
        if cached_state is not state:
            messages = list(framing.chunk_messages(state))
            self._messages = (state, messages)
        return messages

    def gradient_payload_bytes(self) -> int:
        """Size of a learner's gradient payload, to bound incoming messages."""
        return len(wire.encode(self.layout.wire_tensors(self.mean_gradient), {"learner_id": "0"}))

    def step(self, lr: float) -> str | None:
        """One optimizer step with the round's mean gradient (in mean_gradient); None, or why the model was
        left as it was (the step would have made it non-finite, or changed it absurdly: fedsgd.GuardedStep)."""
        return self.step_safely(self.mean_gradient, lr)


class Shards:
    """The learners' data shards, each framed as DataChunk messages once and kept for every GetData."""

    def __init__(self, train: utils.ImageSet, indices: list[torch.Tensor], dataset: str) -> None:
        self.train, self.indices, self.dataset = train, indices, dataset
        self._messages: dict[int, list[bytes]] = {}
        self._lock = threading.Lock()

    def messages(self, learner_id: int) -> list[bytes]:
        with self._lock:  # a shard is encoded once, even when its learner asks twice at the same time
            if learner_id not in self._messages:
                shard = self.train.subset(self.indices[learner_id])
                metadata = {"learner_id": str(learner_id), "num_classes": str(shard.num_classes), "dataset": self.dataset}
                payload = wire.encode({"labels": shard.labels, "images": shard.images}, metadata)
                self._messages[learner_id] = list(framing.chunk_messages(payload))
            return self._messages[learner_id]


class Throttle:
    """Lets a repeated event through at most once every `seconds`, counting the others."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.last, self.held_back = seconds, -math.inf, 0
        self._lock = threading.Lock()

    def allow(self) -> int | None:
        """None while the event is held back; else how many were held back since the last one let through."""
        with self._lock:
            now = time.monotonic()
            if now - self.last < self.seconds:
                self.held_back += 1
                return None
            held_back, self.last, self.held_back = self.held_back, now, 0
            return held_back


class LeaderServicer(leader_pb2_grpc.LeaderServiceServicer):
    """Translates LeaderService RPCs into calls on the registry, the shards and the round collector, checking
    every claim a caller makes (who it is, which round, how many samples) against what the leader knows."""

    def __init__(self, registry: Registry, collector: RoundCollector, global_model: GlobalModel,
                 shard_messages: Callable[[int], list[bytes]], batch_size: int,
                 probe: Callable[[tuple[int, ...]], None] = lambda learner_ids: None,
                 heard_from: Callable[[Member], None] = lambda member: None) -> None:
        self.registry, self.collector, self.global_model = registry, collector, global_model
        self.shard_messages, self.batch_size = shard_messages, batch_size
        self.probe, self.heard_from = probe, heard_from
        # Gradients checked at once: every learner may have two calls in, but dozens of threads decoding at once
        # on a few cores take twice as long as a few at a time (leader_scale, 64 learners: 0.88 s against 0.46 s).
        self.working = threading.BoundedSemaphore(GRADIENT_WORKERS)
        # Callers choose how often these happen: one line per LOG_INTERVAL_S each, with a count of the rest.
        self.logged = {kind: Throttle(LOG_INTERVAL_S) for kind in ("refused", "data", "ignored")}

    def log(self, kind: str, message: str, *args: object, level: int = logging.INFO) -> None:
        if (held_back := self.logged[kind].allow()) is not None:
            log.log(level, message + (f" (and {held_back} more such since the last)" if held_back else ""), *args)

    def RegisterLearner(self, request: leader_pb2.LearnerInfo, context: grpc.ServicerContext) -> leader_pb2.AckWithMetadata:
        try:
            member, message = self.registry.register(request.network_addr, rpc.credential_of(context),
                                                     rpc.peer_certificate(context))
        except Refusal as refusal:
            self.log("refused", "registration refused: %s", refusal)
            self.probe(refusal.probe)
            if refusal.retry:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(refusal))
            return leader_pb2.AckWithMetadata(success=False, message=str(refusal), learner_id=-1,
                                              max_learners=self.registry.capacity)
        log.info("%s", message)
        return leader_pb2.AckWithMetadata(success=True, message=message, learner_id=member.learner_id,
                                          max_learners=self.registry.capacity, credential=member.credential)

    def GetModel(self, request: leader_pb2.Empty, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from self.global_model.model_messages()

    def GetData(self, request: leader_pb2.LearnerDataRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        member = self.data_caller(request.network_addr, context)
        self.log("data", "sending learner %d its data shard", member.learner_id)
        yield from self.shard_messages(member.learner_id)  # serialised DataChunk messages

    def data_caller(self, address: str, context: grpc.ServicerContext) -> Member:
        """The registration asking for its shard: by its credential or, for a peer that knows only the
        article's protos, by its address if it calls from that address's IP."""
        if rpc.credential_of(context):
            return self.caller(context)[0]
        member = self.registry.at(address)
        if member is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{address[:64]!r} has not registered; call RegisterLearner "
                          "with this address first")
        if not same_host(address, guard.peer_host(context)):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "send the credential this learner got at registration "
                          f"(call header {rpc.CREDENTIAL_HEADER!r}), or ask from the IP address you registered")
        return member

    def caller(self, context: grpc.ServicerContext) -> tuple[Member, str]:
        """The registration whose credential the call carries, and its state; aborts with UNAUTHENTICATED
        for a call without a credential that holds a slot."""
        found = self.registry.authenticate(rpc.credential_of(context), rpc.peer_certificate(context))
        if found is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "this call needs the credential of a registered learner "
                          f"(call header {rpc.CREDENTIAL_HEADER!r}, from AckWithMetadata.credential); register first")
        return found

    def AccumulateGradients(self, request: framing.ChunkRequest, context: grpc.ServicerContext) -> leader_pb2.Ack:
        member, state = self.caller(context)
        if state not in COUNTED_ON:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"learner {member.learner_id} is not training (dropped, or not started yet); register again")
        with self.working:
            return self.accumulate(request.chunk, member, context)

    def accumulate(self, chunk: memoryview, member: Member, context: grpc.ServicerContext) -> leader_pb2.Ack:
        """Check a learner's gradient and add it to the open round."""
        try:
            payload = wire.decode(chunk)
            round_index, samples, loss = self.check_claims(payload, member)
            wire.check_matches(payload, self.global_model.layout.spec)
            self.global_model.layout.check_update(payload.tensors)
        except (wire.PayloadError, ValueError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"gradient rejected: {error}")
        reason = self.collector.submit(member.learner_id, round_index, wire.flat_runs(payload), samples, loss, len(chunk))
        self.heard_from(member)
        if reason:
            self.log("ignored", "learner %d: %s", member.learner_id, reason, level=logging.WARNING)
            return leader_pb2.Ack(success=False, message=reason)
        return leader_pb2.Ack(success=True, message=f"gradient for round {round_index} accepted")

    def check_claims(self, payload: wire.Payload, member: Member) -> tuple[int, int, float]:
        """The round, sample count and loss a gradient claims, each checked; raises PayloadError."""
        learner_id = wire.metadata_int(payload, "learner_id")
        if learner_id != member.learner_id:
            raise wire.PayloadError(f"metadata learner_id {learner_id} is not the caller's slot, {member.learner_id}")
        samples = wire.metadata_int(payload, "samples", minimum=1)
        if samples > self.batch_size:
            raise wire.PayloadError(f"metadata samples {samples} exceeds the batch of {self.batch_size} this leader "
                                    "asks for")
        loss = float(payload.metadata.get("loss", "nan"))
        if not 0 <= loss <= MAX_LOSS:
            raise wire.PayloadError(f"metadata 'loss' must be a number from 0 to {MAX_LOSS:g}, "
                                    f"got {payload.metadata.get('loss', '')[:32]!r}")
        return wire.metadata_int(payload, "round"), samples, loss


def same_host(address: str, peer: str | None) -> bool:
    """Whether a HOST:PORT names the IP address a call came from (IPv4-mapped IPv6 counts as IPv4)."""

    def normal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        ip = ipaddress.ip_address(host.strip("[]"))
        return (ip.ipv4_mapped or ip) if ip.version == 6 else ip

    try:
        return peer is not None and normal(address.rsplit(":", 1)[0]) == normal(peer)
    except ValueError:  # a host name: the leader does not resolve names callers give it
        return False


def method_limits(idle_timeout: float) -> dict[str, guard.Limit]:
    """How the leader admits calls. A learner, named by its credential, has turns of its own that nobody
    else can take: 2 gradients and 2 shard streams at once, and 1 call of each other kind. Callers without
    a credential (newcomers, peers of the article's protos) have 1 turn per IP address, and a few in all."""
    leader_method = lambda name: f"/{rpc.LEADER_SERVICE}/{name}"
    return {leader_method("RegisterLearner"): guard.Limit(1, anonymous=8),
            leader_method("GetModel"): guard.Limit(1, anonymous=4),
            leader_method("GetData"): guard.Limit(2, anonymous=2),
            leader_method("AccumulateGradients"): guard.Limit(2, anonymous=0, request_s=idle_timeout),
            "/grpc.health.v1.Health/Check": guard.Limit(1, anonymous=8)}


class Stalled(Exception):
    """Too few learners for too long: the leader checkpoints and exits, to be resumed later."""


class Leader:
    """The training run: data, global model, checkpoints, server and the round loop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        saved = checkpoint.load(args.resume) if args.resume else None
        if saved:
            checkpoint.adopt_config(saved["config"], args, args.explicit)
            if args.min_learners > args.learners:
                raise SystemExit(f"--min-learners {args.min_learners} exceeds the checkpoint's --learners {args.learners}")
            if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
                raise SystemExit(f"--resume {args.resume} continues in {args.resume}: leave out --out")
        self.out = Path(args.out or args.resume or "runs/latest")
        self.out.mkdir(parents=True, exist_ok=True)
        if not saved:
            checkpoint.set_aside_earlier_run(self.out)
        self.security = rpc.Security.from_args(args)
        log.info("loading %s data", args.dataset)
        self.train = utils.load_dataset(args.dataset, args.data_dir, train=True)
        test = utils.load_dataset(args.dataset, args.data_dir, train=False)
        normalisation = utils.channel_stats(self.train.images)
        self.test_images, self.test_labels = utils.normalize(test.images, *normalisation), test.labels
        self.shards = Shards(self.train, utils.shard_indices(len(self.train), args.learners, args.seed), args.dataset)
        self.schedule = make_schedule(args, len(self.shards.indices[0]))
        self.global_model = GlobalModel(args.model, self.train.num_classes, args, normalisation)
        first_round = self.restore(saved) if saved else 0
        restored_slots = [] if not saved else saved["slots"] if "slots" in saved else \
            [{"address": address, "credential": ""} for address in saved["addresses"]]  # an older checkpoint
        self.registry = Registry(args.learners, args.rejoin_grace, restored_slots)
        self.collector = RoundCollector(self.global_model.layout.size, first_round)
        self.global_model.publish(first_round, finished=first_round >= self.schedule.total_rounds)
        self.client = dispatch.LearnerClient(self.security)
        self.stopping = threading.Event()
        log.info("%s with %d parameters; %d train / %d test images, %d per learner; %d rounds "
                 "(%d per epoch), peak lr %.3g", args.model,
                 self.global_model.layout.parameter_count, len(self.train), len(test), len(self.shards.indices[0]),
                 self.schedule.total_rounds, self.schedule.rounds_per_epoch, self.schedule.base_lr)

    def save_checkpoint(self, rounds_done: int) -> None:
        """Everything needed to continue from rounds_done, written atomically. Learners' positions in
        their shards are a function of the round and the seed, so the round restores them; each slot's
        credential lets its learner take it back."""
        state = {"model": self.global_model.model.state_dict(), "optimizer": self.global_model.optimizer.state_dict(),
                 "round": rounds_done, "slots": self.registry.records(), "rng": torch.get_rng_state(),
                 "config": checkpoint.config_of(self.args)}
        checkpoint.save_atomically(state, self.out / "checkpoint.pt")
        log.info("checkpoint at round %d", rounds_done)

    def restore(self, saved: dict) -> int:
        """Load a checkpoint's model, optimizer and random state; return its round."""
        self.global_model.model.load_state_dict(saved["model"])
        self.global_model.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        checkpoint.keep_metrics_until(self.out / "metrics.jsonl", saved["round"])
        log.info("resuming from the checkpoint at round %d", saved["round"])
        return saved["round"]

    def serve(self) -> grpc.Server:
        servicer = LeaderServicer(self.registry, self.collector, self.global_model, self.shards.messages,
                                  self.args.batch_size, self.probe, self.heard_from)
        limit = self.global_model.gradient_payload_bytes() + rpc.ENVELOPE_BYTES
        slot_of = lambda headers: None if (slot := self.registry.holder(headers.get(rpc.CREDENTIAL_HEADER))) is None \
            else str(slot)
        server, port = rpc.start_server(
            f"{self.args.host}:{self.args.port}", [(ADD_LEADER_SERVICE, servicer)], [rpc.LEADER_SERVICE], limit,
            self.security, method_limits(self.args.idle_timeout), self.args.idle_timeout, self.registry.session_status,
            slot_of, self.args.learners)
        log.info("LeaderService listening on %s:%d (%s); waiting for %d learners", self.args.host, port,
                 self.security.describe(), self.args.learners)
        return server

    def probe(self, learner_ids: tuple[int, ...] | list[int]) -> None:
        """Check on these learners' registrations; drop those found gone or silent for --sync-timeout."""
        self.client.probe(self.registry.members(list(learner_ids)), self.drop, self.args.sync_timeout)

    def heard_from(self, member: Member) -> None:
        """The learner sent a gradient (or accepted a start): it is there, and rounds wait for it again."""
        self.client.heard_from(member)
        self.collector.heard_from(member.learner_id)

    def drop(self, member: Member, reason: str, gone: bool) -> None:
        if self.registry.drop(member.learner_id, member.generation, gone):
            kept = "its slot is free" if gone else f"its slot is kept for it for {self.args.rejoin_grace:.0f} s"
            log.warning("dropped learner %d (%s); %s", member.learner_id, reason, kept)

    def wait_for_learners(self) -> bool:
        """Wait until --learners learners registered (after a resume, --min-learners suffice once
        --round-timeout has passed); False if stopped first. Raises Stalled after --register-timeout."""
        started, last_log = time.monotonic(), 0.0
        while not self.registry.wait_for(self.args.learners, WAIT_SLICE_S):
            waited = time.monotonic() - started
            present = self.registry.count()
            if self.stopping.is_set():
                return False
            if self.args.resume and waited >= self.args.round_timeout and present >= self.args.min_learners:
                return True
            if waited > self.args.register_timeout:
                raise Stalled(f"only {present} of {self.args.learners} learners registered within --register-timeout "
                              f"{self.args.register_timeout:.0f} s; start more learners or lower --learners")
            if waited - last_log >= WAIT_LOG_INTERVAL_S:
                last_log = waited
                log.info("%d of %d learners registered; waiting", present, self.args.learners)
        return True

    def admit_joiners(self) -> None:
        """Start the learners that (re)registered, and give them the current model state."""
        joiners = self.registry.take_joiners()
        if not joiners:
            return
        log.info("starting learners %s at round %d", sorted(joiners), self.collector.round)
        # Rounds may have passed since the joiner's GetModel: the state goes first (a serialised ModelState).
        state = framing.chunk_message(self.global_model.encoded_state) if self.collector.round > 0 else None
        started = lambda member: (self.registry.started(member.learner_id, member.generation), self.heard_from(member))
        self.client.start(joiners, state, started, self.drop, self.args.sync_timeout)

    def wait_for_round(self, round_index: int) -> bool:
        """Wait for the expected gradients, or after --round-timeout for --min-learners of them; a round
        whose missing learners were all dropped closes at once. Learners the round waits for are checked on
        and dropped when gone; newcomers join. False if stopped first; raises Stalled when fewer than
        --min-learners gradients came within --round-timeout plus --register-timeout."""
        started, last_log, was_alone = time.monotonic(), 0.0, False
        while not self.collector.wait_complete(WAIT_SLICE_S):
            if self.stopping.is_set():
                return False
            missing, arrived, active = self.collector.missing(), self.collector.reported(), self.registry.active()
            waited = time.monotonic() - started
            enough = arrived >= self.args.min_learners
            if enough and not set(missing) & set(active):
                return True
            if enough and waited >= self.args.round_timeout:
                log.warning("round %d: closing after %.0f s with %d gradients; missing learners %s",
                            round_index, waited, arrived, missing)
                return True
            if waited > self.args.round_timeout + self.args.register_timeout:
                raise Stalled(f"round {round_index}: {arrived} gradients after {waited:.0f} s, fewer than --min-learners "
                              f"{self.args.min_learners} within --round-timeout plus --register-timeout; resume with "
                              f"--resume {self.out} when learners can take part")
            self.probe(sorted(set(missing) & set(active)))
            alone = self.registry.count() == 0
            if waited - last_log >= WAIT_LOG_INTERVAL_S or (alone and not was_alone):
                last_log = waited
                self.log_waiting(round_index, waited, arrived, missing, alone)
            was_alone = alone
            self.admit_joiners()
        return True

    def log_waiting(self, round_index: int, waited: float, arrived: int, missing: list[int], alone: bool) -> None:
        if alone:
            log.warning("round %d: no learner is left; waiting up to --register-timeout %.0f s for learners to "
                        "register", round_index, self.args.register_timeout)
            return
        need = "" if arrived >= self.args.min_learners else f" (need at least --min-learners {self.args.min_learners})"
        log.info("round %d: %d gradients after %.0f s; waiting for learners %s%s", round_index, arrived, waited,
                 missing, need)

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
        self.admit_joiners()
        if not self.registry.wait_started(self.args.sync_timeout):  # the first round waits for everyone started
            log.warning("some learners did not accept StartTraining within --sync-timeout; starting without them")
        while self.collector.round < total and not self.stopping.is_set():
            round_index = self.collector.round
            self.admit_joiners()
            self.client.keep_only({member.address for member in self.registry.members().values()})
            self.collector.expect(self.registry.ready())  # not those still being started: they may add in time
            if not self.wait_for_round(round_index):
                break
            gradients_in = time.perf_counter()
            lr = self.schedule.lr(round_index)
            summary = self.collector.close(self.global_model.mean_gradient)
            if summary.given_up:
                log.warning("learners %s missed %d rounds in a row: rounds no longer wait for them until they send "
                            "a gradient", list(summary.given_up), MAX_MISSED_ROUNDS)
            discarded = self.global_model.step(lr)
            if discarded:
                log.warning("round %d discarded, the model is unchanged: %s (%d learners)", round_index + 1,
                            discarded, summary.learners)
            stepped = time.perf_counter()
            done = round_index + 1
            eval_seconds = 0.0
            if done == total or self.due(done, self.args.eval_every):
                eval_started = time.perf_counter()
                self.evaluate(done, metrics)
                eval_seconds = time.perf_counter() - eval_started
            if done == total:
                checkpoint.save_atomically(self.global_model.model.state_dict(), self.out / "model.pt")
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
                           "step_s": stepped - gradients_in, "push_s": pushed - pushing,
                           **({"discarded": discarded} if discarded else {})})
            round_started = now
            progress.update()
            if done % max(1, total // 10) == 0:
                log.info("round %d/%d (epoch %d): train loss %.4f from %d learners", done, total,
                         self.schedule.epoch_of(round_index), summary.loss, summary.learners)
        progress.close()
        return self.collector.round

    def push_state(self, rounds_done: int, finished: bool, stopped: bool = False) -> int:
        """Encode the state after rounds_done once and send it to every active learner; return bytes sent."""
        request = self.global_model.publish(rounds_done, finished, stopped)  # a serialised ModelState, sent to all
        members = self.registry.members()
        broadcast = self.client.send(members, "SyncModelState", request, self.drop, timeout=self.args.sync_timeout)
        if finished:
            broadcast.wait(self.args.sync_timeout)
        return len(request) * len(members)

    def release_learners(self) -> None:
        """The checkpoint is at the final round: tell its learners that training is over, and keep serving the
        final state (GetModel) for --rejoin-grace seconds to learners that reconnect, unless all were told."""
        log.info("the checkpoint is at the final round %d: training is complete; telling its learners",
                 self.collector.round)
        if not (self.out / "model.pt").exists():
            checkpoint.save_atomically(self.global_model.model.state_dict(), self.out / "model.pt")
        started = time.monotonic()
        members = {key: member for key, member in self.registry.members(list(range(self.args.learners))).items()
                   if member.address}
        request = framing.chunk_message(self.global_model.encoded_state)  # published as finished
        broadcast = self.client.send(members, "SyncModelState", request, lambda *failure: None, self.args.sync_timeout)
        if broadcast.wait(self.args.sync_timeout) and broadcast.all_succeeded():
            return
        remaining = self.args.rejoin_grace - (time.monotonic() - started)
        log.info("telling learners that connect in the next %.0f s (--rejoin-grace) that training is over",
                 max(0.0, remaining))
        self.stopping.wait(max(0.0, remaining))

    def run(self) -> int:
        """Serve and train to the end; return the exit status (1: stalled for lack of learners)."""
        server = self.serve()
        metrics = MetricsLog(self.out / "metrics.jsonl", append=bool(self.args.resume))
        status, total = 0, self.schedule.total_rounds
        try:
            if self.collector.round >= total:
                self.release_learners()
            elif self.wait_for_learners():
                done = self.train_rounds(metrics)
                if done < total:
                    log.info("stopping on request after round %d", done)
                    self.save_checkpoint(done)
                    self.push_state(done, finished=True, stopped=True)
        except Stalled as stalled:
            log.error("%s", stalled)
            self.save_checkpoint(self.collector.round)
            self.push_state(self.collector.round, finished=True, stopped=True)
            status = 1
        finally:
            metrics.close()
            server.stop(grace=2).wait(5)
        records = read_metrics(metrics.path)
        if records:
            plot_metrics(records, self.out / "metrics.png")
        evaluations = [r for r in records if "test_accuracy" in r]
        if self.collector.round >= total and evaluations:
            log.info("final test accuracy %.4f; model.pt, metrics.jsonl and metrics.png are in %s",
                     evaluations[-1]["test_accuracy"], self.out)
        return status


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
    return leader.run()


if __name__ == "__main__":
    sys.exit(main())
