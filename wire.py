"""Tensor wire format: encode, decode, chunk and check tensors; pure functions, no gRPC, no pickle.

Every tensor payload (model state, gradients, data shards) uses the safetensors layout
(https://huggingface.co/docs/safetensors), so any safetensors reader can open a captured payload:

    8 bytes    little-endian u64 N, the header length
    N bytes    UTF-8 JSON header, padded with spaces so the data starts 64-byte aligned:
               {"__metadata__": {str: str}, "<name>": {"dtype": "F32", "shape": [..],
                "data_offsets": [begin, end]}, ...}
    the rest   raw little-endian tensor bytes; the tensors tile it exactly, in header order

Decoding is strict (every length, offset, dtype and shape is checked before any tensor is made)
and zero-copy: tensors are `torch.frombuffer` views of the received bytes, so they are read-only
by contract and live as long as the payload.
"""

import json
import math
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch

CHUNK_BYTES = 1 << 20  # 1 MiB: the fastest grpcio stream chunk measured here (64 KiB is 2-3x slower)
MAX_HEADER_BYTES = 16 << 20
MAX_DIMS = 8
ALIGNMENT = 64

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Precisions offered for floating-point tensors on the wire (leader.py --wire-dtype).
WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Views of immutable received bytes are never written to; torch's warning about that is noise here.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


class PayloadError(ValueError):
    """A payload that is malformed or does not match what the receiver expects."""


@dataclass(frozen=True)
class Payload:
    """A decoded payload: string metadata and zero-copy tensor views, in wire order."""

    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor]
    buffer: bytes
    data_start: int


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise CPU tensors (in the given order) and string metadata into one payload."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    blobs, offset = [], 0
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise PayloadError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
        flat = tensor.detach().reshape(-1).contiguous().view(torch.uint8)
        header[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
            "data_offsets": [offset, offset + flat.numel()],
        }
        blobs.append(flat.numpy())
        offset += flat.numel()
    text = json.dumps(header, separators=(",", ":")).encode()
    padded_length = -(-(8 + len(text)) // ALIGNMENT) * ALIGNMENT - 8
    text = text.ljust(padded_length, b" ")
    return b"".join([struct.pack("<Q", len(text)), text, *blobs])


def decode(buffer: bytes) -> Payload:
    """Parse and check a payload; raise PayloadError saying what is wrong."""
    if len(buffer) < 8:
        raise PayloadError(f"payload of {len(buffer)} bytes is shorter than its 8-byte length prefix")
    (header_length,) = struct.unpack_from("<Q", buffer)
    if header_length > min(MAX_HEADER_BYTES, len(buffer) - 8):
        raise PayloadError(f"header length {header_length} exceeds the payload or the {MAX_HEADER_BYTES}-byte limit")
    header = _parse_header(bytes(buffer[8 : 8 + header_length]))
    data_start = 8 + header_length
    metadata = _parse_metadata(header.pop("__metadata__", {}))
    entries = sorted(
        ((name, *_parse_entry(name, entry)) for name, entry in header.items()), key=lambda item: item[3][0]
    )
    expected_begin = 0
    for name, dtype, shape, (begin, end) in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        if begin != expected_begin or end - begin != nbytes:
            raise PayloadError(f"tensor {name!r}: data_offsets [{begin}, {end}] do not tile the data ({nbytes} bytes expected at {expected_begin})")
        expected_begin = end
    if data_start + expected_begin != len(buffer):
        raise PayloadError(f"payload has {len(buffer) - data_start} data bytes but its tensors describe {expected_begin}")
    tensors = {name: _view(buffer, dtype, shape, data_start + begin) for name, dtype, shape, (begin, _) in entries}
    return Payload(metadata, tensors, buffer, data_start)


def _parse_header(text: bytes) -> dict:
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PayloadError(f"header is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise PayloadError("header must be a JSON object")
    return header


def _parse_metadata(metadata: object) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PayloadError("__metadata__ must map strings to strings")
    return metadata


def _parse_entry(name: str, entry: object) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise PayloadError(f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise PayloadError(f"tensor {name!r}: unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if not _is_int_list(shape) or len(shape) > MAX_DIMS or any(size < 0 for size in shape):
        raise PayloadError(f"tensor {name!r}: shape must be at most {MAX_DIMS} non-negative integers, got {shape!r}")
    if not _is_int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise PayloadError(f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    return DTYPES[dtype], tuple(shape), (offsets[0], offsets[1])


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(type(item) is int for item in value)


def _view(buffer: bytes, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).view(shape)


TensorSpec = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def spec_of(tensors: Mapping[str, torch.Tensor], float_dtype: torch.dtype | None = None) -> TensorSpec:
    """The names, dtypes and shapes a payload must match, taken from reference tensors
    (floating-point ones travel as float_dtype, if given)."""
    return {name: (float_dtype if float_dtype and tensor.is_floating_point() else tensor.dtype, tuple(tensor.shape))
            for name, tensor in tensors.items()}


def cast_floats(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors with floating-point ones converted to dtype (no copy when they already are)."""
    return {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in tensors.items()}


def check_matches(payload: Payload, spec: TensorSpec) -> None:
    """Raise PayloadError unless the payload holds exactly the spec's tensors, in order, all finite."""
    missing = [name for name in spec if name not in payload.tensors]
    unexpected = [name for name in payload.tensors if name not in spec]
    if missing or unexpected:
        raise PayloadError(f"tensor names do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if list(payload.tensors) != list(spec):
        raise PayloadError("tensors are not in the model's order")
    for name, tensor in payload.tensors.items():
        dtype, shape = spec[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise PayloadError(
                f"tensor {name!r} is {DTYPE_NAMES[tensor.dtype]} {list(tensor.shape)}, "
                f"expected {DTYPE_NAMES[dtype]} {list(shape)}"
            )
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise PayloadError(f"tensor {name!r} holds NaN or Inf values")


def _all_finite(tensor: torch.Tensor) -> bool:
    # A sum is finite unless an element is NaN or Inf (or finite values overflow): a fast test
    # at memory speed, confirmed element by element only when it fails. isfinite() is 20x slower.
    return math.isfinite(tensor.sum(dtype=torch.float32).item()) or bool(torch.isfinite(tensor).all())


def flat_view(payload: Payload) -> torch.Tensor:
    """All of a payload's tensors as one 1-D view; they must share one dtype (they tile the data)."""
    dtypes = {tensor.dtype for tensor in payload.tensors.values()}
    if len(dtypes) != 1:
        raise PayloadError(f"expected tensors of one dtype, got {sorted(DTYPE_NAMES[d] for d in dtypes)}")
    (dtype,) = dtypes
    count = (len(payload.buffer) - payload.data_start) // dtype.itemsize
    return _view(payload.buffer, dtype, (count,), payload.data_start)


def metadata_int(payload: Payload, key: str, minimum: int = 0) -> int:
    """An integer metadata field, at least `minimum`; raise PayloadError if absent or malformed."""
    text = payload.metadata.get(key)
    if text is None or not re.fullmatch(r"-?[0-9]{1,18}", text) or int(text) < minimum:
        raise PayloadError(f"metadata {key!r} must be an integer >= {minimum}, got {text!r}")
    return int(text)


def split(payload: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The payload in chunks of at most chunk_bytes, for gRPC streams."""
    for start in range(0, len(payload), chunk_bytes):
        yield payload[start : start + chunk_bytes]


def join(chunks: Iterable[bytes], max_bytes: int) -> bytes:
    """Reassemble streamed chunks, refusing to buffer more than max_bytes."""
    parts, total = [], 0
    for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise PayloadError(f"stream exceeds the {max_bytes}-byte limit")
        parts.append(chunk)
    return b"".join(parts)
