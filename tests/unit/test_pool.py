"""A pool's learners stopped and started again (learner/pool.py), without sockets: a learner whose thread still
runs is not started a second time, and stop_learner says whether its thread ended."""

import threading
from types import SimpleNamespace

import pytest

from federated.learner.pool import Pool


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
