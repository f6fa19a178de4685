"""Data that never leaves the learners, the leader's side without servers: starting from saved weights, a
resume without its init file, partitions that cannot be met, states naming models they do not hold, and
skewed shards of the leader's own data."""

import json

import pytest
import torch

import utils
from federated.core.training import evaluate
from federated.learner import state as learner_state
from federated.wire import codec, messages
from model import build_model
from tests.support.live import leader_from


def test_the_global_model_starts_from_init_weights(tmp_path):
    saved = build_model("resnet20", num_classes=10)
    with torch.no_grad():
        for parameter in saved.parameters():
            parameter.add_(0.01)
    torch.save(saved.state_dict(), tmp_path / "model.pt")
    leader = leader_from(
        ["--dataset", "synthetic", "--out", str(tmp_path / "run"), "--init", str(tmp_path / "model.pt")]
    )
    started = leader.global_model.model.state_dict()
    assert all(torch.equal(started[name], tensor) for name, tensor in saved.state_dict().items())
    images, labels = leader.data.test_images[:200], leader.data.test_labels[:200]
    assert evaluate(leader.global_model.model, images, labels) == evaluate(saved, images, labels)
    served = codec.decode(leader.global_model.encoded_state)  # what learners fetch: the saved weights
    assert torch.equal(served.tensors["fc.weight"], saved.fc.weight.detach())


def test_a_resumed_run_neither_asks_again_for_an_evaluation_nor_needs_its_init_file(tmp_path):
    init = tmp_path / "init.pt"
    torch.save(build_model("resnet20").state_dict(), init)
    args = ["--dataset", "synthetic", "--rounds", "20", "--eval-every", "5", "--init", str(init)]
    leader = leader_from([*args, "--out", str(tmp_path / "run")])
    leader.rounds.save_checkpoint(5)  # an evaluation round
    init.unlink()
    resumed = leader_from(["--resume", str(tmp_path / "run")])
    state = codec.decode(resumed.global_model.encoded_state)
    assert messages.round_of(state) == 5 and "evaluate" not in state.metadata


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--learners", "400"], "--partition iid"),  # 25 images each, fewer than a batch of 32
        (["--learners", "4", "--partition", "classes", "--classes-per-learner", "11"], "--partition classes"),
    ],
)
def test_a_partition_that_cannot_be_met_stops_the_leader_saying_why(tmp_path, flags, says):
    with pytest.raises(utils.DatasetError, match=says):
        leader_from(["--dataset", "synthetic", "--batch-size", "32", "--out", str(tmp_path), *flags])


def test_a_state_that_does_not_hold_the_model_it_names_is_refused_before_it_is_built():
    metadata = {
        "architecture": "torchvision:vgg19_bn",
        "num_classes": "100000",
        "batch_size": "64",
        "seed": "0",
        "round": "0",
    }
    state = codec.decode(codec.encode({"x": torch.zeros(1)}, metadata))
    with pytest.raises(codec.PayloadError, match="do not match the model"):
        learner_state.check_fits(codec.spec_of(state.tensors), messages.StateInfo.from_payload(state), torch.float32)
    for bad in (
        {"mean": "0.5,0.5", "std": "0.2,0.2"},
        {"mean": "inf,0,0", "std": "1,1,1"},
        {"mean": "0,0,0", "std": "1e-300,1,1"},
        {"image_size": "100000"},
    ):
        with pytest.raises(codec.PayloadError):
            messages.StateInfo.from_payload(codec.decode(codec.encode({"x": torch.zeros(1)}, {**metadata, **bad})))


def test_with_skewed_shards_of_its_own_data_an_epoch_is_as_many_images_as_the_dataset_holds(tmp_path):
    leader = leader_from(
        [
            "--dataset",
            "synthetic",
            "--learners",
            "10",
            "--partition",
            "dirichlet",
            "--alpha",
            "0.1",
            "--batch-size",
            "32",
            "--out",
            str(tmp_path),
        ]
    )
    sizes = [len(shard) for shard in leader.data.shards.indices]
    assert len(set(sizes)) > 1 and sum(sizes) == 10_000
    assert leader.planner.schedule.steps_per_epoch == 10_000 // 10 // 32
    saved = json.loads((tmp_path / "partition.json").read_text())
    assert [entry["samples"] for entry in saved] == sizes
    assert all(sum(entry["label_counts"]) == entry["samples"] for entry in saved)
