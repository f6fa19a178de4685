"""Image reconstruction by gradient inversion (Geiping et al. 2020, "Inverting Gradients"): find the image whose
gradient, with the label iDLG recovered, points the way the received one does (cosine distance, summed over the
model's parameters), under a total-variation prior; Adam on the image, from noise."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Inversion:
    """The attack's settings (Geiping et al.'s, scaled down to small images)."""

    steps: int = 400
    lr: float = 0.1
    tv_weight: float = 1e-2
    seed: int = 0


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """The mean absolute difference between neighbouring pixels: small for natural images, large for noise."""
    return (image[..., 1:, :] - image[..., :-1, :]).abs().mean() + (image[..., :, 1:] - image[..., :, :-1]).abs().mean()


def cosine_distance(gradients: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """1 - the cosine of the angle between two gradients, each a list of per-parameter tensors."""
    dot = torch.stack([(g * t).sum() for g, t in zip(gradients, target)]).sum()
    squares = (
        torch.stack([g.pow(2).sum() for g in gradients]).sum() * torch.stack([t.pow(2).sum() for t in target]).sum()
    )
    return 1 - dot / squares.sqrt()


def invert(
    model: nn.Module, target: list[torch.Tensor], label: int, shape: tuple[int, ...], settings: Inversion = Inversion()
) -> torch.Tensor:
    """The image (normalised, of shape [1, C, H, W]) whose gradient of the model's loss at `label` best matches
    target (the received gradient of every trainable parameter, in model.parameters() order)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    target = [t.detach().to(torch.float32) for t in target]
    image = torch.randn(shape, generator=torch.Generator().manual_seed(settings.seed)).requires_grad_(True)
    labels = torch.tensor([label])
    optimizer = torch.optim.Adam([image], lr=settings.lr)
    # Geiping et al.'s schedule: the rate divided by 10 at 3/8, 5/8 and 7/8 of the steps
    milestones = [settings.steps * k // 8 for k in (3, 5, 7)]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    model.train()
    for _ in range(settings.steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(image), labels)
        gradients = torch.autograd.grad(loss, parameters, create_graph=True)
        objective = cosine_distance(list(gradients), target) + settings.tv_weight * total_variation(image)
        image.grad = torch.autograd.grad(objective, image)[0].sign()  # signed gradients, as Geiping et al.
        optimizer.step()
        schedule.step()
    return image.detach()
