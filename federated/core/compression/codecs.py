"""The codecs that compress one tensor of known shape into named parts, the exact dtype and shape of each part,
and their checked decoding into a running sum.

A codec is bound to its settings (`Settings`: top-k's and random-k's ratio, PowerSGD's rank) when it is made
(`make_codec`); every part's dtype and shape then follows from the tensor's shape alone (`Codec.parts`), so a
receiver knows a payload's exact size and checks its header before it reads a value. `Codec.decode_add` checks
everything about the parts first and only then adds, in place, into the receiver's tensor: a refused payload
leaves it untouched.
Each codec's docstring states its bound on decode(encode(x)) - x and whether it is biased (a biased codec
needs error feedback on the sender: federated/core/compression/feedback.py).
"""

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

# QSGD's bucket: every BUCKET consecutive values (of the flattened tensor) share one float32 scale, their
# largest |value|. Smaller buckets lower the rounding error of the small values, at 4 bytes per bucket.
BUCKET = 512

# top-k's positions in a tensor of at most SHORT_POSITIONS values travel as int16 holding position - INDEX_OFFSET
# (0 .. 65535 as -32768 .. 32767), the receiver adding INDEX_OFFSET back
SHORT_POSITIONS = 2**16
INDEX_OFFSET = 2**15

# Part name -> (dtype, shape): what a tensor encodes to, exactly
PartSpec = dict[str, tuple[torch.dtype, tuple[int, ...]]]
Parts = dict[str, torch.Tensor]


class CompressionError(ValueError):
    """Compressed parts that cannot be decoded: the message says what is wrong."""


@dataclass(frozen=True)
class Settings:
    """What a codec's part sizes depend on besides the tensor's shape."""

    ratio: float = 0.01  # top-k and random-k: the share of values sent, k = max(1, ceil(ratio * numel))
    rank: int = 2  # PowerSGD: the factors' rank r (at most the matrix's smaller side)


class Codec(ABC):
    """One codec, with its settings, for tensors of any shape it is given."""

    name: ClassVar[str]
    biased: ClassVar[bool]  # whether E[decode(encode(x))] != x: the sender then keeps an error-feedback residual

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def label(self) -> str:
        """The codec with the setting it reads, as logs say it."""
        return self.name

    @abstractmethod
    def parts(self, shape: tuple[int, ...]) -> PartSpec:
        """The exact dtype and shape of every part a tensor of this shape encodes to."""

    @abstractmethod
    def encode(self, values: torch.Tensor, state: dict[str, torch.Tensor], generator: torch.Generator) -> Parts:
        """values (float32, on the CPU) as contiguous parts; state is this tensor's own (PowerSGD's warm start),
        kept by the caller from one round to the next; generator drives any randomness."""

    @abstractmethod
    def value_problem(self, parts: Parts, numel: int) -> str | None:
        """What is wrong with the values of parts whose dtypes and shapes are known right, or None."""

    @abstractmethod
    def add(self, parts: Parts, out: torch.Tensor, weight: float) -> None:
        """out += weight * decoded, in place, for parts already checked."""

    def add_exact(self, parts: Parts, out: torch.Tensor) -> None:
        """out += decoded, in place, for parts already checked, with the same bits on every CPU (the downlink's
        replica and each learner's reference must stay bit-identical). Elementwise float operations round
        exactly once whatever the SIMD width; so do the casts, int8/int4's levels * (scale / L), sign's +-scale
        and the sparse codecs' index_add_ at distinct positions, with weight 1 (a fused multiply-add by 1 rounds
        as the add does). PowerSGD's matrix product does not: it overrides this."""
        self.add(parts, out, 1.0)

    def problem(self, parts: Parts, shape: tuple[int, ...]) -> str | None:
        """What is wrong with parts for a tensor of this shape (names, dtypes, shapes, then values), or None."""
        return spec_problem(parts, self.parts(shape)) or self.value_problem(parts, math.prod(shape))

    def decode_add(self, parts: Parts, out: torch.Tensor, weight: float) -> None:
        """out += weight * decode(parts), after checking parts against out's shape: raises CompressionError, and
        leaves out untouched, on anything wrong."""
        problem = self.problem(parts, tuple(out.shape))
        if problem is not None:
            raise CompressionError(problem)
        self.add(parts, out, weight)


def spec_problem(named: Mapping[str, torch.Tensor], spec: PartSpec) -> str | None:
    """What makes named tensors other than spec (names, then each one's dtype and shape; dense tensors only), or
    None."""
    if set(named) != set(spec):
        missing, extra = sorted(set(spec) - set(named)), sorted(set(named) - set(spec))
        return f"missing {missing[:3]}, unexpected {[name[:64] for name in extra[:3]]}"
    for name, (dtype, shape) in spec.items():
        tensor = named[name]
        if tensor.layout != torch.strided or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            return f"{name} is {tensor.layout} {tensor.dtype} {tuple(tensor.shape)}, not {dtype} {shape}"
    return None


def nonfinite(tensor: torch.Tensor, what: str) -> str | None:
    """'NaN or Inf in WHAT' when tensor holds one, else None."""
    return None if bool(torch.isfinite(tensor).all()) else f"NaN or Inf in {what}"


def flat_add(out: torch.Tensor, decoded: torch.Tensor, weight: float) -> None:
    """out += weight * decoded, decoded being flat (out is contiguous: a view into an update vector)."""
    out.view(-1).add_(decoded.to(out.device, out.dtype), alpha=weight)


class Raw(Codec):
    """none: the float32 values themselves. Exact; unbiased. 4 bytes a value."""

    name = "none"
    biased = False

    def parts(self, shape: tuple[int, ...]) -> PartSpec:
        return {"values": (torch.float32, (math.prod(shape),))}

    def encode(self, values: torch.Tensor, state: dict[str, torch.Tensor], generator: torch.Generator) -> Parts:
        return {"values": values.reshape(-1).to(torch.float32)}

    def value_problem(self, parts: Parts, numel: int) -> str | None:
        return nonfinite(parts["values"], "values")

    def add(self, parts: Parts, out: torch.Tensor, weight: float) -> None:
        flat_add(out, parts["values"], weight)


class Cast(Codec):
    """A cast to a 2-byte float, rounding to nearest (values beyond the type's range are clamped to it). Bound per
    element: |decoded - x| <= |x| * 2^-(mantissa bits + 1) for x in the normal range (float16: 2^-11, and at most
    2^-25 below 2^-14; bfloat16: 2^-8). Deterministic rounding is biased (the same x always rounds the same way):
    error feedback keeps what it loses. 2 bytes a value."""

    biased = True
    dtype: ClassVar[torch.dtype]

    def parts(self, shape: tuple[int, ...]) -> PartSpec:
        return {"values": (self.dtype, (math.prod(shape),))}

    def encode(self, values: torch.Tensor, state: dict[str, torch.Tensor], generator: torch.Generator) -> Parts:
        largest = torch.finfo(self.dtype).max
        return {"values": values.reshape(-1).clamp(-largest, largest).to(self.dtype)}

    def value_problem(self, parts: Parts, numel: int) -> str | None:
        return nonfinite(parts["values"], "values")

    def add(self, parts: Parts, out: torch.Tensor, weight: float) -> None:
        flat_add(out, parts["values"].to(torch.float32), weight)


class Float16(Cast):
    """fp16: a Cast to float16 (relative bound 2^-11 in the normal range, range +-65504)."""

    name = "fp16"
    dtype = torch.float16


class BFloat16(Cast):
    """bf16: a Cast to bfloat16 (relative bound 2^-8, float32's range)."""

    name = "bf16"
    dtype = torch.bfloat16


class Quantised(Codec):
    """QSGD (Alistarh et al. 2017) with buckets: every BUCKET values share a float32 scale s_b = max |x| of the
    bucket, and each x is rounded stochastically to one of the levels s_b * j / L (j an integer in [-L, L]),
    up with probability equal to the distance from the level below, so E[decoded] = x: unbiased. Bound per
    element: |decoded - x| < s_b / L (L = 127 for int8, 7 for int4)."""

    biased = False
    levels: ClassVar[int]

    def buckets(self, numel: int) -> int:
        return -(-numel // BUCKET)

    def parts(self, shape: tuple[int, ...]) -> PartSpec:
        numel = math.prod(shape)
        return {**self.code_parts(numel), "scales": (torch.float32, (self.buckets(numel),))}

    @abstractmethod
    def code_parts(self, numel: int) -> PartSpec:
        """The spec of the part(s) holding the integer levels."""

    @abstractmethod
    def pack(self, levels: torch.Tensor) -> Parts:
        """Integer levels in [-L, L] (int8) as parts."""

    @abstractmethod
    def unpack(self, parts: Parts, numel: int) -> torch.Tensor:
        """The integer levels (int8) back from checked parts."""

    @abstractmethod
    def code_problem(self, parts: Parts, numel: int) -> str | None:
        """What is wrong with the packed levels, or None."""

    def encode(self, values: torch.Tensor, state: dict[str, torch.Tensor], generator: torch.Generator) -> Parts:
        flat = values.reshape(-1).to(torch.float32)
        numel = flat.numel()
        padded = torch.nn.functional.pad(flat, (0, self.buckets(numel) * BUCKET - numel)).view(-1, BUCKET)
        scales = padded.abs().amax(dim=1)
        magnitude = self.magnitudes(padded, scales)
        magnitude.add_(torch.rand(magnitude.shape, generator=generator)).floor_().clamp_(max=self.levels)
        levels = magnitude.mul_(padded.sign()).view(-1)[:numel].to(torch.int8)
        return {**self.pack(levels), "scales": scales}

    def magnitudes(self, padded: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """|x| / s_b * L, in [0, L], for buckets (rows) of values and their scales. |x| / s_b is at most 1 even for
        a subnormal s_b (whereas L / s_b overflows, and 0 times that is NaN); a bucket of zeros, scale 0, sends
        zeros."""
        ratios = padded.abs().div_(scales.unsqueeze(1))
        return torch.where(scales.unsqueeze(1) > 0, ratios, 0.0).mul_(self.levels)

    def value_problem(self, parts: Parts, numel: int) -> str | None:
        scales = parts["scales"]
        problem = nonfinite(scales, "scales")
        if problem is None and bool((scales < 0).any()):
            problem = "a negative scale"
        return problem or self.code_problem(parts, numel)

    def add(self, parts: Parts, out: torch.Tensor, weight: float) -> None:
        numel = out.numel()
        levels = self.unpack(parts, numel).to(torch.float32)
        padded = torch.nn.functional.pad(levels, (0, self.buckets(numel) * BUCKET - numel)).view(-1, BUCKET)
        padded.mul_((parts["scales"] / self.levels).unsqueeze(1))
        flat_add(out, padded.view(-1)[:numel], weight)


class Int8(Quantised):
    """int8: Quantised with L = 127 levels each side (bound s_b / 127): 1 byte a value, and 4 a bucket."""

    name = "int8"
    levels = 127

    def code_parts(self, numel: int) -> PartSpec:
        return {"levels": (torch.int8, (numel,))}

    def pack(self, levels: torch.Tensor) -> Parts:
        return {"levels": levels}

    def unpack(self, parts: Parts, numel: int) -> torch.Tensor:
        return parts["levels"]

    def code_problem(self, parts: Parts, numel: int) -> str | None:
        if numel and int(parts["levels"].min()) < -self.levels:
            return f"a level below -{self.levels}"
        return None


class Int4(Quantised):
    """int4: Quantised with L = 7 levels each side (bound s_b / 7), two a byte (j + 8 in the low nibble for
    even positions, the high nibble for odd ones; an odd count pads with 8, a zero): half a byte a value, and 4
    a bucket."""

    name = "int4"
    levels = 7

    def code_parts(self, numel: int) -> PartSpec:
        return {"packed": (torch.uint8, (-(-numel // 2),))}

    def pack(self, levels: torch.Tensor) -> Parts:
        nibbles = torch.nn.functional.pad(levels + 8, (0, levels.numel() % 2), value=8).to(torch.uint8).view(-1, 2)
        return {"packed": nibbles[:, 0] | (nibbles[:, 1] << 4)}

    def nibbles(self, packed: torch.Tensor) -> torch.Tensor:
        """Every nibble, in position order (padding included)."""
        return torch.stack([packed & 15, packed >> 4], dim=1).view(-1)

    def unpack(self, parts: Parts, numel: int) -> torch.Tensor:
        return self.nibbles(parts["packed"])[:numel].to(torch.int8) - 8

    def code_problem(self, parts: Parts, numel: int) -> str | None:
        nibbles = self.nibbles(parts["packed"])
        if numel and int(nibbles[:numel].min()) == 0:
            return "a level of -8 (levels are -7 to 7)"
        if numel % 2 and int(nibbles[-1]) != 8:
            return "a padding nibble other than 8"
        return None


def to_bfloat16(values: torch.Tensor) -> torch.Tensor:
    """float32 values as bfloat16, rounded to nearest, clamped to its largest finite value first: bfloat16 has
    float32's exponent range (float16 would overflow to Inf from |x| > 65504, a large gradient), but a float32
    within half a bfloat16 step of float32's largest value still rounds up to Inf."""
    largest = torch.finfo(torch.bfloat16).max
    return values.clamp(-largest, largest).to(torch.bfloat16)


class Sparse(Codec):
    """A codec that sends k = max(1, ceil(ratio * numel)) values at positions of each learner's own: learners'
    messages add up only once decoded (no secure aggregation), and a coordinate-wise rule sees mostly zeros."""

    def k(self, numel: int) -> int:
        return max(1, math.ceil(self.settings.ratio * numel))

    def label(self) -> str:
        return f"{self.name}, ratio {self.settings.ratio:g}"


class TopK(Sparse):
    """top-k (Stich et al. 2018): the k = max(1, ceil(ratio * numel)) values of largest |x|, as bfloat16, and their
    positions, as int16 holding position - INDEX_OFFSET (32768) when the tensor has at most 65,536 values (the
    receiver adds INDEX_OFFSET back), as int32 otherwise. Bound: the values not sent are the error, and a sent
    value carries bfloat16's rounding (2^-8 of it in the normal range), so |decoded - x| <= max(the k-th largest
    |x|, |x| 2^-8) per element and ||decoded - x||^2 <= (1 - k/numel + 2^-16) ||x||^2. Biased: error feedback
    sends the rest later, the rounding included. 4 bytes a value sent (6 above 65,536 values)."""

    name = "topk"
    biased = True

    def index_dtype(self, numel: int) -> torch.dtype:
        """int16 (offset by INDEX_OFFSET) for positions below 2^16, int32 beyond."""
        return torch.int16 if numel <= SHORT_POSITIONS else torch.int32

    def parts(self, shape: tuple[int, ...]) -> PartSpec:
        numel = math.prod(shape)
        k = self.k(numel)
        return {"indices": (self.index_dtype(numel), (k,)), "values": (torch.bfloat16, (k,))}

    def sent_positions(self, indices: torch.Tensor) -> torch.Tensor:
        """The positions (int64) that the sent indices stand for."""
        positions = indices.to(torch.int64)
        return positions + INDEX_OFFSET if indices.dtype == torch.int16 else positions

    def encode(self, values: torch.Tensor, state: dict[str, torch.Tensor], generator: torch.Generator) -> Parts:
        flat = values.reshape(-1).to(torch.float32)
        numel = flat.numel()
        positions = flat.abs().topk(self.k(numel), sorted=False).indices
        dtype = self.index_dtype(numel)
        indices = positions - INDEX_OFFSET if dtype == torch.int16 else positions
        return {"indices": indices.to(dtype), "values": to_bfloat16(flat[positions])}

    def value_problem(self, parts: Parts, numel: int) -> str | None:
        positions = self.sent_positions(parts["indices"])
        if int(positions.min()) < 0 or int(positions.max()) >= numel:
            return f"an index outside [0, {numel})"
        if torch.unique(positions).numel() != positions.numel():
            return "a repeated index"
        return nonfinite(parts["values"], "values")

    def add(self, parts: Parts, out: torch.Tensor, weight: float) -> None:
        positions = self.sent_positions(parts["indices"]).to(out.device)
        out.view(-1).index_add_(0, positions, parts["values"].to(out.device, out.dtype), alpha=weight)


def derived_seed(*parts: object) -> int:
    """A seed for torch.Generator.manual_seed (63 bits) derived from parts (a label, the run's seed, an id, a
    round) by BLAKE2b of their text joined by commas: generators of different labels or ids draw unrelated
    streams, and none replays another generator seeded with a small integer."""
    key = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(key, "little") >> 1


def hashed(seed: int, counter: int) -> int:
    """The uint64 a seed draws at a counter: BLAKE2b with an 8-byte digest of the seed (8 bytes, little-endian,
    two's complement) then the counter (8 bytes, little-endian), read little-endian. Specified here, not by a
    library's generator, so every sender and receiver draws the same whatever their versions."""
    message = seed.to_bytes(8, "little", signed=True) + counter.to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(message, digest_size=8).digest(), "little")


def distinct_positions(seed: int, k: int, numel: int) -> torch.Tensor:
    """k distinct positions in [0, numel), ascending (int64), drawn from seed by Floyd's algorithm: for counter
    c = 0 .. k-1 and j = numel - k + c, t = hashed(seed, c) mod (j + 1); take t, or j if t is taken already.
    O(k) time and memory; every k-subset is equally likely up to the modulo's bias, below numel / 2^64."""
    chosen: set[int] = set()
    for counter, j in enumerate(range(numel - k, numel)):
        t = hashed(seed, counter) % (j + 1)
        chosen.add(j if t in chosen else t)
    return torch.tensor(sorted(chosen), dtype=torch.int64)


class RandomK(Sparse):
    """random-k: k = max(1, ceil(ratio * numel)) values at k distinct positions that the int64 seed it sends
    draws (distinct_positions: specified, so the receiver draws the same ones), in ascending order, unscaled, as
    bfloat16 (to_bfloat16). Bound: the values not sent are the error, and a sent value carries bfloat16's rounding
    (|decoded - x| <= max |x|, E||decoded - x||^2 <= (1 - k/numel) ||x||^2 + 2^-16 (k/numel) ||x||^2). Unscaled it
    is biased (E[decoded] = (k/numel) x, up to the rounding): error feedback sends the rest later, the rounding
    included, without the numel/k-fold variance that scaling to unbiased would add. 2 bytes a value sent, and
    8."""

    name = "randk"
    biased = True

    def parts(self, shape: tuple[int, ...]) -> PartSpec:
        return {"seed": (torch.int64, (1,)), "values": (torch.bfloat16, (self.k(math.prod(shape)),))}

    def positions(self, seed: int, numel: int) -> torch.Tensor:
        """The k positions a seed draws."""
        return distinct_positions(seed, self.k(numel), numel)

    def encode(self, values: torch.Tensor, state: dict[str, torch.Tensor], generator: torch.Generator) -> Parts:
        flat = values.reshape(-1).to(torch.float32)
        seed = torch.randint(0, 2**62, (1,), generator=generator)
        return {"seed": seed, "values": to_bfloat16(flat[self.positions(int(seed), flat.numel())])}

    def value_problem(self, parts: Parts, numel: int) -> str | None:
        return nonfinite(parts["values"], "values")

    def add(self, parts: Parts, out: torch.Tensor, weight: float) -> None:
        positions = self.positions(int(parts["seed"]), out.numel()).to(out.device)
        out.view(-1).index_add_(0, positions, parts["values"].to(out.device, out.dtype), alpha=weight)


class Sign(Codec):
    """scaled sign (EF-signSGD, Karimireddy et al. 2019): one bit a value (1 for x >= 0, eight a byte, the first
    value in the lowest bit; padding bits 0) and one float32 scale, mean |x|. Bound: ||decoded - x||^2 =
    ||x||^2 - ||x||_1^2 / numel exactly, and |decoded - x| <= max(scale, max|x| - scale) per element. Biased:
    error feedback keeps the rest. 1/8 byte a value, and 4."""

    name = "sign"
    biased = True

    def parts(self, shape: tuple[int, ...]) -> PartSpec:
        return {"bits": (torch.uint8, (-(-math.prod(shape) // 8),)), "scale": (torch.float32, (1,))}

    def bits(self, packed: torch.Tensor) -> torch.Tensor:
        """Every bit (padding included) as uint8 0 or 1, in position order."""
        return ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).view(-1)

    def encode(self, values: torch.Tensor, state: dict[str, torch.Tensor], generator: torch.Generator) -> Parts:
        flat = values.reshape(-1).to(torch.float32)
        bits = torch.nn.functional.pad((flat >= 0).to(torch.uint8), (0, -flat.numel() % 8)).view(-1, 8)
        packed = (bits << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)
        return {"bits": packed, "scale": flat.abs().mean().reshape(1)}

    def value_problem(self, parts: Parts, numel: int) -> str | None:
        scale = parts["scale"]
        if not math.isfinite(float(scale)) or float(scale) < 0:
            return f"a scale of {float(scale)}"
        if bool(self.bits(parts["bits"])[numel:].any()):
            return "a padding bit set"
        return None

    def add(self, parts: Parts, out: torch.Tensor, weight: float) -> None:
        signs = self.bits(parts["bits"])[: out.numel()].to(torch.float32).mul_(2).sub_(1)
        flat_add(out, signs, weight * float(parts["scale"]))


class PowerSGD(Codec):
    """PowerSGD (Vogels et al. 2019): the tensor as a matrix M [m, n] (m = shape[0], n = numel / m) sent as
    P [m, r] and Q [n, r], r = min(rank, m, n), both as bfloat16 (to_bfloat16), decoded as P Q^T. One power
    iteration a round from the last round's Q (the warm start, kept in state in float32; random normal the first
    time): P = orthonormalised M Q, then Q = M^T P. P's columns being orthonormal, P Q^T = P P^T M is M projected
    onto their span: ||M - P Q^T||_F <= ||M||_F, and with warm starts on a slowly changing M it approaches the
    best rank-r error. The factors' rounding (each entry within 2^-8 of its own size in the normal range) adds
    at most (2^-7 + 2^-16) sqrt(r) ||M||_F. Biased: error feedback keeps the rest, the rounding included (the
    residual is M - the rounded factors' product). 2 (m + n) r bytes."""

    name = "powersgd"
    biased = True

    def label(self) -> str:
        return f"{self.name}, rank {self.settings.rank}"

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        rows = shape[0] if shape else 1
        return rows, math.prod(shape) // rows if rows else 0

    def parts(self, shape: tuple[int, ...]) -> PartSpec:
        rows, columns = self.matrix_shape(shape)
        rank = min(self.settings.rank, rows, columns)
        return {"P": (torch.bfloat16, (rows, rank)), "Q": (torch.bfloat16, (columns, rank))}

    def encode(self, values: torch.Tensor, state: dict[str, torch.Tensor], generator: torch.Generator) -> Parts:
        matrix = values.to(torch.float32).reshape(self.matrix_shape(tuple(values.shape)))
        _, q_spec = self.parts(tuple(values.shape))["Q"]
        q = state.get("Q")
        if q is None or tuple(q.shape) != q_spec:
            q = torch.randn(q_spec, generator=generator)
        p = torch.linalg.qr(matrix @ q).Q.contiguous()  # QR's factor is column-major
        q = (matrix.T @ p).contiguous()
        state["Q"] = q
        return {"P": to_bfloat16(p), "Q": to_bfloat16(q)}

    def value_problem(self, parts: Parts, numel: int) -> str | None:
        p, q = parts["P"], parts["Q"]
        problem = nonfinite(p, "P") or nonfinite(q, "Q")
        if problem is None and p.numel() and q.numel():
            # each decoded value is a sum of r products: bounded by r max|P| max|Q|, which must stay a float32
            largest = p.shape[1] * float(p.abs().max()) * float(q.abs().max())
            if largest > torch.finfo(torch.float32).max:
                problem = "factors whose product overflows float32"
        return problem

    def add(self, parts: Parts, out: torch.Tensor, weight: float) -> None:
        p, q = (parts[name].to(out.device, out.dtype) for name in ("P", "Q"))
        out.view(p.shape[0], q.shape[0]).addmm_(p, q.T, alpha=weight)

    def add_exact(self, parts: Parts, out: torch.Tensor) -> None:
        """out += P Q^T with the same bits on every CPU: addmm's blocking and vector width (BLAS, MKL_CBWR) change
        the order of its sums, so the products, exact in float64 (of two float32s), are summed over the rank in
        float64 in rank order, rounded once to float32, then added (bfloat16 factors convert to float64 exactly)."""
        p, q = (parts[name].to(out.device, torch.float64).T.contiguous() for name in ("P", "Q"))  # [r, m], [r, n]
        product = p[0].unsqueeze(1) * q[0]  # (each product exact: a fused multiply-add rounds it as an add does)
        for column in range(1, len(p)):
            product.addcmul_(p[column].unsqueeze(1), q[column])
        out.view(-1).add_(product.view(-1).to(out.dtype))


CODEC_CLASSES: dict[str, type[Codec]] = {
    codec.name: codec for codec in (Raw, Float16, BFloat16, Int8, Int4, TopK, RandomK, Sign, PowerSGD)
}
CODECS = tuple(CODEC_CLASSES)
SPARSE = tuple(name for name, codec in CODEC_CLASSES.items() if issubclass(codec, Sparse))  # own positions
# the levels L of the codecs that round to [-L, L]: under secure aggregation, the integers that are masked
QUANTISED = {name: codec.levels for name, codec in CODEC_CLASSES.items() if issubclass(codec, Quantised)}


def make_codec(name: str, settings: Settings) -> Codec:
    """The codec of this name with these settings; ValueError for an unknown name or settings out of range."""
    if name not in CODEC_CLASSES:
        raise ValueError(f"unknown codec {name[:32]!r}; choose one of {', '.join(CODECS)}")
    if not 0 < settings.ratio <= 1:
        raise ValueError(f"a ratio of {settings.ratio} is not in (0, 1]")
    if settings.rank < 1:
        raise ValueError(f"a rank of {settings.rank} is below 1")
    return CODEC_CLASSES[name](settings)
