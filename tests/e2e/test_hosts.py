"""A leader and learners on separate hosts (network namespaces with addresses of their own,
federated/tools/hosts.py): learners that know only the leader's address, mutual TLS with a token (one run,
run_across_hosts, for both), a link that goes down, and a learner behind an address the leader cannot dial."""

import re
import signal
import time
from pathlib import Path

import pytest

from federated.leader.metrics import read_metrics
from federated.net import guard
from federated.tools import hosts, launch
from tests.support.certs import make_certs, tls_flags
from tests.support.processes import start_leader, start_learner
from tests.support.runs import logs, wait_for_log, wait_for_round

PORT = 50051  # every host has a network stack of its own: the port is free there
RUN_TIMEOUT_S = 240
OUTAGE_S = 5.0


@pytest.fixture
def net():
    """Three hosts on one bridge (the leader's, then two learners'), removed with all their processes after
    the test, whatever its outcome; the tests are skipped, saying why, where namespaces cannot be made."""
    reason = hosts.unavailable()
    if reason:
        pytest.skip(reason)
    with hosts.Hosts(3) as made:
        yield made


def start(net: hosts.Hosts, out: Path, leader_args: list[str], learner_args: list[str] = ()) -> list:
    """A leader of two learners on net[0] and learners on net[1] and net[2] that are given only its address."""
    leader = leader_on(net, out, *leader_args)
    return [leader, *(learner_on(net, index, out, f"learner{index - 1}", *learner_args) for index in (1, 2))]


def leader_on(net: hosts.Hosts, out: Path, *args: str):
    """A leader of two learners on net[0], listening on every interface, once it listens: learners started
    earlier would back off and register seconds after it is ready."""
    leader = start_leader(out, PORT, "--learners", "2", *args, host="0.0.0.0", prefix=net[0].prefix)
    wait_for_log(out / "leader.log", "LeaderService listening", timeout=120)
    return leader


def learner_on(net: hosts.Hosts, index: int, out: Path, name: str, *args: str):
    """A learner on net[index] of the leader on net[0]: it listens on every interface and advertises what
    learner.py picks by default, unless args say otherwise."""
    return start_learner(out, name, PORT, *args, leader=net[0].address, host=None, prefix=net[index].prefix)


def registered_hosts(out: Path) -> dict[int, str]:
    """The host each learner id registered from, as the leader logged it ('HOST:PORT registered as learner N')."""
    found = re.findall(r"(\S+):\d+ registered as learner (\d+)", (out / "leader.log").read_text())
    return {int(learner_id): host for host, learner_id in found}


def learner_id(out: Path, name: str) -> int:
    return int(re.search(r"registered as learner (\d+)", (out / f"{name}.log").read_text()).group(1))


@pytest.fixture(scope="module")
def run_across_hosts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int | None], list[str]]:
    """One whole run on three hosts over mutual TLS, with the token from the environment on every host, its
    learners given only the leader's address: its folder, the exit codes, and the hosts' addresses (the
    hosts are gone once it ended). Two tests read it: registration from the learners' own addresses and
    training, and the mutual TLS."""
    reason = hosts.unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("across-hosts")
    with hosts.Hosts(3) as net, pytest.MonkeyPatch.context() as monkeypatch:
        certs = make_certs(out / "certs", ",".join(f"IP:{host.address}" for host in net.hosts))
        monkeypatch.setenv(guard.TOKEN_VARIABLE, "a-token-for-the-hosts")  # the environment variable, on every host
        processes = start(
            net,
            out / "run",
            ["--rounds", "40", "--batch-size", "32", *tls_flags(certs, "leader")],
            tls_flags(certs, "learner"),
        )
        codes = launch.wait_all(processes, RUN_TIMEOUT_S)
        return out / "run", codes, [host.address for host in net.hosts]


def test_learners_that_know_only_the_leaders_address_register_from_their_own_and_train(run_across_hosts):
    out, codes, addresses = run_across_hosts
    assert codes == [0, 0, 0], logs(out)
    assert sorted(registered_hosts(out).values()) == [addresses[1], addresses[2]], logs(out)
    final = [r for r in read_metrics(out / "metrics.jsonl") if "test_accuracy" in r][-1]
    assert final["round"] == 40 and final["test_accuracy"] > 0.2, final  # chance is 0.1


def test_a_run_across_hosts_over_mutual_tls_with_a_token(run_across_hosts):
    out, codes, addresses = run_across_hosts
    assert codes == [0, 0, 0], logs(out)
    assert sorted(registered_hosts(out).values()) == [addresses[1], addresses[2]], logs(out)
    assert "(mutual TLS, token required)" in (out / "leader.log").read_text()
    for name in ("learner0", "learner1"):
        assert "(mutual TLS, token required)" in (out / f"{name}.log").read_text()
    rounds = [r for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]
    assert [r["round"] for r in rounds] == list(range(1, 41)) and {r["learners"] for r in rounds} == {2}


def test_a_learner_whose_link_goes_down_is_dropped_rejoins_and_the_run_finishes(net, tmp_path):
    # --min-learners 2: no round closes without the learner that lost its link, so the run cannot end before it
    # is back, however fast the rounds go; --sync-timeout 2: silent for 2 s, it is dropped while its link is down
    processes = start(
        net,
        tmp_path,
        [
            "--rounds",
            "12",
            "--batch-size",
            "16",
            "--min-learners",
            "2",
            "--sync-timeout",
            "2",
            "--round-timeout",
            "10",
            "--register-timeout",
            "60",
        ],
    )
    wait_for_round(tmp_path, 3, timeout=120)
    net.link(net[2], up=False)
    down_since = time.monotonic()
    wait_for_log(tmp_path / "leader.log", "dropped learner", timeout=30)
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_since)))
    net.link(net[2], up=True)
    assert launch.wait_all(processes, RUN_TIMEOUT_S) == [0, 0, 0], logs(tmp_path)
    cut = learner_id(tmp_path, "learner1")
    leader_log = (tmp_path / "leader.log").read_text()
    after_drop = leader_log[leader_log.index(f"dropped learner {cut} (") :]
    assert re.search(rf"{re.escape(net[2].address)}:\d+ re-registered learner {cut} of 2", after_drop), logs(tmp_path)
    assert "rejoined at round" in (tmp_path / "learner1.log").read_text()
    rounds = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train_loss" in r]
    assert len(rounds) == 12 and {r["learners"] for r in rounds} == {2}, rounds


def test_a_learner_the_leader_cannot_dial_is_told_so_and_stops(net, tmp_path):
    wrong = f"{hosts.UNUSED_ADDRESS}:{PORT + 1}"  # on the subnet, but no host has it
    leader = leader_on(net, tmp_path, "--rounds", "1000", "--batch-size", "8")
    reachable = learner_on(net, 1, tmp_path, "reachable")
    unreachable = learner_on(net, 2, tmp_path, "unreachable", "--port", str(PORT + 1), "--advertise", wrong)
    try:
        code = unreachable.wait(90)  # told within seconds (it used to retry forever)
    finally:
        leader.send_signal(signal.SIGTERM)  # the run went on without it: stop it cleanly
    assert launch.wait_all([leader, reachable], 60) == [0, 0], logs(tmp_path)
    assert code != 0
    said = (tmp_path / "unreachable.log").read_text()
    assert f"the leader cannot reach this learner at {wrong}" in said and "--advertise" in said, said
    leader_log = (tmp_path / "leader.log").read_text()
    cut = learner_id(tmp_path, "unreachable")
    assert f"cannot reach learner {cut} at {wrong}" in leader_log and "--advertise" in leader_log, leader_log
