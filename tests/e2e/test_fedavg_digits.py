"""FedAvg against FedSGD on real images (scikit-learn's digits), each at its defaults and the same epochs."""

import pytest

from tests.support.processes import run_federation
from tests.support.runs import logs, records

# 8 pixels: the digits' own resolution, and about 4 times faster than 16; 20 epochs: both have converged
DIGITS = ["--dataset", "digits", "--image-size", "8", "--epochs", "20"]


def outcome(out) -> tuple[float, int, int]:
    """A finished run's final test accuracy, rounds and bytes on the wire (both ways)."""
    rounds = [record for record in records(out) if "train_loss" in record]
    final = [record for record in records(out) if "test_accuracy" in record][-1]["test_accuracy"]
    return final, len(rounds), sum(record["bytes_in"] + record["bytes_out"] for record in rounds)


@pytest.mark.long  # two whole runs of 20 epochs: 134 s together on two busy cores
def test_fedavg_with_one_local_epoch_matches_fedsgd_on_the_digits_with_a_tenth_of_the_bytes(tmp_path):
    results = {}
    for strategy in ("fedsgd", "fedavg"):
        out = tmp_path / strategy
        codes = run_federation(out, 2, ["--strategy", strategy, *DIGITS])
        assert codes == [0, 0, 0], logs(out)
        results[strategy] = outcome(out)
    (fedsgd, sgd_rounds, sgd_bytes), (fedavg, avg_rounds, avg_bytes) = results["fedsgd"], results["fedavg"]
    assert (sgd_rounds, avg_rounds) == (220, 20)  # 719 images a learner: 11 batches of 64 an epoch
    assert fedavg >= fedsgd - 0.02, results
    assert sgd_bytes >= 10 * avg_bytes, results
