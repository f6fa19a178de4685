"""The privacy a learner requires of the leader's plan whatever the leader asks (--require-secure-aggregation,
--min-noise-multiplier): why it sits a round out, or None."""

from federated.core.plan import TrainingPlan
from federated.learner.config import LearnerConfig

NOISED_HERE = ("distributed", "local")  # the modes whose noise this learner adds itself


def refusal(config: LearnerConfig, plan: TrainingPlan) -> str | None:
    """Why this learner must sit out a round of this plan, or None. Only what it enforces itself counts: the
    noise of central DP is the leader's to add (or not), so --min-noise-multiplier sits out its rounds too."""
    if config.require_secure_aggregation and plan.secure is None:
        return (
            "the leader's plan asks for a plain update (no secure round), and --require-secure-aggregation sends "
            "only masked inputs"
        )
    floor = config.min_noise_multiplier
    if floor and plan.dp not in NOISED_HERE:
        return (
            f"the leader's plan asks for --dp {plan.dp}, whose noise this learner does not add itself, and "
            f"--min-noise-multiplier {floor:g} trains only under distributed or local DP"
        )
    if floor and plan.dp_noise_multiplier < floor:
        return (
            f"the leader's plan asks for --dp {plan.dp} with noise multiplier {plan.dp_noise_multiplier:g}, below "
            f"--min-noise-multiplier {floor:g}"
        )
    return None
