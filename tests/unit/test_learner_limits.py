"""A learner's own bounds on what its leader asks of it (a hostile leader's state, plan or shard refused from its
header, naming the flag that would allow it, before anything is buffered or built), a state of another norm than
its model's, and seeds and rounds that no longer overflow torch's generators."""

import json
import math
import struct
from types import SimpleNamespace

import pytest
import torch

import utils
from federated.core.layout import wire_state
from federated.core.plan import MAX_SEED, TrainingPlan, steps_for_epochs
from federated.learner.app import Member
from federated.learner.limits import GIB, Limits
from federated.learner.state import Replica
from federated.wire import codec, messages
from model import NORMS, SKEWED_NORM, build_model
from tests.support.live import learner_config

RESNET20 = codec.spec_of(wire_state(build_model("resnet20"), torch.float32))
CIFAR10_TRAIN = utils.dataset_size("cifar10", "unused", train=True)  # 50 000: known without the files


def state_metadata(**changes) -> dict[str, str]:
    """The metadata of an honest leader's resnet20 state, with changes."""
    info = messages.StateInfo("resnet20", 10, 64, 0, (0.5,) * 3, (0.25,) * 3, "float32")
    return {**info.to_metadata(), **{key: str(value) for key, value in changes.items()}}


def header_only(metadata: dict[str, str], described: codec.TensorSpec):
    """A stream that delivers a payload's header (its metadata, and tensors of these dtypes and shapes) and fails
    the test if anything after it is asked for: what a learner has of a payload before it buffers it."""
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape) in described.items():
        size = math.prod(shape) * dtype.itemsize
        entries[name] = {
            "dtype": codec.DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(entries).encode()
    yield struct.pack("<Q", len(text)) + text
    raise AssertionError("the payload's bytes were asked for: its header was admitted")


def limits(*flags: str, local_images: int = 0) -> Limits:
    return Limits.of(learner_config(list(flags)), local_images)


@pytest.mark.parametrize(
    "changes, flag",
    [
        ({"image_size": 1024}, "--max-image-size"),
        ({"batch_size": 10**17}, "--max-batch-size"),
        (messages.plan_to_metadata(TrainingPlan("fedavg", 10**17, 0.1)), "--max-local-steps"),
    ],
)
def test_a_state_asking_beyond_the_learners_bounds_is_refused_from_its_header_naming_the_flag(changes, flag):
    learner = limits("--max-memory", "64")
    with pytest.raises(codec.PayloadError, match=f"the leader asks for .*; this learner takes at most .*{flag}"):
        codec.receive(header_only(state_metadata(**changes), RESNET20), learner.memory, True, learner.admit_state)


def test_a_state_whose_training_would_need_146_gib_is_refused_before_anything_is_allocated():
    # CIFAR-10 resized to 1024 px is 146 GiB of images alone: refused from the header, before a byte of the state
    # is buffered, a model built or an image resized
    learner = limits("--max-image-size", "1024", "--max-memory", "64", local_images=CIFAR10_TRAIN)
    state = header_only(state_metadata(image_size=1024), RESNET20)
    with pytest.raises(
        codec.PayloadError, match=r"needs at least 2\d\d\.\d GiB \(.*, 146\.\d GiB images\).*--max-memory"
    ):
        codec.receive(state, learner.memory, True, learner.admit_state)


def test_a_shard_beyond_max_memory_is_refused_from_its_header():
    learner = limits("--max-image-size", "1024", "--max-memory", "64")
    info = messages.StateInfo.from_metadata(state_metadata(image_size=1024))
    shard = {"labels": (torch.int64, (CIFAR10_TRAIN,)), "images": (torch.uint8, (CIFAR10_TRAIN, 3, 1024, 1024))}
    with pytest.raises(codec.PayloadError, match=r"on its shard needs at least .* 146\.\d GiB images.*--max-memory"):
        codec.receive(header_only({}, shard), learner.memory, admit=learner.shard_admission(info, RESNET20))


def test_the_default_bounds_take_resnet18_at_224_pixels_in_batches_of_256_on_cifar10():
    learner = limits("--max-memory", "32", local_images=CIFAR10_TRAIN + 10_000)
    model = build_model("torchvision:resnet18", 10)
    metadata = state_metadata(architecture="torchvision:resnet18", image_size=224, batch_size=256)
    learner.admit_state(metadata, codec.spec_of(wire_state(model, torch.float32)))  # 15.7 GiB: admitted


def test_a_state_that_holds_another_model_than_it_names_is_refused_from_its_header():
    learner = limits("--max-memory", "64")
    with pytest.raises(codec.PayloadError, match="do not match the model"):
        codec.receive(header_only(state_metadata(architecture="resnet18"), RESNET20), GIB, True, learner.admit_state)


def test_a_seed_beyond_32_bits_is_refused_as_a_payload_error():
    with pytest.raises(codec.PayloadError, match="'seed' must be at most 4294967295"):
        messages.StateInfo.from_metadata(state_metadata(seed=10**17))


def test_the_largest_seed_with_the_largest_rounds_still_gives_batches():
    schedule = utils.BatchSchedule(100, 10, MAX_SEED * 10_007 + 4095)  # how a learner mixes the seed with its id
    assert len(schedule.indices(10**18)) == 10 and schedule.augmentation_rng(10**18) is not None


def test_a_final_state_of_gigabytes_is_refused_from_its_header_whatever_max_memory_allows():
    # a last state is only evaluated, so its tensors are not checked against its model: what bounds it is the
    # most a learner buffers of one payload, however much memory --max-memory (or the machine) grants
    learner = limits("--max-memory", "64")
    huge = {"weight": (torch.float32, (5 * GIB // 4,))}
    final = state_metadata(round=3, finished=1)
    learner.admit_state(final, huge)  # its header alone is admitted...
    assert learner.buffer < 5 * GIB < learner.memory
    with pytest.raises(codec.PayloadError, match="exceeds"):  # ...but not its 5 GiB of bytes
        codec.receive(header_only(final, huge), learner.buffer, True, learner.admit_state)


def test_with_the_leaders_own_epochs_a_learner_takes_its_shards_steps_within_its_max_local_steps():
    plan = TrainingPlan("fedavg", 10, 0.1, local_epochs=2.0)  # 10: the typical shard's steps
    member = lambda images, most: SimpleNamespace(
        replica=SimpleNamespace(plan=plan, info=SimpleNamespace(batch_size=8)),
        data=range(images),
        session=SimpleNamespace(limits=held(limits("--max-local-steps", str(most)), images)),
    )
    assert Member.round_plan(member(48, 100)).local_steps == 12  # 2 passes of 48 / 8 batches
    assert Member.round_plan(member(20, 100)).local_steps == 4  # the last partial batch is dropped
    # whatever a state was admitted on (a push before the shard came, or naming a larger batch size), the round
    # is checked on the batch size and data it trains with
    with pytest.raises(codec.PayloadError, match=r"12 local steps a round.*--max-local-steps"):
        Member.round_plan(member(48, 11))


def held(learner: Limits, images: int) -> Limits:
    learner.held(images)
    return learner


def own_epochs_state(epochs: str) -> dict[str, str]:
    return state_metadata(**messages.plan_to_metadata(TrainingPlan("fedavg", 10, 0.1)), local_epochs=epochs)


@pytest.mark.parametrize("epochs", ["inf", "1e309", "1001"])
def test_a_state_asking_for_infinite_or_absurd_local_epochs_is_refused_from_its_header(epochs):
    with pytest.raises(codec.PayloadError, match="'local_epochs' must be a number from 0 to 1000"):
        limits().admit_state(own_epochs_state(epochs), RESNET20)
    assert steps_for_epochs(math.inf, 10) == 10_000  # saturates at MAX_LOCAL_EPOCHS passes: no OverflowError


def test_own_epochs_beyond_max_local_steps_on_the_learners_shard_refuse_the_state_when_admitted():
    learner = limits("--max-local-steps", "11", "--max-memory", "64")
    learner.admit_state(own_epochs_state("2.0"), RESNET20)  # its shard not known yet: checked once held
    learner.held(48 * 64)  # 2 passes over 48 batches of 64: 96 steps
    with pytest.raises(codec.PayloadError, match=r"96 local steps a round \(2 passes over its 3072 images\).*--max"):
        learner.admit_state(own_epochs_state("2.0"), RESNET20)
    # the state a learner holds when it gets its data (a shard from the leader) is checked then, not mid-run
    member = SimpleNamespace(
        replica=SimpleNamespace(
            plan=messages.plan_from_metadata(own_epochs_state("2.0")), info=SimpleNamespace(batch_size=64)
        ),
        session=SimpleNamespace(limits=limits("--max-local-steps", "11")),
    )
    with pytest.raises(codec.PayloadError, match=r"96 local steps a round.*--max-local-steps"):
        Member.hold(member, range(48 * 64))


@pytest.mark.parametrize("norm", NORMS)
def test_a_learner_admits_a_state_of_every_norm_at_8_pixels(norm):
    # (its check is a forward pass on the meta device: a layer that asks its tensors' values fails there)
    model = build_model("resnet20", 10, norm)
    limits().admit_state(state_metadata(norm=norm, image_size=8), codec.spec_of(wire_state(model, torch.float32)))


@pytest.mark.parametrize("first, then", [("batch", SKEWED_NORM), ("group", "layer-ws")])
def test_a_learner_refuses_a_state_of_another_norm_than_its_models_though_the_tensors_are_the_same(first, then):
    # a leader resumed with another --norm: the same tensor names and shapes, another layer class to train
    model = build_model("resnet20", 10, first)
    state = lambda norm: codec.decode(
        codec.encode(wire_state(model, torch.float32), {**state_metadata(norm=norm), "round": "1"})
    )
    replica = Replica(state(first), "cpu")
    replica.adopt(state(first), fetched=False)
    for fetched in (True, False):
        with pytest.raises(codec.PayloadError, match=f"changed its norm from {first} to {then}"):
            replica.adopt(state(then), fetched)
