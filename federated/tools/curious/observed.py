"""What a curious leader receives: FedSGD updates of one image each, made by the learner's own code path (Replica,
the batch a learner trains on) and decoded as the leader decodes them (codec), in the clear or masked."""

from collections.abc import Callable

import torch

import utils
from federated.core.layout import wire_state
from federated.learner.state import Replica
from federated.privacy import secagg
from federated.wire import codec, messages
from model import build_model

ARCHITECTURE = "resnet20"
SEED = 0
CLIP_RANGE = 8.0  # --secagg-clip-range's default


class Learners:
    """Learners that train one round of FedSGD on one image each, from one global model state."""

    def __init__(self, data: utils.ImageSet, norm: str, seed: int = SEED) -> None:
        torch.manual_seed(seed)
        self.global_model = build_model(ARCHITECTURE, data.num_classes, norm)  # the leader's, for its attacks
        mean, std = utils.channel_stats(data.images)
        info = messages.StateInfo(
            ARCHITECTURE,
            data.num_classes,
            1,
            seed,
            tuple(mean),
            tuple(std),
            "float32",
            image_size=data.image_size,
            norm=norm,
        )
        self.state = codec.encode(wire_state(self.global_model, torch.float32), info.to_metadata())
        self.replica = Replica(codec.decode(bytearray(self.state)), "cpu")  # every learner's copy of the same state
        self.data, self.seed = data, seed

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch the learner holding only image `index` trains on in round 0 (cropped, flipped, normalised)."""
        shard = self.data.subset(torch.tensor([index]))
        return utils.training_batch(shard, utils.BatchSchedule(1, 1, self.seed), 0, self.replica.mean, self.replica.std)

    def update(self, index: int, learner_id: int = 0) -> codec.Payload:
        """The payload of the FedSGD update the learner holding image `index` sends, as the leader decodes it."""
        images, labels = self.batch(index)
        return self.encoded(lambda _: (images, labels), learner_id)

    def encoded(self, batch_at: Callable[[int], tuple[torch.Tensor, torch.Tensor]], learner_id: int) -> codec.Payload:
        """One round's update on batch_at's batches, through the wire (as Member.send_update sends it)."""
        replica = self.replica
        # the round's state afresh: training writes BatchNorm's statistics into the tensors a state is decoded to
        replica.adopt(codec.decode(bytearray(self.state)))
        loss = replica.local_update(batch_at, replica.plan)
        claims = messages.UpdateInfo(learner_id, 0, 1, loss, replica.strategy.update_kind, 1)
        payload = codec.decode(codec.encode(replica.update_tensors(), claims.to_metadata()))
        codec.check_matches(payload, replica.layout.spec)
        return payload

    def flat(self, payload: codec.Payload) -> torch.Tensor:
        """An update payload as the one float vector the leader adds into its running sum."""
        return torch.cat(codec.flat_runs(payload))

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector of the update's length read through the update's layout, tensor by tensor."""
        return self.replica.layout.views(flat[: self.replica.layout.size])


def quantisation(learners: int, clip_range: float = CLIP_RANGE) -> secagg.Quantisation:
    """How a secure round of this many learners of one sample each quantises their updates."""
    return secagg.Quantisation(clip_range, weight_unit=1.0, summands=learners)


def masked_inputs(updates: list[torch.Tensor], round_index: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """What a leader receives from learners under secure aggregation, one learner per update (flat float vectors,
    one sample each): every learner's masked input (int32) from an honest round of the protocol (an epoch's phases
    1 to 3, the round's phase 4, then the masked inputs, then phase 5), and the mean of the updates the leader
    unmasks (float32)."""
    ids = list(range(1, len(updates) + 1))
    epoch = secagg.LeaderEpoch(round_index, ids, threshold=len(ids) // 2 + 1)
    learners = {learner_id: secagg.LearnerRound(learner_id) for learner_id in ids}
    for phase in secagg.SETUP:
        for learner_id, learner in learners.items():
            epoch.take(phase, learner_id, learner.answer(epoch.request(phase, learner_id)))
    quantised = quantisation(len(ids))
    leader = epoch.open_round(round_index, ids, quantised.ring(updates[0].numel()))
    for learner_id, learner in learners.items():
        leader.take(secagg.COMMIT, learner_id, learner.answer(leader.request(secagg.COMMIT, learner_id)))
    masked = [
        learners[learner_id].masked_input(update, 1.0, 0.0, quantised) for learner_id, update in zip(ids, updates)
    ]
    for learner_id, tensors in zip(ids, masked):
        leader.add_masked(learner_id, tensors)
    for learner_id, learner in learners.items():
        leader.take(secagg.UNMASK, learner_id, learner.answer(leader.request(secagg.UNMASK, learner_id)))
    return [tensors[secagg.MASKED_TENSOR] for tensors in masked], quantised.dequantise(leader.unmask(), len(ids))[0]
