"""Bulk messages without protobuf copies: chunk messages framed and parsed by hand, and handlers that skip protobuf.

Every message that carries a payload (ModelChunk, DataChunk, ModelState, GradientData) has one field,
`bytes chunk = 1`. Protobuf's parser and serialiser copy such a field twice on each side; these functions
write and read exactly protobuf's bytes with one copy per chunk (tests compare both ways).
"""

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import grpc

CHUNK_BYTES = 1 << 20  # 1 MiB: the fastest grpcio stream chunk measured here (64 KiB is 2-3x slower)
CHUNK_FIELD_KEY = b"\x0a"  # protobuf key of field 1 with wire type 2 (length-delimited)


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


def without_protobuf_copies(
    add_to_server: Callable, replies: Collection[str] = (), requests: Collection[str] = ()
) -> Callable:
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

    def __init__(self) -> None:
        self.service: str = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

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
    return channel.unary_unary(
        f"/{service}/{method}", request_serializer=serialize, response_deserializer=reply_type.FromString
    )


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
