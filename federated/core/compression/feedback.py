"""A learner's compression of its named update tensors, with error feedback for biased codecs, and the wire
entries it makes: what a payload must carry (`expected`) and its checked decoding into a running sum
(`decode_add`), both without any sender's state.

Which tensors are compressed: those of two or more dimensions and at least SMALL values (convolution and
linear weights); biases, norms' weights, BatchNorm's running statistics and anything small travel as raw
float32 under their own name. A compressed tensor NAME travels as entries "NAME:PART" (":" never appears in
a torch parameter name). With the codec "none" nothing is compressed: every entry is the raw tensor.

Error feedback (Karimireddy et al. 2019, EF-SGD): for a biased codec the sender keeps a residual per tensor,
corrected = x + residual, sends encode(corrected), and keeps residual = corrected - decode(sent): nothing the
message leaves out is lost, only sent later, so the sum of what was sent over rounds plus the final residual
is the sum of the raw updates.
"""

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from federated.core.checks import TensorSpec, first_problem
from federated.core.compression.codecs import CompressionError, Settings, make_codec, nonfinite, spec_problem

# Tensors with fewer values travel raw: their bytes are few, and compressing them costs accuracy for next to
# nothing. At 256, ResNet-20's classifier (640 values) was compressed too, and top-k's error feedback under the
# leader's momentum of 0.9 collapsed FedSGD to chance (0.089 after 100 rounds); at 1024 it learns (0.54 after 50).
SMALL = 1024

log = logging.getLogger("learner")  # (a learner compresses)

SEPARATOR = ":"

Shapes = Mapping[str, Sequence[int]]
# each tensor's dtype, where not every one is float32: a state's tensors going down travel whole in their own
Dtypes = Mapping[str, torch.dtype] | None


def compressed_names(names_and_shapes: Shapes, codec_name: str, small: int = SMALL, dtypes: Dtypes = None) -> set[str]:
    """The tensors a codec compresses: two or more dimensions, at least small values and, where dtypes are given
    (a state's tensors, going down), float32 (none for "none")."""
    if codec_name == "none":
        return set()
    return {
        name
        for name, shape in names_and_shapes.items()
        if len(shape) >= 2 and torch.Size(shape).numel() >= small and (dtypes is None or dtypes[name] == torch.float32)
    }


def entry_name(name: str, part: str) -> str:
    """The wire entry of one part of a compressed tensor."""
    return f"{name}{SEPARATOR}{part}"


def expected(
    names_and_shapes: Shapes, codec_name: str, ratio: float, rank: int, small: int = SMALL, dtypes: Dtypes = None
) -> TensorSpec:
    """Every entry a payload of these tensors must carry, exactly, with its dtype and shape, in order: the
    receiver's check of a payload's header before it reads a value (and the bound on its size). A tensor sent
    whole is float32, or its dtype in dtypes where given."""
    codec = make_codec(codec_name, Settings(ratio, rank))
    compressed = compressed_names(names_and_shapes, codec_name, small, dtypes)
    spec: TensorSpec = {}
    for name, shape in names_and_shapes.items():
        if name in compressed:
            spec.update({entry_name(name, part): part_spec for part, part_spec in codec.parts(tuple(shape)).items()})
        else:
            spec[name] = (torch.float32 if dtypes is None else dtypes[name], tuple(shape))
    return spec


def decode_add(
    entries: Mapping[str, torch.Tensor],
    out_views: Mapping[str, torch.Tensor],
    weight: float,
    codec_name: str,
    ratio: float,
    rank: int,
    small: int = SMALL,
) -> None:
    """out_views[NAME] += weight * decode(NAME's entries) for every tensor, in place (top-k and random-k
    scatter-add, PowerSGD adds P Q^T, none copies nothing). Every entry is checked first (names, dtypes,
    shapes, values); on anything wrong it raises CompressionError, saying what, and writes nothing."""
    shapes = {name: tuple(view.shape) for name, view in out_views.items()}
    problem = entries_problem(entries, shapes, codec_name, ratio, rank, small)
    if problem is not None:
        raise CompressionError(problem)
    add_checked(entries, out_views, weight, codec_name, ratio, rank, small)


def add_checked(
    entries: Mapping[str, torch.Tensor],
    out_views: Mapping[str, torch.Tensor],
    weight: float,
    codec_name: str,
    ratio: float,
    rank: int,
    small: int = SMALL,
) -> None:
    """decode_add for entries already checked (entries_problem, or the spec then values_problem): no check."""
    codec = make_codec(codec_name, Settings(ratio, rank))
    compressed = compressed_names({name: tuple(view.shape) for name, view in out_views.items()}, codec_name, small)
    for name, view in out_views.items():
        if name in compressed:
            codec.add(tensor_parts(entries, name), view, weight)
        else:
            view.add_(entries[name].to(view.device, view.dtype), alpha=weight)


def entries_problem(
    entries: Mapping[str, torch.Tensor],
    shapes: Shapes,
    codec_name: str,
    ratio: float,
    rank: int,
    small: int,
    dtypes: Dtypes = None,
) -> str | None:
    """What is wrong with a payload's entries for tensors of these shapes (and dtypes: see expected): names, then
    every entry's dtype and shape, then values; or None."""
    problem = spec_problem(entries, expected(shapes, codec_name, ratio, rank, small, dtypes))
    if problem is not None:
        return f"entries: {problem}"
    return values_problem(entries, shapes, codec_name, ratio, rank, small, dtypes)


def values_problem(
    entries: Mapping[str, torch.Tensor],
    shapes: Shapes,
    codec_name: str,
    ratio: float,
    rank: int,
    small: int = SMALL,
    dtypes: Dtypes = None,
) -> str | None:
    """What is wrong with the values of entries whose names, dtypes and shapes are known right (every float
    finite, indices, scales, packed levels), or None: one scan of every entry."""
    codec = make_codec(codec_name, Settings(ratio, rank))
    compressed = compressed_names(shapes, codec_name, small, dtypes)
    for name, shape in shapes.items():
        if name in compressed:
            problem = codec.value_problem(tensor_parts(entries, name), math.prod(shape))
        else:
            problem = nonfinite(entries[name], "values")
        if problem is not None:
            return f"{name}: {problem}"
    return None


def tensor_parts(entries: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """A compressed tensor's parts, by part name, from its "NAME:PART" entries."""
    prefix = entry_name(name, "")
    return {key[len(prefix) :]: tensor for key, tensor in entries.items() if key.startswith(prefix)}


class Compressor:
    """A learner's compression of its update tensors, round after round, with an error-feedback residual per
    compressed tensor for a biased codec and PowerSGD's warm-start factors."""

    def __init__(
        self,
        codec_name: str,
        ratio: float,
        rank: int,
        names_and_shapes: Shapes,
        small: int = SMALL,
        *,
        seed: int,
    ) -> None:
        self.codec = make_codec(codec_name, Settings(ratio, rank))
        self.shapes = {name: tuple(shape) for name, shape in names_and_shapes.items()}
        self.compressed = compressed_names(self.shapes, codec_name, small)
        self.generator = torch.Generator().manual_seed(seed)
        self.residuals: dict[str, torch.Tensor] = {}
        self.states: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.compressed}

    def reset(self) -> None:
        """Forget every residual and warm start (a restarted learner starts from zero)."""
        self.residuals.clear()
        for state in self.states.values():
            state.clear()

    def forget_residuals(self, names: Sequence[str]) -> None:
        """Forget these tensors' residuals (SCAFFOLD's control change, when the learner drops it): what they held
        is never sent."""
        for name in names:
            self.residuals.pop(name, None)

    def corrected(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """values + the tensor's residual; values alone, the residual dropped, when the sum is not finite (two
        finite float32s can overflow: sending Inf would get the update refused, round after round)."""
        residual = self.residuals.get(name)
        if residual is None:
            return values
        corrected = values + residual
        if nonfinite(corrected, name) is not None:
            log.warning(
                "%s: the update plus its error-feedback residual overflows float32; the residual is dropped", name
            )
            del self.residuals[name]
            return values
        return corrected

    def compress(self, named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The wire entries of one round's update tensors (all of those the compressor was made for, by name):
        raw float32 under NAME (the caller's own tensor when it is float32 on the CPU: no copy), compressed as
        "NAME:PART"; the residuals take in what is left out. ValueError, changing nothing, on a NaN or Inf (or
        a negative running variance)."""
        if set(named) != set(self.shapes):
            raise ValueError(f"compress() takes exactly the tensors {sorted(self.shapes)[:3]}...")
        problem = first_problem(named.items())
        if problem is not None:  # checked before any residual takes it in: one NaN would poison every later round
            raise ValueError(f"cannot compress {problem}")
        entries: dict[str, torch.Tensor] = {}
        for name, tensor in named.items():
            values = tensor.detach().to("cpu", torch.float32)
            if name not in self.compressed:
                entries[name] = values
                continue
            if self.codec.biased:
                values = self.corrected(name, values)
            parts = self.codec.encode(values, self.states[name], self.generator)
            if self.codec.biased:
                residual = values.clone()
                self.codec.add(parts, residual, -1.0)
                self.residuals[name] = residual
            entries.update({entry_name(name, part): tensor for part, tensor in parts.items()})
        return entries
