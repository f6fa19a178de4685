"""--dp local end to end: FedAvg with DP-SGD on 4 learner processes trains the digits above chance, each learner
logging the epsilon its own accountant spent, and the leader never sees a learner's training loss."""

import re

import pytest

from tests.support.processes import run_federation
from tests.support.runs import logs, records

# A weak guarantee (noise multiplier 0.5) that trains in 10 rounds; docs/differential-privacy.md has the trade-off.
RUN = ["--dataset", "digits", "--image-size", "8", "--epochs", "10", "--strategy", "fedavg", "--client-lr", "0.2"]
DP = ["--dp", "local", "--norm", "group", "--dp-noise-multiplier", "0.5"]


@pytest.mark.long  # 4 learners with per-example gradients for 10 rounds: about 90 s on two cores
def test_fedavg_with_local_dp_trains_the_digits_above_chance_and_each_learner_logs_its_epsilon(tmp_path):
    assert run_federation(tmp_path, 4, [*RUN, *DP], ["--log-every", "1"], timeout=600) == [0] * 5, logs(tmp_path)
    rounds = records(tmp_path)
    assert [r for r in rounds if "test_accuracy" in r][-1]["test_accuracy"] >= 0.3  # chance: 0.1
    assert all(r["train_loss"] is None for r in rounds if "train_loss" in r)  # (the loss is no DP-SGD output)
    for index in range(4):
        log = logs_of(tmp_path, index)
        spent = [float(e) for e in re.findall(r"round \d+: spent epsilon ([0-9.]+) at delta 1e-05", log)]
        assert len(spent) == 10 and spent == sorted(spent) and spent[0] > 0
        assert f"spent epsilon {spent[-1]:.3f} at delta 1e-05 in 50 DP-SGD steps" in log  # (its last line)


def logs_of(out, index: int) -> str:
    return (out / f"learner{index}.log").read_text()
