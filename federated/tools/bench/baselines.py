"""The baselines of the compute figures: plain PyTorch training steps of ResNet-20, in one process or in
several processes at once (as learners sharing a machine run)."""

import json
import subprocess

import torch
import torch.nn.functional as F

from federated.common import runtime
from federated.core.steps import make_optimizer
from federated.tools.bench.common import child, timed
from model import build_model


def plain_step_seconds(batch: int, threads: int, steps: int, with_optimizer: bool = True) -> list[float]:
    """One plain PyTorch process: forward, backward and SGD step of ResNet-20 on random CIFAR-shaped batches."""
    with runtime.torch_threads(threads):
        torch.manual_seed(0)
        model = build_model("resnet20").train()
        optimizer = make_optimizer(model, 0.05, 0.9, 5e-4)
        images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

        def step() -> None:
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            if with_optimizer:
                optimizer.step()

        return timed(step, steps)


def coscheduled_step_seconds(processes: int, threads: int, steps: int, batch: int = 64) -> list[float]:
    """Step times of `processes` plain processes running at once, as learners sharing a machine do."""
    runs = [
        child("_plain-steps", str(threads), str(steps), str(batch), stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    return [seconds for run in runs for seconds in json.loads(run.communicate(timeout=600)[0])]


def print_plain_steps(threads: int, steps: int, batch: int) -> None:
    """The _plain-steps helper: one process's step times, as JSON on stdout for coscheduled_step_seconds."""
    print(json.dumps(plain_step_seconds(batch, threads, steps)))
