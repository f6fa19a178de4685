"""A learner's privacy floors (--require-secure-aggregation, --min-noise-multiplier) sit out the rounds whose plan
would break them, whatever the leader asks."""

import pytest

from federated.core.plan import SecureRound, TrainingPlan
from federated.learner import floors
from tests.support.live import learner_config

SECURE = SecureRound(clip_range=64.0, weight_unit=32.0, summands=5)


def plan(dp: str = "none", sigma: float = 0.0, secure: SecureRound | None = SECURE) -> TrainingPlan:
    return TrainingPlan("fedavg", 4, dp=dp, dp_clip=1.0 if sigma else 0.0, dp_noise_multiplier=sigma, secure=secure)


def test_without_floors_a_learner_trains_as_the_leader_asks():
    config = learner_config([])
    assert all(floors.refusal(config, asked) is None for asked in [plan(secure=None), plan("central", 0.1)])


def test_require_secure_aggregation_sits_out_every_plain_round():
    config = learner_config(["--require-secure-aggregation"])
    assert "plain update" in (floors.refusal(config, plan(secure=None)) or "")
    assert "plain update" in (floors.refusal(config, plan("local", 2.0, secure=None)) or "")
    assert floors.refusal(config, plan()) is None
    assert floors.refusal(config, plan("distributed", 0.5)) is None


@pytest.mark.parametrize(
    ("asked", "refused"),
    [
        (plan("distributed", 0.9), "noise multiplier 0.9, below --min-noise-multiplier 1"),
        (plan("local", 0.5, secure=None), "noise multiplier 0.5, below"),
        (plan("central", 5.0, secure=None), "does not add itself"),  # the leader's noise: nothing here checks it
        (plan(), "--dp none, whose noise this learner does not add itself"),
        (plan("distributed", 1.0), None),
        (plan("local", 3.0, secure=None), None),
    ],
)
def test_min_noise_multiplier_sits_out_plans_below_it_and_plans_whose_noise_it_does_not_add(asked, refused):
    got = floors.refusal(learner_config(["--min-noise-multiplier", "1"]), asked)
    assert got is None if refused is None else refused in (got or ""), got


def test_a_negative_noise_floor_is_refused(capsys):
    with pytest.raises(SystemExit):
        learner_config(["--min-noise-multiplier", "-1"])
    assert "--min-noise-multiplier" in capsys.readouterr().err
