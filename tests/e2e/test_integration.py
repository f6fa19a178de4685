"""Whole runs: a real leader and real learner processes on localhost, from start to exit."""

import os
import subprocess
import sys

import torch
from PIL import Image

from federated.leader.metrics import read_metrics
from federated.net import guard
from model import build_model
from tests.support.processes import ROOT, SMALL_IMAGES, run_federation
from tests.support.runs import logs


def test_two_learners_reach_90_percent_on_the_synthetic_set(synthetic_run):
    out, codes = synthetic_run  # the session's plain run (tests/e2e/conftest.py), which test_faults resumes
    assert codes == [0, 0, 0], logs(out)
    records = read_metrics(out / "metrics.jsonl")
    rounds = [r for r in records if "train_loss" in r]
    evaluations = [r for r in records if "test_accuracy" in r]
    assert [r["round"] for r in rounds] == list(range(1, 161))
    assert all(r["learners"] == 2 and r["samples"] == 64 and r["bytes_in"] > 0 and r["bytes_out"] > 0 for r in rounds)
    assert {"round", "epoch", "train_loss", "learners", "seconds", "bytes_in", "bytes_out"} <= set(rounds[0])
    assert all(
        0 < r["gradients_s"]
        and 0 < r["step_s"]
        and 0 < r["push_s"]
        and r["gradients_s"] + r["step_s"] + r["push_s"] <= r["seconds"]
        for r in rounds
    )
    assert [r["round"] for r in evaluations] == [100, 156, 160]  # --eval-every, the epoch end (156), the end
    assert evaluations[-1]["test_accuracy"] >= 0.90, logs(out)
    assert not any("not_learning" in r for r in records)  # a run that learns is not warned
    assert "not learning" not in (out / "leader.log").read_text()
    model = build_model("resnet20")
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert (out / "metrics.png").stat().st_size > 10_000


def test_a_run_that_does_not_learn_is_warned_once_naming_the_learning_rates(tmp_path):
    # a server learning rate of 1e-6 leaves the model where it started
    flags = ["--dataset", "synthetic", "--strategy", "fedavg", "--server-lr", "1e-6", "--rounds", "2"]
    codes = run_federation(tmp_path, 2, [*SMALL_IMAGES, *flags, "--local-steps", "4"])
    assert codes == [0, 0, 0], logs(tmp_path)
    log = (tmp_path / "leader.log").read_text()
    assert log.count("the model is not learning") == 1, log
    assert "--server-lr (now 1e-06) and --client-lr (now 0.05)" in log
    assert "after a warning at round 2 that the model was not learning" in log  # in the final summary too
    warned = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "not_learning" in r]
    assert [r["round"] for r in warned] == [2] and "--server-lr (now 1e-06)" in warned[0]["not_learning"]


def make_image_folder(root, train_per_class: int, test_per_class: int) -> None:
    sizes = [(48, 40), (32, 32), (20, 64)]
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            (root / split / label).mkdir(parents=True)
            for index in range(count):
                Image.new("RGB", sizes[index % 3], colour).save(root / split / label / f"{index}.jpg")


def test_resnet18_trains_on_learners_local_image_folders(tmp_path):
    data = tmp_path / "images"
    make_image_folder(data, train_per_class=16, test_per_class=4)
    out = tmp_path / "run"
    codes = run_federation(
        out,
        2,
        [
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(data),
            "--model",
            "resnet18",
            "--rounds",
            "2",
            "--batch-size",
            "4",
        ],
        learner_args=["--dataset", "imagefolder", "--data-dir", str(data)],
    )
    assert codes == [0, 0, 0], logs(out)
    leader_log = (out / "leader.log").read_text()
    assert "data shard" not in leader_log  # raw data never crossed the network
    assert all("training on local imagefolder data: 32 images" in (out / f"learner{i}.log").read_text() for i in (0, 1))
    model = build_model("resnet18", num_classes=2)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert [r["learners"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r] == [2, 2]


def test_every_entry_point_explains_its_flags_and_never_shows_the_token():
    env = {**os.environ, guard.TOKEN_VARIABLE: "do-not-print-me"}
    helps = {
        script: subprocess.Popen(
            [sys.executable, script, "--help"],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for script in ("leader.py", "learner.py", "launch.py", "bench.py")
    }  # at once: each imports torch
    for script, process in helps.items():
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0 and "--" in output and "usage" in output, script
        assert "do-not-print-me" not in output, script


def test_a_leader_with_an_impossible_batch_says_so(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "leader.py",
            "--dataset",
            "synthetic",
            "--learners",
            "2",
            "--batch-size",
            "9000",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "cannot give 2 learners 9000 of 10000 samples each" in result.stderr


def test_float16_on_the_wire_halves_the_bytes(synthetic_run, tls_run):
    # the session's float32 run and its float16 one (over TLS: the bytes counted are the payloads', before TLS)
    bytes_per_round = {}
    for dtype, (out, codes) in (("float32", synthetic_run), ("float16", tls_run)):
        assert codes and set(codes) == {0}, logs(out)  # (tls_run's two learners are one process)
        rounds = [r for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]
        assert all(r["learners"] == 2 for r in rounds)
        middle = rounds[4]  # a round like any other (the last pushes the final state to everyone)
        bytes_per_round[dtype] = middle["bytes_in"] + middle["bytes_out"]
    assert 0.49 < bytes_per_round["float16"] / bytes_per_round["float32"] < 0.52
