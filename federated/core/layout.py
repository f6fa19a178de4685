"""Where each gradient, running statistic and control variate of a model sits in one flat update vector, and a
model's state as it travels.

No gRPC here. An update is one flat float32 vector: every trainable parameter's gradient (or, for local
training, its pseudo-gradient) followed by every running statistic (BatchNorm's mean and variance) and,
for SCAFFOLD, the control variate's change, so that the leader can average them all with one in-place add
per learner. On the wire the gradients may be float16 or bfloat16; the statistics are always float32.
"""

import math
from collections.abc import Mapping

import torch
from torch import nn

from federated.core.checks import TensorSpec, any_negative, first_problem

# BatchNorm statistics travel in float32 whatever the wire dtype: in bfloat16 a small change to a running
# variance near 1.0 would round away entirely.
STATISTICS_DTYPE = torch.float32

# The buffers that training changes, and so an update carries. A model's other float buffers are constants
# (Swin V2's relative_coords_table) that travel in the state alone: averaged with the statistics, they would
# drift, since a weighted mean of equal float32 values is not always that value (22% of entries move by one
# ulp a round over five learners of unequal batches).
RUNNING_STATISTICS = ("running_mean", "running_var")


class GradientLayout:
    """Where each parameter gradient and running statistic of a model sits in one flat float32 vector."""

    def __init__(self, model: nn.Module, wire_dtype: torch.dtype = torch.float32, controls: bool = False) -> None:
        self.parameters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.buffers = [
            (name, b)
            for name, b in model.named_buffers()
            if b.is_floating_point() and name.rsplit(".", 1)[-1] in RUNNING_STATISTICS
        ]
        self.counters = [b for name, b in model.named_buffers() if name.endswith("num_batches_tracked")]
        self.variances = [name for name, _ in self.buffers if name.endswith("running_var")]
        self.parameter_count = sum(p.numel() for _, p in self.parameters)
        self.statistics_count = sum(b.numel() for _, b in self.buffers)
        self.size = self.parameter_count + self.statistics_count + (self.parameter_count if controls else 0)
        self.wire_dtype = wire_dtype
        self.spec: TensorSpec = {  # what an update payload must hold, in order
            **{name: (wire_dtype, tuple(p.shape)) for name, p in self.parameters},
            **{name: (STATISTICS_DTYPE, tuple(b.shape)) for name, b in self.buffers},
            **(
                {control_name(name): (STATISTICS_DTYPE, tuple(p.shape)) for name, p in self.parameters}
                if controls
                else {}
            ),
        }

    @property
    def statistics(self) -> tuple[int, int]:
        """Where BatchNorm's running statistics sit: (start, stop)."""
        return self.parameter_count, self.parameter_count + self.statistics_count

    @property
    def controls(self) -> slice:
        """Where SCAFFOLD's control variates sit (an empty slice without them)."""
        return slice(self.parameter_count + self.statistics_count, self.size)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of an update by name, with its shape, in layout order (what core/compression codes)."""
        return {name: shape for name, (_, shape) in self.spec.items()}

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into a flat vector, in layout order."""
        shapes = [shape for _, shape in self.spec.values()]
        pieces = flat.split([math.prod(shape) for shape in shapes])
        return {name: piece.view(shape) for name, piece, shape in zip(self.spec, pieces, shapes)}

    def wire_tensors(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector's tensors as they travel, on the CPU: parameter gradients in the wire dtype, statistics
        in float32 (no copy of a float32 vector on the CPU)."""
        views = self.views(flat.to("cpu"))
        return {name: views[name].to(dtype) for name, (dtype, _) in self.spec.items()}

    def update_problem(self, tensors: Mapping[str, torch.Tensor]) -> str | None:
        """Why an update cannot be averaged, or None: its BatchNorm variances must be non-negative (its values
        must already be known finite, as codec.check_matches makes sure): a weighted mean of them must be a variance."""
        if any_negative([tensors[name] for name in self.variances]):
            return f"the update holds {first_problem((name, tensors[name]) for name in self.variances)}"
        return None

    def bind_gradients(self, flat: torch.Tensor) -> None:
        """Make every parameter's .grad a view into flat, so backward() and step() use it in place."""
        views = self.views(flat)
        for name, parameter in self.parameters:
            parameter.grad = views[name]

    def read_buffers(self, flat: torch.Tensor) -> None:
        """Copy the model's running statistics into the tail of flat."""
        views = self.views(flat)
        for name, buffer in self.buffers:
            views[name].copy_(buffer)

    def write_buffers(self, flat: torch.Tensor, batches: int = 1) -> None:
        """Copy the statistics part of flat into the model's running statistics and count the batches they saw."""
        views = self.views(flat)
        with torch.no_grad():
            for name, buffer in self.buffers:
                buffer.copy_(views[name])
            for counter in self.counters:
                counter += batches


def control_name(parameter: str) -> str:
    """The name under which a parameter's SCAFFOLD control variate travels."""
    return f"control.{parameter}"


def wire_state(
    model: nn.Module, wire_dtype: torch.dtype, control: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """A model's state_dict as it travels: parameters in the wire dtype, buffers (BatchNorm statistics,
    batch counters) as they are (no copy for float32); with SCAFFOLD, then the server's control variate
    (a flat vector over the trainable parameters) in float32."""
    parameters = {name for name, _ in model.named_parameters()}
    state = {
        name: tensor.to(wire_dtype) if name in parameters else tensor for name, tensor in model.state_dict().items()
    }
    if control is not None:
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        pieces = control.split([p.numel() for _, p in trainable])
        state.update({control_name(name): piece.view(p.shape) for (name, p), piece in zip(trainable, pieces)})
    return state
