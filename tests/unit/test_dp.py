"""Differential privacy: the plan's DP fields on the wire, clipping, calibrated noise, adaptive clipping."""

import dataclasses
import re

import pytest
import torch

from federated.core import strategies
from federated.core.aggregation import RoundUpdates
from federated.core.plan import TrainingPlan
from federated.leader.config import LeaderConfig
from federated.leader.data import DataFacts
from federated.leader.global_model import MAX_DISCARDED_ROUNDS, Diverged
from federated.leader.metrics import MetricsLog, read_metrics
from federated.leader.planner import Planner
from federated.leader.privacy import LeaderPrivacy
from federated.privacy.dp import CentralMechanism, adjusted_noise_multiplier, noise_share_std
from federated.privacy.secagg import Quantisation
from federated.wire import codec, messages
from federated.wire.messages import StateInfo
from tests.support.live import leader_config, leader_from
from tests.support.privacy import independent_epsilon


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
    secure = {"secure_aggregation": True, "learners": 3} if mode == "distributed" else {}
    plan = planned(strategy=strategy, dp=mode, dp_clip=0.5, dp_noise_multiplier=1.3, **secure)
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
        # distributed noise is only ever added to a masked input: without a secure round the update would go in
        # the clear, un-noised, whatever the learner's --min-noise-multiplier (review)
        {"dp": "distributed", "dp_clip": "1.0", "dp_noise_multiplier": "5.0", "dp_delta": "1e-05"},
    ],
)
def test_malformed_dp_fields_are_refused(fields):
    with pytest.raises(codec.PayloadError):
        messages.plan_from_metadata(fields)


def clipped_sum_round(mechanism: CentralMechanism, updates: list[torch.Tensor]) -> torch.Tensor:
    """One round of the leader's central DP: the updates through RoundUpdates, the noised mean out."""
    round_updates = RoundUpdates(updates[0].numel(), updates[0].numel(), privacy=mechanism)
    for samples, update in enumerate(updates, start=1):  # unequal claims: central DP weighs them alike
        round_updates.add([update.clone()], samples * 10, 0.5)
    out = torch.empty(updates[0].numel())
    round_updates.combine_into(out)
    return out


def test_the_noise_on_the_mean_has_the_calibrated_standard_deviation():
    sigma, clip, count, rounds = 1.3, 0.5, 4, 64
    generator = torch.Generator().manual_seed(7)
    updates = [torch.randn(1000, generator=generator) * 3 for _ in range(count)]
    mechanism = CentralMechanism(clip, sigma, generator=generator)
    noiseless = sum(update * (clip / update.norm()) for update in updates) / count
    noise = torch.stack([clipped_sum_round(mechanism, updates) - noiseless for _ in range(rounds)])
    # the noise on the sum is N(0, (sigma C)^2) per coordinate: times count, the mean's
    assert (noise * count).std().item() == pytest.approx(sigma * clip, rel=0.05)
    assert (noise * count).mean().item() == pytest.approx(0.0, abs=0.05 * sigma * clip)


def test_no_clipped_update_exceeds_the_bound():
    mechanism = CentralMechanism(0.7, 1.0, generator=torch.Generator().manual_seed(1))
    for scale in (1e-3, 0.7, 1.0, 1e4):
        update = torch.randn(500, generator=torch.Generator().manual_seed(2)) * scale
        before = update.clone()
        mechanism.clip_update(update)
        assert update.norm().item() <= 0.7 * (1 + 1e-6)
        if before.norm() <= 0.7:  # within the bound: left as it was
            assert torch.equal(update, before)


def test_central_dp_with_noise_near_zero_is_the_unweighted_mean_of_clipped_updates():
    updates = [torch.full((4,), 1.0), torch.full((4,), -3.0)]
    out = clipped_sum_round(CentralMechanism(1.0, 1e-9, generator=torch.Generator().manual_seed(0)), updates)
    assert torch.allclose(out, torch.zeros(4), atol=1e-6)  # (0.5 - 0.5) / 2 per coordinate, samples ignored


def test_each_learners_noise_share_sums_over_the_threshold_to_the_calibrated_noise():
    sigma, clip, threshold = 1.1, 2.0, 7
    # the learners' real path: zero updates quantised with their discrete Gaussian shares, summed modulo 2^32 and
    # dequantised by the leader into the mean of `threshold` equal weights: its noise times threshold is the sum's
    quantisation = Quantisation(clip, 1.0, threshold, noise_std=noise_share_std(sigma, clip, threshold))
    generator = torch.Generator().manual_seed(3)
    inputs = [quantisation.quantise(torch.zeros(20000), 1.0, 0.0, generator) for _ in range(threshold)]
    mean, _, _ = quantisation.dequantise(torch.stack(inputs).sum(0) % 2**32, threshold, whole_weights=True)
    assert (mean * threshold).std().item() == pytest.approx(sigma * clip, rel=0.05)


@pytest.mark.parametrize("quantile", [0.2, 0.8])
def test_adaptive_clipping_moves_the_clip_towards_the_quantile_of_the_norms(quantile):
    generator = torch.Generator().manual_seed(4)
    norms = torch.linspace(0.1, 10.0, 50)  # 50 updates a round, their norms spread evenly
    updates = [torch.randn(100, generator=generator) for _ in norms]
    updates = [update * (norm / update.norm()) for update, norm in zip(updates, norms)]
    target = torch.quantile(norms, quantile).item()
    for start in (target / 4, target * 4):  # at most exp(0.2 * 0.2) a round from below towards the 0.2 quantile
        mechanism = CentralMechanism(start, 1.0, quantile, len(updates), generator)
        for _ in range(100):
            clipped_sum_round(mechanism, updates)
        assert mechanism.clip == pytest.approx(target, rel=0.25)


def test_adaptive_clipping_charges_the_paper_s_adjusted_noise_multiplier():
    sigma, expected = 1.0, 100
    mechanism = CentralMechanism(1.0, sigma, 0.5, expected)
    count_std = max(expected / 20, sigma)
    assert mechanism.update_noise_multiplier == pytest.approx((sigma**-2 - (2 * count_std) ** -2) ** -0.5)
    assert mechanism.update_noise_multiplier > sigma
    assert adjusted_noise_multiplier(2.0, 1e12) == pytest.approx(2.0)


DP_RUN = ["--dataset", "digits", "--image-size", "8", "--norm", "group", "--strategy", "fedavg", "--learners", "1"]
DP_RUN += ["--server-lr", "0.001", "--local-steps", "1", "--batch-size", "8", "--rounds", "8", "--eval-every", "0"]
DP_RUN += ["--dp", "central", "--dp-noise-multiplier", "1.5", "--dp-clip", "0.1", "--dp-clip-quantile", "0.5"]


def play_rounds(leader, rounds: range) -> MetricsLog:
    """Rounds of the leader's real round loop, each with one update (nobody to wait for: no learner started),
    recorded in its metrics.jsonl (appended to on a resume); returns the log, open."""
    metrics = MetricsLog(leader.out / "metrics.jsonl", append=bool(leader.config.resume))
    update = torch.full((leader.global_model.layout.size,), 1e-3)
    for round_index in rounds:
        assert leader.rounds.budget_spent is None and leader.privacy.exhausted() is None
        leader.collector.submit(0, round_index, [update], 8, 1.0, 0)
        assert leader.rounds.run_round(round_index, 0.0, metrics) is not None
    metrics.close()
    return metrics


def round_records(path) -> list[dict]:
    return [record for record in read_metrics(path) if "train_loss" in record]


def test_a_resumed_run_reports_the_epsilon_and_clip_of_an_uninterrupted_one(tmp_path):
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    play_rounds(leader_from([*DP_RUN, "--out", str(uninterrupted)]), range(5))
    leader = leader_from([*DP_RUN, "--out", str(interrupted)])
    play_rounds(leader, range(2))
    leader.rounds.save_checkpoint(2)
    resumed = leader_from(["--resume", str(interrupted)])
    assert resumed.privacy.mechanism.clip == leader.privacy.mechanism.clip  # the adaptive clip goes on from there
    play_rounds(resumed, range(2, 5))
    expected = round_records(uninterrupted / "metrics.jsonl")
    got = round_records(interrupted / "metrics.jsonl")
    assert [record["round"] for record in got] == [1, 2, 3, 4, 5]
    assert [record["epsilon"] for record in got] == [record["epsilon"] for record in expected]
    assert got[-1]["epsilon"] == pytest.approx(independent_epsilon([(1.5, 1.0, 5)], 1e-5), rel=1e-12)
    assert all(record["dp_clip"] > 0 for record in got)


def test_the_target_epsilon_makes_the_last_round_the_one_before_it_would_be_exceeded_and_a_resume_ends_at_once(
    tmp_path,
):
    target = independent_epsilon([(1.5, 1.0, 3)], 1e-5) * 1.001  # three rounds fit, a fourth would not
    leader = leader_from([*DP_RUN, "--out", str(tmp_path), "--dp-target-epsilon", str(target)])
    play_rounds(leader, range(3))
    assert leader.rounds.budget_spent and "--dp-target-epsilon" in leader.rounds.budget_spent
    # round 3 ended the run as a last round ends: evaluated, model.pt, checkpointed, the final state pushed
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["round"] == 3 and saved["privacy"]["accountant"] == [(1.5, 1.0, 3)]
    assert (tmp_path / "model.pt").exists()
    assert StateInfo.from_payload(codec.decode(leader.global_model.encoded_state)).finished
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [record["round"] for record in records if "test_accuracy" in record][-1] == 3
    assert round_records(tmp_path / "metrics.jsonl")[-1]["epsilon"] <= target
    resumed = leader_from(["--resume", str(tmp_path)])
    metrics = MetricsLog(tmp_path / "metrics.jsonl", append=True)
    assert resumed.rounds.train(metrics) == 3 and resumed.rounds.budget_spent  # no round opened: none waited for
    metrics.close()
    assert StateInfo.from_payload(codec.decode(resumed.global_model.encoded_state)).finished


@pytest.mark.parametrize(
    ("mode", "per_round", "claimed", "drawn_at", "rate"),
    [
        ("central", 0, False, 1.0, 1.0),  # everyone takes part
        ("central", 3, False, 0.5, 1.0),  # learners see who was drawn, --seed seeds it: no amplification claimed
        ("central", 3, True, 0.5, 0.5),  # claimed: the rate it drew at (3 of the 6 candidates left)
        ("central", 3, True, 1.0, 1.0),  # claimed, but drawn again mid-round (Federation.sample_rate gives 1)
        ("distributed", 3, False, 0.3, 1.0),  # the leader, the adversary, draws the sample
    ],
)
def test_the_leader_charges_each_round_at_a_sampling_rate_its_adversary_cannot_see_through(
    mode, per_round, claimed, drawn_at, rate
):
    run = LeaderConfig(learners=10, learners_per_round=per_round, dp=mode, dp_secret_sampling=claimed)
    privacy = LeaderPrivacy(run)
    records = [privacy.charge_round(sample_rate=drawn_at) for _ in range(4)]
    assert records[-1]["epsilon"] == pytest.approx(independent_epsilon([(1.0, rate, 4)], 1e-5), rel=1e-12)
    assert records[0]["epsilon"] < records[-1]["epsilon"]


def test_a_round_s_sampling_rate_is_its_draw_among_the_candidates_left_and_1_when_drawn_again(monkeypatch):
    leader = leader_from([*DP_RUN[:6], "--learners", "10", "--learners-per-round", "3"])
    assert leader.federation.sample_rate() == 1.0  # nothing drawn yet
    monkeypatch.setattr(leader.federation, "candidates", lambda: list(range(6)))  # 4 of the 10 are gone
    leader.federation.open_round(0)
    assert leader.federation.sample_rate() == 0.5
    leader.federation.open_round(0, widen=True)  # the first draw's updates still count: no secret fraction holds
    assert leader.federation.sample_rate() == 1.0


def test_secure_rounds_discarded_are_charged_once_unmasked_and_five_in_a_row_stop_the_run(tmp_path, monkeypatch):
    leader = leader_from([*DP_RUN, "--out", str(tmp_path), "--dp-clip-quantile", "0"])
    close = leader.federation.close
    unmasked = [False, True, True, False, True]  # below the threshold, or refused after unmasking (sum seen)

    def discarded(mean_out):
        summary = close(mean_out)
        return dataclasses.replace(summary, discarded="secure aggregation: ...", released=unmasked[summary.round])

    monkeypatch.setattr(leader.federation, "close", discarded)
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    update = torch.full((leader.global_model.layout.size,), 1e-3)
    for round_index in range(MAX_DISCARDED_ROUNDS):
        leader.collector.submit(0, round_index, [update], 8, 1.0, 0)
        if round_index < MAX_DISCARDED_ROUNDS - 1:
            assert leader.rounds.run_round(round_index, 0.0, metrics) is not None
            continue
        with pytest.raises(Diverged, match="secure aggregation gives no sum"):
            leader.rounds.run_round(round_index, 0.0, metrics)
    metrics.close()
    records = round_records(tmp_path / "metrics.jsonl")
    assert records[0]["epsilon"] == 0.0 and "stopping" in records[-1]["recovery"]
    assert records[-1]["epsilon"] == pytest.approx(independent_epsilon([(1.5, 1.0, 3)], 1e-5), rel=1e-12)


def test_a_run_whose_noise_swamps_the_model_stops_saying_how_large_the_noise_is(tmp_path):
    flags = ["--dp-noise-multiplier", "1000", "--dp-clip-quantile", "0", "--server-lr", "1", "--learners", "2"]
    leader = leader_from([*DP_RUN, *flags, "--out", str(tmp_path)])
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    update = torch.full((leader.global_model.layout.size,), 1e-3)
    for round_index in range(MAX_DISCARDED_ROUNDS):
        for learner in (0, 1):
            leader.collector.submit(learner, round_index, [update], 8, 1.0, 0)
        if round_index < MAX_DISCARDED_ROUNDS - 1:
            assert leader.rounds.run_round(round_index, 0.0, metrics) is not None
    size = leader.global_model.layout.parameter_count  # the mean of two updates: the noise over 2
    noise = re.escape(f"norm near {1000 * 0.1 * size**0.5 / 2:.3g}, ")
    with pytest.raises(Diverged, match=f"make no sane step.*{noise}.* 1/learners"):
        leader.rounds.run_round(MAX_DISCARDED_ROUNDS - 1, 0.0, metrics)
    metrics.close()


@pytest.mark.parametrize(
    "flags, refused",
    [
        (["--dp", "central", "--aggregator", "median", "--learners", "3"], "--dp needs --aggregator mean"),
        (["--dp", "central", "--clip-norm", "1"], "leave out --clip-norm"),
        (["--dp", "central", "--secure-aggregation", "--learners", "3"], "use --dp distributed"),
        (["--dp", "distributed"], "--dp distributed needs --secure-aggregation"),
        (["--dp", "distributed", "--secure-aggregation", "--learners", "3", "--dp-clip-quantile", "0.5"], "only with"),
        (["--dp", "central", "--strategy", "scaffold"], "control variates would reach the leader"),
        (["--dp", "central", "--norm", "batch"], "keeps running statistics"),
        (["--dp-target-epsilon", "3"], "--dp-target-epsilon needs --dp central or distributed"),
        (["--dp", "local", "--dp-target-epsilon", "3"], "each learner stops at its own"),
        (["--dp", "central", "--dp-secret-sampling"], "needs --dp central and --learners-per-round"),
    ],
)
def test_what_dp_cannot_be_combined_with_is_refused_saying_why(flags, refused, capsys):
    with pytest.raises(SystemExit):
        leader_config(["--dataset", "synthetic", "--norm", "group", *flags])
    assert refused in capsys.readouterr().err
