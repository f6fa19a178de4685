"""Compressed updates: codecs for one tensor (codecs.py) and a learner's compression of its update with error
feedback, the entries a payload must carry and their checked decoding into a sum (feedback.py)."""

from federated.core.compression.codecs import (
    BUCKET,
    CODECS,
    QUANTISED,
    SPARSE,
    Codec,
    CompressionError,
    Settings,
    derived_seed,
    make_codec,
)
from federated.core.compression.feedback import (
    SMALL,
    Compressor,
    add_checked,
    compressed_names,
    decode_add,
    expected,
    values_problem,
)

__all__ = [
    "BUCKET",
    "CODECS",
    "QUANTISED",
    "SMALL",
    "SPARSE",
    "Codec",
    "CompressionError",
    "Compressor",
    "Settings",
    "add_checked",
    "compressed_names",
    "decode_add",
    "derived_seed",
    "expected",
    "make_codec",
    "values_problem",
]
