"""A live leader in the test process, driven round by round by fake learners over real gRPC.

Rounds really happen: each closes and steps the leader's model, and a reference copy of that model
steps with exactly the gradients the test expects the leader to count. After every round the two must
be identical, so a gradient wrongly accepted (or wrongly refused) changes the outcome.
"""

import hashlib
from dataclasses import dataclass, field

import grpc
import torch

from federated.core import strategies
from federated.core.aggregation import RoundUpdates
from federated.leader import app as leader_module
from federated.leader import cli, config
from federated.leader.config import LeaderConfig
from federated.leader.global_model import GlobalModel
from federated.leader.registry import SERVING
from federated.learner import config as learner_flags
from federated.learner.config import LearnerConfig
from federated.net import rpc
from federated.net.rpc import leader_pb2, leader_pb2_grpc
from federated.wire import codec

LR = 0.05


def model_hash(model: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()


@dataclass
class LiveLeader:
    """A real Leader serving on localhost (its round loop not running: the test plays it)."""

    leader: leader_module.Leader
    server: grpc.Server
    address: str
    channel: grpc.Channel = field(init=False)
    stub: leader_pb2_grpc.LeaderServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = rpc.channel(self.address)
        self.stub = leader_pb2_grpc.LeaderServiceStub(self.channel)
        run = self.leader.config
        self.reference = GlobalModel(run, 10, strategies.named(run.strategy)(run), ([0.5] * 3, [0.25] * 3))
        self.counted = RoundUpdates(self.reference.layout.size, self.reference.layout.size)
        self.hosts: list[grpc.Server] = []

    @staticmethod
    def start(out, port: int, *flags: str) -> "LiveLeader":
        leader = leader_from(
            ["--dataset", "synthetic", "--host", "127.0.0.1", "--port", str(port), "--out", str(out), *flags]
        )
        leader.registry.reregister_s = 0  # tests re-register at once; test_rounds checks the interval
        return LiveLeader(leader, leader.serve(), f"127.0.0.1:{port}")

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(0)
        for host in self.hosts:
            host.stop(0)

    def register(self, address: str, credential: str | None = None, timeout: float = 10):
        return self.stub.RegisterLearner(
            leader_pb2.LearnerInfo(network_addr=address), timeout=timeout, metadata=rpc.with_credential(credential)
        )

    def enrol(self, count: int) -> list[str]:
        """Register count fake learners and start them, as the round loop would; return their credentials
        by learner id. Each has a server of its own whose health service says its registration is alive,
        so that the leader's checks find them there."""
        credentials = []
        for _ in range(count):
            sessions: set[str] = set()
            host, port = rpc.start_server(
                "127.0.0.1:0",
                [],
                [],
                1 << 20,
                sessions=lambda session, sessions=sessions: SERVING if session in sessions else None,
            )
            self.hosts.append(host)
            credentials.append(self.register(f"127.0.0.1:{port}").credential)
            sessions.add(rpc.session_id(credentials[-1]))
        for member in self.leader.registry.take_joiners().values():
            self.leader.registry.started(member.learner_id, member.generation)  # as if StartTraining was answered
        return credentials

    def gradient(
        self,
        learner_id: int = 0,
        round_index: int | None = None,
        samples: int = 8,
        loss: str = "1.5",
        tensors: dict | None = None,
        scale: float = 0.01,
        **extra: str,
    ) -> bytes:
        """A gradient payload: valid unless the arguments make it otherwise."""
        layout = self.leader.global_model.layout
        round_index = self.leader.collector.round if round_index is None else round_index
        tensors = tensors if tensors is not None else layout.wire_tensors(torch.full((layout.size,), scale))
        metadata = {
            "learner_id": str(learner_id),
            "round": str(round_index),
            "samples": str(samples),
            "loss": loss,
            **extra,
        }
        return codec.encode(tensors, metadata)

    def accumulate(self, chunk: bytes, credential: str | None, timeout: float = 10):
        return self.stub.AccumulateGradients(
            leader_pb2.GradientData(chunk=chunk), timeout=timeout, metadata=rpc.with_credential(credential)
        )

    def send_counted(self, chunk: bytes, credential: str) -> None:
        """Send a gradient the leader must count, and count it in the reference too."""
        reply = self.accumulate(chunk, credential)
        assert reply.success, reply.message
        self.expect_counted(chunk)

    def expect_counted(self, chunk: bytes) -> None:
        payload = codec.decode(chunk)
        self.counted.add(codec.flat_runs(payload), int(payload.metadata["samples"]), float(payload.metadata["loss"]))

    def close_round(self):
        """Close the open round and step both models; assert they agree; return the leader's summary and
        why its step was refused (None if it was applied)."""
        leader_model = self.leader.global_model
        summary = self.leader.federation.close(leader_model.mean_gradient)  # as the round loop does
        refused = leader_model.step(LR)
        self.counted.combine_into(self.reference.mean_gradient)
        assert summary.samples == self.counted.samples, "the leader counted other gradients"
        self.counted.reset()
        assert self.reference.step(LR) == refused
        assert model_hash(leader_model.model) == model_hash(self.reference.model), "the leader counted other gradients"
        return summary, refused


def leader_config(argv: list[str], saved: dict | None = None) -> LeaderConfig:
    """The configuration leader.py builds from argv (over a checkpoint's flags, if saved)."""
    return config.configure(config.command_line(argv), saved)


def leader_from(argv: list[str]) -> leader_module.Leader:
    """The leader leader.py builds from argv (a --resume DIR continued), not serving yet."""
    return cli.build(config.command_line(argv))


def learner_config(argv: list[str]) -> LearnerConfig:
    """The configuration learner.py builds from argv."""
    return learner_flags.configure(learner_flags.command_line(argv))
