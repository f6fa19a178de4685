"""The leader's files: checkpoints checked on resume and flushed to disk, earlier runs kept, flags checked."""

import dataclasses
import os
import shutil

import pytest
import torch

from federated.common import flags
from federated.core import strategies
from federated.leader import checkpoint
from federated.leader import config as leader_flags
from federated.learner import config as learner_config
from federated.wire.messages import DataSummary
from model import SKEWED_NORM, BatchRenorm2d
from tests.support.live import leader_config, leader_from
from tests.support.processes import ROOT

DATA = ROOT / "tests" / "data"


def saved_config(**changes) -> dict:
    """The trajectory flags a checkpoint of a synthetic run records, with changes."""
    return {**flags.trajectory(leader_config(["--dataset", "synthetic"])), **changes}


def test_a_resume_takes_every_training_flag_from_the_checkpoint():
    resumed = leader_config(["--resume", "runs/x"], saved_config(lr=0.3, momentum=0.5, wire_dtype="float16", rounds=77))
    assert (resumed.lr, resumed.momentum, resumed.wire_dtype, resumed.rounds, resumed.dataset) == (
        0.3,
        0.5,
        "float16",
        77,
        "synthetic",
    )


@pytest.mark.parametrize(
    "given, named",
    [
        (["--lr", "0.2"], "--lr 0.2 (the checkpoint has 0.3)"),
        (["--momentum", "0.9"], "--momentum 0.9 (the checkpoint has 0.5)"),
        (["--warmup-epochs", "2"], "--warmup-epochs 2.0"),
        (["--wire-dtype", "bfloat16"], "--wire-dtype bfloat16"),
        (["--weight-decay", "0"], "--weight-decay 0.0"),
        (["--epochs", "3"], "--epochs 3.0"),
        (["--rounds", "5"], "--rounds 5"),
    ],
)
def test_a_resume_with_another_training_flag_is_refused_naming_it(given, named, capsys):
    with pytest.raises(SystemExit):
        leader_config(["--resume", "runs/x", *given], saved_config(lr=0.3, momentum=0.5))
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    "given, named",
    [
        (["--strategy", "fedsgd"], "--strategy fedsgd (the checkpoint has fedavg)"),
        (["--server-lr", "0.5"], "--server-lr 0.5 (the checkpoint has None)"),
        (["--aggregator", "median"], "--aggregator median"),
        (["--learners-per-round", "1"], "--learners-per-round 1"),
    ],
)
def test_a_resume_with_another_strategy_or_hyper_parameter_is_refused_naming_it(given, named, capsys):
    with pytest.raises(SystemExit):
        leader_config(["--resume", "runs/x", *given], saved_config(strategy="fedavg"))
    assert named in capsys.readouterr().err


def test_a_checkpoint_from_before_strategies_resumes_as_fedsgd(capsys):
    older = {key: value for key, value in saved_config().items() if key not in ("strategy", "server_lr")}
    assert leader_config(["--resume", "runs/x"], older).strategy == "fedsgd"
    with pytest.raises(SystemExit):
        leader_config(["--resume", "runs/x", "--strategy", "fedavg"], older)
    assert "--strategy fedavg" in capsys.readouterr().err


def test_repeating_the_checkpoints_own_values_is_fine():
    assert leader_config(["--resume", "runs/x", "--batch-size", "64", "--lr", "0.3"], saved_config(lr=0.3)).lr == 0.3


@pytest.mark.parametrize(
    "given, message",
    [
        (["--rounds", "0"], "--rounds: must be >= 1"),
        (["--epochs", "0"], "--epochs: must be > 0"),
        (["--round-timeout", "0"], "--round-timeout: must be > 0"),
        (["--momentum", "1.5"], "--momentum"),
        (["--seed", "-1"], "--seed: must be in [0, 4294967295]"),  # what its learners take (32 bits)
        (["--seed", str(2**32)], "--seed: must be in [0, 4294967295]"),
    ],
)
def test_the_leader_refuses_senseless_flags(given, message, capsys):
    with pytest.raises(SystemExit):
        leader_config(given)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("given", [["--log-every", "0"], ["--idle-timeout", "0"], ["--max-memory", "0"]])
def test_the_learner_refuses_senseless_flags(given):
    with pytest.raises(SystemExit):
        learner_config.configure(learner_config.command_line(given))


def test_a_new_run_moves_an_earlier_runs_files_aside(tmp_path, caplog):
    for name in ("checkpoint.pt", "metrics.jsonl", "model.pt"):
        (tmp_path / name).write_text(name)
    leader_from(["--dataset", "synthetic", "--out", str(tmp_path)])
    (aside,) = tmp_path.glob("previous-*")
    assert sorted(path.name for path in aside.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "model.pt"]
    assert (aside / "metrics.jsonl").read_text() == "metrics.jsonl" and not (tmp_path / "checkpoint.pt").exists()
    assert "held an earlier run" in caplog.text and "--resume" in caplog.text


def test_checkpoints_reach_the_disk_before_they_replace_the_old_one(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    checkpoint.save_atomically({"w": torch.ones(2)}, tmp_path / "checkpoint.pt")
    assert calls == ["fsync", "replace", "fsync"]  # the file's bytes, the rename, then the directory entry
    assert torch.equal(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["w"], torch.ones(2))
    assert (tmp_path / "checkpoint.pt").stat().st_mode & 0o077 == 0  # it holds the learners' credentials


def test_a_checkpoint_written_before_anyone_registered_can_be_resumed(tmp_path):
    leader = leader_from(["--dataset", "synthetic", "--out", str(tmp_path)])
    leader.rounds.save_checkpoint(0)  # what a leader that gave up waiting for learners leaves
    resumed = leader_from(["--resume", str(tmp_path)])
    assert resumed.collector.round == 0 and resumed.registry.records() == []


def test_a_resume_checks_min_learners_against_the_checkpoints_learners_and_keeps_its_directory(tmp_path, capsys):
    leader = leader_from(["--dataset", "synthetic", "--learners", "3", "--out", str(tmp_path)])
    leader.rounds.save_checkpoint(0)
    assert leader_from(["--resume", str(tmp_path), "--min-learners", "3"])
    with pytest.raises(SystemExit):
        leader_from(["--resume", str(tmp_path), "--min-learners", "4"])
    assert "exceeds --learners 3 (the checkpoint's)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        leader_from(["--resume", str(tmp_path), "--out", str(tmp_path / "other")])
    assert "leave out --out" in capsys.readouterr().err


def test_a_checkpoint_written_before_the_package_layout_resumes_where_it_stopped(tmp_path):
    shutil.copy(DATA / "checkpoint-fedavg-round6.pt", tmp_path / "checkpoint.pt")
    resumed = leader_from(["--resume", str(tmp_path)])
    assert resumed.collector.round == 6 and resumed.participants == [1]
    assert (resumed.config.strategy, resumed.config.learners_per_round, resumed.config.local_steps) == ("fedavg", 1, 2)
    assert resumed.planner.schedule.total_rounds == 40 and resumed.registry.records()[1]["address"].startswith("127.")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(
        torch.equal(value, saved["model"][name]) for name, value in resumed.global_model.model.state_dict().items()
    )


@pytest.mark.parametrize(
    "run, least",
    [
        (["--aggregator", "median"], 3),
        (["--aggregator", "trimmed-mean", "--trim", "0.2"], 5),
        (["--aggregator", "krum", "--byzantine", "1"], 5),
        (["--strategy", "fedavg", "--aggregator", "median", "--learners-per-round", "4"], 3),
        (["--strategy", "scaffold", "--learners-per-round", "2"], 1),
    ],
)
def test_a_robust_sampled_or_scaffold_run_resumes_with_resume_alone(tmp_path, run, least):
    # The default of --min-learners depends on --aggregator (and --learners-per-round): derived before the
    # checkpoint's flags were adopted, it was mean's 1, and the resume was refused unless --min-learners was given
    # again.
    # (a leader without data: what is derived is the same, and it builds without loading a dataset)
    leader = leader_from(["--dataset", "none", "--num-classes", "10", "--learners", "5", *run, "--out", str(tmp_path)])
    leader.rounds.save_checkpoint(0)
    resumed = leader_from(["--resume", str(tmp_path)])
    assert flags.trajectory(resumed.config) == torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]
    assert resumed.federation.settings.min_learners == leader.federation.settings.min_learners == least
    assert resumed.collector.rule.minimum_updates() == leader.collector.rule.minimum_updates()


def test_a_resumed_leader_keeps_the_data_summary_each_slot_was_taken_with(tmp_path):
    leader = leader_from(["--dataset", "none", "--num-classes", "10", "--rounds", "10", "--out", str(tmp_path)])
    declared = DataSummary(100, 40, (50.0,) * 3, (30.0,) * 3)
    member, _ = leader.registry.register("127.0.0.1:7040", data=declared)
    leader.rounds.save_checkpoint(0)
    resumed = leader_from(["--resume", str(tmp_path)])  # (the checkpoint is read with weights_only)
    more = dataclasses.replace(declared, eval_samples=10**9)  # to weigh more in the learners' evaluation
    resumed.registry.register("127.0.0.1:7040", member.credential, data=more)
    assert resumed.registry.summaries() == {0: declared}


def test_a_resume_may_repeat_the_checkpoints_values_even_of_flags_its_choices_leave_unread(tmp_path):
    leader = leader_from(["--dataset", "synthetic", "--out", str(tmp_path)])
    leader.rounds.save_checkpoint(0)
    # an iid run reads no --alpha, and --num-classes was the dataset's: repeating either changes nothing
    resumed = leader_from(["--resume", str(tmp_path), "--alpha", "0.5", "--num-classes", "10"])
    assert (resumed.config.num_classes, resumed.config.alpha) == (10, 0.5)


def test_a_resume_refused_exits_1_as_it_always_did_and_a_bad_new_run_2(capsys):
    with pytest.raises(SystemExit) as resumed:
        leader_config(["--resume", "runs/x", "--lr", "0.2"], saved_config(lr=0.3))
    with pytest.raises(SystemExit) as new:
        leader_config(["--strategy", "fedavg", "--lr", "0.2"])
    assert (resumed.value.code, new.value.code) == (1, 2)


def test_a_checkpoint_that_predates_a_flag_resumes_with_its_default_even_a_lazy_one(capsys):
    older = {key: value for key, value in saved_config().items() if key != "image_size"}
    assert leader_config(["--resume", "runs/x", "--image-size", "32"], older).image_size == 32


@pytest.mark.parametrize(
    "name, strategy, rounds_done",
    [("checkpoint-fedadam-round7.pt", "fedadam", 7), ("checkpoint-scaffold-round5.pt", "scaffold", 5)],
)
def test_a_server_optimizers_moments_and_scaffolds_control_written_before_the_layout_resume(
    tmp_path, name, strategy, rounds_done
):
    shutil.copy(DATA / name, tmp_path / "checkpoint.pt")
    resumed = leader_from(["--resume", str(tmp_path)])
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert resumed.collector.round == rounds_done and resumed.config.strategy == strategy
    state = resumed.global_model.optimizer.state_dict()["state"]
    if strategy == "fedadam":  # a first and a second moment of every trainable parameter
        assert all(set(moments) == {"momentum_buffer", "variance"} for moments in saved["optimizer"]["state"].values())
        assert len(state) == len(list(resumed.global_model.model.parameters()))
    for index, moments in saved["optimizer"]["state"].items():
        assert all(torch.equal(state[index][key], tensor) for key, tensor in moments.items())
    if strategy == "scaffold":
        assert resumed.strategy.control.abs().sum() > 0 and torch.equal(resumed.strategy.control, saved["control"])


@pytest.mark.parametrize(
    "given, norm",
    [
        ([], "batch"),
        (["--partition", "quantity"], "batch"),  # balanced labels
        (["--partition", "dirichlet", "--alpha", "0.1"], SKEWED_NORM),
        (["--partition", "classes"], SKEWED_NORM),
        (["--partition", "classes", "--model", "torchvision:resnet18"], "batch"),  # keeps its own
        (["--partition", "classes", "--norm", "group"], "group"),
    ],
)
def test_norm_auto_is_batch_norm_unless_the_partition_skews_the_labels(given, norm):
    assert leader_config(["--dataset", "synthetic", *given]).model_norm == norm


def test_a_checkpoint_records_the_norm_auto_resolved_to_and_a_resume_builds_that_whatever_auto_picks_now(
    tmp_path, monkeypatch
):
    skewed = ["--dataset", "synthetic", "--partition", "dirichlet", "--alpha", "0.1", "--out", str(tmp_path)]
    leader_from(skewed).rounds.save_checkpoint(0)
    assert checkpoint.load(tmp_path)["config"]["norm"] == SKEWED_NORM
    monkeypatch.setattr(leader_flags, "LABEL_SKEWED", ())  # auto would now pick batch norm for this partition
    resumed = leader_from(["--resume", str(tmp_path)])
    assert resumed.config.model_norm == resumed.global_model.info.norm == SKEWED_NORM
    assert any(isinstance(module, BatchRenorm2d) for module in resumed.global_model.model.modules())
    # repeating --norm auto on the resume is no change: it keeps what auto picked when the run started
    assert leader_from(["--resume", str(tmp_path), "--norm", "auto"]).config.model_norm == SKEWED_NORM
    with pytest.raises(SystemExit):  # another norm named is a change, refused like any other training flag's
        leader_from(["--resume", str(tmp_path), "--norm", "batch"])


def test_a_checkpoint_that_predates_norm_resumes_with_batch_norm_even_on_a_skewed_partition(tmp_path):
    older = {key: value for key, value in saved_config(partition="dirichlet", alpha=0.1).items() if key != "norm"}
    assert leader_config(["--resume", "runs/x"], older).model_norm == "batch"
    saved = torch.load(DATA / "checkpoint-fedavg-round6.pt", weights_only=True)
    del saved["config"]["norm"]
    torch.save(saved, tmp_path / "checkpoint.pt")
    resumed = leader_from(["--resume", str(tmp_path)])
    norms = {type(module) for module in resumed.global_model.model.modules() if "Norm" in type(module).__name__}
    assert norms == {torch.nn.BatchNorm2d} and resumed.global_model.info.norm == "batch"
    assert all(
        torch.equal(value, saved["model"][name]) for name, value in resumed.global_model.model.state_dict().items()
    )


def test_a_fedadam_checkpoint_from_before_the_measured_defaults_resumes_with_the_papers_server_step(tmp_path):
    # its trajectory: Reddi et al.'s Algorithm 2 as written (no bias correction) at their server lr; its beta1 0.9
    # is recorded (issue 17 changed all three defaults)
    shutil.copy(DATA / "checkpoint-fedadam-round7.pt", tmp_path / "checkpoint.pt")
    resumed = leader_from(["--resume", str(tmp_path)]).strategy
    assert (resumed.server_lr, resumed.bias_correction, resumed.beta1) == (0.01, False, 0.9)
    new = strategies.named("fedadam")(leader_config(["--strategy", "fedadam"]))
    assert (new.server_lr, new.bias_correction, new.beta1) == (0.03, True, 0.5)


def test_a_fedavgm_checkpoint_from_before_the_measured_defaults_resumes_with_server_momentum_0_9():
    older = {
        key: value
        for key, value in saved_config(strategy="fedavgm").items()
        if key not in ("as_published", "no_bias_correction")
    }
    resumed = strategies.named("fedavgm")(leader_config(["--resume", "runs/x"], older))
    new = strategies.named("fedavgm")(leader_config(["--strategy", "fedavgm"]))
    assert (resumed.server_momentum, resumed.server_lr) == (0.9, pytest.approx(0.1))
    assert (new.server_momentum, new.server_lr) == (0.5, 0.5)
