"""Hand framing agrees with protobuf: the leader sends GetModel/GetData replies framed by hand
(framing.chunk_messages) and learners parse them by hand (framing.chunk_field); both must agree with
protobuf itself, byte for byte."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federated.net.rpc import leader_pb2
from federated.wire import framing


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def unknown_field(number: int, kind: int, payload: bytes) -> bytes:
    """A field ModelChunk does not know, as a newer peer might add: varint, 64-bit, bytes or 32-bit."""
    key = varint(number << 3 | kind)
    return (
        key
        + {
            0: varint(int.from_bytes(payload[:8] or b"\0", "little")),
            1: payload.ljust(8, b"\0")[:8],
            2: varint(len(payload)) + payload,
            5: payload.ljust(4, b"\0")[:4],
        }[kind]
    )


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=5000), st.integers(1, 2000))
def test_hand_framed_chunks_are_what_protobuf_parses(payload, chunk_bytes):
    messages = list(framing.chunk_messages(payload, chunk_bytes))
    parsed = [leader_pb2.ModelChunk.FromString(message).chunk for message in messages]
    assert b"".join(parsed) == payload and all(len(chunk) <= chunk_bytes for chunk in parsed)
    assert parsed == [leader_pb2.DataChunk.FromString(message).chunk for message in messages]
    assert messages == [leader_pb2.ModelChunk(chunk=chunk).SerializeToString() for chunk in parsed]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(2, 1000), st.sampled_from([0, 1, 2, 5]), st.binary(max_size=20)), max_size=4),
    st.binary(max_size=300),
    st.booleans(),
)
def test_hand_parsed_chunk_field_matches_protobuf_with_fields_it_does_not_know(extra, chunk, chunk_first):
    known = leader_pb2.ModelChunk(chunk=chunk).SerializeToString()
    unknown = b"".join(unknown_field(*field) for field in extra)
    message = known + unknown if chunk_first else unknown + known
    assert bytes(framing.chunk_field(message)) == leader_pb2.ModelChunk.FromString(message).chunk == chunk


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64))
def test_hand_parsed_chunk_field_accepts_only_what_protobuf_accepts(message):
    try:
        chunk = bytes(framing.chunk_field(message))
    except ValueError:
        return
    assert leader_pb2.ModelChunk.FromString(message).chunk == chunk


@pytest.mark.parametrize(
    "message", [b"\x0a\x05abc", b"\x0a", b"\x09abc", b"\x08\xff", b"\x00\x01", b"\x0b", b"\x08" + b"\xff" * 11]
)
def test_hand_parsed_chunk_field_refuses_malformed_messages(message):
    with pytest.raises(ValueError, match="protobuf"):
        framing.chunk_field(message)
