"""A whole run of real leader and learner processes over mutual TLS, with the token from the environment."""

from federated.leader.metrics import read_metrics
from federated.net import guard
from tests.support.certs import tls_flags
from tests.support.processes import run_federation
from tests.support.runs import logs

TOKEN = "s3cret-token"


def test_whole_workflow_over_mutual_tls_with_a_token(tmp_path, certs, monkeypatch):
    monkeypatch.setenv(guard.TOKEN_VARIABLE, TOKEN)  # the environment variable, not the flag
    codes = run_federation(
        tmp_path,
        2,
        ["--dataset", "synthetic", "--rounds", "20", "--batch-size", "16", *tls_flags(certs, "leader")],
        tls_flags(certs, "learner"),
    )
    assert codes == [0, 0, 0], logs(tmp_path)
    assert len([r for r in read_metrics(tmp_path / "metrics.jsonl") if "train_loss" in r]) == 20
    assert "mutual TLS, token required" in (tmp_path / "leader.log").read_text()
