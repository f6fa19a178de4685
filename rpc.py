"""gRPC plumbing shared by leader and learner: generated stubs, message limits, servers and channels."""

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

try:
    from protos import leader_pb2, leader_pb2_grpc, learner_pb2, learner_pb2_grpc
except ImportError as error:  # the generated modules are build outputs, not sources
    raise SystemExit(f"generated gRPC code is missing ({error}); run `make proto` first") from None

__all__ = ["leader_pb2", "leader_pb2_grpc", "learner_pb2", "learner_pb2_grpc", "start_server", "channel"]

# Headroom above a payload's exact size for the protobuf envelope and the JSON header's metadata.
ENVELOPE_BYTES = 1 << 20
# Replies to the learner's channel are stream chunks and acks; this bounds any single one.
CHUNK_MESSAGE_LIMIT = 8 << 20


def _limits(max_receive_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", -1),
    ]


def start_server(
    bind: str, register: list, service_names: list[str], max_receive_bytes: int, workers: int = 16
) -> tuple[grpc.Server, int]:
    """Start a server with the given servicers plus health checking and reflection; return it and its port.

    register holds (add_XServicer_to_server, servicer) pairs. Messages over max_receive_bytes are refused
    with RESOURCE_EXHAUSTED before they are buffered."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=_limits(max_receive_bytes))
    for add_to_server, servicer in register:
        add_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in service_names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"cannot listen on {bind}: the port is taken or the address is not local")
    server.start()
    return server, port


def channel(address: str, max_receive_bytes: int = CHUNK_MESSAGE_LIMIT) -> grpc.Channel:
    """An insecure channel to address with deliberate message limits."""
    return grpc.insecure_channel(address, options=_limits(max_receive_bytes))
