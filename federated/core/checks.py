"""Checks of tensor values that both sides make of what they receive or compute: finite, and variances that
are variances. Fast passes at memory speed, and a slower one that names the first culprit."""

import math
from collections.abc import Iterable, Mapping

import torch

# The names, dtypes and shapes a payload must hold, in order (what codec.check_layout compares against)
TensorSpec = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def spec_of(tensors: Mapping[str, torch.Tensor], float_dtype: torch.dtype | None = None) -> TensorSpec:
    """The names, dtypes and shapes a payload must match, taken from reference tensors
    (floating-point ones travel as float_dtype, if given)."""
    return {
        name: (float_dtype if float_dtype and tensor.is_floating_point() else tensor.dtype, tuple(tensor.shape))
        for name, tensor in tensors.items()
    }


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite."""
    # A sum is finite unless an element is NaN or Inf (or finite values overflow): a fast test
    # at memory speed, confirmed element by element only when it fails. isfinite() is 20x slower.
    return math.isfinite(tensor.sum(dtype=torch.float32).item()) or bool(torch.isfinite(tensor).all())


def problem_in(named: Mapping[str, torch.Tensor], flat: torch.Tensor) -> str | None:
    """'NaN or Inf in NAME' or 'a negative variance in NAME' for the first such tensor of named (also given
    as one flat vector, checked in one pass), else None."""
    variances = [tensor for name, tensor in named.items() if name.endswith("running_var")]
    if all_finite(flat) and not any_negative(variances):
        return None
    return first_problem(named.items())


def any_negative(tensors: list[torch.Tensor]) -> bool:
    """Whether any element of the tensors is negative (one pass over them all)."""
    return bool(tensors) and torch.cat([tensor.reshape(-1) for tensor in tensors]).min().item() < 0


def first_problem(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """'NaN or Inf in NAME' or 'a negative variance in NAME' for the first such tensor, else None."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not all_finite(tensor):
            return f"NaN or Inf in {name}"
        if name.endswith("running_var") and tensor.numel() and tensor.min() < 0:
            return f"a negative variance in {name}"
    return None
