"""Real leader, learner and peer processes started from the repository root, each logging to a file of its
run's folder (or piping its output, as text), on localhost or on the network-namespace hosts of
federated/tools/hosts.py."""

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from federated.tools import launch

ROOT = Path(__file__).resolve().parents[2]
PEERS = Path("tests") / "peers"  # the peer programs, relative to ROOT (their processes run there)

# A plain run: a leader and two learners on the synthetic set, to 90 % (160 rounds of 32, past the first epoch's
# end at round 156). Every round waits for both learners (--min-learners 2, --round-timeout 600), so that a run
# killed and resumed with the same flags must follow it loss for loss; checkpoints every 20 rounds give the killed
# runs a place to resume from.
# Runs about faults and attacks need rounds, not detail: images of 16 pixels train about 4 times faster than 32
# (the synthetic run still reaches 0.98 in its 160 rounds), and keep `make test` within its 10 minutes on two cores
SMALL_IMAGES = ["--image-size", "16"]

SYNTHETIC_RUN = [
    *SMALL_IMAGES,
    "--dataset",
    "synthetic",
    "--rounds",
    "160",
    "--batch-size",
    "32",
    "--eval-every",
    "100",
    "--min-learners",
    "2",
    "--round-timeout",
    "600",
    "--checkpoint-every",
    "20",
]


def spawn(log: Path | None, *args: str, env: dict | None = None, prefix: Sequence[str] = ()) -> subprocess.Popen:
    """A Python process in the repository root running args, its output appended to log (or piped, as text);
    prefix runs it through another command first (e.g. `ip netns exec HOST`, see federated/tools/hosts.py)."""
    output = open(log, "a") if log else subprocess.PIPE
    return subprocess.Popen(
        [*prefix, sys.executable, *args], cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, text=log is None
    )


def start_leader(
    out: Path, port: int, *args: str, host: str = "127.0.0.1", prefix: Sequence[str] = ()
) -> subprocess.Popen:
    """A leader listening on host (localhost unless told), with the synthetic set unless args say otherwise,
    logging to out/leader.log (appending, so a restart keeps the first log)."""
    out.mkdir(parents=True, exist_ok=True)
    return spawn(
        out / "leader.log",
        "leader.py",
        "--host",
        host,
        "--port",
        str(port),
        "--out",
        str(out),
        "--dataset",
        "synthetic",
        *args,
        prefix=prefix,
    )


def start_learner(
    out: Path,
    name: str,
    port: int,
    *args: str,
    leader: str = "127.0.0.1",
    host: str | None = "127.0.0.1",
    prefix: Sequence[str] = (),
) -> subprocess.Popen:
    """A learner with one thread, of the leader at leader:port, serving on host (localhost unless told; None:
    learner.py's default, every interface, advertising its own address), logging to out/<name>.log."""
    listen = ["--host", host] if host else []
    return spawn(
        out / f"{name}.log",
        "learner.py",
        "--leader",
        f"{leader}:{port}",
        *listen,
        "--threads",
        "1",
        *args,
        prefix=prefix,
    )


def start_hostile(out: Path, name: str, port: int, *args: str) -> subprocess.Popen:
    """tests/peers/hostile_learner.py with args (--victim, --freeload or --flip, and learner.py flags), a learner
    of the leader at localhost:port serving on localhost, logging to out/<name>.log."""
    return spawn(
        out / f"{name}.log",
        str(PEERS / "hostile_learner.py"),
        *args,
        "--leader",
        f"127.0.0.1:{port}",
        "--host",
        "127.0.0.1",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def run_federation(
    out: Path,
    learners: int,
    leader_args: list[str],
    learner_args: Sequence[str] = (),
    timeout: float = 400,
    virtual: int = 1,
) -> list[int | None]:
    """Run a leader and learners as real processes to the end, virtual learners a process (learner.py --virtual);
    return their exit codes."""
    port = launch.free_port()
    leader = start_leader(out, port, "--learners", str(learners), *leader_args)
    pool = ["--virtual", str(virtual)] if virtual > 1 else []
    procs = [start_learner(out, f"learner{index}", port, *pool, *learner_args) for index in range(learners // virtual)]
    return launch.wait_all([leader, *procs], timeout)
