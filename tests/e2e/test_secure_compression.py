"""--compress int8 under --secure-aggregation with real processes: three learners, FedSGD on the digits at 8
pixels; the masked inputs travel in a 16-bit ring (BatchNorm's statistics, the weight and the loss in a 32-bit
part), about half the bytes of the 32-bit masked input, and the run learns."""

import pytest

from federated.core.layout import GradientLayout
from federated.wire import codec
from model import build_model
from tests.support.processes import run_federation
from tests.support.runs import logs, records

LEARNERS, ROUNDS = 3, 30


@pytest.mark.long  # four processes, 30 rounds: about 30 s on two busy cores (the ring's arithmetic and the leader's
# checks run in make test: tests/unit/test_secagg_compressed.py, tests/service/test_secure_aggregation.py)
def test_int8_under_secure_aggregation_learns_with_half_the_bytes_of_the_32_bit_masked_input(tmp_path):
    run = ["--dataset", "digits", "--image-size", "8", "--rounds", str(ROUNDS), "--eval-every", "0"]
    # a clip range that fits FedSGD's gradients: a level is 1/127 of it (BatchNorm's statistics keep their own)
    secure = ["--secure-aggregation", "--compress", "int8", "--secagg-clip-range", "1"]
    codes = run_federation(tmp_path, LEARNERS, [*run, *secure])
    assert codes == [0] * (LEARNERS + 1), logs(tmp_path)
    trained = [record for record in records(tmp_path) if "train_loss" in record]
    assert [record["learners"] for record in trained] == [LEARNERS] * ROUNDS, logs(tmp_path)
    layout = GradientLayout(build_model("resnet20"))
    values, wide = layout.parameter_count, layout.statistics_count + 2  # int16 values; int32 statistics and extras
    masked, plain = 2 * values + 4 * wide, 4 * (layout.size + 2)  # a masked input's bytes; at 32 bits
    # bytes in: the masked inputs with their headers, and the phases' replies (an epoch's shares in round 1)
    assert all(
        LEARNERS * masked < record["bytes_in"] < LEARNERS * (masked + codec.HEADER_SLACK_BYTES)
        for record in trained[1:]
    )
    assert all(record["bytes_in"] < 0.51 * LEARNERS * plain for record in trained[1:])
    first, last = trained[0]["train_loss"], sum(record["train_loss"] for record in trained[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    accuracy = [record for record in records(tmp_path) if "test_accuracy" in record][-1]["test_accuracy"]
    assert accuracy > 0.5, accuracy  # ten classes: chance is 0.1; the 32-bit secure run reached 0.75
