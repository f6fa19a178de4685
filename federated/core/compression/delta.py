"""The model state going down (leader -> learner) as a compressed delta against a reference both sides hold: the
entries a delta carries, their making on the leader, their checks and application (one function for both
sides, so that both references stay bit-identical) and the hash that shows they are.

The tensors a delta compresses are those the uplink would (feedback.compressed_names) among the float32 ones;
every other tensor (biases, norms, BatchNorm statistics, num_batches_tracked) travels whole, in its own dtype,
and replaces the reference's. A delta carries no error-feedback residual: what it leaves out of
target - reference stays in that difference, and a later delta sends it.
"""

import hashlib
from collections.abc import Mapping

import torch

from federated.core.checks import TensorSpec, first_problem, spec_of
from federated.core.compression.codecs import Settings, derived_seed, make_codec
from federated.core.compression.feedback import (
    SMALL,
    Dtypes,
    Shapes,
    compressed_names,
    entries_problem,
    entry_name,
    expected,
    tensor_parts,
)
from federated.core.plan import MAX_DELTA_RANDK_RATIO

Tensors = Mapping[str, torch.Tensor]
HASH_BYTES = 16


def shapes_and_dtypes(spec: TensorSpec) -> tuple[Shapes, Dtypes]:
    """A state's spec as feedback's checks take it: shapes, and dtypes (a delta's whole tensors keep their own)."""
    return {name: shape for name, (_, shape) in spec.items()}, {name: dtype for name, (dtype, _) in spec.items()}


def delta_compressed(spec: TensorSpec, codec_name: str) -> set[str]:
    """The tensors of a state (its spec) that a delta compresses: float32, and what the uplink compresses."""
    shapes, dtypes = shapes_and_dtypes(spec)
    return compressed_names(shapes, codec_name, SMALL, dtypes)


def delta_spec(spec: TensorSpec, codec_name: str, ratio: float, rank: int) -> TensorSpec:
    """Every entry a delta of a state of this spec carries, with its dtype and shape, in the state's order."""
    shapes, dtypes = shapes_and_dtypes(spec)
    return expected(shapes, codec_name, ratio, rank, SMALL, dtypes)


def make_delta(
    target: Tensors,
    reference: Tensors,
    codec_name: str,
    ratio: float,
    rank: int,
    warm: dict[str, dict[str, torch.Tensor]],
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The entries of a delta from reference towards target (same names, shapes and dtypes): encode(target -
    reference) for the compressed tensors, copies of target's tensors whole for the rest (never the caller's
    own: a model that changes after must not change the delta). warm: PowerSGD's warm starts, by tensor, kept by
    the caller from one delta to the next; generator drives the codec's randomness."""
    codec = make_codec(codec_name, Settings(ratio, rank))
    compressed = delta_compressed(spec_of(reference), codec_name)
    entries: dict[str, torch.Tensor] = {}
    for name, tensor in target.items():
        if name in compressed:
            difference = tensor.detach().to("cpu", torch.float32) - reference[name]
            parts = codec.encode(difference.contiguous(), warm.setdefault(name, {}), generator)
            entries.update({entry_name(name, part): part_tensor for part, part_tensor in parts.items()})
        else:
            entries[name] = tensor.detach().to("cpu", copy=True)
    return entries


def delta_problem(entries: Tensors, reference: Tensors, codec_name: str, ratio: float, rank: int) -> str | None:
    """What is wrong with a delta's entries against this reference (names, dtypes and shapes, then values: the
    codec's checks, and every whole float tensor finite), or None."""
    if codec_name == "randk" and ratio > MAX_DELTA_RANDK_RATIO:
        return f"a random-k ratio of {ratio:g}, above {MAX_DELTA_RANDK_RATIO:g} (its positions take too long to draw)"
    shapes, dtypes = shapes_and_dtypes(spec_of(reference))
    return entries_problem(entries, shapes, codec_name, ratio, rank, SMALL, dtypes)


def apply_delta(
    reference: Tensors, entries: Tensors, codec_name: str, ratio: float, rank: int
) -> dict[str, torch.Tensor]:
    """A new state: reference + decode(entries) for the compressed tensors (Codec.add_exact: the same bits on
    every CPU), the whole entries for the rest; copies, the reference untouched. Check the entries first
    (delta_problem)."""
    codec = make_codec(codec_name, Settings(ratio, rank))
    compressed = delta_compressed(spec_of(reference), codec_name)
    state = {name: (tensor if name in compressed else entries[name]).clone() for name, tensor in reference.items()}
    for name in compressed:
        codec.add_exact(tensor_parts(entries, name), state[name])
    return state


def state_problem(state: Tensors) -> str | None:
    """What makes a state unfit to train on (a NaN or Inf, a negative variance), or None."""
    return first_problem(state.items())


def state_hash(state: Tensors) -> str:
    """BLAKE2b of a state's names and tensors' bytes, in order, as hex: equal states, equal hashes."""
    digest = hashlib.blake2b(digest_size=HASH_BYTES)
    for name, tensor in state.items():
        digest.update(name.encode() + b"\0")
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy().data)
    return digest.hexdigest()


def round_generator(seed: int, round_index: int) -> torch.Generator:
    """The generator of a round's delta: a function of the run's seed and the round, so a resumed run makes the
    same deltas."""
    return torch.Generator().manual_seed(derived_seed(seed, round_index))
