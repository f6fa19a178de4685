"""Secure aggregation (Bonawitz et al. 2017), both sides, as pure state machines: no gRPC, no threads; the key
agreement amortised over an epoch of up to EPOCH_ROUNDS rounds.

An epoch, opened and driven by the leader with LearnerService.SecureAggregation (protos/learner.proto), is named by
the round of its phase 1:
  phase 1  keys:    each participant makes two fresh X25519 key pairs (cipher, mask) -> SecAggKeys
  phase 2  shares:  given every advertised SecAggKeys (U1), a learner makes EPOCH_ROUNDS fresh 32-byte self-mask
                    seeds b_u^0..b_u^{K-1} (one per slot), Shamir-shares each among U1 (threshold t), encrypts each
                    recipient's K shares with AES-GCM (key: HKDF of X25519(cipher keys); associated data: epoch,
                    sender, recipient) -> one SecAggShare per other learner, plus the K SHA-256(b_u^k). Its mask
                    private key is never shared: nothing revealed ever exposes masks beyond one round.
  phase 3  verify:  the leader relays each learner the ciphertexts addressed to it from those whose shares it took;
                    the learner decrypts and parses every one, and complains of the senders whose shares fail.
                    V, the verified: those whose shares it relayed, less every sender complained of (or, when that
                    is below the threshold, less the complainers instead); fixed for the epoch.
Then each round r of the epoch, at slot k = r - epoch (0 <= k < K), each slot at most once:
  phase 4  commit:  the leader names the round, the epoch and U2 within V (more than t); a learner refuses a slot at
                    or below the last it committed to (two inputs under the same masks would give away their
                    difference), beyond K - 1, or a U2 holding a sender whose shares to it it lacks
  masked input:     sent with AccumulateGradients in its Ring's tensors (LearnerRound.masked_input): one I32
                    tensor, or with --compress int8/int4 a narrower one (U8, I16) and an I32 one for the extras
  phase 5  unmask:  the leader names U3 (survivors: masked input arrived, more than t); learner v reveals, for each
                    survivor u (itself too), its share of b_u^k, and for each dropped u (U2 \\ U3) its own
                    pairwise mask seed with u for round r only; never both for one owner, once per round. A
                    survivor that sent its input and reveals nothing while a learner dropped leaves a pair mask
                    nobody can remove: the round is discarded (BelowThreshold), never leaked.
Values: the update x (float) is clipped elementwise to [-clip_range, clip_range], weighted by w/weight_unit
(w: the samples it covers, weight_unit: the most a learner may weigh, so the factor is in [0, 1]), scaled by
`scale` and stochastically rounded (unbiased); two more elements carry w/weight_unit and w/weight_unit*loss/LOSS_RANGE,
so that the leader learns no learner's samples or loss, only the sums. With --compress int8/int4 (`levels`) the
update's values are instead integers in [-levels, levels] (times the weight factor), in the narrowest ring of
RING_BITS that holds the sum; the two extras keep their own 32-bit part (Ring). Masks of round r: + PRG(b_u^k) +
sum over v in U2 of +-PRG(HKDF(KA(s_u, s_v), r, "pair mask", u, v)) (+ if u < v), the PRG's bytes viewed at the
ring's widths and every sum modulo 2^bits of its part (2^32 without levels). PRG: AES-CTR keyed by
HKDF (federated/privacy/masks.py); shares: federated/privacy/shamir.py; distributed noise:
federated/privacy/discrete_gaussian.py.
Why a hostile leader cannot get both masks of one honest learner u in one round r: its self mask needs b_u^k,
i.e. t shares, each revealed by a holder told that u survived: u's own and at least t - 1 of other learners
(set A). Its pair masks with the U2 committed to u need, for each other v of that U2, the seed of (u, v) for
round r, which only u and v know: u reveals it only for the learners its own U3 leaves out, and u answers only a
U3 of more than t (it refuses t or fewer), so at least t others of its U3 must each reveal theirs, each told that u
dropped (set B). An honest learner answers phase 5 once per round and gives one kind per owner, so A and B are
disjoint, neither holds u, and |A| + |B| >= 2t - 1 > |U1| - 1 since t > |U1|/2: more learners than there are.
(So a round unmasks with more than t survivors, of which t reveal.) The seeds of round r are HKDF outputs of
round r, and the slots are committed once, so no round's reveals serve another's masks.
"""

import hashlib
import logging
import math
import os
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from federated.core.plan import MAX_LEARNERS
from federated.privacy import discrete_gaussian, masks, shamir
from protos import learner_pb2

log = logging.getLogger("leader")  # LeaderRound's own log lines (the learner's side logs nothing)

# The phases of a round, in order (LearnerService.SecureAggregation's `phase`); the masked inputs come after COMMIT
KEYS, SHARES, VERIFY, COMMIT, UNMASK = 1, 2, 3, 4, 5
SETUP = (KEYS, SHARES, VERIFY)  # once per epoch; then each round runs COMMIT, the masked inputs and UNMASK
EPOCH_ROUNDS = 16  # K: the rounds (slots) one epoch's keys and seeds serve
BITS = 32  # masked values live modulo 2^32: the masked input is as many bytes as a float32 update
RING_BITS = (8, 16, BITS)  # with levels (--compress int8/int4): the narrowest of these whose signed range holds the sum
MIN_LEARNERS = 3  # with two, each learns the other's update from the sum
HEADROOM = 2**30  # the sum's values stay within +-2^30: a sum beyond (an input beyond its clip range) is refused
NOISE_TAILS = 10.0  # the summed noise stays within this many standard deviations (beyond: probability < 1e-22)
EXTRAS = 2  # the weight and loss elements after the update's values
WIDE_RANGE = 64.0  # with levels, the least clip range of the wide values (BatchNorm's statistics): the one
# --secagg-clip-range's default gives them (docs/secure-aggregation.md), wherever the levels' range is set
SHARE_PLAINTEXT = EPOCH_ROUNDS * shamir.SHARE_BYTES  # a recipient's shares of the sender's seeds, slot by slot
DIGEST_BYTES = hashlib.sha256().digest_size
MASKED_TENSOR, MASKED_EXTRAS = "masked", "masked_extras"  # a masked input's tensors' names (Ring.spec)
WIRE_DTYPES = {8: torch.uint8, 16: torch.int16, BITS: torch.int32}  # a ring's values on the wire, by its bits
LOSS_RANGE = 100.0  # a loss beyond counts as this (it only informs; far above a sane model's cross-entropy): the
# wire's MAX_LOSS (1e6) would leave the loss sum a resolution of 1e6 / scale, about 0.01 at 10 learners
MAX_COMBINATIONS = 32  # where revealed shares disagree, at most this many random subsets of t are tried per secret
# (one false share among the owner's 11 other holders at t = 7: all 32 hold it with probability (7/11)^32 < 1e-6),
# about 0.4 ms each at t = 31
_RANDOM = random.SystemRandom()  # the subsets tried: unpredictable to a learner choosing which shares to falsify


class Refused(ValueError):
    """A message that breaks the protocol (malformed, from the wrong sender, replayed, inconsistent); says why."""


class BelowThreshold(Exception):
    """Fewer than the threshold revealed their shares: the round is discarded, never leaked."""


@dataclass(frozen=True)
class Quantisation:
    """How a round's float updates become integers modulo 2^bits and back."""

    clip_range: float
    weight_unit: float
    summands: int  # the most inputs the sum may have (|U2|): scale leaves room for their sum, and noise
    noise_std: float = 0.0  # distributed DP: each learner's discrete Gaussian noise, in float units of x
    levels: int = 0  # 0: values fill the 32-bit ring (scale); else --compress int8/int4's levels (127, 7)
    # with levels: the update's values [start, stop) that keep the full scale in the 32-bit part, clipped to
    # wide_range (BatchNorm's statistics: values, not changes, which a few levels of a range wide enough for
    # them would blur, and which a clip range fit for the levels, the gradients', would cut off)
    wide: tuple[int, int] = (0, 0)
    # the least samples an honest input weighs (Planner.secure_round; 0: unknown, as on a learner's side): the
    # leader refuses a sum weighing less than that many inputs of it, which only a hostile weight element makes
    least_weight: float = 0.0

    def __post_init__(self) -> None:
        if not (
            self.clip_range > 0
            and self.weight_unit > 0
            and self.summands >= 1
            and min(self.noise_std, self.levels, self.least_weight) >= 0
        ):
            raise ValueError(f"no quantisation: {self}")
        if self.levels and self.noise_std:
            raise ValueError(
                f"{self.levels} levels with distributed DP's noise: the noise is calibrated to the clipped update, "
                "not to its rounding to a few levels; use --compress none"
            )
        if self.scale < 1 if not self.levels else self.extent >= 2 ** (BITS - 1) - 1:
            raise ValueError(
                f"noise {self.noise_std} leaves no room for {self.summands} inputs"
                + (f" of {self.levels} levels" if self.levels else "")
                + f" in {BITS} bits: a smaller noise or fewer learners a round"
            )

    @property
    def scale(self) -> float:
        """Integers per unit of x/clip_range: with levels, the levels; else such that the sum of `summands` inputs
        (and its noise) never wraps: summands * (scale + 1) + NOISE_TAILS * sqrt(summands) * (noise in integers)
        <= HEADROOM."""
        if self.levels:
            return float(self.levels)
        noise_per_scale = NOISE_TAILS * math.sqrt(self.summands) * self.noise_std / self.clip_range
        return (HEADROOM - self.summands - 1) / (self.summands + noise_per_scale)  # 1: float rounding

    @property
    def full_scale(self) -> float:
        """The scale of the 32-bit part: the weight and loss elements (w/weight_unit, and that times
        loss/LOSS_RANGE) and, with levels, the wide values; the values' scale without levels."""
        return replace(self, levels=0).scale if self.levels else self.scale

    @property
    def extent(self) -> int:
        """With levels: the most |sum| of `summands` inputs' values that dequantise takes (each input at most
        `levels`, and 2 of rounding: the weight factor's and the value's), in integers."""
        return self.summands * (self.levels + 2)

    @property
    def bits(self) -> int:
        """The values' ring: BITS without levels; with them, the narrowest of RING_BITS whose two's complement
        holds the extent and one more (a sum beyond the extent must be representable to be refused)."""
        return next(bits for bits in RING_BITS if self.extent < 2 ** (bits - 1) - 1) if self.levels else BITS

    def ring(self, size: int) -> "Ring":
        """The masked input's layout for an update of `size` values: the wide values at 32 bits with levels (the
        one place that decides which values are wide), none without."""
        return Ring(self.bits, size, self.wide if self.levels else (0, 0))

    @property
    def noise_sigma(self) -> float:
        """Each learner's noise's standard deviation in integers (of the values' scale)."""
        return self.noise_std / self.clip_range * self.scale

    @property
    def wide_range(self) -> float:
        """The wide values' clip range: the clip range, at least WIDE_RANGE."""
        return max(self.clip_range, WIDE_RANGE)

    def scales(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Each of `size` values' scale and clip range: the levels and the clip range, or on the wide ones the
        full scale and wide_range."""
        scales, ranges, wide = np.full(size, self.scale), np.full(size, self.clip_range), self.ring(size).wide_values
        scales[wide], ranges[wide] = self.full_scale, self.wide_range
        return scales, ranges

    def quantise(self, update: torch.Tensor, weight: float, loss: float, generator: torch.Generator) -> torch.Tensor:
        """The update (1-D float), clipped, weighted, scaled, stochastically rounded, plus the two weight/loss
        elements and this learner's share of the noise: an int64 tensor of update.numel() + 2 values (unmasked).
        The noise goes into the update's values only: the weight and loss sums are exact."""
        if not 0 <= weight <= self.weight_unit:
            raise ValueError(f"a weight of {weight} is beyond 0..{self.weight_unit}")
        values = update.detach().cpu().flatten().to(torch.float64).numpy()  # numpy: one thread, no waits on a busy CPU
        if not math.isfinite(loss) or not np.isfinite(values).all():
            raise ValueError("a non-finite update or loss cannot be quantised")
        factor, extra = weight / self.weight_unit * self.scale, weight / self.weight_unit * self.full_scale
        extras = [extra, extra * min(max(loss, 0.0), LOSS_RANGE) / LOSS_RANGE]
        clipped = np.clip(values, -self.clip_range, self.clip_range)
        if self.levels:  # (a float rounding beyond the levels would round up past them)
            scaled = np.clip(clipped * (factor / self.clip_range), -self.levels, self.levels)
            wide = self.ring(len(values)).wide_values
            scaled[wide] = np.clip(values[wide], -self.wide_range, self.wide_range) * (extra / self.wide_range)
        else:
            scaled = clipped * (factor / self.clip_range)
        rounded = torch.from_numpy(_stochastic_round(np.concatenate([scaled, extras]), generator))
        if self.noise_sigma > 0:  # (only without levels: __post_init__ refuses noise with them)
            rounded[:-EXTRAS] += discrete_gaussian.sample(self.noise_sigma, update.numel(), generator)
        return rounded

    def dequantise(
        self, total: torch.Tensor, survivors: int, whole_weights: bool = False
    ) -> tuple[torch.Tensor, float, float]:
        """From the unmasked sum (int64 or int32 tensor of update size + 2, in the update's order: each value modulo
        its part's width, Ring) of `survivors` inputs: the weighted mean of the updates, the total weight (in
        samples) and the weighted mean loss. Refused if the sum is beyond what that many clipped inputs can make: a
        value or weighted mean beyond its clip range, a loss mean beyond LOSS_RANGE (each by more than the
        rounding, one integer an input, and the noise's tails), a total weight below survivors inputs of
        least_weight each (less the rounding), and with whole_weights (distributed DP: every learner weighs the
        whole unit) a total weight other than survivors * full_scale within the rounding. A hostile weight element
        that cancels the honest ones would make the values' factors tiny, and the mean the rounding's slack (2 an
        input) magnified by them: with the floor, the mean stays within clip_range * (1 + 2 weight_unit / (levels
        * least_weight)) (levels: the scale, without), about the clip range where every learner weighs the unit."""
        signed = self.ring(len(total) - EXTRAS).signed(total.cpu().numpy())  # two's complement of each part
        values, weight, loss = signed[:-EXTRAS], int(signed[-2]), int(signed[-1])
        most = survivors * (self.full_scale + 1)
        least = survivors * (min(self.least_weight, self.weight_unit) / self.weight_unit * self.full_scale - 1)
        if not max(least, 0) < weight <= most or (
            whole_weights and abs(weight - survivors * self.full_scale) > survivors
        ):
            raise Refused(
                f"the sum's weight ({weight}) is not what {survivors} honest inputs make ({max(least, 0):.0f} to "
                f"{most:.0f})"
            )
        # each value's scale and range; the inputs' factors' sum in its integers (the weight, without levels)
        scales, ranges = self.scales(len(values)) if self.levels else (self.scale, self.clip_range)
        factors = weight * (scales / self.full_scale) if self.levels else weight
        # |values| <= the inputs' factors (sum: at most factors + survivors) + survivors (rounding) + the noise
        bound = factors + 2 * survivors + NOISE_TAILS * math.sqrt(survivors) * self.noise_std / ranges * scales
        if (np.abs(values) > bound).any():
            raise Refused("the sum is beyond what clipped inputs make: beyond the clip range, or a negative weight")
        if not 0 <= loss <= weight + 2 * survivors:
            raise Refused(f"the sum's loss ({loss}) is not what {survivors} honest inputs of weight {weight} make")
        mean = torch.from_numpy((values * (ranges / factors)).astype(np.float32))
        return mean, weight / self.full_scale * self.weight_unit, loss / weight * LOSS_RANGE


@dataclass(frozen=True)
class Ring:
    """Where a masked input lives, as one uint8 buffer whose parts are viewed (and add, wrapping) at their own
    widths: the update's `size` values but the wide ones modulo 2^bits, then its wide values [start, stop) and the
    EXTRAS weight and loss elements modulo 2^32 (Quantisation.ring sets which are wide). At BITS with nothing wide
    (--compress none): exactly size + 2 uint32 words, in the update's order. On the wire (tensors): then one I32
    tensor; else the narrow values as U8 (8 bits), I16 (16 bits) or I32, and the 32-bit part as I32."""

    bits: int
    size: int
    wide: tuple[int, int] = (0, 0)

    @property
    def wide_values(self) -> slice:
        """The update's values kept in the 32-bit part."""
        return slice(*self.wide)

    @property
    def narrow(self) -> int:
        """The values at the ring's width."""
        return self.size - len(range(self.size)[self.wide_values])

    @property
    def _whole(self) -> bool:
        """Whether the input is one 32-bit vector (today's, --compress none's)."""
        return self.bits == BITS and self.narrow == self.size

    @property
    def split(self) -> int:
        """The narrow values' bytes."""
        return self.narrow * self.bits // 8

    @property
    def nbytes(self) -> int:
        return self.split + 4 * (self.size - self.narrow + EXTRAS)

    def parts(self, buffer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The narrow values and the 32-bit part of a buffer, as unsigned views of it at their widths."""
        return buffer[: self.split].view(f"<u{self.bits // 8}"), buffer[self.split :].view("<u4")

    def zeros(self) -> np.ndarray:
        return np.zeros(self.nbytes, dtype=np.uint8)

    def mask(self, key: bytes) -> np.ndarray:
        """The PRG's mask under key, at this layout."""
        return masks.keystream(key, self.nbytes)

    def add(self, total: np.ndarray, other: np.ndarray, sign: int = 1) -> None:
        """total += sign * other (sign +-1), each part modulo its own width."""
        _add_parts(self.parts(total), self.parts(other), sign)

    def add_tensors(self, total: np.ndarray, tensors: dict[str, torch.Tensor]) -> None:
        """total += a masked input's tensors (checked against the spec by the caller), each viewed unsigned at its
        part's width: no copy of the input."""
        unsigned = [
            tensors[name].contiguous().numpy().view(f"<u{dtype.itemsize}") for name, (dtype, _) in self.spec.items()
        ]
        parts = self.parts(unsigned[0].view(np.uint8)) if self._whole else unsigned  # (the extras: the vector's end)
        _add_parts(self.parts(total), parts)

    def residues(self, integers: np.ndarray) -> np.ndarray:
        """A buffer holding the integers (size + 2, in the update's order) modulo each part's width (numpy's casts
        wrap)."""
        buffer = self.zeros()
        narrow, wide = self.parts(buffer)
        start, stop = self.wide_values.start, self.wide_values.stop
        narrow[:] = np.concatenate([integers[:start], integers[stop : self.size]]).astype(narrow.dtype)
        wide[:] = np.concatenate([integers[start:stop], integers[self.size :]]).astype(np.uint32)
        return buffer

    def integers(self, buffer: np.ndarray) -> torch.Tensor:
        """The residues a buffer holds, as int64 (size + 2, in the update's order)."""
        return torch.from_numpy(self._ordered(*self.parts(buffer)))

    def signed(self, integers: np.ndarray) -> np.ndarray:
        """Residues (size + 2, in the update's order) read as two's complement at their part's width, int64."""
        narrow, wide = self.parts(self.residues(integers))
        return self._ordered(narrow.view(f"<i{self.bits // 8}"), wide.view("<i4"))

    def _ordered(self, narrow: np.ndarray, wide: np.ndarray) -> np.ndarray:
        start, stop = self.wide_values.start, self.wide_values.stop
        ordered = np.empty(self.size + EXTRAS, dtype=np.int64)
        ordered[:start], ordered[stop : self.size] = narrow[:start], narrow[start:]
        ordered[start:stop], ordered[self.size :] = wide[: stop - start], wide[stop - start :]
        return ordered

    @property
    def spec(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The masked input's tensors on the wire (names, dtypes, shapes), as its receiver checks them."""
        if self._whole:
            return {MASKED_TENSOR: (torch.int32, (self.size + EXTRAS,))}
        wide = (self.size - self.narrow + EXTRAS,)
        return {MASKED_TENSOR: (WIRE_DTYPES[self.bits], (self.narrow,)), MASKED_EXTRAS: (torch.int32, wide)}

    def tensors(self, buffer: np.ndarray) -> dict[str, torch.Tensor]:
        """A buffer as the masked input's tensors (the narrow values a view of it; the 32-bit part a copy, aligned)."""
        if self._whole:
            return {MASKED_TENSOR: torch.from_numpy(buffer.view(np.int32))}
        values = torch.from_numpy(buffer[: self.split]).view(WIRE_DTYPES[self.bits])
        return {MASKED_TENSOR: values, MASKED_EXTRAS: torch.from_numpy(buffer[self.split :].copy().view(np.int32))}


def _add_parts(into: Sequence[np.ndarray], parts: Sequence[np.ndarray], sign: int = 1) -> None:
    """Each part added to (sign +1) or taken from (-1) its counterpart, in place, wrapping at their width."""
    for total, part in zip(into, parts, strict=True):
        if sign > 0:
            total += part
        else:
            total -= part


def _stochastic_round(values: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """Each value rounded up with probability its fractional part (unbiased), as int64."""
    floor = np.floor(values)
    up = torch.rand(len(values), dtype=torch.float64, generator=generator).numpy() < values - floor
    return floor.astype(np.int64) + up


def _secret_generator() -> torch.Generator:
    """A generator seeded from the OS's randomness: the leader cannot predict a learner's rounding or noise."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def _unique(ids: list[int], what: str) -> frozenset[int]:
    if len(set(ids)) != len(ids):
        raise Refused(f"{what} names a learner twice")
    return frozenset(ids)


def _check_keys(keys: learner_pb2.SecAggKeys, own_private: bytes) -> None:
    """Refused unless both public keys are 32 bytes and agree on a secret with own_private (a low-order point, such
    as 32 zero bytes, agrees on none: every peer would refuse to share with, or mask against, its owner)."""
    if len(keys.cipher_key) != masks.KEY_BYTES or len(keys.mask_key) != masks.KEY_BYTES:
        raise Refused(f"learner {keys.learner_id}'s public keys are not {masks.KEY_BYTES} bytes each")
    _agree(own_private, keys, "cipher_key")
    _agree(own_private, keys, "mask_key")


def _agree(own_private: bytes, peer: learner_pb2.SecAggKeys, which: str) -> bytes:
    try:
        return masks.agree(own_private, getattr(peer, which))
    except ValueError as error:  # a low-order point: no secret to agree on
        raise Refused(f"learner {peer.learner_id}'s {which} agrees on no secret") from error


def _self_mask(seed: bytes, round_index: int, owner: int, ring: Ring) -> np.ndarray:
    return ring.mask(masks.derive(seed, round_index, "self mask", owner))


def _add_pair_mask(total: np.ndarray, ring: Ring, seed: bytes, holder: int, peer: int) -> None:
    """Add into total the pair mask of (holder, peer) from its seed as the holder's input carries it: added by the
    lower id, subtracted by the higher, so that it cancels in the sum (and the leader adds a dropped holder's
    part to cancel a survivor's)."""
    ring.add(total, ring.mask(seed), 1 if holder < peer else -1)


def _share_key(own_private: bytes, peer: learner_pb2.SecAggKeys, round_index: int, own: int) -> bytes:
    return masks.derive(_agree(own_private, peer, "cipher_key"), round_index, "shares", own, peer.learner_id)


class LearnerRound:
    """One learner's side of secure aggregation: one epoch at a time (a new phase 1 opens the next), one round of it
    at a time (a commit opens it). Not thread-safe: a caller answering on several threads holds a lock around each
    call."""

    def __init__(self, learner_id: int) -> None:
        """No epoch yet: its secrets, what the leader named, its round, all unset (phase 1 comes back here)."""
        self.learner_id = learner_id
        self._epoch: int | None = None
        self._setup = 0  # the last of phases 1-3 answered in this epoch
        # the epoch's secrets and what the leader named, set phase by phase (empty before it)
        self._cipher_key, self._mask_key = b"", b""
        self._seeds: list[bytes] = []  # b^0..b^{K-1}
        self._own_keys = learner_pb2.SecAggKeys()
        self._keys: dict[int, learner_pb2.SecAggKeys] = {}
        self._agreed: dict[int, bytes] = {}  # by peer: the X25519 agreement of the mask keys, once per epoch
        self._threshold = 0
        self._plaintexts: dict[int, bytes] = {}  # by other sender: its shares to this learner, decrypted and parsed
        self._own_shares = b""  # its own shares of its seeds (revealed only while it survives)
        # the round: committed to by phase 4 (slot -1: none yet in this epoch)
        self._round: int | None = None
        self._slot = -1
        self._phase = 0  # COMMIT or UNMASK: the last phase answered in the round
        self._masked_sent = False
        self._shared: frozenset[int] = frozenset()

    @property
    def threshold(self) -> int:
        """The shares that reconstruct a seed this epoch (a sum the leader learns has more survivors than this);
        after phase 2."""
        if self._setup < SHARES:
            raise Refused("no threshold before the shares")
        return self._threshold

    def answer(self, request: learner_pb2.SecAggRequest) -> learner_pb2.SecAggReply:
        """The reply to a phase (any of 1-5); raises Refused on anything a hostile leader could use: a request for
        another epoch or round, phases out of order, its own keys changed, duplicated learners or no more than the
        threshold, a threshold at or below half of U1 or at all of it, a slot used already or beyond the epoch, a
        second unmask for the round, U2 holding a sender whose shares failed, U3 not within U2 or no more than the
        threshold. A ciphertext that
        does not decrypt for (epoch, sender, this learner) or does not parse is complained of in phase 3 (its
        sender is then left out of V), not refused."""
        if request.phase == KEYS:
            return self._advertise(request.round)
        if self._epoch is None or request.epoch != self._epoch:
            raise Refused(f"a request for epoch {request.epoch} during epoch {self._epoch}")
        if request.phase > SHARES and request.threshold != self._threshold:
            raise Refused(f"threshold {request.threshold}, not the {self._threshold} shared under")
        if request.phase in (SHARES, VERIFY):
            if request.round != self._epoch or request.phase != self._setup + 1:
                raise Refused(f"phase {request.phase} of round {request.round} after phase {self._setup}")
            return self._share(request) if request.phase == SHARES else self._verify(request)
        if request.phase == COMMIT:
            return self._commit(request)
        if request.phase == UNMASK:
            return self._unmask(request)
        raise Refused(f"no phase {request.phase}")

    def masked_input(
        self, update: torch.Tensor, weight: float, loss: float, quantisation: Quantisation
    ) -> dict[str, torch.Tensor]:
        """After commit: the quantised update plus its masks, as its ring's tensors (Ring.tensors: two's complement
        of the values modulo 2^bits, the extras modulo 2^32). Refused before commit, after unmask, or a second time
        in a round (two inputs under the same masks would give away their difference)."""
        if self._phase != COMMIT or self._masked_sent:
            raise Refused("a masked input is made once per round, after commit and before unmask")
        if quantisation.summands < len(self._shared):
            raise Refused(f"a quantisation for {quantisation.summands} inputs, not the {len(self._shared)} committed")
        quantised = quantisation.quantise(update, weight, loss, _secret_generator())
        self._masked_sent = True
        ring = quantisation.ring(update.numel())
        total = ring.residues(quantised.numpy())
        ring.add(total, _self_mask(self._seeds[self._slot], self._round_index, self.learner_id, ring))
        for peer in sorted(self._shared - {self.learner_id}):
            _add_pair_mask(total, ring, self._pair_seed(peer), self.learner_id, peer)
        return ring.tensors(total)

    @property
    def _round_index(self) -> int:
        assert self._round is not None
        return self._round

    def _pair_seed(self, peer: int) -> bytes:
        """The seed of this round's pair mask with peer: HKDF of the epoch's agreement, for this round only."""
        if peer not in self._agreed:
            self._agreed[peer] = _agree(self._mask_key, self._keys[peer], "mask_key")
        return masks.derive(self._agreed[peer], self._round_index, "pair mask", self.learner_id, peer)

    def _advertise(self, epoch: int) -> learner_pb2.SecAggReply:
        """Phase 1: fresh key pairs, and the previous epoch's secrets forgotten. Any round may open one (a resumed
        leader counts from its checkpoint): a masked input already sent under the forgotten secrets can never be
        unmasked, and nothing revealed under the new ones meets it."""
        self.__init__(self.learner_id)  # type: ignore[misc]  # (the last epoch forgotten: as built)
        self._epoch, self._setup = epoch, KEYS
        self._cipher_key, self._mask_key = masks.new_private_key(), masks.new_private_key()
        self._own_keys = learner_pb2.SecAggKeys(
            learner_id=self.learner_id,
            cipher_key=masks.public_of(self._cipher_key),
            mask_key=masks.public_of(self._mask_key),
        )
        return learner_pb2.SecAggReply(keys=self._own_keys)

    def _share(self, request: learner_pb2.SecAggRequest) -> learner_pb2.SecAggReply:
        """Phase 2: the epoch's self-mask seeds, each Shamir-shared among U1, each recipient's shares encrypted."""
        if not MIN_LEARNERS <= len(request.keys) <= MAX_LEARNERS:  # before any work: each key costs an agreement
            raise Refused(f"{len(request.keys)} learners' keys: a secure round needs {MIN_LEARNERS} to {MAX_LEARNERS}")
        keys = {keys.learner_id: keys for keys in request.keys}
        _unique([keys.learner_id for keys in request.keys], "the advertised keys")
        for peer_keys in keys.values():
            _check_keys(peer_keys, self._cipher_key)  # the leader checked them; a second line against a hostile one
        if min(keys) < 0:
            raise Refused("a learner id below 0 (its share would be evaluated at the secret's point)")
        if keys.get(self.learner_id) != self._own_keys:
            raise Refused("the advertised keys do not hold this learner's own keys unchanged")
        if len(keys) < MIN_LEARNERS:
            raise Refused(f"{len(keys)} learners: a secure round needs {MIN_LEARNERS} or more")
        if not len(keys) / 2 < request.threshold < len(keys):  # (t = all: no round could have more than t)
            raise Refused(f"threshold {request.threshold} is not above half of {len(keys)} learners and below all")
        self._keys, self._threshold, self._setup = keys, request.threshold, SHARES
        self._seeds = [os.urandom(shamir.SECRET_BYTES) for _ in range(EPOCH_ROUNDS)]
        holders = sorted(keys)
        splits = [shamir.split(seed, request.threshold, holders) for seed in self._seeds]
        shares = [
            learner_pb2.SecAggShare(
                sender=self.learner_id,
                recipient=peer,
                ciphertext=masks.encrypt(
                    _share_key(self._cipher_key, keys[peer], request.round, self.learner_id),
                    request.round,
                    self.learner_id,
                    peer,
                    b"".join(split[peer] for split in splits),
                ),
            )
            for peer in holders
            if peer != self.learner_id
        ]
        self._own_shares = b"".join(split[self.learner_id] for split in splits)
        commitment = b"".join(hashlib.sha256(seed).digest() for seed in self._seeds)
        return learner_pb2.SecAggReply(shares=shares, self_mask_commitment=commitment)

    def _verify(self, request: learner_pb2.SecAggRequest) -> learner_pb2.SecAggReply:
        """Phase 3: the shares addressed to this learner by those the leader names, decrypted and parsed before
        anything is committed; complaints: the senders whose shares fail (or are missing)."""
        dealt = _unique(list(request.shared), "the dealt set")
        if not dealt <= set(self._keys) or self.learner_id not in dealt:
            raise Refused("the dealt set is not within the advertised learners, or leaves this learner out")
        if len(dealt) <= self._threshold:
            raise Refused(f"{len(dealt)} dealt learners, not more than the threshold {self._threshold}")
        plaintexts: dict[int, bytes] = {}
        for share in request.shares:
            expected = share.recipient == self.learner_id and share.sender in dealt - {self.learner_id}
            if not expected or share.sender in plaintexts:  # (a second one from a sender too)
                raise Refused(f"a share from {share.sender} to {share.recipient} is not one this learner expects")
            key = _share_key(self._cipher_key, self._keys[share.sender], self._epoch_index, self.learner_id)
            try:
                plaintext = masks.decrypt(key, self._epoch_index, share.sender, self.learner_id, share.ciphertext)
                _parse_shares(plaintext)
            except (masks.Undecryptable, shamir.MalformedShare):
                continue
            plaintexts[share.sender] = plaintext
        self._plaintexts, self._setup = plaintexts, VERIFY
        return learner_pb2.SecAggReply(complaints=sorted(dealt - set(plaintexts) - {self.learner_id}))

    @property
    def _epoch_index(self) -> int:
        assert self._epoch is not None
        return self._epoch

    def _commit(self, request: learner_pb2.SecAggRequest) -> learner_pb2.SecAggReply:
        """Phase 4: round r at slot r - epoch, later than any slot committed to this epoch; U2, the learners whose
        shares to this learner it holds, parsed: this round's masks are agreed with them only."""
        if self._setup != VERIFY:
            raise Refused(f"a commit before the shares of epoch {self._epoch} were verified")
        slot = request.round - self._epoch_index
        if not 0 <= slot < EPOCH_ROUNDS:
            raise Refused(f"round {request.round} is beyond epoch {self._epoch}'s {EPOCH_ROUNDS} slots")
        if slot <= self._slot:
            raise Refused(f"round {request.round}'s slot {slot} is at or below slot {self._slot}, committed to already")
        shared = _unique(list(request.shared), "the committed set")
        if not shared - {self.learner_id} <= set(self._plaintexts) or self.learner_id not in shared:
            raise Refused("the committed set holds learners whose shares this learner lacks, or leaves it out")
        if len(shared) <= self._threshold:
            raise Refused(
                f"{len(shared)} committed learners: a round unmasks with more than the threshold {self._threshold}"
            )
        self._round, self._slot, self._shared, self._phase, self._masked_sent = (
            request.round,
            slot,
            shared,
            COMMIT,
            False,
        )
        return learner_pb2.SecAggReply()

    def _unmask(self, request: learner_pb2.SecAggRequest) -> learner_pb2.SecAggReply:
        """Phase 5: for each survivor (itself too), this learner's share of its seed for the round's slot; for each
        dropped learner (U2 minus U3), this learner's pair seed with it for this round: one kind per owner, once;
        only for a U3 of more than the threshold."""
        if request.round != self._round or self._phase != COMMIT:
            raise Refused(f"an unmask for round {request.round}: not the round committed to, or a second unmask")
        if _unique(list(request.shared), "the committed set") != self._shared:
            raise Refused("the committed set differs from the one committed to")
        survivors = _unique(list(request.survivors), "the survivors")
        if not survivors <= self._shared or self.learner_id not in survivors:
            raise Refused("the survivors are not within the committed set, or leave this learner out")
        if len(survivors) <= self._threshold:  # (the argument in the module's docstring needs t others in U3)
            raise Refused(
                f"{len(survivors)} survivors, not more than the threshold {self._threshold}: nothing revealed"
            )
        reveals = []
        for owner in sorted(self._shared):
            dropped = owner not in survivors
            shares = self._own_shares if owner == self.learner_id else self._plaintexts.get(owner, b"")
            share = self._pair_seed(owner) if dropped else _parse_shares(shares)[self._slot]
            reveals.append(learner_pb2.SecAggReveal(owner=owner, mask_key=dropped, share=share))
        self._phase = UNMASK
        return learner_pb2.SecAggReply(reveals=reveals)


def _parse_shares(plaintext: bytes) -> list[bytes]:
    """A recipient's plaintext: its shares of the sender's EPOCH_ROUNDS seeds, slot by slot; MalformedShare unless
    each is a field element of the fixed length."""
    if len(plaintext) != SHARE_PLAINTEXT:
        raise shamir.MalformedShare(f"{len(plaintext)} bytes of shares, not {SHARE_PLAINTEXT}")
    shares = [plaintext[start : start + shamir.SHARE_BYTES] for start in range(0, SHARE_PLAINTEXT, shamir.SHARE_BYTES)]
    for share in shares:
        shamir.decode(share)
    return shares


class LeaderEpoch:
    """The leader's side of one epoch's setup (phases 1-3): collects keys, shares and complaints, fixes V, and opens
    the epoch's rounds, each at its own slot. Not thread-safe: a caller taking replies on several threads holds a
    lock around each call.

    Each set is fixed by the first request that names it: U1 (advertised keys) by phase 2's, the dealt (shares
    taken) by phase 3's, V (verified: the dealt that answered phase 3, less those complained of or, below the
    threshold, less the complainers) by the first round's; a reply arriving later is refused. Nobody is blamed
    beyond its epoch: without verifiable secret sharing a share off its secret's polynomial may be a false reveal
    or a false dealing, so false shares are only outvoted, and a secret they leave unreconstructable discards the
    round."""

    def __init__(self, epoch: int, participants: list[int], threshold: int) -> None:
        if len(set(participants)) != len(participants) or len(participants) < MIN_LEARNERS:
            raise ValueError(f"a secure round needs {MIN_LEARNERS} or more distinct learners, not {participants}")
        if not len(participants) / 2 < threshold <= len(participants):
            raise ValueError(f"threshold {threshold} is not above half of {len(participants)} learners")
        self.epoch, self.participants, self.threshold = epoch, set(participants), threshold
        self._keys: dict[int, learner_pb2.SecAggKeys] = {}
        self._ciphertexts: dict[int, dict[int, learner_pb2.SecAggShare]] = {}  # by recipient, then sender
        self._commitments: dict[int, bytes] = {}
        self._complaints: dict[int, set[int]] = {}  # by complainer: the senders whose shares to it failed
        self._slot = -1  # the last slot a round was opened at
        self.advertised: tuple[int, ...] | None = None  # U1
        self.dealt: tuple[int, ...] | None = None
        self._verified: tuple[int, ...] | None = None  # V

    def request(self, phase: int, learner_id: int) -> learner_pb2.SecAggRequest:
        """The request of a setup phase for one learner (phase 3: with the ciphertexts addressed to it);
        BelowThreshold if the set the phase names is no larger than the threshold (no round of it could unmask: the
        epoch is then not opened)."""
        request = learner_pb2.SecAggRequest(round=self.epoch, phase=phase, threshold=self.threshold, epoch=self.epoch)
        if phase == KEYS:
            return request
        if phase == SHARES:
            self.advertised = self.advertised or _fixed(self._keys, "advertised keys", self.threshold + 1)
            request.keys.extend(self._keys[learner] for learner in self.advertised)
            return _for(request, learner_id, self.advertised)
        if phase != VERIFY:
            raise ValueError(f"no setup phase {phase}")
        self.dealt = self.dealt or _fixed(self._commitments, "shared", self.threshold + 1)
        request.shared.extend(self.dealt)
        request.shares.extend(self._ciphertexts.get(learner_id, {}).values())
        return _for(request, learner_id, self.dealt)

    def take(self, phase: int, learner_id: int, reply: learner_pb2.SecAggReply) -> None:
        """A learner's reply to a setup phase; raises Refused (it is then left out of the epoch) if malformed or if
        it answers for another learner."""
        if learner_id not in self.participants:
            raise Refused(f"learner {learner_id} is not in epoch {self.epoch}")
        if phase == KEYS:
            self._take_keys(learner_id, reply.keys)
        elif phase == SHARES:
            self._take_shares(learner_id, reply)
        elif phase == VERIFY:
            self._take_complaints(learner_id, reply.complaints)
        else:
            raise Refused(f"no setup phase {phase}")

    @property
    def verified(self) -> tuple[int, ...]:
        """V: fixed once (after phase 3's replies); BelowThreshold if fewer than the threshold."""
        self._verified = self._verified or self._verify()
        return self._verified

    def has_slot(self, round_index: int) -> bool:
        """Whether round_index may still be opened in this epoch: a slot within it, after the last one opened."""
        return self._slot < round_index - self.epoch < EPOCH_ROUNDS

    def open_round(self, round_index: int, learners: Collection[int], ring: Ring) -> "LeaderRound":
        """Round round_index of this epoch with these learners as U2 (all within V); ring: the masked inputs'
        layout. BelowThreshold if fewer than the threshold + 1: learners reveal nothing for fewer
        survivors (the argument in the module's docstring), so fewer could never be unmasked."""
        if not self.has_slot(round_index):
            raise ValueError(f"round {round_index} has no free slot in epoch {self.epoch}")
        if not set(learners) <= set(self.verified):
            raise ValueError(f"learners {sorted(set(learners) - set(self.verified))} are not verified this epoch")
        self._slot = round_index - self.epoch
        if len(learners) <= self.threshold:
            raise BelowThreshold(f"{len(learners)} learners to commit: a round unmasks with the threshold + 1 or more")
        return LeaderRound(self, round_index, tuple(sorted(learners)), ring)

    def commitment(self, owner: int, slot: int) -> bytes:
        return self._commitments[owner][slot * DIGEST_BYTES : (slot + 1) * DIGEST_BYTES]

    def _verify(self) -> tuple[int, ...]:
        """V: the dealt that answered phase 3, less every sender complained of; unless that is below the threshold:
        then less the complainers instead (this epoch only), so that one learner complaining of every other cannot
        discard every round. Those left hold well-formed shares of every dealt learner, so of each other."""
        accused = {sender for senders in self._complaints.values() for sender in senders}
        if len(set(self._complaints) - accused) > self.threshold:  # a round needs more than t
            return _fixed(set(self._complaints) - accused, "verified their shares", self.threshold + 1)
        complainers = sorted(learner for learner, senders in self._complaints.items() if senders)
        log.warning(
            "secure epoch of round %d: the learners complained of (%s) would leave no more than the threshold %d: the "
            "complainers (%s) are left out of this epoch instead",
            self.epoch + 1,
            ", ".join(map(str, sorted(accused))),
            self.threshold,
            ", ".join(map(str, complainers)),
        )
        return _fixed(
            set(self._complaints) - set(complainers), "verified their shares without complaining", self.threshold + 1
        )

    def _take_keys(self, learner_id: int, keys: learner_pb2.SecAggKeys) -> None:
        if self.advertised is not None or learner_id in self._keys:
            raise Refused(f"learner {learner_id}'s keys come late or twice")
        if keys.learner_id != learner_id:
            raise Refused(f"learner {learner_id} answered with learner {keys.learner_id}'s keys")
        _check_keys(keys, masks.new_private_key())
        taken = {key for other in self._keys.values() for key in (other.cipher_key, other.mask_key)}
        if keys.cipher_key in taken or keys.mask_key in taken or keys.cipher_key == keys.mask_key:
            raise Refused(f"learner {learner_id}'s keys repeat keys already advertised")
        self._keys[learner_id] = keys

    def _take_shares(self, learner_id: int, reply: learner_pb2.SecAggReply) -> None:
        if self.advertised is None or self.dealt is not None or learner_id in self._commitments:
            raise Refused(f"learner {learner_id}'s shares come out of turn or twice")
        if learner_id not in self.advertised:
            raise Refused(f"learner {learner_id} advertised no keys")
        recipients = [share.recipient for share in reply.shares]
        if any(share.sender != learner_id for share in reply.shares):
            raise Refused(f"learner {learner_id} sent shares in another learner's name")
        if sorted(recipients) != [peer for peer in self.advertised if peer != learner_id]:
            raise Refused(f"learner {learner_id}'s shares are not one for each other advertised learner")
        if any(len(share.ciphertext) != masks.ciphertext_bytes(SHARE_PLAINTEXT) for share in reply.shares):
            raise Refused(f"learner {learner_id}'s shares are not {masks.ciphertext_bytes(SHARE_PLAINTEXT)} bytes")
        if len(reply.self_mask_commitment) != EPOCH_ROUNDS * DIGEST_BYTES:
            raise Refused(f"learner {learner_id}'s self-mask commitment is not {EPOCH_ROUNDS} SHA-256 digests")
        for share in reply.shares:
            self._ciphertexts.setdefault(share.recipient, {})[learner_id] = share
        self._commitments[learner_id] = reply.self_mask_commitment

    def _take_complaints(self, learner_id: int, complaints: Sequence[int]) -> None:
        if self.dealt is None or self._verified is not None or learner_id in self._complaints:
            raise Refused(f"learner {learner_id}'s complaints come out of turn or twice")
        if learner_id not in self.dealt or not set(complaints) <= set(self.dealt) - {learner_id}:
            raise Refused(f"learner {learner_id} was dealt no shares, or complains of learners that dealt none")
        self._complaints[learner_id] = set(complaints)


class LeaderRound:
    """The leader's side of one round of an epoch (phases 4 and 5): U2 named, the masked inputs' sum, the reveals,
    the unmasking. Not thread-safe: a caller taking replies on several threads holds a lock around each call.
    U3 (masked inputs arrived) is fixed by phase 5's first request; an input arriving later is refused."""

    def __init__(self, epoch: LeaderEpoch, round_index: int, shared: tuple[int, ...], ring: Ring) -> None:
        """Made by LeaderEpoch.open_round."""
        self.epoch, self.round_index, self.shared, self.ring = epoch, round_index, shared, ring
        self.threshold = epoch.threshold
        self.slot = round_index - epoch.epoch
        self._seed_shares: dict[int, dict[int, bytes]] = {}  # by survivor, then holder: shares of its slot's seed
        self._pair_seeds: dict[int, dict[int, bytes]] = {}  # by dropped learner, then survivor: their pair seed
        self._revealed: set[int] = set()
        self._arrived: set[int] = set()
        self._sum = ring.zeros()
        self._unmasked = False
        self.survivors: tuple[int, ...] | None = None  # U3

    def request(self, phase: int, learner_id: int) -> learner_pb2.SecAggRequest:
        """The request of phase 4 or 5 for one learner; BelowThreshold if no more than the threshold survived (the
        learners would refuse to reveal: the round is then discarded)."""
        request = learner_pb2.SecAggRequest(
            round=self.round_index, phase=phase, threshold=self.threshold, epoch=self.epoch.epoch, shared=self.shared
        )
        if phase == COMMIT:
            return _for(request, learner_id, self.shared)
        if phase != UNMASK:
            raise ValueError(f"no round phase {phase}")
        self.survivors = self.survivors or _fixed(self._arrived, "sent their masked input", self.threshold + 1)
        request.survivors.extend(self.survivors)
        return _for(request, learner_id, self.survivors)

    def take(self, phase: int, learner_id: int, reply: learner_pb2.SecAggReply) -> None:
        """A learner's reply to phase 4 (empty: the commit is acknowledged) or 5; raises Refused (it is then left
        out of the round) if malformed or if it answers for another learner."""
        if learner_id not in self.shared:
            raise Refused(f"learner {learner_id} is not committed to round {self.round_index}")
        if phase == UNMASK:
            self._take_reveals(learner_id, reply.reveals)
        elif phase != COMMIT:
            raise Refused(f"no round phase {phase}")

    def add_masked(self, learner_id: int, masked: dict[str, torch.Tensor]) -> None:
        """Add a committed learner's masked input (its tensors, as the ring's spec names them) to the running sum;
        Refused if they are not the spec's, it is not in U2, or it already sent one."""
        if learner_id not in self.shared or self.survivors is not None:
            raise Refused(f"learner {learner_id}'s masked input is not expected now")
        if learner_id in self._arrived:
            raise Refused(f"learner {learner_id} already sent its masked input")
        described = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in masked.items()}
        if described != self.ring.spec:
            raise Refused(f"a masked input must be {self.ring.spec}, not {described}")
        self.ring.add_tensors(self._sum, masked)
        self._arrived.add(learner_id)

    def unmask(self) -> torch.Tensor:
        """After phase 5: the sum of the survivors' quantised inputs (Ring.integers: int64 residues modulo 2^bits,
        the extras modulo 2^32); raises
        BelowThreshold when a survivor's seed cannot be reconstructed from threshold consistent shares (matching its
        commitment for the slot), or a learner dropped while a survivor revealed
        nothing (its pair mask with the dropped one is then in the sum for good). Every count is checked before
        anything is reconstructed."""
        if self.survivors is None or self._unmasked:
            raise ValueError("unmask comes once, after phase 5")
        survivors, dropped = sorted(self.survivors), sorted(set(self.shared) - set(self.survivors))
        silent = sorted(set(survivors) - self._revealed) if dropped else []
        if silent:
            raise BelowThreshold(
                f"learners {silent} sent their masked input but revealed nothing, while learners {dropped} dropped: "
                "their pair masks cannot be removed, the round is discarded"
            )
        short = [owner for owner in survivors if len(self._seed_shares.get(owner, {})) < self.threshold]
        if short:
            raise BelowThreshold(
                f"fewer than {self.threshold} shares of the seeds of learners {short}: the round is discarded"
            )
        seeds = {owner: self._reconstruct(owner) for owner in survivors}
        self._unmasked, total = True, self._sum  # unmasked in place: one vector's memory
        for owner, seed in seeds.items():
            self.ring.add(total, _self_mask(seed, self.round_index, owner, self.ring), -1)
        for owner in dropped:
            for survivor, seed in self._pair_seeds[owner].items():
                _add_pair_mask(total, self.ring, seed, owner, survivor)  # what the dropped one's input would carry
        return self.ring.integers(total)

    def _take_reveals(self, learner_id: int, reveals: Sequence[learner_pb2.SecAggReveal]) -> None:
        if self.survivors is None or learner_id not in self.survivors or learner_id in self._revealed:
            raise Refused(f"learner {learner_id}'s reveals come out of turn or twice")
        if sorted(reveal.owner for reveal in reveals) != list(self.shared):
            raise Refused(f"learner {learner_id}'s reveals are not one for each committed learner")
        for reveal in reveals:
            if reveal.mask_key != (reveal.owner not in self.survivors):
                raise Refused(f"learner {learner_id} revealed the wrong secret of learner {reveal.owner}")
            if reveal.mask_key and len(reveal.share) != masks.KEY_BYTES:
                raise Refused(f"learner {learner_id}'s pair seed with learner {reveal.owner} is not {masks.KEY_BYTES}")
            try:
                if not reveal.mask_key:
                    shamir.decode(reveal.share)
            except shamir.MalformedShare as error:
                raise Refused(f"learner {learner_id}'s share of learner {reveal.owner}: {error}") from error
        for reveal in reveals:
            revealed = self._pair_seeds if reveal.mask_key else self._seed_shares
            revealed.setdefault(reveal.owner, {})[learner_id] = reveal.share
        self._revealed.add(learner_id)

    def _reconstruct(self, owner: int) -> bytes:
        """The owner's seed for this round's slot from `threshold` of its revealed shares that match its commitment:
        up to MAX_COMBINATIONS random subsets (random: no holder can sit in every subset tried), so false shares are
        outvoted. BelowThreshold (naming the owner) if none passes: its commitment or its dealing was false, or
        holders revealed false shares; the leader cannot tell which, so nobody is blamed."""
        shares, commitment = self._seed_shares[owner], self.epoch.commitment(owner, self.slot)
        for _ in range(MAX_COMBINATIONS):
            polynomial = shamir.Polynomial(
                {holder: shares[holder] for holder in _RANDOM.sample(sorted(shares), self.threshold)}
            )
            try:
                secret = polynomial.secret()
            except shamir.MalformedShare:
                continue
            if hashlib.sha256(secret).digest() == commitment:
                return secret
        raise BelowThreshold(f"no {self.threshold} of learner {owner}'s shares agree: the round is discarded")


def _fixed(learners: Collection[int], what: str, least: int) -> tuple[int, ...]:
    if len(learners) < least:
        raise BelowThreshold(f"{len(learners)} learners {what}, fewer than the {least} needed")
    return tuple(sorted(learners))


def _for(request: learner_pb2.SecAggRequest, learner: int, members: tuple[int, ...]) -> learner_pb2.SecAggRequest:
    if learner not in members:
        raise ValueError(f"learner {learner} is not among {members}: it gets no phase {request.phase}")
    return request
