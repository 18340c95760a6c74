"""MoE ViTs: block replacement, upcycling exactness, the extract contract with routing, clear errors."""

from __future__ import annotations

import functools

import pytest
import torch
from timm.layers import Mlp
from torch import nn

from protolib.models.moe_vit import MoEViT, moe_block_indices, small_vit, to_moe_vit, upcycle_
from protolib.nn.moe import MoEMLP, PrototypeRouter, SoftmaxRouter

TINY = {"embed_dim": 16, "depth": 4, "num_heads": 2}
# One expert and a softmax router: the gate is exactly 1, so an upcycled block must equal the dense MLP.
GATE_ONE = functools.partial(SoftmaxRouter, capacity_factor=None, balance_weight=0.0)


def test_block_indices() -> None:
    assert moe_block_indices(6, "every_other") == [1, 3, 5]
    assert moe_block_indices(3, "all") == [0, 1, 2]
    assert moe_block_indices(6, [0, -1]) == [0, 5]
    with pytest.raises(ValueError, match="index 6 is out of range: this ViT has 6 blocks"):
        moe_block_indices(6, [6])
    with pytest.raises(ValueError, match="twice"):
        moe_block_indices(6, [1, -5])
    with pytest.raises(ValueError, match="every_other"):
        moe_block_indices(6, "odd")


@pytest.mark.parametrize(("hidden", "shared"), [(24, 0), (10, 1)])
def test_upcycled_block_equals_dense_mlp_at_gate_one(hidden: int, shared: int) -> None:
    torch.manual_seed(0)
    dense = Mlp(8, 24 if shared == 0 else 10 + 14)
    moe = MoEMLP(8, num_experts=1, expert_hidden=hidden, num_shared=shared, shared_hidden=14, router=GATE_ONE)
    upcycle_(moe, dense)
    x = torch.randn(5, 8)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-6, rtol=1e-5)


def test_upcycling_copies_into_every_expert_and_refuses_wider_experts() -> None:
    dense = Mlp(8, 16)
    moe = MoEMLP(8, num_experts=3, expert_hidden=16, num_shared=0)
    upcycle_(moe, dense)
    for e in range(3):
        torch.testing.assert_close(moe.w1[e], dense.fc1.weight.T)
        torch.testing.assert_close(moe.b2[e], dense.fc2.bias)
    with pytest.raises(ValueError, match="width <= 16"):
        upcycle_(MoEMLP(8, num_experts=2, expert_hidden=32), dense)
    with pytest.raises(ValueError, match="fc1 -> act -> fc2"):
        upcycle_(moe, nn.Identity())


def test_to_moe_vit_replaces_chosen_blocks_and_rejects_other_networks() -> None:
    vit = small_vit(5, 3, 16, **TINY)
    indices = to_moe_vit(vit, functools.partial(MoEMLP, num_experts=4), blocks=[0, 2], upcycle=True)
    assert indices == [0, 2]
    assert [isinstance(block.mlp, MoEMLP) for block in vit.blocks] == [True, False, True, False]
    with pytest.raises(ValueError, match=r"timm VisionTransformer.*got Sequential"):
        to_moe_vit(nn.Sequential(), functools.partial(MoEMLP))
    with pytest.raises(ValueError, match="out of range"):
        to_moe_vit(small_vit(5, 3, 16, **TINY), functools.partial(MoEMLP), blocks=[4])


def test_moe_vit_extract_contract() -> None:
    torch.manual_seed(1)
    net = MoEViT(
        4, in_channels=1, image_size=16, backbone_options=TINY, moe=functools.partial(MoEMLP, num_experts=3)
    )
    out = net.extract(torch.randn(2, 1, 16, 16))
    assert net.moe_blocks == [1, 3] and net.grid_size == (4, 4)
    assert out["logits"].shape == (2, 4) and out["features"].shape == (2, 16)
    assert out["expert_index"].shape == (2, 2, 16) and out["expert_gate"].shape == (2, 2, 16)
    assert out["routing_scores"].shape == (2, 16, 3) and out["patch_tokens"].shape == (2, 16, 16)
    # the best patch's cosine to each routing prototype of the explained (last) layer, from the bank
    bank = net.prototype_bank
    assert bank is net.vit.blocks[3].mlp.router.bank
    cos = (
        nn.functional.normalize(out["patch_tokens"], dim=-1) @ nn.functional.normalize(bank.vectors, dim=-1).T
    )
    torch.testing.assert_close(out["prototype_similarity"], cos.max(dim=1).values)
    torch.testing.assert_close(out["expert_index"][:, 1], cos.argmax(-1))
    expected = sum(net.vit.blocks[i].mlp.routing.losses["routing_contrastive"] for i in (1, 3))
    torch.testing.assert_close(out["loss_routing_contrastive"], expected)
    assert net.last_layer is net.vit.head and net.num_classes == 4


def test_softmax_and_dense_variants() -> None:
    softmax = MoEViT(
        3, 1, 16, backbone_options=TINY, moe=functools.partial(MoEMLP, num_experts=2, router=SoftmaxRouter)
    )
    out = softmax.extract(torch.randn(2, 1, 16, 16))
    assert softmax.prototype_bank is None and "prototype_similarity" not in out and "loss_load_balance" in out
    dense = MoEViT(3, 1, 16, backbone_options=TINY, moe=None)
    assert set(dense.extract(torch.randn(2, 1, 16, 16))) == {"logits", "features"}
    assert dense.prototype_bank is None
    with pytest.raises(ValueError, match="explain_layer=5"):
        MoEViT(
            3,
            1,
            16,
            backbone_options=TINY,
            moe=functools.partial(MoEMLP, router=PrototypeRouter),
            explain_layer=5,
        )
    with pytest.raises(ValueError, match="multiple of patch_size"):
        MoEViT(3, 1, 18, backbone_options=TINY)
