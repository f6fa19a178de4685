"""launch.py --ray's parts that need no cluster: its refusals (Ray missing: say how to install it; a cluster too
small for the learners: say what to add; a leader's address the nodes cannot reach: say to name one) and its
polling of the learners. The runs on a cluster are tests/e2e/test_ray.py's (make test-ray)."""

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
