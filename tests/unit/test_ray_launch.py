"""launch.py --ray's parts that need no cluster: its refusals (Ray missing: say how to install it; a cluster too
small for the learners: say what to add; a leader's address the nodes cannot reach: say to name one) and its
polling of the learners. The runs on a cluster are tests/e2e/test_ray.py's (make test-ray)."""

import io
import sys
from types import SimpleNamespace

import pytest

from federated.tools import launch, ray_launch


def test_without_ray_the_launcher_refuses_and_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(SystemExit) as refused:
        launch.main(["--ray", "auto", "--out", "unused", "--", "--dataset", "synthetic"])
    assert refused.value.code == 2
    assert "needs Ray, an optional extra: make ray" in capsys.readouterr().err


def test_a_cluster_without_the_learners_cpus_is_refused_before_anything_is_reserved():
    cluster = SimpleNamespace(cluster_resources=lambda: {"CPU": 3.0})  # no placement_group: none may be made
    with pytest.raises(ray_launch.RayUnavailable, match="4 learners of 1 CPUs need 4 CPUs; the cluster has 3"):
        ray_launch.reserve(cluster, learners=4, cpus=1)


@pytest.mark.parametrize(
    ("address", "reason"), [("head", "give the head's HOST:6379"), ("127.0.0.1:{port}", "no Ray cluster answers")]
)
def test_an_address_where_no_cluster_answers_is_refused_at_once(address, reason, port):
    with pytest.raises(ray_launch.RayUnavailable, match=reason):
        ray_launch.check_reachable(address.format(port=port))


def test_a_loopback_route_to_the_head_is_refused_for_the_nodes_and_says_to_name_the_leaders_address():
    # ray://localhost:10001: a tunnel to the head; the route there leaves from 127.0.0.1, which each node would dial
    with pytest.raises(ray_launch.RayUnavailable, match=r"127\.0\.0\.1, a loopback address.*--ray-leader-address"):
        ray_launch.leader_host("ray://localhost:10001", None)


def test_a_link_local_address_is_refused_for_the_nodes():
    with pytest.raises(ray_launch.RayUnavailable, match=r"169\.254\.7\.1, a link-local address.*--ray-leader-address"):
        ray_launch.check_nodes_reach("169.254.7.1", "head")


def test_the_leaders_address_given_for_the_nodes_is_used_as_given_and_a_node_finds_its_own():
    assert ray_launch.leader_host("ray://localhost:10001", "10.47.0.1") == "10.47.0.1"
    assert ray_launch.leader_host("10.47.0.2:6379", None) is None  # on a node: Ray's address of this node
    with pytest.raises(ray_launch.RayUnavailable, match="without a port"):
        ray_launch.leader_host("auto", "10.47.0.1:5000")


def test_an_ipv6_head_is_refused_saying_to_name_the_leaders_address():
    with pytest.raises(ray_launch.RayUnavailable, match=r"no IPv4 route to the head ::1 .*--ray-leader-address"):
        ray_launch.leader_host("ray://[::1]:10001", None)


class RayActorError(Exception):
    """Stand-ins for ray.exceptions, where Ray's classes stand: ActorDiedError and ActorUnavailableError are
    RayActorErrors, GetTimeoutError is not."""


class ActorDiedError(RayActorError):
    pass


class ActorUnavailableError(RayActorError):
    pass


class GetTimeoutError(Exception):
    pass


EXCEPTIONS = SimpleNamespace(
    RayActorError=RayActorError, ActorUnavailableError=ActorUnavailableError, GetTimeoutError=GetTimeoutError
)


def answered(result):
    """ray.get of a fake call: the call's result, or the exception it stands for raised."""
    if isinstance(result, Exception):
        raise result
    return result


def fake_ray() -> SimpleNamespace:
    return SimpleNamespace(get=lambda call, timeout: answered(call), exceptions=EXCEPTIONS)


def actor(*answers) -> SimpleNamespace:
    """A fake LearnerActor whose polls answer answers in turn (an exception: what ray.get raises for it); asked
    once more, it fails the test."""
    replies = iter(answers)
    return SimpleNamespace(poll=SimpleNamespace(remote=lambda: next(replies)))


def test_each_learner_is_polled_on_its_own_a_lost_actor_ends_only_its_learner_and_a_slow_one_still_runs(capsys):
    actors = [actor(0), actor(None, 0), actor(ActorDiedError("node died")), actor(GetTimeoutError(), 3)]
    actors.append(actor(ActorUnavailableError("unreachable for now"), 0))
    codes: list[int | None] = [None] * len(actors)
    ray_launch.poll_learners(fake_ray(), actors, codes)
    assert codes == [0, None, ray_launch.LOST, None, None]
    assert "learner 2's actor was lost; counted as ended (exit code -1): node died" in capsys.readouterr().err
    ray_launch.poll_learners(fake_ray(), actors, codes)  # only those still running are asked again
    assert codes == [0, 0, ray_launch.LOST, 3, 0]


def test_the_launcher_keeps_waiting_for_the_leader_after_a_learners_actor_is_lost(monkeypatch):
    monkeypatch.setattr(ray_launch, "POLL_S", 0.0)
    leader = SimpleNamespace(poll=iter([None, None, None, 0]).__next__)
    actors = [actor(ActorDiedError("worker died")), actor(None, None, 0)]
    assert ray_launch.wait_for_end(fake_ray(), leader, actors, timeout=60) == [0, ray_launch.LOST, 0]


def printing(*lines: str) -> SimpleNamespace:
    """A leader started piped (its output alone), that printed lines and ended."""
    return SimpleNamespace(stdout=io.StringIO("".join(f"{line}\n" for line in lines)))


def test_the_leaders_port_is_read_from_its_log_and_its_output_reaches_the_console(capsys):
    listening = "2026-12-05 21:00:00,000 leader INFO LeaderService listening on 0.0.0.0:43127 (plaintext); waiting"
    console = ray_launch.LeaderConsole(printing("loading the data", listening, "round 1"))
    assert console.port_within(10) == 43127
    console.finish()
    assert capsys.readouterr().out == f"loading the data\n{listening}\nround 1\n"


def test_a_leader_that_ends_before_it_listens_has_no_port():
    console = ray_launch.LeaderConsole(printing("error: --rounds must be >= 1"))
    assert console.port_within(10) is None
