"""The compression codecs and error feedback: parts as declared, each codec's bound, unbiased quantisers, PowerSGD,
top-k, mass conservation, accumulation into a sum, and every hostile payload refused without a write."""

import math
from collections.abc import Callable

import pytest
import torch

from federated.core.compression import (
    CODECS,
    SMALL,
    Codec,
    CompressionError,
    Compressor,
    Settings,
    compressed_names,
    decode_add,
    expected,
    make_codec,
)
from federated.core.compression.codecs import BUCKET, INDEX_OFFSET, distinct_positions, hashed
from federated.core.layout import GradientLayout
from model import build_model

SETTINGS = Settings(ratio=0.05, rank=2)
BIASED = [name for name in CODECS if make_codec(name, SETTINGS).biased]
# a convolution's weight (compressed), an odd-sized matrix (compressed; padding for int4 and sign), a bias and
# a small matrix (both raw)
SHAPES = {"conv.weight": (32, 16, 3, 3), "odd.weight": (37, 41), "conv.bias": (32,), "fc.weight": (10, 20)}


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def round_trip(codec: Codec, x: torch.Tensor, state: dict | None = None, seed: int = 0) -> torch.Tensor:
    """decode(encode(x)), decoded through the checked path."""
    out = torch.zeros_like(x)
    codec.decode_add(codec.encode(x, {} if state is None else state, generator(seed)), out, 1.0)
    return out


def flat_views(shapes: dict[str, tuple[int, ...]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One flat vector and named views into it, as GradientLayout.views gives."""
    flat = torch.zeros(sum(math.prod(shape) for shape in shapes.values()))
    pieces = flat.split([math.prod(shape) for shape in shapes.values()])
    return flat, {name: piece.view(shape) for name, piece, shape in zip(shapes, pieces, shapes.values())}


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (37, 41), (1, 3)])
def test_every_part_has_the_dtype_and_shape_the_codec_declares(name, shape):
    codec = make_codec(name, SETTINGS)
    parts = codec.encode(torch.randn(shape, generator=generator()), {}, generator())
    assert {part: (tensor.dtype, tuple(tensor.shape)) for part, tensor in parts.items()} == codec.parts(shape)


def test_part_sizes_follow_from_the_shape_and_settings():
    settings = Settings(ratio=0.01, rank=4)
    parts = {name: make_codec(name, settings).parts((64, 64, 3, 3)) for name in CODECS}  # 36,864 values
    assert parts["topk"] == {"indices": (torch.int16, (369,)), "values": (torch.bfloat16, (369,))}  # ceil(0.01 n)
    assert parts["randk"] == {"seed": (torch.int64, (1,)), "values": (torch.bfloat16, (369,))}
    assert parts["int8"] == {"levels": (torch.int8, (36864,)), "scales": (torch.float32, (36864 // BUCKET,))}
    assert parts["int4"]["packed"] == (torch.uint8, (18432,))
    assert parts["sign"]["bits"] == (torch.uint8, (4608,))
    assert parts["powersgd"] == {"P": (torch.bfloat16, (64, 4)), "Q": (torch.bfloat16, (576, 4))}
    assert make_codec("powersgd", Settings(rank=8)).parts((3, 500))["P"] == (torch.bfloat16, (3, 3))  # r <= m
    assert make_codec("topk", Settings(ratio=1e-9)).parts((5,))["values"] == (torch.bfloat16, (1,))  # k >= 1
    topk = make_codec("topk", settings)  # int16 positions up to 2^16 values, int32 beyond
    assert (topk.parts((256, 256))["indices"], topk.parts((256, 257))["indices"]) == (
        (torch.int16, (656,)), (torch.int32, (658,)),
    )  # fmt: skip


def bucket_bound(levels: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """s_b / L for each element's bucket."""

    def bound(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1)
        scales = torch.nn.functional.pad(flat.abs(), (0, -flat.numel() % BUCKET)).view(-1, BUCKET).amax(dim=1)
        return (scales / levels).repeat_interleave(BUCKET)[: flat.numel()].view(x.shape)

    return bound


# PowerSGD's bfloat16 factors add at most this times ||x||_F to the projection's error (rank 2)
POWERSGD_ROUNDING = (2.0**-7 + 2.0**-16) * math.sqrt(SETTINGS.rank)
ELEMENT_BOUNDS = {
    "none": lambda x: torch.zeros_like(x),
    "fp16": lambda x: x.abs() * 2.0**-11 + 2.0**-25,
    "bf16": lambda x: x.abs() * 2.0**-8,
    "int8": bucket_bound(127),
    "int4": bucket_bound(7),
    "topk": lambda x: torch.maximum(  # a value not sent, or a sent one's bfloat16 rounding
        x.abs().flatten().topk(math.ceil(SETTINGS.ratio * x.numel())).values[-1], x.abs() * 2.0**-8
    ),
    "randk": lambda x: x.abs().max().expand(x.shape),
    "sign": lambda x: torch.maximum(x.abs().mean(), x.abs().max() - x.abs().mean()).expand(x.shape),
    "powersgd": lambda x: (x.norm() * (1 + POWERSGD_ROUNDING)).expand(x.shape),
}


@pytest.mark.parametrize("name", CODECS)
def test_each_codec_decodes_within_its_stated_bound(name):
    x = torch.randn(37, 41, generator=generator(1)) * torch.logspace(-3, 2, 41)  # values of very unequal scale
    error = (round_trip(make_codec(name, SETTINGS), x) - x).abs()
    assert bool((error <= ELEMENT_BOUNDS[name](x) * (1 + 1e-5) + 1e-30).all())


def test_sign_and_powersgd_errors_are_what_their_bounds_say():
    x = torch.randn(37, 41, generator=generator(2))
    sign = round_trip(make_codec("sign", SETTINGS), x)
    # ||C(x) - x||^2 = ||x||^2 - ||x||_1^2 / d (Karimireddy et al. 2019)
    assert float((sign - x).norm() ** 2) == pytest.approx(
        float(x.norm() ** 2 - x.abs().sum() ** 2 / x.numel()), rel=1e-4
    )
    low_rank = round_trip(make_codec("powersgd", SETTINGS), x)
    assert (low_rank - x).norm() <= x.norm() * (1 + POWERSGD_ROUNDING)  # a projection of x, rounded
    # the best rank-2 error is a floor no rank-2 decoding beats
    singular = torch.linalg.svdvals(x)
    assert (low_rank - x).norm() >= singular[2:].norm() * (1 - 1e-5)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantisers_are_unbiased_over_2000_seeds(name):
    codec = make_codec(name, SETTINGS)
    x = torch.randn(600, generator=generator(3))  # two buckets, the second partial
    draws = torch.stack([round_trip(codec, x, seed=seed) for seed in range(2000)])
    standard_error = draws.std(dim=0) / math.sqrt(2000)
    # a value on a level has no spread; every other within 5 standard errors (a false alarm ~ 600 * 6e-7)
    assert bool(((draws.mean(dim=0) - x).abs() <= 5 * standard_error + 1e-6).all())
    assert not make_codec(name, SETTINGS).biased


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantisers_scale_a_bucket_of_zeros_or_of_subnormals_without_nan(name):
    codec = make_codec(name, SETTINGS)
    buckets = torch.zeros(3, BUCKET)
    buckets[1, :2] = torch.tensor([1e-40, -5e-41])  # a subnormal scale: L / 1e-40 overflows float32
    magnitudes = codec.magnitudes(buckets, buckets.abs().amax(dim=1))
    assert bool(torch.isfinite(magnitudes).all()) and not magnitudes[[0, 2]].any()
    assert magnitudes[1, 0] == codec.levels and magnitudes[1, 1] == codec.levels / 2
    out = round_trip(codec, buckets)
    assert bool(torch.isfinite(out).all()) and not out[[0, 2]].any() and float(out[1, 0]) > 0


def test_topk_keeps_exactly_the_k_largest_magnitudes():
    x = torch.randn(37, 41, generator=generator(4))
    parts = make_codec("topk", SETTINGS).encode(x, {}, generator())
    k = math.ceil(SETTINGS.ratio * x.numel())
    assert parts["indices"].dtype == torch.int16  # position - INDEX_OFFSET
    positions = (parts["indices"].long() + INDEX_OFFSET).tolist()
    assert set(positions) == set(x.abs().flatten().topk(k).indices.tolist())
    out = torch.zeros_like(x)
    make_codec("topk", SETTINGS).decode_add(parts, out, 1.0)
    kept = out != 0
    assert int(kept.sum()) == k and torch.equal(out[kept], x[kept].bfloat16().float())


def test_randk_sends_exactly_the_values_at_the_positions_its_seed_draws():
    x = torch.randn(37, 41, generator=generator(4))
    codec = make_codec("randk", SETTINGS)
    parts = codec.encode(x, {}, generator())
    positions = codec.positions(int(parts["seed"]), x.numel())
    k = math.ceil(SETTINGS.ratio * x.numel())
    assert positions.numel() == k and torch.unique(positions).numel() == k
    out = torch.zeros_like(x)
    codec.decode_add(parts, out, 1.0)
    kept = torch.zeros(x.numel(), dtype=torch.bool)
    kept[positions] = True
    assert torch.equal(out.view(-1)[kept], x.view(-1)[kept].bfloat16().float()) and not out.view(-1)[~kept].any()


def test_randk_positions_are_the_specified_draw():
    """A test vector of the draw docs/compression.md specifies: a change of the draw fails here (a sender and a
    receiver of different versions would disagree on every position)."""
    assert (hashed(12345, 0), hashed(-1, 7)) == (12457476720137828715, 17750248655755693033)
    assert distinct_positions(12345, 8, 1000).tolist() == [35, 189, 281, 529, 590, 630, 653, 683]
    assert distinct_positions(-7, 5, 5).tolist() == [0, 1, 2, 3, 4]  # k = numel: every position
    huge = distinct_positions(3, 4, 2**40)  # O(k): no permutation of 2^40 positions
    assert huge.numel() == 4 and int(huge.max()) < 2**40


def test_powersgd_of_rank_r_reproduces_a_rank_r_matrix_after_warm_started_rounds():
    torch.manual_seed(5)
    matrix = torch.randn(64, 3) @ torch.randn(3, 144)
    codec, state = make_codec("powersgd", Settings(rank=3)), {}
    rounding = (2.0**-7 + 2.0**-16) * math.sqrt(3) * float(matrix.norm())  # the bfloat16 factors' bound
    errors = [float((round_trip(codec, matrix, state, seed) - matrix).norm()) for seed in range(3)]
    assert errors[-1] <= rounding
    # error feedback sends the rounding later: after n rounds the mean sent misses the matrix by the last
    # residual / n, one round's rounding / n
    compressor = Compressor("powersgd", 0.01, 3, {"w": matrix.shape}, seed=0)
    _, views = flat_views({"w": tuple(matrix.shape)})
    for _ in range(20):
        decode_add(compressor.compress({"w": matrix}), views, 1.0, "powersgd", 0.01, 3)
    assert float((views["w"] / 20 - matrix).norm()) <= rounding / 20


def test_error_feedback_makes_repeated_compression_of_a_fixed_matrix_converge():
    torch.manual_seed(6)
    matrix = torch.randn(64, 144)  # full rank: a rank-2 message alone never reaches it
    compressor = Compressor("powersgd", 0.01, 2, {"w": matrix.shape}, seed=0)
    _, views = flat_views({"w": tuple(matrix.shape)})
    gaps = []
    for rounds in range(1, 201):
        decode_add(compressor.compress({"w": matrix}), views, 1.0, "powersgd", 0.01, 2)
        if rounds in (20, 200):
            gaps.append(float((views["w"] / rounds - matrix).norm() / matrix.norm()))
    assert gaps[1] < gaps[0] / 5 and gaps[1] < 0.15  # the mean of what was sent approaches the matrix


def random_updates(rounds: int, seed: int) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    return [{name: torch.randn(shape) * 10.0 ** (-r % 3) for name, shape in SHAPES.items()} for r in range(rounds)]


@pytest.mark.parametrize("name", BIASED)
def test_error_feedback_conserves_mass_what_was_sent_plus_the_residual_is_every_raw_update(name):
    compressor = Compressor(name, SETTINGS.ratio, SETTINGS.rank, SHAPES, seed=0)
    _, sent = flat_views(SHAPES)
    raw = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in SHAPES.items()}
    for update in random_updates(50, seed=7):
        decode_add(compressor.compress(update), sent, 1.0, name, SETTINGS.ratio, SETTINGS.rank)
        for tensor, value in update.items():
            raw[tensor] += value
    assert compressor.residuals.keys() == compressed_names(SHAPES, name) == {"conv.weight", "odd.weight"}
    for tensor, total in raw.items():
        held = sent[tensor].double() + compressor.residuals.get(tensor, torch.zeros(())).double()
        torch.testing.assert_close(held, total, rtol=0, atol=1e-4 * float(total.abs().max()))


def test_an_update_whose_residual_would_overflow_is_sent_alone_and_later_rounds_stay_finite(caplog):
    compressor = Compressor("topk", SETTINGS.ratio, SETTINGS.rank, SHAPES, seed=0)
    huge = {name: torch.full(shape, 3e38) for name, shape in SHAPES.items()}  # twice it overflows float32
    for _ in range(4):
        entries = compressor.compress(huge)
        assert all(bool(torch.isfinite(tensor).all()) for tensor in entries.values() if tensor.is_floating_point())
        assert all(bool(torch.isfinite(residual).all()) for residual in compressor.residuals.values())
    assert "overflows float32; the residual is dropped" in caplog.text


def test_unbiased_codecs_keep_no_residual_and_reset_forgets_everything():
    assert set(BIASED) == {"fp16", "bf16", "topk", "randk", "sign", "powersgd"}
    quantised = Compressor("int8", 0.01, 2, SHAPES, seed=0)
    quantised.compress(random_updates(1, seed=8)[0])
    assert quantised.residuals == {}
    low_rank = Compressor("powersgd", 0.01, 2, SHAPES, seed=0)
    low_rank.compress(random_updates(1, seed=8)[0])
    assert low_rank.residuals and all(state for state in low_rank.states.values())
    low_rank.reset()
    assert low_rank.residuals == {} and not any(low_rank.states.values())


def test_none_compresses_nothing_and_small_or_one_dimensional_tensors_travel_raw():
    update = random_updates(1, seed=9)[0]
    assert Compressor("none", 0.01, 2, SHAPES, seed=0).compress(update).keys() == SHAPES.keys()
    entries = Compressor("topk", 0.01, 2, SHAPES, seed=0).compress(update)
    assert set(entries) == set(expected(SHAPES, "topk", 0.01, 2)) == {
        "conv.weight:indices", "conv.weight:values", "odd.weight:indices", "odd.weight:values",
        "conv.bias", "fc.weight",
    }  # fmt: skip
    assert torch.equal(entries["fc.weight"], update["fc.weight"]) and math.prod(SHAPES["fc.weight"]) < SMALL
    assert {name: (t.dtype, tuple(t.shape)) for name, t in entries.items()} == expected(SHAPES, "topk", 0.01, 2)


@pytest.mark.parametrize("name", CODECS)
def test_decode_add_accumulates_two_learners_into_one_sum_equal_to_the_sum_of_decodes(name):
    updates = random_updates(2, seed=10)
    payloads = [
        Compressor(name, SETTINGS.ratio, SETTINGS.rank, SHAPES, seed=s).compress(u) for s, u in enumerate(updates)
    ]
    together_flat, together = flat_views(SHAPES)
    together_flat.fill_(1.0)  # accumulates onto what is there
    for payload, weight in zip(payloads, (0.25, 0.75)):
        decode_add(payload, together, weight, name, SETTINGS.ratio, SETTINGS.rank)
    apart = []
    for payload in payloads:
        flat, views = flat_views(SHAPES)
        decode_add(payload, views, 1.0, name, SETTINGS.ratio, SETTINGS.rank)
        apart.append(flat)
    torch.testing.assert_close(together_flat, 1.0 + 0.25 * apart[0] + 0.75 * apart[1])


def replaced(part: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], dict]:
    """A payload with one entry changed."""
    return lambda entries: {**entries, part: change(entries[part].clone())}


def set_first(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor.view(-1)[0] = value
        return tensor

    return change


def without(part: str) -> Callable[[dict], dict]:
    return lambda entries: {name: tensor for name, tensor in entries.items() if name != part}


def with_entry(name: str, tensor: torch.Tensor) -> Callable[[dict], dict]:
    return lambda entries: {**entries, name: tensor}


def or_last(bits: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Set bits in the last byte (where the padding is)."""
    return lambda tensor: torch.cat([tensor[:-1], tensor[-1:] | bits])


def repeat_first_index(tensor: torch.Tensor) -> torch.Tensor:
    tensor[1] = tensor[0]
    return tensor


def bfloat16_zeros(*shape: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda tensor: torch.zeros(shape, dtype=torch.bfloat16)


NUMEL_AS_INT16 = 32 * 16 * 9 - INDEX_OFFSET  # conv.weight's position numel, as its int16 top-k index
HOSTILE = {  # case: (codec, the change, what the refusal says)
    "topk index out of range": ("topk", replaced("conv.weight:indices", set_first(NUMEL_AS_INT16)), "an index outside"),
    "topk top int16 index": ("topk", replaced("odd.weight:indices", set_first(2**15 - 1)), "an index outside"),
    "topk repeated index": ("topk", replaced("odd.weight:indices", repeat_first_index), "a repeated index"),
    "topk NaN value": ("topk", replaced("odd.weight:values", set_first(math.nan)), "NaN or Inf in values"),
    "topk indices as int32": ("topk", replaced("conv.weight:indices", lambda t: t.int()), "torch.int32"),
    "topk values as float32": ("topk", replaced("conv.weight:values", lambda t: t.float()), "torch.float32"),
    "topk one value short": ("topk", replaced("conv.weight:values", lambda t: t[:-1]), r"\(230,\)"),
    "int8 NaN scale": ("int8", replaced("conv.weight:scales", set_first(math.nan)), "NaN or Inf in scales"),
    "int8 infinite scale": ("int8", replaced("odd.weight:scales", set_first(math.inf)), "NaN or Inf in scales"),
    "int8 negative scale": ("int8", replaced("odd.weight:scales", set_first(-1.0)), "a negative scale"),
    "int8 level -128": ("int8", replaced("conv.weight:levels", set_first(-128)), "a level below -127"),
    "int8 levels one short": ("int8", replaced("conv.weight:levels", lambda t: t[:-1]), r"\(4607,\)"),
    "int8 levels as uint8": ("int8", replaced("conv.weight:levels", lambda t: t.to(torch.uint8)), "torch.uint8"),
    "int4 level -8": ("int4", replaced("conv.weight:packed", set_first(0x80)), "a level of -8"),
    "int4 padding nibble": ("int4", replaced("odd.weight:packed", or_last(0xF0)), "a padding nibble"),
    "int4 packed one long": ("int4", replaced("odd.weight:packed", lambda t: torch.cat([t, t[:1]])), r"\(760,\)"),
    "sign infinite scale": ("sign", replaced("conv.weight:scale", set_first(math.inf)), "a scale of inf"),
    "sign padding bit": ("sign", replaced("odd.weight:bits", or_last(0x80)), "a padding bit"),
    "randk infinite value": ("randk", replaced("conv.weight:values", set_first(-math.inf)), "NaN or Inf in values"),
    "fp16 infinite value": ("fp16", replaced("conv.weight:values", set_first(math.inf)), "NaN or Inf in values"),
    "bf16 as fp16": ("bf16", replaced("conv.weight:values", lambda t: t.to(torch.float16)), "torch.float16"),
    "powersgd rank beyond the tensor": ("powersgd", replaced("odd.weight:P", bfloat16_zeros(37, 38)), "37, 38"),
    "powersgd rank 3 for 2": ("powersgd", replaced("conv.weight:Q", bfloat16_zeros(144, 3)), "144, 3"),
    "powersgd factor as float32": ("powersgd", replaced("conv.weight:Q", lambda t: t.float()), "torch.float32"),
    "powersgd NaN factor": ("powersgd", replaced("conv.weight:Q", set_first(math.nan)), "NaN or Inf in Q"),
    "powersgd overflowing product": ("powersgd", replaced("conv.weight:P", set_first(3e38)), "overflows"),
    "raw NaN bias": ("int8", replaced("conv.bias", set_first(math.nan)), "conv.bias: NaN or Inf"),
    "raw bias as float16": ("none", replaced("conv.bias", lambda t: t.half()), "torch.float16"),
    "a missing part": ("powersgd", without("conv.weight:P"), "missing .'conv.weight:P'."),
    "a missing raw entry": ("topk", without("fc.weight"), "missing .'fc.weight'."),
    "an extra entry": ("int8", with_entry("conv.weight:extra", torch.zeros(1)), "unexpected .'conv.weight:extra'."),
    "a raw entry for a compressed tensor": (
        "topk",
        with_entry("conv.weight", torch.zeros(32, 16, 3, 3)),
        "unexpected .'conv.weight'.",
    ),
    "a sparse tensor": ("none", replaced("fc.weight", lambda t: t.to_sparse()), "sparse"),
}


@pytest.mark.parametrize("position", [-1, 300 * 300])
def test_topk_int32_positions_of_a_tensor_above_2_to_the_16_values_are_checked_too(position):
    codec = make_codec("topk", SETTINGS)
    parts = codec.encode(torch.randn(300, 300, generator=generator()), {}, generator())
    assert parts["indices"].dtype == torch.int32 and codec.problem(parts, (300, 300)) is None
    parts["indices"][0] = position
    assert codec.problem(parts, (300, 300)) == "an index outside [0, 90000)"


@pytest.mark.parametrize("case", HOSTILE)
def test_every_hostile_payload_is_refused_without_touching_the_sum(case):
    name, hostile, message = HOSTILE[case]
    entries = Compressor(name, SETTINGS.ratio, SETTINGS.rank, SHAPES, seed=0).compress(random_updates(1, seed=11)[0])
    flat, views = flat_views(SHAPES)
    flat.copy_(torch.randn(flat.shape, generator=generator()))
    before = flat.clone()
    decode_add(entries, views, 1.0, name, SETTINGS.ratio, SETTINGS.rank)  # the unchanged payload is accepted
    assert not torch.equal(flat, before)
    flat.copy_(before)
    with pytest.raises(CompressionError, match=message):
        decode_add(hostile(entries), views, 1.0, name, SETTINGS.ratio, SETTINGS.rank)
    assert torch.equal(flat, before)


def test_a_resnet20_update_uploads_at_least_40_times_fewer_bytes_at_top_1_percent():
    layout = GradientLayout(build_model("resnet20"))
    shapes = {name: shape for name, (_, shape) in layout.spec.items()}
    payload = {codec: payload_bytes(expected(shapes, codec, 0.01, 2)) for codec in CODECS}
    assert payload["none"] == 4 * layout.size  # nothing compressed: the float32 update
    assert payload["fp16"] < payload["none"] / 1.95 and payload["int8"] < payload["none"] / 3.8
    assert payload["int4"] < payload["none"] / 7 and payload["sign"] < payload["none"] / 20
    assert payload["topk"] < payload["none"] / 40 and payload["randk"] < payload["topk"]  # 4 bytes a value, 2
    # rank 2: 2 (m + n) r bytes, and ResNet-20's matrices are small (16 x 144 ...): the raw tensors weigh most
    assert payload["powersgd"] < payload["none"] / 26


def payload_bytes(spec: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for dtype, shape in spec.values())


def test_a_non_finite_update_is_refused_before_any_residual_takes_it_in():
    compressor = Compressor("topk", 0.01, 2, SHAPES, seed=0)
    first, second = random_updates(2, seed=12)
    compressor.compress(first)
    residuals = {name: residual.clone() for name, residual in compressor.residuals.items()}
    second["odd.weight"][3, 4] = math.inf
    with pytest.raises(ValueError, match=r"NaN or Inf in odd\.weight"):
        compressor.compress(second)
    assert all(torch.equal(compressor.residuals[name], residual) for name, residual in residuals.items())


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("zip", SETTINGS, "unknown codec 'zip'"),
        ("topk", Settings(ratio=0.0), "a ratio of 0.0"),
        ("randk", Settings(ratio=1.5), "a ratio of 1.5"),
        ("powersgd", Settings(rank=0), "a rank of 0"),
    ],
)
def test_an_unknown_codec_or_settings_out_of_range_are_refused(name, settings, message):
    with pytest.raises(ValueError, match=message):
        make_codec(name, settings)
