"""Each codec of --compress end to end: a leader and two learner processes, FedSGD on the synthetic set at 16
pixels, every update compressed on its way up; the run learns, and the leader's records count the compressed bytes.
top-k and PowerSGD run in `make test`; the other codecs are `long`."""

import pytest

from federated.core import compression
from tests.support.processes import SMALL_IMAGES, run_federation
from tests.support.runs import logs, records

MAKE_TEST = {"topk", "powersgd"}
ROUNDS = 50
RUN = ["--dataset", "synthetic", *SMALL_IMAGES, "--rounds", str(ROUNDS), "--eval-every", "0"]


@pytest.mark.parametrize(
    "codec",
    [pytest.param(name, marks=[] if name in MAKE_TEST else [pytest.mark.long]) for name in compression.CODECS[1:]],
)
def test_fedsgd_learns_with_each_codec_and_sends_fewer_bytes(tmp_path, codec):
    codes = run_federation(tmp_path, 2, [*RUN, "--compress", codec])
    assert codes == [0, 0, 0], logs(tmp_path)
    rounds = [record for record in records(tmp_path) if "train_loss" in record]
    assert [record["learners"] for record in rounds] == [2] * ROUNDS, logs(tmp_path)
    first, last = rounds[0]["train_loss"], sum(record["train_loss"] for record in rounds[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    accuracy = [record for record in records(tmp_path) if "test_accuracy" in record][-1]["test_accuracy"]
    assert accuracy > 0.2, accuracy  # ten classes: chance is 0.1
    for learner in ("learner0", "learner1"):
        assert (tmp_path / f"{learner}.log").read_text().count("starts from zero residuals") == 1
