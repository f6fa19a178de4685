"""Data: the three sources, sharding, batches and augmentation."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import utils


def test_synthetic_is_deterministic_cifar_shaped_and_balanced():
    first, again = utils.synthetic(train=False), utils.synthetic(train=False)
    assert first.images.shape == (2000, 3, 32, 32) and first.images.dtype == torch.uint8
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert first.num_classes == 10 and first.labels.bincount().min() > 150


def test_synthetic_train_and_test_differ():
    assert not torch.equal(utils.synthetic(train=True).images[:10], utils.synthetic(train=False).images[:10])


def test_synthetic_is_not_linearly_separable():
    train, test = utils.synthetic(train=True).subset(torch.arange(4000)), utils.synthetic(train=False)
    features = lambda images: torch.cat([images.flatten(1).float() / 255, torch.ones(len(images), 1)], 1)
    weights = torch.linalg.lstsq(features(train.images), torch.nn.functional.one_hot(train.labels).float()).solution
    accuracy = (features(test.images) @ weights).argmax(1).eq(test.labels).float().mean()
    assert accuracy < 0.3


def test_shards_are_disjoint_equal_and_reproducible():
    shards = utils.shard_indices(103, 4, seed=5)
    assert [len(shard) for shard in shards] == [25] * 4
    assert len(torch.cat(shards).unique()) == 100
    assert all(torch.equal(a, b) for a, b in zip(shards, utils.shard_indices(103, 4, seed=5)))
    assert not torch.equal(shards[0], utils.shard_indices(103, 4, seed=6)[0])


def test_shards_refuse_more_shards_than_samples():
    with pytest.raises(ValueError):
        utils.shard_indices(3, 4, seed=0)


def test_batch_schedule_visits_every_sample_once_per_epoch_in_a_new_order():
    schedule = utils.BatchSchedule(shard_size=20, batch_size=5, seed=1)
    epoch0 = torch.cat([schedule.indices(r) for r in range(4)])
    epoch1 = torch.cat([schedule.indices(r) for r in range(4, 8)])
    assert sorted(epoch0.tolist()) == list(range(20)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(schedule.indices(2), utils.BatchSchedule(20, 5, 1).indices(2))


def test_random_crop_flip_shifts_within_the_padding_and_mirrors():
    image = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32).repeat(64, 3, 1, 1)
    out = utils.random_crop_flip(image, torch.Generator().manual_seed(0))
    assert out.shape == image.shape
    centre = out[:, 0, 16, 16]
    rows, cols = centre // 32 - 16, centre % 32 - 16
    assert rows.abs().max() <= 4 and ((cols.abs() <= 4) | ((cols + 1).abs() <= 4)).all()
    mirrored = (out[:, 0, 16, 17] - out[:, 0, 16, 16]) < 0
    assert 10 < mirrored.sum() < 54


def test_channel_stats_and_normalize_standardise():
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    mean, std = utils.channel_stats(images)
    normalised = utils.normalize(images, mean, std)
    assert torch.allclose(normalised.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(normalised.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)


def test_image_folder_resizes_any_size_and_mode(tmp_path: Path):
    modes = [("RGB", (40, 20)), ("L", (32, 32)), ("RGBA", (7, 9)), ("P", (64, 64))]
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            for index, (mode, size) in enumerate(modes):
                Image.new(mode, size, color=index * 40).save(tmp_path / split / label / f"{index}.png")
    data = utils.load_dataset("imagefolder", tmp_path, train=True)
    assert data.images.shape == (8, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0] * 4 + [1] * 4 and data.num_classes == 2


def test_image_folder_without_a_split_says_what_is_expected(tmp_path: Path):
    with pytest.raises(utils.DatasetError, match="train/<class>"):
        utils.load_dataset("imagefolder", tmp_path, train=True)


def write_fake_cifar(root: Path, per_batch: int) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))


def test_cifar10_loads_torchvisions_batches_as_nchw_uint8(tmp_path: Path, monkeypatch):
    write_fake_cifar(tmp_path, per_batch=6)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)  # fake checksums
    train, test = utils.cifar10(tmp_path, train=True), utils.cifar10(tmp_path, train=False)
    assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())
    assert torch.equal(test.images[0], torch.from_numpy(raw["data"][0].reshape(3, 32, 32)))
    assert test.labels.tolist() == raw["labels"] and train.num_classes == 10


def test_cifar10_offline_says_where_to_put_the_files(tmp_path: Path, monkeypatch):
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(utils.DatasetError, match="cifar-10-batches-py"):
        utils.cifar10(tmp_path, train=False)


def test_a_shard_smaller_than_a_batch_is_one_smaller_batch():
    schedule = utils.BatchSchedule(shard_size=10, batch_size=64, seed=1)
    assert schedule.batch_size == 10 and schedule.batches_per_epoch == 1
    assert sorted(schedule.indices(3).tolist()) == list(range(10))


def test_channel_sums_give_the_statistics_of_the_images_they_summarise():
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    sums, squares = utils.channel_sums(images)
    mean, std = utils.stats_from_sums(sums, squares, 50 * 8 * 8)
    pixels = images.double().div(255).transpose(0, 1).reshape(3, -1)
    assert mean == pytest.approx(pixels.mean(1).tolist())
    assert std == pytest.approx(pixels.std(1, unbiased=False).tolist())


def test_resize_and_held_out_split(tmp_path: Path):
    data = utils.load_dataset("synthetic", tmp_path, train=False, image_size=16)
    assert data.images.shape == (2000, 3, 16, 16) and data.images.dtype == torch.uint8
    train, held = utils.held_out(data, 0.25, seed=3)
    assert (len(train), len(held)) == (1500, 500)
    assert not set(train.labels.tolist()) - set(range(10))
    with pytest.raises(utils.DatasetError, match="empty"):
        utils.held_out(data.subset(torch.arange(2)), 0.1, seed=0)


def test_image_folders_written_for_a_skewed_share_keep_every_class(tmp_path: Path):
    digits = utils.digits()
    share = digits.subset(torch.nonzero(digits.labels >= 8).flatten()[:20])  # only classes 8 and 9
    utils.write_image_folder(tmp_path, "train", share)
    loaded = utils.load_dataset("imagefolder", tmp_path, train=True, image_size=8)
    assert loaded.num_classes == 10
    as_set = lambda data: sorted(
        (label, image.numpy().tobytes()) for label, image in zip(data.labels.tolist(), data.images)
    )
    assert as_set(loaded) == as_set(share)  # the same images under the same labels


def test_the_digits_split_is_fixed_disjoint_and_as_large_as_dataset_size_says():
    train, test = (utils.load_dataset("digits", "unused", train=split, image_size=8) for split in (True, False))
    assert (len(train), len(test)) == (
        utils.dataset_size("digits", "unused", True),
        utils.dataset_size("digits", "unused", False),
    )
    everything = utils.digits()
    assert len(train) + len(test) == len(everything)
    as_keys = lambda data: {(label, image.numpy().tobytes()) for label, image in zip(data.labels.tolist(), data.images)}
    assert as_keys(train) | as_keys(test) == as_keys(everything) and not as_keys(train) & as_keys(test)
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(10))
