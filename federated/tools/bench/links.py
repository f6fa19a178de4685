"""Links: rounds with the leader and its learners on network-namespace hosts of their own (tools/hosts.py),
every host's outgoing link limited to a rate, against the physical bound of the same rounds."""

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from federated.leader.metrics import read_metrics
from federated.tools import hosts, launch
from federated.tools.bench.common import compress_flags, empty_dir, spread
from federated.tools.bench.federations import learner_progress, rounds_done

LINK_PORT = 50051  # every host has a network stack of its own: the port is free there
LINK_LEARNERS = 2
LINK_RATES = ("100mbit", "1gbit")


@dataclass(frozen=True)
class LinkRun:
    """One configuration of the links figure: LINK_LEARNERS learners, one thread each, on the synthetic set."""

    model: str
    batch: int
    rounds: int  # rounds recorded
    skip: int  # first rounds left out of the median (connections, caches)
    rates: tuple[str, ...] = LINK_RATES
    wire_dtype: str = "float32"
    local_steps: int = 0  # 0: FedSGD; else FedAvg with this many local steps a round
    codecs: tuple[str, str] = ("none", "none")  # compression up (as codec_costs names it) and down

    @property
    def name(self) -> str:
        strategy = f"fedavg {self.local_steps} steps" if self.local_steps else "fedsgd"
        compressed = "" if self.codecs == ("none", "none") else f" {self.codecs[0]} / {self.codecs[1]}"
        return f"{self.model} {strategy} {self.wire_dtype}{compressed}"

    def leader_args(self) -> list[str]:
        local = ["--strategy", "fedavg", "--local-steps", str(self.local_steps)] if self.local_steps else []
        return [
            "--dataset",
            "synthetic",
            "--model",
            self.model,
            "--batch-size",
            str(self.batch),
            "--wire-dtype",
            self.wire_dtype,
            *local,
            *compress_flags(*self.codecs),
        ]


LINK_RUNS = (
    LinkRun("resnet20", 64, 10, 2),
    LinkRun("resnet20", 64, 10, 2, wire_dtype="float16"),
    LinkRun("resnet18", 32, 4, 1),  # 45 MB a state: a round at 100 Mbit/s takes seconds
    LinkRun("resnet20", 64, 4, 1, ("100mbit",), local_steps=10),
)


def links(work: Path, runs: tuple[LinkRun, ...] = LINK_RUNS) -> dict:
    """Rounds with the leader and LINK_LEARNERS learners on hosts of their own (network namespaces,
    tools/hosts.py), every host's outgoing link limited to each rate, against the physical bound of the same
    round: its compute, one learner's upload of its update, and the leader's uploads of the state to every
    learner at the link's rate.
    The bytes are those the run moved (the payloads in its metrics.jsonl); the rate is the link's, so TCP/IP's
    headers (about 4.5 % at 1500-byte packets: 96 Mbit/s of payload on a 100 Mbit/s link here) count against
    us. Skipped, saying why, where network namespaces cannot be made."""
    reason = hosts.unavailable()
    if reason:
        print(f"links: skipped: {reason}", flush=True)
        return {"value": None, "skipped": reason}
    table = {}
    for run in runs:
        for rate in run.rates:
            records, compute = link_rounds(work / f"links-{run.name.replace(' ', '-')}-{rate}", rate, run)
            table[f"{run.name} @ {rate}"] = link_row(records[run.skip :], compute, hosts.rate_bits(rate))
    return {"value": table}


def link_rounds(out: Path, rate: str, run: LinkRun, timeout: float = 600) -> tuple[list[dict], dict[int, float]]:
    """The first run.rounds round records of a federation on hosts of its own whose links are limited to rate,
    and each round's compute: the slower learner's, from its progress line for that round.

    The compute part of the bound comes from the same rounds, not from plain steps timed before them: this
    machine is shared and its speed drifts by tens of percent from one minute to the next, and plain steps
    timed at the start of the figure put its ResNet-20 ratios anywhere between 1.0 and 2.1. Nor is it the
    round on unlimited links, which would put our own work (the checked step, encoding, gRPC) into the bound
    and hide it. (Learners log whole images/s: ResNet-18's compute is known to about 5 %.)
    The processes are killed with the hosts after those rounds: the final evaluation and state, which no
    round's time includes, would add a minute with ResNet-18."""
    empty_dir(out)
    with hosts.Hosts(1 + LINK_LEARNERS, rate) as net:
        leader_process, learner_processes = launch.start_federation(
            LINK_LEARNERS,
            [*run.leader_args(), "--rounds", str(run.rounds + 1)],
            LINK_PORT,
            out,
            ["--log-every", "1"],
            hosts=net.hosts,
        )
        processes = [leader_process, *learner_processes]
        deadline = time.monotonic() + timeout
        while min(rounds_done(out / "metrics.jsonl"), logged_rounds(out)) < run.rounds:  # logged: once its state is in
            if any(process.poll() is not None for process in processes) or time.monotonic() > deadline:
                raise RuntimeError(f"{run.name} at {rate}: {run.rounds} rounds not done in {timeout:.0f} s; see {out}")
            time.sleep(0.2)
    launch.wait_all(processes, 10)  # reap them: leaving the hosts killed them
    records = [record for record in read_metrics(out / "metrics.jsonl") if "train_loss" in record][: run.rounds]
    return records, slowest_compute(out, run)


def slowest_compute(out: Path, run: LinkRun) -> dict[int, float]:
    """Each round's compute seconds in the run in out: the slower learner's, from their progress lines (rounds
    without every learner's line are left out)."""
    images = run.batch * max(1, run.local_steps)
    computes: dict[int, list[float]] = {}
    for path in out.glob("learner*.log"):
        for entry in learner_progress(path):
            computes.setdefault(entry.round, []).append(images / entry.images_per_s)
    return {round_index: max(seconds) for round_index, seconds in computes.items() if len(seconds) == LINK_LEARNERS}


def logged_rounds(out: Path) -> int:
    """The last round every learner of the run in out has logged its progress for (0 before any)."""
    logs = sorted(out.glob("learner*.log"))
    return min((max((entry.round for entry in learner_progress(path)), default=0) for path in logs), default=0)


def link_row(records: list[dict], compute: dict[int, float], rate_bits: int) -> dict:
    """A run's median round against its bound: the median of its rounds' compute, then the transfer of the
    median update up one learner's link and of the median states down the leader's one link to every learner,
    at rate_bits/s less what the link's full token bucket lets through at once (it refills while the learners
    compute). Rounds without both learners' compute are left out."""
    timed = [record for record in records if record["round"] in compute]
    update = statistics.median(record["bytes_in"] / record["learners"] for record in timed)
    states = statistics.median(record["bytes_out"] for record in timed)
    burst = hosts.burst_bytes(rate_bits)
    transfer = (max(0.0, update - burst) + max(0.0, states - burst)) * 8 / rate_bits
    measured, computed = spread([record["seconds"] for record in timed]), spread([compute[r["round"]] for r in timed])
    bound = computed["median"] + transfer
    return {
        "round_s": measured,
        "bound_s": bound,
        "ratio": measured["median"] / bound,
        "compute_s": computed,
        "transfer_s": transfer,
        "update_bytes": update,
        "states_bytes": states,
        "burst_bytes": burst,
        "leader_step_s": statistics.median(record["step_s"] for record in timed),
    }
