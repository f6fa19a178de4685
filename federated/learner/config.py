"""The learner's flags, each declared once, as a frozen configuration; the parser and the checks.

Choices from modules that import torch (datasets) are functions, called after parsing or by --help: a wrong
flag is refused before torch loads.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from federated.common.flags import (
    FRACTION,
    NOT_NEGATIVE,
    POSITIVE,
    Bounds,
    CommandLine,
    Config,
    Parser,
    build_parser,
    choice_problems,
    option,
    parse,
    refuse,
)
from federated.core.plan import MAX_LEARNERS
from federated.net.guard import IDLE_TIMEOUT_S
from federated.net.rpc import SecurityFlags
from federated.privacy.accountant import read_history


def _datasets() -> tuple[str, ...]:
    import utils

    return utils.DATASETS


GROUPS = {
    "leader": "",
    "data": "A learner trains on a shard the leader sends, or with --dataset on images of its own that never leave it.",
    "process": "",
    "timeouts": "Every wait is bounded; these say how long.",
    "limits": "What this learner takes on for its leader, checked on each model state and shard before anything "
    "is allocated: a leader that asks for more is refused (exit 2) with the flag that would allow it.",
    "privacy": "What this learner spends of its data's privacy, whatever the leader asks "
    "(docs/differential-privacy.md).",
    "security": "",
}

EXAMPLES = """examples:
  python learner.py --leader 127.0.0.1:50051                       a shard from a leader on this machine
  python learner.py --leader 10.0.0.5:50051 --advertise 10.0.0.7:50052 --port 50052
                                                                   a leader on another machine
  python learner.py --leader 10.0.0.5:50051 --dataset imagefolder --data-dir data/mine --eval-fraction 0.1
                                                                   images of its own, a tenth held out
  python learner.py --leader 127.0.0.1:50051 --virtual 100         a hundred learners in this process, each with a
                                                                   shard from the leader (docs/scale.md)

docs: docs/reference/cli.md (every flag), docs/getting-started.md (several machines)"""


@dataclass(frozen=True)
class LearnerConfig(SecurityFlags, Config):
    """Every flag of learner.py (see GROUPS for their sections)."""

    leader: str = option("127.0.0.1:50051", "the leader's HOST:PORT", group="leader", metavar="HOST:PORT")
    host: str = option("0.0.0.0", "address for this learner's server to listen on", group="leader")
    port: int = option(
        0,
        "port to listen on (0: any free port); with --virtual N, learner i listens on PORT+i",
        group="leader",
        bounds=Bounds(0, 65535),
    )
    advertise: str | None = option(
        None,
        "HOST:PORT the leader dials to reach this learner; with --virtual N, learner i is reached at HOST:PORT+i "
        "(HOST alone: at HOST and the port it listens on)",
        group="leader",
        metavar="HOST[:PORT]",
        default_text="127.0.0.1 for a local leader, else this machine's address on the route to it",
    )
    virtual: int = option(
        1,
        "run N learners in this process, each an ordinary learner to the leader (its own port, registration, "
        "slot, shard and state), training one at a time when drawn (docs/scale.md)",
        group="leader",
        bounds=Bounds(1, MAX_LEARNERS),
        metavar="N",
    )

    dataset: str | None = option(
        None,
        "train on this local dataset instead of a shard from the leader (raw data "
        "stays here; images are resized to the leader's --image-size)",
        group="data",
        choices=_datasets,
    )
    data_dir: str = option("data", "where the local --dataset lives", group="data", metavar="DIR")
    eval_fraction: float = option(
        0.0,
        "hold out this fraction of the local training images (never trained on) to "
        "evaluate the global model on when the leader asks (0: the dataset's test split, "
        "e.g. DIR/test of an imagefolder, if it has one)",
        group="data",
        bounds=FRACTION,
    )

    device: str = option(
        "auto", "where to train: auto (a CUDA GPU if there is one, else the CPU), cpu, cuda or cuda:N", group="process"
    )
    threads: int = option(
        0,
        "torch threads (0: all cores; give each learner its share when several run on one machine)",
        group="process",
        bounds=Bounds(0),
    )
    state_budget: float | None = option(
        None,
        "with --virtual N: MB of its learners' per-learner state (SCAFFOLD's controls, error feedback's residuals) "
        "kept in memory; beyond it the least recently used learners' state goes to a private temporary folder "
        "until they next need it (docs/scale.md)",
        group="process",
        bounds=POSITIVE,
        metavar="MB",
        default_text="all of it in memory",
    )
    log_every: int = option(50, "log progress every N rounds", group="process", bounds=Bounds(1))
    verbose: bool = option(False, "debug logging", group="process")

    connect_timeout: float = option(
        300.0,
        "seconds to keep trying to reach the leader (or to get a slot), at start and after losing it",
        group="timeouts",
        bounds=POSITIVE,
        metavar="S",
    )
    wait_timeout: float = option(
        600.0,
        "seconds to wait for the leader's next instruction before giving up (a "
        "learner that sampling left out of the round waits as long as the leader's health "
        "checks count it in)",
        group="timeouts",
        bounds=POSITIVE,
        metavar="S",
    )
    idle_timeout: float = option(
        IDLE_TIMEOUT_S,
        "seconds a stream from the leader (model, data) may deliver nothing "
        "before it is abandoned and fetched again; also how long a caller of this learner "
        "may stay silent",
        group="timeouts",
        bounds=POSITIVE,
        metavar="S",
    )

    max_image_size: int = option(
        512, "the largest --image-size of a leader this learner trains for", group="limits", bounds=Bounds(1)
    )
    max_batch_size: int = option(
        4096, "the largest --batch-size of a leader this learner trains for", group="limits", bounds=Bounds(1)
    )
    max_local_steps: int = option(
        100_000, "the most local steps a round this learner takes for its leader", group="limits", bounds=Bounds(1)
    )
    max_memory: float | None = option(
        None,
        "GiB this learner may spend on the leader's model, a batch's activations and the images at the leader's "
        "size (at least what they take, estimated from the model's shapes); also the most it buffers of a model "
        "state or shard",
        group="limits",
        bounds=POSITIVE,
        metavar="GIB",
        default_text="this machine's memory, and its GPU's when it trains on one",
    )
    max_epsilon: float = option(
        0.0,
        "under the leader's --dp local: sit out every round that would take this learner's own spent epsilon "
        "(its DP-SGD steps, at the leader's --dp-delta or 1 / its shard's size if smaller) past this, and every "
        "round without local differential privacy (0: no limit, and it trains as the leader asks)",
        group="privacy",
        bounds=NOT_NEGATIVE,
        metavar="EPSILON",
    )
    budget_file: str | None = option(
        None,
        "keep the epsilon this learner spends under --dp local (its DP-SGD steps) in this file, so that "
        "--max-epsilon holds across restarts",
        group="privacy",
        metavar="PATH",
        default_text="in this process only: a restarted learner starts again from 0",
    )
    require_secure_aggregation: bool = option(
        False,
        "never send a plain update: sit out every round the leader's plan does not make a secure round (the "
        "leader would see this learner's update)",
        group="privacy",
    )
    min_noise_multiplier: float = option(
        0.0,
        "sit out every round whose plan is not distributed or local DP (the noise this learner adds itself) with "
        "a noise multiplier of at least this (0: no floor, and it trains as the leader asks)",
        group="privacy",
        bounds=NOT_NEGATIVE,
        metavar="SIGMA",
    )

    leader_name: str = option(
        "leader", "with --tls-ca: the common name the leader's certificate must carry", group="security", metavar="NAME"
    )


def parser() -> Parser:
    """The learner's argument parser."""
    return build_parser(
        LearnerConfig,
        "Federated learning learner: registers with the leader, serves "
        "LearnerService, and each round it takes part in sends its update: the gradient of one batch "
        "(FedSGD), or the change local training made (every other strategy; the leader's model state "
        "says how to train).",
        EXAMPLES,
        prog="learner.py",
        groups=GROUPS,
        role="learner",
    )


def command_line(argv: Sequence[str] | None = None) -> CommandLine:
    """The flags argv gives, each converted and within its bounds (no torch loaded yet); exits on a bad one."""
    return parse(parser(), argv)


def configure(given: CommandLine) -> LearnerConfig:
    """The learner's configuration; SystemExit saying what to change when its flags make no sense together."""
    config = LearnerConfig(**given.values)
    problems = choice_problems(config)
    if config.port and config.port + config.virtual - 1 > 65535:
        problems.append(f"--port {config.port} leaves no room for the {config.virtual} ports of --virtual")
    if config.budget_file and config.virtual > 1:  # (each learner spends its own epsilon)
        problems.append("--budget-file keeps one learner's epsilon: run such learners as processes of their own")
    if config.state_budget is not None and config.virtual == 1:
        problems.append("--state-budget keeps the state of --virtual learners: it needs --virtual 2 or more")
    if config.eval_fraction and not config.dataset:
        problems.append("--eval-fraction needs a local --dataset")
    if config.budget_file and Path(config.budget_file).exists():
        try:
            read_history(Path(config.budget_file))
        except ValueError as error:
            problems.append(str(error))
    if problems:
        refuse("learner.py", problems)
    return config
