"""A whole run of real leader and learner processes over mutual TLS, with the token from the environment."""

from federated.leader.metrics import read_metrics
from tests.support.runs import logs


def test_whole_workflow_over_mutual_tls_with_a_token(tls_run):
    out, codes = tls_run  # the session's run over mutual TLS with FL_TOKEN set (tests/e2e/conftest.py)
    assert codes == [0, 0], logs(out)  # the leader, and its two learners' process
    assert len([r for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]) == 20
    assert "mutual TLS, token required" in (out / "leader.log").read_text()
