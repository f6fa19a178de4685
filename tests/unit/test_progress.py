"""The not-learning check: when it looks (a tenth of the run, after warm-up) and what it calls learning."""

import math

from federated.leader import progress

SUSPECTS = "--server-lr (now 1e-06) and --client-lr (now 0.05)"


def rounds(*train: float) -> list[dict]:
    return [{"round": index + 1, "train_loss": loss} for index, loss in enumerate(train)]


def evaluation(round_index: int, loss: float, source: str = "leader") -> dict:
    return {"round": round_index, "source": source, "test_loss": loss, "test_accuracy": 0.1}


def test_the_check_comes_a_tenth_of_the_way_in_once_warm_up_is_over_and_not_in_runs_too_short_to_tell():
    assert progress.check_round(200, 11) == 20
    assert progress.check_round(20, 4) == 4  # warm-up ends after a tenth
    assert progress.check_round(10, 0) == 2  # the first round alone is only the start
    assert progress.check_round(1, 0) is None


def test_a_flat_train_loss_warns_and_names_the_suspected_flags():
    # a model that does not change: its rounds' losses wander by a few per cent around the start
    flat = rounds(2.531, 2.544, 2.564, 2.494, 2.528, 2.49, 2.471, 2.514)
    warning = progress.not_learning(flat, 8, SUSPECTS)
    assert warning is not None and SUSPECTS in warning and "2.531, now 2.514" in warning
    rising = [*rounds(2.3, 2.4, 2.6, 2.9), evaluation(2, 2.31), evaluation(4, 2.6)]
    assert progress.not_learning(rising, 4, SUSPECTS) is not None


def test_either_loss_falling_is_learning():
    assert progress.not_learning(rounds(2.53, 2.40), 2, SUSPECTS) is None  # 5 % down in the second round
    flat_train = rounds(2.3, 2.3, 2.3, 2.3)
    assert progress.not_learning([*flat_train, evaluation(2, 2.4), evaluation(4, 2.0)], 4, SUSPECTS) is None
    # the learners' evaluation counts where the leader has no test split of its own
    learners = [*flat_train, evaluation(2, 2.4, "learners"), evaluation(4, 2.0, "learners")]
    assert progress.not_learning(learners, 4, SUSPECTS) is None


def test_the_check_reads_only_the_rounds_so_far_and_skips_losses_nobody_gave():
    later_fall = rounds(2.3, math.nan, 2.3, 2.3, 1.0)
    assert progress.not_learning([*later_fall[:1], {"round": 2, "train_loss": None}, *later_fall[2:]], 4, "x")
    assert progress.not_learning(later_fall, 5, "x") is None


def test_a_test_loss_written_as_null_or_nan_is_skipped_like_a_train_loss():
    # a NaN loss is written to metrics.jsonl as null: read back, it is None
    null = lambda round_index: {**evaluation(round_index, 0.0), "test_loss": None}
    flat = [*rounds(2.3, 2.3, 2.3, 2.3), null(1), evaluation(2, 2.3), evaluation(3, math.nan)]
    assert progress.not_learning([*flat, null(4)], 4, "x") is not None
    assert progress.not_learning([*flat, evaluation(4, 1.0)], 4, "x") is None
