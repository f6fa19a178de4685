"""Run a leader and N learners as local processes, e.g. for the demo, or with --ray the learners on a Ray cluster
(ray_launch.py); print the final test accuracy."""

import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import utils
from federated.common import runtime
from federated.common.flags import (
    POSITIVE,
    Bounds,
    Config,
    Parser,
    build_parser,
    fields,
    option,
    refuse,
)
from federated.core import partition
from federated.leader.metrics import read_metrics
from federated.learner.config import LearnerConfig

ROOT = Path(__file__).resolve().parents[2]  # the repository: leader.py and learner.py
# How long learners are held back while the leader gets ready to listen (it loads its data first, a first
# CIFAR-10 download included); after that they start anyway and wait for it themselves (--connect-timeout).
LEADER_LISTEN_TIMEOUT_S = 600.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on host (localhost unless told; 0.0.0.0: on every interface)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_for_port(host: str, port: int, process: subprocess.Popen, timeout: float) -> bool:
    """Whether host:port accepts connections within timeout seconds; False as soon as process (the one that
    is to listen there) exits."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
    return False


def start_leader(
    learners: int,
    leader_args: list[str],
    host: str,
    port: int,
    out: Path,
    to_console: bool = False,
    prefix: Sequence[str] = (),
    piped: bool = False,
) -> subprocess.Popen:
    """leader.py for `learners` learners listening on host:port (run under prefix, if given), writing its
    outputs to out and logging to out/leader.log, or to this console if asked, or to a pipe (text) if piped."""
    out.mkdir(parents=True, exist_ok=True)
    command = [
        *prefix,
        sys.executable,
        str(ROOT / "leader.py"),
        "--learners",
        str(learners),
        "--host",
        host,
        "--port",
        str(port),
        "--out",
        str(out),
        *leader_args,
    ]
    log = subprocess.PIPE if piped else None if to_console else open(out / "leader.log", "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=piped)


def start_federation(
    learners: int,
    leader_args: list[str],
    port: int,
    out: Path,
    learner_args: Sequence[str] = (),
    leader_to_console: bool = False,
    hosts: Sequence | None = None,
    virtual: int = 1,
) -> tuple[subprocess.Popen, list[subprocess.Popen]]:
    """Start the leader and the learner processes, each with its share of this machine's cores and `virtual`
    learners (learner.py --virtual: the leader waits for learners x virtual), logging to
    out/*.log (the leader to this console instead, if asked). All on localhost, or with hosts the leader on
    hosts[0] and learner i on hosts[i + 1], given only the leader's address (each host has .prefix, the
    command that runs a program there, and .address: tools/hosts.py's network namespaces).

    On localhost everything listens on the loopback interface only, and the learners start once the leader
    listens (no learner if it exits first: the leader's exit code says why). With hosts the learners start at
    once and wait for the leader themselves: its namespace cannot be reached from here."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    threads = max(1, runtime.available_cores() // learners)
    place = lambda index: list(hosts[index].prefix) if hosts else []
    leader_host = hosts[0].address if hosts else "127.0.0.1"
    listen_on = "0.0.0.0" if hosts else "127.0.0.1"
    leader = start_leader(learners * virtual, leader_args, listen_on, port, out, leader_to_console, place(0))
    if not hosts and not wait_for_port(leader_host, port, leader, LEADER_LISTEN_TIMEOUT_S):
        if leader.poll() is not None:
            return leader, []
        print(
            f"NOTICE: the leader does not listen on {leader_host}:{port} after {LEADER_LISTEN_TIMEOUT_S:.0f} s; "
            "starting the learners, which wait for it",
            flush=True,
        )
    listen = [] if hosts else ["--host", "127.0.0.1"]  # hosts: every interface of its own namespace
    learner_cmd = lambda index: [
        *place(index + 1),
        sys.executable,
        str(ROOT / "learner.py"),
        "--leader",
        f"{leader_host}:{port}",
        *listen,
        "--threads",
        str(threads),
        *virtual_flags(virtual),
        *learner_args,
    ]
    procs = [
        subprocess.Popen(
            learner_cmd(index), env=env, stdout=open(out / f"learner{index}.log", "w"), stderr=subprocess.STDOUT
        )
        for index in range(learners)
    ]
    return leader, procs


def virtual_flags(virtual: int) -> list[str]:
    """learner.py's flags for a process of `virtual` learners (none for one: a process of one learner)."""
    return ["--virtual", str(virtual)] if virtual > 1 else []


def wait_all(processes: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit codes of the processes, killing any still running after timeout seconds (None for those)."""
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for process in processes:
        try:
            codes.append(process.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            codes.append(None)
    return codes


def demo_dataset(data_dir: str) -> str:
    """cifar10 when it is present or downloadable, otherwise synthetic after a notice."""
    try:
        utils.cifar10(Path(data_dir), train=False)
        return "cifar10"
    except utils.DatasetError as error:
        print(f"NOTICE: {error}\nNOTICE: running the demo on the synthetic data set instead.", flush=True)
        return "synthetic"


MIN_DIGITS = 40  # each learner's share: 32 to train on (a batch), 8 held out


def write_digits(root: Path, learners: int, alpha: float = 0.5, seed: int = 0) -> None:
    """scikit-learn's digits as one image folder per learner, root/learnerN/{train,test}/<class>/*.png: each
    learner's share label-skewed by a Dirichlet(alpha) split, a fifth of it held out as its test split."""
    data = utils.digits()
    shares = partition.partition(
        data.labels, learners, "dirichlet", seed, alpha, num_classes=data.num_classes, min_samples=MIN_DIGITS
    )
    for learner, share in enumerate(shares):
        train, test = utils.held_out(data.subset(share), 0.2, seed)
        for split, images in (("train", train), ("test", test)):
            utils.write_image_folder(root / f"learner{learner}", split, images)
    for line in partition.describe(partition.label_counts(data.labels, shares, data.num_classes)):
        print(f"{root}/{line.replace(' ', '', 1)}")


@dataclass(frozen=True)
class LaunchConfig(Config):
    """Every flag of launch.py; the others go to leader.py."""

    learners: int = option(2, "number of learner processes", group="launch", bounds=Bounds(1))
    out: str = option("runs/demo", "directory for the outputs and the processes' logs", group="launch", metavar="DIR")
    data_dir: str = option("data", "where CIFAR-10 is looked for (--demo)", group="launch", metavar="DIR")
    demo: bool = option(False, "a run of a few minutes: CIFAR-10 if available, else the synthetic set", group="launch")
    timeout: float = option(
        1800.0, "seconds before the processes are killed", group="launch", bounds=POSITIVE, metavar="S"
    )
    write_digits: str | None = option(
        None,
        "only write scikit-learn's 1,797 digits as --learners label-skewed image "
        "folders DIR/learnerN/{train,test}/<class>/ (for trying learners with data of "
        "their own: learner.py --data-dir DIR/learnerN, or --virtual N --data-dir DIR) and exit",
        group="launch",
        metavar="DIR",
    )
    learner_flags: str = option(
        "",
        'flags for every learner.py, one quoted string (e.g. "--min-noise-multiplier 1 --require-secure-aggregation")',
        group="launch",
        metavar="FLAGS",
    )
    virtual: int = option(
        1,
        "learners in each learner process (learner.py --virtual K, one model and training loop for K learners, "
        "docs/scale.md): the leader waits for --learners x K learners",
        group="launch",
        bounds=next(field for field in fields(LearnerConfig) if field.name == "virtual").flag.bounds,  # learner.py's
        metavar="K",
    )
    ray: str | None = option(
        None,
        "place the learner processes as actors across the nodes of the Ray cluster at ADDRESS, one each (of "
        "--virtual learners); "
        "the leader runs here: on a node of the cluster (ADDRESS its head's HOST:6379, or auto) or anywhere that "
        "reaches its head and nodes (ray://HEAD:10001, Ray Client); make ray installs Ray",
        group="ray",
        metavar="ADDRESS",
    )
    ray_cpus: int = option(
        1, "CPUs each learner reserves on its node, its torch threads (--ray)", group="ray", bounds=Bounds(1)
    )
    ray_leader_address: str | None = option(
        None,
        "the leader's address (an IPv4 address or host name of this machine) as the cluster's nodes reach it, "
        "used as given (--ray); unless told, Ray's address of this node, or with ray:// this machine's address on "
        "the route to the head, refused where that is loopback or link-local (a tunnel to the head)",
        group="ray",
        metavar="HOST",
    )


GROUPS = {"launch": "", "ray": "learners on a Ray cluster (docs/ray.md)"}
EXAMPLES = """examples:
  python launch.py --demo                                     what make demo runs
  python launch.py --learners 4 -- --dataset synthetic --strategy fedavg --rounds 20
                                                              leader.py's flags after --
  python launch.py --learners 5 --learner-flags "--require-secure-aggregation" -- --secure-aggregation
                                                              learner.py's flags in one string
  python launch.py --write-digits data/digits --learners 2    image folders for learners with data of their own
  python launch.py --learners 2 --virtual 500 -- --dataset synthetic --partition dirichlet-equal --alpha 0.1 \
      --strategy fedprox --learners-per-round 20 --batch-size 8 --image-size 16 --rounds 200
                                                              1,000 learners in two processes (docs/scale.md)
  python launch.py --ray ray://HEAD:10001 --learners 4 -- --dataset digits --image-size 8
                                                              the learners on a Ray cluster (make ray)"""


def parser() -> Parser:
    """launch.py's argument parser (what it does not know goes to leader.py)."""
    return build_parser(
        LaunchConfig,
        "Run a leader and N learners on this machine, on loopback (with --ray: the learners on a Ray "
        "cluster's nodes); flags after -- (or any launch.py does not know) go to leader.py.",
        EXAMPLES,
        prog="launch.py",
        groups=GROUPS,
    )


def joined_learner_flags(argv: list[str]) -> list[str]:
    """argv with `--learner-flags X` written `--learner-flags=X`: argparse takes a lone value that looks like a
    flag (`--learner-flags --require-secure-aggregation`) for a missing one, but never a value after `=`."""
    joined, rest = [], list(argv)
    while rest and rest[0] != "--":
        arg = rest.pop(0)
        joined.append(f"{arg}={rest.pop(0)}" if arg == "--learner-flags" and rest else arg)
    return joined + rest


def run_on_ray(args: LaunchConfig, leader_args: list[str], out: Path) -> list[int | None]:
    """The run with its learners on the Ray cluster at args.ray (federated/tools/ray_launch.py): exit codes,
    the leader's first; refused, saying what to do, where Ray is missing or the cluster cannot take them."""
    from federated.tools import ray_launch  # imports Ray, an optional extra, only when asked for

    assert args.ray is not None
    try:
        return ray_launch.run(
            args.ray,
            args.learners,
            args.ray_cpus,
            leader_args,
            [*virtual_flags(args.virtual), *shlex.split(args.learner_flags)],
            out,
            args.timeout,
            args.virtual,
            args.ray_leader_address,
        )
    except ray_launch.RayUnavailable as error:
        refuse("launch.py", [str(error)])


def main(argv: list[str] | None = None) -> int:
    known, leader_args = parser().parse_known_args(joined_learner_flags(sys.argv[1:] if argv is None else argv))
    args = LaunchConfig(**vars(known))
    leader_args = [a for a in leader_args if a != "--"]
    if args.write_digits:
        try:
            write_digits(Path(args.write_digits), args.learners)
        except ValueError as error:
            refuse("launch.py", [f"--write-digits for {args.learners} learners: {error}"])
        return 0
    if args.demo:
        dataset = demo_dataset(args.data_dir)
        rounds, eval_every = ("600", "200") if dataset == "cifar10" else ("250", "50")
        leader_args = [
            "--dataset",
            dataset,
            "--data-dir",
            args.data_dir,
            "--rounds",
            rounds,
            "--batch-size",
            "32",
            "--eval-every",
            eval_every,
            *leader_args,
        ]
    out = Path(args.out)
    pools = f" in {args.learners} processes" if args.virtual > 1 else ""
    print(
        f"starting a leader and {args.learners * args.virtual} learners{pools}; the leader logs here, the learners "
        f"in {out}/",
        flush=True,
    )
    started = time.monotonic()
    if args.ray:
        codes = run_on_ray(args, leader_args, out)
    else:
        leader, learners = start_federation(
            args.learners,
            leader_args,
            free_port(),
            out,
            shlex.split(args.learner_flags),
            leader_to_console=True,
            virtual=args.virtual,
        )
        codes = wait_all([leader, *learners], args.timeout)
    print(f"exit codes: leader {codes[0]}, learners {codes[1:]}; {time.monotonic() - started:.0f} s")
    if any(code != 0 for code in codes):
        print(f"a process failed; see the leader's log above and {out}/learner*.log", file=sys.stderr)
        return 1
    final = [r for r in read_metrics(out / "metrics.jsonl") if "test_accuracy" in r][-1]
    print(
        f"final test accuracy: {final['test_accuracy']:.4f} after {final['round']} rounds "
        f"(model: {out}/model.pt, plot: {out}/metrics.png)"
    )
    return 0
