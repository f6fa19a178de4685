"""The leader's differential privacy: its central mechanism (--dp central), its accountant (--dp central and
distributed, one step a round) and the budget (--dp-target-epsilon) that ends a run before a round would exceed
it."""

import math

from federated.leader.config import LeaderConfig
from federated.privacy.accountant import Accountant
from federated.privacy.dp import CentralMechanism


class LeaderPrivacy:
    """What a --dp run's leader spends, round by round, and keeps in its checkpoints."""

    def __init__(self, config: LeaderConfig, saved: dict | None = None) -> None:
        """saved: the checkpoint a resume continues from (its accountant's history, target and adapted clip)."""
        recorded = (saved or {}).get("privacy", {})
        self.config = config
        # a resume keeps the target its checkpoint ran under unless given one: left out, the budget stays spent
        self.target = config.dp_target_epsilon or recorded.get("target_epsilon", 0.0)
        self.accountant = Accountant(config.dp_delta, recorded.get("accountant"))
        per_round = config.learners_per_round or config.learners
        # Amplification by sampling needs a draw the adversary cannot see: never under distributed DP (the leader
        # draws), under central only when claimed (learners receive the participant list; --seed seeds the draw).
        # A claimed draw of a fixed number is charged as Poisson sampling at that rate, as Opacus charges its
        # fixed-size batches (docs/differential-privacy.md). The next round is predicted at the last one's rate (at
        # 1 before this process charged any: a resume's first round, whose draw was restored, is charged at 1).
        self.claims_sampling = config.dp == "central" and config.dp_secret_sampling
        self.sample_rate = 1.0
        self.mechanism = (
            CentralMechanism(
                recorded.get("clip", config.dp_clip), config.dp_noise_multiplier, config.dp_clip_quantile, per_round
            )
            if config.dp == "central"
            else None
        )

    def charge_round(self, released: bool = True, sample_rate: float = 1.0) -> dict:
        """A round closed: charge it if it released a noised aggregate, at sample_rate (the fraction of the
        candidates its learners were drawn from) where secret sampling is claimed, else at 1; returns the round
        record's privacy fields (the epsilon spent so far, and an adaptive clip's value for the next round)."""
        if self.claims_sampling:
            self.sample_rate = sample_rate
        if released:
            self.accountant.step(self.config.dp_noise_multiplier, self.sample_rate)
        adaptive = self.mechanism.clip if self.mechanism is not None and self.mechanism.adaptive else None
        return {"epsilon": self.accountant.epsilon(), **({"dp_clip": adaptive} if adaptive is not None else {})}

    def exhausted(self) -> str | None:
        """Why the next round may not run (it would spend more than --dp-target-epsilon), or None."""
        target = self.target
        if not target:
            return None
        after = self.accountant.epsilon_after(self.config.dp_noise_multiplier, self.sample_rate)
        if after <= target:
            return None
        return (
            f"the privacy budget is spent: epsilon {self.accountant.epsilon():.4g} so far, another round would make "
            f"it {after:.4g}, above --dp-target-epsilon {target:g} (delta {self.config.dp_delta:g})"
        )

    def swamped(self, learners: int, size: int) -> str:
        """Why a run under learner-level DP may make no sane step: how large the noise on a round's mean of
        `learners` updates of `size` values is (sigma C sqrt(size) / learners, each update at most C; under
        distributed DP at least that: each survivor adds its share), and what shrinks it. Said when refused steps
        stop the run."""
        mechanism = self.mechanism  # central: the clip adapted so far, and the multiplier the update's noise has
        sigma = mechanism.update_noise_multiplier if mechanism else self.config.dp_noise_multiplier
        clip = mechanism.clip if mechanism else self.config.dp_clip
        ratio = sigma * math.sqrt(size) / max(learners, 1)
        near = "near" if mechanism else "of at least"
        return (
            f"under --dp {self.config.dp} the noise on the mean of the round's {learners} updates has a norm {near} "
            f"{ratio * clip:.3g}, {ratio:.3g} times the clip {clip:.3g} that bounds each update: learner-level DP "
            "needs many more learners a round (the noise falls as 1/learners), a smaller --dp-noise-multiplier (it "
            "spends epsilon faster: raise --dp-target-epsilon to allow it) or a smaller model"
        )

    def checkpoint(self) -> dict:
        """What a resume needs to report the same epsilon and clip as an uninterrupted run."""
        clip = {"clip": self.mechanism.clip} if self.mechanism is not None else {}
        return {"privacy": {"accountant": self.accountant.state(), "target_epsilon": self.target, **clip}}
