"""A learner's first contact, as a new user meets it: learner.py started without its leader says once what it
waits for, then how it goes now and then, and ends naming --connect-timeout (waits are logged by Progress);
a --data-dir without the learner's dataset is refused before the leader is contacted."""

import logging
import socket
import subprocess
import sys

import pytest
import torch

import utils
from federated.learner import data, session
from federated.tools import launch


def run_learner(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """learner.py with args, to its end; its output as text."""
    return subprocess.run([sys.executable, "learner.py", "--threads", "1", *args], cwd=launch.ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def test_a_learner_without_its_leader_says_once_what_it_waits_for_and_ends_naming_the_flag(port):
    done = run_learner("--leader", f"127.0.0.1:{port}", "--connect-timeout", "4")
    lines = done.stdout.splitlines()
    assert done.returncode == 1, done.stdout
    # One line says what it waits for, where and for how long; it tried several times (0.5, 1, 2 s apart) and
    # said nothing per try.
    waiting = [line for line in lines if "waiting for the leader" in line]
    assert len(waiting) == 1 and f"the leader at 127.0.0.1:{port} for up to" in waiting[0], done.stdout
    assert "(--connect-timeout)" in waiting[0]
    assert not [line for line in lines if "retrying" in line], done.stdout
    error = lines[-1]
    assert " ERROR " in error and f"127.0.0.1:{port}" in error, done.stdout
    assert "leader.py running" in error and "--connect-timeout 4 s" in error and error.endswith("--connect-timeout.")


def test_a_wait_says_what_it_waits_for_once_then_how_it_goes_at_most_every_interval(caplog):
    now = [100.0]
    progress = session.Progress("the leader at 10.0.0.5:50051", deadline=400.0, flag="--connect-timeout",
                                interval=30.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="learner"):
        for _ in range(95):  # a try a second, each refused
            progress.failed("connection refused")
            now[0] += 1.0
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == ("waiting for the leader at 10.0.0.5:50051 for up to 300 s (--connect-timeout): "
                           "connection refused")
    assert messages[1:] == [f"still waiting for the leader at 10.0.0.5:50051 ({waited} s so far, {300 - waited} s "
                            "left): connection refused" for waited in (30, 60, 90)]


def test_a_learner_refuses_a_data_dir_without_its_dataset_before_it_contacts_the_leader(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as leader:  # listens: any contact would be accepted
        leader.settimeout(0)
        address = f"127.0.0.1:{leader.getsockname()[1]}"
        done = run_learner("--leader", address, "--dataset", "imagefolder", "--data-dir", str(tmp_path / "mine"),
                           "--connect-timeout", "3")
        with pytest.raises(BlockingIOError):  # nobody came
            leader.accept()
    assert done.returncode == 2, done.stdout
    error = done.stdout.splitlines()[-1]
    assert " ERROR " in error and f"no folder {tmp_path / 'mine' / 'train'}" in error, done.stdout
    assert "Give --data-dir the folder that holds train/<class>/<image>" in error
    assert "waiting for the leader" not in done.stdout


def test_an_image_folder_needs_a_folder_of_images_per_class_to_pass_the_check(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "cat.png").write_bytes(b"")  # images straight in train/, no class folders
    with pytest.raises(utils.DatasetError, match="one folder of images per class"):
        data.check_data_dir("imagefolder", str(tmp_path))
    utils.write_image_folder(tmp_path, "train", utils.digits().subset(torch.arange(20)))
    data.check_data_dir("imagefolder", str(tmp_path))
    data.check_data_dir("synthetic", str(tmp_path / "nowhere"))  # made in memory: no folder to check
