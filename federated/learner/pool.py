"""The learners of one process (--virtual N; a process of one learner is a pool of one): each trains in a thread of
its own, the pool waits until every one has the leader's final state, says how they go in a few lines, and stops
or starts one of them again as a process would be."""

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import grpc

from federated.learner.session import GradientRefused, LeaderUnreachable
from federated.wire import codec

if TYPE_CHECKING:  # (app.py builds the pool from its Members and its server)
    from federated.learner.app import Member
    from federated.learner.dispatch import PoolServer

log = logging.getLogger("learner")

PROGRESS_INTERVAL_S = 30.0  # how often a pool of several learners says how its rounds go
WARNING_INTERVAL_S = 30.0  # with several learners, a kind of warning is written at most this often (the rest counted)
TICK_S = 1.0
STOP_WAIT_S = 5.0  # a stopped learner's thread ends at its next look at its inbox (session.HEALTH_CHECK_INTERVAL_S)
# the place in its pool of the learner a thread works for (index), where it works for one learner of several: its
# own thread, a joining one, or a server thread serving a call to it
CURRENT = threading.local()
# What ends one learner's process, and in a pool that learner only (the leader drops it as a dead process): the
# leader refused its registration or its update, a wait of its own passed --wait-timeout (SystemExit), a state or
# plan this learner's limits refuse (PayloadError), a call of its own answered with an error not retried, the leader
# unreachable to it past its --connect-timeout (LeaderUnreachable: its fetch carries its credential, so a leader can
# single one learner out; a leader gone for all ends every learner, and so the pool). Anything else (the pool's own
# bugs, the shared model's errors outside a learner's own calls) ends the pool, and so does every learner ending in
# one of these: what is the same for all of them (a model that cannot give local DP, a leader without credentials)
# ends each in turn, the pool once all have.
OWN_ERRORS = (SystemExit, GradientRefused, codec.PayloadError, grpc.RpcError, LeaderUnreachable)


class Stopped(Exception):
    """This learner's server was stopped (Pool.stop_learner): its thread ends, as a stopped process would."""


def ranges(ids: Sequence[int]) -> str:
    """Learner ids as runs: '0..3, 7, 9..12'."""
    runs: list[list[int]] = []
    for learner_id in sorted(ids):
        if runs and learner_id == runs[-1][1] + 1:
            runs[-1][1] = learner_id
        else:
            runs.append([learner_id, learner_id])
    return ", ".join(str(low) if low == high else f"{low}..{high}" for low, high in runs)


def ports(numbers: Iterable[int]) -> str:
    """The ports of a pool as runs ('ports 50052..51051'), or their count and range when they are scattered (--port 0
    gives any free ones)."""
    listed = sorted(numbers)
    runs = ranges(listed)
    if runs.count(",") < 3:
        return f"ports {runs}"
    return f"{len(listed)} ports between {listed[0]} and {listed[-1]}"


class PoolLog(logging.Filter):
    """What the learners of a pool of several say, so that a person can follow 1,000 of them: each line names the
    learner (its place in the pool); their info lines go to debug (--verbose); each kind of warning is written at
    most every WARNING_INTERVAL_S seconds, saying how many like it were left out. Lines from other threads pass."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[object, tuple[float, int]] = {}  # each warning's template: when written, how many left out
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        index = getattr(CURRENT, "index", None)
        if index is None:
            return True
        if record.levelno < logging.WARNING:
            if not logging.getLogger("learner").isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        else:
            with self._lock:
                written, left_out = self._last.get(record.msg, (-WARNING_INTERVAL_S, 0))
                now = time.monotonic()
                if now - written < WARNING_INTERVAL_S:
                    self._last[record.msg] = (written, left_out + 1)
                    return False
                self._last[record.msg] = (now, 0)
            if left_out:
                record.msg = f"{record.msg} (and {left_out} more like it from this pool since the last)"
        record.msg = f"learner #{index} of the pool: {record.msg}"
        return True


POOL_LOG = PoolLog()


class Pool:
    """The learners of this process, registered and holding their data: each trains in a thread of its own until
    the leader's final state. Serves them all on one server."""

    def __init__(self, members: "list[Member]", server: "PoolServer") -> None:
        self.members, self.server = members, server
        self.threads: list[threading.Thread | None] = [None] * len(members)
        self.final: codec.Payload | None = None  # the leader's final state, as the first learner to end got it
        self.failure: BaseException | None = None  # the first error a learner's thread ended the pool with
        self.failed: dict[int, BaseException] = {}  # the learners (by place) that ended in an error of their own
        self._changed = threading.Event()

    def start(self) -> None:
        """Every learner trains, in its own thread."""
        for index in range(len(self.members)):
            self._launch(index, rejoin=False)

    def _launch(self, index: int, rejoin: bool) -> None:
        thread = threading.Thread(target=self._train, args=(index, rejoin), name=f"learner-{index}", daemon=True)
        self.threads[index] = thread
        thread.start()

    def _train(self, index: int, rejoin: bool) -> None:
        """The index-th learner's rounds (after registering again, when it was restarted), until the final state."""
        CURRENT.index = index if len(self.members) > 1 else None
        member = self.members[index]
        try:
            final = (member.reconnect() if rejoin else None) or member.train_until_final()
            self.final = self.final or final
            member.server.forget_states()  # its own copy of the final state: a thousand of them would add up
        except Stopped:
            log.info("stopped")
        except OWN_ERRORS as error:  # its process would end: this learner stops, as a stopped process
            member.server.stop()
            self.failed[index] = error
            if len(self.members) > 1:
                log.error("this learner stops: %s", error)
        except BaseException as error:  # the pool ends with it
            self.failure = self.failure or error
        finally:
            self._changed.set()

    def wait(self) -> codec.Payload:
        """Wait until every learner that runs has the leader's final state or has ended in an error of its own
        (raising at once an error that ends the pool; when every learner failed, the first one's error), saying
        every PROGRESS_INTERVAL_S seconds how the rounds go; that state."""
        said, updates = time.monotonic(), self.updates()
        while any(thread is not None and thread.is_alive() for thread in self.threads):
            self._changed.wait(TICK_S)
            self._changed.clear()
            if self.failure is not None:
                raise self.failure
            if len(self.members) > 1 and time.monotonic() - said >= PROGRESS_INTERVAL_S:
                now_sent = self.updates()
                log.info(
                    "pool: round %d; %d updates sent by its %d learners in the last %.0f s",
                    max(member.replica.round for member in self.members),
                    now_sent - updates,
                    len(self.members),
                    time.monotonic() - said,
                )
                said, updates = time.monotonic(), now_sent
        if self.failure is not None:
            raise self.failure
        if self.final is None and self.failed:  # every learner ended: in errors of their own, or stopped
            raise next(iter(self.failed.values()))
        if self.final is None:
            raise SystemExit("every learner of this process was stopped before the leader's final state")
        return self.final

    def check_failed(self) -> None:
        """SystemExit (the process exits non-zero) when some learners ended in errors of their own, naming them."""
        if self.failed:
            ids = [self.members[index].learner_id for index in self.failed]
            first = next(iter(self.failed.values()))
            raise SystemExit(
                f"{len(ids)} of the {len(self.members)} learners of this process ended in errors of their own "
                f"(learner ids {ranges(ids)}; the first: {first})"
            )

    def updates(self) -> int:
        return sum(member.updates_sent for member in self.members)

    def stop_learner(self, index: int, grace: float = 10.0) -> bool:
        """Stop the index-th learner as its process would stop: the leader's calls to it fail UNAVAILABLE, its health
        checks find no registration, and its thread ends (within a few seconds; at most grace are waited for).
        Whether its thread has ended (a thread inside a call to the leader ends when the call does)."""
        self.members[index].server.stop()
        thread = self.threads[index]
        if thread is not None:
            thread.join(grace)
        return thread is None or not thread.is_alive()

    def restart_learner(self, index: int) -> None:
        """Start the stopped index-th learner again, as its process would be restarted: it fetches the model,
        registers again (with its credential, to take its slot back) and trains. RuntimeError while its old thread
        still runs: two threads on one learner would share its replica."""
        thread = self.threads[index]
        if thread is not None and thread.is_alive():
            raise RuntimeError(f"learner #{index} of the pool still runs: stop it (stop_learner) until it has ended")
        self.failed.pop(index, None)
        self.members[index].server.restart()
        self._launch(index, rejoin=True)

    def stop(self, grace: float = 2) -> None:
        """Stop serving the leader, and wait (at most STOP_WAIT_S) for the learners' threads to end."""
        for member in self.members:
            member.server.stop()
        self.server.stop(grace)
        deadline = time.monotonic() + STOP_WAIT_S
        for thread in self.threads:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
