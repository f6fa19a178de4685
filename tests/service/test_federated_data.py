"""Data that never leaves the learners, on a live leader without data: registration with data summaries,
federated evaluation reports checked against them, and the normalisation it settles on (kept on resume)."""

import math

import grpc
import pytest

from federated.leader import evaluation
from federated.net.rpc import leader_pb2, with_credential
from federated.wire import codec, messages
from tests.support.live import LiveLeader, leader_config, leader_from


def summary(train: int = 100, held_out: int = 40, size: int = 32) -> leader_pb2.DataSummary:
    message = leader_pb2.DataSummary()
    pixels = train * size * size
    messages.DataSummary(train, held_out, (0.5 * pixels,) * 3, (0.3 * pixels,) * 3).to_proto(message)
    return message


@pytest.fixture
def dataless(tmp_path, port):
    live = LiveLeader.start(tmp_path, port, "--dataset", "none", "--num-classes", "10", "--learners", "3")
    yield live
    live.stop()


def test_a_leader_without_data_refuses_learners_without_a_summary_or_with_an_impossible_one(dataless):
    reply = dataless.register("127.0.0.1:7001")
    assert not reply.success and "holds no data" in reply.message
    impossible = summary()
    impossible.channel_sums[0] = 1e12  # more than every pixel at full brightness
    reply = dataless.stub.RegisterLearner(leader_pb2.LearnerInfo(network_addr="127.0.0.1:7002", data=impossible))
    assert not reply.success and "impossible" in reply.message
    reply = dataless.stub.RegisterLearner(leader_pb2.LearnerInfo(network_addr="127.0.0.1:7003", data=summary()))
    assert reply.success
    with pytest.raises(grpc.RpcError) as refused:
        list(
            dataless.stub.GetData(
                leader_pb2.LearnerDataRequest(network_addr="127.0.0.1:7003"), metadata=with_credential(reply.credential)
            )
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_evaluation_reports_are_checked_against_what_each_learner_registered(dataless):
    credentials = []
    for index, held_out in enumerate((40, 0)):
        info = leader_pb2.LearnerInfo(network_addr=f"127.0.0.1:{7010 + index}", data=summary(held_out=held_out))
        credentials.append(dataless.stub.RegisterLearner(info).credential)
    dataless.leader.evaluations.open(5)
    dataless.leader.evaluations.expect(5, [0])

    def report(credential: str | None = credentials[0], **fields):
        values = {"learner_id": 0, "round": 5, "samples": 40, "correct": 30, "loss": 0.5, **fields}
        return dataless.stub.ReportEvaluation(
            leader_pb2.EvaluationReport(**values), metadata=with_credential(credential)
        )

    for credential, fields, code in [
        (None, {}, grpc.StatusCode.UNAUTHENTICATED),
        ("forged", {}, grpc.StatusCode.UNAUTHENTICATED),
        (credentials[1], {}, grpc.StatusCode.INVALID_ARGUMENT),  # learner 1 reporting as learner 0
        (credentials[1], {"learner_id": 1}, grpc.StatusCode.INVALID_ARGUMENT),  # it holds no held-out images
        (credentials[0], {"samples": 10**12, "correct": 10**12}, grpc.StatusCode.INVALID_ARGUMENT),  # buying weight
        (credentials[0], {"correct": 41}, grpc.StatusCode.INVALID_ARGUMENT),
        (credentials[0], {"loss": math.nan}, grpc.StatusCode.INVALID_ARGUMENT),
        (credentials[0], {"loss": -1.0}, grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as refused:
            report(credential, **fields)
        assert refused.value.code() == code, (fields, refused.value.details())
    assert not report(round=4).success  # no evaluation of round 4 was asked for
    assert report().success
    assert not report(correct=40).success  # a second report of the same round counts for nothing
    [record] = dataless.leader.evaluations.records()
    assert (record["round"], record["test_accuracy"], record["test_samples"]) == (5, 0.75, 40)


def test_a_leader_without_data_settles_on_its_learners_summaries_and_a_resume_keeps_them(tmp_path, port):
    live = LiveLeader.start(
        tmp_path,
        port,
        "--dataset",
        "none",
        "--num-classes",
        "10",
        "--learners",
        "2",
        "--rounds",
        "20",  # (below 3 learners the schedule's flags are required; the epoch still comes from the claims)
        "--batch-size",
        "10",
    )
    black = leader_pb2.DataSummary(
        train_samples=messages.MAX_SAMPLES, eval_samples=0, channel_sums=[0.0] * 3, channel_square_sums=[0.0] * 3
    )  # a liar: billions of black images
    for index, data in enumerate((summary(train=100), black)):
        assert live.stub.RegisterLearner(
            leader_pb2.LearnerInfo(network_addr=f"127.0.0.1:{7020 + index}", data=data)
        ).success
    assert live.leader.settle()
    schedule, state = live.leader.planner.schedule, codec.decode(live.leader.global_model.encoded_state)
    assert (schedule.steps_per_epoch, schedule.total_rounds) == (10, 20)  # the smaller learner's 100 images
    info = messages.StateInfo.from_payload(state)
    # the liar weighs no more than the median learner's 100 images: mean 0.5 * 100 / 200, E[x^2] 0.3 * 100 / 200
    assert info.mean == pytest.approx((0.25,) * 3) and info.std == pytest.approx(((0.15 - 0.0625) ** 0.5,) * 3)
    live.leader.rounds.save_checkpoint(0)
    live.stop()
    resumed = leader_from(["--resume", str(tmp_path)])
    assert resumed.planner.schedule == schedule
    assert messages.StateInfo.from_payload(codec.decode(resumed.global_model.encoded_state)).mean == info.mean


def test_a_learner_keeps_the_summary_it_registered_with_and_only_those_asked_may_report(dataless):
    first = leader_pb2.LearnerInfo(network_addr="127.0.0.1:7030", data=summary(held_out=40))
    credential = dataless.stub.RegisterLearner(first).credential
    dataless.leader.registry.reregister_s = 0
    bigger = leader_pb2.LearnerInfo(network_addr="127.0.0.1:7030", data=summary(held_out=10**9))
    assert dataless.stub.RegisterLearner(bigger, metadata=with_credential(credential)).success
    assert dataless.leader.registry.summaries()[0].eval_samples == 40
    other = dataless.stub.RegisterLearner(
        leader_pb2.LearnerInfo(network_addr="127.0.0.1:7031", data=summary())
    ).credential
    evaluations = dataless.leader.evaluations
    evaluations.open(3)
    early = leader_pb2.EvaluationReport(learner_id=1, round=3, samples=40, correct=40, loss=0.1)
    assert dataless.stub.ReportEvaluation(
        early, metadata=with_credential(other)
    ).success  # before the push named anyone
    evaluations.expect(3, [0])  # the state went to learner 0 only: learner 1's early report is dropped
    assert not dataless.stub.ReportEvaluation(early, metadata=with_credential(other)).success
    report = leader_pb2.EvaluationReport(learner_id=0, round=3, samples=40, correct=10, loss=1.0)
    assert dataless.stub.ReportEvaluation(report, metadata=with_credential(credential)).success
    [record] = evaluations.records()
    assert (list(record["per_learner"]), record["test_accuracy"]) == (["0"], 0.25)


def test_an_evaluation_nobody_completed_is_recorded_once_a_later_one_begins(dataless):
    evaluations = dataless.leader.evaluations
    evaluations.open(2)
    evaluations.expect(2, [0, 1])
    assert evaluations.records() == []  # still open: learner 1 may report
    evaluations.submit(2, evaluation.Report(0, 40, 20, 1.0, 40), declared_samples=40)
    evaluations.open(4)
    [record] = evaluations.records()
    assert (record["round"], record["missing"], record["test_accuracy"]) == (2, [1], 0.5)
    assert evaluations.records(final=True) == []  # round 4: nobody reported, no record


def test_one_liar_of_two_sets_neither_the_schedule_nor_the_normalisation_nor_the_evaluation(tmp_path, port, capsys):
    # of two learners the median claim is the smaller one: without the schedule's flags the liar's would set it
    for given in (["--strategy", "fedsgd"], ["--strategy", "fedavg", "--rounds", "510"]):
        with pytest.raises(SystemExit):
            leader_config(["--dataset", "none", "--num-classes", "10", "--learners", "2", *given])
        assert "fewer than 3 learners needs" in capsys.readouterr().err
    assert leader_config(["--dataset", "none", "--num-classes", "10", "--learners", "3"]).rounds is None
    flags = ["--dataset", "none", "--num-classes", "10", "--learners", "2", "--batch-size", "32", "--rounds", "510"]
    live = LiveLeader.start(tmp_path, port, *flags)
    liar = leader_pb2.DataSummary(
        train_samples=1, eval_samples=2**32, channel_sums=[0.0] * 3, channel_square_sums=[0.0] * 3
    )  # one black image, and billions held out
    credentials = [
        live.stub.RegisterLearner(leader_pb2.LearnerInfo(network_addr=f"127.0.0.1:{7040 + index}", data=data))
        for index, data in enumerate((summary(train=544, held_out=136), liar))
    ]
    assert all(reply.success for reply in credentials)
    assert live.leader.settle()
    schedule = live.leader.planner.schedule
    assert (schedule.total_rounds, schedule.steps_per_epoch, schedule.warmup_rounds) == (510, 17, 17)
    info = messages.StateInfo.from_payload(codec.decode(live.leader.global_model.encoded_state))
    assert info.mean == pytest.approx((0.5,) * 3)  # the honest learner's alone: the black image is not counted
    live.leader.evaluations.open(17)
    for learner_id, (samples, correct) in enumerate(((136, 102), (2**32, 0))):
        report = leader_pb2.EvaluationReport(learner_id=learner_id, round=17, samples=samples, correct=correct, loss=1)
        assert live.stub.ReportEvaluation(report, metadata=with_credential(credentials[learner_id].credential)).success
    [record] = live.leader.evaluations.records(final=True)
    # the liar's 2**32 held-out images weigh as its one training image: 102 of 137
    assert record["test_accuracy"] == pytest.approx(102 / 137)
    assert record["per_learner"]["1"]["weighed_as"] == 1
    live.stop()
