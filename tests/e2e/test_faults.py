"""Faults with real processes and real signals: dead, restarted and stalled learners, a killed leader.

The killed leader's run (killed_leader_run) is inspected by two tests, and compared with the session's
uninterrupted synthetic run (tests/e2e/conftest.py), which a third resumes once finished."""

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from federated.leader.metrics import read_metrics
from federated.tools import launch
from tests.support.processes import SMALL_IMAGES, SYNTHETIC_RUN, start_leader, start_learner
from tests.support.runs import logs, wait_for_log, wait_for_round


def learner_counts(out) -> list[int]:
    return [r["learners"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]


def test_a_killed_learner_is_dropped_and_a_restarted_one_takes_its_slot(tmp_path):
    port = launch.free_port()
    # --rejoin-grace 0: the slot is free as soon as its holder is dropped, so that the restarted learner gets it
    # however fast the rounds go (with the default 30 s a fast machine finished before the grace was over)
    leader = start_leader(
        tmp_path,
        port,
        *SMALL_IMAGES,
        "--learners",
        "3",
        "--min-learners",
        "2",
        "--round-timeout",
        "2",
        "--rounds",
        "120",
        "--batch-size",
        "16",
        "--sync-timeout",
        "5",
        "--rejoin-grace",
        "0",
    )
    learners = [start_learner(tmp_path, f"learner{i}", port) for i in range(3)]
    wait_for_round(tmp_path, 15)
    learners[2].kill()
    wait_for_log(tmp_path / "leader.log", "dropped learner")
    learners.append(start_learner(tmp_path, "learner2-restarted", port, "--connect-timeout", "60"))
    codes = launch.wait_all([leader, *learners], 300)
    assert codes == [0, 0, 0, -signal.SIGKILL, 0], logs(tmp_path)
    counts = learner_counts(tmp_path)
    assert len(counts) == 120 and counts[0] == 3 and counts[-1] == 3, counts
    assert 2 in counts[15:], counts
    leader_log = (tmp_path / "leader.log").read_text()
    killed_id = re.search(r"registered as learner (\d)", (tmp_path / "learner2.log").read_text()).group(1)
    assert f"dropped learner {killed_id}" in leader_log and "took over from" in leader_log


def test_a_stalled_learner_does_not_hold_back_the_round_and_its_late_gradient_is_ignored(tmp_path):
    port = launch.free_port()
    leader = start_leader(
        tmp_path,
        port,
        *SMALL_IMAGES,
        "--learners",
        "2",
        "--round-timeout",
        "1",
        "--rounds",
        "60",
        "--batch-size",
        "16",
        "--sync-timeout",
        "30",
    )
    learners = [start_learner(tmp_path, f"learner{i}", port) for i in range(2)]
    wait_for_round(tmp_path, 10)
    learners[1].send_signal(signal.SIGSTOP)
    time.sleep(5)
    learners[1].send_signal(signal.SIGCONT)
    codes = launch.wait_all([leader, *learners], 300)
    assert codes == [0, 0, 0], logs(tmp_path)
    counts = learner_counts(tmp_path)
    assert counts.count(1) >= 2 and counts[-1] == 2, counts
    assert "ignored the update" in (tmp_path / "learner1.log").read_text()
    assert "dropped" not in (tmp_path / "leader.log").read_text()


def test_sigterm_stops_a_learner_and_then_the_leader_cleanly(tmp_path):
    port = launch.free_port()
    leader = start_leader(
        tmp_path, port, "--learners", "2", "--rounds", "1000", "--batch-size", "16", "--round-timeout", "1"
    )
    learners = [start_learner(tmp_path, f"learner{i}", port) for i in range(2)]
    wait_for_round(tmp_path, 10)
    learners[0].terminate()
    assert learners[0].wait(30) == 0, logs(tmp_path)
    wait_for_round(tmp_path, 25)
    leader.terminate()
    codes = launch.wait_all([leader, learners[1]], 60)
    assert codes == [0, 0], logs(tmp_path)
    assert learner_counts(tmp_path)[-1] == 1
    assert "stopping on request" in (tmp_path / "leader.log").read_text()
    assert "the leader was stopped" in (tmp_path / "learner1.log").read_text()
    import torch

    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] >= 25 and set(checkpoint["optimizer"]["state"])


def train_losses(out) -> list[float]:
    return [r["train_loss"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]


def kill_and_resume(leader: subprocess.Popen, out: Path, port: int, at_round: int, *flags: str) -> subprocess.Popen:
    """Kill the leader once it has recorded at_round, and start it again on the same port with --resume out
    and flags; the learners are left to find out."""
    wait_for_round(out, at_round)
    leader.kill()
    leader.wait(10)
    time.sleep(2)
    return start_leader(out, port, *flags, "--resume", str(out))


@pytest.fixture(scope="module")
def killed_leader_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int | None]]:
    """The synthetic run of tests/e2e/conftest.py with its leader killed twice: after round 64 it resumes
    with every flag repeated, after round 124 with --resume alone (the training flags come from the
    checkpoint; --checkpoint-every does not, hence this order); both times from the last checkpoint
    (rounds 60 and 120), redoing the rounds after it. Its folder and the exit codes."""
    out, port = tmp_path_factory.mktemp("killed-leader"), launch.free_port()
    flags = ["--learners", "2", *SYNTHETIC_RUN]
    leader = start_leader(out, port, *flags)
    learners = [start_learner(out, f"learner{i}", port) for i in range(2)]
    leader = kill_and_resume(leader, out, port, 64, *flags)
    leader = kill_and_resume(leader, out, port, 124)
    return out, launch.wait_all([leader, *learners], 400)


def test_a_killed_leader_resumes_from_its_checkpoint_and_the_learners_rejoin(killed_leader_run):
    out, codes = killed_leader_run
    assert codes == [0, 0, 0], logs(out)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in records if "train_loss" in r] == list(range(1, 161))
    assert [r for r in records if "test_accuracy" in r][-1]["test_accuracy"] >= 0.90, logs(out)
    leader_log = (out / "leader.log").read_text()
    assert "resuming from the checkpoint at round 60" in leader_log
    assert "resuming from the checkpoint at round 120" in leader_log
    for index in range(2):
        learner_log = (out / f"learner{index}.log").read_text()
        assert learner_log.count("lost the leader") >= 2, learner_log
        assert "rejoined at round 60" in learner_log and "rejoined at round 120" in learner_log


def test_a_killed_and_resumed_run_follows_the_uninterrupted_one(killed_leader_run, synthetic_run):
    (out, codes), (uninterrupted, uninterrupted_codes) = killed_leader_run, synthetic_run
    assert codes == [0, 0, 0], logs(out)
    assert uninterrupted_codes == [0, 0, 0], logs(uninterrupted)
    expected, got = train_losses(uninterrupted), train_losses(out)
    assert len(got) == len(expected) == 160
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)


# FedAvg with the median over 3 of 4 learners sampled each round: the median needs 3 updates to outvote a hostile
# one, so --min-learners defaults to 3, a default the resume derives again from the checkpoint's flags
ROBUST_SAMPLED_RUN = [
    "--learners",
    "4",
    "--learners-per-round",
    "3",
    "--strategy",
    "fedavg",
    "--aggregator",
    "median",
    "--local-steps",
    "4",
    "--rounds",
    "12",
    "--batch-size",
    "16",
    "--image-size",
    "16",
    "--checkpoint-every",
    "4",
]


def test_a_killed_fedavg_median_sampled_run_resumes_with_resume_alone_and_finishes(tmp_path):
    port = launch.free_port()
    leader = start_leader(tmp_path, port, *ROBUST_SAMPLED_RUN)
    # the four learners in one process (--virtual): the test is about the leader, and they rejoin as processes do
    learners = start_learner(tmp_path, "learners", port, "--virtual", "4", "--verbose")
    leader = kill_and_resume(leader, tmp_path, port, 5)  # no training flag: they come from the checkpoint
    codes = launch.wait_all([leader, learners], 300)
    assert codes == [0] * 2, logs(tmp_path)
    rounds = [record for record in read_metrics(tmp_path / "metrics.jsonl") if "train_loss" in record]
    assert [record["round"] for record in rounds] == list(range(1, 13)), logs(tmp_path)
    assert all(record["learners"] >= 3 and "discarded" not in record for record in rounds), rounds
    resumed_at = re.search(r"resuming from the checkpoint at round (\d+)", (tmp_path / "leader.log").read_text())
    assert resumed_at and 4 <= int(resumed_at.group(1)) < 12, logs(tmp_path)
    learners_log = (tmp_path / "learners.log").read_text()
    for index in range(4):  # each takes its slot back, sampled or not
        assert f"learner #{index} of the pool: rejoined at round {resumed_at.group(1)}" in learners_log, learners_log


def test_resuming_a_finished_run_trains_nothing_and_releases_its_learner(synthetic_run, tmp_path):
    finished, codes = synthetic_run
    assert codes == [0, 0, 0], logs(finished)
    out = shutil.copytree(finished, tmp_path / "finished")  # the shared run's folder stays as it ended
    port = launch.free_port()
    started = time.monotonic()
    # 8 s of grace: the learner, started with the leader, retries at most 5 s apart (learner/session.py's backoff) by
    # the time the leader listens, and the leader waits out the grace for the run's own learners, long gone
    leader = start_leader(out, port, "--resume", str(out), "--rejoin-grace", "8")
    learner = start_learner(out, "late-learner", port)
    assert launch.wait_all([leader, learner], 120) == [0, 0], logs(out)
    assert "the leader finished training at round 160" in (out / "late-learner.log").read_text()
    leader_log = (out / "leader.log").read_text()
    assert "training is complete" in leader_log and "waiting for" not in leader_log.split("training is complete")[1]
    assert time.monotonic() - started < 60
