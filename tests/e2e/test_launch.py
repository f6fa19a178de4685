"""launch.py as `make demo` uses it: the learners start once the leader listens, everything on loopback, and
servers say the port they got."""

import re
import subprocess
import sys

from federated.tools import launch

LISTEN_LATER = """import socket, sys, time
time.sleep(1.0)
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
time.sleep(60)
"""


def test_waiting_for_a_port_ends_once_it_accepts_connections(port):
    listener = subprocess.Popen([sys.executable, "-c", LISTEN_LATER, str(port)])
    try:
        assert launch.wait_for_port("127.0.0.1", port, listener, timeout=60)
        assert listener.poll() is None  # it was the listener that answered, still there
    finally:
        listener.kill()
        listener.wait()


def test_waiting_for_a_port_ends_when_the_process_that_was_to_listen_exits(port):
    quitter = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert not launch.wait_for_port("127.0.0.1", port, quitter, timeout=60)
    assert quitter.returncode == 3


def test_a_leader_that_stops_before_it_listens_gets_no_learners(tmp_path, port):
    leader, learners = launch.start_federation(2, ["--no-such-flag"], port, tmp_path)
    assert learners == [] and launch.wait_all([leader], 60) == [2]
    assert "--no-such-flag" in (tmp_path / "leader.log").read_text()


def test_learners_started_by_launch_find_their_leader_listening_and_listen_on_loopback(synthetic_run):
    out, codes = synthetic_run  # started by launch.start_federation, as make demo starts one
    assert codes == [0, 0, 0], (out / "learner0.log").read_text()
    for learner in ("learner0", "learner1"):
        log = (out / f"{learner}.log").read_text()
        # (two learners of one address may wait a moment for each other's GetModel turn: the leader's limit)
        assert "Connection refused" not in log and "failed to connect" not in log, log
        assert re.search(r"LearnerService listening on 127\.0\.0\.1:[1-9]\d* \(", log), log
        assert "0.0.0.0" not in log
