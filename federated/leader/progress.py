"""Whether a run is learning: checked once, a tenth of the way in, from its metrics.jsonl records: a warning when
neither its test loss nor its train loss has fallen below where it started."""

import math
import statistics

# A loss has fallen when its recent mean is this fraction below its first values' mean: a model that does not
# change still sees other batches, whose losses differ by a few per cent.
MIN_FALL = 0.05


def check_round(total_rounds: int, warmup_rounds: int) -> int | None:
    """The round after which the run is checked: a tenth of it, but not before its warm-up is over (a learning
    rate still rising may not have moved the loss yet) nor before two rounds; None when the run is too short."""
    at = max(2, math.ceil(total_rounds / 10), warmup_rounds)
    return at if at <= total_rounds else None


def fallen(losses: list[float]) -> bool:
    """Whether a loss's latest values (the last quarter of them) are MIN_FALL below its first ones (the first
    quarter): two values at least, else there is nothing to compare."""
    if len(losses) < 2:
        return False
    quarter = max(1, len(losses) // 4)
    return statistics.fmean(losses[-quarter:]) < (1 - MIN_FALL) * statistics.fmean(losses[:quarter])


def losses(records: list[dict], through_round: int) -> tuple[list[float], list[float]]:
    """The train losses of the rounds and the test losses of the global model's evaluations (the leader's where
    it has a test split, else the learners'), in order, up to through_round."""
    known = [r for r in records if r["round"] <= through_round]
    train = [r["train_loss"] for r in known if given(r.get("train_loss"))]
    evaluations = [r for r in known if given(r.get("test_loss"))]
    sources = {r.get("source", "leader") for r in evaluations}
    source = "leader" if "leader" in sources else "learners"
    return train, [r["test_loss"] for r in evaluations if r.get("source", "leader") == source]


def given(loss: float | None) -> bool:
    """Whether a recorded loss is a number: metrics.jsonl writes a NaN loss as null (None when read back)."""
    return loss is not None and not math.isnan(loss)


def not_learning(records: list[dict], through_round: int, suspects: str) -> str | None:
    """The warning for a run whose records up to through_round show neither loss fallen (None if one has);
    suspects: the flags most likely at fault, with their values."""
    train, test = losses(records, through_round)
    if fallen(train) or fallen(test):
        return None
    return (
        f"the model is not learning: after {through_round} rounds neither the train loss "
        f"({describe(train)}) nor the test loss ({describe(test)}) has fallen below where it started; "
        f"check {suspects}"
    )


def describe(values: list[float]) -> str:
    return f"{values[0]:.4g}, now {values[-1]:.4g}" if len(values) > 1 else "too few values to compare"
