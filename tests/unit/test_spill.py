"""--state-budget (learner/spill.py), without sockets: learners on one SharedModel whose state is spilled to disk
after every use send bit for bit what they send with all of it in memory, and keep the same state; the files
lie in a folder of this user's alone."""

import stat

import pytest
import torch

from federated.core.strategies.scaffold import Controls
from federated.learner.spill import Spill
from federated.learner.state import Replica
from tests.support.live import learner_config
from tests.unit.test_shared_model import LEARNERS, learner_state, local_plan, run

# SCAFFOLD's controls and pending change, and top-k's error-feedback residuals of the update and control change
PLAN = local_plan("scaffold", compress="topk", compress_ratio=0.05)


def kept(replica: Replica) -> list[torch.Tensor]:
    """The learner's state, read back from disk if it was spilled (and spilled again after)."""
    with replica.shared.spill.using(replica):
        return [tensor.clone() for tensor in learner_state(replica)]


def test_learners_spilled_after_every_use_send_and_keep_what_they_would_in_memory():
    spilled, in_memory = run("batch", PLAN, shared=True, state_budget=1), run("batch", PLAN, shared=True)
    spill = spilled.replicas[0].shared.spill
    assert len(spill.spilled) == LEARNERS and not spill.resident  # a byte's budget: every learner's state on disk
    assert spill.folder is not None and stat.S_IMODE(spill.folder.stat().st_mode) == 0o700
    for replica in spilled.replicas:  # nothing model-sized left in memory
        assert replica.controls is not None and not replica.controls.own.numel() and replica.change is None
        assert replica.compressor is not None and not replica.compressor.residuals
    assert len(spilled.sent) == len(in_memory.sent) == 6
    for ours, theirs in zip(spilled.sent, in_memory.sent):
        assert list(ours) == list(theirs) and all(torch.equal(ours[name], theirs[name]) for name in theirs)
    for ours, theirs in zip(spilled.replicas, in_memory.replicas):
        mine, others = kept(ours), kept(theirs)
        assert len(mine) == len(others) > 3 and all(torch.equal(a, b) for a, b in zip(mine, others))
    assert len(spill.spilled) == LEARNERS  # spilled again once read
    owns = [kept(replica)[0] for replica in spilled.replicas]  # learner 0's change of round 1 committed, only its
    assert owns[0].any() and not owns[1].any() and not owns[2].any()


def test_a_state_budget_needs_virtual_learners(capsys):
    assert learner_config(["--state-budget", "1.5", "--virtual", "2"]).state_budget == 1.5
    with pytest.raises(SystemExit):
        learner_config(["--state-budget", "1"])
    assert "--state-budget keeps the state of --virtual learners" in capsys.readouterr().err


class Learner:
    """What the spill reads of a Replica: SCAFFOLD's controls (its own, filled with its number), nothing else."""

    def __init__(self, number: int) -> None:
        self.controls, self.change, self.compressor = Controls(1000), None, None
        self.controls.own.fill_(number)


def test_the_least_recently_used_learners_not_in_use_are_spilled():
    spill = Spill(budget=2 * 2 * 4 * 1000)  # two learners' controls (two vectors of 1,000 float32 each)
    learners = [Learner(number) for number in range(4)]

    def use(*which: int) -> None:
        for index in which:
            with spill.using(learners[index]):  # type: ignore[arg-type]
                assert torch.equal(learners[index].controls.own, torch.full((1000,), float(index)))

    use(0, 1, 2)
    assert [learners.index(learner) for learner in spill.spilled] == [0]
    use(0)  # read back: 1 is now the least recently used
    assert [learners.index(learner) for learner in spill.spilled] == [1]
    with spill.using(learners[2]):  # type: ignore[arg-type]
        use(1, 3)  # 2, the least recently used, is in use: never spilled
        assert torch.equal(learners[2].controls.own, torch.full((1000,), 2.0))
    assert sorted(learners.index(learner) for learner in spill.spilled) == [0, 1]
