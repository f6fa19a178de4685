"""launch.py's own flags: --learner-flags reaches every learner, split as a shell would; the rest goes to leader.py."""

import pytest

from federated.tools import launch


class Started(Exception):
    """Raised in place of starting processes: the test only reads what launch.py would start them with."""


def test_learner_flags_go_to_every_learner_split_as_a_shell_would_and_the_rest_to_the_leader(monkeypatch, tmp_path):
    started: dict[str, object] = {}

    def record(learners, leader_args, port, out, learner_args=(), **kwargs):
        started.update(learners=learners, leader_args=leader_args, learner_args=list(learner_args))
        raise Started

    monkeypatch.setattr(launch, "start_federation", record)
    argv = ["--learners", "3", "--out", str(tmp_path), "--learner-flags", "--max-epsilon 8 --budget-file 'a b.json'"]
    with pytest.raises(Started):
        launch.main([*argv, "--", "--dataset", "synthetic", "--secure-aggregation"])
    assert started == {
        "learners": 3,
        "leader_args": ["--dataset", "synthetic", "--secure-aggregation"],
        "learner_args": ["--max-epsilon", "8", "--budget-file", "a b.json"],
    }


@pytest.mark.parametrize("flags", ["--require-secure-aggregation", "--max-epsilon=8"])
def test_learner_flags_of_a_single_flag_are_taken_as_the_value(monkeypatch, tmp_path, flags):
    started: dict[str, object] = {}

    def record(learners, leader_args, port, out, learner_args=(), **kwargs):
        started.update(learner_args=list(learner_args), leader_args=leader_args)
        raise Started

    monkeypatch.setattr(launch, "start_federation", record)
    with pytest.raises(Started):
        launch.main(["--out", str(tmp_path), "--learner-flags", flags, "--", "--learner-flags", "x"])
    assert started == {"learner_args": [flags], "leader_args": ["--learner-flags", "x"]}
