"""What learners do in a round, as the leader's strategy plans it and a learner's local update follows it, and
the bounds a learner holds a plan to (the leader's flags are held to the same ones). No torch: the flag table
reads these bounds before anything heavy is imported."""

from dataclasses import dataclass, field, replace

MAX_CLIENT_LR, MAX_CLIENT_MOMENTUM, MAX_WEIGHT_DECAY, MAX_MU = 1e3, 0.999, 1.0, 1e3
MAX_LEARNERS = 4096  # the most learner ids a state may name as a round's participants
MAX_SEED = 2**32 - 1  # a run's --seed, as a state carries it: 32 bits, like numpy's seeds
# --local-epochs, and a state's local_epochs: passes over a shard a round (McMahan et al. tried up to 20); with
# shards of at most 2^32 images, steps_for_epochs stays a finite number of steps below 2^42
MAX_LOCAL_EPOCHS = 1e3
LOCAL_STEPS_PER = ("federation", "learner")  # --local-steps-per: the same steps for all, or each its own shard's
DP_MODES = ("none", "central", "distributed", "local")  # --dp
MAX_DP_CLIP, MAX_DP_NOISE_MULTIPLIER = 1e6, 1e3  # --dp-clip, --dp-noise-multiplier
MAX_CLIP_RANGE = 1e6  # --secagg-clip-range, and a state's: beyond it the quantisation's steps exceed any update
MAX_WEIGHT_UNIT = float(1 << 42)  # a secure round's weight unit: the samples of one learner's round, at most
MAX_COMPRESS_RANK = 64  # --compress-rank, and a state's: PowerSGD's factors beyond it save little over the tensor
# --compress-ratio with --compress-down randk, and a delta's: a learner draws random-k's k positions in a Python
# loop (distinct_positions, about a microsecond each), under its reference's lock: at ratio 1, a minute for 60M values
MAX_DELTA_RANDK_RATIO = 0.1


@dataclass(frozen=True)
class SecureRound:
    """What a secure round asks of its learners' masked inputs (privacy/secagg.py's Quantisation): values clipped
    to [-clip_range, clip_range], weights in units of weight_unit (the most samples one update may weigh: a
    learner clamps its own), and room in 32 bits for the sum of `summands` inputs; with levels (--compress
    int8/int4, which the plan's compress carries), values rounded to [-levels, levels] in the narrowest ring
    that holds that sum. Its fields are Quantisation's, named alike: Quantisation(**asdict(secure)). least_weight,
    the least samples an honest update weighs, is the leader's alone (it refuses a sum weighing less): it does not
    travel to learners, so a plan compares equal without it."""

    clip_range: float
    weight_unit: float
    summands: int
    levels: int = 0
    least_weight: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class TrainingPlan:
    """How learners train in the coming round. FedSGD: one gradient on one batch. Any other strategy:
    local_steps SGD steps with the client optimizer, then the pseudo-gradient; with local_epochs, each learner
    takes as many as that many passes over its own shard make instead (McMahan et al. 2017), see for_shard."""

    strategy: str = "fedsgd"
    local_steps: int = 1
    client_lr: float = 0.0
    client_momentum: float = 0.0
    weight_decay: float = 0.0
    mu: float = 0.0  # FedProx's proximal weight
    participants: tuple[int, ...] | None = None  # None: every learner trains this round
    evaluate: bool = False  # learners with held-out images evaluate this state first and report it
    local_epochs: float = 0.0  # > 0: passes over each learner's own shard, which replace local_steps (for_shard)
    secure: SecureRound | None = None  # secure aggregation: learners send masked inputs, never a plain update
    # --dp: distributed, each learner clips its update to dp_clip and adds its share of noise dp_noise_multiplier
    # * dp_clip; local, each example's gradient is clipped and noised so (DP-SGD); central, learners do nothing
    dp: str = "none"
    dp_clip: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 0.0  # --dp-delta: local, each learner's own accountant reports its epsilon at it
    # --compress: the codec of learners' updates (core/compression), its top-k/random-k ratio and PowerSGD rank
    compress: str = "none"
    compress_ratio: float = 0.01
    compress_rank: int = 2

    def takes_part(self, learner_id: int) -> bool:
        return self.participants is None or learner_id in self.participants

    def for_shard(self, shard_size: int, batch_size: int) -> "TrainingPlan":
        """The plan as a learner holding shard_size training images follows it: with local_epochs, its own
        local_steps (local_epochs passes over its shard); otherwise the plan as it is."""
        if not self.local_epochs:
            return self
        return replace(self, local_steps=steps_for_epochs(self.local_epochs, steps_per_epoch(shard_size, batch_size)))


def steps_per_epoch(shard_size: int, batch_size: int) -> int:
    """The batches of one pass over a shard (the last partial batch dropped; a shard smaller than a batch: one
    smaller batch)."""
    return max(1, shard_size // batch_size)


def steps_for_epochs(epochs: float, epoch_steps: int) -> int:
    """Local steps for `epochs` passes of epoch_steps batches each (at least one; epochs saturate at
    MAX_LOCAL_EPOCHS, so that no value makes the count infinite)."""
    return max(1, round(min(epochs, MAX_LOCAL_EPOCHS) * epoch_steps))
