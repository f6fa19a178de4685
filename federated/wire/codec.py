"""Tensor wire format: encode, decode and check tensors, whole or as a stream; no gRPC, no pickle.

Every tensor payload (model state, gradients, data shards) uses the safetensors layout
(https://huggingface.co/docs/safetensors), so any safetensors reader can open a captured payload:

    8 bytes    little-endian u64 N, the header length
    N bytes    UTF-8 JSON header, padded with spaces so the data starts 64-byte aligned:
               {"__metadata__": {str: str}, "<name>": {"dtype": "F32", "shape": [..],
                "data_offsets": [begin, end]}, ...}
    the rest   raw little-endian tensor bytes; the tensors tile it exactly, in header order

Decoding is strict (every length, offset, dtype and shape is checked before any tensor is made)
and zero-copy: tensors are `torch.frombuffer` views of the received bytes, so they are read-only
by contract and live as long as the payload. `receive` decodes a payload streamed in chunks as
they arrive, into one buffer of its own.
"""

import itertools
import json
import math
import re
import struct
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from federated.core.checks import TensorSpec, all_finite, spec_of

MAX_HEADER_BYTES = 16 << 20  # the most a receiver that knows nothing yet of the tensors parses
# Beyond the header encode writes for the tensors a receiver expects: room for the metadata, whose values the
# sender chooses (a few short fields), so that nobody can make the receiver parse megabytes of JSON (header_limit).
HEADER_SLACK_BYTES = 4 << 10
MAX_DIMS = 8
# Elements a tensor may describe, counting empty dimensions as 1: shapes such as [0, 10**30] hold no data,
# yet torch cannot even represent them.
MAX_ELEMENTS = 1 << 40
ALIGNMENT = 64

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# What payloads are read from: received bytes (or a view of them), or receive's own buffer
Received = bytes | bytearray | memoryview
Buffer = Received | np.ndarray
# What a receiver checks a streamed payload's header against before its bytes are buffered: the metadata and
# every tensor's dtype and shape; it raises PayloadError to refuse the payload.
Admit = Callable[[dict[str, str], TensorSpec], None]
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
    buffer: Buffer  # received bytes (decode) or a writable uint8 array (receive)
    data_start: int


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise CPU tensors (in the given order) and string metadata into one payload."""
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise PayloadError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
    text = _header_text(spec_of(tensors), metadata or {})
    padded_length = -(-(8 + len(text)) // ALIGNMENT) * ALIGNMENT - 8
    text = text.ljust(padded_length, b" ")
    blobs = [tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy().data for tensor in tensors.values()]
    return b"".join([struct.pack("<Q", len(text)), text, *blobs])


def _header_text(spec: TensorSpec, metadata: Mapping[str, str]) -> bytes:
    """The JSON header of a payload of spec's tensors, in order, and these metadata (unpadded)."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, (dtype, shape) in spec.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return json.dumps(header, separators=(",", ":")).encode()


def header_limit(spec: TensorSpec, metadata_bytes: int = HEADER_SLACK_BYTES) -> int:
    """The most header bytes to accept in a payload that must hold spec's tensors (decode's max_header_bytes):
    the header encode writes for them, its padding, and metadata_bytes for the metadata. Checked before the
    header is parsed, a longer one is refused at the cost of reading 8 bytes, not of parsing it."""
    return len(_header_text(spec, {})) + ALIGNMENT + metadata_bytes


def payload_limit(spec: TensorSpec) -> int:
    """The most bytes a payload that must hold spec's tensors takes: header_limit's header, and their data."""
    return header_limit(spec) + sum(math.prod(shape) * dtype.itemsize for dtype, shape in spec.values())


def decode(buffer: Received, max_header_bytes: int = MAX_HEADER_BYTES) -> Payload:
    """Parse and check a payload whose header takes at most max_header_bytes (see header_limit); raise
    PayloadError saying what is wrong."""
    layout = _parse_layout(buffer, max_header_bytes)
    if layout is None:
        raise PayloadError(f"payload of {len(buffer)} bytes ends inside its length prefix or header")
    if layout.size != len(buffer):
        raise PayloadError(
            f"payload has {len(buffer) - layout.data_start} data bytes but its tensors describe "
            f"{layout.size - layout.data_start}"
        )
    return Payload(layout.metadata, _views(buffer, layout), buffer, layout.data_start)


@dataclass(frozen=True)
class _Layout:
    metadata: dict[str, str]
    entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]]  # name, dtype, shape, begin, end; in data order
    data_start: int
    size: int  # of the whole payload


def _views(buffer: Buffer, layout: _Layout) -> dict[str, torch.Tensor]:
    return {
        name: _view(buffer, dtype, shape, layout.data_start + begin) for name, dtype, shape, begin, _ in layout.entries
    }


def _parse_layout(head: Received, max_header_bytes: int = MAX_HEADER_BYTES) -> _Layout | None:
    """The checked layout from a payload's first bytes, or None while its header is incomplete."""
    if len(head) < 8:
        return None
    (header_length,) = struct.unpack_from("<Q", head)
    if header_length > max_header_bytes:  # before a byte of it is parsed
        raise PayloadError(f"header length {header_length} exceeds the {max_header_bytes}-byte limit")
    if len(head) < 8 + header_length:
        return None
    header = _parse_header(bytes(head[8 : 8 + header_length]))
    metadata = _parse_metadata(header.pop("__metadata__", {}))
    entries = sorted(((name, *_parse_entry(name, entry)) for name, entry in header.items()), key=lambda item: item[3])
    expected_begin = 0
    for name, dtype, shape, begin, end in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        if begin != expected_begin or end - begin != nbytes:
            raise PayloadError(
                f"tensor {_brief(name)}: data_offsets [{_brief(begin)}, {_brief(end)}] do not tile the data "
                f"({nbytes} bytes expected at {expected_begin})"
            )
        expected_begin = end
    return _Layout(metadata, entries, 8 + header_length, 8 + header_length + expected_begin)


def receive(
    chunks: Iterable[bytes | memoryview], max_bytes: int, check_finite: bool = False, admit: Admit | None = None
) -> Payload:
    """Decode a payload streamed in chunks, copying each chunk into place as it arrives.

    The header is checked as soon as it is in, and shown to admit (if given) before the buffer is allocated:
    what the receiver knows can refuse a payload before it costs memory. With check_finite, each run of
    consecutive floating-point tensors is checked for NaN and Inf as soon as its bytes are, so little is left
    when the stream ends. Unlike decode's, the tensors are writable: they view a buffer that belongs to this
    payload alone."""
    chunks, head, layout = iter(chunks), bytearray(), None
    for chunk in chunks:
        head += chunk
        if len(head) > max_bytes:
            raise PayloadError(f"stream exceeds the {max_bytes}-byte limit")
        if (layout := _parse_layout(head)) is not None:
            break
    if layout is None:
        return decode(bytes(head))  # raises: the stream ended inside the header
    if admit is not None:  # first: the receiver's own words say best why it refuses
        admit(layout.metadata, {name: (dtype, shape) for name, dtype, shape, _, _ in layout.entries})
    if layout.size > max_bytes:
        raise PayloadError(f"payload of {layout.size} bytes exceeds the {max_bytes}-byte limit")
    buffer = torch.empty(layout.size, dtype=torch.uint8).numpy()  # not zero-filled: every byte is overwritten
    tensors = _views(buffer, layout)  # filled in below, before anyone sees them
    runs = iter(_float_runs(layout) if check_finite else [])
    run, received = next(runs, None), 0
    for chunk in itertools.chain([memoryview(head)], chunks):
        end = received + len(chunk)
        if end > layout.size:
            raise PayloadError(f"stream carries more than the {layout.size} bytes its header describes")
        buffer[received:end] = memoryview(chunk)  # the one copy: from gRPC's message into place
        received = end
        while run is not None and run.end <= received:
            if not all_finite(_view(buffer, run.dtype, ((run.end - run.begin) // run.dtype.itemsize,), run.begin)):
                _check_finite({name: tensors[name] for name in run.names})  # names the culprit
            run = next(runs, None)
    if received != layout.size:
        raise PayloadError(f"stream ended after {received} of the {layout.size} bytes its header describes")
    return Payload(layout.metadata, tensors, buffer, layout.data_start)


@dataclass(frozen=True)
class _Run:
    """Consecutive floating-point tensors of one dtype, checked for NaN and Inf as one."""

    dtype: torch.dtype
    begin: int  # offsets in the payload
    end: int
    names: tuple[str, ...]


def _float_runs(layout: _Layout) -> list[_Run]:
    runs: list[_Run] = []
    for name, dtype, _, begin, end in layout.entries:
        if not dtype.is_floating_point or begin == end:
            continue
        begin, end = begin + layout.data_start, end + layout.data_start
        if runs and runs[-1].dtype == dtype and runs[-1].end == begin:
            runs[-1] = _Run(dtype, runs[-1].begin, end, (*runs[-1].names, name))
        else:
            runs.append(_Run(dtype, begin, end, (name,)))
    return runs


def _parse_header(text: bytes) -> dict:
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as error:  # bad UTF-8 or JSON, integers too long, nesting too deep
        raise PayloadError(f"header is not valid JSON: {str(error)[:200]}") from None
    if not isinstance(header, dict):
        raise PayloadError("header must be a JSON object")
    return header


def _parse_metadata(metadata: object) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PayloadError("__metadata__ must map strings to strings")
    return metadata


def _parse_entry(name: str, entry: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise PayloadError(f"tensor {_brief(name)}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise PayloadError(
            f"tensor {_brief(name)}: unsupported dtype {_brief(dtype)}; expected one of {sorted(DTYPES)}"
        )
    if not _is_int_list(shape) or len(shape) > MAX_DIMS or any(size < 0 for size in shape):
        raise PayloadError(
            f"tensor {_brief(name)}: shape must be at most {MAX_DIMS} non-negative integers, got {_brief(shape)}"
        )
    if math.prod(max(1, size) for size in shape) > MAX_ELEMENTS:
        raise PayloadError(f"tensor {_brief(name)}: shape {_brief(shape)} describes more than {MAX_ELEMENTS} elements")
    if not _is_int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise PayloadError(
            f"tensor {_brief(name)}: data_offsets must be [begin, end] with 0 <= begin <= end, got {_brief(offsets)}"
        )
    return DTYPES[dtype], tuple(shape), offsets[0], offsets[1]


def _brief(value: object, limit: int = 60) -> str:
    """repr(value), cut short: names and numbers in a hostile header can be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(type(item) is int for item in value)


def _view(buffer: Buffer, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).view(shape)


def cast_floats(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors with floating-point ones converted to dtype (no copy when they already are)."""
    return {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in tensors.items()}


def check_matches(payload: Payload, spec: TensorSpec) -> None:
    """Raise PayloadError unless the payload holds exactly the spec's tensors, in order, all finite."""
    check_layout(payload, spec)
    _check_finite(payload.tensors)


def check_layout(payload: Payload, spec: TensorSpec) -> None:
    """Raise PayloadError unless the payload holds exactly the spec's tensors, in order (values unchecked)."""
    check_described(spec_of(payload.tensors), spec)


def check_described(described: TensorSpec, spec: TensorSpec) -> None:
    """Raise PayloadError unless the tensors a payload describes (names, dtypes and shapes, in order: spec_of
    its tensors, or its header as receive shows it to admit) are exactly the spec's."""
    missing = [name for name in spec if name not in described]
    unexpected = [name for name in described if name not in spec]
    if missing or unexpected:
        raise PayloadError(
            f"tensor names do not match the model: missing {missing[:3]}, unexpected {_brief(unexpected[:3])}"
        )
    if list(described) != list(spec):
        raise PayloadError("tensors are not in the model's order")
    for name, (dtype, shape) in described.items():
        expected_dtype, expected_shape = spec[name]
        if dtype != expected_dtype or shape != expected_shape:
            raise PayloadError(
                f"tensor {name!r} is {DTYPE_NAMES[dtype]} {list(shape)}, "
                f"expected {DTYPE_NAMES[expected_dtype]} {list(expected_shape)}"
            )


def _check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise PayloadError(f"tensor {_brief(name)} holds NaN or Inf values")


def flat_runs(payload: Payload) -> list[torch.Tensor]:
    """The payload's tensors as 1-D views, one per run of consecutive tensors of one dtype, in wire order
    (a gradient in float16 is two runs: the parameters' gradients, then the float32 statistics)."""
    runs: list[torch.Tensor] = []
    for dtype, group in itertools.groupby(payload.tensors.values(), key=lambda tensor: tensor.dtype):
        count = sum(tensor.numel() for tensor in group)
        offset = payload.data_start + sum(run.numel() * run.element_size() for run in runs)
        runs.append(_view(payload.buffer, dtype, (count,), offset))
    return runs


def metadata_int(metadata: Mapping[str, str], key: str, minimum: int = 0) -> int:
    """An integer metadata field, at least `minimum`; raise PayloadError if absent or malformed."""
    text = metadata.get(key)
    if text is None or not re.fullmatch(r"-?[0-9]{1,18}", text) or int(text) < minimum:
        raise PayloadError(f"metadata {key!r} must be an integer >= {minimum}, got {_brief(text)}")
    return int(text)
