"""The leader's side of --compress-down: one replica R of the state every learner in step holds, moved towards
the model by a compressed delta at each new round, and which learners may take that delta (docs/compression.md,
"The state going down").

R is shared by every learner (no copy per learner): memory does not grow with learners. Per learner (slot and
registration generation) only the version (round) it last acknowledged is kept; a push of round r goes as the
delta to one whose acknowledged version is R's previous one, and as R's full state to anyone else.
"""

import logging
import threading
from collections.abc import Mapping

import torch

from federated.core.compression.delta import (
    apply_delta,
    delta_problem,
    make_delta,
    round_generator,
    state_hash,
    state_problem,
)
from federated.leader.registry import Member
from federated.wire import codec, framing
from federated.wire.messages import DeltaInfo

log = logging.getLogger("leader")


class Downlink:
    """The replica R learners in step hold, its version, the open round's delta and who acknowledged which version."""

    def __init__(self, codec_name: str, ratio: float, rank: int, seed: int) -> None:
        self.codec_name, self.ratio, self.rank, self.seed = codec_name, ratio, rank, seed
        self.replica: dict[str, torch.Tensor] | None = None
        self.version = -1  # the round R is the state of
        self.base: int | None = None  # the version the open round's delta goes from (None: no delta)
        self.entries: dict[str, torch.Tensor] | None = None  # the open round's delta
        self.warm: dict[str, dict[str, torch.Tensor]] = {}  # PowerSGD's warm starts, by tensor
        self.delta_message: bytes | None = None  # the delta as a serialised ModelState (None: full states only)
        self.sending_replica = False  # whether the last published state was R (not the final state, the model's own)
        self._acknowledged: dict[int, tuple[int, int]] = {}  # learner id -> (generation, version)
        self._lock = threading.Lock()

    def advance(self, round_index: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """R for the state published for round_index (state: the model's wire_state): moved by the round's delta
        the first time round_index is published, as it was on a push of the same round again (the delta is built
        once). The first R, and one after a delta that could not be made finite, is the state itself."""
        if self.replica is not None and round_index == self.version:
            return self.replica
        if self.replica is None:
            return self._reset(round_index, state)
        entries = make_delta(
            state,
            self.replica,
            self.codec_name,
            self.ratio,
            self.rank,
            self.warm,
            round_generator(self.seed, round_index),
        )
        problem = delta_problem(entries, self.replica, self.codec_name, self.ratio, self.rank)
        if problem is None:
            updated = apply_delta(self.replica, entries, self.codec_name, self.ratio, self.rank)
            problem = state_problem(updated)
        if problem is not None:
            log.warning(
                "round %d: the state's delta is unfit (%s); every learner gets the full state", round_index, problem
            )
            return self._reset(round_index, state)
        self.base, self.version, self.replica, self.entries = self.version, round_index, updated, entries
        return updated

    def _reset(self, round_index: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """R becomes a copy of the state itself: no delta this round."""
        self.replica = {name: tensor.detach().to("cpu").clone() for name, tensor in state.items()}
        self.version, self.base, self.entries = round_index, None, None
        return self.replica

    def publish(self, metadata: dict[str, str]) -> dict[str, str]:
        """Encode the open round's delta with a state's metadata (built once per publish, for every learner in
        step); returns the metadata R's full state carries beside it."""
        info = DeltaInfo(self.codec_name, self.ratio, self.rank)
        self.sending_replica = True
        self.delta_message = None
        if self.entries is not None and self.base is not None and self.replica is not None:
            delta = DeltaInfo(self.codec_name, self.ratio, self.rank, self.base, state_hash(self.replica))
            self.delta_message = framing.chunk_message(codec.encode(self.entries, metadata | delta.to_metadata()))
        return metadata | info.to_metadata()

    def publish_final(self) -> None:
        """The last state goes whole, and is the model's own: no delta, nothing to acknowledge."""
        self.sending_replica, self.delta_message = False, None

    def requests(self, members: Mapping[int, Member], full: bytes) -> dict[int, bytes]:
        """What each member is sent of the published state: the delta where its acknowledged version is the
        delta's base (and the delta is the smaller), else the full state. Forgets their acknowledged versions
        until they acknowledge this push: one unanswered or failed is never built on."""
        delta = self.delta_message if self.delta_message is not None and len(self.delta_message) < len(full) else None
        chosen: dict[int, bytes] = {}
        with self._lock:
            for learner_id, member in members.items():
                acknowledged = self._acknowledged.pop(learner_id, None)
                in_step = delta is not None and acknowledged == (member.generation, self.base)
                chosen[learner_id] = delta if in_step and delta is not None else full
        return chosen

    def acknowledged(self, member: Member, version: int) -> None:
        """The member took a push of R at this version (a successful Ack)."""
        with self._lock:
            self._acknowledged[member.learner_id] = (member.generation, version)

    def forget(self, member: Member) -> None:
        """A push to the member failed, or it was dropped: it gets the full state next."""
        with self._lock:
            self._acknowledged.pop(member.learner_id, None)

    def checkpoint(self) -> dict:
        """R, its version and PowerSGD's warm starts: a resumed run sends the same states (learners' acknowledged
        versions are not kept: they fetch afresh from a resumed leader)."""
        return {"version": self.version, "replica": self.replica, "warm": self.warm}

    def restore(self, saved: dict) -> None:
        self.version, self.replica, self.warm = saved["version"], saved["replica"], saved["warm"]
        self.base, self.entries, self.delta_message = None, None, None
        with self._lock:
            self._acknowledged.clear()
