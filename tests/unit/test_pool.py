"""A pool's learners stopped and started again (learner/pool.py), without sockets: a learner whose thread still
runs is not started a second time, and stop_learner says whether its thread ended."""

import threading
from types import SimpleNamespace

import pytest

from federated.learner.app import Member
from federated.learner.pool import Pool, Stopped
from federated.learner.servicer import LearnerServer, StateInbox
from federated.learner.session import LeaderUnreachable


def test_a_learner_whose_thread_still_runs_is_not_restarted_and_stop_learner_says_it_did_not_end():
    server = SimpleNamespace(stop=lambda: None, restart=lambda: pytest.fail("restarted while its thread runs"))
    pool = Pool([SimpleNamespace(server=server)], SimpleNamespace())  # type: ignore[list-item, arg-type]
    release = threading.Event()
    pool.threads[0] = busy = threading.Thread(target=release.wait, daemon=True)  # inside a call to the leader
    busy.start()
    try:
        assert pool.stop_learner(0, grace=0.01) is False
        with pytest.raises(RuntimeError, match="still runs"):
            pool.restart_learner(0)
    finally:
        release.set()
    busy.join()
    assert pool.stop_learner(0, grace=0.01) is True


def test_a_leader_unreachable_to_one_learner_ends_that_learner_only():
    """Its fetch of the model carries its credential: a hostile leader could refuse one learner until its
    --connect-timeout, and that ended all the learners of its process."""

    def unreachable() -> None:
        raise LeaderUnreachable("no answer from the leader within --connect-timeout")

    final = SimpleNamespace(metadata={"final": "1"})
    servers = [SimpleNamespace(stop=lambda: None, forget_states=lambda: None) for _ in range(2)]
    members = [
        SimpleNamespace(server=servers[0], train_until_final=unreachable, updates_sent=0),
        SimpleNamespace(server=servers[1], train_until_final=lambda: final, updates_sent=0),
    ]
    pool = Pool(members, SimpleNamespace())  # type: ignore[arg-type]
    pool.start()
    assert pool.wait() is final and list(pool.failed) == [0] and pool.failure is None


def test_a_learner_waiting_for_the_start_of_training_ends_at_once_when_stopped():
    """Its wait lasts until its next health check (50 s with 1,000 learners): stopping it used to leave its thread
    waiting that long, so stop_learner said it had not ended and restart_learner refused it."""
    server = SimpleNamespace(stopped=threading.Event(), started=threading.Event(), inbox=StateInbox())
    member, ended = SimpleNamespace(server=server), []

    def wait() -> None:
        try:
            Member.started(member, 60.0)  # type: ignore[arg-type]
        except Stopped:
            ended.append("stopped")

    waiting = threading.Thread(target=wait, daemon=True)
    waiting.start()
    LearnerServer.stop(server)  # type: ignore[arg-type]
    waiting.join(5.0)
    assert ended == ["stopped"]
