"""The compression codecs' costs on one ResNet-20 update: the bytes each uploads against float32, and the CPU time
of a learner's compression (with error feedback) and of the leader's checked decoding into its running sum."""

import math

import torch

from federated.core.compression import CODECS, Compressor, decode_add, expected
from federated.core.layout import GradientLayout
from federated.tools.bench.common import spread, timed
from model import build_model

RATIO = 0.01  # top-k's and random-k's share: the top-1 %
RANKS = (2, 4)  # PowerSGD's ranks the issue asks about


def codec_costs(repeats: int) -> dict:
    """Per codec (PowerSGD at each of RANKS): payload bytes, their ratio to float32, and the median of `repeats`
    timings (after a warm-up) of one update's compress() and decode_add(), on one thread."""
    layout = GradientLayout(build_model("resnet20"))
    flat = torch.randn(layout.size, generator=torch.Generator().manual_seed(0))
    flat[layout.parameter_count :].abs_()  # BatchNorm statistics: a running variance is never negative
    update = layout.views(flat)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one learner's core, or the leader's per-learner work, costs
    try:
        rows = {}
        for codec, rank in [(codec, RANKS[0]) for codec in CODECS] + [("powersgd", rank) for rank in RANKS[1:]]:
            label = f"{codec} rank {rank}" if codec == "powersgd" else codec
            rows[label] = codec_row(codec, rank, layout, update, repeats)
    finally:
        torch.set_num_threads(threads)
    return {"value": rows, "values": layout.size, "ratio": RATIO, "threads": 1}


def codec_row(
    codec: str, rank: int, layout: GradientLayout, update: dict[str, torch.Tensor], repeats: int
) -> dict[str, float]:
    """One codec's payload bytes and the median milliseconds of compress() and of decode_add()."""
    shapes = {name: shape for name, (_, shape) in layout.spec.items()}
    spec = expected(shapes, codec, RATIO, rank)
    payload = sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for dtype, shape in spec.values())
    compressor = Compressor(codec, RATIO, rank, shapes, seed=0)
    entries = compressor.compress(update)
    total = layout.views(torch.zeros(layout.size))
    encode_s = timed(lambda: compressor.compress(update), repeats)
    decode_s = timed(lambda: decode_add(entries, total, 0.5, codec, RATIO, rank), repeats)
    return {
        "bytes": payload,
        "ratio": 4 * layout.size / payload,
        "encode_ms": 1000 * spread(encode_s)["median"],
        "decode_ms": 1000 * spread(decode_s)["median"],
    }
