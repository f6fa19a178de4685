"""Many learners in one process (learner.py --virtual N) with a real leader: to the leader, ordinary learners."""

import pytest

from federated.tools import launch
from tests.support.processes import start_leader, start_learner
from tests.support.runs import logs, records

# The non-long twin of tests/e2e/test_strategy_runs.py's six sampled learner processes: the six in one process
SAMPLED_RUN = [
    "--dataset",
    "digits",
    "--image-size",
    "8",
    "--learners",
    "6",
    "--strategy",
    "fedavg",
    "--learners-per-round",
    "2",
    "--local-steps",
    "20",
    "--rounds",
    "5",
    "--batch-size",
    "32",
    "--warmup-epochs",
    "0",
    "--seed",
    "1",  # draws every learner in these five rounds
    "--eval-every",
    "100",  # (the final state is evaluated all the same)
]


def test_six_virtual_learners_of_one_process_train_two_a_round_and_only_the_drawn_get_the_state(tmp_path):
    port = launch.free_port()
    leader = start_leader(tmp_path, port, *SAMPLED_RUN)
    pool = start_learner(tmp_path, "pool", port, "--virtual", "6")
    assert launch.wait_all([leader, pool], 300) == [0, 0], logs(tmp_path)
    rounds = [record for record in records(tmp_path) if "train_loss" in record]
    assert [record["learners"] for record in rounds] == [2] * 5
    assert all(len(set(record["participants"])) == 2 for record in rounds)
    assert {learner for record in rounds for learner in record["participants"]} == set(range(6))
    state_bytes = rounds[0]["bytes_out"] / 2  # the state went to the two drawn learners only, the last to all six
    assert [record["bytes_out"] for record in rounds[:-1]] == pytest.approx([2 * state_bytes] * 4, rel=0.01)
    assert rounds[-1]["bytes_out"] == pytest.approx(6 * state_bytes, rel=0.01)
    accuracy = [record for record in records(tmp_path) if "test_accuracy" in record][-1]["test_accuracy"]
    assert accuracy >= 0.5, logs(tmp_path)  # chance is 0.1
    leader_log, pool_log = (tmp_path / "leader.log").read_text(), (tmp_path / "pool.log").read_text()
    assert "dropped" not in leader_log, leader_log
    assert "pool: 6 learners registered as 0..5" in pool_log, pool_log
    assert "the leader finished training at round 5" in pool_log, pool_log
