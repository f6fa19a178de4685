"""A learner's first contact, as a new user meets it: learner.py started without its leader says once what it
waits for, then how it goes now and then, and ends naming --connect-timeout (waits are logged by Progress);
a learner of a pool waiting for a state sleeps until its next health check, woken when another loses the leader;
a --data-dir without the learner's dataset is refused before the leader is contacted."""

import logging
import math
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import utils
from federated.learner import data, session
from federated.learner.servicer import StateInbox


def test_a_wait_says_what_it_waits_for_once_then_how_it_goes_at_most_every_interval(caplog):
    now = [100.0]
    progress = session.Progress(
        "the leader at 10.0.0.5:50051", deadline=400.0, flag="--connect-timeout", interval=30.0, clock=lambda: now[0]
    )
    with caplog.at_level(logging.INFO, logger="learner"):
        for _ in range(95):  # a try a second, each refused
            progress.failed("connection refused")
            now[0] += 1.0
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == (
        "waiting for the leader at 10.0.0.5:50051 for up to 300 s (--connect-timeout): connection refused"
    )
    assert messages[1:] == [
        f"still waiting for the leader at 10.0.0.5:50051 ({waited} s so far, {300 - waited} s left): connection refused"
        for waited in (30, 60, 90)
    ]


def test_a_busy_leader_is_no_news_for_a_few_seconds_but_a_refused_connection_is_said_at_once(caplog):
    now = [100.0]
    progress = session.Progress("the leader at 127.0.0.1:50051", deadline=400.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="learner"):
        progress.failed("GetModel calls from this caller are already in progress; retry shortly", busy=True)
        now[0] += session.BUSY_QUIET_S - 1
        progress.failed("GetModel calls from this caller are already in progress; retry shortly", busy=True)
        assert caplog.records == []  # a learner beside another, both fetching the model
        now[0] += 1
        progress.failed("GetModel calls from this caller are already in progress; retry shortly", busy=True)
    assert [record.getMessage().split(":")[0] for record in caplog.records] == ["waiting for the leader at 127.0.0.1"]
    refused = session.Progress("the leader at 127.0.0.1:50051", deadline=400.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="learner"):
        refused.failed("connection refused")
    assert len(caplog.records) == 2


def test_a_waiting_learner_sleeps_until_its_next_check_and_is_woken_when_another_loses_the_leader():
    """A pool of 1,000 checks each learner every 50 s: between checks its thread sleeps (it used to wake every 3 s
    to look, 333 wake-ups a second in all), and another learner losing the leader wakes it to check at once."""
    pacing, inbox, timeouts, checks = session.HealthPacing(1000), StateInbox(), [], []
    pacing.alarms = [inbox.wake]

    def ready(timeout: float) -> str | None:
        timeouts.append(timeout)
        if len(timeouts) > 1:
            return "a state"
        threading.Timer(0.05, pacing.lost).start()
        return inbox.take(0, timeout)  # (None once woken)

    check = lambda: checks.append("checked")
    waiting = SimpleNamespace(pacing=pacing, config=SimpleNamespace(wait_timeout=600.0), check_leader=check)
    assert session.LeaderSession.wait_until(waiting, ready, "a round", bounded=False) == "a state"  # type: ignore[arg-type]
    assert timeouts[0] > session.HEALTH_CHECK_INTERVAL_S and checks == ["checked"]


@pytest.mark.parametrize("leader_gone", [False, True])
def test_only_a_leader_gone_wakes_the_pool_not_one_learner_dropped(leader_gone):
    """One learner dropped by its leader (routine) used to wake all 1,000 of its pool to check at once."""
    pacing, alarms = session.HealthPacing(1000), []
    pacing.alarms = [lambda: alarms.append("woken")]
    pacing.lost_at = math.inf  # this learner is due to check now

    def check() -> None:
        raise session.LeaderLost("the leader dropped this learner", leader_gone=leader_gone)

    waiting = SimpleNamespace(pacing=pacing, config=SimpleNamespace(wait_timeout=600.0), check_leader=check)
    with pytest.raises(session.LeaderLost):
        session.LeaderSession.wait_until(waiting, lambda timeout: None, "a round")  # type: ignore[arg-type]
    assert alarms == (["woken"] if leader_gone else [])


def test_checks_after_the_first_are_spread_so_a_pool_woken_together_does_not_check_in_step():
    many, few, one = session.HealthPacing(1000), session.HealthPacing(10), session.HealthPacing(1)
    later = [many.next_check() - time.monotonic() for _ in range(50)]
    assert 24 < min(later) < max(later) < 76 and max(later) - min(later) > 10  # 50 s, give or take 25
    later = [few.next_check() - time.monotonic() for _ in range(50)]
    assert 1.4 < min(later) < max(later) < 4.6 and max(later) - min(later) > 1  # 3 s, give or take 1.5
    assert round(one.next_check() - time.monotonic(), 1) == session.HEALTH_CHECK_INTERVAL_S  # a learner of its own


def test_a_learner_waiting_for_another_learners_fetch_of_the_model_minds_its_own_stop():
    """Another learner of the pool fetching the model holds the turn while it retries (up to its --connect-timeout):
    this one used to wait on the bare lock for as long, blind to a final state pushed to it meanwhile."""
    fetches, results = session.PoolFetch(), []
    fetches.lock.acquire()  # the other learner's fetch, retrying
    waiting = SimpleNamespace(fetches=fetches)
    fetch = lambda: results.append(session.LeaderSession.fetch_model(waiting, math.inf, stop=lambda: True))  # type: ignore[arg-type]
    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(5.0)
    assert results == [None]


def test_an_image_folder_needs_a_folder_of_images_per_class_to_pass_the_check(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "cat.png").write_bytes(b"")  # images straight in train/, no class folders
    with pytest.raises(utils.DatasetError, match="no images in class folders"):
        data.check_data_dir("imagefolder", str(tmp_path))
    utils.write_image_folder(tmp_path, "train", utils.digits().subset(torch.arange(20)))
    data.check_data_dir("imagefolder", str(tmp_path))
    data.check_data_dir("synthetic", str(tmp_path / "nowhere"))  # made in memory: no folder to check
