"""A learner's first contact, as a new user meets it: learner.py started without its leader says once what it
waits for, then how it goes now and then, and ends naming --connect-timeout (waits are logged by Progress);
a --data-dir without the learner's dataset is refused before the leader is contacted."""

import socket
import subprocess
import sys

import pytest

from federated.tools import launch


def run_learner(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """learner.py with args, to its end; its output as text."""
    return subprocess.run(
        [sys.executable, "learner.py", "--threads", "1", *args],
        cwd=launch.ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
    )


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


def test_a_learner_refuses_a_data_dir_without_its_dataset_before_it_contacts_the_leader(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as leader:  # listens: any contact would be accepted
        leader.settimeout(0)
        address = f"127.0.0.1:{leader.getsockname()[1]}"
        done = run_learner(
            "--leader",
            address,
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(tmp_path / "mine"),
            "--connect-timeout",
            "3",
        )
        with pytest.raises(BlockingIOError):  # nobody came
            leader.accept()
    assert done.returncode == 2, done.stdout
    error = done.stdout.splitlines()[-1]
    assert " ERROR " in error and f"no folder {tmp_path / 'mine' / 'train'}" in error, done.stdout
    assert "imagefolder expects" in error and "give --data-dir the folder that holds it" in error
    assert "waiting for the leader" not in done.stdout
