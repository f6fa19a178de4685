"""What learners do in a round, as the leader's strategy plans it and a learner's local update follows it, and
the bounds a learner holds a plan to (the leader's flags are held to the same ones). No torch: the flag table
reads these bounds before anything heavy is imported."""

from dataclasses import dataclass

MAX_CLIENT_LR, MAX_CLIENT_MOMENTUM, MAX_WEIGHT_DECAY, MAX_MU = 1e3, 0.999, 1.0, 1e3
MAX_LEARNERS = 4096  # the most learner ids a state may name as a round's participants
MAX_SEED = 2**32 - 1  # a run's --seed, as a state carries it: 32 bits, like numpy's seeds


@dataclass(frozen=True)
class TrainingPlan:
    """How learners train in the coming round. FedSGD: one gradient on one batch. Any other strategy:
    local_steps SGD steps with the client optimizer, then the pseudo-gradient."""

    strategy: str = "fedsgd"
    local_steps: int = 1
    client_lr: float = 0.0
    client_momentum: float = 0.0
    weight_decay: float = 0.0
    mu: float = 0.0  # FedProx's proximal weight
    participants: tuple[int, ...] | None = None  # None: every learner trains this round
    evaluate: bool = False  # learners with held-out images evaluate this state first and report it

    def takes_part(self, learner_id: int) -> bool:
        return self.participants is None or learner_id in self.participants
