"""The registry: every figure once, with its group (the module that measures it), whether it is a headline
figure (`make bench`), what it compares, its target and its settings; and the helper subcommands.

Figures and helpers name their module and function as text, imported when they run: a helper process loads
only its own group, and the command line, the printed table and the page load none."""

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def learner_counts(text: str) -> list[int]:
    """--scale's value: learner counts separated by commas."""
    return [int(count) for count in text.split(",")]


def registered_per_round(text: str) -> list[tuple[int, int]]:
    """--virtual-scale's value: REGISTERED:PER_ROUND pairs separated by commas."""
    pairs = (pair.split(":") for pair in text.split(","))
    return [(int(registered), int(per_round)) for registered, per_round in pairs]


def names(text: str) -> list[str]:
    """A list of names separated by commas (--dp-modes, --dp-datasets)."""
    return text.split(",")


@dataclass(frozen=True)
class Setting:
    """A command-line flag that sets a parameter of one or more figures."""

    flag: str
    type: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


REPEATS = Setting("--repeats", int, 5, "repetitions of each timed transfer")
ROUNDS = Setting("--rounds", int, 20, "FedSGD rounds of each of the round-overhead runs")
SCALE = Setting("--scale", learner_counts, "1,4,16,64", "learner counts for leader_scale")
VIRTUAL_SCALE = Setting(
    "--virtual-scale",
    registered_per_round,
    "100:10,300:32,1000:100",
    "REGISTERED:PER_ROUND learner counts of virtual_scale's rows (beside its goal row, 1000:20)",
)
VIRTUAL_IMAGE_SIZE = Setting(
    "--virtual-image-size", int, 8, "image size of virtual_scale's runs (a learner's compute grows with its square)"
)
STRATEGY_EPOCHS = Setting("--strategy-epochs", float, 3, "epochs of each run of the strategies table")
NON_IID_EPOCHS = Setting(
    "--non-iid-epochs", float, 50, "epochs of each run of the non_iid table (the local strategies: one a round)"
)
NON_IID_DATASET = Setting(
    "--non-iid-dataset",
    str,
    "digits",
    "dataset of the non_iid table (synthetic is too easy to show skew; cifar10 needs data/cifar-10-batches-py "
    "and hours on a CPU)",
    choices=("digits", "synthetic", "cifar10"),
)
NORM_EPOCHS = Setting("--norm-epochs", float, 20, "epochs of each run of the norms table")
NORM_IMAGE_SIZE = Setting("--norm-image-size", int, 8, "image size of the norms table (8: the digits' own)")
SECAGG_LEARNERS = Setting("--secagg-learners", learner_counts, "3,5,10", "learner counts of secagg_overhead")
SECAGG_ROUNDS = Setting("--secagg-rounds", int, 10, "FedSGD rounds of each secagg_overhead run")
PRIVACY_EPOCHS = Setting("--privacy-epochs", float, 10, "epochs of each run of secagg_accuracy and dp_accuracy")
PRIVACY_IMAGE_SIZE = Setting("--privacy-image-size", int, 16, "image size of the privacy figures' runs")
DP_MODES = Setting("--dp-modes", names, "central,distributed,local", "the --dp modes of dp_accuracy")
DP_DATASETS = Setting("--dp-datasets", names, "synthetic,digits", "the datasets of dp_accuracy")
COMPRESSION_ROUNDS = Setting(
    "--compression-rounds", int, 200, "FedSGD rounds of each compression run (FedAvg: as many local steps)"
)
COMPRESSION_DOWN = Setting(
    "--compression-down",
    str,
    "int4",
    "the --compress-down codec of the compression figures' compressed rows (none: their uplink codec alone)",
)
COMPRESSION_SEEDS = Setting(
    "--compression-seeds",
    learner_counts,
    "0,1,2",
    "the --seed values each FedSGD row of the compression table runs with (FedAvg's rows: the first); a row's "
    "accuracy is their mean",
)
SETTINGS = (
    REPEATS,
    ROUNDS,
    SCALE,
    VIRTUAL_SCALE,
    VIRTUAL_IMAGE_SIZE,
    STRATEGY_EPOCHS,
    NON_IID_EPOCHS,
    NON_IID_DATASET,
    NORM_EPOCHS,
    NORM_IMAGE_SIZE,
    SECAGG_LEARNERS,
    SECAGG_ROUNDS,
    PRIVACY_EPOCHS,
    PRIVACY_IMAGE_SIZE,
    DP_MODES,
    DP_DATASETS,
    COMPRESSION_ROUNDS,
    COMPRESSION_DOWN,
    COMPRESSION_SEEDS,
)  # in --help's order

WORK = object()  # a parameter that receives the figures' work folder (OUT/work: the runs' logs)


@dataclass(frozen=True)
class Figure:
    """One figure: `python bench.py --only NAME` measures it with group.function(**params)."""

    name: str
    group: str  # its module in this package
    function: str
    headline: bool  # measured by `make bench` (all figures: `make bench-full`)
    measures: str  # what it compares, in one sentence
    target: str
    params: Mapping[str, Any]  # the function's keyword arguments: a Setting, WORK, or a fixed value
    keys: tuple[str, ...] = field(default=())  # the results.json keys it writes; () means its name alone
    key_targets: Mapping[str, str] = field(default_factory=dict)  # where its keys have targets of their own

    @property
    def result_keys(self) -> tuple[str, ...]:
        return self.keys or (self.name,)

    def target_of(self, key: str) -> str:
        return self.key_targets.get(key, self.target)

    @property
    def settings(self) -> tuple[Setting, ...]:
        return tuple(value for value in self.params.values() if isinstance(value, Setting))

    def measure(self, chosen: Mapping[str, Any], work: Path) -> dict[str, dict]:
        """Run the figure with the chosen settings (by Setting.dest); its results by results.json key. A figure
        with several keys returns them so; a figure of one key (its name, or keys' one) returns that key's value."""
        kwargs = {
            name: work if value is WORK else chosen[value.dest] if isinstance(value, Setting) else value
            for name, value in self.params.items()
        }
        measured = self.callable()(**kwargs)
        return measured if len(self.result_keys) > 1 else {self.result_keys[0]: measured}

    def callable(self) -> Callable[..., dict]:
        return getattr(importlib.import_module(f"{__package__}.{self.group}"), self.function)

    def signature_problems(self) -> list[str]:
        """Why params would not bind to the function (empty: they do); for the registry's tests."""
        try:
            inspect.signature(self.callable()).bind(**self.params)
        except TypeError as error:
            return [f"{self.name}: {error}"]
        return []


FIGURES = (
    Figure(
        "model_transfer_ratio",
        "transfers",
        "model_transfer",
        headline=True,
        target="≥ 0.85",
        measures="a learner's GetModel of ResNet-18 (about 45 MB), streamed into place, checked and loaded into its "
        "model, against a bare grpcio server stream of the same bytes between two processes (the best of "
        "256 KiB, 1 MiB and 4 MiB chunks), the two taking turns; raw TCP on loopback is reported beside them",
        params={"repeats": REPEATS},
    ),
    Figure(
        "round_overhead",
        "rounds",
        "round_overhead",
        headline=True,
        target="round ≤ 1.10; wire bytes ≤ 1.05; learner throughput ≥ 0.95",
        measures="a FedSGD round (ResNet-20, 2 local learners of batch 64, one thread each, 3 runs) against one plain "
        "process's forward, backward and optimizer step of the same batch, the two taking turns; from the "
        "same runs, the bytes per learner-round against twice the fp32 parameter bytes, and a learner's "
        "compute rate against the plain process's",
        params={"work": WORK, "rounds": ROUNDS},
        keys=("round_overhead_ratio", "wire_bytes_ratio", "learner_throughput_ratio"),
        key_targets={
            "round_overhead_ratio": "≤ 1.10",
            "wire_bytes_ratio": "≤ 1.05",
            "learner_throughput_ratio": "≥ 0.95",
        },
    ),
    Figure(
        "leader_scale",
        "scale",
        "leader_scale",
        headline=False,
        target="round time at most linear in the learners; RSS growth < 1.5 × the model per learner",
        measures="rounds per second and the leader's peak memory with 1 to 64 fake learners (16 to a process) that "
        "send valid ResNet-20 gradients without training",
        params={"work": WORK, "counts": SCALE, "rounds": 20},
    ),
    Figure(
        "scale",
        "scale",
        "virtual_scale",
        headline=False,
        target="1,000 registered, 20 a round: round ≤ 1.2 × the drawn learners' compute, leader peak RSS ≤ 2 GB",
        measures="FedAvg rounds (ResNet-20, synthetic, 2 local steps of 8 images) with 100 to 1,000 registered "
        "virtual learners (learner.py --virtual, 250 to a process), 10 to 100 drawn a round: registration, rounds per "
        "second, peak RSS, bytes a round; 1,000 in one process, 20 a round, against the compute of its drawn learners "
        "(20 updates as a lone learner process times one); "
        "10 learner processes against 10 virtual learners in one",
        params={"work": WORK, "runs": VIRTUAL_SCALE, "rounds": 8, "image_size": VIRTUAL_IMAGE_SIZE},
        keys=("virtual_scale",),
    ),
    Figure(
        "serialization_gbps",
        "transfers",
        "serialization",
        headline=True,
        target="faster than the alternatives",
        measures="encode and decode of a ResNet-18 state_dict in one process: our payload codec, safetensors and "
        "torch.save / torch.load",
        params={"repeats": REPEATS},
    ),
    Figure(
        "time_to_accuracy",
        "rounds",
        "time_to_accuracy",
        headline=True,
        target="reported",
        measures="wall time (evaluation excluded) to 90 % test accuracy on the synthetic set: 2 learners of batch 32 "
        "against one process of batch 64 on all cores, with the same schedule",
        params={"work": WORK, "rounds": 250},
    ),
    Figure(
        "strategies",
        "strategies",
        "strategy_runs",
        headline=False,
        target="reported",
        measures="each strategy with its defaults on the synthetic set, 2 learners of batch 32, the same compute for "
        "all: rounds, MB on the wire and seconds to 90 % test accuracy, the final accuracy; and a FedAvg "
        "round against the bare compute of its local epoch",
        params={"work": WORK, "epochs": STRATEGY_EPOCHS},
    ),
    Figure(
        "non_iid",
        "non_iid",
        "non_iid_runs",
        headline=False,
        target="reported",
        measures="FedSGD, FedAvg, FedProx and SCAFFOLD on each partition (IID, Dirichlet 0.5 and 0.1, 2 classes per "
        "learner) among 10 learners, at equal epochs (the local strategies one local epoch a round) and at the "
        "MB of the partition's cheapest run: the test accuracy and the round it first reached 80 %",
        params={"work": WORK, "dataset": NON_IID_DATASET, "epochs": NON_IID_EPOCHS},
    ),
    Figure(
        "norms",
        "norms",
        "norm_runs",
        headline=False,
        target="skew costs FedSGD ≤ 0.05 of its IID accuracy, without giving up IID accuracy",
        measures="FedSGD on the digits among 4 learners with each norm of the CIFAR ResNets (--norm), IID and "
        "Dirichlet 0.1, at equal epochs: the final test accuracy and the skew's cost (IID minus Dirichlet)",
        params={"work": WORK, "epochs": NORM_EPOCHS, "image_size": NORM_IMAGE_SIZE},
    ),
    Figure(
        "defaults",
        "defaults",
        "defaults_sweep",
        headline=False,
        target="every strategy ≥ 0.85 on the synthetic set; none below FedAvg by more than 0.02 on the digits",
        measures="the server optimizers' defaults: FedAvgM, FedAdagrad, FedAdam and FedYogi over server learning "
        "rates, momenta and bias correction on the synthetic set (2 learners, 20 rounds of 8 local steps), FedAvg "
        "beside them; then each at its defaults against FedAvg on the digits, IID and Dirichlet 0.5 (2 learners, "
        "30 rounds of 8 local steps)",
        params={"work": WORK},
    ),
    Figure(
        "links",
        "links",
        "links",
        headline=False,
        target="round / bound near 1",
        measures="rounds with the leader and 2 learners on network-namespace hosts of their own, every host's "
        "outgoing link limited to 100 Mbit/s or 1 Gbit/s, against the bound of the same rounds: their "
        "compute plus their measured bytes at the link's rate",
        params={"work": WORK},
    ),
    Figure(
        "secagg_overhead",
        "privacy",
        "secagg_overhead",
        headline=False,
        target="≤ 1.15 × bytes and ≤ 1.25 × time at 10 learners",
        measures="FedSGD rounds with ResNet-20 on the synthetic set and 3, 5 and 10 learner processes under "
        "--secure-aggregation against plain rounds: bytes (both ways, as the leader records them) and seconds per "
        "round",
        params={
            "work": WORK,
            "counts": SECAGG_LEARNERS,
            "rounds": SECAGG_ROUNDS,
            "image_size": PRIVACY_IMAGE_SIZE,
        },
    ),
    Figure(
        "secagg_accuracy",
        "privacy",
        "secagg_accuracy",
        headline=False,
        target="≤ 0.01 below the plain run",
        measures="FedAvg on the digits among 5 learners under --secure-aggregation against the plain run of the "
        "same schedule: final test accuracy",
        params={"work": WORK, "learners": 5, "epochs": PRIVACY_EPOCHS, "image_size": PRIVACY_IMAGE_SIZE},
    ),
    Figure(
        "dp_accuracy",
        "privacy",
        "dp_accuracy",
        headline=False,
        target="reported",
        measures="FedAvg (--norm group) among 10 learners with each --dp mode at epsilons 1, 3 and 8 (delta 1e-5: "
        "the noise multiplier that spends it over the run) and without DP, on the synthetic set and the digits: "
        "final test accuracy and the epsilon the run reports spent",
        params={
            "work": WORK,
            "epochs": PRIVACY_EPOCHS,
            "image_size": PRIVACY_IMAGE_SIZE,
            "datasets": DP_DATASETS,
            "modes": DP_MODES,
        },
    ),
    Figure(
        "codec_costs",
        "compression",
        "codec_costs",
        headline=False,
        target="reported",
        measures="each compression codec on one ResNet-20 update (top-k and random-k at 1 %, PowerSGD at rank 2 "
        "and 4): the bytes it uploads against float32, and on one thread the median of --repeats timings of a "
        "learner's compression with error feedback and of the leader's checked decoding into its running sum",
        params={"repeats": REPEATS},
    ),
    Figure(
        "compression",
        "compression",
        "compression_table",
        headline=False,
        target="FedSGD with powersgd or topk: accuracy within 0.01 of none's, ≥ 30 × fewer bytes up, ≥ 4 × down; "
        "codec CPU ≤ 10 % of a round",
        measures="FedSGD and FedAvg (ResNet-20, 2 learners of one thread, the same steps for every row of a "
        "strategy) on the synthetic set (IID) and the digits (Dirichlet 0.1) with each codec up (and "
        "--compression-down down): bytes a round each way, MB and rounds to 90 % of the uncompressed run's final "
        "accuracy, final accuracy, the codecs' CPU share of a round (codec_costs over the median round); and a plot "
        "of accuracy against MB",
        params={
            "work": WORK,
            "rounds": COMPRESSION_ROUNDS,
            "down": COMPRESSION_DOWN,
            "seeds": COMPRESSION_SEEDS,
            "repeats": REPEATS,
        },
    ),
    Figure(
        "compression_links",
        "compression",
        "compression_links",
        headline=False,
        target="ResNet-18 FedSGD round at 100 Mbit/s ≤ 2 × its compute",
        measures="the links figure's rounds of ResNet-18 FedSGD (2 learners on network-namespace hosts, every "
        "outgoing link at 100 Mbit/s or 1 Gbit/s) uncompressed, with topk 1 % and with powersgd rank 4 up "
        "(--compression-down down): the median round against its compute and against its bound",
        params={"work": WORK, "down": COMPRESSION_DOWN},
    ),
)


@dataclass(frozen=True)
class Helper:
    """A hidden subcommand, `python bench.py _NAME ARGS...`: a process that the figures start (a server, fake
    learners, plain training steps)."""

    group: str
    function: str
    types: tuple[Callable[[str], Any], ...]  # of its positional arguments

    def run(self, args: list[str]) -> None:
        if len(args) != len(self.types):
            raise SystemExit(f"{self.function} takes {len(self.types)} arguments, not {len(args)}")
        function = getattr(importlib.import_module(f"{__package__}.{self.group}"), self.function)
        function(*(convert(arg) for convert, arg in zip(self.types, args)))


HELPERS = {
    "_serve-raw": Helper("transfers", "serve_raw", (int, int, int)),  # port, bytes, chunk bytes
    "_serve-model": Helper("transfers", "serve_model", (int, str)),  # port, architecture
    "_tcp-source": Helper("transfers", "tcp_source", (int, int)),  # port, bytes
    "_fake-learners": Helper("scale", "fake_learners", (str, int)),  # leader address, count
    "_plain-steps": Helper("baselines", "print_plain_steps", (int, int, int)),  # threads, steps, batch
}


def figure_named(name: str) -> Figure | None:
    """The figure of a --only name: a figure's name, or one of the results.json keys it writes."""
    return next((figure for figure in FIGURES if name == figure.name or name in figure.result_keys), None)


def headline() -> tuple[Figure, ...]:
    return tuple(figure for figure in FIGURES if figure.headline)
