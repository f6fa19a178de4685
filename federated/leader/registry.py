"""The leader's membership: which learner holds which slot, under which credential, in which state.

Thread-safe: gRPC handler threads register, the leader's main loop starts and drops. Every wait takes a timeout.
"""

import hmac
import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from grpc_health.v1.health_pb2 import HealthCheckResponse

from federated.net.rpc import CREDENTIAL_HEADER, new_credential, session_id
from federated.wire.messages import DataSummary

MAX_ADDRESS_CHARS = 261  # a 255-character host name, a colon and a port
ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")


def check_address(address: str) -> str | None:
    """Why a learner's network address is unusable, or None if it is a valid HOST:PORT."""
    if len(address) > MAX_ADDRESS_CHARS:
        return f"network_addr has {len(address)} characters; at most {MAX_ADDRESS_CHARS} make a HOST:PORT"
    match = ADDRESS.match(address)
    if not match:
        return f"network_addr {address!r} is not HOST:PORT"
    if not 0 < int(match.group(2)) < 65536:
        return f"network_addr {address!r} has port {match.group(2)}, outside 1-65535"
    return None


def unreachable_message(address: str) -> str:
    """What a learner is told when the leader cannot dial the address it registered: what to do, never why the
    dial failed (refused, no route, no TLS handshake: whoever registers any HOST:PORT would learn what answers
    there, from the leader's network). The leader's log has the reason."""
    return (
        f"the leader cannot reach this learner at {address}, the address it registered; start it with "
        "--advertise HOST:PORT that the leader can dial (this machine's address as the leader sees it, or the "
        "forwarded one behind NAT), with that port open to the leader (and, under TLS, named by its "
        "certificate), then start it again (the leader's log says why it could not)"
    )


JOINING, STARTING, ACTIVE, DROPPED = "joining", "starting", "active", "dropped"
COUNTED_ON = (STARTING, ACTIVE)  # the learners whose gradients count and who are sent each state
REREGISTER_INTERVAL_S = 3.0  # a slot's holder registers again at most this often
# Rounds in a row a holder may miss (each --round-timeout deadline, or a round closed without its update, is one)
# before it is given up on: rounds leave it out for a while and a newcomer may take its slot; only an update that
# counts resets them.
MAX_MISSED_ROUNDS = 3
# Given up on for the k-th time in a row, a holder sits out the next 2**k rounds closed, then is waited for in one
# round (on probation): missing that one gives it up again at once. So a holder that never delivers holds about
# log2(rounds) rounds to their deadline, not all of them. The exponent stops at 6 (64 rounds): against that
# holder, one deadline in 65 rounds costs little more than none, while a longer bench would keep an honest learner
# that had a few bad spells out of most of a run (FedSGD runs are a few hundred rounds).
MAX_BACKOFF_EXPONENT = 6
SERVING, NOT_SERVING = HealthCheckResponse.SERVING, HealthCheckResponse.NOT_SERVING


@dataclass
class Slot:
    """One learner's place in the federation, bound to the secret it received when it registered."""

    learner_id: int
    address: str
    credential: str
    certificate: str | None  # fingerprint of the TLS client certificate it registered with, if any
    generation: int = 0  # counts registrations: news about an earlier one (a late push failure) is ignored
    state: str = JOINING
    kept_until: float = 0.0  # while DROPPED, kept for its holder until then; 0: a newcomer may take it
    registered_at: float = -math.inf  # when its holder last registered
    data: DataSummary | None = None  # what its holder said of its own images when it took the slot
    reached_at: str = ""  # the address at which its learner last accepted a start: the leader can dial it there
    unreachable: str = ""  # why the leader could not dial its address, where it never reached it; "" otherwise
    missed: int = 0  # rounds its holder missed in a row (a re-registration keeps them: it proves nothing)
    held_since: float = -math.inf  # when its holder took it (a restored slot: before the leader started)
    strikes: int = 0  # times in a row its holders were given up on (kept by a new holder; a counted update clears them)
    benched: int = 0  # rounds closed it still sits out (then it is on probation: waited for in one round)
    benched_at: float = -math.inf  # when it was last given up on: the round open then does not count down its bench

    @property
    def session(self) -> str:
        return session_id(self.credential)

    @property
    def given_up(self) -> bool:
        """Its holder missed MAX_MISSED_ROUNDS rounds in a row (no update of its counted since): it sits out rounds,
        or is on probation, and a newcomer may take it."""
        return self.missed >= MAX_MISSED_ROUNDS


def bench_rounds(strikes: int) -> int:
    """The rounds closed a holder given up on strikes times in a row sits out before it is waited for again."""
    return 2 ** min(strikes, MAX_BACKOFF_EXPONENT)


@dataclass(frozen=True)
class Member:
    """What it takes to call a learner: where, with which credential, and for which registration."""

    learner_id: int
    address: str
    credential: str
    generation: int


class Refusal(Exception):
    """A registration the leader turns down; `retry` when it may succeed later, `probe` the slots whose
    holders the leader should check on (a newcomer may take a slot once its holder is found gone)."""

    def __init__(self, message: str, retry: bool = False, probe: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.retry, self.probe = retry, probe


class Registry:
    """Learner slots 0..capacity-1, each bound to a credential (a secret the learner got when it registered).

    A slot is joining from registration until the round loop starts it, starting while it is being sent
    the state and StartTraining, active once it accepted them, and dropped once the leader stops counting
    on it; rounds count on starting and active learners. Only the holder's credential re-registers a slot
    (it may then change address); a newcomer gets a slot never taken, or a dropped one whose holder the
    leader found gone or which its holder did not reclaim within keep_s seconds, or the slot of a holder given
    up on for missing rounds (which keeps it, and may re-register, until a newcomer takes it or an update of its
    counts). A holder given up on sits out rounds (bench_rounds), then is waited for in one round on probation.
    Slots restored from a checkpoint start dropped and kept for their holders, with the data summaries
    they were taken with."""

    def __init__(
        self, capacity: int, keep_s: float, restored: Sequence[dict] = (), reregister_s: float = REREGISTER_INTERVAL_S
    ) -> None:
        self.capacity, self.keep_s, self.reregister_s = capacity, keep_s, reregister_s
        kept_until = time.monotonic() + keep_s
        # a restored slot's learner trained at its address: the leader reached it there
        self._slots = [
            Slot(
                index,
                record["address"],
                record["credential"],
                record.get("certificate"),
                state=DROPPED,
                kept_until=kept_until,
                data=DataSummary(**record["data"]) if record.get("data") else None,  # (older checkpoints: none)
                reached_at=record["address"],
            )
            for index, record in enumerate(restored)
        ]
        # Slots by session (a hash of the credential): found in one lookup, whatever the number of learners.
        self._by_session = {slot.session: slot for slot in self._slots if slot.credential}
        self._changed = threading.Condition()

    def register(
        self,
        address: str,
        credential: str | None = None,
        certificate: str | None = None,
        data: DataSummary | None = None,
    ) -> tuple[Member, str]:
        """The learner's slot and a message for the reply; raises Refusal. A holder re-registers with its
        credential (and certificate, if it registered with one), keeping the data summary it first gave (the
        leader has settled on it, and weighs its evaluations by it); anyone else gets a new credential."""
        problem = check_address(address)
        if problem:
            raise Refusal(problem)
        with self._changed:
            now = time.monotonic()
            slot, holder = self._holding(credential, certificate), self._at(address)
            if slot is not None:
                if slot.unreachable and address == slot.address:  # it would only be dropped again: tell it why
                    raise Refusal(unreachable_message(address))
                if slot.state == STARTING:  # one start at a time: re-registering is no lever on the round loop
                    raise Refusal(f"learner {slot.learner_id} is being started; retry shortly", retry=True)
                if now - slot.registered_at < self.reregister_s:  # each start costs the leader a state push
                    raise Refusal(
                        f"learner {slot.learner_id} registered {now - slot.registered_at:.1f} s ago; it may "
                        f"register again {self.reregister_s:.0f} s after that",
                        retry=True,
                    )
                if holder is not None and holder is not slot:
                    self._vacate(holder, now)
                verb = "re-registered"
            elif holder is not None:
                if not self._open(holder, now):
                    raise Refusal(
                        f"{address} is the address of learner {holder.learner_id}, which the leader still "
                        "counts on; register with its credential, or retry once it is gone",
                        retry=True,
                        probe=(holder.learner_id,),
                    )
                slot, verb = self._take(holder, certificate, now), "took back the slot of"
            elif len(self._slots) < self.capacity:
                slot, verb = self._take(Slot(len(self._slots), address, "", None), certificate, now), "registered as"
                self._slots.append(slot)
            else:
                # slots nobody is counted on first, then those of holders given up on
                free = sorted((slot for slot in self._slots if self._open(slot, now)), key=lambda slot: slot.given_up)
                if not free:
                    kept = tuple(slot.learner_id for slot in self._slots if slot.state == DROPPED)
                    raise Refusal(
                        f"all {self.capacity} learner slots are held; retry later, or start the leader "
                        "with a larger --learners",
                        retry=True,
                        probe=kept,
                    )
                previous = free[0].address
                slot = self._take(free[0], certificate, now)
                verb = f"took over from {previous or 'nobody'} the slot of"
            slot.address, slot.state, slot.kept_until, slot.registered_at = address, JOINING, 0.0, now
            slot.data = slot.data if verb == "re-registered" and slot.data else data
            slot.unreachable = ""
            slot.generation += 1
            self._changed.notify_all()
            return self._member(slot), f"{address} {verb} learner {slot.learner_id} of {self.capacity}"

    def _holding(self, credential: str | None, certificate: str | None) -> Slot | None:
        """The slot this credential (and certificate, if the slot has one) holds."""
        slot = self._of_credential(credential)
        return slot if slot and slot.certificate in (None, certificate) else None

    def _of_credential(self, credential: str | None) -> Slot | None:
        """The slot whose credential this is: found by its hash, then compared in constant time."""
        if not credential:
            return None
        slot = self._by_session.get(session_id(credential))
        return slot if slot and hmac.compare_digest(slot.credential.encode(), credential.encode()) else None

    def _at(self, address: str) -> Slot | None:
        return next((slot for slot in self._slots if slot.address == address), None)

    @staticmethod
    def _free(slot: Slot, now: float) -> bool:
        return slot.state == DROPPED and slot.kept_until <= now

    @classmethod
    def _open(cls, slot: Slot, now: float) -> bool:
        """Whether a newcomer may take the slot: free, or held by a learner given up on for missing rounds."""
        return cls._free(slot, now) or slot.given_up

    def _vacate(self, slot: Slot, now: float) -> None:
        """Give up a slot's address to its holder's own slot; refused while the slot is still held."""
        if not self._free(slot, now):
            raise Refusal(
                f"{slot.address} is the address of learner {slot.learner_id}; register with an address of your own"
            )
        slot.address = ""

    def _take(self, slot: Slot, certificate: str | None, now: float) -> Slot:
        """A slot for a newcomer, under a new credential: its previous holder's no longer works, nor its misses."""
        self._by_session.pop(slot.session, None)
        slot.credential, slot.certificate = new_credential(), certificate
        slot.held_since = now
        # No misses, but a slot whose holder was given up on keeps its strikes, one miss short of the next: the
        # newcomer may be that holder, registering again without its credential to start afresh; an update of
        # its that counts clears them
        slot.missed, slot.benched = (MAX_MISSED_ROUNDS - 1 if slot.strikes else 0), 0
        self._by_session[slot.session] = slot
        return slot

    @staticmethod
    def _member(slot: Slot) -> Member:
        return Member(slot.learner_id, slot.address, slot.credential, slot.generation)

    def holder(self, credential: str | None) -> int | None:
        """The slot this credential holds, whatever its state or certificate: a first, cheap check."""
        with self._changed:
            slot = self._of_credential(credential)
            return slot.learner_id if slot else None

    def caller_name(self, headers: Mapping[str, str]) -> str | None:
        """The name admission counts a call's turns under: the slot its credential holds (None: anonymous)."""
        slot = self.holder(headers.get(CREDENTIAL_HEADER))
        return None if slot is None else str(slot)

    def authenticate(self, credential: str | None, certificate: str | None) -> tuple[Member, str] | None:
        """The slot this credential (and certificate) holds and its state, or None."""
        with self._changed:
            slot = self._holding(credential, certificate)
            return (self._member(slot), slot.state) if slot else None

    def at(self, address: str) -> Member | None:
        """The registration at this address, if any."""
        with self._changed:
            slot = self._at(address)
            return self._member(slot) if slot else None

    def session_status(self, session: str) -> int | None:
        """SERVING while the registration named session holds its slot, NOT_SERVING once dropped, else None."""
        with self._changed:
            slot = self._by_session.get(session)
            return None if slot is None else NOT_SERVING if slot.state == DROPPED else SERVING

    def records(self) -> list[dict]:
        """Every slot's address, credential, certificate and data summary (as a dict), for a checkpoint: a
        resumed leader keeps the summary each slot was taken with, as a running one does."""
        with self._changed:
            return [
                {
                    "address": slot.address,
                    "credential": slot.credential,
                    "certificate": slot.certificate,
                    "data": asdict(slot.data) if slot.data else None,
                }
                for slot in self._slots
            ]

    def summaries(self) -> dict[int, DataSummary]:
        """The data summaries of the learners registered and not dropped, by slot."""
        with self._changed:
            return {slot.learner_id: slot.data for slot in self._slots if slot.state != DROPPED and slot.data}

    def summary(self, learner_id: int) -> DataSummary | None:
        """The data summary of one learner registered and not dropped (None: no such learner, or no summary): what
        a check of one update reads, without summaries()' copy of every slot's."""
        with self._changed:
            slot = self._slots[learner_id] if 0 <= learner_id < len(self._slots) else None
            return slot.data if slot is not None and slot.state != DROPPED and slot.data else None

    def is_active(self, learner_id: int) -> bool:
        """Whether the leader counts on this learner (it is starting or active)."""
        with self._changed:
            return learner_id < len(self._slots) and self._slots[learner_id].state in COUNTED_ON

    def active(self) -> list[int]:
        """The learners the leader counts on (starting or active)."""
        with self._changed:
            return [slot.learner_id for slot in self._slots if slot.state in COUNTED_ON]

    def members(self, learner_ids: list[int] | None = None) -> dict[int, Member]:
        """The learners counted on (or those of learner_ids, in any state), as one consistent snapshot."""
        with self._changed:
            chosen = (
                [slot for slot in self._slots if slot.state in COUNTED_ON]
                if learner_ids is None
                else [self._slots[learner_id] for learner_id in learner_ids if learner_id < len(self._slots)]
            )
            return {slot.learner_id: self._member(slot) for slot in chosen}

    def take_joiners(self) -> dict[int, Member]:
        """The learners that registered since the last call, now being started: rounds count on them."""
        with self._changed:
            joiners = [slot for slot in self._slots if slot.state == JOINING]
            for slot in joiners:
                slot.state = STARTING
            return {slot.learner_id: self._member(slot) for slot in joiners}

    def started(self, learner_id: int, generation: int) -> None:
        """The learner accepted StartTraining (news about an earlier registration changes nothing)."""
        with self._changed:
            slot = self._slots[learner_id]
            if slot.generation == generation and slot.state == STARTING:
                slot.state, slot.reached_at = ACTIVE, slot.address
                self._changed.notify_all()

    def ready(self) -> list[int]:
        """The learners started and training, but those given up on that sit out rounds: those a round waits for
        (and, with sampling, draws from). A holder on probation is among them."""
        with self._changed:
            return [slot.learner_id for slot in self._slots if slot.state == ACTIVE and not slot.benched]

    def missed(self, learner_ids: list[int], since: float) -> dict[int, int]:
        """Count a round missed by the holders of these slots that held them at `since` (when the round opened: a
        newcomer that took a slot since is not charged with its predecessor's round; one that sits out rounds is not
        charged either). Returns those now given up on, each with the times in a row it was (1: it missed
        MAX_MISSED_ROUNDS rounds; more: it missed its round on probation): each sits out the next
        bench_rounds(times) rounds closed, and a newcomer may take its slot."""
        with self._changed:
            given_up = {}
            for learner_id in learner_ids:
                slot = self._slots[learner_id] if learner_id < len(self._slots) else None
                if slot is None or slot.held_since > since or slot.benched:
                    continue
                slot.missed += 1
                if slot.missed >= MAX_MISSED_ROUNDS:
                    slot.strikes += 1
                    slot.benched, slot.benched_at = bench_rounds(slot.strikes), time.monotonic()
                    given_up[slot.learner_id] = slot.strikes
            return given_up

    def round_closed(self, since: float) -> list[int]:
        """A round closed that opened at `since`: the holders that sat it out (given up on before it opened) have one
        round fewer to sit out. Returns those whose bench ended: the next round waits for them (on probation)."""
        with self._changed:
            ended = []
            for slot in self._slots:
                if slot.benched and slot.benched_at <= since:
                    slot.benched -= 1
                    if not slot.benched:
                        ended.append(slot.learner_id)
            return ended

    def participated(self, learner_id: int, generation: int) -> bool:
        """An update of this registration counted: its holder takes part, and rounds wait for it again (its misses,
        strikes and bench are forgotten). Returns whether it had been given up on."""
        with self._changed:
            slot = self._slots[learner_id]
            if slot.generation != generation:
                return False
            was_given_up = slot.given_up
            self._clear_record(slot)
            return was_given_up

    @staticmethod
    def _clear_record(slot: Slot) -> None:
        """Forget the rounds a slot's holder missed: it takes part (or is new)."""
        slot.missed, slot.strikes, slot.benched = 0, 0, 0

    def given_up(self) -> list[int]:
        """The learners counted on but given up on for missing rounds, sitting out or on probation (a newcomer may
        take their slots)."""
        with self._changed:
            return [slot.learner_id for slot in self._slots if slot.given_up and slot.state in COUNTED_ON]

    def wait_started(self, timeout: float) -> bool:
        """Whether no learner is being started any more, waiting at most timeout seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: all(slot.state != STARTING for slot in self._slots), timeout)

    def never_reached(self, member: Member) -> bool:
        """Whether no learner of this slot ever accepted a start at this registration's address."""
        with self._changed:
            return self._slots[member.learner_id].reached_at != member.address

    def drop(self, learner_id: int, generation: int, gone: bool = False, unreachable: str = "") -> bool:
        """Stop counting on a registration; whether it was held. The slot is kept for its holder for
        keep_s seconds, unless the leader found it gone. News about an earlier registration changes nothing.
        unreachable: why the leader cannot dial the address it registered, where it never reached it; then the
        slot is free, and its holder's next registration from that address is refused, saying so."""
        with self._changed:
            slot = self._slots[learner_id] if learner_id < len(self._slots) else None
            if slot is None or slot.generation != generation:
                return False
            was_held = slot.state != DROPPED
            gone = gone or bool(unreachable)
            if was_held or gone:
                slot.kept_until = 0.0 if gone else time.monotonic() + self.keep_s
            slot.state, slot.unreachable = DROPPED, unreachable
            self._changed.notify_all()
            return was_held

    def count(self) -> int:
        """Learners active or waiting to be started."""
        with self._changed:  # re-entrant: wait_for below calls this while holding the lock
            return sum(slot.state != DROPPED for slot in self._slots)

    def wait_for(self, count: int, timeout: float) -> bool:
        """Whether at least count learners are active or joining, waiting at most timeout seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self.count() >= count, timeout)
