"""A learner's privacy floors (--require-secure-aggregation, --min-noise-multiplier) sit out the rounds whose plan
would break them, whatever the leader asks."""

import logging
from types import SimpleNamespace

import pytest

from federated.core.plan import SecureRound, TrainingPlan
from federated.learner import floors
from federated.learner.app import Member
from federated.privacy.local import Budget
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


def test_a_member_sits_out_the_round_its_floors_refuse_saying_so_once(caplog):
    def member(flags: list[str], asked: TrainingPlan) -> SimpleNamespace:
        """What Member.within_budget reads of a member whose replica holds a state with this plan."""
        replica = SimpleNamespace(info=SimpleNamespace(batch_size=8))
        return SimpleNamespace(
            config=learner_config(flags),
            round_plan=lambda: asked,
            budget=Budget(0.0),
            data=[0] * 64,
            replica=replica,
            refusal=None,
            sent_round=-1,
        )

    plain = member(["--require-secure-aggregation"], plan(secure=None))
    with caplog.at_level(logging.WARNING, "learner"):
        assert not Member.within_budget(plain, 3) and not Member.within_budget(plain, 4)
    assert plain.sent_round == 4 and "plain update" in (plain.refusal or "")
    assert [record.getMessage() for record in caplog.records] == [
        f"round 3: this learner sits the round out: {plain.refusal}"
    ]
    assert Member.within_budget(
        member(["--require-secure-aggregation", "--min-noise-multiplier", "1"], plan("distributed", 1.0)), 5
    )
