"""Image data: CIFAR-10, the synthetic set and image folders as uint8 tensors; sharding, batches, augmentation."""

import functools
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

log = logging.getLogger(__name__)

DATASETS = ("cifar10", "synthetic", "digits", "imagefolder")
IMAGE_SIZE = 32  # CIFAR-10's and the synthetic set's; --image-size resizes any dataset to another
MAX_IMAGE_SIZE = 1024
SYNTHETIC_SIZES = {True: 10_000, False: 2_000}  # train, test
DIGITS_TEST_FRACTION, DIGITS_SIZES = 0.2, {True: 1_438, False: 359}  # of scikit-learn's 1,797
DATASET_SIZES = {"cifar10": {True: 50_000, False: 10_000}, "synthetic": SYNTHETIC_SIZES, "digits": DIGITS_SIZES}
DOWNLOAD_TIMEOUT_S = 30


class DatasetError(RuntimeError):
    """A dataset that cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 [N, 3, S, S] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        """The images at the given indices."""
        return ImageSet(self.images[indices], self.labels[indices], self.num_classes)

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]


def load_dataset(name: str, data_dir: str | Path, train: bool, image_size: int = IMAGE_SIZE) -> ImageSet:
    """The train or test split of a dataset by name (see DATASETS), as image_size x image_size RGB."""
    if name == "imagefolder":
        return image_folder(Path(data_dir), train, image_size)
    if name == "synthetic":
        data = synthetic(train)
    elif name == "digits":
        data = digits_split(train)
    elif name == "cifar10":
        data = cifar10(Path(data_dir), train)
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    return (
        data
        if image_size == data.image_size
        else ImageSet(resize(data.images, image_size), data.labels, data.num_classes)
    )


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images resized (bilinear, antialiased when shrinking) to size x size, in bounded blocks."""
    resized = torch.empty(len(images), images.shape[1], size, size, dtype=torch.uint8)
    for block in torch.arange(len(images)).split(1000):
        scaled = F.interpolate(
            images[block].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        resized[block] = scaled.round_().clamp_(0, 255).to(torch.uint8)
    return resized


@functools.cache  # deterministic, and a few seconds to make: made once per process
def synthetic(train: bool) -> ImageSet:
    """A deterministic CIFAR-shaped 10-class set: each class a smooth periodic colour texture.

    A sample is its class texture, circularly shifted to a random position, at a random contrast,
    blended with another class's texture and buried in Gaussian noise. A linear classifier stays
    near chance (about 12 %); ResNet-20 passes 90 % after about 200 steps of batch 64.
    """
    num_classes, count = 10, SYNTHETIC_SIZES[train]
    textures = _periodic_textures(num_classes, torch.Generator().manual_seed(1234))
    rng = torch.Generator().manual_seed(1 if train else 2)
    labels = torch.randint(num_classes, (count,), generator=rng)
    distractors = (labels + torch.randint(1, num_classes, (count,), generator=rng)) % num_classes
    contrast = 0.6 + 0.8 * torch.rand(count, 1, 1, 1, generator=rng)
    blend = 0.5 * torch.rand(count, 1, 1, 1, generator=rng)
    shift_rows = torch.randint(IMAGE_SIZE, (count, 1), generator=rng)
    shift_cols = torch.randint(IMAGE_SIZE, (count, 1), generator=rng)
    pixels = torch.arange(IMAGE_SIZE)
    images = torch.empty(count, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    for block in torch.arange(count).split(1000):  # bounded float intermediates
        mixed = contrast[block] * textures[labels[block]] + blend[block] * textures[distractors[block]]
        rows, cols = (pixels + shift_rows[block]) % IMAGE_SIZE, (pixels + shift_cols[block]) % IMAGE_SIZE
        noisy = _take(mixed, rows, cols).add_(torch.randn(mixed.shape, generator=rng), alpha=0.7)
        images[block] = noisy.mul_(48).add_(128).clamp_(0, 255).to(torch.uint8)
    return ImageSet(images, labels, num_classes)


def _periodic_textures(count: int, rng: torch.Generator, max_frequency: int = 3) -> torch.Tensor:
    """Random smooth images that tile the plane: low spatial frequencies only, unit variance."""
    spectrum = torch.zeros(count, 3, IMAGE_SIZE, IMAGE_SIZE // 2 + 1, dtype=torch.complex64)
    rows = [*range(max_frequency + 1), *range(IMAGE_SIZE - max_frequency, IMAGE_SIZE)]
    shape = (count, 3, len(rows), max_frequency + 1)
    spectrum[:, :, rows, : max_frequency + 1] = torch.complex(
        torch.randn(shape, generator=rng), torch.randn(shape, generator=rng)
    )
    spectrum[:, :, 0, 0] = 0
    textures = torch.fft.irfft2(spectrum, s=(IMAGE_SIZE, IMAGE_SIZE))
    return textures / textures.std(dim=(1, 2, 3), keepdim=True)


def cifar10(data_dir: Path, train: bool) -> ImageSet:
    """CIFAR-10 through torchvision under data_dir, downloaded when missing and online."""
    from torchvision.datasets import CIFAR10

    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        dataset = CIFAR10(str(data_dir), train=train, download=not (data_dir / "cifar-10-batches-py").is_dir())
    except (OSError, RuntimeError) as error:
        raise DatasetError(
            f"cannot load CIFAR-10 from {data_dir} ({error}). Download "
            f"cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
            f"so that {data_dir / 'cifar-10-batches-py' / 'data_batch_1'} exists."
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    images = torch.from_numpy(np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2)))
    return ImageSet(images, torch.tensor(dataset.targets, dtype=torch.int64), len(dataset.classes))


def check_dataset(name: str, data_dir: str | Path) -> None:
    """Raise DatasetError, saying what is missing, unless dataset name's training images are under data_dir. Only
    looks, so that a process can check its data before anything else; CIFAR-10, when absent, is downloaded now
    (or the error says where to get it)."""
    root = Path(data_dir)
    if name == "imagefolder":
        train = _split_folder(root, "train")
        if not any(entry.is_dir() and any(entry.iterdir()) for entry in train.iterdir()):
            raise DatasetError(f"no images in class folders under {train}: imagefolder expects {train}/<class>/<image>")
    elif name == "cifar10" and not (root / "cifar-10-batches-py").is_dir():
        cifar10(root, train=True)


def _split_folder(root: Path, split: str) -> Path:
    """root/split of an image folder tree; DatasetError if there is none."""
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"no folder {folder}: imagefolder expects {root}/train/<class>/* and {root}/test/<class>/*")
    return folder


def image_folder(root: Path, train: bool, image_size: int = IMAGE_SIZE) -> ImageSet:
    """An ImageFolder tree root/{train,test}/<class>/<image>; images of any size and mode (grayscale, RGBA,
    palette) become image_size x image_size RGB."""
    split = _split_folder(root, "train" if train else "test")
    folder = _listed(split)
    train_classes = sorted(entry.name for entry in (root / "train").iterdir() if entry.is_dir())
    if folder.classes != train_classes:
        raise DatasetError(f"{split} has classes {folder.classes}, but {root / 'train'} has {train_classes}")
    images = np.stack([_load_rgb(path, image_size) for path, _ in folder.samples]).transpose(0, 3, 1, 2)
    labels = torch.tensor(folder.targets, dtype=torch.int64)
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), labels, len(folder.classes))


def _listed(split: Path) -> "ImageFolder":
    """The images of an image folder's split, listed (not read); DatasetError if there are none."""
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(split), allow_empty=True)  # a skewed share may lack a class, not its folder
    except (FileNotFoundError, OSError) as error:
        raise DatasetError(f"cannot read images under {split}: {error}") from None
    if not folder.samples:
        raise DatasetError(f"no images under {split}")
    return folder


def dataset_size(name: str, data_dir: str | Path, train: bool) -> int:
    """How many images load_dataset(name, data_dir, train) gives, without reading them (so that what they cost at
    another size can be known before they are resized); DatasetError where load_dataset would raise it."""
    if name == "imagefolder":
        return len(_listed(_split_folder(Path(data_dir), "train" if train else "test")).samples)
    if name not in DATASET_SIZES:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    return DATASET_SIZES[name][train]


def _load_rgb(path: str, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


def digits() -> ImageSet:
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 grayscale images of 10 classes, offline."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gray = torch.from_numpy(bunch.images * (255 / 16)).round().to(torch.uint8)  # pixel values 0..16
    return ImageSet(gray.unsqueeze(1).expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(bunch.target).long(), 10)


def digits_split(train: bool) -> ImageSet:
    """The digits' fixed train (1,438 images) or test (359) split: real images small enough for whole runs in tests."""
    training, test = held_out(digits(), DIGITS_TEST_FRACTION, seed=0)
    return training if train else test


def write_image_folder(root: Path, split: str, data: ImageSet) -> None:
    """data as PNG files root/split/<class>/<n>.png, the layout image_folder reads: a folder for every class,
    empty where a skewed share has none of it, so that labels keep their meaning on every learner."""
    from PIL import Image

    width = len(str(data.num_classes - 1))  # 00..11, not 0, 1, 10, 11, 2: folders sort as the labels do
    for label in range(data.num_classes):
        (root / split / f"{label:0{width}d}").mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(data.images, data.labels.tolist())):
        folder = root / split / f"{label:0{width}d}"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index}.png")


def held_out(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """A seeded split of data into (what to train on, a fraction held out for evaluation); both non-empty."""
    count = round(len(data) * fraction)
    if not 0 < count < len(data):
        raise DatasetError(f"holding out {fraction:g} of {len(data)} images leaves one side empty")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(order[count:].sort().values), data.subset(order[:count].sort().values)


def shard_indices(num_samples: int, num_shards: int, seed: int) -> list[torch.Tensor]:
    """Disjoint, equal-sized, seeded shards of range(num_samples); the remainder is left out."""
    if not 0 < num_shards <= num_samples:
        raise ValueError(f"cannot split {num_samples} samples into {num_shards} shards")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    size = num_samples // num_shards
    return [order[index * size : (index + 1) * size].sort().values for index in range(num_shards)]


def channel_sums(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel sums of uint8 images' pixels and of their squares, on the 0..1 scale: what learners
    report so that a leader without data can standardise everyone's images the same way."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for block in images.split(4096):
        pixels = block.to(torch.float64).div_(255).transpose(0, 1).reshape(3, -1)
        total += pixels.sum(1)
        squares += pixels.square().sum(1)
    return total.tolist(), squares.tolist()


MIN_STD = 0.01  # a channel that barely varies is not blown up into noise (nor by a summary that says so)


def stats_from_sums(
    sums: list[float], squares: list[float], pixels_per_channel: float
) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation from channel_sums' totals over pixels_per_channel pixels."""
    mean = [total / pixels_per_channel for total in sums]
    std = [max(MIN_STD, max(0.0, square / pixels_per_channel - m * m) ** 0.5) for square, m in zip(squares, mean)]
    return mean, std


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images, on the 0..1 scale."""
    return stats_from_sums(*channel_sums(images), images.numel() // 3)


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 images as float32, scaled to 0..1 and standardised per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return images.to(torch.float32).div_(255).sub_(mean_t).div_(std_t)


def random_crop_flip(images: torch.Tensor, rng: torch.Generator, flip: bool = True) -> torch.Tensor:
    """The standard CIFAR augmentation on a batch: a random crop of the image zero-padded by an eighth of its
    size (4 pixels at 32x32) and a random horizontal flip, each drawn per image."""
    count, _, height, width = images.shape
    padding = max(1, height // 8)
    padded = F.pad(images, (padding,) * 4)
    top = torch.randint(2 * padding + 1, (count, 1), generator=rng)
    left = torch.randint(2 * padding + 1, (count, 1), generator=rng)
    rows = top + torch.arange(height)
    cols = left + torch.arange(width)
    if flip:
        mirrored = torch.rand(count, 1, generator=rng) < 0.5
        cols = torch.where(mirrored, cols.flip(1), cols)
    return _take(padded, rows, cols)


def _take(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Per-image pixel selection: out[n, c, i, j] = images[n, c, rows[n, i], cols[n, j]]."""
    count, channels = images.shape[:2]
    batch = torch.arange(count).view(count, 1, 1, 1)
    channel = torch.arange(channels).view(1, channels, 1, 1)
    return images[batch, channel, rows.view(count, 1, -1, 1), cols.view(count, 1, 1, -1)]


def seeded(seed: int) -> torch.Generator:
    """A generator seeded with seed modulo 2**64, the seeds torch takes: seeds mixed from a run's seed, a learner
    and a round (which a leader names) may go beyond them, and a seed below them is itself."""
    return torch.Generator().manual_seed(seed % 2**64)


class BatchSchedule:
    """Which samples of a shard make up round r's batch: a fresh seeded shuffle every epoch.

    A pure function of (seed, round), so a learner can start or resume at any round. A shard smaller than
    the batch (skewed partitions make some) is one whole batch: its learner claims fewer samples."""

    def __init__(self, shard_size: int, batch_size: int, seed: int) -> None:
        if shard_size < 1 or batch_size < 1:
            raise ValueError(f"batch size {batch_size} and shard size {shard_size} must be positive")
        self.shard_size, self.batch_size, self.seed = shard_size, min(batch_size, shard_size), seed
        self.batches_per_epoch = shard_size // self.batch_size
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.int64)

    def indices(self, round_index: int) -> torch.Tensor:
        """The shard indices of the batch for round_index."""
        epoch, step = divmod(round_index, self.batches_per_epoch)
        if epoch != self._epoch:
            rng = seeded(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.shard_size, generator=rng)
        return self._order[step * self.batch_size : (step + 1) * self.batch_size]

    def augmentation_rng(self, round_index: int) -> torch.Generator:
        """A generator seeded for round_index's crops and flips."""
        return seeded(self.seed * 1_000_003 + 7_919 * round_index + 1)


def training_batch(
    data: ImageSet, schedule: BatchSchedule, round_index: int, mean: list[float], std: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round round_index's augmented, normalised images and their labels."""
    indices = schedule.indices(round_index)
    images = random_crop_flip(data.images[indices], schedule.augmentation_rng(round_index))
    return normalize(images, mean, std), data.labels[indices]
