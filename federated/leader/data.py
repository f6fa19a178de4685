"""The leader's data: its --dataset split among learners and its test split, or, for a leader without data, the
normalisation and epoch length it settles on from what learners say of their own images."""

import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import utils
from federated.core import partition
from federated.leader.config import LeaderConfig
from federated.wire import codec, framing
from federated.wire.messages import DataSummary, ShardInfo

log = logging.getLogger("leader")

# With each learner's own epochs, a leader without data weighs an update at most as much as this many typical
# learners' (the median shard's): an honest learner of up to 4 typical shards (uneven partitions) still weighs its
# n_k, and one that lies about its size weighs at most as much as 4 typical learners, not as much as 2^32 images.
MAX_SHARD_FACTOR = 4


@dataclass(frozen=True)
class DataFacts:
    """What training needs to know of the data: the per-channel normalisation and a learner's typical shard size
    (an epoch is a pass over it). A checkpoint records them (as a dict): a leader without data learned them."""

    mean: list[float]
    std: list[float]
    shard_size: int

    def record(self) -> dict:
        return asdict(self)


class Shards:
    """The learners' data shards, each framed as DataChunk messages once and kept for every GetData."""

    def __init__(self, train: utils.ImageSet, indices: list[torch.Tensor], dataset: str) -> None:
        self.train, self.indices, self.dataset = train, indices, dataset
        self._messages: dict[int, list[bytes]] = {}
        self._lock = threading.Lock()

    def messages(self, learner_id: int) -> list[bytes]:
        with self._lock:  # a shard is encoded once, even when its learner asks twice at the same time
            if learner_id not in self._messages:
                shard = self.train.subset(self.indices[learner_id])
                metadata = ShardInfo(learner_id, shard.num_classes, self.dataset).to_metadata()
                payload = codec.encode({"labels": shard.labels, "images": shard.images}, metadata)
                self._messages[learner_id] = list(framing.chunk_messages(payload))
            return self._messages[learner_id]


@dataclass(frozen=True)
class LeaderData:
    """A leader's own dataset: the learners' shards, the normalised test split, and the facts of both."""

    shards: Shards
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    facts: DataFacts


def load(config: LeaderConfig, out: Path) -> LeaderData:
    """Load --dataset and split it among the learners (partition.json and .png in out show how); the facts'
    shard size is the mean shard (sizes the leader knows, not claims: an epoch is as many images as the dataset
    holds). Raises utils.DatasetError saying what to change."""
    log.info("loading %s data", config.dataset)
    train = utils.load_dataset(config.dataset, config.data_dir, train=True, image_size=config.image_size)
    test = utils.load_dataset(config.dataset, config.data_dir, train=False, image_size=config.image_size)
    if config.num_classes not in (None, train.num_classes):
        raise utils.DatasetError(
            f"--num-classes {config.num_classes}, but {config.dataset} has {train.num_classes} classes"
        )
    try:
        indices = partition.partition(
            train.labels,
            config.learners,
            config.partition,
            config.seed,
            config.alpha,
            config.classes_per_learner,
            train.num_classes,
            min_samples=config.batch_size,
        )
    except ValueError as error:
        raise utils.DatasetError(f"--partition {config.partition}: {error}") from None
    for line in partition.describe(partition.write_partition(out, train.labels, indices, train.num_classes)):
        log.info("%s", line)
    mean, std = utils.channel_stats(train.images)
    log.info("%d train / %d test images, %s partition", len(train), len(test), config.partition)
    facts = DataFacts(mean, std, sum(map(len, indices)) // len(indices))
    return LeaderData(
        Shards(train, indices, config.dataset),
        utils.normalize(test.images, mean, std),
        test.labels,
        train.num_classes,
        facts,
    )


def typical_shard_size(sizes: list[int]) -> int:
    """The median learner's number of training images, the lower one of an even count: an epoch is a pass
    over it, so that no single learner's claim of a huge dataset can stretch the run (of two, the smaller:
    which is why config.py asks a leader without data for the schedule's flags below LEAST_TO_OUTVOTE
    learners)."""
    return sorted(sizes)[(len(sizes) - 1) // 2]


def combined_normalisation(summaries: list[DataSummary], image_size: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over the learners' images, each learner weighing as many images
    as it holds but at most as many as the median learner: one learner's claim cannot set everyone's inputs."""
    cap = typical_shard_size([summary.train_samples for summary in summaries])
    weights = [min(summary.train_samples, cap) / summary.train_samples for summary in summaries]
    total = lambda field: [
        sum(weight * getattr(summary, field)[channel] for weight, summary in zip(weights, summaries))
        for channel in range(3)
    ]
    counted = sum(weight * summary.train_samples for weight, summary in zip(weights, summaries))
    return utils.stats_from_sums(total("channel_sums"), total("channel_square_sums"), counted * image_size**2)


def counted(summaries: list[DataSummary], batch_size: int) -> list[DataSummary]:
    """The summaries that settle the facts: those of learners with at least a batch of training images (all
    when none has). A learner with fewer trains one smaller batch a round; its claim must not shrink everyone's
    epoch to that batch nor, with one black image, pull the median, and so the normalisation's cap, down to it."""
    return [summary for summary in summaries if summary.train_samples >= batch_size] or summaries


def settle(summaries: list[DataSummary], image_size: int, batch_size: int) -> DataFacts:
    """A leader without data: the facts its learners' summaries give (see counted, combined_normalisation and
    typical_shard_size)."""
    sizes = [summary.train_samples for summary in summaries]
    settling = counted(summaries, batch_size)
    mean, std = combined_normalisation(settling, image_size)
    log.info(
        "learners hold %s training images%s; normalisation mean %s, std %s",
        " + ".join(map(str, sizes)),
        f" ({len(sizes) - len(settling)} with fewer than --batch-size {batch_size} not counted)"
        if len(settling) < len(sizes)
        else "",
        [round(m, 4) for m in mean],
        [round(d, 4) for d in std],
    )
    return DataFacts(mean, std, typical_shard_size([summary.train_samples for summary in settling]))
