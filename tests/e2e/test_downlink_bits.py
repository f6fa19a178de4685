"""--compress-down's deltas make the same state on any CPU (docs/compression.md, "Limits"): deltas made here,
applied in processes with other BLAS and vector settings, give the same state hash (Codec.add_exact). A
process each: `long`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from federated.core.compression.delta import apply_delta, make_delta, round_generator, state_hash
from federated.core.layout import wire_state
from model import build_model

APPLY_SAVED = """
import sys, torch
from federated.core.compression.delta import apply_delta, state_hash
saved = torch.load(sys.argv[1])
print(" ".join(state_hash(apply_delta(saved["reference"], saved[c], c, 0.01, 4)) for c in ("powersgd", "int8", "sign")))
"""


@pytest.mark.long
@pytest.mark.parametrize("setting", ["MKL_CBWR=AVX2", "MKL_CBWR=COMPATIBLE", "ATEN_CPU_CAPABILITY=default"])
def test_a_delta_makes_the_same_state_under_other_cpu_settings(tmp_path, setting):
    """The same deltas applied in a process with other BLAS or vector settings make the same states (with
    addmm, PowerSGD's hash changed under MKL_CBWR=AVX2 and COMPATIBLE)."""
    torch.manual_seed(0)
    reference = {name: tensor.clone() for name, tensor in wire_state(build_model("resnet20"), torch.float32).items()}
    target = {name: t + torch.randn(t.shape) if t.is_floating_point() else t for name, t in reference.items()}
    deltas = {
        c: make_delta(target, reference, c, 0.01, 4, {}, round_generator(0, 1)) for c in ("powersgd", "int8", "sign")
    }
    torch.save({"reference": reference, **deltas}, tmp_path / "deltas.pt")
    here = " ".join(state_hash(apply_delta(reference, deltas[c], c, 0.01, 4)) for c in deltas)
    key, value = setting.split("=")
    environment = {**os.environ, key: value, "PYTHONPATH": str(Path(__file__).parents[2])}
    there = subprocess.run(
        [sys.executable, "-c", APPLY_SAVED, str(tmp_path / "deltas.pt")],
        env=environment,
        capture_output=True,
        text=True,
    )
    assert there.stdout.strip() == here, there.stderr
