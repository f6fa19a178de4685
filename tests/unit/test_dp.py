"""Differential privacy: the plan's DP fields on the wire, clipping, calibrated noise, adaptive clipping."""

import pytest

from federated.core import strategies
from federated.core.plan import TrainingPlan
from federated.leader.config import LeaderConfig
from federated.leader.data import DataFacts
from federated.leader.planner import Planner
from federated.wire import codec, messages


def planned(**flags) -> TrainingPlan:
    """Round 0's plan of a leader with these flags."""
    run = LeaderConfig(**flags)
    strategy = strategies.named(run.strategy)(run)
    return Planner(run, strategy, DataFacts([0.5] * 3, [0.25] * 3, 5000)).plan(0, None)


@pytest.mark.parametrize("strategy", ["fedsgd", "fedavg"])
def test_a_plan_without_dp_carries_no_dp_field(strategy):
    metadata = messages.plan_to_metadata(planned(strategy=strategy))
    assert not [key for key in metadata if key.startswith("dp")]


@pytest.mark.parametrize("strategy", ["fedsgd", "fedavg"])
@pytest.mark.parametrize("mode", ["central", "distributed", "local"])
def test_a_dp_plan_tells_learners_the_mode_clip_and_noise(strategy, mode):
    plan = planned(strategy=strategy, dp=mode, dp_clip=0.5, dp_noise_multiplier=1.3)
    assert (plan.dp, plan.dp_clip, plan.dp_noise_multiplier) == (mode, 0.5, 1.3)
    assert messages.plan_from_metadata(messages.plan_to_metadata(plan)) == plan


@pytest.mark.parametrize(
    "fields",
    [
        {"dp": "global"},
        {"dp": "local", "dp_clip": "1.0"},
        {"dp": "local", "dp_clip": "0", "dp_noise_multiplier": "1.0"},
        {"dp": "local", "dp_clip": "1.0", "dp_noise_multiplier": "nan"},
        {"dp": "local", "dp_clip": "1.0", "dp_noise_multiplier": "1e9"},
    ],
)
def test_malformed_dp_fields_are_refused(fields):
    with pytest.raises(codec.PayloadError):
        messages.plan_from_metadata(fields)
