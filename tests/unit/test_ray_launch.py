"""launch.py --ray's refusals that need no cluster: Ray missing (say how to install it) and a cluster too small
for the learners (say what to add). The runs on a cluster are tests/e2e/test_ray.py's (make test-ray)."""

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
