"""--compress int8/int4 under secure aggregation: the quantised integers are what is masked, in the narrowest ring
that holds the round's sum (privacy/secagg.py's Quantisation.levels and Ring), and the leader's flag checks."""

import dataclasses
import hashlib
import math
import os

import numpy as np
import pytest
import torch

from federated.core import compression, strategies
from federated.leader.config import secure_compression_caveats
from federated.leader.data import DataFacts
from federated.leader.planner import Planner
from federated.leader.secure import SecureRounds
from federated.privacy import secagg
from federated.privacy.secagg import BITS, Quantisation, Refused
from federated.wire import codec, messages
from tests.support.live import leader_config
from tests.unit.test_secagg import Round
from tests.unit.test_secure_rounds import FakeClient

INT8, INT4 = compression.QUANTISED["int8"], compression.QUANTISED["int4"]
SIZE = 64
WIDE = 8  # values kept at the full scale (BatchNorm's statistics, in a model's update)


def largest_summands(levels: int, bits: int) -> int:
    """The most inputs whose sum a ring of `bits` holds, by Quantisation's own choice (searched, not derived)."""
    summands = 1
    while Quantisation(1.0, 1.0, summands + 1, levels=levels).bits <= bits:
        summands += 1
    return summands


def test_the_ring_is_the_narrowest_whose_twos_complement_holds_the_refusal_bound_and_one_more():
    # dequantise takes up to n (levels + 2): int4 9 n < 127 up to n = 14; int8 129 n < 32767 up to n = 254
    assert largest_summands(INT4, 8) == 14 and Quantisation(1.0, 1.0, 15, levels=INT4).bits == 16
    assert largest_summands(INT8, 16) == 254 and Quantisation(1.0, 1.0, 255, levels=INT8).bits == BITS
    assert Quantisation(1.0, 1.0, 3, levels=INT8).bits == 16
    assert Quantisation(1.0, 1.0, 3).bits == BITS == Quantisation(1.0, 1.0, 3, noise_std=0.5).bits
    with pytest.raises(ValueError, match="not to its rounding to a few levels"):  # distributed DP: none with levels
        Quantisation(1.0, 1.0, 4, noise_std=0.1, levels=INT4)


@pytest.mark.parametrize(("levels", "bits"), [(INT4, 8), (INT8, 16)])
def test_at_the_largest_summands_a_ring_allows_the_most_positive_residue_is_still_refused(levels, bits):
    """At a ring's edge the refusal can fire: the largest value its two's complement holds is beyond the bound."""
    summands = largest_summands(levels, bits)
    quantisation = Quantisation(1.0, 1.0, summands, levels=levels)
    ring, weight = quantisation.ring(2), round(summands * quantisation.full_scale)
    quantisation.dequantise(ring.integers(ring.residues(np.array([summands * (levels + 2), 0, weight, 0]))), summands)
    beyond = ring.integers(ring.residues(np.array([2 ** (bits - 1) - 1, 0, weight, 0])))
    with pytest.raises(Refused, match="beyond what clipped inputs make"):
        quantisation.dequantise(beyond, summands)


def test_a_sum_weighing_less_than_its_inputs_least_weight_is_refused_not_magnified():
    """The review's numbers: int8, 3 inputs, a total weight of 1 (a hostile weight element cancelling the honest
    ones) and values of +-6, within the rounding's slack: without the floor the mean is +-1.7e7 clip ranges."""
    quantisation = Quantisation(1.0, 1.0, 3, levels=INT8, least_weight=1.0)
    ring = quantisation.ring(2)
    hostile = ring.integers(ring.residues(np.array([6, -6, 1, 0])))
    with pytest.raises(Refused, match="weight"):
        quantisation.dequantise(hostile, 3)
    unfloored, _, _ = dataclasses.replace(quantisation, least_weight=0.0).dequantise(hostile, 3)
    assert unfloored.abs().min() > 1e7  # what the floor prevents


@pytest.mark.parametrize("levels", [INT4, INT8])
def test_honest_inputs_of_the_least_weight_pass_and_the_floor_caps_the_mean(levels):
    """--local-steps-per learner's unit (4 typical learners of 14 batches of 32: 1,792 images) and its least honest
    weight (a learner of one image: one a step, one step): three such learners' sums pass, whatever their rounding;
    a hostile sum at the floor with values at the bound gives at most R (1 + 2 unit / (levels least))."""
    quantisation = Quantisation(1.0, 1792.0, 3, levels=levels, least_weight=1.0)
    ring = quantisation.ring(8)
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        total = sum(quantisation.quantise(torch.randn(8, generator=generator), 1.0, 0.5, generator) for _ in range(3))
        quantisation.dequantise(ring.integers(ring.residues(total.numpy())), 3)
    weight = math.floor(3 * (quantisation.full_scale / 1792.0 - 1)) + 1  # the least the floor takes
    most = math.floor(weight * levels / quantisation.full_scale + 6)  # the bound on the values
    mean, _, _ = quantisation.dequantise(ring.integers(ring.residues(np.array([most] * 8 + [weight, 0]))), 3)
    assert 1.0 < mean.max() <= 1.0 + 2 * 1792.0 / levels + 1e-3


@pytest.mark.parametrize(("levels", "bits"), [(INT4, 8), (INT8, 16)])
def test_masked_sums_at_the_largest_summands_a_ring_allows_unmask_to_the_sum_of_the_quantised_values(levels, bits):
    """Every input at the clip range (and one at its negative), the extremes of the sum: each learner's
    integers plus its mask modulo the ring, summed, the masks taken off, read back exactly; the last WIDE values
    (BatchNorm's statistics) at the full scale in the 32-bit part, clipped to WIDE_RANGE only."""
    summands = largest_summands(levels, bits)
    quantisation = Quantisation(2.0, 10.0, summands, levels=levels, wide=(SIZE - WIDE, SIZE))
    ring = quantisation.ring(SIZE)
    assert ring.bits == bits
    assert ring.spec == {
        secagg.MASKED_TENSOR: (secagg.WIRE_DTYPES[bits], (SIZE - WIDE,)),
        secagg.MASKED_EXTRAS: (torch.int32, (WIDE + 2,)),
    }
    generator = torch.Generator().manual_seed(levels)
    updates = [torch.randn(SIZE, generator=generator) for _ in range(summands)]
    for update in updates:
        update[:2] = torch.tensor([5.0, -5.0])  # beyond the clip range: every input's +-levels there
        update[SIZE - WIDE :] += 10.0  # a running variance: beyond the levels' clip range, within WIDE_RANGE
    quantised = [quantisation.quantise(update, 10.0, 0.5, generator) for update in updates]
    keys = [os.urandom(32) for _ in updates]
    total = ring.zeros()
    for integers, key in zip(quantised, keys):
        masked = ring.residues(integers.numpy())
        ring.add(masked, ring.mask(key))
        assert {name: (t.dtype, tuple(t.shape)) for name, t in ring.tensors(masked).items()} == ring.spec
        ring.add_tensors(total, ring.tensors(masked))  # through the wire's tensors, as the leader takes them
    for key in keys:
        ring.add(total, ring.mask(key), -1)
    unmasked = ring.integers(total)
    expected = torch.stack(quantised).sum(dim=0)
    signed = ring.signed(unmasked.numpy())
    assert np.array_equal(signed, expected.numpy())
    assert signed[:2].tolist() == [summands * levels, -summands * levels]  # the extremes, exactly
    assert np.abs(signed[SIZE - WIDE : SIZE]).max() > 2**bits  # the wide values: beyond the narrow ring
    mean, weight, loss = quantisation.dequantise(unmasked, summands)
    assert mean[:2].tolist() == pytest.approx([2.0, -2.0], rel=1e-6)
    plain = torch.stack(updates)[:, SIZE - WIDE :].mean(dim=0)
    assert torch.allclose(mean[SIZE - WIDE :], plain, atol=1e-4)  # unclipped, at the full scale's precision
    assert weight == pytest.approx(10.0 * summands) and loss == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("levels", [INT4, INT8])
def test_the_levels_are_unbiased_over_seeds(levels):
    quantisation = Quantisation(1.0, 1.0, 3, levels=levels)
    update = torch.linspace(-1.2, 1.2, 49, dtype=torch.float64)  # beyond the clip range at both ends
    seeds = 2000
    rounded = torch.stack(
        [quantisation.quantise(update, 1.0, 0.0, torch.Generator().manual_seed(seed))[:-2] for seed in range(seeds)]
    ).double()
    assert rounded.abs().max() <= levels  # never beyond the levels
    # each draw errs by at most half a level in deviation: over 2000 seeds the mean's deviation is at most 0.011 of
    # a level; 0.06 is over 5 of them (a rounding to the nearest level errs by up to 0.5)
    assert (rounded.mean(dim=0) - update.clamp(-1, 1) * levels).abs().max() < 0.06


@pytest.mark.parametrize(("dropped_before", "silent"), [((1,), ()), ((), (3,))])
def test_a_dropout_before_or_after_the_input_is_recovered_at_the_narrow_width(monkeypatch, dropped_before, silent):
    """The whole protocol (5 learners, threshold 3) with int4 in an 8-bit ring: learner 1 drops after sharing (its
    pair masks undone from the survivors' reveals), or learner 3 after its input (its self mask undone from the
    others' shares); the unmasked sum is exactly the sum of the inputs' quantised integers."""
    seeds = iter(range(100))
    monkeypatch.setattr(secagg, "_secret_generator", lambda: torch.Generator().manual_seed(next(seeds)))
    round_ = Round(5, 3, levels=INT4)
    assert round_.leader.ring.bits == 8
    sent = round_.until_masked(dropped_after_sharing=dropped_before)
    round_.phase(5, [learner for learner in sent if learner not in silent])
    unmasked = round_.leader.unmask()
    q = round_.quantisation
    quantised = [  # the same draws the learners made, in the order they made them
        q.quantise(
            round_.updates[learner],
            round_.weights[learner],
            round_.losses[learner],
            torch.Generator().manual_seed(index),
        )
        for index, learner in enumerate(sent)
    ]
    expected = torch.stack(quantised).sum(dim=0)
    assert unmasked[:-2].numpy().astype(np.uint8).view(np.int8).tolist() == expected[:-2].tolist()
    assert unmasked[-2:].tolist() == expected[-2:].tolist()
    mean, weight, _ = q.dequantise(unmasked, len(sent))
    expected_mean, expected_weight, _ = round_.expected(sent)
    assert weight == pytest.approx(expected_weight)
    # each input's rounding errs by less than one of its integers: the mean by survivors over the weights' levels
    assert (mean - expected_mean).abs().max() <= q.clip_range * len(sent) / (expected_weight / q.weight_unit * INT4)


@pytest.mark.parametrize("value", [46, -46, 100, -128])
def test_a_sum_beyond_what_clipped_inputs_make_is_refused_at_the_narrow_width(value):
    """5 int4 inputs of the whole weight: at most 35 a value, 45 with the rounding's slack; beyond (a wrap
    included: -128 is 128's residue) refused."""
    quantisation = Quantisation(1.0, 1.0, 5, levels=INT4)
    ring = quantisation.ring(4)
    weight = round(5 * quantisation.full_scale)
    honest = ring.integers(ring.residues(np.array([45, -45, 0, 1, weight, 0])))
    quantisation.dequantise(honest, 5)
    beyond = ring.integers(ring.residues(np.array([value, 0, 0, 1, weight, 0])))
    with pytest.raises(Refused, match="beyond what clipped inputs make"):
        quantisation.dequantise(beyond, 5)


def test_without_levels_the_masked_input_is_byte_for_byte_the_one_before_levels():
    """A seeded quantised input, its self mask and two pair masks (one added, one taken), as the leader sums it:
    the SHA-256 of its one I32 tensor, pinned from the code before int8/int4 (commit e0b7fb5: masks.expand)."""
    quantisation = Quantisation(2.0, 10.0, 3)
    ring = quantisation.ring(64)
    update = torch.linspace(-3.0, 3.0, 64, dtype=torch.float32)
    total = ring.residues(quantisation.quantise(update, 7.0, 0.5, torch.Generator().manual_seed(19)).numpy())
    ring.add(total, secagg._self_mask(bytes(range(32)), 5, 1, ring))
    secagg._add_pair_mask(total, ring, bytes(range(1, 33)), 1, 2)
    secagg._add_pair_mask(total, ring, bytes(range(2, 34)), 1, 0)
    tensors = ring.tensors(total)
    assert ring.spec == {secagg.MASKED_TENSOR: (torch.int32, (64 + 2,))} and ring.nbytes == 4 * (64 + 2)
    digest = hashlib.sha256(tensors[secagg.MASKED_TENSOR].numpy().tobytes()).hexdigest()
    assert digest == "823779ddfefe7cd7b66ce5a976c343439422ec277433e0751a2fbb1ee06dbcf8"


def test_int8_and_int4_are_allowed_under_secure_aggregation_and_the_rest_refused_with_the_reason(capsys):
    secure = ["--secure-aggregation", "--learners", "3"]
    assert leader_config(["--compress", "int8", *secure]).compress == "int8"
    assert leader_config(["--compress", "int4", *secure]).compress == "int4"
    assert leader_config(["--compress", "int4", *secure[:1], "--learners", "14"]).compress == "int4"

    def refusal(*flags: str) -> str:
        with pytest.raises(SystemExit):
            leader_config(list(flags))
        return capsys.readouterr().err

    for name in ("fp16", "topk"):  # (one reason names them all)
        assert "cannot be masked" in refusal("--compress", name, *secure)
    # 15 int4 inputs need 16 bits, int8's ring; 255 int8 inputs 32 bits, the full scale's
    assert "use --compress int8" in refusal("--compress", "int4", "--secure-aggregation", "--learners", "15")
    assert "use --compress none" in refusal("--compress", "int8", "--secure-aggregation", "--learners", "255")
    assert "with --dp distributed" in refusal("--compress", "int8", *secure, "--dp", "distributed", "--norm", "group")


def test_a_plan_with_distributed_dp_and_levels_is_refused_by_the_learner():
    """The leader's flags refuse --dp distributed with int8/int4; a learner refuses such a plan too (its noise is
    calibrated to the clipped update, not to the rounding), so Quantisation never meets noise with levels."""
    fields = {
        "dp": "distributed",
        "dp_clip": "1.0",
        "dp_noise_multiplier": "5.0",
        "dp_delta": "1e-05",
        "secagg_clip_range": "1.0",
        "secagg_weight_unit": "8.0",
        "secagg_summands": "3",
        "compress": "int8",
        "compress_ratio": "0.01",
        "compress_rank": "1",
    }
    with pytest.raises(codec.PayloadError, match="not to its rounding to a few levels"):
        messages.plan_from_metadata(fields)
    assert messages.plan_from_metadata({**fields, "compress": "none"}).dp == "distributed"


def test_the_leader_refuses_to_finish_a_round_in_another_ring_than_its_inputs():
    rounds = SecureRounds(FakeClient([]), 0.5, Quantisation(1.0, 1.0, 3).ring(SIZE), timeout=5)
    with pytest.raises(ValueError, match="not this run's"):
        rounds.finish([], {}, Quantisation(1.0, 1.0, 3, levels=INT8), torch.zeros(SIZE))


def test_the_leader_warns_of_a_coarse_step_and_of_a_typical_learners_few_levels():
    secure = ["--secure-aggregation", "--learners", "3"]
    (step,) = secure_compression_caveats(leader_config(["--compress", "int8", *secure]))
    assert "R/127 = 0.504" in step and "python -m federated.tools.update_range" in step
    assert secure_compression_caveats(leader_config(["--compress", "int8", *secure, "--secagg-clip-range", "1"])) == []
    learner = ["--strategy", "fedavg", "--local-steps-per", "learner", "--secagg-clip-range", "1"]
    (levels,) = secure_compression_caveats(leader_config(["--compress", "int4", *secure, *learner]))
    assert "7/4 = 1.75 levels" in levels and "int8 keeps 127/4 = 31.75" in levels
    assert secure_compression_caveats(leader_config(["--compress", "none", *secure])) == []


@pytest.mark.parametrize("per", ["federation", "learner"])
def test_the_least_weight_is_what_a_learner_of_one_image_weighs_and_no_shard_weighs_less(per):
    """The leader's floor (Planner.secure_round) against the weight a learner claims (LearnerApp: a batch of at
    most its images, times its plan's steps for its shard)."""
    config = leader_config(
        ["--secure-aggregation", "--learners", "3", "--strategy", "fedavg", "--local-steps-per", per]
    )
    planner = Planner(config, strategies.named("fedavg")(config), DataFacts([0.5] * 3, [0.25] * 3, 479))
    plan, batch = planner.plan(0, None), config.batch_size
    assert plan.secure is not None
    weights = [min(batch, shard) * plan.for_shard(shard, batch).local_steps for shard in (1, 2, 7, batch, 479, 5000)]
    assert plan.secure.least_weight == weights[0] == min(weights) > 0
