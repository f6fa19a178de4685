"""Every strategy end to end with a real leader and real learner processes on the synthetic set."""

import pytest
import torch

from federated.core import strategies
from federated.leader.config import LeaderConfig
from federated.tools import launch
from tests.support.processes import (
    SMALL_IMAGES,
    run_federation,
    start_hostile,
    start_leader,
    start_learner,
)
from tests.support.runs import logs, records

# Each strategy at its defaults, as a user who names it and nothing else gets it (issue 17): 2 learners, 20 rounds
# of 8 local steps of the default batch, must reach 85 %. FedAvgM and FedAdam, the server optimizers with memory
# whose published defaults failed this (0.47 and 0.70), run in `make test` on 16-pixel images (SMALL_IMAGES: about
# 4 times faster; 0.953 and 0.933 there, 62 and 80 s under a load average near 15); the others are marked `long`
# and run at the synthetic set's 32 pixels (`make test-long`; `python bench.py --only defaults` measured 0.94-0.99
# for the server optimizers there).
DEFAULTS_RUN = ["--local-steps", "8", "--rounds", "20"]
MAKE_TEST = {"fedavgm", "fedadam"}
LOCAL_STRATEGIES = [name for name in strategies.names() if name != "fedsgd"]


def final_accuracy(out) -> float:
    return [record for record in records(out) if "test_accuracy" in record][-1]["test_accuracy"]


@pytest.mark.parametrize(
    "strategy", [pytest.param(name, marks=[] if name in MAKE_TEST else [pytest.mark.long]) for name in LOCAL_STRATEGIES]
)
def test_every_strategy_at_its_defaults_trains_to_85_percent_in_20_rounds_of_8_local_steps(tmp_path, strategy):
    images = SMALL_IMAGES if strategy in MAKE_TEST else []
    codes = run_federation(tmp_path, 2, ["--strategy", strategy, *DEFAULTS_RUN, *images])
    assert codes == [0, 0, 0], logs(tmp_path)
    rounds = [record for record in records(tmp_path) if "train_loss" in record]
    batch = LeaderConfig().batch_size
    assert [record["samples"] for record in rounds] == [2 * 8 * batch] * 20  # both learners, every local step
    assert not any("discarded" in record for record in rounds), logs(tmp_path)
    assert final_accuracy(tmp_path) >= 0.85, logs(tmp_path)
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
