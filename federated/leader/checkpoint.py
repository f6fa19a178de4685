"""The leader's files on disk: checkpoints written atomically and read back, and earlier runs kept aside."""

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from federated.leader.metrics import read_metrics

log = logging.getLogger("leader")

# What a run writes into its --out directory; a new run moves an earlier run's files aside.
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "metrics.png", "model.pt", "partition.json", "partition.png")


def snapshot(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    strategy_state: dict,
    rounds_done: int,
    slots: list[dict],
    sampler: torch.Generator,
    participants: list[int] | None,
    config: dict,
    data: dict | None = None,
) -> dict:
    """Everything a resume needs after rounds_done: the model, the optimizer's state (momentum, or a server
    optimizer's moments), the strategy's own (SCAFFOLD's control), each slot's address, credential and data
    summary (its learner takes it back, with the images it declared), the random states and the open round's
    sampled participants, the trajectory flags, and the data's normalisation and typical shard size (a leader
    without data learned them from its learners). Learners' positions in their shards are a function of the
    round and the seed, so the round restores them."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "round": rounds_done,
        "slots": slots,
        "rng": torch.get_rng_state(),
        "sampler": sampler.get_state(),
        "participants": participants,
        "config": config,
        "data": data,
        **strategy_state,
    }


def restore(saved: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sampler: torch.Generator) -> int:
    """Load a snapshot's model, optimizer and random states; return its round."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    if "sampler" in saved:  # (older checkpoints have none)
        sampler.set_state(saved["sampler"])
    return saved["round"]


def load(directory: str | Path) -> dict:
    """DIR/checkpoint.pt (tensors and plain values only: weights_only)."""
    path = Path(directory) / "checkpoint.pt"
    if not path.exists():
        raise SystemExit(f"--resume {directory}: no checkpoint.pt there")
    return torch.load(path, weights_only=True)


def save_atomically(state: object, path: Path) -> None:
    """torch.save to a temporary file (mode 0600), flushed to disk, then renamed: a crash or a power cut leaves
    the old file or the new one, never half of one."""
    temporary = path.with_suffix(".tmp")
    temporary.unlink(missing_ok=True)  # a leftover of a crash keeps its mode; a new file gets 0600
    # Readable by its owner only: a checkpoint holds the learners' credentials (and the model).
    # O_EXCL and O_NOFOLLOW: a file or link planted at that name since the unlink is refused, not written through.
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # makes the rename itself durable
    finally:
        os.close(directory)


def keep_metrics_until(path: Path, rounds_done: int) -> None:
    """Drop the records of rounds after a checkpoint, which a resumed run does again."""
    if path.exists():
        kept = [r for r in read_metrics(path) if r["round"] <= rounds_done]
        temporary = path.with_suffix(".tmp")
        temporary.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(temporary, path)  # a crash leaves the whole history or the kept part, never half


def set_aside_earlier_run(out: Path) -> Path | None:
    """Move an earlier run's files in out into out/previous-<time>/, so a new run never overwrites them;
    return where they went (None if there were none)."""
    found = [out / name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return None
    aside = Path(tempfile.mkdtemp(prefix=time.strftime("previous-%Y%m%d-%H%M%S-"), dir=out))
    for path in found:
        path.rename(aside / path.name)
    log.warning(
        "%s held an earlier run; moved its %s to %s (to continue that run instead, pass --resume %s)",
        out,
        ", ".join(path.name for path in found),
        aside,
        out,
    )
    return aside
