"""The article's protos, frozen (tests/peers/frozen_protos): ours only add to them, and peers built from them
(tests/peers/frozen_peer.py) interoperate with our leader and learner processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from federated.tools import launch
from tests.support.processes import PEERS, ROOT, spawn

FROZEN = ROOT / PEERS / "frozen_protos"
NAMES = ("leader.proto", "learner.proto")


def descriptors(include: Path, tmp_path: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    out = tmp_path / f"{include.name}.pb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{include}", f"--descriptor_set_out={out}", *NAMES],
        check=True,
        cwd=include,
    )
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return {file.name: file for file in files}


def test_real_protos_keep_every_frozen_package_message_field_and_rpc(tmp_path):
    frozen, real = descriptors(FROZEN, tmp_path), descriptors(ROOT / "protos", tmp_path)
    for name in NAMES:
        assert real[name].package == frozen[name].package
        real_messages = {m.name: {f.name: f for f in m.field} for m in real[name].message_type}
        for message in frozen[name].message_type:
            for field in message.field:
                ours = real_messages[message.name][field.name]
                assert (ours.number, ours.type, ours.label) == (field.number, field.type, field.label), field.name
        real_methods = {(s.name, m.name): m for s in real[name].service for m in s.method}
        for service in frozen[name].service:
            for method in service.method:
                ours = real_methods[(service.name, method.name)]
                assert (ours.input_type, ours.output_type, ours.server_streaming, ours.client_streaming) == (
                    method.input_type,
                    method.output_type,
                    method.server_streaming,
                    method.client_streaming,
                )


@pytest.fixture(scope="module")
def frozen_env(tmp_path_factory):
    """Environment whose PYTHONPATH has code generated from the frozen protos only (plus the project)."""
    generated = tmp_path_factory.mktemp("frozen")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{FROZEN}",
            f"--python_out={generated}",
            f"--grpc_python_out={generated}",
            *NAMES,
        ],
        check=True,
    )
    return {**os.environ, "PYTHONPATH": f"{generated}{os.pathsep}{ROOT}"}


def finish(process: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def test_frozen_learner_trains_a_round_with_the_real_leader(frozen_env, tmp_path):
    port = launch.free_port()
    leader = spawn(
        None,
        "leader.py",
        "--learners",
        "1",
        "--rounds",
        "1",
        "--dataset",
        "synthetic",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--out",
        str(tmp_path),
    )
    peer = spawn(None, str(PEERS / "frozen_peer.py"), "learner", f"127.0.0.1:{port}", env=frozen_env)
    peer_code, peer_output = finish(peer)
    leader_code, leader_output = finish(leader)
    assert (peer_code, leader_code) == (0, 0), peer_output + leader_output
    assert "OK" in peer_output and (tmp_path / "model.pt").exists()


def test_real_learner_trains_a_round_with_a_frozen_leader(frozen_env):
    port = launch.free_port()
    peer = spawn(None, str(PEERS / "frozen_peer.py"), "leader", str(port), env=frozen_env)
    learner = spawn(None, "learner.py", "--leader", f"127.0.0.1:{port}", "--host", "127.0.0.1", "--threads", "1")
    learner_code, learner_output = finish(learner)
    peer_code, peer_output = finish(peer)
    assert (peer_code, learner_code) == (0, 0), peer_output + learner_output
    assert "the leader finished training at round 1" in learner_output
