"""The CIFAR ResNets: output shapes, parameter counts, and the registry by name."""

import pytest
import torch

from model import ARCHITECTURES, build_model


@pytest.mark.parametrize("name, parameters", [("resnet20", 269_722), ("resnet18", 11_173_962)])
def test_parameter_counts_match_the_published_architectures(name, parameters):
    assert sum(p.numel() for p in build_model(name).parameters()) == parameters


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_logits_have_one_column_per_class(name):
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_resnet20_has_no_projection_shortcuts():
    names = [name for name, _ in build_model("resnet20").named_parameters()]
    assert not any("shortcut" in name for name in names)


def test_unknown_architecture_is_refused_by_name():
    with pytest.raises(ValueError, match="resnet20"):
        build_model("vgg")
