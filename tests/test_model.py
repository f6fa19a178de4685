"""Models by name: the CIFAR ResNets (batch or group norm), torchvision's classifiers, hostile names refused."""

import functools

import pytest
import torch
import torchvision.models
from torch import nn

from model import ARCHITECTURES, GROUPS, TOO_SMALL_INPUTS, architectures, build_model


@pytest.mark.parametrize("name, parameters", [("resnet20", 269_722), ("resnet18", 11_173_962)])
def test_parameter_counts_match_the_published_architectures(name, parameters):
    assert sum(p.numel() for p in build_model(name).parameters()) == parameters
    assert sum(p.numel() for p in build_model(name, norm="group").parameters()) == parameters


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("norm", ["batch", "group"])
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


@pytest.mark.parametrize("name", [
    "torchvision:__import__", "torchvision:get_model", "torchvision:fasterrcnn_resnet50_fpn",
    "torchvision:raft_small", "torchvision:quantized_resnet18", "torchvision:RESNET18", "torchvision:resnet18 ",
    "torchvision:../model", "torchvision:", "torchvision:" + "resnet18" * 1250, "x" * 10_000, "", "torchvision.resnet18",
])
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

