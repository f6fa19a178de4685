"""gRPC plumbing shared by leader and learner: generated stubs, message limits, TLS, tokens, servers, channels."""

import argparse
import hmac
import os
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

try:
    from protos import leader_pb2, leader_pb2_grpc, learner_pb2, learner_pb2_grpc
except ImportError as error:  # the generated modules are build outputs, not sources
    raise SystemExit(f"generated gRPC code is missing ({error}); run `make proto` first") from None

LEADER_SERVICE = leader_pb2.DESCRIPTOR.services_by_name["LeaderService"].full_name
LEARNER_SERVICE = learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].full_name

__all__ = ["leader_pb2", "leader_pb2_grpc", "learner_pb2", "learner_pb2_grpc", "start_server", "channel", "Security"]

CHUNK_BYTES = 1 << 20  # 1 MiB: the fastest grpcio stream chunk measured here (64 KiB is 2-3x slower)
CHUNK_FIELD_KEY = b"\x0a"  # protobuf key of field 1 with wire type 2 (length-delimited)
# Headroom above a payload's exact size for the protobuf envelope and the JSON header's metadata.
ENVELOPE_BYTES = 1 << 20
# Replies to the learner's channel are stream chunks and acks; this bounds any single one.
CHUNK_MESSAGE_LIMIT = 8 << 20
TOKEN_VARIABLE = "FL_TOKEN"
UNAUTHENTICATED_SERVICES = (health.SERVICE_NAME,)  # probes need no token; they reveal nothing


class SecurityError(ValueError):
    """Unusable TLS or token settings."""


@dataclass(frozen=True)
class Security:
    """TLS material (PEM bytes) and the shared token; all None means plaintext without authentication."""

    certificate: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    token: str | None = None

    @staticmethod
    def from_args(args: argparse.Namespace) -> "Security":
        if bool(args.tls_cert) != bool(args.tls_key):
            raise SecurityError("--tls-cert and --tls-key go together")
        if args.tls_ca and not args.tls_cert:
            raise SecurityError("--tls-ca needs --tls-cert and --tls-key: mutual TLS presents a certificate both ways")
        read = lambda path: Path(path).read_bytes() if path else None
        try:
            return Security(read(args.tls_cert), read(args.tls_key), read(args.tls_ca), args.token or None)
        except OSError as error:
            raise SecurityError(f"cannot read TLS file: {error}") from None

    def describe(self) -> str:
        tls = "mutual TLS" if self.ca else "TLS" if self.certificate else "plaintext"
        return f"{tls}, {'token required' if self.token else 'no token'}"


def add_security_flags(parser: argparse.ArgumentParser, role: str) -> None:
    """The TLS and token flags, the same on both entry points."""
    group = parser.add_argument_group("security")
    group.add_argument("--tls-cert", metavar="PEM", help=f"this {role}'s certificate (enables TLS on its server and channels)")
    group.add_argument("--tls-key", metavar="PEM", help=f"this {role}'s private key")
    group.add_argument("--tls-ca", metavar="PEM", help="CA certificate: verify peers against it and require client "
                       "certificates from it (mutual TLS)")
    group.add_argument("--token", default=os.environ.get(TOKEN_VARIABLE),
                       help=f"shared secret every RPC must carry as 'authorization: Bearer TOKEN' "
                       f"(default: ${TOKEN_VARIABLE}; prefer the variable, a flag shows in ps)")


class TokenCheck(grpc.ServerInterceptor):
    """Rejects RPCs without the shared token with UNAUTHENTICATED, comparing in constant time."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.lstrip("/").startswith(UNAUTHENTICATED_SERVICES):
            return continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self.expected):
            return continuation(handler_call_details)
        return _refusal(continuation(handler_call_details))


def _refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token: pass --token or set " + TOKEN_VARIABLE)

    if handler is None:
        return None
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny) if not handler.response_streaming else \
            grpc.stream_stream_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, request_deserializer=handler.request_deserializer)
    return grpc.unary_unary_rpc_method_handler(deny, request_deserializer=handler.request_deserializer)


class TokenHeader(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the shared token to every outgoing call."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=[*(details.metadata or ()), self.header])

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)


def _limits(max_receive_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", -1),
    ]


def start_server(bind: str, register: list, service_names: list[str], max_receive_bytes: int,
                 security: Security = Security(), workers: int = 16) -> tuple[grpc.Server, int]:
    """Start a server with the given servicers plus health checking and reflection; return it and its port.

    register holds (add_XServicer_to_server, servicer) pairs. Messages over max_receive_bytes are refused
    with RESOURCE_EXHAUSTED before they are buffered."""
    interceptors = [TokenCheck(security.token)] if security.token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=_limits(max_receive_bytes),
                         interceptors=interceptors)
    for add_to_server, servicer in register:
        add_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in service_names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if security.certificate:
        credentials = grpc.ssl_server_credentials([(security.key, security.certificate)], root_certificates=security.ca,
                                                  require_client_auth=security.ca is not None)
        port = server.add_secure_port(bind, credentials)
    else:
        port = server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"cannot listen on {bind}: the port is taken or the address is not local")
    server.start()
    return server, port


def channel(address: str, security: Security = Security(), max_receive_bytes: int = CHUNK_MESSAGE_LIMIT) -> grpc.Channel:
    """A channel to address with deliberate message limits, TLS when configured, and the token on every call."""
    options = _limits(max_receive_bytes)
    if security.certificate or security.ca:
        credentials = grpc.ssl_channel_credentials(security.ca, security.key, security.certificate)
        opened = grpc.secure_channel(address, credentials, options=options)
    else:
        opened = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(opened, TokenHeader(security.token)) if security.token else opened


def chunk_messages(payload: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The payload as serialised ModelChunk/DataChunk messages (field 1, `bytes chunk`) of at most
    chunk_bytes each: one copy per chunk, where building and serialising protobuf messages makes three."""
    view = memoryview(payload)
    for start in range(0, len(view), chunk_bytes):
        yield chunk_message(view[start : start + chunk_bytes])


def chunk_message(chunk: bytes | memoryview) -> bytes:
    """A serialised message whose only field is `bytes chunk = 1` (ModelChunk, DataChunk, ModelState, ...)."""
    return b"".join((CHUNK_FIELD_KEY, _encode_varint(len(chunk)), chunk))


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@dataclass(frozen=True)
class ChunkRequest:
    """A request message that carries one `bytes chunk = 1` field (GradientData, ModelState), unparsed."""

    chunk: memoryview


def without_protobuf_copies(add_to_server: Callable, replies: set[str] = frozenset(),
                            requests: set[str] = frozenset()) -> Callable:
    """A generated add_XServicer_to_server that keeps protobuf away from bulk bytes, which it copies twice:
    the methods named in replies yield ready-serialised messages (chunk_messages); those in requests
    get a ChunkRequest whose chunk is a view of the received bytes (chunk_field)."""

    def rewrite(name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if name in replies:
            handler = handler._replace(response_serializer=None)
        if name in requests:
            handler = handler._replace(request_deserializer=lambda data: ChunkRequest(chunk_field(data)))
        return handler

    def add(servicer, server: grpc.Server) -> None:
        capture = _HandlerCapture()
        add_to_server(servicer, capture)
        handlers = {name: rewrite(name, handler) for name, handler in capture.handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
        server.add_registered_method_handlers(capture.service, handlers)

    return add


class _HandlerCapture:
    """Stands in for a server to catch the method handlers a generated add_XServicer_to_server registers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def chunk_stream(channel: grpc.Channel, service: str, method: str) -> grpc.UnaryStreamMultiCallable:
    """A server-streaming method of ModelChunk or DataChunk messages whose replies arrive as views of their
    `chunk` field, where protobuf's parser would copy every 1 MiB chunk twice."""
    return channel.unary_stream(f"/{service}/{method}", request_serializer=serialize, response_deserializer=chunk_field)


def unary_call(channel: grpc.Channel, service: str, method: str, reply_type) -> grpc.UnaryUnaryMultiCallable:
    """A unary method whose request may also be given ready-serialised, to serialise it once for many calls."""
    return channel.unary_unary(f"/{service}/{method}", request_serializer=serialize,
                               response_deserializer=reply_type.FromString)


def serialize(message) -> bytes:
    """A protobuf message's bytes; bytes pass through (they are a message serialised before)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def chunk_field(message: bytes) -> memoryview:
    """Field 1 (`bytes chunk`) of a serialised ModelChunk or DataChunk, without a copy.

    Parsed as protobuf does: fields a newer peer may add are skipped, and the last field 1 wins."""
    view, position, chunk = memoryview(message), 0, memoryview(b"")
    while position < len(view):
        key, position = _varint(view, position, max_bytes=5)  # keys are 32-bit
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, position = _varint(view, position)
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            length, position = _varint(view, position)
            if field == 1:
                chunk = view[position : position + length]
            position += length
        else:
            raise ValueError(f"field {field} has unsupported protobuf wire type {wire_type}")
        if not 0 < field < 1 << 29 or position > len(view):
            raise ValueError(f"malformed protobuf message: field number {field} or truncated")
    return chunk


def _varint(view: memoryview, position: int, max_bytes: int = 10) -> tuple[int, int]:
    value = 0
    for shift in range(0, 7 * max_bytes, 7):
        if position >= len(view):
            raise ValueError("malformed protobuf message: truncated varint")
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
    raise ValueError(f"malformed protobuf message: varint longer than {max_bytes} bytes")


def peer_common_name(context: grpc.ServicerContext) -> str | None:
    """The common name in the TLS client certificate of the caller, if any."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode() if names else None
