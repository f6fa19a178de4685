"""Round overhead and time to accuracy: a FedSGD round against a plain training step of the same network
(with the wire bytes and the learners' compute rate of the same runs), and the wall time to an accuracy
against one process training on the whole training set."""

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import utils
from federated.common import runtime
from federated.core import strategies
from federated.core.layout import GradientLayout
from federated.core.schedule import Schedule
from federated.core.steps import make_optimizer
from federated.core.training import compute_gradient, evaluate
from federated.leader.config import LeaderConfig
from federated.tools.bench.baselines import coscheduled_step_seconds, plain_step_seconds
from federated.tools.bench.common import spread
from federated.tools.bench.federations import Progress, federation_run, learner_progress
from model import build_model

WARM_ROUNDS = 3  # the first rounds of a run warm up connections and caches: left out of the medians


@dataclass
class RoundRuns:
    """What round_overhead collects from its federation runs and the plain steps between them."""

    plain_s: list[float] = field(default_factory=list)  # plain steps' seconds
    round_s: list[float] = field(default_factory=list)  # rounds' seconds, warm-up rounds left out
    trained: list[dict] = field(default_factory=list)  # those rounds' metrics records
    progress: list[Progress] = field(default_factory=list)  # the learners' progress lines, the first left out
    samples: list[tuple[int, int]] = field(default_factory=list)  # the last run's (rounds, loopback bytes)


def round_overhead(work: Path, rounds: int, runs: int = 3) -> dict:
    """Median FedSGD round (2 learners, batch 64 each, ResNet-20) over a plain process's step. Plain steps
    and federation runs take turns, so that drift in the machine's speed hits both alike."""
    threads = max(1, runtime.available_cores() // 2)
    taken = RoundRuns(plain_s=plain_step_seconds(64, threads, 10))
    for run in range(runs):
        add_federation_run(taken, work / f"rounds{run}", rounds)
        taken.plain_s += plain_step_seconds(64, threads, 10)
    coscheduled = spread(coscheduled_step_seconds(2, threads, 20))
    return {
        "round_overhead_ratio": overhead_ratio(taken, coscheduled, threads, runs),
        "wire_bytes_ratio": wire_bytes_ratio(taken, rounds),
        "learner_throughput_ratio": throughput_ratio(taken, coscheduled),
    }


def add_federation_run(taken: RoundRuns, out: Path, rounds: int) -> None:
    """Run one 2-learner FedSGD federation of `rounds` rounds in out and add what it measured to taken."""
    records, taken.samples = federation_run(
        out,
        2,
        ["--dataset", "synthetic", "--rounds", str(rounds), "--batch-size", "64", "--eval-every", "0"],
        ["--log-every", "5"],
    )
    trained = [r for r in records if "train_loss" in r][WARM_ROUNDS:]
    taken.round_s += [r["seconds"] for r in trained]
    taken.trained += trained
    taken.progress += [entry for path in sorted(out.glob("learner*.log")) for entry in learner_progress(path)[1:]]


def overhead_ratio(taken: RoundRuns, coscheduled: dict, threads: int, runs: int) -> dict:
    """round_overhead_ratio: the median round over the median plain step, and where the round's time goes."""
    plain_s, round_s = spread(taken.plain_s), spread(taken.round_s)
    where = {
        f"leader_{key}": statistics.median(r[key] for r in taken.trained) for key in ("gradients_s", "step_s", "push_s")
    }
    where["learner_sending_and_waiting_s"] = statistics.median(entry.waiting_s for entry in taken.progress)
    return {
        "value": round_s["median"] / plain_s["median"],
        "round_s": round_s,
        "plain_step_s": plain_s,
        "threads_per_learner": threads,
        "runs": runs,
        "vs_two_plain_processes_at_once": round_s["median"] / coscheduled["median"],
        "two_plain_processes_step_s": coscheduled,
        "where_the_round_goes": where,
    }


def wire_bytes_ratio(taken: RoundRuns, rounds: int) -> dict:
    """wire_bytes_ratio: bytes per learner and round, from metrics.jsonl, over twice the fp32 parameter bytes."""
    per_learner = [(r["bytes_in"] + r["bytes_out"]) / r["learners"] for r in taken.trained]
    parameter_bytes = sum(p.numel() * 4 for p in build_model("resnet20").parameters())
    return {
        "value": statistics.median(per_learner) / (2 * parameter_bytes),
        "bytes_per_learner_round": statistics.median(per_learner),
        "os_loopback_bytes_per_learner_round": os_bytes_per_round(taken.samples, 5, rounds - 5) / 2,
        "parameter_bytes": parameter_bytes,
    }


def throughput_ratio(taken: RoundRuns, coscheduled: dict) -> dict:
    """learner_throughput_ratio: a learner's images/s computing, from its progress lines, over a plain step's."""
    plain_rate = 64 / spread(taken.plain_s)["median"]
    learner_rates = [entry.images_per_s for entry in taken.progress]
    return {
        "value": statistics.median(learner_rates) / plain_rate,
        "federated_images_per_s": spread(learner_rates),
        "plain_images_per_s": plain_rate,
        "vs_two_plain_processes_at_once": statistics.median(learner_rates) * coscheduled["median"] / 64,
    }


def os_bytes_per_round(samples: list[tuple[int, int]], first: int, last: int) -> float:
    """Loopback bytes per round between the samples where rounds first and last were reached."""
    start = next(sample for sample in samples if sample[0] >= first)
    end = next(sample for sample in samples if sample[0] >= last)
    return (end[1] - start[1]) / (end[0] - start[0])


def time_to_accuracy(work: Path, rounds: int, target: float = 0.90) -> dict:
    """Wall time to `target` test accuracy: 2 learners of batch 32 against one process of batch 64."""
    records, _ = federation_run(
        work / "tta",
        2,
        ["--dataset", "synthetic", "--rounds", str(rounds), "--batch-size", "32", "--eval-every", "10"],
        until=target,
    )
    federated = seconds_to(records, target)
    central = seconds_to(centralised_records(rounds, 64, target), target)
    return {
        "value": federated / central if federated and central else None,
        "federated_s": federated,
        "centralised_s": central,
        "target": target,
    }


def seconds_to(records: list[dict], target: float) -> float | None:
    """Seconds of training rounds before the first evaluation at or above target (None: never reached)."""
    elapsed = 0.0
    for record in records:
        if "train_loss" in record:
            elapsed += record["seconds"]
        elif record["test_accuracy"] >= target:
            return elapsed
    return None


def centralised_records(rounds: int, batch: int, target: float) -> list[dict]:
    """The same training in one process on the whole training set, with the leader's schedule,
    evaluated every 10 steps until it reaches target."""
    runtime.set_threads(0)
    train, test = utils.synthetic(True), utils.synthetic(False)
    mean, std = utils.channel_stats(train.images)
    test_images = utils.normalize(test.images, mean, std)
    torch.manual_seed(0)
    model = build_model("resnet20")
    layout = GradientLayout(model)
    gradient = torch.zeros(layout.size)
    layout.bind_gradients(gradient)
    optimizer = make_optimizer(model, 0.0, 0.9, 5e-4)
    batches = utils.BatchSchedule(len(train), batch, 0)
    config = LeaderConfig(learners=1, batch_size=batch, rounds=rounds)
    lr_schedule = Schedule.of(config, strategies.named(config.strategy), len(train))  # the leader's, for one learner
    records = []
    for round_index in range(rounds):
        started = time.perf_counter()
        images, labels = utils.training_batch(train, batches, round_index, mean, std)
        compute_gradient(model, layout, gradient, images, labels)
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule.lr(round_index)
        optimizer.step()
        records.append({"train_loss": 0.0, "seconds": time.perf_counter() - started})
        if (round_index + 1) % 10 == 0:
            records.append({"test_accuracy": evaluate(model, test_images, test.labels).accuracy})
            if records[-1]["test_accuracy"] >= target:
                break
    return records
