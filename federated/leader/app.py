"""The leader: owns the global model, registers learners, serves model and data, and runs the rounds of
FedSGD or another strategy."""

import argparse
import dataclasses
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

from federated.leader import checkpoint
from federated.leader import dispatch
from federated.leader import evaluation
from federated.wire import framing
from federated.net import guard
from federated.wire import messages
from federated.core import partition
from federated.net import rpc
from federated.common import runtime
from federated.core import strategies
import utils
from federated.wire import codec
from federated.leader.federation import Federation, Settings, Stalled
from federated.leader.metrics import MetricsLog, plot_metrics, read_metrics
from model import MAX_CLASSES, NORMS, architectures, build_model, load_initial_weights
from federated.leader.registry import COUNTED_ON, Member, Refusal, Registry
from federated.leader.collector import MAX_MISSED_ROUNDS, RoundCollector
from federated.net.rpc import leader_pb2, leader_pb2_grpc
from federated.core.aggregation import AGGREGATORS, minimum_updates, too_few
from federated.core.layout import GradientLayout, wire_state
from federated.core.schedule import learning_rate
from federated.core.steps import GuardedStep, make_optimizer
from federated.core.training import evaluate

log = logging.getLogger("leader")

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
        "then trains the global model with FedSGD (one synchronous gradient step per round) or another --strategy "
        "(local training, a server optimizer, robust aggregation, sampled participation).",
        formatter_class=runtime.HelpFormatter,
    )
    parser.add_argument("--learners", type=int, default=2, help="number of learners to wait for and train with")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=50051, help="port to listen on")
    parser.add_argument("--dataset", choices=(*utils.DATASETS, "none"), default="cifar10",
                        help="training data to shard among learners, and the test split to evaluate on; none: the "
                        "leader holds no data, learners train on their own (learner.py --dataset) and evaluate on their "
                        "own held-out images")
    parser.add_argument("--data-dir", default="data", help="where cifar10 lives (or is downloaded to), or the imagefolder root")
    parser.add_argument("--num-classes", type=int, help="classes the model tells apart (needed with --dataset none; "
                        "else the dataset's)")
    parser.add_argument("--image-size", type=int, default=utils.IMAGE_SIZE,
                        help="images are resized to this square size, on the leader and on learners with their own data")
    parser.add_argument("--model", default="resnet20", help="resnet20 (0.27 M parameters), resnet18 (11.2 M, CIFAR stem), "
                        "or torchvision:NAME, a torchvision classification architecture built from its name alone, e.g. "
                        "torchvision:mobilenet_v3_small (python -c 'import model; print(*model.architectures())' lists them)")
    parser.add_argument("--norm", choices=NORMS, default="batch",
                        help="normalisation layers of resnet20 and resnet18: group (GroupNorm) copes better with skewed "
                        "data than batch (Hsieh et al. 2020)")
    parser.add_argument("--init", metavar="PATH", help="start the global model from this state_dict file (e.g. "
                        "pretrained weights, or an earlier run's model.pt); a classifier of another shape starts afresh")
    add_partition_flags(parser)
    parser.add_argument("--epochs", type=float, default=30, help="passes over each learner's shard: the same compute whatever the strategy (with "
                        "--learners-per-round each learner does its share of it)")
    parser.add_argument("--rounds", type=int, help="number of rounds (unset: from --epochs); overrides --epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size per learner per step (FedSGD: one step per round)")
    parser.add_argument("--lr", type=float, help="FedSGD's peak learning rate (unset: 0.1 x total batch / 128, the linear scaling rule)")
    parser.add_argument("--warmup-epochs", type=float, default=1.0,
                        help="linear learning-rate warm-up before cosine decay (at most a fifth of training); the schedule "
                        "drives --lr, or --client-lr round by round")
    parser.add_argument("--momentum", type=float, default=0.9, help="FedSGD's momentum on the leader")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty on weights (not on biases or BatchNorm): on the leader's "
                        "step for FedSGD, on the learners' steps for the others")
    add_strategy_flags(parser)
    parser.add_argument("--wire-dtype", choices=sorted(codec.WIRE_DTYPES), default="float32",
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
    parser.add_argument("--tensorboard", metavar="DIR", help="also write every metric as TensorBoard events in DIR")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    rpc.add_security_flags(parser, "leader")
    return parser


def add_partition_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("partition", "How the leader splits its --dataset among learners: equal random "
                                      "shards, or skewed the ways real federations are (partition.json and "
                                      "partition.png in --out show each learner's labels).")
    group.add_argument("--partition", choices=partition.SCHEMES, default="iid",
                       help="iid: equal random shards; dirichlet: each class spread over learners in Dirichlet(--alpha) "
                       "proportions (Hsu et al. 2019); classes: --classes-per-learner classes each (McMahan et al. 2017); "
                       "quantity: balanced labels, Dirichlet(--alpha) sizes")
    group.add_argument("--alpha", type=float, default=0.5, help="dirichlet and quantity: concentration (small: more skew)")
    group.add_argument("--classes-per-learner", type=int, default=2, help="classes: how many classes each learner holds")


def add_strategy_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "strategy", "FedSGD (the default) takes one gradient per learner per round and steps with --lr, --momentum "
        "and --weight-decay on the leader. Every other strategy trains on each learner for --local-epochs or "
        "--local-steps with the client flags, and the leader applies the aggregate change with a server optimizer.")
    group.add_argument("--strategy", choices=strategies.STRATEGIES, default="fedsgd",
                       help="fedavg: McMahan et al. 2017; fedavgm: with server momentum (Hsu et al. 2019); fedprox: "
                       "a proximal term --mu (Li et al. 2020); fedadagrad, fedadam, fedyogi: adaptive server optimizers "
                       "(Reddi et al. 2021); scaffold: control variates (Karimireddy et al. 2020)")
    group.add_argument("--local-epochs", type=float, help="passes over its data each learner makes per round "
                       "(default 1 for local-training strategies)")
    group.add_argument("--local-steps", type=int, help="SGD steps each learner takes per round (instead of --local-epochs)")
    group.add_argument("--client-lr", type=float, help="peak client learning rate, on --warmup-epochs and cosine "
                       "schedule by round (unset: 0.1 x --batch-size / 128)")
    group.add_argument("--client-momentum", type=float, default=0.9, help="client SGD momentum (reset every round)")
    group.add_argument("--server-lr", type=float, help="server learning rate (unset: 1; fedavgm 1 - momentum; 0.1 for "
                       "fedadagrad and 0.01 for fedadam and fedyogi, as Reddi et al. tuned for CIFAR-10)")
    group.add_argument("--server-momentum", type=float, help="fedavgm's server momentum (unset: 0.9)")
    group.add_argument("--beta1", type=float, default=0.9, help="adaptive server optimizers' first-moment decay")
    group.add_argument("--beta2", type=float, default=0.99, help="fedadam and fedyogi's second-moment decay")
    group.add_argument("--tau", type=float, default=1e-3, help="adaptive server optimizers' adaptivity (epsilon)")
    group.add_argument("--mu", type=float, help="fedprox's proximal weight (unset: 0.01)")
    group.add_argument("--aggregator", choices=AGGREGATORS, default="mean",
                       help="how a round's updates combine: the sample-weighted mean (memory: one model), or a robust "
                       "rule that keeps every update of the round (memory: one model per learner in the round)")
    group.add_argument("--trim", type=float, default=0.2, help="trimmed-mean: fraction of the largest and of the "
                       "smallest values dropped per coordinate")
    group.add_argument("--byzantine", type=int, default=1, help="krum, multi-krum: how many hostile learners to "
                       "withstand (needs at least 2F + 3 learners in a round)")
    group.add_argument("--clip-norm", type=float, default=0.0, help="clip each update's model part to this L2 norm "
                       "before aggregation (0: no clipping)")
    group.add_argument("--learners-per-round", type=int, default=0,
                       help="train with this many of the active learners each round, sampled with --seed "
                       "(0: all); the others stay registered and idle")


# Flags that only some strategies or aggregators read: given for another, they are refused rather than ignored
FLAGS_FOR = {"local_epochs": "local", "local_steps": "local", "client_lr": "local", "client_momentum": "local",
             "server_lr": "local", "lr": "fedsgd", "momentum": "fedsgd", "server_momentum": "fedavgm", "mu": "fedprox",
             "beta1": "adaptive", "beta2": "fedadam or fedyogi", "tau": "adaptive",
             "trim": "trimmed-mean", "byzantine": "krum or multi-krum"}


def flag_applies(key: str, args: argparse.Namespace) -> bool:
    """Whether the strategy and aggregator flag `key` means anything to this run (see FLAGS_FOR)."""
    return {"local": args.strategy != "fedsgd", "fedsgd": args.strategy == "fedsgd",
            "fedavgm": args.strategy == "fedavgm", "fedprox": args.strategy == "fedprox",
            "adaptive": args.strategy in strategies.ADAPTIVE, "fedadam or fedyogi": args.strategy in ("fedadam", "fedyogi"),
            "trimmed-mean": args.aggregator == "trimmed-mean",
            "krum or multi-krum": args.aggregator in ("krum", "multi-krum")}[FLAGS_FOR[key]]


def data_problems(args: argparse.Namespace) -> list[tuple[bool, str]]:
    """What is wrong with the data, model and partition flags, as (failed, message) pairs."""
    unused = [flag for flag, applies in (("partition", args.dataset != "none"),
                                         ("alpha", args.partition in ("dirichlet", "quantity")),
                                         ("classes_per_learner", args.partition == "classes"))
              if flag in args.explicit and not applies]
    return [
        (args.dataset == "none" and args.num_classes is None,
         "--dataset none needs --num-classes (the leader has no data to count them in)"),
        (args.num_classes is not None and not 1 < args.num_classes <= MAX_CLASSES,
         f"--num-classes must lie between 2 and {MAX_CLASSES}"),
        (args.model not in architectures(), f"unknown --model {args.model[:40]!r}; choose resnet20, resnet18 or "
         "torchvision:NAME (python -c 'import model; print(*model.architectures())' lists them)"),
        (not messages.MIN_IMAGE_SIZE <= args.image_size <= utils.MAX_IMAGE_SIZE,
         f"--image-size must lie between {messages.MIN_IMAGE_SIZE} and {utils.MAX_IMAGE_SIZE}"),
        (bool(unused), f"{', '.join('--' + flag.replace('_', '-') for flag in unused)} would be ignored: --partition is "
         "for a leader with a --dataset, --alpha for dirichlet and quantity, --classes-per-learner for classes"),
        (args.alpha <= 0 or args.classes_per_learner < 1, "--alpha and --classes-per-learner must be positive"),
    ]


def strategy_problems(args: argparse.Namespace) -> list[tuple[bool, str]]:
    """What is wrong with the strategy flags, as (failed, message) pairs."""
    per_round, local = args.learners_per_round or args.learners, args.strategy != "fedsgd"
    needed = minimum_updates(args.aggregator, args.trim, args.byzantine)
    ignored = [key for key in FLAGS_FOR if key in args.explicit and not flag_applies(key, args)]
    return [
        (bool(ignored), "; ".join(f"--{key.replace('_', '-')} is for {FLAGS_FOR[key]} runs" for key in ignored)
         + f", not --strategy {args.strategy} --aggregator {args.aggregator} (see --help)"),
        (args.local_epochs is not None and args.local_steps is not None, "give --local-epochs or --local-steps, not both"),
        ((args.local_epochs is not None and args.local_epochs <= 0) or (args.local_steps is not None and args.local_steps < 1)
         or (args.client_lr is not None and args.client_lr <= 0) or (args.server_lr is not None and args.server_lr <= 0),
         "--local-epochs, --local-steps, --client-lr and --server-lr must be positive"),
        (not 0 <= args.client_momentum <= messages.MAX_CLIENT_MOMENTUM or not 0 <= (args.server_momentum or 0) < 1
         or not 0 <= args.beta1 < 1
         or not 0 <= args.beta2 < 1 or args.tau <= 0 or (args.mu or 0) < 0,
         "momenta and betas must lie in [0, 1), --tau must be positive and --mu not negative"),
        ((args.client_lr or 0) > messages.MAX_CLIENT_LR or (local and args.weight_decay > messages.MAX_WEIGHT_DECAY)
         or (args.mu or 0) > messages.MAX_MU or (args.learners_per_round and args.learners > messages.MAX_LEARNERS),
         f"learners accept --client-lr up to {messages.MAX_CLIENT_LR:g}, --weight-decay up to "
         f"{messages.MAX_WEIGHT_DECAY:g}, --mu up to {messages.MAX_MU:g} and at most {messages.MAX_LEARNERS} learners"),
        (not 0 <= args.trim < 0.5, "--trim must lie in [0, 0.5)"),
        (args.byzantine < 0 or args.clip_norm < 0 or args.learners_per_round < 0,
         "--byzantine, --clip-norm and --learners-per-round must not be negative"),
        (args.learners_per_round > args.learners, "--learners-per-round exceeds --learners"),
        (args.aggregator == "trimmed-mean" and args.trim == 0, "--trim 0 trims nothing: use --aggregator mean"),
        (min(per_round, args.min_learners) < needed,
         f"{args.aggregator} outvotes a hostile learner with at least {needed} updates in a round; the run has "
         f"{per_round} learners a round and --min-learners {args.min_learners}"),
        (args.learners_per_round and args.min_learners > args.learners_per_round,
         "--min-learners exceeds --learners-per-round"),
    ]


def default_server_lr(args: argparse.Namespace) -> float:
    """The papers' server learning rates; fedavgm's is 1 - momentum, so that its steady step is FedAvg's
    (Hsu et al. 2019: what matters is lr / (1 - momentum); 1 with momentum 0.9 diverged on the synthetic set)."""
    if args.strategy == "fedavgm":
        return 1.0 - (0.9 if args.server_momentum is None else args.server_momentum)
    return strategies.DEFAULT_SERVER_LR.get(args.strategy, 1.0)


def make_strategy(args: argparse.Namespace, local_steps: int) -> strategies.Strategy:
    """The strategy the flags ask for, with the papers' defaults where they are unset."""
    local = args.strategy != "fedsgd"
    server_momentum = (0.9 if args.server_momentum is None else args.server_momentum) if args.strategy == "fedavgm" else 0.0
    return strategies.Strategy(
        name=args.strategy, local_steps=local_steps, client_momentum=args.client_momentum if local else 0.0,
        weight_decay=args.weight_decay if local else 0.0,
        mu=(0.01 if args.mu is None else args.mu) if args.strategy == "fedprox" else 0.0,
        server_lr=args.server_lr or default_server_lr(args),
        server_momentum=server_momentum,
        beta1=args.beta1, beta2=args.beta2, tau=args.tau, aggregator=args.aggregator, trim=args.trim,
        byzantine=args.byzantine, clip_norm=args.clip_norm)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked; args.explicit names those given on the command line (a resume takes the others
    from the checkpoint)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    unset = object()  # argparse leaves attributes a namespace already has alone unless the flag is given
    given = parser.parse_args(argv, namespace=argparse.Namespace(**{key: unset for key in vars(args)}))
    args.explicit = {key for key, value in vars(given).items() if value is not unset}
    if "min_learners" not in args.explicit and args.aggregator != "mean":  # a round must outvote a hostile update
        needed = minimum_updates(args.aggregator, args.trim, args.byzantine)
        args.min_learners = min(needed, args.learners_per_round or args.learners) if needed != math.inf else 1
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
        *([] if args.resume else strategy_problems(args) + data_problems(args)),  # a resume checks the checkpoint's
    ]
    for failed, message in problems:
        if failed:
            parser.error(message)
    return args


@dataclass(frozen=True)
class Schedule:
    """How long training runs and how fast it learns. A round is steps_per_round batches on each learner
    (one for FedSGD); an epoch is a pass over a learner's shard, steps_per_epoch batches."""

    total_rounds: int
    steps_per_epoch: int
    steps_per_round: int
    warmup_rounds: int
    base_lr: float

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


def typical_shard_size(sizes: list[int]) -> int:
    """The median learner's number of training images, the lower one of an even count: an epoch is a pass
    over it, so that no single learner's claim of a huge dataset can stretch the run (of two, the smaller)."""
    return sorted(sizes)[(len(sizes) - 1) // 2]


def combined_normalisation(summaries: list[messages.DataSummary], image_size: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over the learners' images, each learner weighing as many images
    as it holds but at most as many as the median learner: one learner's claim cannot set everyone's inputs."""
    cap = typical_shard_size([summary.train_samples for summary in summaries])
    weights = [min(summary.train_samples, cap) / summary.train_samples for summary in summaries]
    total = lambda field: [sum(weight * getattr(summary, field)[channel] for weight, summary in zip(weights, summaries))
                           for channel in range(3)]
    counted = sum(weight * summary.train_samples for weight, summary in zip(weights, summaries))
    return utils.stats_from_sums(total("channel_sums"), total("channel_square_sums"), counted * image_size ** 2)


def make_schedule(args: argparse.Namespace, shard_size: int) -> Schedule:
    """The schedule for learners holding shard_size images each (when sizes differ: the mean of the leader's
    shards, or the median of the sizes learners claim)."""
    steps_per_epoch = max(1, shard_size // args.batch_size)  # a shard smaller than a batch is one (smaller) batch
    steps_per_round = 1
    if args.strategy != "fedsgd":
        steps_per_round = args.local_steps or max(1, round((args.local_epochs or 1.0) * steps_per_epoch))
    rounds_per_epoch = steps_per_epoch / steps_per_round
    total = args.rounds if args.rounds is not None else max(1, math.ceil(args.epochs * rounds_per_epoch))
    warmup = min(round(args.warmup_epochs * rounds_per_epoch), total // 5)
    if args.strategy == "fedsgd":
        base_lr = args.lr if args.lr is not None else 0.1 * args.learners * args.batch_size / REFERENCE_BATCH
    else:  # each learner steps on its own batch: the linear scaling rule for one learner's batch
        base_lr = args.client_lr if args.client_lr is not None else 0.1 * args.batch_size / REFERENCE_BATCH
    return Schedule(total, steps_per_epoch, steps_per_round, warmup, base_lr)


class GlobalModel:
    """The global model, its optimizer (FedSGD's, or a strategy's server optimizer) and the encoded state the
    learners fetch."""

    def __init__(self, architecture: str, num_classes: int, args: argparse.Namespace,
                 normalisation: tuple[list[float], list[float]], strategy: strategies.Strategy = strategies.Strategy()) -> None:
        torch.manual_seed(args.seed)
        self.model = build_model(architecture, num_classes, args.norm)
        if args.init and not args.resume:  # a resume starts from its checkpoint's weights
            try:
                load_initial_weights(self.model, args.init)
            except ValueError as error:
                raise SystemExit(f"--init {args.init}: {error}") from None
        self.strategy = strategy
        self.wire_dtype = codec.WIRE_DTYPES[args.wire_dtype]
        self.layout = GradientLayout(self.model, self.wire_dtype, controls=strategy.name == "scaffold")
        self.mean_gradient = torch.zeros(self.layout.size)
        self.layout.bind_gradients(self.mean_gradient)
        self.optimizer = strategies.make_server_optimizer(self.model, strategy) if strategy.local else \
            make_optimizer(self.model, 0.0, args.momentum, args.weight_decay)
        self.step_safely = GuardedStep(self.model, self.layout, self.optimizer)
        # SCAFFOLD's server control variate c, over the trainable parameters; it travels with every state
        self.control = torch.zeros(self.layout.parameter_count) if strategy.name == "scaffold" else None
        mean, std = normalisation
        self.info = messages.StateInfo(architecture, num_classes, args.batch_size, args.seed, tuple(mean), tuple(std),
                                       args.wire_dtype, image_size=args.image_size, norm=args.norm)
        self.encoded_state = b""
        self._messages: tuple[bytes, list[bytes]] = (b"", [])
        self.publish(round_index=0, finished=False)

    def adopt_data(self, strategy: strategies.Strategy, normalisation: tuple[list[float], list[float]]) -> None:
        """A leader without data learns its normalisation and epoch length (hence local steps) from its learners."""
        self.strategy = strategy
        self.info = dataclasses.replace(self.info, mean=tuple(normalisation[0]), std=tuple(normalisation[1]))

    def publish(self, round_index: int, finished: bool, stopped: bool = False,
                plan: messages.TrainingPlan = messages.TrainingPlan()) -> bytes:
        """Encode the state after round_index with everything a learner needs to train the next round (plan);
        GetModel serves it from now on. `finished` tells learners to exit, `stopped` that the leader was stopped
        early (it can be resumed). Returns the state as one serialised ModelState, ready to push to learners."""
        info = dataclasses.replace(self.info, round=round_index, finished=finished, stopped=stopped, plan=plan)
        tensors = wire_state(self.model, self.wire_dtype, self.control)
        self.encoded_state = codec.encode(tensors, info.to_metadata())
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
        """Size of a learner's update payload, to bound incoming messages."""
        return len(codec.encode(self.layout.wire_tensors(self.mean_gradient), {"learner_id": "0"}))

    def step(self, lr: float, participants: int = 1, learners: int = 1) -> str | None:
        """One step with the round's aggregate update (in mean_gradient): FedSGD's optimizer at the schedule's
        lr, or the strategy's server optimizer (then SCAFFOLD's control update, Karimireddy et al.'s
        c += |S| / N * the mean change of the participants' controls).
        None, or why the model was left as it was (non-finite or absurd: GuardedStep)."""
        if not self.strategy.local:
            return self.step_safely(self.mean_gradient, lr)
        change = None
        if self.control is not None:  # checked before the step, applied after it
            change = self.mean_gradient[self.layout.controls] * (participants / learners)
            weights = torch.linalg.vector_norm(torch.cat([p.detach().reshape(-1) for _, p in self.layout.parameters]))
            if problem := strategies.control_problem(self.control, change, weights.item()):
                return problem
        problem = self.step_safely(self.mean_gradient, self.strategy.server_lr, self.strategy.local_steps)
        if problem is None and change is not None:
            self.control.add_(change)
        return problem


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
                metadata = messages.ShardInfo(learner_id, shard.num_classes, self.dataset).to_metadata()
                payload = codec.encode({"labels": shard.labels, "images": shard.images}, metadata)
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
                 shard_messages: Callable[[int], list[bytes]] | None, batch_size: int,
                 probe: Callable[[tuple[int, ...]], None] = lambda learner_ids: None,
                 heard_from: Callable[[Member], None] = lambda member: None,
                 evaluations: evaluation.Evaluations | None = None) -> None:
        self.registry, self.collector, self.global_model = registry, collector, global_model
        self.shard_messages, self.batch_size = shard_messages, batch_size  # no shard_messages: a leader without data
        self.probe, self.heard_from = probe, heard_from
        self.evaluations = evaluations or evaluation.Evaluations()
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
            data = self.data_summary(request)
            member, message = self.registry.register(request.network_addr, rpc.credential_of(context),
                                                     rpc.peer_certificate(context), data)
        except Refusal as refusal:
            self.log("refused", "registration refused: %s", refusal)
            self.probe(refusal.probe)
            if refusal.retry:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(refusal))
            return leader_pb2.AckWithMetadata(success=False, message=str(refusal), learner_id=-1,
                                              max_learners=self.registry.capacity)
        log.info("%s%s", message, f" ({data.train_samples} training images, {data.eval_samples} held out)" if data else "")
        return leader_pb2.AckWithMetadata(success=True, message=message, learner_id=member.learner_id,
                                          max_learners=self.registry.capacity, credential=member.credential)

    def data_summary(self, request: leader_pb2.LearnerInfo) -> messages.DataSummary | None:
        """What the learner says its own data is, checked; raises Refusal. A leader without data needs it."""
        if not request.HasField("data"):
            if self.shard_messages is None:
                raise Refusal("this leader holds no data (--dataset none): start the learner with --dataset and "
                              "--data-dir naming its own images")
            return None
        try:
            return messages.DataSummary.from_proto(request.data, self.global_model.info.image_size)
        except codec.PayloadError as error:
            raise Refusal(f"data summary refused: {error}") from None

    def GetModel(self, request: leader_pb2.Empty, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from self.global_model.model_messages()

    def GetData(self, request: leader_pb2.LearnerDataRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        member = self.data_caller(request.network_addr, context)
        if self.shard_messages is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this leader holds no data (--dataset none): start the "
                          "learner with --dataset and --data-dir naming its own images")
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

    def ReportEvaluation(self, request: leader_pb2.EvaluationReport, context: grpc.ServicerContext) -> leader_pb2.Ack:
        member, _ = self.caller(context)
        if request.learner_id != member.learner_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"learner_id {request.learner_id} is not the caller's slot, "
                          f"{member.learner_id}")
        declared = self.registry.summaries().get(member.learner_id)
        report = evaluation.Report(member.learner_id, request.samples, request.correct, request.loss)
        try:
            ignored = self.evaluations.submit(request.round, report, declared.eval_samples if declared else 0)
        except codec.PayloadError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"evaluation refused: {error}")
        if ignored:
            self.log("ignored", "%s", ignored)
        return leader_pb2.Ack(success=ignored is None, message=ignored or f"evaluation of round {request.round} counted")

    def accumulate(self, chunk: memoryview, member: Member, context: grpc.ServicerContext) -> leader_pb2.Ack:
        """Check a learner's gradient and add it to the open round."""
        try:
            payload = codec.decode(chunk)
            claims = self.check_claims(payload, member)
            codec.check_matches(payload, self.global_model.layout.spec)
            if problem := self.global_model.layout.update_problem(payload.tensors):
                raise codec.PayloadError(problem)
        except (codec.PayloadError, ValueError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"gradient rejected: {error}")
        round_index = claims.round
        reason = self.collector.submit(member.learner_id, round_index, codec.flat_runs(payload), claims.samples,
                                       claims.loss, len(chunk))
        self.heard_from(member)
        if reason:
            self.log("ignored", "learner %d: %s", member.learner_id, reason, level=logging.WARNING)
            return leader_pb2.Ack(success=False, message=reason)
        return leader_pb2.Ack(success=True, message=f"gradient for round {round_index} accepted")

    def check_claims(self, payload: codec.Payload, member: Member) -> messages.UpdateInfo:
        """What an update claims (its slot, kind, samples and steps), checked against what this leader asked
        for; raises PayloadError."""
        claims = messages.UpdateInfo.from_payload(payload)
        strategy = self.global_model.strategy
        if claims.learner_id != member.learner_id:
            raise codec.PayloadError(f"metadata learner_id {claims.learner_id} is not the caller's slot, {member.learner_id}")
        expected = strategies.update_kind(strategy.name)
        if claims.kind != expected:
            raise codec.PayloadError(f"this leader runs {strategy.name} and takes a {expected}, not a {claims.kind}")
        if claims.steps > strategy.local_steps:
            raise codec.PayloadError(f"metadata steps {claims.steps} exceeds the {strategy.local_steps} local steps this "
                                    "leader asks for")
        if claims.samples > self.batch_size * claims.steps:
            raise codec.PayloadError(f"metadata samples {claims.samples} exceeds the batch of {self.batch_size} this leader "
                                    f"asks for{'' if claims.steps == 1 else f' times {claims.steps} steps'}")
        return claims


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
            leader_method("ReportEvaluation"): guard.Limit(1, anonymous=0),
            "/grpc.health.v1.Health/Check": guard.Limit(1, anonymous=8)}


class Leader:
    """The training run: data, global model, checkpoints, server and the round loop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        saved = checkpoint.load(args.resume) if args.resume else None
        if saved:
            checkpoint.adopt_config(saved["config"], args, args.explicit)
            for failed, message in strategy_problems(args):
                if failed:
                    raise SystemExit(f"--resume {args.resume}: {message}")
            if args.min_learners > args.learners:
                raise SystemExit(f"--min-learners {args.min_learners} exceeds the checkpoint's --learners {args.learners}")
            if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
                raise SystemExit(f"--resume {args.resume} continues in {args.resume}: leave out --out")
        self.out = Path(args.out or args.resume or "runs/latest")
        self.out.mkdir(parents=True, exist_ok=True)
        if not saved:
            checkpoint.set_aside_earlier_run(self.out)
        self.security = rpc.Security.from_args(args)
        # A leader without data learns normalisation and shard size from its learners once they registered
        # (settle); a resumed one has them in its checkpoint.
        self.data = saved.get("data") if saved else None
        self.shards, self.test_images = None, None
        if args.dataset != "none":
            self.data = self.load_data()
        normalisation = (self.data["mean"], self.data["std"]) if self.data else ([], [])
        self.schedule = make_schedule(args, self.data["shard_size"] if self.data else args.batch_size)
        self.strategy = make_strategy(args, self.schedule.steps_per_round)
        self.global_model = GlobalModel(args.model, args.num_classes, args, normalisation, self.strategy)
        self.sampler = torch.Generator().manual_seed(args.seed)  # who takes part in each round
        first_round = self.restore(saved) if saved else 0
        restored_slots = [] if not saved else saved["slots"] if "slots" in saved else \
            [{"address": address, "credential": ""} for address in saved["addresses"]]  # an older checkpoint
        self.registry = Registry(args.learners, args.rejoin_grace, restored_slots)
        layout = self.global_model.layout
        self.collector = RoundCollector(layout.size, first_round, self.strategy, layout.parameter_count)
        # With sampling, those the checkpoint drew for this round train on this state; in a new run nobody does
        # until the first round draws its participants and pushes it to them.
        self.participants = (saved.get("participants") if saved else None) or [] if args.learners_per_round else None
        self.publish_first_state()
        self.client = dispatch.LearnerClient(self.security)
        self.stopping = threading.Event()
        self.evaluations = evaluation.Evaluations()
        self.federation = Federation(Settings.from_args(args, self.out), self.registry, self.collector,
                                     self.global_model.publish, lambda: self.global_model.encoded_state, self.plan,
                                     self.client, self.sampler, self.stopping, self.participants or None)
        log.info("%s with %d parameters%s", args.model, layout.parameter_count,
                 "; no data: waiting for the learners' summaries" if not self.data else "")
        if self.data:
            self.log_schedule()

    def load_data(self) -> dict:
        """Load --dataset, split it among the learners (partition.json and .png show how) and keep its test
        split; returns the normalisation and the mean shard size (sizes the leader knows, not claims: an epoch is
        as many images as the dataset holds)."""
        args = self.args
        log.info("loading %s data", args.dataset)
        train = utils.load_dataset(args.dataset, args.data_dir, train=True, image_size=args.image_size)
        test = utils.load_dataset(args.dataset, args.data_dir, train=False, image_size=args.image_size)
        if args.num_classes not in (None, train.num_classes):
            raise utils.DatasetError(f"--num-classes {args.num_classes}, but {args.dataset} has {train.num_classes} classes")
        args.num_classes = train.num_classes
        try:
            shards = partition.partition(train.labels, args.learners, args.partition, args.seed, args.alpha,
                                         args.classes_per_learner, train.num_classes, min_samples=args.batch_size)
        except ValueError as error:
            raise utils.DatasetError(f"--partition {args.partition}: {error}") from None
        for line in partition.describe(partition.write_partition(self.out, train.labels, shards, train.num_classes)):
            log.info("%s", line)
        mean, std = utils.channel_stats(train.images)
        self.test_images, self.test_labels = utils.normalize(test.images, mean, std), test.labels
        self.shards = Shards(train, shards, args.dataset)
        log.info("%d train / %d test images, %s partition", len(train), len(test), args.partition)
        return {"mean": mean, "std": std, "shard_size": sum(map(len, shards)) // len(shards)}

    def settle_on_learners_data(self) -> bool:
        """A leader without data: combine the registered learners' summaries into the normalisation and the
        epoch's length, then publish the state the learners will start from; False if no learner is left."""
        summaries = list(self.registry.summaries().values())
        if not summaries:  # all dropped since they registered
            return False
        sizes = [summary.train_samples for summary in summaries]
        mean, std = combined_normalisation(summaries, self.args.image_size)
        self.data = {"mean": mean, "std": std, "shard_size": typical_shard_size(sizes)}
        self.schedule = make_schedule(self.args, self.data["shard_size"])
        self.strategy = make_strategy(self.args, self.schedule.steps_per_round)
        self.global_model.adopt_data(self.strategy, (mean, std))
        self.publish_first_state()
        log.info("learners hold %s training images; normalisation mean %s, std %s",
                 " + ".join(map(str, sizes)), [round(m, 4) for m in mean], [round(d, 4) for d in std])
        self.log_schedule()
        return True

    def publish_first_state(self) -> None:
        """The state learners start (or a resumed run goes on) from; its evaluation, if due, was done before."""
        first_round = self.collector.round
        finished = first_round >= self.schedule.total_rounds
        plan = self.plan(first_round, self.participants)
        self.global_model.publish(first_round, finished, plan=messages.TrainingPlan() if finished else
                                  dataclasses.replace(plan, evaluate=False))

    def log_schedule(self) -> None:
        log.info("%s: %d rounds of %d local steps (%.3g per epoch of %d images per learner), peak %slr %.3g%s",
                 self.strategy.name, self.schedule.total_rounds, self.schedule.steps_per_round,
                 self.schedule.rounds_per_epoch, self.data["shard_size"], "client " if self.strategy.local else "",
                 self.schedule.base_lr, f", server lr {self.strategy.server_lr:g}" if self.strategy.local else "")

    def plan(self, round_index: int, participants: list[int] | None) -> messages.TrainingPlan:
        """How learners train round_index: the strategy's local training at the schedule's learning rate, after
        evaluating the state on their held-out images when an evaluation is due."""
        strategy, evaluate = self.strategy, self.evaluation_due(round_index)
        if not strategy.local:
            return messages.TrainingPlan(participants=None if participants is None else tuple(participants),
                                         evaluate=evaluate)
        return messages.TrainingPlan(strategy.name, strategy.local_steps, self.schedule.lr(round_index),
                                     strategy.client_momentum, strategy.weight_decay, strategy.mu,
                                     None if participants is None else tuple(participants), evaluate)

    def save_checkpoint(self, rounds_done: int) -> None:
        model = self.global_model
        state = checkpoint.snapshot(model.model, model.optimizer, model.control, rounds_done, self.registry.records(),
                                    self.sampler, self.federation.participants, checkpoint.config_of(self.args), self.data)
        checkpoint.save_atomically(state, self.out / "checkpoint.pt")
        log.info("checkpoint at round %d", rounds_done)

    def restore(self, saved: dict) -> int:
        """Continue from a checkpoint: its model, optimizer and random states; return its round."""
        model = self.global_model
        rounds_done = checkpoint.restore(saved, model.model, model.optimizer, model.control, self.sampler)
        checkpoint.keep_metrics_until(self.out / "metrics.jsonl", rounds_done)
        log.info("resuming from the checkpoint at round %d", rounds_done)
        return rounds_done

    def serve(self) -> grpc.Server:
        servicer = LeaderServicer(self.registry, self.collector, self.global_model,
                                  self.shards.messages if self.shards else None, self.args.batch_size,
                                  self.federation.probe, self.federation.heard_from, self.evaluations)
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

    def evaluate(self, round_index: int, metrics: MetricsLog) -> float:
        """Evaluate the global model on the leader's test split, if it has one, and record it; returns the
        seconds it took."""
        if self.test_images is None:
            return 0.0
        started = time.perf_counter()
        with runtime.torch_threads(self.args.threads or runtime.available_cores()):
            result = evaluate(self.global_model.model, self.test_images, self.test_labels)
        seconds = time.perf_counter() - started
        metrics.write({"round": round_index, "epoch": self.schedule.epoch_of(max(0, round_index - 1)), "source": "leader",
                       "test_loss": result.loss, "test_accuracy": result.accuracy, "seconds": seconds})
        log.info("round %d: test loss %.4f, test accuracy %.4f", round_index, result.loss, result.accuracy)
        return seconds

    def write_evaluations(self, metrics: MetricsLog, final: bool = False) -> None:
        """Record the learners' evaluations that are over (at the end, after waiting for the last one)."""
        if final:
            self.evaluations.wait(self.collector.round, self.args.round_timeout)
        for record in self.evaluations.records(final):
            record["epoch"] = self.schedule.epoch_of(max(0, record["round"] - 1))
            metrics.write(record)
            log.info("round %d: learners' test loss %.4f, test accuracy %.4f on %d held-out images of %d learners%s",
                     record["round"], record["test_loss"], record["test_accuracy"], record["test_samples"],
                     len(record["per_learner"]), f" (no report from {record['missing']})" if "missing" in record else "")

    def evaluation_due(self, rounds_done: int) -> bool:
        """Whether the state after rounds_done gets evaluated (at the end, each epoch's end, every --eval-every)."""
        return rounds_done > 0 and (rounds_done == self.schedule.total_rounds or self.due(rounds_done, self.args.eval_every))

    def due(self, rounds_done: int, every: int) -> bool:
        """Whether rounds_done ends an epoch or a period of `every` rounds (0: never)."""
        return (every > 0 and rounds_done % every == 0) or self.schedule.ends_epoch(rounds_done)

    def push_state(self, rounds_done: int) -> int:
        """Push the state after rounds_done (opening the learners' evaluation of it when due); returns bytes sent."""
        evaluated = self.evaluation_due(rounds_done)
        if evaluated:
            self.evaluations.open(rounds_done)
        finished = rounds_done == self.schedule.total_rounds
        bytes_out = self.federation.push_state(rounds_done, finished)
        if evaluated:
            held_out = {learner for learner, summary in self.registry.summaries().items() if summary.eval_samples}
            sent_to = self.registry.active() if finished or self.federation.participants is None else self.federation.participants
            self.evaluations.expect(rounds_done, sorted(held_out & set(sent_to)))
        return bytes_out

    def train_rounds(self, metrics: MetricsLog) -> int:
        """Run rounds until the schedule ends or a stop is requested; return the rounds done."""
        progress = tqdm(total=self.schedule.total_rounds, initial=self.collector.round, desc="rounds", unit="round",
                        disable=None)
        self.federation.start()
        round_started = time.perf_counter()
        while self.collector.round < self.schedule.total_rounds and not self.stopping.is_set():
            round_started = self.run_round(self.collector.round, round_started, metrics)
            if round_started is None:
                break
            progress.update()
        progress.close()
        return self.collector.round

    def run_round(self, round_index: int, round_started: float, metrics: MetricsLog) -> float | None:
        """Open round_index, wait for its updates, step, evaluate and push when due, checkpoint, and record it;
        returns when it ended (None if stopped while waiting)."""
        self.federation.open()
        if not self.federation.wait_for_round(round_index):
            return None
        updates_in, sampled = time.perf_counter(), self.federation.participants
        lr, done, total = self.schedule.lr(round_index), round_index + 1, self.schedule.total_rounds
        summary = self.collector.close(self.global_model.mean_gradient)
        if summary.given_up:
            log.warning("learners %s missed %d rounds in a row: rounds no longer wait for them until they send "
                        "an update", list(summary.given_up), MAX_MISSED_ROUNDS)
        discarded = too_few(self.strategy, summary.learners) or \
            self.global_model.step(lr, summary.learners, self.args.learners)
        if discarded:
            log.warning("round %d discarded, the model is unchanged: %s (%d learners)", done, discarded, summary.learners)
        stepped = time.perf_counter()
        eval_seconds = self.evaluate(done, metrics) if self.evaluation_due(done) else 0.0
        if done == total:
            checkpoint.save_atomically(self.global_model.model.state_dict(), self.out / "model.pt")
        pushing = time.perf_counter()
        bytes_out = self.push_state(done)
        pushed = time.perf_counter()
        if done == total or self.due(done, self.args.checkpoint_every):
            self.save_checkpoint(done)
        now = time.perf_counter()
        metrics.write({"round": done, "epoch": self.schedule.epoch_of(round_index), "train_loss": summary.loss,
                       "learners": summary.learners, "samples": summary.samples, "lr": lr,
                       "seconds": now - round_started - eval_seconds, "bytes_in": summary.bytes_in,
                       "bytes_out": bytes_out, "gradients_s": updates_in - round_started,
                       "step_s": stepped - updates_in, "push_s": pushed - pushing,
                       **({"participants": sampled} if sampled is not None else {}),
                       **({"discarded": discarded} if discarded else {}),
                       "per_learner": {str(learner): {"samples": samples, "loss": loss}
                                       for learner, (samples, loss) in sorted(summary.per_learner.items())}})
        self.write_evaluations(metrics, final=done == total)
        if done % max(1, total // 10) == 0:
            log.info("round %d/%d (epoch %d): train loss %.4f from %d learners", done, total,
                     self.schedule.epoch_of(round_index), summary.loss, summary.learners)
        return now

    def wait_for_learners(self) -> bool:
        """Wait for the learners to register (a leader without data: until it could settle on their summaries);
        False if stopped first."""
        while self.federation.wait_for_learners():
            if self.data or self.settle_on_learners_data():
                return True
        return False

    def release_learners(self) -> None:
        """The checkpoint is at the final round: save model.pt if missing, and tell the learners it is over."""
        log.info("the checkpoint is at the final round %d: training is complete; telling its learners",
                 self.collector.round)
        if not (self.out / "model.pt").exists():
            checkpoint.save_atomically(self.global_model.model.state_dict(), self.out / "model.pt")
        self.federation.release()

    def run(self) -> int:
        """Serve and train to the end; return the exit status (1: stalled for lack of learners)."""
        server = self.serve()
        metrics = MetricsLog(self.out / "metrics.jsonl", append=bool(self.args.resume), tensorboard=self.args.tensorboard)
        status, total = 0, self.schedule.total_rounds
        try:
            if self.collector.round >= total:
                self.release_learners()
            elif self.wait_for_learners():
                done = self.train_rounds(metrics)
                if done < total:
                    log.info("stopping on request after round %d", done)
                    self.save_checkpoint(done)
                    self.federation.push_state(done, finished=True, stopped=True)
        except Stalled as stalled:
            log.error("%s", stalled)
            self.save_checkpoint(self.collector.round)
            self.federation.push_state(self.collector.round, finished=True, stopped=True)
            status = 1
        finally:
            metrics.close()
            server.stop(grace=2).wait(5)
        records = read_metrics(metrics.path)
        if records:
            plot_metrics(records, self.out / "metrics.png")
        if self.collector.round >= total:
            for source in ("leader", "learners"):
                evaluations = [r for r in records if r.get("source", "leader") == source and "test_accuracy" in r]
                if evaluations:
                    log.info("final test accuracy %.4f (%s); model.pt, metrics.jsonl and metrics.png are in %s",
                             evaluations[-1]["test_accuracy"], "the leader's test split" if source == "leader" else
                             "the learners' held-out images", self.out)
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
