"""launch.py --ray on a Ray cluster of network-namespace hosts (federated/tools/hosts.py), each node with an
address of its own: the head and a worker node of one CPU each, and a host outside the cluster. The learners are
placed one a node (each a process of two virtual learners), register from their node's address, leave no actor or
process behind, and the run (launch.py and its leader outside the cluster, through Ray Client) reaches the accuracy
of the same run as local processes;
a run launched on the head node and stopped by its --timeout stops cleanly and leaves nothing either. Marked
ray: `make test-ray`."""

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from federated.tools import hosts, launch
from tests.support.runs import records

pytestmark = pytest.mark.ray

HEAD_PORT = 6379  # every host has a network stack of its own: the ports are free there
CLIENT_PORT = 10001  # Ray Client's server on the head (ray start --head starts it)
RUN_TIMEOUT_S = 300
START_TIMEOUT_S = 120
GONE_TIMEOUT_S = 20.0
# FedSGD on the digits at their own 8 pixels: 100 rounds of a batch reach about 0.94. Every round waits for both
# learners and weighs each by its batch of 32 (a power of two: the weighted sum is exact whichever update comes
# first), so the run is the same arithmetic wherever its learners run. (FedAvg weighs by 719 samples, and the
# order of arrival changes the sum's last bits: two local runs of 5 epochs ended 0.025 apart.)
RUN = ["--dataset", "digits", "--image-size", "8", "--rounds", "100", "--batch-size", "32", "--eval-every", "100"]
RUN += ["--min-learners", "2", "--round-timeout", "600"]
# The stopped run's learner processes hold two virtual learners each. (The shared run keeps one learner a process:
# the leader adds a round's updates in the order they arrive, exact for two batches of 32 whichever comes first
# but not for four, whose sum's last bits then differ between runs: 0.9554 on Ray against 0.9471 locally, once.)
POOLS = ("--virtual", "2")
STOPPED_AFTER_S = 20  # the --timeout of a run stopped early: its learners are training by then
RAY = Path(sys.executable).with_name("ray")
CLUSTER_STATE = """import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
groups = [group["state"] for group in ray.util.placement_group_table().values()]
print(json.dumps({"groups": groups}))
"""


@pytest.fixture(scope="module")
def cluster():
    """Three hosts: net[0] outside the cluster, the head on net[1] and a worker node on net[2], one CPU each;
    removed with every process on them after the module's tests; skipped, saying why, where Ray is missing or
    namespaces cannot be made."""
    pytest.importorskip("ray", reason="Ray is an optional extra: make ray (make test-ray installs it and runs these)")
    reason = hosts.unavailable()
    if reason:
        pytest.skip(reason)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        with hosts.Hosts(3) as net:
            ray_start(
                net[1],
                temp,
                "--head",
                "--port",
                str(HEAD_PORT),
                "--ray-client-server-port",
                str(CLIENT_PORT),
                "--include-dashboard=false",
            )
            ray_start(net[2], temp, "--address", head_address(net))
            yield net
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def ray_start(host: hosts.Host, temp: str, *args: str) -> None:
    """`ray start` of a node of one CPU on host, with temp as Ray's temporary directory."""
    command = [*host.prefix, str(RAY), "start", "--node-ip-address", host.address, "--num-cpus", "1", *args]
    command += ["--temp-dir", temp, "--disable-usage-stats"]
    command += ["--object-store-memory", str(80 << 20)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    assert done.returncode == 0, done.stderr


def head_address(net: hosts.Hosts) -> str:
    return f"{net[1].address}:{HEAD_PORT}"


def launch_run(out: Path, *args: str, prefix: Sequence[str] = (), leader_args: Sequence[str] = ()) -> tuple[int, str]:
    """launch.py with RUN (then leader_args) to its end, under prefix; its exit code and console output (the
    leader's log among it)."""
    command = [*prefix, sys.executable, str(launch.ROOT / "launch.py"), "--learners", "2", "--out", str(out), *args]
    command += ["--", *RUN, *leader_args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 60)
    return done.returncode, done.stdout + done.stderr


def final_test(out: Path) -> tuple[float, float]:
    """The test loss and accuracy of a finished run's last evaluation."""
    final = [record for record in records(out) if "test_accuracy" in record][-1]
    return final["test_loss"], final["test_accuracy"]


def processes_on(host: hosts.Host) -> list[str]:
    """The command lines of the processes on host."""
    lines = []
    for pid in hosts.namespace_pids(host.name):
        try:
            lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # it has just exited
            pass
    return lines


def learners_left(net: hosts.Hosts) -> list[str]:
    """Learner processes and learner actors still on the hosts, once those being killed have had time to go."""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while True:
        left = [line for host in net.hosts for line in processes_on(host) if re.search("learner.py|LearnerActor", line)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_run(cluster, tmp_path_factory):
    """RUN through launch.py --ray on the host outside the cluster, through Ray Client: its folder and console
    output."""
    out = tmp_path_factory.mktemp("ray")
    client = f"ray://{cluster[1].address}:{CLIENT_PORT}"
    code, console = launch_run(out, "--ray", client, "--timeout", str(RUN_TIMEOUT_S), prefix=cluster[0].prefix)
    assert code == 0, console[-6000:]
    return out, console


def test_learners_are_placed_one_a_node_and_register_from_its_address(cluster, ray_run):
    out, console = ray_run
    assert f"the leader listens on {cluster[0].address}:" in console  # off the cluster, where the nodes reach it
    assert registered_from(console) == [cluster[1].address, cluster[2].address], console
    for index in (0, 1):  # the learners' logs, fetched from their nodes
        assert "LearnerService listening on 0.0.0.0:" in (out / f"learner{index}.log").read_text()


def registered_from(console: str) -> list[str]:
    """The hosts the learners registered from, as the leader logged them, sorted."""
    return sorted(re.findall(r"(\S+):\d+ registered as learner \d+", console))


def test_nothing_is_left_on_the_cluster_after_the_run(cluster, ray_run):
    assert learners_left(cluster) == []
    assert placement_groups(cluster) == {"REMOVED"}


def test_the_run_reaches_the_accuracy_of_the_same_run_as_local_processes(ray_run, tmp_path):
    out, _ = ray_run
    code, local = launch_run(tmp_path)
    assert code == 0, local[-6000:]
    # Same flags, seed and threads (one a learner), every round waiting for both: the same arithmetic, so the
    # same final test loss and accuracy to the last bit
    assert final_test(out) == final_test(tmp_path)
    assert final_test(out)[1] > 0.9


def test_a_run_stopped_at_its_timeout_stops_cleanly_and_leaves_nothing_on_the_cluster(cluster, tmp_path):
    code, console = launch_run(
        tmp_path,
        *("--ray", head_address(cluster), *POOLS, "--timeout", str(STOPPED_AFTER_S)),
        prefix=cluster[1].prefix,  # launch.py and its leader on the head node
        leader_args=["--rounds", "100000"],
    )
    assert code == 1 and "exit codes: leader None, learners [None, None]" in console, console[-6000:]
    # two processes of two learners, one a node: four learners, two from each node's address
    assert registered_from(console) == [cluster[1].address] * 2 + [cluster[2].address] * 2, console
    assert learners_left(cluster) == []
    assert placement_groups(cluster) == {"REMOVED"}
    # The leader stopped cleanly on SIGTERM (a checkpoint) and told its learners; their logs were fetched
    assert "stopping on request after round" in console
    for index in (0, 1):
        assert "the leader was stopped at round" in (tmp_path / f"learner{index}.log").read_text()


def placement_groups(net: hosts.Hosts) -> set[str]:
    """The states of the placement groups the cluster has known."""
    command = [*net[1].prefix, sys.executable, "-c", CLUSTER_STATE, head_address(net)]
    return set(
        json.loads(subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout)["groups"]
    )
