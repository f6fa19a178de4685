"""Secure aggregation's parts: Shamir's sharing, the quantisation and its bounds, the discrete Gaussian noise."""

import itertools
import math
import os

import numpy as np
import pytest
import scipy.stats
import sympy
import torch

from federated.privacy import discrete_gaussian, masks, shamir
from federated.privacy.secagg import Quantisation, Refused


def test_any_threshold_shares_reconstruct_the_secret_and_fewer_do_not():
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, [0, 2, 5, 6, 9])
    for holders in itertools.combinations(shares, 3):
        assert shamir.combine({holder: shares[holder] for holder in holders}) == secret
    for holders in itertools.combinations(shares, 2):
        try:  # a random field element: beyond 32 bytes but for 1 / 256
            assert shamir.combine({holder: shares[holder] for holder in holders}) != secret
        except shamir.MalformedShare:
            pass


def test_the_field_is_prime_and_holds_every_secret():
    assert sympy.isprime(shamir.PRIME)
    assert 2 ** (8 * shamir.SECRET_BYTES) < shamir.PRIME < 2 ** (8 * shamir.SHARE_BYTES)


def test_fewer_than_threshold_shares_are_uniform_whatever_the_secret():
    """Information-theoretic: over a small field, any t - 1 shares are jointly uniform for every secret, so they
    are consistent with any secret (a sharing with a fixed or secret-dependent coefficient fails)."""
    prime = 17
    for secret in (bytes(32), bytes(31) + b"\x07"):
        pairs = []
        for _ in range(6000):
            shares = shamir.split(secret, 3, [0, 1, 2], prime)
            pairs.append(shamir.decode(shares[0], prime) * prime + shamir.decode(shares[2], prime))
        assert scipy.stats.chisquare(np.bincount(pairs, minlength=prime**2)).pvalue > 1e-6


@pytest.mark.parametrize("share", [bytes(32), bytes(34), b"\xff" * 33])
def test_a_share_is_parsed_strictly(share):
    with pytest.raises(shamir.MalformedShare):
        shamir.decode(share)


def test_a_ciphertext_decrypts_only_for_its_round_sender_and_recipient():
    key = os.urandom(32)
    ciphertext = masks.encrypt(key, 4, 1, 2, b"shares")
    assert masks.decrypt(key, 4, 1, 2, ciphertext) == b"shares"
    for round_index, sender, recipient in [(3, 1, 2), (4, 2, 1), (4, 1, 3)]:
        with pytest.raises(masks.Undecryptable):
            masks.decrypt(key, round_index, sender, recipient, ciphertext)


def test_the_quantisation_is_unbiased_and_leaves_room_for_every_summand_and_the_noise():
    quantisation = Quantisation(clip_range=1.0, weight_unit=10.0, summands=10, noise_std=0.01)
    most = quantisation.summands * (quantisation.scale + 1) + 10 * math.sqrt(10) * quantisation.noise_sigma
    assert most <= 2**30
    value = torch.full((20000,), 0.3, dtype=torch.float64)
    plain = Quantisation(clip_range=1.0, weight_unit=10.0, summands=10)
    rounded = plain.quantise(value, 10.0, 0.0, torch.Generator().manual_seed(0))[:-2].double()
    assert rounded.mean() / plain.scale == pytest.approx(0.3, abs=1e-9)
    assert set(rounded.unique().tolist()) == {math.floor(0.3 * plain.scale), math.ceil(0.3 * plain.scale)}


def test_an_input_beyond_the_clip_range_is_refused_when_dequantised():
    quantisation = Quantisation(clip_range=1.0, weight_unit=10.0, summands=3)
    honest = quantisation.quantise(torch.ones(5), 10.0, 1.0, torch.Generator())
    dishonest = honest.clone()
    dishonest[0] = 2**31 - 5  # an input beyond its clip range, within 32 bits
    total = honest * 2 + dishonest
    with pytest.raises(Refused, match="beyond"):
        quantisation.dequantise(total % 2**32)
    mean, weight, loss = quantisation.dequantise(honest * 3 % 2**32)
    assert (mean.tolist(), weight, loss) == (pytest.approx([1.0] * 5), pytest.approx(30.0), pytest.approx(1.0))


def test_the_noise_is_the_discrete_gaussian_not_a_rounded_continuous_one():
    """At sigma 0.5 the two differ: P(0) is 0.787 for the discrete Gaussian, 0.683 for a rounded one."""
    sigma = 0.5
    draws = discrete_gaussian.sample(sigma, 40000, torch.Generator().manual_seed(1))
    support = np.arange(-3, 4)
    mass = np.exp(-(support**2) / (2 * sigma**2))
    expected = mass / mass.sum() * draws.numel()
    observed = np.array([(draws == k).sum().item() for k in support])
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-6
    wide = discrete_gaussian.sample(300.0, 40000, torch.Generator().manual_seed(2)).double()
    assert wide.std().item() == pytest.approx(300.0, rel=0.03)
    assert wide.mean().abs().item() < 5 * 300 / math.sqrt(40000)


@pytest.mark.parametrize(
    ("update", "weight", "loss"),
    [
        (torch.tensor([0.0, float("nan")]), 1.0, 0.0),
        (torch.tensor([0.0, float("inf")]), 1.0, 0.0),
        (torch.zeros(2), 1.0, float("nan")),
        (torch.zeros(2), 10.5, 0.0),
        (torch.zeros(2), -1.0, 0.0),
    ],
)
def test_a_non_finite_update_or_a_weight_beyond_the_unit_is_not_quantised(update, weight, loss):
    with pytest.raises(ValueError, match=r"non-finite|beyond"):
        Quantisation(clip_range=1.0, weight_unit=10.0, summands=3).quantise(update, weight, loss, torch.Generator())
