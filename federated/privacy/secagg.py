"""Secure aggregation (Bonawitz et al. 2017), both sides of one round, as pure state machines: no gRPC, no threads.

CONTRACT (written by the lead before the work was split; the implementer replaces this paragraph and the stubs).
One round, driven by the leader with LearnerService.SecureAggregation (protos/learner.proto):
  phase 1  keys:    each participant makes two fresh X25519 key pairs (cipher, mask) -> SecAggKeys
  phase 2  shares:  given every advertised SecAggKeys (U1), a learner makes a fresh 32-byte self-mask seed b_u,
                    Shamir-shares b_u and its mask private key among U1 (threshold t), encrypts each recipient's
                    two shares with AEAD (key: HKDF of X25519(cipher keys); associated data: round, sender,
                    recipient) -> one SecAggShare per other learner, plus SHA-256(b_u)
  phase 3  commit:  the leader names U2 (those whose shares it relays); masks are agreed with U2 only
  masked input:     sent with AccumulateGradients as an I32 tensor (see LearnerRound.masked_input)
  phase 4  unmask:  the leader names U3 (survivors: masked input arrived) and relays the ciphertexts addressed to
                    the learner; it reveals b_u shares of survivors and mask-key shares of U2 \\ U3, never both for
                    one learner, once per round.
Values: the update x (float) is clipped elementwise to [-clip_range, clip_range], weighted by w/weight_unit
(w: the samples it covers, weight_unit: the most a learner may weigh, so the factor is in [0, 1]), scaled by
`scale` and stochastically rounded (unbiased); two more elements carry w/weight_unit and w/weight_unit*loss/MAX_LOSS,
so that the leader learns no learner's samples or loss, only the sums. Masks: + PRG(b_u) + sum over v in U2 of
+-PRG(KA(s_u, s_v)) (+ if u < v), all modulo 2^32. PRG: AES-CTR keyed by HKDF.
"""

from dataclasses import dataclass

import torch

from protos import learner_pb2

BITS = 32  # masked values live modulo 2^32: the masked input is as many bytes as a float32 update
MIN_LEARNERS = 3  # with two, each learns the other's update from the sum


class Refused(ValueError):
    """A message that breaks the protocol (malformed, from the wrong sender, replayed, inconsistent); says why."""


class BelowThreshold(Exception):
    """Fewer than the threshold revealed their shares: the round is discarded, never leaked."""


@dataclass(frozen=True)
class Quantisation:
    """How a round's float updates become integers modulo 2^32 and back."""

    clip_range: float
    weight_unit: float
    summands: int  # the most inputs the sum may have (|U2|): scale leaves room for their sum, and noise
    noise_std: float = 0.0  # distributed DP: each learner's discrete Gaussian noise, in float units of x

    @property
    def scale(self) -> float:
        """Integers per unit of x/clip_range, such that the sum of `summands` inputs (and its noise) never wraps."""
        raise NotImplementedError

    def quantise(self, update: torch.Tensor, weight: float, loss: float, generator: torch.Generator) -> torch.Tensor:
        """The update (1-D float), clipped, weighted, scaled, stochastically rounded, plus the two weight/loss
        elements and this learner's share of the noise: an int64 tensor of update.numel() + 2 values (unmasked)."""
        raise NotImplementedError

    def dequantise(self, total: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """From the unmasked sum modulo 2^32 (int64 or int32 tensor of update size + 2): the weighted mean of the
        updates, the total weight (in samples) and the weighted mean loss. Refused if the sum is beyond what
        `summands` clipped inputs can make (an input beyond the clip range)."""
        raise NotImplementedError


class LearnerRound:
    """One learner's side of secure aggregation: one round at a time; a new phase 1 starts a new round."""

    def __init__(self, learner_id: int) -> None:
        raise NotImplementedError

    def answer(self, request: learner_pb2.SecAggRequest) -> learner_pb2.SecAggReply:
        """The reply to a phase (any of 1-4); raises Refused on anything a hostile leader could use: a request for
        another round, phases out of order, its own keys changed, duplicated or fewer than threshold learners,
        threshold at or below half of U1, a second unmask for the round, U3 not within U2 or below threshold,
        a ciphertext that does not decrypt for (round, sender, this learner)."""
        raise NotImplementedError

    def masked_input(self, update: torch.Tensor, weight: float, loss: float, quantisation: Quantisation) -> torch.Tensor:
        """After commit: the quantised update plus its masks, as an int32 tensor (two's complement of the values
        modulo 2^32). Refused before commit."""
        raise NotImplementedError


class LeaderRound:
    """The leader's side of one secure round: collects keys, shares, masked inputs' sum and reveals; unmasks."""

    def __init__(self, round_index: int, participants: list[int], threshold: int, size: int) -> None:
        """size: the masked input's length (update size + 2)."""
        raise NotImplementedError

    def request(self, phase: int, learner_id: int) -> learner_pb2.SecAggRequest:
        """The request of a phase for one learner (phase 4: with the ciphertexts addressed to it)."""
        raise NotImplementedError

    def take(self, phase: int, learner_id: int, reply: learner_pb2.SecAggReply) -> None:
        """A learner's reply to a phase; raises Refused (it is then left out of the round) if malformed or if it
        answers for another learner."""
        raise NotImplementedError

    def add_masked(self, learner_id: int, masked: torch.Tensor) -> None:
        """Add a committed learner's masked input (int32, `size` values) to the running sum; Refused if its length
        is wrong, it is not in U2, or it already sent one."""
        raise NotImplementedError

    def unmask(self) -> torch.Tensor:
        """After phase 4: the sum of the survivors' quantised inputs modulo 2^32 (int64 in [0, 2^32)); raises
        BelowThreshold when a secret cannot be reconstructed from threshold consistent shares (a reconstructed
        mask key must match its public key; a self-mask seed its commitment)."""
        raise NotImplementedError
