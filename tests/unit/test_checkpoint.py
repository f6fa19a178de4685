"""The leader's files: checkpoints checked on resume and flushed to disk, earlier runs kept, flags checked."""

import os

import pytest
import torch

from federated.leader import checkpoint
from federated.leader import app as leader_module
from federated.learner import app as learner_module


def saved_config(**changes) -> dict:
    args = leader_module.parse_args(["--dataset", "synthetic"])
    return {**checkpoint.config_of(args), **changes}


def test_a_resume_takes_every_training_flag_from_the_checkpoint():
    args = leader_module.parse_args(["--resume", "runs/x"])
    checkpoint.adopt_config(saved_config(lr=0.3, momentum=0.5, wire_dtype="float16", rounds=77), args, args.explicit)
    assert (args.lr, args.momentum, args.wire_dtype, args.rounds, args.dataset) == (0.3, 0.5, "float16", 77, "synthetic")


@pytest.mark.parametrize("flags, named", [(["--lr", "0.2"], "--lr 0.2 (the checkpoint has 0.3)"),
                                          (["--momentum", "0.9"], "--momentum 0.9 (the checkpoint has 0.5)"),
                                          (["--warmup-epochs", "2"], "--warmup-epochs 2.0"),
                                          (["--wire-dtype", "bfloat16"], "--wire-dtype bfloat16"),
                                          (["--weight-decay", "0"], "--weight-decay 0.0"),
                                          (["--epochs", "3"], "--epochs 3.0"), (["--rounds", "5"], "--rounds 5")])
def test_a_resume_with_another_training_flag_is_refused_naming_it(flags, named):
    args = leader_module.parse_args(["--resume", "runs/x", *flags])
    with pytest.raises(SystemExit, match=named.replace("(", r"\(").replace(")", r"\)")):
        checkpoint.adopt_config(saved_config(lr=0.3, momentum=0.5), args, args.explicit)


@pytest.mark.parametrize("flags, named", [(["--strategy", "fedsgd"], "--strategy fedsgd (the checkpoint has fedavg)"),
                                          (["--server-lr", "0.5"], "--server-lr 0.5 (the checkpoint has None)"),
                                          (["--aggregator", "median"], "--aggregator median"),
                                          (["--learners-per-round", "1"], "--learners-per-round 1")])
def test_a_resume_with_another_strategy_or_hyper_parameter_is_refused_naming_it(flags, named):
    args = leader_module.parse_args(["--resume", "runs/x", *flags])
    with pytest.raises(SystemExit, match=named.replace("(", r"\(").replace(")", r"\)")):
        checkpoint.adopt_config(saved_config(strategy="fedavg"), args, args.explicit)


def test_a_checkpoint_from_before_strategies_resumes_as_fedsgd():
    args = leader_module.parse_args(["--resume", "runs/x", "--strategy", "fedavg"])
    older = {key: value for key, value in saved_config().items() if key not in ("strategy", "server_lr")}
    with pytest.raises(SystemExit, match="--strategy fedavg"):
        checkpoint.adopt_config(older, args, args.explicit)


def test_repeating_the_checkpoints_own_values_is_fine():
    args = leader_module.parse_args(["--resume", "runs/x", "--batch-size", "64", "--lr", "0.3"])
    checkpoint.adopt_config(saved_config(lr=0.3), args, args.explicit)
    assert args.lr == 0.3


@pytest.mark.parametrize("flags, message", [(["--rounds", "0"], "--rounds must be at least 1"),
                                            (["--epochs", "0"], "--epochs and --lr must be positive"),
                                            (["--round-timeout", "0"], "timeouts must be positive"),
                                            (["--momentum", "1.5"], "--momentum")])
def test_the_leader_refuses_senseless_flags(flags, message, capsys):
    with pytest.raises(SystemExit):
        leader_module.parse_args(flags)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--log-every", "0"], ["--idle-timeout", "0"]])
def test_the_learner_refuses_senseless_flags(flags):
    with pytest.raises(SystemExit):
        learner_module.parse_args(flags)


def test_a_new_run_moves_an_earlier_runs_files_aside(tmp_path, caplog):
    for name in ("checkpoint.pt", "metrics.jsonl", "model.pt"):
        (tmp_path / name).write_text(name)
    leader_module.Leader(leader_module.parse_args(["--dataset", "synthetic", "--out", str(tmp_path)]))
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
    leader = leader_module.Leader(leader_module.parse_args(["--dataset", "synthetic", "--out", str(tmp_path)]))
    leader.save_checkpoint(0)  # what a leader that gave up waiting for learners leaves
    resumed = leader_module.Leader(leader_module.parse_args(["--resume", str(tmp_path)]))
    assert resumed.collector.round == 0 and resumed.registry.records() == []


def test_a_resume_checks_min_learners_against_the_checkpoints_learners_and_keeps_its_directory(tmp_path):
    leader = leader_module.Leader(leader_module.parse_args(["--dataset", "synthetic", "--learners", "3",
                                                           "--out", str(tmp_path)]))
    leader.save_checkpoint(0)
    assert leader_module.Leader(leader_module.parse_args(["--resume", str(tmp_path), "--min-learners", "3"]))
    with pytest.raises(SystemExit, match="exceeds the checkpoint's --learners 3"):
        leader_module.Leader(leader_module.parse_args(["--resume", str(tmp_path), "--min-learners", "4"]))
    with pytest.raises(SystemExit, match="leave out --out"):
        leader_module.Leader(leader_module.parse_args(["--resume", str(tmp_path), "--out", str(tmp_path / "other")]))
