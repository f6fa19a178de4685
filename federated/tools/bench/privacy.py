"""Privacy: what secure aggregation costs a round (bytes and seconds against the plain round, ResNet-20, 3 to 10
learner processes) and its accuracy against the plain run's (FedAvg); and FedAvg's accuracy against epsilon with
each --dp mode among 10 learners, on the synthetic set and the digits."""

import re
import statistics
from pathlib import Path

import utils
from federated.tools.bench.common import spread
from federated.tools.bench.federations import federation_run

WARM_ROUNDS = 2  # the first rounds connect, and under secure aggregation agree keys: left out of the medians
DP_MODES = ("central", "distributed", "local")
EPSILONS = (1.0, 3.0, 8.0)
DP_DELTA = 1e-5
DP_LEARNERS = 10
DP_BATCH = 64  # the leader's --batch-size default, which the runs keep
# Every dp_accuracy run, without DP too: group norm, since running statistics would reach the leader without noise
# under central and distributed DP, and BatchNorm mixes a batch's examples, which per-example clipping cannot bound
DP_RUN = ("--strategy", "fedavg", "--norm", "group")


def secagg_overhead(work: Path, counts: list[int], rounds: int, image_size: int) -> dict:
    """FedSGD rounds with ResNet-20 on the synthetic set, plain and under secure aggregation, with each count of
    learner processes: median bytes (both ways, as the leader's records count them) and seconds per round, and
    their ratios; the figure's value is the ratios at the largest count."""
    table = {}
    for count in counts:
        runs = {
            name: round_costs(work / f"secagg-{name}-{count}", count, rounds, image_size, flags)
            for name, flags in (("plain", []), ("secure", ["--secure-aggregation"]))
        }
        table[count] = {
            **runs,
            "bytes_ratio": runs["secure"]["bytes_per_round"] / runs["plain"]["bytes_per_round"],
            "seconds_ratio": runs["secure"]["round_s"]["median"] / runs["plain"]["round_s"]["median"],
        }
        print(
            f"  {count} learners: bytes x{table[count]['bytes_ratio']:.3f}, time x{table[count]['seconds_ratio']:.3f}"
        )
    largest = table[max(counts)]
    return {
        "value": {"bytes_ratio": largest["bytes_ratio"], "seconds_ratio": largest["seconds_ratio"]},
        "by_learners": table,
        "rounds": rounds,
        "image_size": image_size,
    }


def round_costs(out: Path, learners: int, rounds: int, image_size: int, flags: list[str]) -> dict:
    """Median bytes and seconds per round of one FedSGD run, warm-up rounds left out."""
    records, _ = federation_run(
        out,
        learners,
        [*synthetic(image_size), "--rounds", str(rounds), "--eval-every", "0", *flags],
    )
    trained = [record for record in records if "train_loss" in record][WARM_ROUNDS:]
    return {
        "bytes_per_round": statistics.median(record["bytes_in"] + record["bytes_out"] for record in trained),
        "round_s": spread([record["seconds"] for record in trained]),
    }


def secagg_accuracy(work: Path, learners: int, epochs: float, image_size: int) -> dict:
    """FedAvg on the digits, plain and under secure aggregation, the same schedule: the final test accuracies and
    the secure run's shortfall (the figure's value)."""
    accuracies = {
        name: final_accuracy(
            work / f"secagg-fedavg-{name}",
            learners,
            [*digits(image_size), "--strategy", "fedavg", "--epochs", str(epochs), *flags],
        )["accuracy"]
        for name, flags in (("plain", []), ("secure", ["--secure-aggregation"]))
    }
    return {
        "value": accuracies["plain"] - accuracies["secure"],
        **accuracies,
        "learners": learners,
        "epochs": epochs,
        "image_size": image_size,
    }


def dp_accuracy(work: Path, epochs: float, image_size: int, datasets: list[str], modes: list[str]) -> dict:
    """FedAvg among DP_LEARNERS learners without DP, and with each --dp mode at each epsilon: the noise multiplier
    that makes the whole schedule spend that epsilon (noise_for), the same schedule for all; the final test
    accuracy and the epsilon each run reports spent."""
    table: dict[str, dict] = {}
    for dataset in datasets:
        data = digits(image_size) if dataset == "digits" else synthetic(image_size)
        runs = [("none", None)] + [(mode, epsilon) for mode in modes for epsilon in EPSILONS]
        for mode, epsilon in runs:
            name = f"{dataset}-{mode}-{epsilon}"
            flags = [*data, *DP_RUN, "--epochs", str(epochs), *dp_flags(mode, epsilon, epochs, dataset)]
            cell = final_accuracy(work / f"dp-{name}", DP_LEARNERS, flags)
            if mode == "none":  # the row every mode's row is read against
                table.setdefault(dataset, {})["none"] = cell
            else:
                table[dataset].setdefault(mode, {})[str(epsilon)] = {**cell, "noise_multiplier": float(flags[-1])}
            print(f"  {name}: {cell}", flush=True)
    return {"value": table, "learners": DP_LEARNERS, "epochs": epochs, "image_size": image_size, "delta": DP_DELTA}


def dp_flags(mode: str, epsilon: float | None, epochs: float, dataset: str) -> list[str]:
    """The leader's flags of one run of dp_accuracy (mode "none": none), the noise multiplier last; distributed
    noise needs secure aggregation."""
    if mode == "none" or epsilon is None:
        return []
    secure = ["--secure-aggregation"] if mode == "distributed" else []
    sigma = noise_for(mode, epsilon, epochs, dataset)
    return ["--dp", mode, "--dp-delta", str(DP_DELTA), *secure, "--dp-noise-multiplier", f"{sigma:.4f}"]


def noise_for(mode: str, epsilon: float, epochs: float, dataset: str) -> float:
    """The noise multiplier that spends epsilon (at DP_DELTA) over the run, by Opacus' RDP accountant: central
    and distributed, one Gaussian step a round (FedAvg: one local epoch a round), every learner each round; local,
    each learner's DP-SGD steps over its shard, sampling a batch of its images."""
    from opacus.accountants.utils import get_noise_multiplier

    rate, steps = 1.0, round(epochs)
    if mode == "local":
        shard = utils.DATASET_SIZES[dataset][True] // DP_LEARNERS
        rate, steps = min(1.0, DP_BATCH / shard), round(epochs * max(1, shard // DP_BATCH))
    return get_noise_multiplier(target_epsilon=epsilon, target_delta=DP_DELTA, sample_rate=rate, steps=steps)


def final_accuracy(out: Path, learners: int, flags: list[str]) -> dict:
    """The last test accuracy of a run and the epsilon it spent: the leader's last record's (central,
    distributed), or the most any learner logs (local DP: each learner counts its own); None without DP. A run
    the leader stopped (noise that makes no sane step, round after round) has no accuracy: why it stopped."""
    try:
        records, _ = federation_run(out, learners, flags)
    except RuntimeError:
        return {"accuracy": None, "epsilon_spent": None, "stopped": leader_error(out)}
    accuracy = [record for record in records if "test_accuracy" in record][-1]["test_accuracy"]
    spent = [record["epsilon"] for record in records if "epsilon" in record] or learners_epsilon(out)
    return {"accuracy": accuracy, "epsilon_spent": spent[-1] if spent else None}


def leader_error(out: Path) -> str:
    """The leader's last error line, without its time and level."""
    errors = [line for line in (out / "leader.log").read_text().splitlines() if " ERROR " in line]
    return errors[-1].split(" ERROR ", 1)[1] if errors else "the leader failed; see its log"


def learners_epsilon(out: Path) -> list[float]:
    """The largest epsilon any learner's log says it spent (local DP), as a list of none or one."""
    logged = [
        float(found.group(1))
        for path in out.glob("learner*.log")
        for found in re.finditer(r"spent epsilon ([0-9.e+-]+)", path.read_text())
    ]
    return [max(logged)] if logged else []


def synthetic(image_size: int) -> list[str]:
    return ["--dataset", "synthetic", "--image-size", str(image_size)]


def digits(image_size: int) -> list[str]:
    return ["--dataset", "digits", "--image-size", str(image_size)]
