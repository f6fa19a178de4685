"""Secure aggregation's two sides driven in-process: the unmasked sum, dropouts, refusals, a hostile leader."""

import os

import numpy as np
import pytest
import scipy.stats
import torch

from federated.privacy import secagg, shamir
from federated.privacy.secagg import (
    EPOCH_ROUNDS,
    SETUP,
    BelowThreshold,
    LeaderEpoch,
    LeaderRound,
    LearnerRound,
    Quantisation,
    Refused,
)
from protos import learner_pb2

SIZE = 1000
WEIGHT_UNIT = 100.0
CLIP = 8.0


class Leader:
    """A leader's epoch and its rounds behind one request and take, as leader/secure.py drives them: phases 1-3 go
    to the epoch, 4 and 5 to its round, which opens (with every verified learner) at the first of them."""

    def __init__(self, epoch: LeaderEpoch, ring: secagg.Ring) -> None:
        self.epoch, self.ring = epoch, ring
        self.round: LeaderRound | None = None

    def open(self, round_index: int, learners: list[int] | None = None) -> LeaderRound:
        self.round = self.epoch.open_round(
            round_index, self.epoch.verified if learners is None else learners, self.ring
        )
        return self.round

    def current(self) -> LeaderRound:
        return self.round or self.open(self.epoch.epoch)

    def request(self, phase: int, learner: int) -> learner_pb2.SecAggRequest:
        return (self.epoch if phase in SETUP else self.current()).request(phase, learner)

    def take(self, phase: int, learner: int, reply: learner_pb2.SecAggReply) -> None:
        (self.epoch if phase in SETUP else self.current()).take(phase, learner, reply)

    def add_masked(self, learner: int, masked: dict[str, torch.Tensor]) -> None:
        self.current().add_masked(learner, masked)

    def unmask(self) -> torch.Tensor:
        return self.current().unmask()


class Round:
    """A leader and its learners, every message relayed honestly unless a test steps in."""

    def __init__(self, learners: int, threshold: int, round_index: int = 1, levels: int = 0) -> None:
        """levels: --compress int8/int4's (0: the full 32-bit scale)."""
        self.quantisation = Quantisation(CLIP, WEIGHT_UNIT, learners, levels=levels)
        self.leader = Leader(LeaderEpoch(round_index, list(range(learners)), threshold), self.quantisation.ring(SIZE))
        self.learners = {learner: LearnerRound(learner) for learner in range(learners)}
        generator = torch.Generator().manual_seed(learners)
        self.updates = {learner: torch.randn(SIZE, generator=generator) * 4 for learner in range(learners)}
        self.weights = {learner: float(10 + 7 * learner) for learner in range(learners)}
        self.losses = {learner: 1.0 + learner / 10 for learner in range(learners)}

    def phase(self, number: int, learners: list[int]) -> None:
        for learner in learners:
            self.leader.take(number, learner, self.learners[learner].answer(self.leader.request(number, learner)))

    def masked(self, learner: int) -> dict[str, torch.Tensor]:
        return self.learners[learner].masked_input(
            self.updates[learner], self.weights[learner], self.losses[learner], self.quantisation
        )

    def send_masked(self, learners: list[int]) -> None:
        for learner in learners:
            self.leader.add_masked(learner, self.masked(learner))

    def until_masked(self, dropped_after_sharing: tuple[int, ...] = ()) -> list[int]:
        """Phases 1 to 4 and the masked inputs of all but those dropped after sharing; returns who sent."""
        everyone = list(self.learners)
        self.phase(1, everyone)
        self.phase(2, everyone)
        self.phase(3, everyone)
        self.phase(4, everyone)
        sent = [learner for learner in everyone if learner not in dropped_after_sharing]
        self.send_masked(sent)
        return sent

    def expected(self, learners: list[int]) -> tuple[torch.Tensor, float, float]:
        weights = torch.tensor([self.weights[learner] for learner in learners], dtype=torch.float64)
        updates = torch.stack([self.updates[learner].clamp(-CLIP, CLIP) for learner in learners]).double()
        losses = torch.tensor([self.losses[learner] for learner in learners], dtype=torch.float64)
        total = float(weights.sum())
        return (weights @ updates / total).float(), total, float(weights @ losses / total)


@pytest.mark.parametrize(
    ("learners", "threshold", "dropped_after_sharing", "dropped_after_input"),
    [(3, 2, (), []), (5, 3, (1,), []), (5, 3, (), [3]), (10, 6, (0, 4), []), (10, 6, (), [7, 8])],
)
def test_the_unmasked_sum_is_the_weighted_mean_of_the_survivors(
    learners, threshold, dropped_after_sharing, dropped_after_input
):
    round_ = Round(learners, threshold)
    survivors = round_.until_masked(dropped_after_sharing)
    round_.phase(5, [learner for learner in survivors if learner not in dropped_after_input])
    mean, weight, loss = round_.quantisation.dequantise(
        round_.leader.unmask(), len(survivors) - len(dropped_after_input)
    )
    expected_mean, expected_weight, expected_loss = round_.expected(survivors)
    # each input's rounding errs by less than 1 integer per value, its weight by less than 1 too
    weight_integers = expected_weight / WEIGHT_UNIT * round_.quantisation.scale
    bound = CLIP * 2 * learners / weight_integers
    assert (mean - expected_mean).abs().max() <= bound + 1e-6 * CLIP
    assert weight == pytest.approx(expected_weight, rel=1e-6)
    assert loss == pytest.approx(expected_loss, abs=2e-3)


def test_below_the_threshold_the_round_is_discarded():
    too_few = Round(5, 3)
    too_few.until_masked(dropped_after_sharing=(0, 1, 2))
    with pytest.raises(BelowThreshold):  # before any unmask request leaves the leader
        too_few.leader.request(5, 3)
    silent = Round(5, 3)
    silent.until_masked()
    silent.phase(5, [0, 1])  # three survivors never reveal
    with pytest.raises(BelowThreshold):
        silent.leader.unmask()


def test_an_honest_learner_reveals_nothing_for_the_threshold_of_survivors_or_fewer():
    """t survivors would let the leader collect the pair seeds of a learner from t - 1 others (it reveals those of
    the rest itself) and its seed from t - 1 others and itself: 2t - 2 others, as many as there are at n = 5."""
    round_ = Round(5, 3)
    round_.until_masked()
    request = round_.leader.request(5, 0)
    del request.survivors[3:]
    with pytest.raises(Refused, match="not more than the threshold"):
        round_.learners[0].answer(request)


def _hostile_requests(request: learner_pb2.SecAggRequest) -> dict[str, learner_pb2.SecAggRequest]:
    """Phase 5 requests by which a leader could learn both secrets of learner 1 (or leave the protocol)."""
    cases = {}
    for name, change in {
        "learner 1 dropped, though committed and told so": lambda r: r.survivors.remove(1),
        "learner 1 never committed": lambda r: (r.shared.remove(1), r.survivors.remove(1)),
        "a survivor beyond the committed set": lambda r: r.survivors.append(9),
        "a survivor twice": lambda r: r.survivors.append(2),
        "another round": lambda r: setattr(r, "round", r.round + 1),
        "another threshold": lambda r: setattr(r, "threshold", 2),
    }.items():
        hostile = learner_pb2.SecAggRequest()
        hostile.CopyFrom(request)
        change(hostile)
        cases[name] = hostile
    return cases


def test_a_hostile_leader_gets_no_second_secret_of_one_learner():
    round_ = Round(5, 3)
    round_.until_masked()
    honest = round_.leader.request(5, 0)
    refused = []
    for name, hostile in _hostile_requests(honest).items():
        if name == "learner 1 dropped, though committed and told so":
            continue  # a legitimate view of the round: refused only as a second unmask, below
        with pytest.raises(Refused):
            round_.learners[0].answer(hostile)
        refused.append(name)
    reply = round_.learners[0].answer(honest)  # the seed share of learner 1: it survived
    assert [reveal.mask_key for reveal in reply.reveals if reveal.owner == 1] == [False]
    with pytest.raises(Refused, match="second unmask"):
        round_.learners[0].answer(_hostile_requests(honest)["learner 1 dropped, though committed and told so"])
    assert len(refused) == 5


def _unmask_as(round_: Round, learner: int, survivors: list[int]) -> learner_pb2.SecAggReply:
    """Learner's answer to phase 5 naming these survivors (a hostile leader's choice, or the honest one)."""
    request = round_.leader.request(5, learner)
    request.ClearField("survivors")
    request.survivors.extend(survivors)
    return round_.learners[learner].answer(request)


@pytest.mark.parametrize(
    ("told_survived", "told_dropped", "owner_told"),
    [
        ([0, 2], [3, 4], [0, 1, 2, 3]),
        ([0], [2, 3, 4], [0, 1, 2, 4]),
        ([0, 2], [3, 4], [1, 2, 3, 4]),
        ([2], [0, 3, 4], [1, 2, 3, 4]),
    ],
)
def test_a_hostile_leader_telling_learners_different_survivors_cannot_remove_both_masks_of_one(
    told_survived, told_dropped, owner_told
):
    """Five learners, t = 3, every input in: the leader tells some that learner 1 survived (each gives a share of
    its seed), the others that it dropped (each gives its pair seed with 1), and learner 1 itself a U3 of four
    of its choosing (1 gives its own share, and its pair seed with the one left out). Removing 1's self mask needs
    t shares, its own and t - 1 others; removing its pair masks needs the seed of (1, v) for every other v, of
    which 1 gives one: 2t - 1 = 5 other learners, of 4. A second unmask is refused."""
    round_ = Round(5, 3)
    round_.until_masked()
    seed_shares = sum(
        not reveal.mask_key
        for learner in told_survived
        for reveal in _unmask_as(round_, learner, list(range(5))).reveals
        if reveal.owner == 1
    )
    paired = {
        learner
        for learner in told_dropped
        for reveal in _unmask_as(round_, learner, [v for v in range(5) if v != 1]).reveals
        if reveal.owner == 1 and reveal.mask_key
    }
    owner_reveals = _unmask_as(round_, 1, owner_told).reveals
    paired |= {reveal.owner for reveal in owner_reveals if reveal.mask_key}
    seed_shares += sum(not reveal.mask_key for reveal in owner_reveals if reveal.owner == 1)
    assert seed_shares < 3 or paired != {0, 2, 3, 4}
    for learner in range(5):
        with pytest.raises(Refused, match="second unmask"):
            _unmask_as(round_, learner, list(range(5)))


def test_a_survivor_that_revealed_nothing_while_another_dropped_discards_the_round():
    """Seven learners, t = 4: 6 never sends its input, 5 sends it and then dies; the others hold enough shares of
    every seed, but 5's pair mask with 6 is known only to 5 and 6: discarded, never leaked."""
    round_ = Round(7, 4)
    round_.until_masked(dropped_after_sharing=(6,))
    round_.phase(5, [0, 1, 2, 3, 4])
    with pytest.raises(BelowThreshold, match=r"learners \[5\] sent their masked input but revealed nothing"):
        round_.leader.unmask()


def test_a_dropped_learners_pair_seeds_revealed_in_one_round_do_not_unmask_its_input_in_the_next():
    """Round 1 of an epoch: learner 4 drops before its input, the survivors reveal their pair seeds with it and the
    round unmasks right. Round 2: 4 sends its input; even given its self mask, the leader's round-1 seeds leave it
    masked, while the round-2 seeds (known only to the learners) would unmask it."""
    round_ = Round(5, 3)
    survivors = round_.until_masked(dropped_after_sharing=(4,))
    round_.phase(5, survivors)
    old_seeds = dict(round_.leader.current()._pair_seeds[4])
    mean, _, _ = round_.quantisation.dequantise(round_.leader.unmask(), 4)
    assert torch.allclose(mean, round_.expected(survivors)[0], atol=1e-5)
    round_.leader.open(2)
    round_.phase(4, list(range(5)))
    ring = round_.leader.ring
    masked = ring.zeros()
    ring.add_tensors(masked, round_.masked(4))
    ring.add(masked, secagg._self_mask(round_.learners[4]._seeds[1], 2, 4, ring), -1)

    def unmasked_with(seeds: dict[int, bytes]) -> np.ndarray:
        total = masked.copy()
        for peer, seed in seeds.items():
            secagg._add_pair_mask(total, ring, seed, peer, 4)
        return total.view(np.int32)[:SIZE].astype(np.float64)

    new_seeds = {peer: round_.learners[peer]._pair_seed(4) for peer in survivors}
    assert sorted(old_seeds) == sorted(new_seeds) == survivors
    assert np.corrcoef(unmasked_with(new_seeds), round_.updates[4].numpy())[0, 1] > 0.9  # the method is right
    with_old = unmasked_with(old_seeds)
    assert abs(np.corrcoef(with_old, round_.updates[4].numpy())[0, 1]) < 5 / SIZE**0.5
    assert np.abs(with_old).max() > round_.quantisation.scale  # beyond any quantised input: still masked


def test_a_commit_for_a_used_slot_another_epoch_or_beyond_the_epoch_is_refused():
    round_ = Round(4, 3)
    round_.until_masked()  # round 1: slot 0 of epoch 1
    learner = round_.learners[0]
    replay = round_.leader.request(4, 0)
    with pytest.raises(Refused, match="committed to already"):
        learner.answer(replay)
    later = learner_pb2.SecAggRequest()
    later.CopyFrom(replay)
    later.round = 4  # slot 3: slots 1 and 2 are skipped, never to be used
    learner.answer(later)
    for round_index, epoch, refused in [
        (3, 1, "committed to already"),  # an older round
        (4, 1, "committed to already"),  # the same round again
        (5, 2, "epoch 2 during epoch 1"),
        (1 + EPOCH_ROUNDS, 1, "beyond epoch 1's 16 slots"),
        (0, 1, "beyond epoch 1's 16 slots"),  # before the epoch
    ]:
        hostile = learner_pb2.SecAggRequest()
        hostile.CopyFrom(replay)
        hostile.round, hostile.epoch = round_index, epoch
        with pytest.raises(Refused, match=refused):
            learner.answer(hostile)
    hostile.round = EPOCH_ROUNDS  # the last slot: taken
    learner.answer(hostile)


@pytest.mark.parametrize(
    ("advertised", "threshold", "reason"), [(4, 2, "threshold 2"), (4, 4, "below all"), (2, 2, "needs 3")]
)
def test_a_threshold_at_half_or_fewer_than_three_learners_are_refused(advertised, threshold, reason):
    """t > |U1|/2: no two disjoint sets of t honest learners can be told different survivors; and t < |U1|: a
    round unmasks only with more than t survivors."""
    round_ = Round(4, 3)
    round_.phase(1, list(range(advertised)))
    request = round_.leader.request(2, 0) if advertised >= 3 else _keys_of(round_, advertised)
    request.threshold = threshold
    with pytest.raises(Refused, match=reason):
        round_.learners[0].answer(request)


def _keys_of(round_: Round, advertised: int) -> learner_pb2.SecAggRequest:
    """A phase 2 request naming fewer learners than the leader's own checks allow (a hostile leader's)."""
    request = learner_pb2.SecAggRequest(round=1, phase=2, epoch=1)
    request.keys.extend(round_.leader.epoch._keys[learner] for learner in range(advertised))
    return request


@pytest.mark.parametrize("tamper", ["own keys altered", "duplicated id", "short key", "negative id"])
def test_a_learner_refuses_a_malformed_key_list(tamper):
    round_ = Round(4, 3)
    round_.phase(1, [0, 1, 2, 3])
    request = round_.leader.request(2, 0)
    if tamper == "own keys altered":
        request.keys[0].mask_key = request.keys[1].mask_key
    elif tamper == "duplicated id":
        request.keys[2].learner_id = 1
    elif tamper == "short key":
        request.keys[3].cipher_key = request.keys[3].cipher_key[:31]
    else:
        request.keys[3].learner_id = -1
    with pytest.raises(Refused):
        round_.learners[0].answer(request)


@pytest.mark.parametrize("which", ["cipher_key", "mask_key"])
def test_a_low_order_public_key_is_refused_by_the_leader_and_by_learners(which):
    round_ = Round(5, 3)
    round_.phase(1, [0, 1, 2, 3])
    hostile = round_.learners[4].answer(round_.leader.request(1, 4))
    setattr(hostile.keys, which, bytes(32))  # the all-zero point: every agreement with it is zero
    with pytest.raises(Refused, match="agrees on no secret"):
        round_.leader.take(1, 4, hostile)
    request = round_.leader.request(2, 0)  # the round goes on without learner 4
    assert [keys.learner_id for keys in request.keys] == [0, 1, 2, 3]
    request.keys.append(hostile.keys)  # a hostile leader relaying it anyway
    with pytest.raises(Refused, match="agrees on no secret"):
        round_.learners[0].answer(request)


@pytest.mark.parametrize("count", [0, 4097])
def test_a_phase_2_request_with_no_keys_or_too_many_is_refused_before_any_work(count):
    learner = LearnerRound(0)
    own = learner.answer(learner_pb2.SecAggRequest(round=1, phase=1)).keys
    request = learner_pb2.SecAggRequest(round=1, phase=2, threshold=3, epoch=1)
    request.keys.extend([own] * count)
    with pytest.raises(Refused, match="a secure round needs 3 to 4096"):
        learner.answer(request)


def test_false_shares_of_the_lowest_holder_are_outvoted():
    """Twelve learners, threshold 7, learner 0 reveals well-formed false shares of every secret: every subset in
    lexicographic order held it (the review's subsets.py); random subsets find the secrets. Nobody is blamed: a
    false dealer makes honest holders' shares look just as false (the next test)."""
    round_ = Round(12, 7)
    round_.until_masked()
    false = round_.learners[0].answer(round_.leader.request(5, 0))
    for reveal in false.reveals:
        reveal.share = (int.from_bytes(reveal.share, "big") ^ 1).to_bytes(len(reveal.share), "big")
    round_.leader.take(5, 0, false)
    round_.phase(5, list(range(1, 12)))
    mean, _, _ = round_.quantisation.dequantise(round_.leader.unmask(), 12)
    assert torch.allclose(mean, round_.expected(list(range(12)))[0], atol=1e-5)


def test_a_dealer_dealing_off_polynomial_shares_to_honest_holders_is_outvoted_and_gets_nobody_blamed(monkeypatch):
    """The review's frame.py (a): learner 0 deals well-formed shares off its polynomial to honest 5; they decrypt
    and parse, so nobody complains, and phase 5's reveals by 5 are off the polynomial: outvoted, and no learner
    is blamed for them (the leader cannot tell them from false reveals). One false holder of 0's 9 others at
    t = 6: all 32 random subsets hold it with probability (2/3)^32 < 3e-6."""
    round_ = Round(10, 6)
    round_.phase(1, list(range(10)))
    real_split = shamir.split

    def false_to_5(secret, threshold, holders, prime=shamir.PRIME):
        shares = real_split(secret, threshold, holders, prime)
        shares[5] = (int.from_bytes(shares[5], "big") ^ 1).to_bytes(len(shares[5]), "big")
        return shares

    monkeypatch.setattr(shamir, "split", false_to_5)
    round_.phase(2, [0])
    monkeypatch.setattr(shamir, "split", real_split)
    round_.phase(2, list(range(1, 10)))
    for phase in (3, 4):
        round_.phase(phase, list(range(10)))
    round_.send_masked(list(range(10)))
    round_.phase(5, list(range(10)))
    mean, _, _ = round_.quantisation.dequantise(round_.leader.unmask(), 10)
    assert torch.allclose(mean, round_.expected(list(range(10)))[0], atol=1e-5)
    assert not hasattr(round_.leader.epoch, "blamed") and not hasattr(round_.leader.current(), "blamed")


def test_a_false_commitment_discards_the_round_naming_its_learner():
    round_ = Round(4, 3)
    round_.phase(1, list(range(4)))
    round_.phase(2, [0, 1, 2])
    lying = round_.learners[3].answer(round_.leader.request(2, 3))
    lying.self_mask_commitment = bytes(32 * EPOCH_ROUNDS)  # no seed's digest: the seed, reconstructed, never matches it
    round_.leader.take(2, 3, lying)
    for phase in (3, 4):
        round_.phase(phase, list(range(4)))
    round_.send_masked(list(range(4)))
    round_.phase(5, list(range(4)))
    with pytest.raises(BelowThreshold, match="learner 3"):
        round_.leader.unmask()


def test_a_learner_answering_for_another_is_refused_and_the_round_goes_on():
    round_ = Round(5, 3)
    impostor = round_.learners[4].answer(round_.leader.request(1, 4))
    with pytest.raises(Refused, match="answered with"):
        round_.leader.take(1, 3, impostor)
    round_.phase(1, [0, 1, 2, 3, 4])
    round_.phase(2, [0, 1, 2])
    forged = round_.learners[3].answer(round_.leader.request(2, 3))
    misaddressed = learner_pb2.SecAggReply()
    misaddressed.CopyFrom(forged)
    misaddressed.shares[0].recipient = 9
    with pytest.raises(Refused, match="one for each other advertised learner"):
        round_.leader.take(2, 3, misaddressed)
    forged.shares[0].sender = 4
    with pytest.raises(Refused, match="another learner's name"):
        round_.leader.take(2, 3, forged)
    round_.phase(2, [4])
    round_.phase(3, [0, 1, 2, 4])
    round_.phase(4, [0, 1, 2, 4])
    round_.send_masked([0, 1, 2, 4])
    round_.phase(5, [0, 1, 2, 4])
    mean, _, _ = round_.quantisation.dequantise(round_.leader.unmask(), 4)
    assert torch.allclose(mean, round_.expected([0, 1, 2, 4])[0], atol=1e-5)


def test_malformed_shares_and_masked_inputs_are_refused_and_the_round_goes_on():
    round_ = Round(5, 3)
    round_.phase(1, list(range(5)))
    round_.phase(2, [0, 1, 2, 3])
    truncated = round_.learners[4].answer(round_.leader.request(2, 4))
    truncated.shares[1].ciphertext = truncated.shares[1].ciphertext[:-1]
    with pytest.raises(Refused, match="bytes"):
        round_.leader.take(2, 4, truncated)
    round_.phase(3, [0, 1, 2, 3])
    round_.phase(4, [0, 1, 2, 3])
    for wrong in [torch.zeros(SIZE + 1, dtype=torch.int32), torch.zeros(SIZE + 2, dtype=torch.int64)]:
        with pytest.raises(Refused, match="must be"):
            round_.leader.add_masked(0, {secagg.MASKED_TENSOR: wrong})
    round_.send_masked([0, 1, 2, 3])
    with pytest.raises(Refused, match="already sent"):
        round_.leader.add_masked(0, {secagg.MASKED_TENSOR: torch.zeros(SIZE + 2, dtype=torch.int32)})
    reply = round_.learners[0].answer(round_.leader.request(5, 0))
    short = learner_pb2.SecAggReply()
    short.CopyFrom(reply)
    short.reveals[2].share = short.reveals[2].share[1:]
    with pytest.raises(Refused, match="share"):
        round_.leader.take(5, 0, short)
    round_.leader.take(5, 0, reply)  # the same reply, as sent: taken
    round_.phase(5, [1, 2, 3])
    mean, _, _ = round_.quantisation.dequantise(round_.leader.unmask(), 4)
    assert torch.allclose(mean, round_.expected([0, 1, 2, 3])[0], atol=1e-5)


def test_ciphertexts_replayed_from_an_earlier_round_or_to_another_learner_are_complained_of_and_the_round_goes_on():
    earlier = Round(7, 4, round_index=1)
    earlier.until_masked()
    replayed = earlier.leader.request(3, 0).shares[0]  # from learner 1 to learner 0, in epoch 1
    later = Round(7, 4, round_index=2)
    later.learners = earlier.learners  # the same learners, an epoch on
    later.phase(1, list(range(7)))
    later.phase(2, list(range(7)))
    stale = later.leader.request(3, 0)
    stale.shares[0].CopyFrom(replayed)
    misaddressed = later.leader.request(3, 2)
    misaddressed.shares[-1].ciphertext = later.leader.request(3, 1).shares[-1].ciphertext  # from 6, to learner 1
    for learner, request, accused in [(0, stale, [1]), (2, misaddressed, [6])]:
        reply = later.learners[learner].answer(request)
        assert list(reply.complaints) == accused
        later.leader.take(3, learner, reply)
    later.phase(3, [1, 3, 4, 5, 6])
    kept = [0, 2, 3, 4, 5]
    later.phase(4, kept)
    with pytest.raises(ValueError, match="no phase 4"):  # left out of U2
        later.leader.request(4, 1)
    later.send_masked(kept)
    later.phase(5, kept)
    mean, _, _ = later.quantisation.dequantise(later.leader.unmask(), 5)
    assert torch.allclose(mean, later.expected(kept)[0], atol=1e-5)


def test_a_learner_sending_garbage_shares_of_the_right_length_is_left_out_and_the_sum_is_right():
    round_ = Round(5, 3)
    round_.phase(1, list(range(5)))
    round_.phase(2, [0, 1, 2, 3])
    garbage = round_.learners[4].answer(round_.leader.request(2, 4))
    for share in garbage.shares:
        share.ciphertext = os.urandom(len(share.ciphertext))
    round_.leader.take(2, 4, garbage)
    round_.phase(3, list(range(5)))
    assert round_.leader.request(4, 0).shared == [0, 1, 2, 3]
    round_.phase(4, [0, 1, 2, 3])
    round_.send_masked([0, 1, 2, 3])
    round_.phase(5, [0, 1, 2, 3])
    mean, _, _ = round_.quantisation.dequantise(round_.leader.unmask(), 4)
    assert torch.allclose(mean, round_.expected([0, 1, 2, 3])[0], atol=1e-5)


def test_a_leader_committing_a_sender_complained_of_is_refused():
    round_ = Round(4, 3)
    round_.phase(1, list(range(4)))
    round_.phase(2, list(range(4)))
    request = round_.leader.request(3, 0)
    request.shares[0].ciphertext = bytes(len(request.shares[0].ciphertext))
    assert list(round_.learners[0].answer(request).complaints) == [1]
    with pytest.raises(Refused, match="lacks"):
        round_.learners[0].answer(
            learner_pb2.SecAggRequest(round=1, phase=4, threshold=3, epoch=1, shared=[0, 1, 2, 3])
        )


def test_a_masked_input_looks_uniform_and_uncorrelated_while_the_quantised_one_does_not():
    fresh = Round(3, 2)
    fresh.phase(1, [0, 1, 2])
    fresh.phase(2, [0, 1, 2])
    fresh.phase(3, [0, 1, 2])
    fresh.phase(4, [0, 1, 2])
    masked = fresh.masked(0)[secagg.MASKED_TENSOR]
    with pytest.raises(Refused, match="once per round"):  # a second input under the same masks
        fresh.masked(0)
    quantised = fresh.quantisation.quantise(fresh.updates[0], fresh.weights[0], 1.0, torch.Generator())

    def uniformity(values: torch.Tensor) -> float:
        counts = np.bincount(values.to(torch.int32).numpy().view(np.uint8), minlength=256)
        return float(scipy.stats.chisquare(counts).pvalue)

    assert uniformity(masked) > 1e-6
    assert uniformity(quantised) < 1e-6
    correlation = np.corrcoef(masked.numpy()[:SIZE].astype(np.float64), fresh.updates[0].numpy())[0, 1]
    assert abs(correlation) < 5 / SIZE**0.5
    assert np.corrcoef(quantised.numpy()[:SIZE], fresh.updates[0].numpy())[0, 1] > 0.9


@pytest.mark.parametrize("complaints", [[0, 1, 2, 3], [0, 1]])
def test_one_learner_complaining_of_every_other_is_left_out_and_the_round_sums_the_rest(caplog, complaints):
    """The review's frame.py (c): learner 4's complaints would leave U2 at or below the threshold (every round
    discarded: a round unmasks with more than t; [0, 1] leaves exactly t = 3); the round leaves out the complainer
    instead, and sums the others right."""
    round_ = Round(5, 3)
    round_.phase(1, list(range(5)))
    round_.phase(2, list(range(5)))
    round_.phase(3, [0, 1, 2, 3])
    round_.learners[4].answer(round_.leader.request(3, 4))
    round_.leader.take(3, 4, learner_pb2.SecAggReply(complaints=complaints))
    round_.phase(4, [0, 1, 2, 3])
    assert round_.leader.current().shared == (0, 1, 2, 3)
    assert "complainers (4) are left out of this epoch instead" in caplog.text
    with pytest.raises(ValueError, match="no phase 4"):
        round_.leader.request(4, 4)
    round_.send_masked([0, 1, 2, 3])
    round_.phase(5, [0, 1, 2, 3])
    mean, _, _ = round_.quantisation.dequantise(round_.leader.unmask(), 4)
    assert torch.allclose(mean, round_.expected([0, 1, 2, 3])[0], atol=1e-5)


def test_complaints_within_the_threshold_leave_out_the_learners_complained_of_as_before():
    round_ = Round(5, 3)
    round_.phase(1, list(range(5)))
    round_.phase(2, list(range(5)))
    round_.phase(3, [0, 1, 2, 3])
    round_.leader.take(3, 4, learner_pb2.SecAggReply(complaints=[0]))
    assert round_.leader.request(4, 1).shared == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("complainer", "complaints", "refused"),
    [
        (4, [3], "was dealt no shares"),  # the complainer dealt none (it failed phase 2)
        (0, [4], "complains of learners that dealt none"),
        (0, [0], "complains of learners that dealt none"),  # of itself
        (0, [9], "complains of learners that dealt none"),  # of a learner not in the round
    ],
)
def test_the_leader_refuses_complaints_of_or_by_learners_not_dealt(complainer, complaints, refused):
    round_ = Round(5, 3)
    round_.phase(1, list(range(5)))
    round_.phase(2, [0, 1, 2, 3])
    round_.leader.request(3, 0)  # the dealt fixed: 0 to 3
    with pytest.raises(Refused, match=refused):
        round_.leader.take(3, complainer, learner_pb2.SecAggReply(complaints=complaints))


def test_the_leader_refuses_complaints_out_of_turn_or_twice():
    round_ = Round(5, 3)
    round_.phase(1, list(range(5)))
    with pytest.raises(Refused, match="out of turn or twice"):  # before the dealt are fixed
        round_.leader.take(3, 0, learner_pb2.SecAggReply())
    round_.phase(2, list(range(5)))
    round_.phase(3, [0, 1, 2, 3])
    with pytest.raises(Refused, match="out of turn or twice"):  # a second time
        round_.leader.take(3, 0, learner_pb2.SecAggReply(complaints=[1]))
    assert round_.leader.epoch.verified == (0, 1, 2, 3)  # V fixed
    with pytest.raises(Refused, match="out of turn or twice"):  # after V
        round_.leader.take(3, 4, learner_pb2.SecAggReply())


def _phase_3_request(round_: Round, learner: int) -> learner_pb2.SecAggRequest:
    round_.phase(1, list(range(5)))
    round_.phase(2, list(range(5)))
    return round_.leader.request(3, learner)


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        (lambda request: request.shared.append(1), "names a learner twice"),
        (lambda request: request.shared.append(7), "not within the advertised learners"),
        (lambda request: request.shared.remove(0), "leaves this learner out"),
        (lambda request: request.ClearField("shared") or request.shared.extend([0, 1, 2]), "not more than the thr"),
        (lambda request: setattr(request.shares[0], "recipient", 2), "not one this learner expects"),
        (lambda request: request.shares.append(request.shares[0]), "not one this learner expects"),  # twice
        (
            lambda request: request.ClearField("shared") or request.shared.extend([0, 1, 2, 3]),
            "not one this learner expects",
        ),  # from 4, not dealt
    ],
)
def test_a_learner_refuses_a_phase_3_request_with_a_false_dealt_set_or_shares_it_does_not_expect(change, refused):
    round_ = Round(5, 3)
    request = _phase_3_request(round_, 0)
    change(request)
    with pytest.raises(Refused, match=refused):
        round_.learners[0].answer(request)
