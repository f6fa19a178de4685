"""The leader's gRPC service: translates LeaderService calls into calls on the registry, the shards, the round
collector and the evaluations, checking every claim a caller makes against what the leader itself knows."""

import ipaddress
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from functools import partial

import grpc
import torch

from federated.core import compression
from federated.core.aggregation import DecodeAdd
from federated.core.checks import TensorSpec
from federated.core.layout import GradientLayout
from federated.leader import evaluation
from federated.leader.collector import RoundCollector
from federated.leader.data import MAX_SHARD_FACTOR, Shards
from federated.leader.federation import Federation
from federated.leader.global_model import GlobalModel
from federated.leader.planner import Planner
from federated.leader.registry import COUNTED_ON, Member, Refusal, Registry
from federated.net import guard, rpc
from federated.net.rpc import leader_pb2, leader_pb2_grpc
from federated.privacy import secagg
from federated.wire import codec, framing, messages

log = logging.getLogger("leader")

GRADIENT_WORKERS = 4

LOG_INTERVAL_S = 10.0  # at most one line this often for what callers can make happen at will
# Registrations of the learners with ids below this are logged one by one; beyond it (hundreds of virtual learners,
# docs/scale.md) one line every LOG_INTERVAL_S says how many more registered.
LOGGED_REGISTRATIONS = 20

# Bulk bytes bypass protobuf: GetModel and GetData yield serialised chunk messages (framing.chunk_messages),
# AccumulateGradients gets a framing.ChunkRequest.
ADD_LEADER_SERVICE = framing.without_protobuf_copies(
    leader_pb2_grpc.add_LeaderServiceServicer_to_server,
    replies={"GetModel", "GetData"},
    requests={"AccumulateGradients"},
)


class Throttle:
    """Lets a repeated event through at most once every `seconds`, counting the others."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.last, self.held_back = seconds, -math.inf, 0
        self._lock = threading.Lock()

    def allow(self) -> int | None:
        """None while the event is held back; else how many were held back since the last one let through."""
        with self._lock:
            now = time.monotonic()
            if now - self.last < self.seconds:
                self.held_back += 1
                return None
            held_back, self.last, self.held_back = self.held_back, now, 0
            return held_back


class LeaderServicer(leader_pb2_grpc.LeaderServiceServicer):
    """Translates LeaderService RPCs into calls on the registry, the shards and the round collector, checking
    every claim a caller makes (who it is, which round, how many samples) against what the leader knows."""

    def __init__(
        self,
        registry: Registry,
        collector: RoundCollector,
        global_model: GlobalModel,
        shards: Shards | None,
        planner: Planner,
        federation: Federation,
        evaluations: evaluation.Evaluations,
    ) -> None:
        self.registry, self.collector, self.global_model = registry, collector, global_model
        self.shards, self.planner = shards, planner  # no shards: a leader without data
        self.federation, self.evaluations = federation, evaluations
        # Gradients checked at once: every learner may have two calls in, but dozens of threads decoding at once
        # on a few cores take twice as long as a few at a time (leader_scale, 64 learners: 0.88 s against 0.46 s).
        self.working = threading.BoundedSemaphore(GRADIENT_WORKERS)
        # An update's header names the model's tensors and a few metadata: a longer one is refused unparsed (11.6
        # MiB of JSON took 1.6 s of CPU, holding the GIL, and 149 MiB to parse; the check, 42 microseconds).
        # With --compress, updates in the plan's codec (and plain ones, from peers that know no codec): exactly
        # the entries compression.expected names, checked before a value is read.
        config, layout = planner.config, global_model.layout
        self.compressed_spec: TensorSpec = (
            {}
            if config.compress == "none"
            else compression.expected(layout.shapes, config.compress, config.compress_ratio, config.compress_rank)
        )
        self.gradient_header_bytes = max(map(codec.header_limit, (layout.spec, self.compressed_spec)))
        # Callers choose how often these happen: one line per LOG_INTERVAL_S each, with a count of the rest.
        self.logged = {kind: Throttle(LOG_INTERVAL_S) for kind in ("refused", "data", "ignored", "registered")}

    def log(self, kind: str, message: str, *args: object, level: int = logging.INFO) -> None:
        if (held_back := self.logged[kind].allow()) is not None:
            log.log(level, message + (f" (and {held_back} more such since the last)" if held_back else ""), *args)

    def RegisterLearner(
        self, request: leader_pb2.LearnerInfo, context: grpc.ServicerContext
    ) -> leader_pb2.AckWithMetadata:
        try:
            data = self.data_summary(request)
            member, message = self.registry.register(
                request.network_addr, rpc.credential_of(context), rpc.peer_certificate(context), data
            )
        except Refusal as refusal:
            self.log("refused", "registration refused: %s", refusal)
            self.federation.probe(refusal.probe)
            if refusal.retry:
                rpc.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(refusal))
            return leader_pb2.AckWithMetadata(
                success=False, message=str(refusal), learner_id=-1, max_learners=self.registry.capacity
            )
        images = f" ({data.train_samples} training images, {data.eval_samples} held out)" if data else ""
        if member.learner_id < LOGGED_REGISTRATIONS:
            log.info("%s%s", message, images)
        else:
            self.log("registered", "%s%s", message, images)
        return leader_pb2.AckWithMetadata(
            success=True,
            message=message,
            learner_id=member.learner_id,
            max_learners=self.registry.capacity,
            credential=member.credential,
        )

    def data_summary(self, request: leader_pb2.LearnerInfo) -> messages.DataSummary | None:
        """What the learner says its own data is, checked; raises Refusal. A leader without data needs it."""
        if not request.HasField("data"):
            if self.shards is None:
                raise Refusal(
                    "this leader holds no data (--dataset none): start the learner with --dataset and "
                    "--data-dir naming its own images"
                )
            return None
        try:
            return messages.DataSummary.from_proto(request.data, self.global_model.info.image_size)
        except codec.PayloadError as error:
            raise Refusal(f"data summary refused: {error}") from None

    def GetModel(self, request: leader_pb2.Empty, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from self.global_model.model_messages()

    def GetData(self, request: leader_pb2.LearnerDataRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        member = self.data_caller(request.network_addr, context)
        if self.shards is None:
            rpc.abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "this leader holds no data (--dataset none): start the "
                "learner with --dataset and --data-dir naming its own images",
            )
        self.log("data", "sending learner %d its data shard", member.learner_id)
        yield from self.shards.messages(member.learner_id)  # serialised DataChunk messages

    def data_caller(self, address: str, context: grpc.ServicerContext) -> Member:
        """The registration asking for its shard: by its credential or, for a peer that knows only the
        article's protos, by its address if it calls from that address's IP."""
        if rpc.credential_of(context):
            return self.caller(context)[0]
        member = self.registry.at(address)
        if member is None:
            rpc.abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"{address[:64]!r} has not registered; call RegisterLearner with this address first",
            )
        if not same_host(address, guard.peer_host(context)):
            rpc.abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "send the credential this learner got at registration "
                f"(call header {rpc.CREDENTIAL_HEADER!r}), or ask from the IP address you registered",
            )
        return member

    def caller(self, context: grpc.ServicerContext) -> tuple[Member, str]:
        """The registration whose credential the call carries, and its state; aborts with UNAUTHENTICATED
        for a call without a credential that holds a slot."""
        found = self.registry.authenticate(rpc.credential_of(context), rpc.peer_certificate(context))
        if found is None:
            rpc.abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "this call needs the credential of a registered learner "
                f"(call header {rpc.CREDENTIAL_HEADER!r}, from AckWithMetadata.credential); register first",
            )
        return found

    def AccumulateGradients(self, request: framing.ChunkRequest, context: grpc.ServicerContext) -> leader_pb2.Ack:
        member, state = self.caller(context)
        if state not in COUNTED_ON:
            rpc.abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"learner {member.learner_id} is not training (dropped, or not started yet); register again",
            )
        with self.working:
            return self.accumulate(request.chunk, member, context)

    def ReportEvaluation(self, request: leader_pb2.EvaluationReport, context: grpc.ServicerContext) -> leader_pb2.Ack:
        member, _ = self.caller(context)
        if request.learner_id != member.learner_id:
            rpc.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"learner_id {request.learner_id} is not the caller's slot, {member.learner_id}",
            )
        declared = self.registry.summary(member.learner_id)
        facts = self.planner.facts  # (none only before a leader without data settled: no evaluation is open)
        weight = evaluation.weight(declared, facts.shard_size if facts else 1) if declared else 0
        report = evaluation.Report(member.learner_id, request.samples, request.correct, request.loss, weight)
        try:
            ignored = self.evaluations.submit(request.round, report, declared.eval_samples if declared else 0)
        except codec.PayloadError as error:
            rpc.abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"evaluation refused: {error}")
        if ignored:
            self.log("ignored", "%s", ignored)
        return leader_pb2.Ack(
            success=ignored is None, message=ignored or f"evaluation of round {request.round} counted"
        )

    def accumulate(self, chunk: memoryview, member: Member, context: grpc.ServicerContext) -> leader_pb2.Ack:
        """Check a learner's gradient and add it to the open round."""
        try:
            payload = codec.decode(chunk, self.gradient_header_bytes)
            if self.federation.secure is not None:
                masked = self.check_masked(payload, member)
            else:
                claims = self.check_claims(payload, member)
                update = self.checked_update(payload, claims)
        except (codec.PayloadError, ValueError) as error:
            rpc.abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"gradient rejected: {error}")
        if self.federation.secure is not None:
            round_index = masked.round
            reason = self.collector.submit_masked(member.learner_id, round_index, payload.tensors, len(chunk))
        else:
            round_index = claims.round
            reason = self.collector.submit(
                member.learner_id, round_index, update, claims.samples, claims.loss, len(chunk)
            )
        self.federation.received(member, counted=reason is None)
        if reason:
            self.log("ignored", "learner %d: %s", member.learner_id, reason, level=logging.WARNING)
            return leader_pb2.Ack(success=False, message=reason)
        return leader_pb2.Ack(success=True, message=f"gradient for round {round_index} accepted")

    def checked_update(self, payload: codec.Payload, claims: messages.UpdateInfo) -> list[torch.Tensor] | DecodeAdd:
        """A plain update's tensors, checked against the model, as the collector adds them (codec.flat_runs); or a
        compressed one's entries, checked against what the plan's codec sends (compression.expected: every name,
        dtype and shape, in order) and then their values, once (every float finite, indices, scales, packed
        levels: compression.values_problem), as a DecodeAdd that adds them without checking again. Here, outside
        the collector's lock. Raises PayloadError."""
        layout, config = self.global_model.layout, self.planner.config
        if claims.compress != "none" and claims.compress != config.compress:
            raise codec.PayloadError(
                f"update compressed with {claims.compress}, but this leader asks for {config.compress} (or a plain "
                "update)"
            )
        settings = (config.compress, config.compress_ratio, config.compress_rank)
        if claims.compress == "none":
            codec.check_matches(payload, layout.spec)
        else:
            codec.check_layout(payload, self.compressed_spec)
            if problem := compression.values_problem(payload.tensors, layout.shapes, *settings):
                raise codec.PayloadError(problem)
        if problem := layout.update_problem(payload.tensors):  # (statistics travel raw, under their own names)
            raise codec.PayloadError(problem)
        if claims.compress == "none":
            return codec.flat_runs(payload)
        return partial(decode_update, layout, payload.tensors, settings)

    def check_masked(self, payload: codec.Payload, member: Member) -> messages.MaskedInfo:
        """What a secure round's masked input claims (its slot and round), checked, and its tensors exactly its
        ring's (dtype and length: a wrong width is refused here, before the sum); raises PayloadError. A plain
        update is refused: it would show this leader one learner's update."""
        if not messages.is_masked(payload):
            raise codec.PayloadError(
                "this leader runs secure aggregation (--secure-aggregation) and takes only masked inputs (kind "
                "'masked'), never a plain update: it would show the leader one learner's update; the learner must "
                "follow the state's secure round (a learner of this version does)"
            )
        assert self.federation.secure is not None  # (called only under secure aggregation)
        ring = self.federation.secure.ring
        if ring.bits < secagg.BITS and [(name, tensor.dtype) for name, tensor in payload.tensors.items()] == [
            (secagg.MASKED_TENSOR, torch.int32)
        ]:  # one I32 vector: the masked input of a learner that predates int8/int4 under secure aggregation
            raise codec.PayloadError(
                f"this run masks {self.planner.config.compress} in a {ring.bits}-bit ring; this learner sent the "
                f"{secagg.BITS}-bit input (upgrade it)"
            )
        claims = messages.MaskedInfo.from_payload(payload, ring.spec)
        if claims.learner_id != member.learner_id:
            raise codec.PayloadError(
                f"metadata learner_id {claims.learner_id} is not the caller's slot, {member.learner_id}"
            )
        return claims

    def check_claims(self, payload: codec.Payload, member: Member) -> messages.UpdateInfo:
        """What an update claims (its slot, kind, samples and steps), checked against what this leader asked
        for, its samples held to what it believes the learner holds (weighed_samples); raises PayloadError."""
        claims = messages.UpdateInfo.from_payload(payload)
        strategy, steps = self.global_model.strategy, self.planner.schedule.steps_per_round
        shard_size = self.shard_size(member.learner_id)
        if strategy.own_epochs:  # each learner's steps are its own shard's, as this leader knows its size
            steps = self.planner.steps_of(shard_size)
        batch_size = self.planner.config.batch_size
        if shard_size is not None:  # a shard smaller than a batch is one smaller batch
            batch_size = min(batch_size, shard_size)
        if claims.learner_id != member.learner_id:
            raise codec.PayloadError(
                f"metadata learner_id {claims.learner_id} is not the caller's slot, {member.learner_id}"
            )
        expected = strategy.update_kind
        if claims.kind != expected:
            raise codec.PayloadError(f"this leader runs {strategy.name} and takes a {expected}, not a {claims.kind}")
        if claims.steps > steps:
            raise codec.PayloadError(
                f"metadata steps {claims.steps} exceeds the {steps} local steps this leader asks of this learner"
            )
        if claims.samples > batch_size * claims.steps:
            raise codec.PayloadError(
                f"metadata samples {claims.samples} exceeds the batch of {batch_size} this leader "
                f"asks for{'' if claims.steps == 1 else f' times {claims.steps} steps'}"
            )
        return replace(claims, samples=self.weighed_samples(member.learner_id, claims.samples))

    def shard_size(self, learner_id: int) -> int | None:
        """The training images a learner holds as this leader knows it: the shard it sent, or the number the
        learner registered with (a leader without data); None when neither is known."""
        if self.shards is not None:
            return len(self.shards.indices[learner_id])
        summary = self.registry.summary(learner_id)
        if summary is None or self.planner.facts is None:  # (no facts: not settled, nobody trains yet)
            return None
        return summary.train_samples

    def weighed_samples(self, learner_id: int, claimed: int) -> int:
        """The most samples a learner's update weighs: what it claimed, except that with each learner's own
        epochs a leader without data, which cannot check the size a learner registered, weighs an update at most
        as much as MAX_SHARD_FACTOR typical learners' (the median shard's batches times its steps). Its steps are
        still its own: an honest large learner takes part, weighed less."""
        facts = self.planner.facts
        if not self.global_model.strategy.own_epochs or self.shards is not None or facts is None:
            return claimed
        typical = facts.shard_size
        return min(
            claimed, MAX_SHARD_FACTOR * min(self.planner.config.batch_size, typical) * self.planner.steps_of(typical)
        )


def decode_update(
    layout: GradientLayout,
    entries: dict[str, torch.Tensor],
    settings: tuple[str, float, int],
    out: torch.Tensor,
    weight: float,
) -> None:
    """Add weight times a compressed update (its entries, checked already: checked_update; settings: the codec,
    ratio and rank) into a flat update vector (DecodeAdd)."""
    compression.add_checked(entries, layout.views(out), weight, *settings)


def same_host(address: str, peer: str | None) -> bool:
    """Whether a HOST:PORT names the IP address a call came from (IPv4-mapped IPv6 counts as IPv4)."""

    def normal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        ip = ipaddress.ip_address(host.strip("[]"))
        return (ip.ipv4_mapped or ip) if ip.version == 6 else ip

    try:
        return peer is not None and normal(address.rsplit(":", 1)[0]) == normal(peer)
    except ValueError:  # a host name: the leader does not resolve names callers give it
        return False


def method_limits(idle_timeout: float) -> dict[str, guard.Limit]:
    """How the leader admits calls. A learner, named by its credential, has turns of its own that nobody
    else can take: 2 gradients and 2 shard streams at once, and 1 call of each other kind. Callers without
    a credential (newcomers, peers of the article's protos) have 1 turn per network (guard.caller_network), and
    a few in all."""
    leader_method = lambda name: f"/{rpc.LEADER_SERVICE}/{name}"
    return {
        leader_method("RegisterLearner"): guard.Limit(1, anonymous=8),
        leader_method("GetModel"): guard.Limit(1, anonymous=4),
        leader_method("GetData"): guard.Limit(2, anonymous=2),
        leader_method("AccumulateGradients"): guard.Limit(2, anonymous=0, request_s=idle_timeout),
        leader_method("ReportEvaluation"): guard.Limit(1, anonymous=0),
        "/grpc.health.v1.Health/Check": guard.Limit(1, anonymous=8),
    }
