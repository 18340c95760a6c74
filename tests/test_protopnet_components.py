"""ProtoPNet building blocks against independent computations: distances, similarity, receptive fields,
high-activation boxes and every loss term on tiny hand-made tensors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from protolib.bank import PrototypeBank, pairwise_distances
from protolib.losses.protopnet import (
    ProtoPNetLoss,
    class_identity,
    cluster_cost,
    prototype_cluster_cost,
    separation_cost,
    wrong_class_l1,
)
from protolib.models.protopnet import high_activation_boxes, upsample_maps
from protolib.nn.backbones import build_backbone
from protolib.nn.prototype_layer import PrototypeLayer
from protolib.nn.receptive_field import receptive_field
from protolib.nn.similarity import L2Similarity, squared_l2_distances


def test_squared_l2_distances_match_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(2, 5, 3, 4, generator=generator, dtype=torch.float64)
    prototypes = torch.rand(7, 5, generator=generator, dtype=torch.float64)
    prototypes[0] = features[1, :, 2, 3]  # an exact match must give 0, never a negative rounding error
    brute = ((features[:, None] - prototypes[None, :, :, None, None]) ** 2).sum(dim=2)  # (B, P, H, W)
    distances = squared_l2_distances(features, prototypes)
    assert distances.shape == (2, 7, 3, 4)
    torch.testing.assert_close(distances, brute)
    assert distances.min() >= 0 and distances[1, 0, 2, 3] == pytest.approx(0.0, abs=1e-12)


def test_squared_l2_distances_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same D"):
        squared_l2_distances(torch.rand(1, 4, 2, 2), torch.rand(3, 5))


def test_log_and_linear_similarity_values() -> None:
    distances = torch.tensor([0.0, 1.0, 10.0])
    log_sim = L2Similarity("log", epsilon=1e-4).similarity(distances)
    expected = [math.log(1 / 1e-4), math.log(2 / 1.0001), math.log(11 / 10.0001)]
    torch.testing.assert_close(log_sim, torch.tensor(expected))
    torch.testing.assert_close(L2Similarity("linear").similarity(distances), -distances)
    with pytest.raises(ValueError, match="activation"):
        L2Similarity("cosine")


def test_prototype_layer_max_pools_similarity_maps() -> None:
    bank = PrototypeBank(6, 4, owners=[0, 0, 1, 1, 2, 2])
    layer = PrototypeLayer(bank, L2Similarity())
    features = torch.rand(3, 4, 5, 5)
    out = layer(features)
    assert out.distances.shape == (3, 6, 5, 5)
    torch.testing.assert_close(out.similarities, out.similarity_maps.flatten(2).max(dim=2).values)
    torch.testing.assert_close(out.min_distances, out.distances.flatten(2).min(dim=2).values)
    with pytest.raises(ValueError, match="metric"):
        PrototypeLayer(PrototypeBank(2, 4, metric="cosine"), L2Similarity())


# ------------------------------------------------------------------------------------ losses
OWNERS = torch.tensor([0, 0, 1, 1])  # P = 4 prototypes, C = 2 classes
MIN_DISTANCES = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 0.5]])  # (B = 2, P)
LABELS = torch.tensor([0, 1])


def test_cluster_and_separation_costs_by_hand() -> None:
    identity = class_identity(OWNERS, 2)
    # image 0 (class 0): own prototypes 0, 1 -> nearest 1.0; others 2, 3 -> nearest 3.0
    # image 1 (class 1): own prototypes 2, 3 -> nearest 0.5; others 0, 1 -> nearest 5.0
    cluster = cluster_cost(MIN_DISTANCES, LABELS, identity, max_dist=10.0)
    separation = separation_cost(MIN_DISTANCES, LABELS, identity, max_dist=10.0)
    assert cluster.item() == pytest.approx((1.0 + 0.5) / 2)
    assert separation.item() == pytest.approx((3.0 + 5.0) / 2)


def test_cluster_cost_follows_the_reference_beyond_max_dist() -> None:
    """The reference's max-similarity form saturates at max_dist when every own-class distance exceeds it."""
    identity = class_identity(OWNERS, 2)
    far = torch.tensor([[20.0, 30.0, 1.0, 1.0]])
    assert cluster_cost(far, torch.tensor([0]), identity, max_dist=10.0).item() == pytest.approx(10.0)


def test_wrong_class_l1_by_hand() -> None:
    weight = torch.tensor([[1.0, 2.0, -3.0, 4.0], [-5.0, 6.0, 7.0, -8.0]])  # (C, P)
    # wrong-class entries: class 0 <- prototypes 2, 3; class 1 <- prototypes 0, 1
    assert wrong_class_l1(weight, class_identity(OWNERS, 2)).item() == pytest.approx(3 + 4 + 5 + 6)


def test_total_loss_weights_the_terms_like_the_paper() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.25]])
    weight = torch.tensor([[1.0, 1.0, -0.5, -0.5], [-0.5, -0.5, 1.0, 1.0]])
    net = SimpleNamespace(owners=OWNERS, last_layer=nn.Linear(4, 2, bias=False), max_distance=10.0)
    net.last_layer.weight.data = weight
    outputs = {"logits": logits, "min_distances": MIN_DISTANCES}
    total, terms = ProtoPNetLoss()(outputs, LABELS, net)
    ce = -np.mean([2.0 - np.log(np.exp(2.0) + np.exp(-1.0)), 0.25 - np.log(np.exp(0.5) + np.exp(0.25))])
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["l1"].item() == pytest.approx(2.0)
    expected = ce + 0.8 * 0.75 - 0.08 * 4.0 + 1e-4 * 2.0
    assert total.item() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- receptive field
class LinearNet(nn.Module):
    """Convolutions, average pooling and a residual branch, without non-linearities: the input gradient
    of an output location is non-zero exactly on its receptive field, a brute-force reference."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 5, stride=2, padding=2)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.branch = nn.Conv2d(2, 2, 3, padding=1)
        self.down = nn.Conv2d(2, 3, 3, stride=2, padding=0, dilation=2)
        self.out_channels = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        return self.down(x + self.branch(x))


def test_receptive_field_boxes_match_gradient_support() -> None:
    net = LinearNet().double()
    for p in net.parameters():
        nn.init.constant_(p, 0.1)
    size = 64
    rf = receptive_field(net, size, in_chans=1)
    images = torch.ones(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    features = net(images)
    assert rf.feature_size == tuple(features.shape[-2:])
    locations = [(0, 0), (1, 2), (features.shape[-2] - 1, features.shape[-1] - 1)]
    for row, col in locations:
        (grad,) = torch.autograd.grad(features[0, :, row, col].sum(), images, retain_graph=True)
        rows = grad[0, 0].abs().sum(dim=1).nonzero().flatten()
        cols = grad[0, 0].abs().sum(dim=0).nonzero().flatten()
        expected = [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]
        assert rf.boxes(torch.tensor([[row, col]])).tolist() == [expected]


def test_receptive_field_of_small_cnn_by_hand() -> None:
    # two 3x3 convs (size 5), 2x2 pool (6, stride 2, centre 1.0), two 3x3 convs (14), 2x2 pool (16, stride 4,
    # centre 2.0): the reference code's arithmetic
    rf = receptive_field(build_backbone("small_cnn", in_chans=1), 32, in_chans=1)
    assert rf.stride == (4.0, 4.0) and rf.size == (16.0, 16.0) and rf.start == (2.0, 2.0)
    assert rf.boxes(torch.tensor([[0, 0], [3, 5]])).tolist() == [[0, 0, 10, 10], [14, 6, 30, 22]]


def test_receptive_field_rejects_unmodelled_layers() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Upsample(scale_factor=2))
    with pytest.raises(ValueError, match="Upsample"):
        receptive_field(net, 16, in_chans=1)


# --------------------------------------------------------------------------- high activation
def reference_crop(activation: np.ndarray, percentile: float) -> list[int]:
    """The reference code's find_high_activation_crop, returned as x0, y0, x1, y1."""
    mask = activation >= np.percentile(activation, percentile)
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_high_activation_boxes_match_numpy() -> None:
    maps = torch.rand(5, 3, 3, generator=torch.Generator().manual_seed(1))
    upsampled = upsample_maps(maps, (24, 24))  # (5, 24, 24)
    boxes = high_activation_boxes(upsampled, 95.0)
    for i in range(5):
        assert boxes[i].tolist() == reference_crop(upsampled[i].numpy(), 95.0)
    assert boxes.shape == (5, 4)
    with pytest.raises(ValueError, match="percentile"):
        high_activation_boxes(upsampled, 120.0)


def test_upsample_maps_is_bicubic_at_image_size() -> None:
    maps = torch.rand(2, 4, 4)
    expected = F.interpolate(maps[:, None], size=(16, 16), mode="bicubic", align_corners=False)[:, 0]
    torch.testing.assert_close(upsample_maps(maps, (16, 16)), expected)


def test_distances_stay_float32_under_mixed_precision() -> None:
    features, prototypes = torch.rand(2, 16, 3, 3), torch.rand(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distances = squared_l2_distances(features.bfloat16(), prototypes)
    assert distances.dtype == torch.float32
    torch.testing.assert_close(distances, squared_l2_distances(features.bfloat16().float(), prototypes))


@pytest.mark.parametrize("name", ["vgg19", "densenet121"])
def test_receptive_field_of_the_papers_other_backbones(name: str) -> None:
    rf = receptive_field(build_backbone(name), 224)
    assert rf.stride == (32.0, 32.0) and rf.feature_size == (7, 7)
    boxes = rf.boxes(torch.tensor([[0, 0], [6, 6]]))
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 224).all() and (boxes[:, 2:] > boxes[:, :2]).all()


def test_push_search_and_similarity_layer_share_one_l2_kernel() -> None:
    """The bank's push distances and the prototype layer's distance maps are the same numbers."""
    torch.manual_seed(0)
    features = torch.rand(2, 5, 3, 4)  # (B, D, H, W)
    prototypes = torch.rand(6, 5)
    patches = features.permute(0, 2, 3, 1).reshape(-1, 5)  # (B*H*W, D)
    brute = ((patches[:, None, :] - prototypes[None]) ** 2).sum(-1)  # (B*H*W, P)
    push = pairwise_distances(patches, prototypes, "l2")
    layer = squared_l2_distances(features, prototypes).permute(0, 2, 3, 1).reshape(-1, 6)
    torch.testing.assert_close(push, brute, rtol=1e-5, atol=1e-6)
    assert torch.equal(push, layer)


def test_prototype_cluster_cost_pulls_every_prototype_by_hand() -> None:
    identity = class_identity(OWNERS, 2)
    # image 0 (class 0) is the only class-0 image: prototypes 0, 1 at 1.0, 2.0; image 1 (class 1) gives
    # prototypes 2, 3 their distances 7.0, 0.5
    expected = (1.0 + 2.0 + 7.0 + 0.5) / 4
    assert prototype_cluster_cost(MIN_DISTANCES, LABELS, identity).item() == pytest.approx(expected)
    # a batch of class 0 only: class 1's prototypes are skipped
    only_zero = prototype_cluster_cost(MIN_DISTANCES, torch.tensor([0, 0]), identity)
    assert only_zero.item() == pytest.approx((1.0 + 2.0) / 2)
    loss = ProtoPNetLoss(prototype_cluster=0.5)
    assert loss.weights["prototype_cluster"] == 0.5 and "prototype_cluster" not in ProtoPNetLoss().weights


def test_small_cnn_padding_modes() -> None:
    image = torch.rand(1, 1, 8, 8)
    zeros = build_backbone("small_cnn", in_chans=1)
    replicate = build_backbone("small_cnn", in_chans=1, padding_mode="replicate")
    replicate.load_state_dict(zeros.state_dict())
    assert replicate(image).shape == zeros(image).shape == (1, 64, 2, 2)
    assert not torch.allclose(replicate(image), zeros(image))
    with pytest.raises(ValueError, match="padding_mode"):
        build_backbone("small_cnn", padding_mode="circular-ish")


def test_small_cnn_coordinates_tell_interior_locations_apart() -> None:
    # a constant image with replicate padding: every location's features are equal (nothing tells two
    # locations apart) unless the coordinate channels say where each pixel is
    torch.manual_seed(0)
    image = torch.full((1, 3, 32, 32), 0.5)
    plain = build_backbone("small_cnn", padding_mode="replicate").eval()
    coords = build_backbone("small_cnn", padding_mode="replicate", coordinates=True).eval()
    assert coords.body[0].in_channels == 5 and coords(image).shape == plain(image).shape == (1, 64, 8, 8)
    flat = plain(image)
    assert torch.allclose(flat, flat[..., :1, :1].expand_as(flat), atol=1e-6)
    located = coords(image)[0].flatten(1).T  # (64 locations, 64 channels)
    assert len(torch.unique(located.round(decimals=5), dim=0)) == 64


def test_small_cnn_stride_two_keeps_twice_the_resolution() -> None:
    # without the last pooling: two 3x3 convs (5), pool (6, stride 2), two 3x3 convs (6 + 2 * 2 * 2 = 14)
    rf = receptive_field(build_backbone("small_cnn", in_chans=1, stride=2), 32, in_chans=1)
    assert rf.stride == (2.0, 2.0) and rf.size == (14.0, 14.0) and rf.feature_size == (16, 16)
    with pytest.raises(ValueError, match="stride"):
        build_backbone("small_cnn", stride=8)


def test_small_cnn_three_blocks_per_stage_widen_the_receptive_field() -> None:
    # three 3x3 convs (7), pool (8, stride 2), three 3x3 convs (8 + 3 * 2 * 2 = 20); with the last pool 22
    net = build_backbone("small_cnn", in_chans=1, blocks_per_stage=3, stride=2)
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 6
    assert receptive_field(net, 32, in_chans=1).size == (20.0, 20.0)
    deeper = receptive_field(build_backbone("small_cnn", in_chans=1, blocks_per_stage=3), 32, in_chans=1)
    assert deeper.size == (22.0, 22.0) and deeper.stride == (4.0, 4.0)
    with pytest.raises(ValueError, match="blocks_per_stage"):
        build_backbone("small_cnn", blocks_per_stage=4)
