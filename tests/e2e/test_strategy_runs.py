"""Every strategy end to end with a real leader and real learner processes on the synthetic set."""

import pytest
import torch

from federated.tools import launch
from tests.support.processes import (
    run_federation,
    start_hostile,
    start_leader,
    start_learner,
)
from tests.support.runs import logs, records

# Each strategy with flags that reach 90 % within about 250 local steps of batch 32 on the synthetic set. The
# papers' defaults for the server optimizers with memory (fedavgm, fedadam, fedyogi) need more rounds than a test
# can afford. Only fedavg runs in `make test` (CI's time: the suite must stay well under 15 minutes on 2 cores);
# the others are marked `long`, and `make test-long` runs them.
RUNS = {
    "fedavg": ["--local-steps", "40", "--rounds", "6"],
    "fedprox": ["--local-steps", "40", "--rounds", "6"],
    "scaffold": ["--local-steps", "40", "--rounds", "6"],
    "fedavgm": ["--local-steps", "10", "--rounds", "24", "--server-momentum", "0.5"],
    "fedadagrad": ["--local-steps", "10", "--rounds", "24"],
    "fedadam": ["--local-steps", "10", "--rounds", "30", "--server-lr", "0.03"],
    "fedyogi": ["--local-steps", "10", "--rounds", "30", "--server-lr", "0.03"],
}
LONG = {"fedprox", "scaffold", "fedavgm", "fedadagrad", "fedadam", "fedyogi"}


def final_accuracy(out) -> float:
    return [record for record in records(out) if "test_accuracy" in record][-1]["test_accuracy"]


@pytest.mark.parametrize(
    "strategy", [pytest.param(name, marks=[pytest.mark.long] if name in LONG else []) for name in RUNS]
)
def test_every_strategy_trains_to_90_percent(tmp_path, strategy):
    flags = RUNS[strategy]
    codes = run_federation(tmp_path, 2, ["--strategy", strategy, *flags, "--batch-size", "32", "--warmup-epochs", "0"])
    assert codes == [0, 0, 0], logs(tmp_path)
    rounds = [record for record in records(tmp_path) if "train_loss" in record]
    steps, count = int(flags[1]), int(flags[3])
    assert [record["samples"] for record in rounds] == [2 * steps * 32] * count  # both learners, every local step
    assert not any("discarded" in record for record in rounds), logs(tmp_path)
    assert final_accuracy(tmp_path) >= 0.90, logs(tmp_path)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["config"]["strategy"] == strategy
    assert ("control" in saved) == (strategy == "scaffold")


@pytest.mark.long  # six learner processes on two cores; the collector's and the sampler's tests are fast
def test_sampled_participation_trains_two_of_six_learners_a_round(tmp_path):
    codes = run_federation(
        tmp_path,
        6,
        [
            "--strategy",
            "fedavg",
            "--learners-per-round",
            "2",
            "--local-steps",
            "25",
            "--rounds",
            "10",
            "--batch-size",
            "32",
            "--warmup-epochs",
            "0",
        ],
    )
    assert codes == [0] * 7, logs(tmp_path)
    rounds = [record for record in records(tmp_path) if "train_loss" in record]
    assert [record["learners"] for record in rounds] == [2] * 10
    assert final_accuracy(tmp_path) >= 0.90, logs(tmp_path)
    assert all(len(set(record["participants"])) == 2 for record in rounds)
    assert len({learner for record in rounds for learner in record["participants"]}) >= 5  # sampled anew each round
    state_bytes = rounds[0]["bytes_out"] / 2  # the state went to the two sampled learners only, the last to all six
    assert [record["bytes_out"] for record in rounds[:-1]] == [2 * state_bytes] * 9
    assert rounds[-1]["bytes_out"] == pytest.approx(6 * state_bytes, rel=0.01)  # (without the participants list)
    leader_log = (tmp_path / "leader.log").read_text()
    assert "not sampled" not in leader_log and "dropped" not in leader_log, leader_log


def byzantine_run(out, aggregator: str, flipper: bool = True) -> float:
    """Four honest learners and one that sends its update sign-flipped and ten times as large (real processes);
    the final test accuracy."""
    port = launch.free_port()
    leader = start_leader(
        out,
        port,
        "--learners",
        "5",
        "--strategy",
        "fedavg",
        "--aggregator",
        aggregator,
        "--local-steps",
        "20",
        "--rounds",
        "10",
        "--batch-size",
        "32",
        "--warmup-epochs",
        "0",
        "--round-timeout",
        "60",
    )
    learners = [start_learner(out, f"learner{index}", port) for index in range(4 if flipper else 5)]
    if flipper:
        learners.append(start_hostile(out, "flipper", port, "--flip", "--threads", "1"))
    codes = launch.wait_all([leader, *learners], 600)
    assert codes == [0] * 6, logs(out)
    return final_accuracy(out)


@pytest.mark.long
@pytest.mark.timeout(1800)  # three federations of six processes on two cores
def test_a_sign_flipping_learner_process_wrecks_the_mean_but_not_the_median(tmp_path):
    unattacked = byzantine_run(tmp_path / "unattacked", "mean", flipper=False)
    assert byzantine_run(tmp_path / "mean", "mean") < unattacked - 0.3
    assert byzantine_run(tmp_path / "median", "median") >= unattacked - 0.05
