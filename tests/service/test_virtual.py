"""Many learners in one process (learner.py --virtual N) with a live leader: calls dispatched by credential, a
learner stopped and started again like a process, per-learner state kept apart, a leader without credentials
refused; the leader's probes and secure phases through one server, each learner with turns of its own."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federated.leader.dispatch import GONE, LearnerClient
from federated.leader.metrics import MetricsLog
from federated.leader.registry import Member
from federated.learner import app as learner_module
from federated.learner.dispatch import PoolServer
from federated.learner.limits import Limits
from federated.learner.servicer import LearnerServer
from federated.learner.session import LeaderCredential, LeaderSession
from federated.net import rpc
from federated.net.rpc import leader_pb2, leader_pb2_grpc, learner_pb2, learner_pb2_grpc
from federated.wire import messages
from tests.support.live import LiveLeader, learner_config
from tests.support.runs import records

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def pool_of(live: LiveLeader, count: int, *flags: str) -> learner_module.Pool:
    argv = ["--leader", live.address, "--host", "127.0.0.1", "--virtual", str(count), "--connect-timeout", "20"]
    pool = learner_module.Learner(learner_config([*argv, *flags])).connect()
    assert isinstance(pool, learner_module.Pool)
    return pool


def until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def test_a_call_reaches_the_learner_whose_credential_it_carries_and_none_without_one(live):
    pool = pool_of(live, 2)
    try:
        first, second = pool.members
        assert {first.learner_id, second.learner_id} == {0, 1}
        stub = learner_pb2_grpc.LearnerServiceStub(rpc.channel(second.server.address))
        start = lambda credential: stub.StartTraining(
            learner_pb2.Empty(), timeout=10, metadata=rpc.with_credential(credential)
        )
        for credential in (None, rpc.new_credential()):  # none, or one the leader gave nobody of this pool
            with pytest.raises(grpc.RpcError) as refused:
                start(credential)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value.details()
        assert not first.server.started.is_set() and not second.server.started.is_set()
        assert start(first.session.credential.value).success  # the credential, not the port, names the learner
        assert first.server.started.is_set() and not second.server.started.is_set()
        health = health_pb2_grpc.HealthStub(rpc.channel(first.server.address))
        session = health_pb2.HealthCheckRequest(service=second.session.credential.session())
        assert health.Check(session, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        second.server.stop()  # as its process would stop: its calls find nobody, its registration is gone
        with pytest.raises(grpc.RpcError) as stopped:
            start(second.session.credential.value)
        assert stopped.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as gone:
            health.Check(session, timeout=10)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND and rpc.knows_sessions(gone.value)
    finally:
        pool.stop(0)


class CredentialFreeLeader(leader_pb2_grpc.LeaderServiceServicer):
    """A leader built from the article's protos, as far as registering goes: it gives no credentials."""

    def RegisterLearner(self, request, context):
        return leader_pb2.AckWithMetadata(success=True, message="registered", learner_id=0, max_learners=4)


@pytest.mark.parametrize("virtual", [1, 2])
def test_several_learners_of_one_process_refuse_a_leader_that_gives_no_credentials(virtual):
    server, port = rpc.start_server(
        "127.0.0.1:0", [(leader_pb2_grpc.add_LeaderServiceServicer_to_server, CredentialFreeLeader())], [], 1 << 20
    )
    try:
        config = learner_config(["--leader", f"127.0.0.1:{port}", "--virtual", str(virtual)])
        session = LeaderSession(config, Limits.of(config))
        register = lambda: session.register("127.0.0.1:7001", None, time.monotonic() + 10)
        if virtual == 1:  # a learner of its own takes every call, as a learner always did
            assert register().success and session.credential.value is None
        else:
            with pytest.raises(SystemExit, match=r"gives no credentials.*told apart only by the credential"):
                register()
    finally:
        server.stop(0)


def test_a_stopped_virtual_learner_is_dropped_and_takes_its_slot_back_and_scaffold_keeps_each_ones_control(
    tmp_path, port
):
    flags = ["--learners", "2", "--strategy", "scaffold", "--local-steps", "2", "--batch-size", "8"]
    run = ["--image-size", "8", "--rounds", "100000", "--min-learners", "1", "--eval-every", "100000"]
    live = LiveLeader.start(tmp_path, port, *flags, *run)
    leader, pool = live.leader, pool_of(live, 2)
    registry, collector = leader.registry, leader.collector
    try:
        with ThreadPoolExecutor(1) as loop:
            rounds = loop.submit(leader.rounds.train, MetricsLog(leader.out / "metrics.jsonl"))
            pool.start()
            until(lambda: collector.round >= 3, "three rounds")
            first, second = pool.members
            controls = [member.replica.controls for member in pool.members]
            assert controls[0] is not None and controls[1] is not None
            assert controls[0].own.data_ptr() != controls[1].own.data_ptr()  # each its own c_i ...
            assert not torch.equal(controls[0].own, controls[1].own)  # ... made of its own updates
            assert torch.count_nonzero(controls[0].own) and torch.count_nonzero(controls[1].own)
            pool.stop_learner(1)
            assert not pool.threads[1].is_alive()
            until(lambda: not registry.is_active(second.learner_id), "the leader dropping the stopped learner")
            dropped_at = collector.round
            until(lambda: collector.round >= dropped_at + 2, "rounds without it")
            pool.restart_learner(1)
            until(lambda: registry.is_active(second.learner_id), "the restarted learner back in its slot")
            taken_back = second.updates_sent
            until(lambda: second.updates_sent > taken_back, "an update of the restarted learner")
            assert second.learner_id == 1 and first.learner_id == 0
            assert pool.failure is None
            leader.stopping.set()
            assert rounds.result(timeout=30) > 0
    finally:
        pool.stop(0)
        leader.stop(0)
        live.stop()


def registered_pool(count: int) -> tuple[PoolServer, dict[int, Member]]:
    """The server of count learners of one process, each registered (credential-i) as learner i: no leader, no
    training; the leader's view of them as registry Members."""
    config = learner_config(["--leader", "127.0.0.1:1", "--host", "127.0.0.1", "--virtual", str(count)])
    learners = []
    for index in range(count):
        credential = LeaderCredential()
        credential.registered(f"credential-{index}")
        learners.append(LearnerServer(config, rpc.Security(), credential, {}, Limits.of(config)))
    server = PoolServer(config, rpc.Security(), learners, 1 << 20)
    members = {index: Member(index, learners[index].address, f"credential-{index}", 1) for index in range(count)}
    return server, members


def test_a_stopped_virtual_learner_is_found_gone_though_strangers_hold_every_health_check_of_theirs():
    """The leader's health checks carry the learner's credential: they take its own turns, not those of callers
    without one, which a stranger may hold (and a busy answer, RESOURCE_EXHAUSTED, reads as "there")."""
    pool, members = registered_pool(6)
    stranger = rpc.channel(members[0].address)
    release = threading.Event()
    stalled = lambda: iter(release.wait, True)  # a request that never comes, until released (then none)
    check = stranger.stream_unary(HEALTH_CHECK, health_pb2.HealthCheckRequest.SerializeToString)
    held: list[grpc.Future] = []

    def crowded() -> bool:
        """Whether the stranger holds every turn of callers without a credential: four stalled checks (one
        refused, while another check had a turn, tried again), and a fifth refused."""
        held[:] = [call for call in held if not call.done()]
        held.extend(check.future(stalled(), timeout=30) for _ in range(4 - len(held)))
        error = check.future(iter([health_pb2.HealthCheckRequest()]), timeout=10).exception()
        return error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    try:
        until(crowded, "a stranger holding the checks' turns")
        pool.directory.learners[5].stop()
        verdicts: list[tuple[int, str]] = []
        client = LearnerClient(rpc.Security())
        client.probe(members, lambda member, why, verdict: verdicts.append((member.learner_id, verdict)), 60)
        until(lambda: verdicts, "the stopped learner's verdict", timeout=10)
        until(lambda: not any(probe.in_flight for probe in client._probes.values()), "every check answered")
        assert verdicts == [(5, GONE)]  # the others are there: their checks found their registrations
    finally:
        release.set()
        for call in held:
            call.exception()
        stranger.close()
        pool.stop(0)


class MeetingParty:
    """A learner's secure-aggregation side that answers only once every learner of the pool is answering at once."""

    def __init__(self, meeting: threading.Barrier) -> None:
        self.meeting = meeting

    def answer(self, request: learner_pb2.SecAggRequest) -> learner_pb2.SecAggReply:
        self.meeting.wait()
        return learner_pb2.SecAggReply()


def test_a_secure_phase_reaches_more_learners_of_one_process_at_once_than_32():
    """Each learner of a pool gives its leader the turns a learner of its own gives (and a server thread each): a
    secure phase, which the leader sends to every participant at once, is served to 40 of them at once."""
    pool, members = registered_pool(40)
    meeting = threading.Barrier(len(members), timeout=20)
    for learner in pool.directory.learners:
        learner.servicer.secure = MeetingParty(meeting)  # type: ignore[assignment]
    try:
        requests = dict.fromkeys(members, learner_pb2.SecAggRequest(phase=1))
        replies = LearnerClient(rpc.Security()).ask(members, "SecureAggregation", requests, learner_pb2.SecAggReply, 30)
        failed = {learner: reply.code() for learner, reply in replies.items() if isinstance(reply, grpc.RpcError)}
        assert not failed
    finally:
        meeting.abort()
        pool.stop(0)


def test_secure_rounds_through_a_pool_sum_every_learners_input_and_survive_one_stopped(tmp_path, port):
    """Five learners of one process, each its own party of secure aggregation (keys, seeds, shares): a round unmasks
    the sum of all five masked inputs; one stopped (mid-round or between rounds) is dropped, and the rounds go on
    with the four others."""
    batch, steps = 8, 1
    flags = ["--learners", "5", "--secure-aggregation", "--strategy", "fedavg", "--local-steps", str(steps)]
    run = ["--batch-size", str(batch), "--image-size", "8", "--rounds", "100000", "--min-learners", "3"]
    live = LiveLeader.start(tmp_path, port, *flags, *run, "--eval-every", "100000")
    leader, pool = live.leader, pool_of(live, 5)
    rounds_of = lambda: [record for record in records(leader.out) if "train_loss" in record]
    try:
        with ThreadPoolExecutor(1) as loop:
            rounds = loop.submit(leader.rounds.train, MetricsLog(leader.out / "metrics.jsonl"))
            pool.start()
            until(lambda: rounds_of(), "a secure round")
            parties = {id(member.server.secure) for member in pool.members}
            assert len(parties) == 5  # each learner its own keys, seeds and shares
            pool.stop_learner(4)
            assert not pool.threads[4].is_alive()  # (not waiting for a commit: it is stopped)
            stopped = pool.members[4].learner_id
            until(lambda: not leader.registry.is_active(stopped), "the leader dropping the stopped learner")
            dropped_at = len(rounds_of())
            until(lambda: len(rounds_of()) > dropped_at, "a secure round without it")
            assert pool.failure is None
            leader.stopping.set()
            assert rounds.result(timeout=30) > 0
    finally:
        pool.stop(0)
        leader.stop(0)
        live.stop()
    first, after = rounds_of()[0], rounds_of()[dropped_at]
    assert (first["learners"], after["learners"]) == (5, 4)
    for record in (first, after):  # the unmasked sums weigh every input they hold
        assert "discarded" not in record and record["samples"] == record["learners"] * batch * steps, record


def test_a_learner_the_leader_refuses_ends_alone_and_the_others_finish_the_run(tmp_path, port):
    """The leader drops one learner of three as never reached, and refuses its registration again (no retry): that
    learner stops as its process would; the other two train on to the leader's final state, and the process then
    exits non-zero, naming it."""
    flags = ["--learners", "3", "--batch-size", "8", "--image-size", "8", "--rounds", "100000", "--min-learners", "1"]
    live = LiveLeader.start(tmp_path, port, *flags, "--eval-every", "100000")
    leader, pool = live.leader, pool_of(live, 3)
    registry, collector = leader.registry, leader.collector
    try:
        with ThreadPoolExecutor(1) as loop:
            rounds = loop.submit(leader.rounds.train, MetricsLog(leader.out / "metrics.jsonl"))
            pool.start()
            until(lambda: collector.round >= 2, "two rounds")
            refused = pool.members[2]
            generation = registry.at(refused.server.address).generation
            registry.drop(refused.learner_id, generation, unreachable="test: never reached")
            until(lambda: not pool.threads[2].is_alive(), "the refused learner's end")
            sent = [member.updates_sent for member in pool.members[:2]]
            until(lambda: all(m.updates_sent > n for m, n in zip(pool.members[:2], sent)), "the others' updates")
            leader.stopping.set()
            leader.stop(rounds.result(timeout=30))  # its final state, to the learners it counts on
            ended = loop.submit(pool.wait)
            assert messages.is_final(ended.result(timeout=30))  # (the old pool raised the refused one's SystemExit)
            with pytest.raises(
                SystemExit, match=r"1 of the 3 learners .*\(learner ids 2; the first: the leader refused"
            ):
                pool.check_failed()
    finally:
        leader.stopping.set()
        pool.stop(0)
        live.stop()
