"""A learner's data: its own images (--dataset), checked at start and loaded at the leader's image size; shards
from the leader and their checks; the batches it trains on."""

import logging
import threading
from dataclasses import replace
from pathlib import Path

import torch

import utils
from federated.core import partition
from federated.core.training import Batch
from federated.learner.config import LearnerConfig
from federated.wire import codec, messages

log = logging.getLogger("learner")

TRY_SOME = "python launch.py --write-digits DIR writes such folders to try"


def check_data_dir(dataset: str, data_dir: str) -> None:
    """Raise DatasetError, saying what to give, unless dataset's files are where the learner will read them (only
    looks: loading waits for the leader's image size; CIFAR-10, when absent, is downloaded now)."""
    try:
        utils.check_dataset(dataset, data_dir)
    except utils.DatasetError as error:
        hint = f"; give --data-dir the folder that holds it ({TRY_SOME})" if dataset == "imagefolder" else ""
        raise utils.DatasetError(f"--dataset {dataset}: {error}{hint}") from None


class LocalData:
    """This learner's own images (--dataset): their folder checked and counted at construction, before the leader is
    contacted; loaded once the leader's model says the image size and classes."""

    def __init__(self, config: LearnerConfig) -> None:
        """Raises DatasetError when --data-dir does not hold --dataset."""
        assert config.dataset is not None
        self.dataset, self.data_dir, self.eval_fraction = config.dataset, config.data_dir, config.eval_fraction
        check_data_dir(self.dataset, self.data_dir)
        self.images = utils.dataset_size(self.dataset, self.data_dir, train=True) + self.held_out_split()

    def held_out_split(self) -> int:
        """How many images of the dataset's test split load will hold out (none with --eval-fraction, or without
        one): with the training images, what the leader's image size multiplies."""
        if self.eval_fraction:
            return 0
        try:
            return utils.dataset_size(self.dataset, self.data_dir, train=False)
        except utils.DatasetError:
            return 0

    def load(self, info: messages.StateInfo) -> tuple[utils.ImageSet, utils.ImageSet | None]:
        """The local training images at the leader's image size, and those held out for evaluation: a
        --eval-fraction of them, else the dataset's test split if it has one."""
        size, classes = info.image_size, info.num_classes
        data = utils.load_dataset(self.dataset, self.data_dir, train=True, image_size=size)
        if data.num_classes != classes:
            raise utils.DatasetError(
                f"the local {self.dataset} has {data.num_classes} classes; the leader's model tells {classes} apart"
            )
        if self.eval_fraction:
            data, held_out = utils.held_out(data, self.eval_fraction, info.seed)
        else:
            try:
                held_out = utils.load_dataset(self.dataset, self.data_dir, train=False, image_size=size)
            except utils.DatasetError as missing:
                log.info("no held-out images to evaluate on (%s); --eval-fraction would hold some out", missing)
                held_out = None
        log.info(
            "training on local %s data: %d images of %dx%d, %d held out for evaluation",
            self.dataset,
            len(data),
            size,
            size,
            len(held_out) if held_out else 0,
        )
        [labels] = partition.describe(partition.label_counts(data.labels, [torch.arange(len(data))], classes))
        log.info("its labels (this learner's own: the leader never sees them): %s", labels.split(": ", 1)[1])
        return data, held_out


class LocalShares:
    """The shares of one local dataset among the learners of a process (--virtual N, and no folders DIR/0..N-1):
    loaded once, at the leader's image size, then split into N seeded IID shards, its held-out images too (each
    learner evaluates on its share of them, when there are at least N). One copy of the dataset in all, never N."""

    def __init__(self, local: LocalData, count: int) -> None:
        self.local, self.count = local, count
        self._shares: list[tuple[utils.ImageSet, utils.ImageSet | None]] | None = None
        self._lock = threading.Lock()

    def load(self, info: messages.StateInfo, index: int) -> tuple[utils.ImageSet, utils.ImageSet | None]:
        """The index-th learner's share: its training images and those it holds out (LocalData.load's)."""
        with self._lock:  # the first learner to ask loads and splits for all
            if self._shares is None:
                data, held_out = self.local.load(info)
                if len(data) < self.count:
                    raise utils.DatasetError(
                        f"the local {self.local.dataset} has {len(data)} training images, fewer than the "
                        f"{self.count} learners of --virtual"
                    )
                trained = [data.subset(rows) for rows in utils.shard_indices(len(data), self.count, info.seed)]
                held: list[utils.ImageSet | None] = [None] * self.count
                if held_out is not None and len(held_out) >= self.count:
                    held = [held_out.subset(rows) for rows in utils.shard_indices(len(held_out), self.count, info.seed)]
                self._shares = list(zip(trained, held, strict=True))
                log.info(
                    "split the local %s among %d learners: %d images each",
                    self.local.dataset,
                    self.count,
                    len(trained[0]),
                )
            return self._shares[index]


class LocalShare:
    """One learner's share of LocalShares, loaded as LocalData is."""

    def __init__(self, shares: LocalShares, index: int) -> None:
        self.shares, self.index = shares, index
        self.images = shares.local.images // shares.count  # what its limits count on

    def load(self, info: messages.StateInfo) -> tuple[utils.ImageSet, utils.ImageSet | None]:
        return self.shares.load(info, self.index)


# learner i's own folder in --data-dir: DIR/i, or DIR/learner{i} (as launch.py --write-digits writes them)
FOLDER_NAMES = ("{}", "learner{}")


def learner_folders(folder: Path, count: int) -> list[Path] | None:
    """The own folders of count learners in folder (FOLDER_NAMES), or None when it holds none of them. DatasetError
    when it holds some but not all: the learners would otherwise silently share the folder as one dataset."""
    for name in FOLDER_NAMES:
        folders = [folder / name.format(index) for index in range(count)]
        missing = [path.name for path in folders if not path.is_dir()]
        if not missing:
            return folders
        if len(missing) < count:
            raise utils.DatasetError(
                f"{folder} holds folders of some of the {count} learners of --virtual but not {', '.join(missing[:8])}"
                f"{' ...' if len(missing) > 8 else ''}: give each learner its folder {name.format('I')}, I from 0 to "
                f"{count - 1}, or none (then the learners share one dataset there)"
            )
    return None


def own_data(config: LearnerConfig) -> list[LocalData] | list[LocalShare] | None:
    """Each learner's own data in this process (--dataset), checked now: with --virtual N, learner i's folder DIR/i
    (or DIR/learner{i}) when --data-dir holds them for 0..N-1, else its share of the one dataset there; None without
    --dataset. DatasetError at once when a folder does not hold the dataset, or only some learners have one."""
    if not config.dataset:
        return None
    count, folder = config.virtual, Path(config.data_dir)
    folders = learner_folders(folder, count) if count > 1 else None
    if folders is not None:
        return [LocalData(replace(config, data_dir=str(path))) for path in folders]
    local = LocalData(config)
    if count == 1:
        return [local]
    shares = LocalShares(local, count)
    return [LocalShare(shares, index) for index in range(count)]


def shard_from_payload(payload: codec.Payload, num_classes: int, image_size: int = utils.IMAGE_SIZE) -> utils.ImageSet:
    """The images and labels of a data shard payload, after checking shapes, dtypes and label range."""
    labels, images = payload.tensors.get("labels"), payload.tensors.get("images")
    if labels is None or images is None or len(payload.tensors) != 2:
        raise codec.PayloadError(f"a data shard holds exactly 'labels' and 'images', got {list(payload.tensors)[:4]}")
    count = len(labels)
    shape = (count, 3, image_size, image_size)
    if (
        labels.dtype != torch.int64
        or images.dtype != torch.uint8
        or labels.ndim != 1
        or images.shape != shape
        or count == 0
    ):
        raise codec.PayloadError(f"expected int64 labels [N] and uint8 images {list(shape)} with N > 0")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise codec.PayloadError(f"labels must lie in [0, {num_classes})")
    return utils.ImageSet(images, labels, num_classes)


class Batches:
    """The batches a learner trains on: its data in the order of its schedule (one batch per step of every
    round; the seed and the learner's id choose the order), normalised and on the device. The batch asked for
    last is kept, so that the next round's first one can be prepared while the leader aggregates."""

    def __init__(
        self, data: utils.ImageSet, batch_size: int, seed: int, learner_id: int, device: torch.device | str
    ) -> None:
        self.data, self.device = data, device
        self.schedule = utils.BatchSchedule(len(data), batch_size, seed * 10_007 + learner_id)
        self.prepared: tuple[int, Batch] = (-1, (torch.empty(0), torch.empty(0)))

    def at(self, step: int, mean: list[float], std: list[float]) -> Batch:
        """The step-th batch, normalised with mean and std."""
        if self.prepared[0] != step:
            images, labels = utils.training_batch(self.data, self.schedule, step, mean, std)
            self.prepared = (step, (images.to(self.device), labels.to(self.device)))
        return self.prepared[1]
