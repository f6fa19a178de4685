"""A learner or leader built only from the article's frozen protos, to prove wire compatibility.

Run with the code generated from tests/peers/frozen_protos first on PYTHONPATH (never the project's rpc
module, whose protos would clash): `frozen_peer.py learner LEADER_ADDR` or `frozen_peer.py leader PORT`.
Prints "OK" and exits 0 when one full round trip worked.
"""

import sys
import threading
from concurrent import futures

import grpc
import leader_pb2
import leader_pb2_grpc
import learner_pb2
import learner_pb2_grpc
import torch
from google.protobuf.unknown_fields import UnknownFieldSet

import utils
from federated.core.layout import GradientLayout
from federated.wire import codec
from model import build_model

TIMEOUT_S = 120
LIMITS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def pieces(payload: bytes, size: int = 1 << 20):
    for start in range(0, len(payload), size):
        yield payload[start : start + size]


def serve(add_to_server, servicer, bind: str) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(4), options=LIMITS)
    add_to_server(servicer, server)
    port = server.add_insecure_port(bind)
    server.start()
    return server, port


class FrozenLearner(learner_pb2_grpc.LearnerServiceServicer):
    def __init__(self) -> None:
        self.started, self.finished = threading.Event(), threading.Event()

    def StartTraining(self, request, context):
        self.started.set()
        return learner_pb2.Ack(success=True, message="started")

    def SyncModelState(self, request, context):
        payload = codec.decode(request.chunk)
        if payload.metadata.get("finished") == "1":
            self.finished.set()
        return learner_pb2.Ack(success=True, message="synced")


def run_learner(leader_address: str) -> None:
    stub = leader_pb2_grpc.LeaderServiceStub(grpc.insecure_channel(leader_address, options=LIMITS))
    state = codec.decode(
        b"".join(m.chunk for m in stub.GetModel(leader_pb2.Empty(), timeout=TIMEOUT_S, wait_for_ready=True))
    )
    model = build_model(state.metadata["architecture"], int(state.metadata["num_classes"]))
    model.load_state_dict({name: tensor.clone() for name, tensor in state.tensors.items()})
    servicer = FrozenLearner()
    server, port = serve(learner_pb2_grpc.add_LearnerServiceServicer_to_server, servicer, "127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    reply = stub.RegisterLearner(leader_pb2.LearnerInfo(network_addr=address), timeout=TIMEOUT_S)
    assert reply.success and reply.learner_id == 0 and reply.max_learners == 1, reply
    credential = credential_of(reply)
    shard = codec.decode(
        b"".join(m.chunk for m in stub.GetData(leader_pb2.LearnerDataRequest(network_addr=address), timeout=TIMEOUT_S))
    )
    assert shard.tensors["images"].dtype == torch.uint8 and len(shard.tensors["labels"]) > 0
    assert servicer.started.wait(TIMEOUT_S), "no StartTraining"
    layout = GradientLayout(model)
    gradient = torch.zeros(layout.size)
    layout.read_buffers(gradient)
    metadata = {"learner_id": "0", "round": state.metadata["round"], "samples": "8", "loss": "2.3"}
    # Registering, fetching and being started need nothing beyond the article's protos; a gradient needs the
    # credential the leader returned (a field these protos do not name), sent back in the fl-credential header.
    ack = stub.AccumulateGradients(
        leader_pb2.GradientData(chunk=codec.encode(layout.views(gradient), metadata)),
        timeout=TIMEOUT_S,
        metadata=[("fl-credential", credential)],
    )
    assert ack.success, ack.message
    assert servicer.finished.wait(TIMEOUT_S), "no final SyncModelState"
    server.stop(1).wait(5)


def credential_of(reply) -> str:
    """Field 5 of AckWithMetadata, which the frozen protos do not know: protobuf keeps it as an unknown field."""
    fields = [field for field in UnknownFieldSet(reply) if field.field_number == 5]
    assert fields, "the leader returned no credential"
    return fields[0].data.decode()


class FrozenLeader(leader_pb2_grpc.LeaderServiceServicer):
    def __init__(self) -> None:
        self.model = build_model("resnet20")
        self.layout = GradientLayout(self.model)
        data = utils.synthetic(train=False).subset(torch.arange(64))
        self.mean, self.std = utils.channel_stats(data.images)
        self.shard = codec.encode({"labels": data.labels, "images": data.images}, {"learner_id": "0"})
        self.learner_address = None
        self.synced = threading.Event()

    def state(self, round_index: int, finished: bool) -> bytes:
        metadata = {
            "architecture": "resnet20",
            "num_classes": "10",
            "round": str(round_index),
            "finished": "1" if finished else "0",
            "batch_size": "8",
            "seed": "0",
            "mean": ",".join(map(str, self.mean)),
            "std": ",".join(map(str, self.std)),
        }
        return codec.encode(self.model.state_dict(), metadata)

    def RegisterLearner(self, request, context):
        self.learner_address = request.network_addr
        threading.Thread(target=self.start_learner).start()
        return leader_pb2.AckWithMetadata(success=True, message="ok", learner_id=0, max_learners=1)

    def GetModel(self, request, context):
        for chunk in pieces(self.state(0, False)):
            yield leader_pb2.ModelChunk(chunk=chunk)

    def GetData(self, request, context):
        assert request.network_addr == self.learner_address
        for chunk in pieces(self.shard):
            yield leader_pb2.DataChunk(chunk=chunk)

    def AccumulateGradients(self, request, context):
        payload = codec.decode(request.chunk)
        codec.check_matches(payload, self.layout.spec)
        threading.Thread(target=self.finish).start()
        return leader_pb2.Ack(success=True, message="accepted")

    def learner(self):
        return learner_pb2_grpc.LearnerServiceStub(grpc.insecure_channel(self.learner_address, options=LIMITS))

    def start_learner(self) -> None:
        assert self.learner().StartTraining(learner_pb2.Empty(), timeout=TIMEOUT_S, wait_for_ready=True).success

    def finish(self) -> None:
        ack = self.learner().SyncModelState(learner_pb2.ModelState(chunk=self.state(1, True)), timeout=TIMEOUT_S)
        if ack.success:
            self.synced.set()


def run_leader(port: int) -> None:
    servicer = FrozenLeader()
    server, _ = serve(leader_pb2_grpc.add_LeaderServiceServicer_to_server, servicer, f"127.0.0.1:{port}")
    assert servicer.synced.wait(TIMEOUT_S), "the learner never completed a round"
    server.stop(2).wait(5)


if __name__ == "__main__":
    role, target = sys.argv[1], sys.argv[2]
    run_learner(target) if role == "learner" else run_leader(int(target))
    print("OK", flush=True)
