"""A learner's first contact, as a new user meets it: learner.py started without its leader says once what it
waits for, then how it goes now and then, and ends naming --connect-timeout; waits are logged by Progress."""

import logging
import subprocess
import sys

from federated.learner import session
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
