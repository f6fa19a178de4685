"""Secure aggregation with real processes: five learners of a secure run, one of which dies after sending its masked
input and one before (once committed); the rounds still finish, each with the sum of the inputs that arrived."""

import pytest

from federated.tools import launch
from tests.support.processes import start_hostile, start_leader, start_learner
from tests.support.runs import logs, records

BATCH = 16
ROUNDS = 4


@pytest.mark.long  # six processes: 56 s on two busy cores (the same recovery, without processes: tests/unit)
def test_five_learners_one_dying_before_its_masked_input_and_one_after_the_rounds_finish_with_the_right_sum(tmp_path):
    port = launch.free_port()
    leader = start_leader(
        tmp_path,
        port,
        *("--learners", "5", "--dataset", "digits", "--image-size", "8", "--batch-size", str(BATCH)),
        *("--strategy", "fedsgd", "--rounds", str(ROUNDS), "--secure-aggregation", "--eval-every", "0"),
    )
    honest = [start_learner(tmp_path, f"learner{index}", port) for index in range(3)]
    before = start_hostile(tmp_path, "before", port, "--die-before-masked", "1")
    after = start_hostile(tmp_path, "after", port, "--die-after-masked", "2")
    codes = launch.wait_all([leader, *honest, before, after], 300)
    assert codes == [0, 0, 0, 0, 3, 3], logs(tmp_path)
    rounds = [record for record in records(tmp_path) if "train_loss" in record]
    assert [record["round"] for record in rounds] == list(range(1, ROUNDS + 1))
    assert not [record for record in rounds if "discarded" in record], logs(tmp_path)
    # round 2: the learner that died before its input is recovered from (its pairwise masks undone), 4 inputs;
    # round 3: the one that died after its input counts (its self-mask undone without it), 4 inputs; then 3
    assert [record["learners"] for record in rounds] == [5, 4, 4, 3]
    assert [record["samples"] for record in rounds] == [5 * BATCH, 4 * BATCH, 4 * BATCH, 3 * BATCH]
    assert not [record for record in rounds if "per_learner" in record], "the leader knows nobody's samples or loss"
    assert "DIES in round 1, committed, before its masked input" in (tmp_path / "before.log").read_text()
    assert "DIES in round 2, after its masked input" in (tmp_path / "after.log").read_text()
