"""The leader's flags, each declared once, as a frozen configuration; the parser, the checks and the resume rule.

A flag's choices, bounds or default that live in a module importing torch (datasets, models, strategies) are
functions here, called only after parsing (or by --help): a wrong flag is refused before torch loads.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federated.common.flags import (
    FRACTION,
    NOT_NEGATIVE,
    POSITIVE,
    Bounds,
    CommandLine,
    Config,
    Lazy,
    Parser,
    Scope,
    bounds_problems,
    build_parser,
    choice_problems,
    option,
    parse,
    refuse,
    resume_values,
    scope_problems,
)
from federated.core.plan import (
    DP_MODES,
    LOCAL_STEPS_PER,
    MAX_CLIENT_LR,
    MAX_CLIENT_MOMENTUM,
    MAX_CLIP_RANGE,
    MAX_COMPRESS_RANK,
    MAX_DELTA_RANDK_RATIO,
    MAX_DP_CLIP,
    MAX_DP_NOISE_MULTIPLIER,
    MAX_LEARNERS,
    MAX_LOCAL_EPOCHS,
    MAX_MU,
    MAX_SEED,
    MAX_WEIGHT_DECAY,
)
from federated.net.guard import IDLE_TIMEOUT_S
from federated.net.rpc import SecurityFlags

# A leader without data takes an epoch's length from its learners' claims, as the median claim (data.py): from 3
# learners on, one liar is outvoted; of 2, the median is the smaller claim, which a liar sets. Below 3 the
# schedule comes from flags (--rounds, and --local-steps for strategies with local steps), never from a claim.
LEAST_TO_OUTVOTE = 3
LEAST_SECURE = 3  # privacy/secagg.py's MIN_LEARNERS (that module loads torch; the flag table must not)
# --norm's default: batch norm, unless the leader's partition skews the labels, where each learner's batch holds
# few classes and batch norm's statistics are the learner's, not the federation's (docs/data.md measures it).
AUTO_NORM = "auto"
LABEL_SKEWED = ("dirichlet", "dirichlet-equal", "classes")
# --norm auto under --dp local: group norm, which normalises each image by itself (DP-SGD needs per-example
# gradients, which batch norm's shared statistics would mix); group-ws and layer-ws are allowed when asked for.
LOCAL_DP_NORM = "group"


def _datasets() -> tuple[str, ...]:
    import utils

    return (*utils.DATASETS, "none")


BATCH_NORMS = ("batch", "renorm")  # the norms of the ResNets that keep running statistics


def _norms() -> tuple[str, ...]:
    import model

    return (AUTO_NORM, *model.NORMS)


def _norm_text() -> str:
    import model

    return (
        f"{AUTO_NORM}: {LOCAL_DP_NORM} with --dp local, {model.SKEWED_NORM} where --partition is "
        f"{' or '.join(LABEL_SKEWED)}, else batch"
    )


def _image_size() -> int:
    import utils

    return utils.IMAGE_SIZE


def _image_sizes() -> Bounds:
    import utils
    from federated.wire.messages import MIN_IMAGE_SIZE

    return Bounds(MIN_IMAGE_SIZE, utils.MAX_IMAGE_SIZE)


def _class_counts() -> Bounds:
    import model

    return Bounds(2, model.MAX_CLASSES)


def _partitions() -> tuple[str, ...]:
    from federated.core import partition

    return partition.SCHEMES


def _partition_reads(scheme: str) -> tuple[str, ...]:
    from federated.core import partition

    return partition.FLAGS[scheme]


def _wire_dtypes() -> tuple[str, ...]:
    from federated.wire import codec

    return tuple(codec.WIRE_DTYPES)


def _codecs() -> tuple[str, ...]:
    from federated.core import compression

    return tuple(compression.CODECS)


def _strategies() -> tuple[str, ...]:
    from federated.core import strategies

    return strategies.names()


def _strategy_reads(name: str) -> tuple[str, ...]:
    from federated.core import strategies

    return strategies.named(name).flags


def _aggregators() -> tuple[str, ...]:
    from federated.core import aggregation

    return aggregation.rules.names()


def _aggregator_reads(name: str) -> tuple[str, ...]:
    from federated.core import aggregation

    return aggregation.rules.named(name).flags


def _image_size_text() -> str:
    return f"{_image_size()}, CIFAR-10's"


def _lr_text() -> str:
    from federated.core.strategies.base import BASE_LR, REFERENCE_BATCH

    return f"{BASE_LR:g} x total batch / {REFERENCE_BATCH}, the linear scaling rule"


def _client_lr_text() -> str:
    from federated.core.strategies.base import BASE_LR, REFERENCE_BATCH

    return f"{BASE_LR:g} x --batch-size / {REFERENCE_BATCH}"


def _local_epochs_text() -> str:
    from federated.core.strategies.base import DEFAULT_LOCAL_EPOCHS

    return f"{DEFAULT_LOCAL_EPOCHS:g}"


def _server_lr_text() -> str:
    """Each local strategy's default server learning rate, those alike together."""
    from federated.core import strategies

    by_text: dict[str, list[str]] = {}
    for name in strategies.names():
        if issubclass(strategy := strategies.named(name), strategies.LocalTraining):
            by_text.setdefault(strategy.default_server_lr_text(), []).append(name)
    return "; ".join(f"{text} for {', '.join(names)}" for text, names in by_text.items())


def _server_momentum_text() -> str:
    from federated.core.strategies.fedavg import DEFAULT_SERVER_MOMENTUM, PUBLISHED_SERVER_MOMENTUM

    return f"{DEFAULT_SERVER_MOMENTUM:g} ({PUBLISHED_SERVER_MOMENTUM:g} with --as-published)"


def _beta1_text() -> str:
    from federated.core.strategies.adaptive import DEFAULT_BETA1, PUBLISHED_BETA1

    return f"{DEFAULT_BETA1:g} ({PUBLISHED_BETA1:g} with --as-published)"


def _mu_text() -> str:
    from federated.core.strategies.fedavg import DEFAULT_MU

    return f"{DEFAULT_MU:g}"


STRATEGY = Scope("strategy", _strategy_reads)
AGGREGATOR = Scope("aggregator", _aggregator_reads)
PARTITION = Scope("partition", _partition_reads)
WITH_DATA = Scope("dataset", lambda dataset: () if dataset == "none" else ("partition",))

GROUPS = {
    "learners": "",
    "data": "What the leader trains on: a --dataset it splits among learners (partition.json and partition.png in "
    "--out show each learner's labels), or none: learners bring their own.",
    "model": "",
    "compression": "What learners' updates travel as (docs/compression.md): with error feedback for the biased "
    "codecs (what a round's message leaves out is kept and added to later rounds' updates until sent: over about "
    "1/ratio rounds for topk and randk); BatchNorm statistics and small "
    "tensors travel uncompressed. The leader's states travel as --wire-dtype says, or with --compress-down as "
    "compressed deltas.",
    "strategy": "FedSGD (the default) takes one gradient per learner per round and steps with --lr, --momentum and "
    "--weight-decay on the leader. Every other strategy trains on each learner for --local-epochs or "
    "--local-steps with the client flags, and the leader applies the aggregate change with a server "
    "optimizer. Flags of another strategy or aggregator than the chosen one are refused.",
    "privacy": "What the leader may learn from learners' updates: with --secure-aggregation only each round's sum "
    "(docs/secure-aggregation.md); with --dp, a differential-privacy guarantee whose spent epsilon every round "
    "records (docs/differential-privacy.md).",
    "schedule": "",
    "timeouts": "Every wait is bounded; these say how long.",
    "output": "",
    "security": "",
}

EXAMPLES = """examples:
  python leader.py --dataset synthetic --learners 2 --rounds 200        a quick run on made-up images
  python leader.py --learners 4 --strategy fedavg --local-epochs 1      FedAvg on CIFAR-10 shards
  python leader.py --dataset none --num-classes 10 --learners 2         learners bring their own data
  python leader.py --resume runs/latest                                 continue a stopped run
  python leader.py --list-models                                        the architectures --model takes

docs: docs/reference/cli.md (every flag), docs/getting-started.md (several machines)"""


@dataclass(frozen=True)
class LeaderConfig(SecurityFlags, Config):
    """Every flag of leader.py (see GROUPS for their sections)."""

    learners: int = option(
        2, "learners to wait for and train with", group="learners", bounds=Bounds(1), trajectory=True
    )
    min_learners: int | None = option(
        None,
        "updates needed to close a round after --round-timeout",
        group="learners",
        bounds=Bounds(1),
        default_text="1; for a robust --aggregator, as many as it needs to outvote a hostile update; 3 under "
        "--secure-aggregation",
    )
    learners_per_round: int = option(
        0,
        "train with this many of the active learners each round, sampled with --seed (0: all); the others stay "
        "registered and idle",
        group="learners",
        bounds=NOT_NEGATIVE,
        trajectory=True,
    )
    host: str = option("0.0.0.0", "address to listen on", group="learners")
    port: int = option(50051, "port to listen on", group="learners", bounds=Bounds(0, 65535))

    dataset: str = option(
        "cifar10",
        "training data to shard among learners, and the test split to evaluate on; "
        "none: the leader holds no data, learners train on their own (learner.py --dataset) and "
        "evaluate on their own held-out images",
        group="data",
        choices=_datasets,
        trajectory=True,
    )
    data_dir: str = option(
        "data", "where cifar10 lives (or is downloaded to), or the imagefolder root", group="data", metavar="DIR"
    )
    num_classes: int | None = option(
        None,
        "classes the model tells apart (needed with --dataset none)",
        group="data",
        bounds=_class_counts,
        trajectory=True,
        default_text="the dataset's",
    )
    image_size: int = option(
        Lazy(_image_size),
        "images are resized to this square size, on the leader and on learners with their own data",
        group="data",
        bounds=_image_sizes,
        trajectory=True,
        default_text=_image_size_text,
    )
    partition: str = option(
        "iid",
        "how the leader splits its --dataset: iid, equal random shards; dirichlet, each "
        "class spread over learners in Dirichlet(--alpha) proportions (Yurochkin et al. 2019); "
        "dirichlet-equal, equal shards whose class mixes are drawn from Dirichlet(--alpha per class) "
        "(Hsu et al. 2019's draw; for hundreds of learners, where dirichlet finds no split); classes, "
        "--classes-per-learner classes each (McMahan et al. 2017); quantity, balanced labels "
        "and Dirichlet(--alpha) sizes",
        group="data",
        choices=_partitions,
        scope=WITH_DATA,
        trajectory=True,
    )
    alpha: float = option(
        0.5,
        "Dirichlet concentration (small: more skew)",
        group="data",
        bounds=POSITIVE,
        scope=PARTITION,
        trajectory=True,
    )
    classes_per_learner: int = option(
        2, "how many classes each learner holds", group="data", bounds=Bounds(1), scope=PARTITION, trajectory=True
    )

    model: str = option(
        "resnet20",
        "resnet20 (0.27 M parameters), resnet18 (11.2 M, CIFAR stem), or "
        "torchvision:NAME, a torchvision classifier built from its name alone, e.g. "
        "torchvision:mobilenet_v3_small (--list-models lists them)",
        group="model",
        metavar="NAME",
        trajectory=True,
    )
    norm: str = option(
        AUTO_NORM,
        "normalisation layers of resnet20 and resnet18: batch (BatchNorm); renorm (batch renormalisation, "
        "Ioffe 2017: the batch's statistics corrected towards the federation's running ones, which a "
        "learner with skewed labels trains with); group (GroupNorm, 2 groups); group-ws and layer-ws "
        "(GroupNorm of 8 and 1 groups, convolutions with weight standardisation, Qiao et al. 2019); auto "
        "picks by --partition (docs/data.md measures them all); torchvision's models keep their own",
        group="model",
        choices=_norms,
        trajectory=True,
        default_text=_norm_text,
        predated="batch",  # runs before --norm existed had batch norm
    )
    init: str | None = option(
        None,
        "start the global model from this state_dict file (e.g. pretrained weights, or "
        "an earlier run's model.pt); a classifier of another shape starts afresh",
        group="model",
        metavar="PATH",
        default_text="a fresh initialisation with --seed",
    )
    wire_dtype: str = option(
        "float32",
        "precision of weights and gradients on the wire (float16 and bfloat16 halve "
        "the bytes; BatchNorm statistics always travel in float32)",
        group="model",
        choices=_wire_dtypes,
        trajectory=True,
    )
    compress: str = option(
        "none",
        "the codec of learners' updates: fp16/bf16 (casts), int8/int4 (unbiased stochastic quantisation), topk/"
        "randk (the --compress-ratio largest or random values), sign (scaled signs), powersgd (rank "
        "--compress-rank factors), or none; with --secure-aggregation only int8 and int4 (the masked integers: "
        "docs/compression.md)",
        group="compression",
        choices=_codecs,
        trajectory=True,
    )
    compress_down: str = option(
        "none",
        "the codec of the states the leader pushes: each goes as a compressed delta against the replica every "
        "learner in step holds (the full state to the others), with --compress-ratio and --compress-rank; none "
        "sends full states. Needs --wire-dtype float32",
        group="compression",
        choices=_codecs,
        trajectory=True,
    )
    compress_ratio: float = option(
        0.01,
        "the fraction of each compressed tensor's values that topk and randk send, up (--compress) and down "
        "(--compress-down; randk there at most 0.1: learners refuse more)",
        group="compression",
        bounds=Bounds(0, 1, low_open=True),
        trajectory=True,
    )
    compress_rank: int = option(
        2,
        "the rank of powersgd's factors",
        group="compression",
        bounds=Bounds(1, MAX_COMPRESS_RANK),
        trajectory=True,
    )

    strategy: str = option(
        "fedsgd",
        "the federated algorithm: fedsgd (the original article's); fedavg (McMahan et "
        "al. 2017); fedavgm, with server momentum (Hsu et al. 2019); fedprox, a proximal term "
        "(Li et al. 2020); fedadagrad, fedadam, fedyogi, adaptive server optimizers (Reddi et al. "
        "2021); scaffold, control variates (Karimireddy et al. 2020)",
        group="strategy",
        choices=_strategies,
        trajectory=True,
    )
    lr: float | None = option(
        None,
        "FedSGD's peak learning rate",
        group="strategy",
        bounds=POSITIVE,
        scope=STRATEGY,
        trajectory=True,
        default_text=_lr_text,
    )
    momentum: float = option(
        0.9, "FedSGD's momentum on the leader", group="strategy", bounds=FRACTION, scope=STRATEGY, trajectory=True
    )
    weight_decay: float = option(
        5e-4,
        "L2 penalty on weights (not on biases or normalisation): on the leader's step "
        "for FedSGD, on the learners' steps for the others",
        group="strategy",
        bounds=NOT_NEGATIVE,
        trajectory=True,
    )
    local_epochs: float | None = option(
        None,
        "passes over the data a round: over the typical shard, the same local steps for every learner (or, "
        "with --local-steps-per learner, over each learner's own shard)",
        group="strategy",
        bounds=Bounds(0, MAX_LOCAL_EPOCHS, low_open=True),
        scope=STRATEGY,
        trajectory=True,
        default_text=_local_epochs_text,
    )
    local_steps: int | None = option(
        None,
        "SGD steps each learner takes per round (instead of --local-epochs)",
        group="strategy",
        bounds=Bounds(1),
        scope=STRATEGY,
        trajectory=True,
    )
    local_steps_per: str = option(
        "federation",
        "federation: every learner takes the same local steps, --local-epochs passes over the typical shard "
        "(the mean of the leader's shards, or the median learner's), and updates weigh alike; learner: "
        "--local-epochs passes over each learner's own shard (n_k / --batch-size steps for n_k images) and its "
        "update weighs n_k, as in McMahan et al. 2017 (the round waits for the largest shard)",
        group="strategy",
        choices=LOCAL_STEPS_PER,
        scope=STRATEGY,
        trajectory=True,
    )
    client_lr: float | None = option(
        None,
        "peak client learning rate, on the --warmup-epochs and cosine schedule by round",
        group="strategy",
        bounds=Bounds(0, MAX_CLIENT_LR, low_open=True),
        scope=STRATEGY,
        trajectory=True,
        default_text=_client_lr_text,
    )
    client_momentum: float = option(
        0.9,
        "client SGD momentum (reset every round)",
        group="strategy",
        bounds=Bounds(0, MAX_CLIENT_MOMENTUM),
        scope=STRATEGY,
        trajectory=True,
    )
    server_lr: float | None = option(
        None,
        "server learning rate",
        group="strategy",
        bounds=POSITIVE,
        scope=STRATEGY,
        trajectory=True,
        default_text=_server_lr_text,
    )
    server_momentum: float | None = option(
        None,
        "server momentum",
        group="strategy",
        bounds=FRACTION,
        scope=STRATEGY,
        trajectory=True,
        default_text=_server_momentum_text,
    )
    beta1: float | None = option(
        None,
        "adaptive server optimizers' first-moment decay",
        group="strategy",
        bounds=FRACTION,
        scope=STRATEGY,
        trajectory=True,
        default_text=_beta1_text,
    )
    beta2: float = option(
        0.99, "second-moment decay", group="strategy", bounds=FRACTION, scope=STRATEGY, trajectory=True
    )
    no_bias_correction: bool = option(
        False,
        "adaptive server optimizers step without Adam's bias correction (Kingma and Ba 2015) of their moments, as "
        "Reddi et al. 2021 wrote them: the first steps are then (1 - beta1) / sqrt(1 - beta2) times the corrected "
        "ones (FedAdam's and FedYogi's: 5 at the defaults). Implied by --as-published. Corrected, the first step is "
        "lr g / (sqrt(g^2 + 99 tau^2) + tau) per coordinate for FedAdam (FedYogi's about the same, FedAdagrad's "
        "g^2 + tau^2): the server lr only where |g| is well above 10 tau",
        group="strategy",
        scope=STRATEGY,
        trajectory=True,
        predated=True,
    )
    as_published: bool = option(
        False,
        "the server optimizers' defaults as their papers published them, tuned over hundreds of rounds: FedAvgM's "
        "server momentum 0.9 (Hsu et al. 2019); FedAdagrad's, FedAdam's and FedYogi's --beta1 0.9 and server "
        "learning rate 0.1, 0.01 and 0.01, and no bias correction (their Algorithm 2, Reddi et al. 2021); for the "
        "bias-corrected step at those values, give --beta1 and --server-lr without --as-published. Without it, "
        "defaults measured to train in 20 rounds (docs/strategies.md)",
        group="strategy",
        scope=STRATEGY,
        trajectory=True,
        predated=True,
    )
    tau: float = option(
        1e-3,
        "adaptive server optimizers' adaptivity (epsilon)",
        group="strategy",
        bounds=POSITIVE,
        scope=STRATEGY,
        trajectory=True,
    )
    mu: float | None = option(
        None,
        "FedProx's proximal weight",
        group="strategy",
        bounds=Bounds(0, MAX_MU),
        scope=STRATEGY,
        trajectory=True,
        default_text=_mu_text,
    )
    aggregator: str = option(
        "mean",
        "how a round's updates combine: the sample-weighted mean (memory: one model), "
        "or a robust rule that keeps every update of the round (memory: one model per learner "
        "in the round)",
        group="strategy",
        choices=_aggregators,
        trajectory=True,
    )
    trim: float = option(
        0.2,
        "fraction of the largest and of the smallest values dropped per coordinate",
        group="strategy",
        bounds=Bounds(0, 0.5, high_open=True),
        scope=AGGREGATOR,
        trajectory=True,
    )
    byzantine: int = option(
        1,
        "how many hostile learners to withstand (needs at least 2F + 3 learners in a round)",
        group="strategy",
        bounds=NOT_NEGATIVE,
        scope=AGGREGATOR,
        trajectory=True,
    )
    clip_norm: float = option(
        0.0,
        "clip each update's model part to this L2 norm before aggregation (0: no clipping)",
        group="strategy",
        bounds=NOT_NEGATIVE,
        trajectory=True,
    )

    secure_aggregation: bool = option(
        False,
        "the leader learns only each round's sum of updates, never one learner's (SecAgg: pairwise and self "
        "masks, Shamir-shared secrets, learners that drop mid-round recovered); needs 3 or more learners a round",
        group="privacy",
        trajectory=True,
    )
    secagg_threshold: float = option(
        0.5,
        "a secure epoch's seeds are reconstructed from the shares of more than this fraction of its learners; a "
        "round needs more survivors than that (fewer: discarded, never leaked)",
        group="privacy",
        bounds=Bounds(0.5, 1, high_open=True),
        trajectory=True,
    )
    secagg_clip_range: float = option(
        64.0,
        "a secure round clips each value of an update (gradients, BatchNorm statistics, SCAFFOLD's controls) to "
        "[-R, R] and quantises it to 32 bits; the default covers the running variances FedAvg sends (docs/"
        "secure-aggregation.md measures them: python -m federated.tools.update_range). With --compress int8 or "
        "int4, to steps of R/127 or R/7 (BatchNorm statistics to at least 64, at 32 bits): fit R to the gradients",
        group="privacy",
        bounds=Bounds(0, MAX_CLIP_RANGE, low_open=True),
        trajectory=True,
    )
    dp: str = option(
        "none",
        "differential privacy: central (the leader clips each update and adds Gaussian noise to their mean), "
        "distributed (with --secure-aggregation: each learner clips and adds its share of the noise, so the "
        "leader never sees an un-noised sum), local (DP-SGD on each learner with Opacus: each example's gradient "
        "clipped and noised), or none",
        group="privacy",
        choices=DP_MODES,
        trajectory=True,
    )
    dp_noise_multiplier: float = option(
        1.0,
        "the noise's standard deviation as a multiple of --dp-clip",
        group="privacy",
        bounds=Bounds(0, MAX_DP_NOISE_MULTIPLIER, low_open=True),
        trajectory=True,
    )
    dp_clip: float = option(
        1.0,
        "the L2 norm each update (central, distributed) or each example's gradient (local) is clipped to",
        group="privacy",
        bounds=Bounds(0, MAX_DP_CLIP, low_open=True),
        trajectory=True,
    )
    dp_clip_quantile: float = option(
        0.0,
        "central: adapt --dp-clip each round towards this quantile of the updates' norms (Andrew et al. 2021; "
        "0: the clip stays fixed)",
        group="privacy",
        bounds=Bounds(0, 1, high_open=True),
        trajectory=True,
    )
    dp_delta: float = option(
        1e-5,
        "the delta at which the spent epsilon is reported",
        group="privacy",
        bounds=Bounds(0, 1, low_open=True, high_open=True),
        trajectory=True,
    )
    dp_secret_sampling: bool = option(
        False,
        "central with --learners-per-round: charge each round at the rate it drew its learners from the "
        "candidates (privacy amplification by sampling), claiming that whoever sees the released models learns "
        "nothing of the draw; left out, every round is charged as if every learner took part (learners receive "
        "the participant list, and --seed seeds the draw)",
        group="privacy",
    )
    dp_target_epsilon: float = option(
        0.0,
        "end the run, checkpointed, before the spent epsilon would exceed this (0: no limit; a resume keeps its "
        "checkpoint's unless given another)",
        group="privacy",
        bounds=NOT_NEGATIVE,
    )

    epochs: float = option(
        30.0,
        "passes over each learner's shard: the same compute whatever the strategy (with "
        "--learners-per-round each learner does its share of it)",
        group="schedule",
        bounds=POSITIVE,
        trajectory=True,
    )
    rounds: int | None = option(
        None,
        "number of rounds; overrides --epochs",
        group="schedule",
        bounds=Bounds(1),
        trajectory=True,
        default_text="from --epochs",
    )
    batch_size: int = option(
        64,
        "batch size per learner per step (FedSGD: one step per round)",
        group="schedule",
        bounds=Bounds(1),
        trajectory=True,
    )
    warmup_epochs: float = option(
        1.0,
        "linear learning-rate warm-up before cosine decay (at most a fifth of "
        "training); the schedule drives --lr, or --client-lr round by round",
        group="schedule",
        bounds=NOT_NEGATIVE,
        trajectory=True,
    )
    seed: int = option(
        0,
        "seed for the model, the shards, sampling and the learners' batches",
        group="schedule",
        bounds=Bounds(0, MAX_SEED),
        trajectory=True,
    )
    eval_every: int = option(
        0,
        "evaluate every N rounds (0: only at epoch ends and the end)",
        group="schedule",
        bounds=NOT_NEGATIVE,
        metavar="N",
    )

    round_timeout: float = option(
        120.0,
        "seconds to wait for all learners' updates before closing a round with those that arrived",
        group="timeouts",
        bounds=POSITIVE,
        metavar="S",
    )
    register_timeout: float = option(
        600.0,
        "seconds to wait for learners to register, at the start and whenever too few are left to close a round",
        group="timeouts",
        bounds=POSITIVE,
        metavar="S",
    )
    sync_timeout: float = option(
        30.0,
        "seconds a learner may take to accept StartTraining or a model state, or "
        "stay silent to health checks, before it is dropped",
        group="timeouts",
        bounds=POSITIVE,
        metavar="S",
    )
    rejoin_grace: float = option(
        30.0,
        "seconds a dropped learner's slot is kept for it to register again before a "
        "new learner may take it (none when the leader finds it gone)",
        group="timeouts",
        bounds=NOT_NEGATIVE,
        metavar="S",
    )
    idle_timeout: float = option(
        IDLE_TIMEOUT_S,
        "seconds a caller may send or read nothing (or take to send a whole update) before its call is cancelled",
        group="timeouts",
        bounds=POSITIVE,
        metavar="S",
    )

    out: str | None = option(
        None,
        "directory for model.pt, checkpoint.pt, metrics.jsonl and metrics.png; an "
        "earlier run's files there are moved aside",
        group="output",
        metavar="DIR",
        default_text="the --resume DIR, else runs/latest",
    )
    resume: str | None = option(
        None,
        "continue from DIR/checkpoint.pt with the training flags it was started with (they may be left out)",
        group="output",
        metavar="DIR",
    )
    checkpoint_every: int = option(
        50,
        "write checkpoint.pt every N rounds, at each epoch end and on stop (0: only those)",
        group="output",
        bounds=NOT_NEGATIVE,
        metavar="N",
    )
    tensorboard: str | None = option(
        None, "also write every metric as TensorBoard events in DIR", group="output", metavar="DIR"
    )
    threads: int = option(
        0,
        "torch threads for evaluation (0: all cores); steps use one",
        group="output",
        bounds=NOT_NEGATIVE,
        metavar="N",
    )
    verbose: bool = option(False, "debug logging", group="output")

    @property
    def output_dir(self) -> Path:
        return Path(self.out or self.resume or "runs/latest")

    @property
    def model_norm(self) -> str:
        """The norm the model is built with: --norm, with auto resolved (_norm_text says how)."""
        import model

        if self.norm != AUTO_NORM:
            return self.norm
        if self.dp == "local" and self.model in model.ARCHITECTURES:
            return LOCAL_DP_NORM
        skewed = self.dataset != "none" and self.partition in LABEL_SKEWED and self.model in model.ARCHITECTURES
        return model.SKEWED_NORM if skewed else "batch"


def _list_models() -> str:
    import model

    return "\n".join(model.architectures())


LISTINGS = {"--list-models": ("list the architectures --model takes, and exit", _list_models)}


def parser() -> Parser:
    """The leader's argument parser."""
    return build_parser(
        LeaderConfig,
        "Federated learning leader: serves LeaderService, waits for --learners "
        "learners, then trains the global model with FedSGD (one synchronous gradient step per "
        "round) or another --strategy.",
        EXAMPLES,
        prog="leader.py",
        groups=GROUPS,
        role="leader",
        listings=LISTINGS,
    )


def command_line(argv: Sequence[str] | None = None) -> CommandLine:
    """The flags argv gives, each converted and within its bounds (no torch loaded yet); exits on a bad one."""
    return parse(parser(), argv)


def configure(given: CommandLine, saved: dict[str, Any] | None = None) -> LeaderConfig:
    """The run's configuration: over the defaults, a resumed run's checkpoint flags (saved), then what the
    command line gave; SystemExit saying what to change when the result makes no sense."""
    values, changed = dict(given.values), given.given
    if saved is not None:  # (refusals of a resume exit 1, as they always did; those of a new run 2, as argparse's)
        if values.get("norm") == AUTO_NORM:  # a checkpoint records the norm auto picked: repeating auto keeps it
            del values["norm"]
        values, conflicts = resume_values(LeaderConfig, values, saved)
        if conflicts:
            refuse(
                "leader.py",
                [
                    f"--resume {given.values['resume']}: {', '.join(conflicts)}; a resumed run keeps the "
                    "flags it was started with: leave these out, or start a new run with another --out"
                ],
                status=1,
            )
        changed = frozenset(name for name in changed if name not in saved or saved[name] != values[name])
    config = LeaderConfig(**values)
    problems = choice_problems(config) or [*scope_problems(config, changed), *run_problems(config, saved)]
    if problems:
        where = f"--resume {config.resume}: " if saved is not None else ""
        refuse("leader.py", [where + problem for problem in problems], status=1 if saved is not None else 2)
    return config


def run_problems(config: LeaderConfig, saved: dict[str, Any] | None) -> list[str]:
    """What is wrong with flags together (each flag's own bounds are checked as it is parsed)."""
    from federated.core import aggregation, strategies

    strategy, rule = strategies.named(config.strategy), aggregation.rules.named(config.aggregator)
    per_round = config.learners_per_round or config.learners
    problems = [*bounds_problems(config), *strategy.problems(config), *rule.problems(config)]
    if config.min_learners is not None and config.min_learners > config.learners:
        problems.append(
            f"--min-learners {config.min_learners} exceeds --learners {config.learners}"
            + (" (the checkpoint's)" if saved is not None else "")
        )
    if config.learners_per_round > config.learners:
        problems.append("--learners-per-round exceeds --learners")
    if config.learners_per_round and config.learners > MAX_LEARNERS:
        problems.append(f"learners accept sampling among at most {MAX_LEARNERS} learners")
    if strategy.local and config.weight_decay > MAX_WEIGHT_DECAY:
        problems.append(f"learners accept --weight-decay up to {MAX_WEIGHT_DECAY:g}")
    if (
        config.learners_per_round
        and config.min_learners is not None
        and config.min_learners > config.learners_per_round
    ):
        problems.append("--min-learners exceeds --learners-per-round")
    needed, least = minimum_updates(config), min_learners(config)
    if min(per_round, least) < needed:
        problems.append(
            f"{config.aggregator} outvotes a hostile learner with at least {needed} updates in a round; "
            f"the run has {per_round} learners a round and --min-learners {least}"
        )
    problems += secure_problems(config, rule.keeps_updates, per_round)
    if config.dataset == "none" and config.num_classes is None:
        problems.append("--dataset none needs --num-classes (the leader has no data to count them in)")
    if config.dataset == "none" and saved is None and config.learners < LEAST_TO_OUTVOTE:
        schedule = {"--rounds": config.rounds, **({"--local-steps": config.local_steps} if strategy.local else {})}
        if missing := [flag for flag, value in schedule.items() if value is None]:
            problems.append(
                f"--dataset none with fewer than {LEAST_TO_OUTVOTE} learners needs {' and '.join(missing)}: the "
                "leader would take the epoch from its learners' claims, and of two the smaller claim, a liar's, "
                "would set it"
            )
    if saved is not None and config.out and Path(config.out).resolve() != Path(config.resume or "").resolve():
        problems.append(f"a resumed run continues in {config.resume}: leave out --out")
    problems += compression_problems(config)
    return problems + model_problems(config) + dp_problems(config) + local_dp_problems(config)


def compression_problems(config: LeaderConfig) -> list[str]:
    """What --compress and --compress-down cannot be combined with, and why (docs/compression.md): the
    downlink's replica is exact float32 on both sides, so no other --wire-dtype; and what secure aggregation takes
    (secure_compression_problems). (Robust aggregators, --clip-norm and --dp central decode each update first;
    --dp local compresses what DP-SGD noised.)"""
    problems = secure_compression_problems(config)
    if config.compress_down != "none" and config.wire_dtype != "float32":
        problems.append(
            f"--compress-down {config.compress_down} with --wire-dtype {config.wire_dtype}: the codec sets the "
            "precision of the states going down, and the replica learners hold must be exact on both sides; "
            "leave out --wire-dtype (or --compress-down)"
        )
    if config.compress_down == "randk" and config.compress_ratio > MAX_DELTA_RANDK_RATIO:
        problems.append(
            f"--compress-down randk with --compress-ratio {config.compress_ratio:g}: learners refuse a random-k "
            f"delta above {MAX_DELTA_RANDK_RATIO:g} (drawing its positions takes a learner a microsecond each); "
            f"lower --compress-ratio to {MAX_DELTA_RANDK_RATIO:g} or less, or pick another --compress-down"
        )
    return problems


def secure_compression_problems(config: LeaderConfig) -> list[str]:
    """What --compress cannot be under --secure-aggregation: masks sum integers, which only int8 and int4 send
    (levels of the shared clip range), each in the narrowest ring that holds the round's sum; not with distributed
    DP, nor in a ring as wide as a finer codec's."""
    from federated.core import compression
    from federated.privacy import secagg

    if config.compress == "none" or not config.secure_aggregation:
        return []
    if config.compress not in compression.QUANTISED:
        return [
            f"--compress {config.compress} under --secure-aggregation: masks sum integers on a scale all learners "
            "share, and topk, randk and powersgd send per-learner indices or factors, sign a per-learner scale, "
            "fp16 and bf16 floats (which cannot be masked); use int8 or int4 (levels of --secagg-clip-range), or "
            "leave out --compress"
        ]
    if config.dp == "distributed":
        return [
            f"--compress {config.compress} with --dp distributed: the noise is calibrated to the clipped update, "
            "and rounding each value to a few levels adds up to one level per value to a learner's update, which it "
            "is not calibrated for; leave out --compress"
        ]
    summands, levels = config.learners_per_round or config.learners, compression.QUANTISED[config.compress]
    bits = {
        name: secagg.Quantisation(1.0, 1.0, summands, levels=most).bits for name, most in compression.QUANTISED.items()
    }
    # the finer codecs (more levels, and none's full scale): the one in the narrowest ring
    width, finer = min(
        [(bits[name], name) for name, most in compression.QUANTISED.items() if most > levels] + [(secagg.BITS, "none")]
    )
    if bits[config.compress] < width:
        return []
    return [
        f"--compress {config.compress} under --secure-aggregation with {summands} learners a round: their sum "
        f"needs a {bits[config.compress]}-bit ring, as wide as --compress {finer}'s, which keeps more of each value "
        f"for the same bytes; use --compress {finer}"
    ]


def secure_compression_caveats(config: LeaderConfig) -> list[str]:
    """What int8/int4 under secure aggregation keep of each value where the flags leave little, for the leader to
    warn of at its start (docs/compression.md): allowed (the rounding is unbiased, and averages out over a round's
    learners), but rarely what one wants."""
    from federated.core import compression
    from federated.leader.data import MAX_SHARD_FACTOR
    from federated.privacy import secagg

    levels = compression.QUANTISED.get(config.compress, 0) if config.secure_aggregation else 0
    if not levels:
        return []
    caveats = []
    if config.secagg_clip_range >= secagg.WIDE_RANGE:
        caveats.append(
            f"--compress {config.compress} under --secure-aggregation with --secagg-clip-range "
            f"{config.secagg_clip_range:g}: each value is rounded to steps of R/{levels} = "
            f"{config.secagg_clip_range / levels:.3g}, coarser than most gradients (the range's default covers the "
            "running variances, which keep 32 bits here), so the run barely learns; measure the gradients' range "
            "with python -m federated.tools.update_range (the run's flags) and set --secagg-clip-range to it"
        )
    if config.local_steps_per == "learner":
        caveats.append(
            f"--compress {config.compress} under --secure-aggregation with --local-steps-per learner: an update "
            f"weighs its samples against a unit of {MAX_SHARD_FACTOR} typical learners', so a typical learner keeps "
            f"{levels}/{MAX_SHARD_FACTOR} = {levels / MAX_SHARD_FACTOR:g} levels of each value, a smaller one fewer"
            + ("; --compress int8 keeps 127/4 = 31.75" if config.compress == "int4" else "")
        )
    return caveats


def compression_caveat(config: LeaderConfig) -> str | None:
    """What a robust aggregator does with a sparse codec's updates (docs/compression.md), for the leader to warn
    of at its start; None when nothing is to say. Allowed, but rarely what one wants."""
    from federated.core import compression

    if config.compress not in compression.SPARSE or config.aggregator == "mean":
        return None
    return (
        f"--aggregator {config.aggregator} with --compress {config.compress}: each learner sends its own "
        f"{config.compress_ratio:g} of the positions, zero elsewhere, so a coordinate-wise median (or trimmed mean) "
        "is zero wherever fewer than half the learners sent that index, and Krum's distances are dominated by which "
        "indices each learner picked"
    )


def dp_problems(config: LeaderConfig) -> list[str]:
    """What --dp cannot be combined with, and why (docs/differential-privacy.md)."""
    import model
    from federated.core import strategies

    if config.dp in ("none", "local") and config.dp_target_epsilon:
        return [
            "--dp-target-epsilon needs --dp central or distributed"
            + (": under --dp local each learner stops at its own --max-epsilon" if config.dp == "local" else "")
        ]
    if config.dp_secret_sampling and (config.dp != "central" or not config.learners_per_round):
        return [
            "--dp-secret-sampling needs --dp central and --learners-per-round: under --dp distributed the leader, "
            "the adversary, draws the sample itself"
        ]
    if config.dp == "none":
        return []
    problems = []
    if config.aggregator != "mean":
        problems.append(
            f"--dp needs --aggregator mean: the noise is calibrated to a sum of clipped updates, and "
            f"{config.aggregator}'s result is none (it can follow one learner's update)"
        )
    if config.clip_norm:
        problems.append("--dp clips each update to --dp-clip: leave out --clip-norm")
    if config.dp == "central" and config.secure_aggregation:
        problems.append(
            "--dp central clips single updates on the leader, which --secure-aggregation hides from it: use "
            "--dp distributed (each learner clips and adds its share of the noise)"
        )
    if config.dp == "distributed" and not config.secure_aggregation:
        problems.append(
            "--dp distributed needs --secure-aggregation: without it the leader sees each update with only its "
            "learner's share of the noise; use --dp central for a leader you trust"
        )
    if config.dp_clip_quantile and config.dp != "central":
        problems.append("--dp-clip-quantile adapts the clip the leader applies: only with --dp central")
    if config.dp != "local" and strategies.named(config.strategy).controls:
        problems.append(
            f"--dp {config.dp} noises the model part: {config.strategy}'s control variates would reach the leader "
            "without noise"
        )
    if config.dp != "local" and config.model in model.ARCHITECTURES and config.model_norm in BATCH_NORMS:
        problems.append(
            f"--dp {config.dp}: --norm {config.model_norm} keeps running statistics, which would reach the leader "
            "without noise; use --norm group"
        )
    return problems


def secure_problems(config: LeaderConfig, robust: bool, per_round: int) -> list[str]:
    """What --secure-aggregation rules out: the leader sees only each round's sum, never one update."""
    if not config.secure_aggregation:
        return []
    problems = []
    if robust:
        problems.append(
            f"--aggregator {config.aggregator} weighs each update against the others, and under "
            "--secure-aggregation the leader never sees a single update, only the round's sum: use --aggregator "
            "mean (learners' values are clipped to --secagg-clip-range instead)"
        )
    if config.clip_norm:
        problems.append(
            "--clip-norm clips each update at the leader, which under --secure-aggregation never sees one, only the "
            "round's sum: leave it out (learners' values are clipped to --secagg-clip-range instead)"
        )
    if per_round < LEAST_SECURE:
        problems.append(
            f"--secure-aggregation needs at least {LEAST_SECURE} learners a round (with two, each learns the "
            f"other's update from the sum); the run has {per_round}"
        )
    if config.min_learners is not None and config.min_learners < LEAST_SECURE:
        problems.append(
            f"--min-learners {config.min_learners} under --secure-aggregation: a round with fewer than "
            f"{LEAST_SECURE} masked inputs is discarded (its sum would tell one learner's update), so rounds wait "
            f"for at least {LEAST_SECURE}"
        )
    return problems


def model_problems(config: LeaderConfig) -> list[str]:
    import model

    if config.model not in model.architectures():
        return [
            f"unknown --model {config.model[:40]!r}; choose resnet20, resnet18 or torchvision:NAME "
            "(leader.py --list-models lists them)"
        ]
    return []


def local_dp_problems(config: LeaderConfig) -> list[str]:
    """--dp local trains with per-example gradients: a model that mixes a batch's examples (BatchNorm) cannot."""
    if config.dp != "local" or model_problems(config):
        return []
    import torch

    import model
    from federated.privacy.local import model_problem  # (Opacus: imported only for --dp local)

    try:
        with torch.device("meta"):  # (its layers, without memory)
            problem = model_problem(model.build_model(config.model, config.num_classes or 1, config.model_norm))
    except ValueError:  # (the model cannot be built with this --norm: said where it is built)
        return []
    if problem is None:
        return []
    advice = (
        f"--norm {LOCAL_DP_NORM}" if config.model in model.ARCHITECTURES else f"resnet20 with --norm {LOCAL_DP_NORM}"
    )
    return [f"--dp local cannot train --model {config.model} with --norm {config.model_norm}: {problem}; use {advice}"]


def min_learners(config: LeaderConfig) -> int:
    """--min-learners, or its default: 1, or for a robust aggregator as many updates as it needs to outvote a
    hostile one, or under --secure-aggregation the 3 a secure round needs (at most a round's learners)."""
    if config.min_learners is not None:
        return config.min_learners
    needed = minimum_updates(config)
    if config.secure_aggregation:  # fewer masked inputs than a secure round needs would only be discarded
        needed = LEAST_SECURE
    return 1 if needed == math.inf else int(min(needed, config.learners_per_round or config.learners))


def minimum_updates(config: LeaderConfig) -> float:
    """The fewest updates with which the run's aggregation rule outvotes a hostile one."""
    from federated.core import aggregation

    return aggregation.rules.named(config.aggregator).from_config(config).minimum_updates()
