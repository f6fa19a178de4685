"""What a curious leader makes of what it receives, learner by learner: each one's label (iDLG) and image
(gradient inversion), from plain updates or from masked inputs under secure aggregation."""

import itertools
from collections.abc import Iterator

import torch

from federated.tools.curious.inversion import Inversion, invert
from federated.tools.curious.labels import OUTPUT_WEIGHT, recover_label
from federated.tools.curious.observed import Learners, masked_inputs


def plain_updates(learners: Learners, indices: list[int]) -> list[torch.Tensor]:
    """The flat update the leader decodes from each learner, the learner holding image indices[k] being k + 1."""
    return [learners.flat(learners.update(index, slot + 1)) for slot, index in enumerate(indices)]


def masked_updates(plain: list[torch.Tensor], per_round: int) -> list[torch.Tensor]:
    """The masked input the leader receives instead of each of these plain updates under secure aggregation, in
    secure rounds of per_round learners (a few rounds one more, so that none is left with fewer)."""
    rounds = max(1, len(plain) // per_round)
    bounds = [len(plain) * k // rounds for k in range(rounds + 1)]
    return [masked for start, end in itertools.pairwise(bounds) for masked in _round(plain[start:end])]


def _round(updates: list[torch.Tensor]) -> list[torch.Tensor]:
    """One secure round's masked inputs, as the leader would read them: the int32 values as numbers."""
    masked, _ = masked_inputs(updates)
    return [vector.to(torch.float64) for vector in masked]


def labels_of(learners: Learners, received: list[torch.Tensor]) -> list[int]:
    """The label iDLG reads off each received vector (its output layer's place in the update's layout)."""
    return [recover_label(learners.views(vector)[OUTPUT_WEIGHT]) for vector in received]


def images_of(learners: Learners, received: list[torch.Tensor], settings: Inversion) -> Iterator[torch.Tensor]:
    """The image gradient inversion makes of each received vector, with the label iDLG reads off it."""
    shape = tuple(learners.batch(0)[0].shape)
    names = [name for name, _ in learners.replica.layout.parameters]
    for vector in received:
        views = learners.views(vector)
        yield invert(
            learners.global_model, [views[name] for name in names], recover_label(views[OUTPUT_WEIGHT]), shape, settings
        )
