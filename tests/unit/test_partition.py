"""Partitions among learners: every scheme's shards are disjoint, non-empty and seeded, and skew labels or sizes
as asked; the record is a JSON list, a PNG and short log lines."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import utils
from federated.core import partition
from federated.core.partition import SCHEMES

# The synthetic training set's labels (utils.synthetic draws them first from this generator), without its images
SYNTHETIC_LABELS = torch.randint(10, (10_000,), generator=torch.Generator().manual_seed(1))


def proportions(shards: list[torch.Tensor], labels: torch.Tensor = SYNTHETIC_LABELS) -> np.ndarray:
    """[learner, class]: the share of each class in each learner's shard."""
    counts = np.array(partition.label_counts(labels, shards, 10))
    return counts / counts.sum(1, keepdims=True)


def sizes(shards: list[torch.Tensor]) -> list[int]:
    return [len(shard) for shard in shards]


@st.composite
def requests(draw) -> tuple[torch.Tensor, int, int]:
    """Random labels (some classes often absent), a number of learners and a minimum that fit them."""
    labels = torch.tensor(draw(st.lists(st.integers(0, 9), min_size=1, max_size=300)))
    learners = draw(st.integers(1, min(len(labels), 30)))
    return labels, learners, draw(st.integers(1, len(labels) // learners))


@settings(max_examples=200, deadline=None)
@given(requests(), st.sampled_from(SCHEMES), st.integers(-(2**40), 2**40), st.floats(0.05, 1000), st.integers(1, 4))
def test_every_partition_is_sorted_disjoint_big_enough_and_covers_the_data(request, scheme, seed, alpha, per_learner):
    labels, learners, minimum = request
    try:
        shards = partition.partition(labels, learners, scheme, seed, alpha, per_learner, min_samples=minimum)
    except ValueError as error:
        # iid and quantity fit any request with enough samples; label skew can leave a learner short
        assert scheme in ("dirichlet", "classes") and "use " in str(error), error
        return
    assert len(shards) == learners
    assert all(shard.dtype == torch.int64 and torch.equal(shard, shard.sort().values) for shard in shards)
    assert min(sizes(shards)) >= minimum
    every = torch.cat(shards)
    assert len(every.unique()) == len(every) and 0 <= every.min() and every.max() < len(labels)
    equal = scheme in ("iid", "dirichlet-equal")  # equal shards: the remainder is left out
    assert len(every) == (len(labels) - len(labels) % learners if equal else len(labels))


def test_iid_is_utils_equal_shards():
    shards = partition.partition(SYNTHETIC_LABELS[:103], 4, "iid", seed=5)
    assert all(torch.equal(a, b) for a, b in zip(shards, utils.shard_indices(103, 4, seed=5)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_seed_decides_the_shards(scheme):
    first, again, other = (partition.partition(SYNTHETIC_LABELS, 10, scheme, seed) for seed in (3, 3, 4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_dirichlet_equal_splits_among_a_thousand_learners_where_dirichlet_cannot():
    with pytest.raises(ValueError, match="use a larger alpha or fewer learners"):
        partition.partition(SYNTHETIC_LABELS, 1000, "dirichlet", seed=0, alpha=0.1, min_samples=8)
    shards = partition.partition(SYNTHETIC_LABELS, 1000, "dirichlet-equal", seed=0, alpha=0.1, min_samples=8)
    assert sizes(shards) == [10] * 1000
    lines = partition.describe(partition.label_counts(SYNTHETIC_LABELS, shards, 10))
    assert len(lines) == 21 and lines[-1].startswith("... and 980 more learners (10 to 10 samples each")
    assert proportions(shards).max(1).mean() > 0.6  # most of a learner's images are of one class


def test_dirichlet_equal_skews_labels_as_much_as_dirichlet_at_the_same_alpha():
    dominant = {
        scheme: np.mean(
            [
                proportions(partition.partition(SYNTHETIC_LABELS, 10, scheme, seed, 0.1)).max(1).mean()
                for seed in range(5)
            ]
        )
        for scheme in ("dirichlet", "dirichlet-equal")
    }
    assert abs(dominant["dirichlet"] - dominant["dirichlet-equal"]) < 0.1, dominant
    near_iid = proportions(partition.partition(SYNTHETIC_LABELS, 10, "dirichlet-equal", 0, alpha=100))
    assert np.abs(near_iid - 0.1).mean() < 0.02  # (the last learner dealt gets what the others left)


def test_dirichlet_with_a_large_alpha_is_close_to_iid():
    shares = proportions(partition.partition(SYNTHETIC_LABELS, 10, "dirichlet", seed=0, alpha=100))
    assert np.abs(shares - 0.1).max() < 0.05


def test_dirichlet_with_a_small_alpha_gives_most_learners_nearly_one_class():
    # Classes, not learners, draw their split: a learner may get two whole classes, so this holds for most
    # shards (64 % over these seeds), not all.
    shares = np.concatenate(
        [proportions(partition.partition(SYNTHETIC_LABELS, 10, "dirichlet", seed, alpha=0.01)) for seed in range(5)]
    )
    assert (shares.max(1) > 0.9).mean() > 0.5
    assert (1 / (shares**2).sum(1)).mean() < 2  # effective number of classes per learner; about 10 when IID


def test_dirichlet_sizes_differ_and_respect_the_minimum():
    shards = partition.partition(SYNTHETIC_LABELS, 10, "dirichlet", seed=0, alpha=0.1, min_samples=64)
    assert min(sizes(shards)) >= 64 and max(sizes(shards)) > 2 * min(sizes(shards))
    assert sum(sizes(shards)) == len(SYNTHETIC_LABELS)


def test_dirichlet_that_cannot_feed_every_learner_suggests_a_larger_alpha():
    with pytest.raises(ValueError, match="larger alpha or fewer learners"):
        partition.partition(SYNTHETIC_LABELS, 50, "dirichlet", seed=0, alpha=0.001)


@pytest.mark.parametrize("learners, per_learner", [(10, 2), (7, 3), (10, 1), (30, 10)])
def test_classes_gives_each_learner_exactly_its_number_of_classes(learners, per_learner):
    shards = partition.partition(SYNTHETIC_LABELS, learners, "classes", seed=0, classes_per_learner=per_learner)
    held = (proportions(shards) > 0).sum(1)
    assert held.tolist() == [per_learner] * learners
    assert sum(sizes(shards)) == len(SYNTHETIC_LABELS)
    # every class is spread over as many learners as any other, give or take one
    holders = (proportions(shards) > 0).sum(0)
    assert holders.max() - holders.min() <= 1


def test_classes_holds_fewer_only_where_a_class_has_fewer_samples_than_holders():
    labels = torch.tensor([0] * 50 + [1] * 50 + [2])  # class 2: one sample for two holders
    shards = partition.partition(labels, 3, "classes", seed=0, classes_per_learner=2)
    held = sorted((np.array(partition.label_counts(labels, shards, 3)) > 0).sum(1).tolist())
    assert held == [1, 2, 2] and max(len(labels[shard].unique()) for shard in shards) <= 2


def test_quantity_skews_sizes_but_keeps_labels_balanced():
    shards = partition.partition(SYNTHETIC_LABELS, 10, "quantity", seed=0, alpha=0.5, min_samples=64)
    assert min(sizes(shards)) >= 64 and max(sizes(shards)) > 3 * min(sizes(shards))
    assert sum(sizes(shards)) == len(SYNTHETIC_LABELS)
    large = [shard for shard in shards if len(shard) >= 500]  # small shards are noisy samples of balanced labels
    assert len(large) >= 4 and np.abs(proportions(large) - 0.1).max() < 0.05


def test_quantity_with_a_large_alpha_gives_nearly_equal_sizes():
    shards = partition.partition(SYNTHETIC_LABELS, 10, "quantity", seed=0, alpha=1000)
    assert max(sizes(shards)) < 1.2 * min(sizes(shards))


@pytest.mark.parametrize(
    "labels, learners, scheme, options, message",
    [
        (torch.arange(3), 4, "iid", {}, "at most 3 learners"),
        (torch.arange(10), 4, "quantity", {"min_samples": 3}, "at most 3 learners"),
        (torch.arange(10), 2, "shuffle", {}, "choose one of iid, dirichlet"),
        (torch.arange(10), 5, "classes", {"classes_per_learner": 11}, "between 1 and 10"),
        (torch.arange(10), 5, "classes", {"classes_per_learner": 0}, "between 1 and 10"),
        (
            torch.arange(10),
            2,
            "classes",
            {"classes_per_learner": 2},
            "at least 5 classes per learner or at least 5 learners",
        ),
        (torch.arange(10), 2, "dirichlet", {"alpha": 0}, "positive"),
        (torch.arange(10), 2, "quantity", {"alpha": float("nan")}, "positive"),
        (torch.arange(10), 2, "iid", {"num_classes": 5}, "labels must lie in 0..4"),
        (torch.rand(10), 2, "iid", {}, "integer"),
    ],
)
def test_impossible_requests_say_what_to_change(labels, learners, scheme, options, message):
    with pytest.raises(ValueError, match=message):
        partition.partition(labels, learners, scheme, seed=0, **options)


def test_label_counts_per_learner():
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    assert partition.label_counts(labels, [torch.tensor([0, 3]), torch.tensor([1, 2, 4, 5])], 4) == [
        [1, 0, 1, 0],
        [0, 2, 2, 0],
    ]


def test_describe_writes_one_short_line_per_learner():
    assert partition.describe([[400, 0, 0, 0, 412], [0, 3, 0, 0, 0]]) == [
        "learner 0: 812 samples, classes 0:400 4:412",
        "learner 1: 3 samples, classes 1:3",
    ]
    many = partition.describe([list(range(1, 101))] * 100, max_lines=100)
    assert len(many) == 100 and max(len(line) for line in many) < 120
    assert (
        many[0] == "learner 0: 5050 samples, 100 classes, largest 99:100 98:99 97:98 96:97 95:96 94:95, "
        "94 more with 4465"
    )


@pytest.mark.parametrize("learners, num_classes", [(2, 10), (100, 10), (101, 10), (12, 30)])
def test_write_partition_records_json_and_a_png(tmp_path: Path, learners, num_classes):
    labels = torch.randint(num_classes, (3000,), generator=torch.Generator().manual_seed(0))
    shards = partition.partition(labels, learners, "dirichlet", seed=0, alpha=0.5, num_classes=num_classes)
    counts = partition.write_partition(tmp_path, labels, shards, num_classes)
    written = json.loads((tmp_path / "partition.json").read_text())
    assert written == [
        {"learner_id": i, "samples": len(shard), "label_counts": counts[i]} for i, shard in enumerate(shards)
    ]
    assert all(len(record["label_counts"]) == num_classes for record in written)
    assert (tmp_path / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
