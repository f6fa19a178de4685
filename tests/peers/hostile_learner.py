"""A learner that attacks its leader before each of its first rounds, then trains honestly (tests/e2e/test_attacks.py).

`hostile_learner.py --victim HOST:PORT [learner.py flags]`: a real learner process, registered and trained
like any other, whose first sends are attacks on the leader. It prints each attack's outcome as
"ATTACK <name>: <status code> <details>" ("ATTACK <name>: OK ..." when the leader accepted the call).
`hostile_learner.py --freeload [learner.py flags]`: a learner that answers everything and never sends a gradient.
`hostile_learner.py --die-before-masked ROUND [learner.py flags]` (or --die-after-masked ROUND): a learner of a secure
run that exits in round ROUND once the leader committed it to the round, before sending its masked input (or right
after sending it): the leader must recover the round without it (tests/e2e/test_secure_aggregation.py).
`hostile_learner.py --flip [learner.py flags]`: a Byzantine learner that sends its honest update's model part
sign-flipped and ten times as large (its BatchNorm statistics as they are: the leader refuses negative variances).
"""

import functools
import json
import os
import struct
import sys
import time

import grpc
import torch

from federated.common import runtime
from federated.core.plan import TrainingPlan
from federated.learner import app as learner
from federated.learner import config as learner_flags
from federated.learner.config import LearnerConfig
from federated.net import rpc
from federated.net.rpc import leader_pb2
from federated.wire import codec, framing

STREAMS = 20


class Freeloader(learner.Member):
    def update_request(self, round_index: int, loss: float, plan: TrainingPlan) -> leader_pb2.GradientData | None:
        return None


class Flipper(learner.Member):
    def update_request(self, round_index: int, loss: float, plan: TrainingPlan) -> leader_pb2.GradientData | None:
        self.replica.gradient[: self.replica.layout.parameter_count].mul_(-10)
        return super().update_request(round_index, loss, plan)


class DiesInASecureRound(learner.Member):
    """Exits in its round `dies_in`: before sending its masked input (once committed) or right after it."""

    def __init__(self, *args, dies_in: int, after: bool) -> None:
        super().__init__(*args)
        self.dies_in, self.after = dies_in, after

    def update_request(self, round_index: int, loss: float, plan: TrainingPlan) -> leader_pb2.GradientData | None:
        if round_index == self.dies_in and not self.after:
            self.server.secure.wait_committed(round_index, 60)
            print(f"DIES in round {round_index}, committed, before its masked input", flush=True)
            os._exit(3)
        return super().update_request(round_index, loss, plan)

    def send_request(self, round_index: int, request: leader_pb2.GradientData) -> None:
        super().send_request(round_index, request)
        if round_index == self.dies_in:
            print(f"DIES in round {round_index}, after its masked input", flush=True)
            os._exit(3)


class HostileLearner(learner.Member):
    def __init__(self, *args, victim: str) -> None:
        super().__init__(*args)
        self.victim = victim
        self.held: list = []  # unread streams, kept open so that nothing cancels them
        self.attacks = [
            self.hold_streams,
            self.forged_credential,
            self.no_credential,
            self.another_learners_id,
            self.huge_sample_count,
            self.take_the_victims_address,
            self.shape_overflowing_torch,
            self.shape_overflowing_int64,
            self.deep_json,
            self.nan_gradient,
            self.overflowing_gradient,
            self.absurd_gradient,
            self.stalled_gradient_calls,
        ]

    def update_request(self, round_index: int, loss: float, plan: TrainingPlan) -> leader_pb2.GradientData | None:
        if self.attacks:
            attack = self.attacks.pop(0)
            print(f"ATTACK {attack.__name__}: {attack(round_index)}", flush=True)
        return super().update_request(round_index, loss, plan)

    def send(self, chunk: bytes, credential: str | None) -> str:
        try:
            reply = self.session.leader.AccumulateGradients(
                leader_pb2.GradientData(chunk=chunk), timeout=10, metadata=rpc.with_credential(credential)
            )
            return f"OK {reply.message}"
        except grpc.RpcError as error:
            return f"{error.code().name} {error.details()}"

    def payload(
        self, round_index: int, learner_id: int | None = None, samples: int | None = None, fill: float = 1e-4
    ) -> bytes:
        metadata = {
            "learner_id": str(self.learner_id if learner_id is None else learner_id),
            "round": str(round_index),
            "samples": str(samples or self.replica.info.batch_size),
            "loss": "1.0",
        }
        layout = self.replica.layout
        return codec.encode(layout.wire_tensors(torch.full((layout.size,), fill)), metadata)

    def hold_streams(self, round_index: int) -> str:
        """Open GetData and GetModel streams and never read them."""
        request = leader_pb2.LearnerDataRequest(network_addr=self.server.address)
        for method, message in (("GetData", request), ("GetModel", leader_pb2.Empty())):
            stream = framing.chunk_stream(self.session.channel, rpc.LEADER_SERVICE, method)
            credential = self.session.credential.value
            self.held += [stream(message, metadata=rpc.with_credential(credential)) for _ in range(STREAMS)]
        time.sleep(1.0)
        refused = sum(call.done() and call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for call in self.held)
        return f"RESOURCE_EXHAUSTED {refused} of {len(self.held)} streams refused"

    def forged_credential(self, round_index: int) -> str:
        return self.send(self.payload(round_index, learner_id=0), "forged")

    def no_credential(self, round_index: int) -> str:
        return self.send(self.payload(round_index, learner_id=0), None)

    def another_learners_id(self, round_index: int) -> str:
        another = 1 - min(self.learner_id, 1)
        return self.send(self.payload(round_index, learner_id=another), self.session.credential.value)

    def huge_sample_count(self, round_index: int) -> str:
        return self.send(self.payload(round_index, samples=10**17), self.session.credential.value)

    def take_the_victims_address(self, round_index: int) -> str:
        try:
            reply = self.session.leader.RegisterLearner(leader_pb2.LearnerInfo(network_addr=self.victim), timeout=10)
            return f"OK {reply.message}"
        except grpc.RpcError as error:
            return f"{error.code().name} {error.details()}"

    def header(self, header: dict | bytes) -> bytes:
        text = header if isinstance(header, bytes) else json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text

    def shape_overflowing_torch(self, round_index: int) -> str:
        tensor = {"t": {"dtype": "F32", "shape": [0, 10**30], "data_offsets": [0, 0]}}
        return self.send(self.header(tensor), self.session.credential.value)

    def shape_overflowing_int64(self, round_index: int) -> str:
        tensor = {"t": {"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}}
        return self.send(self.header(tensor), self.session.credential.value)

    def deep_json(self, round_index: int) -> str:
        return self.send(self.header(b"[" * 100_000 + b"]" * 100_000), self.session.credential.value)

    def nan_gradient(self, round_index: int) -> str:
        return self.send(self.payload(round_index, fill=float("nan")), self.session.credential.value)

    def overflowing_gradient(self, round_index: int) -> str:
        """Finite and well-formed, so the leader accepts it; summed with the others it overflows float32."""
        return self.send(self.payload(round_index, fill=3e38), self.session.credential.value)

    def absurd_gradient(self, round_index: int) -> str:
        """Finite, and its sum too, but a step with it would leave weights of 1e28 and every later gradient NaN."""
        return self.send(self.payload(round_index, fill=1e30), self.session.credential.value)

    def stalled_gradient_calls(self, round_index: int) -> str:
        """Gradient calls opened without a credential that never send anything."""

        def never():
            time.sleep(30)
            yield b""

        opened = self.session.channel.stream_unary(f"/{rpc.LEADER_SERVICE}/AccumulateGradients")
        self.held += [opened.future(never()) for _ in range(10)]
        time.sleep(1.0)
        codes = {call.code().name for call in self.held[-10:] if call.done()}
        return f"{', '.join(sorted(codes))} for {sum(call.done() for call in self.held[-10:])} of 10"


def learner_config(argv: list[str]) -> LearnerConfig:
    return learner_flags.configure(learner_flags.command_line(argv))


if __name__ == "__main__":
    runtime.configure_logging("learner")
    runtime.set_threads(1)
    if sys.argv[1] in ("--die-before-masked", "--die-after-masked"):
        dies = functools.partial(
            DiesInASecureRound, dies_in=int(sys.argv[2]), after=sys.argv[1] == "--die-after-masked"
        )
        learner.Learner(learner_config(sys.argv[3:]), dies).run()
    elif sys.argv[1] in ("--freeload", "--flip"):
        learner.Learner(learner_config(sys.argv[2:]), {"--freeload": Freeloader, "--flip": Flipper}[sys.argv[1]]).run()
    else:
        victim = sys.argv[sys.argv.index("--victim") + 1]
        rest = [
            arg for index, arg in enumerate(sys.argv[1:], 1) if arg != "--victim" and sys.argv[index - 1] != "--victim"
        ]
        learner.Learner(learner_config(rest), functools.partial(HostileLearner, victim=victim)).run()
