"""Backbones, classifier heads and the classifier module's contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from protolib.lit.classifier import ClassifierModule, check_finite_loss
from protolib.models.baseline import BaselineNet
from protolib.nn.backbones import build_backbone
from protolib.nn.heads import CosineLinear, build_head


@pytest.mark.parametrize(("name", "channels"), [("small_cnn", 64), ("resnet18", 512)])
def test_backbone_feature_map_and_pooled_shapes(name: str, channels: int) -> None:
    images = torch.randn(2, 3, 32, 32)
    feature_map = build_backbone(name, in_chans=3)
    pooled = build_backbone(name, in_chans=3, pooled=True)
    assert feature_map.out_channels == pooled.out_channels == channels
    maps = feature_map(images)
    assert maps.shape[:2] == (2, channels) and maps.dim() == 4
    pooled.feature_map.load_state_dict(feature_map.state_dict())
    torch.testing.assert_close(pooled.eval()(images), feature_map.eval()(images).mean(dim=(2, 3)))


def test_small_cnn_has_stride_four_and_single_channel_input() -> None:
    assert build_backbone("small_cnn", in_chans=1)(torch.randn(1, 1, 32, 32)).shape == (1, 64, 8, 8)


def test_unknown_backbone_names_the_fix() -> None:
    with pytest.raises(ValueError, match="timm"):
        build_backbone("not_a_model_anywhere")


def test_cosine_head_equals_scaled_cosine_similarity() -> None:
    head = CosineLinear(5, 3, scale=10.0)
    features = torch.randn(4, 5)
    expected = 10.0 * F.cosine_similarity(features[:, None, :], head.weight[None, :, :], dim=-1)
    torch.testing.assert_close(head(features), expected)
    with pytest.raises(ValueError, match="linear"):
        build_head("mlp", 5, 3)


def test_baseline_extract_contract_logits_from_last_layer() -> None:
    module = ClassifierModule(BaselineNet(num_classes=4, in_channels=1)).eval()
    outputs = module.extract(torch.randn(3, 1, 16, 16))
    assert outputs["features"].shape == (3, 64) and outputs["logits"].shape == (3, 4)
    torch.testing.assert_close(module.last_layer(outputs["features"]), outputs["logits"])


def test_non_finite_loss_names_the_term() -> None:
    check_finite_loss(torch.tensor(1.0), {"ce": torch.tensor(1.0)}, step=0)
    with pytest.raises(FloatingPointError, match="cluster"):
        check_finite_loss(
            torch.tensor(float("nan")), {"ce": torch.tensor(1.0), "cluster": torch.tensor(float("nan"))}, 3
        )


def test_too_few_classes_rejected() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        ClassifierModule(BaselineNet(num_classes=1))
