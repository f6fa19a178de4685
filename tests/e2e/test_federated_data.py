"""Data that never leaves the learners, in whole runs of real processes on localhost: a leader without data
whose learners train and evaluate on their own images, and a torchvision model at 64 pixels on a skewed
partition."""

import json
from pathlib import Path

import pytest
import torch

import utils
from federated.core.training import evaluate
from federated.leader import data as leader_data
from federated.tools import launch
from federated.wire import messages
from model import build_model
from tests.support.processes import start_leader, start_learner
from tests.support.runs import logs, records


def learners_own_images(root: Path, count: int) -> list[Path]:
    launch.write_digits(root, count)
    return [root / f"learner{index}" for index in range(count)]


def run_own_data(out: Path, folders: list[Path], leader_args: list[str], timeout: float = 300) -> list[int | None]:
    """A leader and one learner per image folder, each learner training on its own folder."""
    port = launch.free_port()
    leader = start_leader(out, port, "--learners", str(len(folders)), *leader_args)
    procs = [
        start_learner(out, f"learner{index}", port, "--dataset", "imagefolder", "--data-dir", str(folder))
        for index, folder in enumerate(folders)
    ]
    return launch.wait_all([leader, *procs], timeout)


def test_a_leader_without_data_trains_learners_on_their_own_images_and_their_evaluation_is_the_models(tmp_path):
    folders = learners_own_images(tmp_path / "digits", 2)
    out = tmp_path / "run"
    codes = run_own_data(
        out,
        folders,
        [
            "--dataset",
            "none",
            "--num-classes",
            "10",
            "--image-size",
            "16",
            "--rounds",
            "60",
            "--batch-size",
            "32",
            "--eval-every",
            "20",
        ],
    )
    assert codes == [0, 0, 0], logs(out)
    leader_log = (out / "leader.log").read_text()
    assert "data shard" not in leader_log and "learners hold" in leader_log
    evaluations = [r for r in records(out) if r.get("source") == "learners"]
    rounds = [r["round"] for r in evaluations]
    assert {20, 40, 60} <= set(rounds) and rounds[-1] == 60, logs(out)  # --eval-every, and every epoch's end
    assert not any(r.get("source") == "leader" for r in records(out))  # it has no test split of its own
    final = evaluations[-1]
    assert sorted(final["per_learner"]) == ["0", "1"]
    # The learners' combined evaluation is the global model's on the union of their held-out images
    tests = [utils.load_dataset("imagefolder", folder, train=False, image_size=16) for folder in folders]
    summaries = [
        messages.DataSummary.of(utils.load_dataset("imagefolder", folder, train=True, image_size=16), len(test))
        for folder, test in zip(folders, tests)
    ]
    mean, std = leader_data.combined_normalisation(summaries, 16)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["data"]["mean"] == pytest.approx(mean)
    model = build_model("resnet20", num_classes=10)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    union = torch.cat([data.images for data in tests]), torch.cat([data.labels for data in tests])
    direct = evaluate(model, utils.normalize(union[0], mean, std), union[1])
    assert final["test_samples"] == len(union[1])
    assert final["test_accuracy"] == pytest.approx(direct.accuracy, abs=1e-9)
    assert final["test_loss"] == pytest.approx(direct.loss, rel=1e-4)
    assert final["test_accuracy"] > 0.5, logs(out)  # it trained: chance is 0.1
    assert all("per_learner" in r for r in records(out) if "train_loss" in r)
    assert (out / "metrics.png").stat().st_size > 10_000


def test_a_torchvision_model_trains_at_64_pixels_on_a_skewed_partition(tmp_path):
    folder = learners_own_images(tmp_path / "digits", 1)[0]
    out = tmp_path / "run"
    port = launch.free_port()
    leader = start_leader(
        out,
        port,
        "--learners",
        "2",
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(folder),
        "--image-size",
        "64",
        "--model",
        "torchvision:mobilenet_v3_small",
        "--rounds",
        "3",
        "--batch-size",
        "8",
        "--partition",
        "dirichlet",
        "--alpha",
        "0.3",
        "--tensorboard",
        str(out / "tb"),
    )
    procs = [start_learner(out, f"learner{index}", port) for index in range(2)]
    codes = launch.wait_all([leader, *procs], 300)
    assert codes == [0, 0, 0], logs(out)
    counts = [entry["label_counts"] for entry in json.loads((out / "partition.json").read_text())]
    assert len(counts) == 2 and all(len(row) == 10 for row in counts)
    assert counts[0] != counts[1]  # skewed: not the same mix
    assert (out / "partition.png").stat().st_size > 5_000
    assert any((out / "tb").iterdir())  # TensorBoard events
    assert [r["learners"] for r in records(out) if "train_loss" in r] == [2, 2, 2]
