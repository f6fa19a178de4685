"""Data that never leaves the learners: a leader without data, federated evaluation, skewed partitions,
other image sizes, torchvision models and starting from saved weights; real processes on localhost."""

import json
import math
from pathlib import Path

import grpc
import pytest
import torch

from federated.leader import evaluation
from federated.tools import launch
from federated.leader import app as leader_module
from federated.learner import app as learner
from federated.wire import messages
import utils
from federated.wire import codec
from tests.support.processes import start_leader, start_learner
from tests.support.runs import logs, records
from tests.support.live import LiveLeader
from model import build_model
from federated.net.rpc import leader_pb2, with_credential
from federated.core.training import evaluate


def learners_own_images(root: Path, count: int) -> list[Path]:
    launch.write_digits(root, count)
    return [root / f"learner{index}" for index in range(count)]


def run_own_data(out: Path, folders: list[Path], leader_args: list[str], timeout: float = 300) -> list[int | None]:
    """A leader and one learner per image folder, each learner training on its own folder."""
    port = launch.free_port()
    leader = start_leader(out, port, "--learners", str(len(folders)), *leader_args)
    procs = [start_learner(out, f"learner{index}", port, "--dataset", "imagefolder", "--data-dir", str(folder))
             for index, folder in enumerate(folders)]
    return launch.wait_all([leader, *procs], timeout)


def test_a_leader_without_data_trains_learners_on_their_own_images_and_their_evaluation_is_the_models(tmp_path):
    folders = learners_own_images(tmp_path / "digits", 2)
    out = tmp_path / "run"
    codes = run_own_data(out, folders, ["--dataset", "none", "--num-classes", "10", "--image-size", "16",
                                        "--rounds", "60", "--batch-size", "32", "--eval-every", "20"])
    assert codes == [0, 0, 0], logs(out)
    leader_log = (out / "leader.log").read_text()
    assert "data shard" not in leader_log and "learners hold" in leader_log
    evaluations = [r for r in records(out) if r.get("source") == "learners"]
    rounds = [r["round"] for r in evaluations]
    assert {20, 40, 60} <= set(rounds) and rounds[-1] == 60, logs(out)  # --eval-every, and every epoch's end
    assert not any(r.get("source") == "leader" for r in records(out))  # it has no test split of its own
    final = evaluations[-1]
    assert sorted(final["per_learner"]) == ["0", "1"]
    # The learners' combined evaluation is the global model's on the union of their held-out images
    tests = [utils.load_dataset("imagefolder", folder, train=False, image_size=16) for folder in folders]
    summaries = [messages.DataSummary.of(utils.load_dataset("imagefolder", folder, train=True, image_size=16),
                                         len(test)) for folder, test in zip(folders, tests)]
    mean, std = leader_module.combined_normalisation(summaries, 16)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["data"]["mean"] == pytest.approx(mean)
    model = build_model("resnet20", num_classes=10)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    union = torch.cat([data.images for data in tests]), torch.cat([data.labels for data in tests])
    direct = evaluate(model, utils.normalize(union[0], mean, std), union[1])
    assert final["test_samples"] == len(union[1])
    assert final["test_accuracy"] == pytest.approx(direct.accuracy, abs=1e-9)
    assert final["test_loss"] == pytest.approx(direct.loss, rel=1e-4)
    assert final["test_accuracy"] > 0.5, logs(out)  # it trained: chance is 0.1
    assert all("per_learner" in r for r in records(out) if "train_loss" in r)
    assert (out / "metrics.png").stat().st_size > 10_000


def test_a_torchvision_model_trains_at_64_pixels_on_a_skewed_partition(tmp_path):
    folder = learners_own_images(tmp_path / "digits", 1)[0]
    out = tmp_path / "run"
    port = launch.free_port()
    leader = start_leader(out, port, "--learners", "2", "--dataset", "imagefolder", "--data-dir", str(folder),
                          "--image-size", "64", "--model", "torchvision:mobilenet_v3_small", "--rounds", "3",
                          "--batch-size", "8", "--partition", "dirichlet", "--alpha", "0.3", "--tensorboard",
                          str(out / "tb"))
    procs = [start_learner(out, f"learner{index}", port) for index in range(2)]
    codes = launch.wait_all([leader, *procs], 300)
    assert codes == [0, 0, 0], logs(out)
    counts = [entry["label_counts"] for entry in json.loads((out / "partition.json").read_text())]
    assert len(counts) == 2 and all(len(row) == 10 for row in counts)
    assert counts[0] != counts[1]  # skewed: not the same mix
    assert (out / "partition.png").stat().st_size > 5_000
    assert any((out / "tb").iterdir())  # TensorBoard events
    assert [r["learners"] for r in records(out) if "train_loss" in r] == [2, 2, 2]


def test_the_global_model_starts_from_init_weights(tmp_path):
    saved = build_model("resnet20", num_classes=10)
    with torch.no_grad():
        for parameter in saved.parameters():
            parameter.add_(0.01)
    torch.save(saved.state_dict(), tmp_path / "model.pt")
    args = leader_module.parse_args(["--dataset", "synthetic", "--out", str(tmp_path / "run"),
                                     "--init", str(tmp_path / "model.pt")])
    leader = leader_module.Leader(args)
    started = leader.global_model.model.state_dict()
    assert all(torch.equal(started[name], tensor) for name, tensor in saved.state_dict().items())
    images, labels = leader.test_images[:200], leader.test_labels[:200]
    assert evaluate(leader.global_model.model, images, labels) == evaluate(saved, images, labels)
    served = codec.decode(leader.global_model.encoded_state)  # what learners fetch: the saved weights
    assert torch.equal(served.tensors["fc.weight"], saved.fc.weight.detach())


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
        list(dataless.stub.GetData(leader_pb2.LearnerDataRequest(network_addr="127.0.0.1:7003"),
                                   metadata=with_credential(reply.credential)))
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
        return dataless.stub.ReportEvaluation(leader_pb2.EvaluationReport(**values), metadata=with_credential(credential))

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
    live = LiveLeader.start(tmp_path, port, "--dataset", "none", "--num-classes", "10", "--learners", "2",
                            "--epochs", "2", "--batch-size", "10")
    black = leader_pb2.DataSummary(train_samples=messages.MAX_SAMPLES, eval_samples=0, channel_sums=[0.0] * 3,
                                   channel_square_sums=[0.0] * 3)  # a liar: billions of black images
    for index, data in enumerate((summary(train=100), black)):
        assert live.stub.RegisterLearner(leader_pb2.LearnerInfo(network_addr=f"127.0.0.1:{7020 + index}", data=data)).success
    assert live.leader.settle_on_learners_data()
    schedule, state = live.leader.schedule, codec.decode(live.leader.global_model.encoded_state)
    assert (schedule.steps_per_epoch, schedule.total_rounds) == (10, 20)  # the smaller learner's 100 images
    info = messages.StateInfo.from_payload(state)
    # the liar weighs no more than the median learner's 100 images: mean 0.5 * 100 / 200, E[x^2] 0.3 * 100 / 200
    assert info.mean == pytest.approx((0.25,) * 3) and info.std == pytest.approx(((0.15 - 0.0625) ** 0.5,) * 3)
    live.leader.save_checkpoint(0)
    live.stop()
    resumed = leader_module.Leader(leader_module.parse_args(["--resume", str(tmp_path)]))
    assert resumed.schedule == schedule
    assert messages.StateInfo.from_payload(codec.decode(resumed.global_model.encoded_state)).mean == info.mean


def test_a_learner_keeps_the_summary_it_registered_with_and_only_those_asked_may_report(dataless):
    first = leader_pb2.LearnerInfo(network_addr="127.0.0.1:7030", data=summary(held_out=40))
    credential = dataless.stub.RegisterLearner(first).credential
    dataless.leader.registry.reregister_s = 0
    bigger = leader_pb2.LearnerInfo(network_addr="127.0.0.1:7030", data=summary(held_out=10**9))
    assert dataless.stub.RegisterLearner(bigger, metadata=with_credential(credential)).success
    assert dataless.leader.registry.summaries()[0].eval_samples == 40
    other = dataless.stub.RegisterLearner(leader_pb2.LearnerInfo(network_addr="127.0.0.1:7031", data=summary())).credential
    evaluations = dataless.leader.evaluations
    evaluations.open(3)
    early = leader_pb2.EvaluationReport(learner_id=1, round=3, samples=40, correct=40, loss=0.1)
    assert dataless.stub.ReportEvaluation(early, metadata=with_credential(other)).success  # before the push named anyone
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
    evaluations.submit(2, evaluation.Report(0, 40, 20, 1.0), declared_samples=40)
    evaluations.open(4)
    [record] = evaluations.records()
    assert (record["round"], record["missing"], record["test_accuracy"]) == (2, [1], 0.5)
    assert evaluations.records(final=True) == []  # round 4: nobody reported, no record


def test_a_resumed_run_neither_asks_again_for_an_evaluation_nor_needs_its_init_file(tmp_path):
    init = tmp_path / "init.pt"
    torch.save(build_model("resnet20").state_dict(), init)
    args = ["--dataset", "synthetic", "--rounds", "20", "--eval-every", "5", "--init", str(init)]
    leader = leader_module.Leader(leader_module.parse_args([*args, "--out", str(tmp_path / "run")]))
    leader.save_checkpoint(5)  # an evaluation round
    init.unlink()
    resumed = leader_module.Leader(leader_module.parse_args(["--resume", str(tmp_path / "run")]))
    state = codec.decode(resumed.global_model.encoded_state)
    assert messages.round_of(state) == 5 and "evaluate" not in state.metadata


@pytest.mark.parametrize("flags, says", [
    (["--learners", "400"], "--partition iid"),  # 25 images each, fewer than a batch of 32
    (["--learners", "4", "--partition", "classes", "--classes-per-learner", "11"], "--partition classes"),
])
def test_a_partition_that_cannot_be_met_stops_the_leader_saying_why(tmp_path, flags, says):
    with pytest.raises(utils.DatasetError, match=says):
        leader_module.Leader(leader_module.parse_args(["--dataset", "synthetic", "--batch-size", "32",
                                                       "--out", str(tmp_path), *flags]))


def test_a_state_that_does_not_hold_the_model_it_names_is_refused_before_it_is_built():
    metadata = {"architecture": "torchvision:vgg19_bn", "num_classes": "100000", "batch_size": "64", "seed": "0",
                "round": "0"}
    state = codec.decode(codec.encode({"x": torch.zeros(1)}, metadata))
    with pytest.raises(codec.PayloadError, match="do not match the model"):
        learner.check_fits(state, messages.StateInfo.from_payload(state), torch.float32)
    for bad in ({"mean": "0.5,0.5", "std": "0.2,0.2"}, {"mean": "inf,0,0", "std": "1,1,1"},
                {"mean": "0,0,0", "std": "1e-300,1,1"}, {"image_size": "100000"}):
        with pytest.raises(codec.PayloadError):
            messages.StateInfo.from_payload(codec.decode(codec.encode({"x": torch.zeros(1)}, {**metadata, **bad})))


def test_with_skewed_shards_of_its_own_data_an_epoch_is_as_many_images_as_the_dataset_holds(tmp_path):
    leader = leader_module.Leader(leader_module.parse_args(["--dataset", "synthetic", "--learners", "10",
                                                            "--partition", "dirichlet", "--alpha", "0.1",
                                                            "--batch-size", "32", "--out", str(tmp_path)]))
    sizes = [len(shard) for shard in leader.shards.indices]
    assert len(set(sizes)) > 1 and sum(sizes) == 10_000
    assert leader.schedule.steps_per_epoch == 10_000 // 10 // 32
    saved = json.loads((tmp_path / "partition.json").read_text())
    assert [entry["samples"] for entry in saved] == sizes
    assert all(sum(entry["label_counts"]) == entry["samples"] for entry in saved)
