"""Backbones stay plain timm models; the featurizer/classifier split and frozen BatchNorm behave as documented."""

import pytest
import timm
import torch

from dgzoo.errors import DGZooError
from dgzoo.models import (
    check_backbone,
    classifier,
    create_backbone,
    data_config,
    features,
    featurizer_parameters,
    freeze_batchnorm,
)


def test_state_dict_keys_match_plain_timm():
    model = create_backbone("test_resnet", num_classes=7, dropout=0.1)
    plain = timm.create_model("test_resnet", num_classes=7)
    assert list(model.state_dict()) == list(plain.state_dict())


def test_features_then_classifier_equals_forward():
    model = create_backbone("test_resnet", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(classifier(model)(features(model, x)), model(x), atol=1e-6)
    head = {id(p) for p in classifier(model).parameters()}
    names = [n for n, _ in featurizer_parameters(model)]
    assert names and not any(id(p) in head for _, p in featurizer_parameters(model))
    assert not any(n.startswith("fc.") for n in names)


def test_frozen_batchnorm_keeps_running_stats_and_trains_affine():
    model = create_backbone("test_resnet", num_classes=3)
    assert freeze_batchnorm(model) > 0
    model.train()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert torch.equal(bn.running_mean, before) and bn.weight.grad is not None


def test_fixed_input_size_backbones_are_built_for_small_images():
    model = create_backbone("test_vit", num_classes=3, image_size=32)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert data_config(model, 32)["input_size"] == (3, 32, 32)


def test_data_config_squashes_like_domainbed():
    cfg = data_config(create_backbone("test_resnet", num_classes=3), 48)
    assert cfg["input_size"] == (3, 48, 48) and cfg["crop_pct"] == 1.0 and cfg["crop_mode"] == "squash"


@pytest.mark.parametrize(
    "name, message",
    [
        ("resnet5O", "did you mean: resnet50"),
        ("resnet50.tv_in1", "no pretrained tag 'tv_in1' (did you mean: tv_in1k"),
    ],
)
def test_bad_backbone_names_get_suggestions(name, message):
    with pytest.raises(DGZooError) as e:
        check_backbone(name)
    assert message in str(e.value)
