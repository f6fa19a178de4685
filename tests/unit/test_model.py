"""Models by name: the CIFAR ResNets (each norm: batch, batch renormalisation, group norms with weight
standardisation), torchvision's classifiers, hostile names refused, and initial weights from a file."""

import functools
import logging

import pytest
import torch
import torchvision.models
from torch import nn

from federated.leader import checkpoint
from model import (
    ARCHITECTURES,
    GROUPS,
    NORMS,
    RENORM_D_MAX,
    RENORM_R_MAX,
    RENORM_WARMUP,
    TOO_SMALL_INPUTS,
    WS_GROUPS,
    BatchRenorm2d,
    StandardisedConv2d,
    architectures,
    build_model,
    load_initial_weights,
)


@pytest.mark.parametrize("name, parameters", [("resnet20", 269_722), ("resnet18", 11_173_962)])
def test_parameter_counts_match_the_published_architectures(name, parameters):
    assert sum(p.numel() for p in build_model(name).parameters()) == parameters
    assert sum(p.numel() for p in build_model(name, norm="group").parameters()) == parameters


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("norm", NORMS)
def test_logits_have_one_column_per_class(name, norm):
    model = build_model(name, num_classes=7, norm=norm).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_resnet20_has_no_projection_shortcuts():
    names = [name for name, _ in build_model("resnet20").named_parameters()]
    assert not any("shortcut" in name for name in names)


def test_unknown_architecture_is_refused_by_name():
    with pytest.raises(ValueError, match="resnet20"):
        build_model("vgg")


@functools.cache
def torchvision_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(f"torchvision:{name}", num_classes=7)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18", "googlenet"])
@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("training", [True, False])
def test_a_torchvision_classifier_returns_plain_logits_in_training_and_evaluation(name, size, training):
    model = torchvision_model(name).train(training)  # googlenet: its auxiliary classifiers are off
    with torch.no_grad():
        logits = model(torch.randn(3, 3, size, size))
    assert type(logits) is torch.Tensor and logits.shape == (3, 7)


def test_torchvision_models_are_built_without_pretrained_weights():
    torch.manual_seed(0)
    first = build_model("torchvision:mobilenet_v3_small", num_classes=7)
    torch.manual_seed(1)
    second = build_model("torchvision:mobilenet_v3_small", num_classes=7)
    assert not torch.equal(first.features[0][0].weight, second.features[0][0].weight)


@pytest.mark.parametrize(
    "name",
    [
        "torchvision:__import__",
        "torchvision:get_model",
        "torchvision:fasterrcnn_resnet50_fpn",
        "torchvision:raft_small",
        "torchvision:quantized_resnet18",
        "torchvision:RESNET18",
        "torchvision:resnet18 ",
        "torchvision:../model",
        "torchvision:",
        "torchvision:" + "resnet18" * 1250,
        "x" * 10_000,
        "",
        "torchvision.resnet18",
    ],
)
def test_hostile_and_unknown_names_are_refused_with_how_to_list_the_valid_ones(name):
    with pytest.raises(ValueError, match=r"model\.architectures\(\)") as refused:
        build_model(name)
    assert len(str(refused.value)) < 300  # a long name from the network is not echoed whole


def test_the_list_of_architectures_holds_the_project_models_and_no_detection_or_quantized_one():
    names = architectures()
    assert names[:2] == ["resnet20", "resnet18"]
    assert "torchvision:mobilenet_v3_small" in names and "torchvision:resnet50" in names
    assert not any(word in name for name in names for word in ("rcnn", "quantized", "deeplab", "r3d", "raft"))


@pytest.mark.parametrize("name", sorted(TOO_SMALL_INPUTS))
@pytest.mark.filterwarnings("ignore:The default weight initialization")
def test_classifiers_that_cannot_take_32x32_images_are_refused_and_indeed_cannot(name):
    with pytest.raises(ValueError, match="32x32"):
        build_model(f"torchvision:{name}")
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        model = torchvision.models.get_model(name, weights=None, num_classes=7).eval()
    with pytest.raises((RuntimeError, AssertionError)):
        model(torch.empty(2, 3, 32, 32, device="meta"))


@pytest.mark.long
def test_every_listed_classifier_takes_32x32_and_64x64_images():
    # Shapes on the meta device: about a minute for the whole registry (RegNets compute their widths with
    # tensors, so they are built on the CPU).
    for name in architectures()[2:]:
        try:
            with torch.device("meta"):
                model = build_model(name, num_classes=7)
        except NotImplementedError:
            model = build_model(name, num_classes=7).to("meta")
        for size in (32, 64):
            for training in (True, False):
                logits = model.train(training)(torch.empty(2, 3, size, size, device="meta"))
                assert type(logits) is torch.Tensor and logits.shape == (2, 7), (name, size, training)


def test_group_norm_refused_for_torchvision_models_and_unknown_norms_refused():
    with pytest.raises(ValueError, match="resnet20 and resnet18"):
        build_model("torchvision:resnet18", norm="group")
    with pytest.raises(ValueError, match="batch, group"):
        build_model("resnet20", norm="layer")


@pytest.mark.parametrize("classes", [0, -1, 10**9])
def test_a_number_of_classes_out_of_bounds_is_refused(classes):
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet20", num_classes=classes)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_group_norm_resnets_have_no_batchnorm_and_no_running_statistics(name):
    model = build_model(name, norm="group")
    assert not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
    norms = [module for module in model.modules() if isinstance(module, nn.GroupNorm)]
    assert norms and all(norm.num_groups == GROUPS for norm in norms)
    assert list(model.buffers()) == []


def test_a_group_norm_resnet_trains():
    torch.manual_seed(0)
    model = build_model("resnet20", norm="group").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("norm, groups", [("group-ws", WS_GROUPS), ("layer-ws", 1)])
def test_weight_standardised_resnets_standardise_every_convolution_and_keep_no_statistics(norm, groups):
    model = build_model("resnet18", norm=norm)
    convolutions = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    assert convolutions and all(isinstance(module, StandardisedConv2d) for module in convolutions)
    assert {module.num_groups for module in model.modules() if isinstance(module, nn.GroupNorm)} == {groups}
    assert list(model.buffers()) == []


def test_weight_standardisation_convolves_with_filters_of_zero_mean_and_unit_variance():
    torch.manual_seed(0)
    conv = StandardisedConv2d(4, 6, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(7).add_(3)  # far from standardised
    standardised = conv.weight.detach().flatten(1)
    standardised = (standardised - standardised.mean(1, keepdim=True)) / standardised.std(
        1, unbiased=False, keepdim=True
    )
    assert torch.allclose(standardised.mean(1), torch.zeros(6), atol=1e-6)
    assert torch.allclose(standardised.var(1, unbiased=False), torch.ones(6), atol=1e-4)
    images = torch.randn(2, 4, 5, 5)
    expected = nn.functional.conv2d(images, standardised.view_as(conv.weight), padding=1)
    assert torch.allclose(conv(images), expected, atol=1e-4)
    conv.weight.data.mul_(100)  # the filters' scale does not matter
    assert torch.allclose(conv(images), expected, atol=1e-3)


def renorm_beside_batchnorm(running_mean: torch.Tensor, running_var: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """A BatchRenorm2d past its warm-up with these running statistics, and a BatchNorm2d with the same state."""
    torch.manual_seed(0)
    batchnorm, renorm = nn.BatchNorm2d(3), BatchRenorm2d(3)
    with torch.no_grad():
        batchnorm.weight.uniform_(0.5, 2)
        batchnorm.bias.uniform_(-1, 1)
        batchnorm.running_mean.copy_(running_mean)
        batchnorm.running_var.copy_(running_var)
        batchnorm.num_batches_tracked.fill_(RENORM_WARMUP)
    renorm.load_state_dict(batchnorm.state_dict())
    return batchnorm, renorm


def test_batch_renorm_is_batchnorm_where_the_running_statistics_are_the_batchs():
    images = torch.randn(16, 3, 4, 4) * torch.tensor([1.0, 2, 3]).view(1, 3, 1, 1) + 5
    batchnorm, renorm = renorm_beside_batchnorm(images.mean((0, 2, 3)), images.var((0, 2, 3), unbiased=False))
    ours, theirs = images.clone().requires_grad_(), images.clone().requires_grad_()
    out, expected = renorm(ours), batchnorm(theirs)
    assert torch.allclose(out, expected, atol=1e-4)
    weights = torch.randn_like(out)  # a loss that weighs every output differently
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.allclose(ours.grad, theirs.grad, atol=1e-4)
    assert torch.allclose(renorm.weight.grad, batchnorm.weight.grad, atol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):  # the statistics move as BatchNorm's do
        assert torch.allclose(getattr(renorm, name).float(), getattr(batchnorm, name).float(), atol=1e-5), name


def test_batch_renorm_normalises_a_skewed_batch_with_the_running_statistics_within_its_bounds():
    # a learner's batch of few classes: its mean and spread are off the federation's (running) ones
    images = torch.randn(16, 3, 4, 4) * 1.5 + 0.5
    batchnorm, renorm = renorm_beside_batchnorm(torch.zeros(3), torch.ones(3))
    evaluated = batchnorm.eval()(images)  # what the model is evaluated with: the running statistics
    assert torch.allclose(renorm.train()(images), evaluated, atol=1e-4)
    assert not torch.allclose(batchnorm.train()(images), evaluated, atol=0.1)  # plain BatchNorm: the batch's
    far = torch.randn(16, 3, 4, 4) + 100  # beyond d's bound: normalised as far as RENORM_D_MAX allows
    shifted = (renorm(far) - renorm.bias.view(1, 3, 1, 1)) / renorm.weight.view(1, 3, 1, 1)
    assert torch.allclose(shifted.mean((0, 2, 3)), torch.full((3,), RENORM_D_MAX), atol=1e-3)


@pytest.mark.parametrize(
    "running_mean, running_var, spread, centre",
    [
        (0.0, 1e12, 1 / RENORM_R_MAX, 0.0),  # a variance grown 1000 times a round, for a few rounds
        (0.0, 1e-12, RENORM_R_MAX, RENORM_D_MAX),  # the batch's mean, 0.5, is 5e5 running deviations off
        (1e6, 1.0, 1.0, -RENORM_D_MAX),
        (-1e6, 1.0, 1.0, RENORM_D_MAX),
    ],
)
def test_hostile_running_statistics_bend_a_renorm_learners_training_only_as_far_as_r_and_d_allow(
    running_mean, running_var, spread, centre
):
    # Under renorm the running statistics (a hostile learner's, averaged in) shape every learner's training, not
    # only evaluation: each channel's normalised batch is scaled by r and shifted by d, no further.
    images = torch.randn(64, 3, 4, 4) + 0.5
    _, renorm = renorm_beside_batchnorm(torch.full((3,), running_mean), torch.full((3,), running_var))
    normalised = (renorm.train()(images) - renorm.bias.view(1, 3, 1, 1)) / renorm.weight.view(1, 3, 1, 1)
    batch_std = images.std((0, 2, 3), unbiased=False)
    expected_spread = torch.full((3,), spread) if spread != 1.0 else batch_std  # r = the batch's std / 1
    assert torch.allclose(normalised.std((0, 2, 3), unbiased=False), expected_spread, atol=1e-3)
    assert torch.allclose(normalised.mean((0, 2, 3)), torch.full((3,), centre), atol=1e-3)


def test_batch_renorm_is_batchnorm_during_its_warm_up():
    images = torch.randn(16, 3, 4, 4) * 2 + 1
    batchnorm, renorm = renorm_beside_batchnorm(torch.zeros(3), torch.ones(3))
    renorm.num_batches_tracked.fill_(RENORM_WARMUP - 1)
    batchnorm.num_batches_tracked.fill_(RENORM_WARMUP - 1)
    assert torch.allclose(renorm(images), batchnorm(images), atol=1e-5)


# --- initial weights ---------------------------------------------------------------------------------------


def trained(architecture: str, num_classes: int = 10, seed: int = 1, norm: str = "batch") -> nn.Module:
    """A model whose every tensor differs from a fresh one's, batch counters included."""
    torch.manual_seed(seed)
    model = build_model(architecture, num_classes, norm).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    return model


def states_equal(a: dict, b: dict, names) -> bool:
    return all(torch.equal(a[name], b[name]) for name in names)


def test_a_runs_model_pt_reloads_exactly(tmp_path):
    saved = trained("resnet20")
    checkpoint.save_atomically(saved.state_dict(), tmp_path / "model.pt")  # as the leader writes model.pt
    torch.manual_seed(2)
    model = build_model("resnet20")
    assert load_initial_weights(model, tmp_path / "model.pt") == []
    assert states_equal(model.state_dict(), saved.state_dict(), saved.state_dict())


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"model": s, "optimizer": {"state": {}}, "round": 3, "config": {"model": "resnet20"}},
        lambda s: {"state_dict": s, "epoch": 90},
        lambda s: {f"module.{name}": tensor for name, tensor in s.items()},
    ],
    ids=["checkpoint.pt", "state_dict", "DataParallel"],
)
def test_weights_wrapped_as_checkpoints_keep_them_load_too(tmp_path, wrap):
    saved = trained("resnet20")
    torch.save(wrap(saved.state_dict()), tmp_path / "checkpoint.pt")
    model = build_model("resnet20")
    assert load_initial_weights(model, tmp_path / "checkpoint.pt") == []
    assert states_equal(model.state_dict(), saved.state_dict(), saved.state_dict())


def test_another_number_of_classes_keeps_the_fresh_classifier_and_names_it(tmp_path, caplog):
    saved = trained("resnet20", num_classes=10)
    torch.save(saved.state_dict(), tmp_path / "model.pt")
    model = build_model("resnet20", num_classes=7)
    fresh = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        assert load_initial_weights(model, tmp_path / "model.pt") == ["fc.weight", "fc.bias"]
    assert "fc.weight (file [10, 64], model [7, 64])" in caplog.text and "fc.bias" in caplog.text
    others = [name for name in fresh if not name.startswith("fc.")]
    assert states_equal(model.state_dict(), saved.state_dict(), others)
    assert states_equal(model.state_dict(), fresh, ["fc.weight", "fc.bias"])


def test_a_torchvision_classifier_for_another_number_of_classes_loads_too(tmp_path):
    torch.manual_seed(1)
    torch.save(build_model("torchvision:mobilenet_v3_small", 10).state_dict(), tmp_path / "model.pt")
    model = build_model("torchvision:mobilenet_v3_small", 7)
    assert load_initial_weights(model, tmp_path / "model.pt") == ["classifier.3.weight", "classifier.3.bias"]


@pytest.mark.parametrize(
    "file_of, model_of",
    [
        (("resnet20", "batch"), ("resnet18", "batch")),
        (("torchvision:resnet18", "batch"), ("resnet18", "batch")),
        (("resnet20", "batch"), ("resnet20", "group")),
        (("resnet20", "group"), ("resnet20", "batch")),
    ],
)
def test_a_file_for_another_architecture_or_norm_is_refused(tmp_path, file_of, model_of):
    torch.save(build_model(file_of[0], norm=file_of[1]).state_dict(), tmp_path / "model.pt")
    model = build_model(model_of[0], norm=model_of[1])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit this architecture"):
        load_initial_weights(model, tmp_path / "model.pt")
    assert states_equal(model.state_dict(), before, before)


def test_the_same_names_in_many_other_shapes_are_another_architecture(tmp_path):
    wide = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match="5 tensors have other shapes"):
        load_initial_weights(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)), tmp_path / "wide.pt")


def test_a_file_without_batch_counters_loads(tmp_path):
    saved = trained("resnet20")
    state = {name: tensor for name, tensor in saved.state_dict().items() if not name.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pt")
    model = build_model("resnet20")
    assert load_initial_weights(model, tmp_path / "old.pt") == []
    assert states_equal(model.state_dict(), saved.state_dict(), state)
    assert model.bn1.num_batches_tracked.item() == 0


UNPICKLED = []


def _record_unpickling() -> None:
    UNPICKLED.append(True)


class Sneaky:
    """An object that would run code when unpickled by a loader that allows it."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_a_file_with_arbitrary_objects_is_refused_without_running_them(tmp_path):
    torch.save({"fc.weight": torch.zeros(10, 64), "extra": Sneaky()}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"objects other than tensors .*_record_unpickling"):
        load_initial_weights(build_model("resnet20"), tmp_path / "model.pt")
    assert UNPICKLED == []


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"not a torch file at all", "cannot read"),
        (b"", "cannot read"),
        ([1, 2, 3], "holds no state_dict"),
        ({"model": 3}, "holds no state_dict"),
        ({}, "holds no state_dict"),
        ({"fc.weight": torch.tensor([float("nan")])}, "NaN or Inf in fc.weight"),
    ],
)
def test_a_file_that_holds_no_usable_weights_is_refused_saying_what_to_give(tmp_path, content, problem):
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=problem):
        load_initial_weights(build_model("resnet20"), path)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"cannot read .*nothing\.pt"):
        load_initial_weights(build_model("resnet20"), tmp_path / "nothing.pt")
