"""A curious leader (federated/tools/curious): from plain FedSGD updates of one image each, made by the learner's own
code path and decoded as the leader decodes them, it recovers every label; from the same learners' masked inputs
under secure aggregation, nothing above chance; from the sum of three learners' updates, not whose label was whose."""

import math

import pytest
import torch

import utils
from federated.tools.curious.labels import OUTPUT_WEIGHT, labels_present
from federated.tools.curious.observed import CLIP_RANGE, Learners, masked_inputs, quantisation
from federated.tools.curious.trials import labels_of, masked_updates, plain_updates

TRIALS = 50
FALSE_ALARM = 1e-6  # the chance that a leader that guesses at random passes the bound: the test is not flaky


def above_chance(trials: int, chance: float, false_alarm: float = FALSE_ALARM) -> int:
    """The fewest right guesses out of `trials` that a guesser right with probability `chance` reaches with
    probability at most false_alarm (the binomial distribution's upper tail)."""
    tail = 0.0
    for right in range(trials, -1, -1):
        tail += math.comb(trials, right) * chance**right * (1 - chance) ** (trials - right)
        if tail > false_alarm:
            return right + 1
    return 0


@pytest.fixture(scope="module")
def digits() -> utils.ImageSet:
    return utils.load_dataset("digits", "", True, 8)


@pytest.fixture(scope="module")
def learners(digits: utils.ImageSet) -> Learners:
    return Learners(digits, "batch")  # the project's default norm: the labels need no --norm group


def test_the_binomial_bound_is_the_upper_tail():
    assert above_chance(50, 0.1) == 18  # P(X >= 18) = 7.6e-7, P(X >= 17) = 3.8e-6
    assert above_chance(10, 0.5, 0.5) == 6


def test_a_curious_leader_recovers_every_label_from_plain_updates_and_none_above_chance_from_masked_inputs(
    digits, learners
):
    indices = list(range(TRIALS))
    truth = digits.labels[indices].tolist()
    plain = plain_updates(learners, indices)
    right_plain = sum(guess == label for guess, label in zip(labels_of(learners, plain), truth))
    right_masked = sum(guess == label for guess, label in zip(labels_of(learners, masked_updates(plain, 3)), truth))
    bound = above_chance(TRIALS, 1 / digits.num_classes)
    assert right_plain == TRIALS
    assert right_plain >= bound  # the bound below catches a leader that learns the labels
    assert right_masked < bound


def test_from_a_sum_of_three_learners_updates_the_leader_cannot_tell_whose_label_was_whose(learners, digits):
    labels = digits.labels.tolist()
    images = [labels.index(label) for label in (3, 5, 8)]  # one image of each of three labels
    moved = images[1:] + images[:1]  # the same images, each held by another learner
    one, other = plain_updates(learners, images), plain_updates(learners, moved)
    # what each learner sent tells its label: the leader knows learner 1's is 3, not 5
    assert labels_of(learners, one)[0] == 3 and labels_of(learners, other)[0] == 5
    # the mean a secure round unmasks, all the leader learns of it, is the same whoever held which image (within
    # each learner's rounding to integers, and float32's): it says which labels the round had, not whose they were
    (_, mean), (_, mean_moved) = masked_inputs(one), masked_inputs(other)
    rounding = CLIP_RANGE / quantisation(3).scale  # each learner's, in the mean of three
    assert torch.allclose(mean, mean_moved, rtol=1e-6, atol=2 * rounding)
    assert torch.allclose(mean, torch.stack(one).mean(0), rtol=1e-6, atol=rounding)
    assert labels_present(learners.views(mean)[OUTPUT_WEIGHT]) == {3, 5, 8}
