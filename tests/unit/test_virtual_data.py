"""The own data of a process's learners (--virtual N with --dataset): each its folder DIR/i, or its share of one
dataset loaded once."""

import pytest
import torch

import utils
from federated.learner.data import LocalData, LocalShare, own_data
from federated.wire.messages import StateInfo
from tests.support.live import learner_config

INFO = StateInfo("resnet20", 10, 32, 7, (), (), "float32", image_size=8)


def test_one_local_dataset_is_loaded_once_and_split_into_seeded_iid_shares():
    config = learner_config(["--dataset", "digits", "--virtual", "3", "--eval-fraction", "0.25"])
    shares = own_data(config)
    assert shares is not None and all(isinstance(share, LocalShare) for share in shares)
    loaded = [share.load(INFO) for share in shares]
    whole, held_out = LocalData(config).load(INFO)
    for rows, (data, _) in zip(utils.shard_indices(len(whole), 3, INFO.seed), loaded, strict=True):
        assert torch.equal(data.labels, whole.labels[rows]) and torch.equal(data.images, whole.images[rows])
    assert held_out is not None
    assert sum(len(held) for _, held in loaded if held is not None) == len(held_out) // 3 * 3
    assert shares[0].load(INFO)[0] is loaded[0][0]  # (loaded once: the same share again, no second copy)


def test_folders_zero_to_n_minus_one_give_each_learner_its_own(tmp_path):
    digits = utils.digits()
    for index in range(2):
        utils.write_image_folder(
            tmp_path / str(index), "train", digits.subset(torch.arange(index * 10, index * 10 + 10))
        )
    config = learner_config(["--dataset", "imagefolder", "--data-dir", str(tmp_path), "--virtual", "2"])
    own = own_data(config)
    assert own is not None and [local.data_dir for local in own] == [str(tmp_path / "0"), str(tmp_path / "1")]
    second, _ = own[1].load(INFO)
    assert torch.equal(second.labels.sort().values, digits.labels[10:20].sort().values)


def test_folders_as_launch_writes_them_serve_a_pool_and_some_learners_folders_without_the_others_are_refused(
    tmp_path,
):
    for index in (0, 2):  # no folder of learner 1 nor 3
        (tmp_path / "some" / str(index)).mkdir(parents=True)
    config = learner_config(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "some"), "--virtual", "4"])
    with pytest.raises(utils.DatasetError, match=r"some of the 4 learners of --virtual but not 1, 3"):
        own_data(config)
    digits = utils.digits()
    for index in range(2):  # launch.py --write-digits's layout
        utils.write_image_folder(tmp_path / "written" / f"learner{index}", "train", digits.subset(torch.arange(10)))
    config = learner_config(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "written"), "--virtual", "2"])
    own = own_data(config)
    assert own is not None and [local.data_dir for local in own] == [
        str(tmp_path / "written" / f"learner{i}") for i in range(2)
    ]
