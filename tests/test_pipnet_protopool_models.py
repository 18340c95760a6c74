"""PIP-Net and ProtoPool networks: the extract contract, contributions, and the bank searches behind the
visualisation (PIP-Net) and the push (ProtoPool), checked by brute force over the training patches."""

from __future__ import annotations

import pytest
import torch

from protolib.models.pipnet import PIPNet
from protolib.models.protopool import ProtoPool
from protolib.nn.similarity import squared_l2_distances
from tests.protopnet_helpers import tiny_digits


def make_pipnet(**kwargs: object) -> PIPNet:
    torch.manual_seed(0)
    return PIPNet(3, in_channels=1, image_size=16, backbone="small_cnn", num_prototypes=6, **kwargs)


def make_protopool() -> ProtoPool:
    torch.manual_seed(0)
    return ProtoPool(
        3, in_channels=1, image_size=16, backbone="small_cnn", pool_size=5, slots_per_class=2, prototype_dim=8
    )


def all_patches(net_maps, loader):
    maps, labels, indices = [], [], []
    for batch in loader:
        maps.append(net_maps(batch["image"]))
        labels.append(batch["label"])
        indices.append(batch["index"])
    return torch.cat(maps), torch.cat(labels), torch.cat(indices)


def test_pipnet_extract_contract_and_inference_threshold() -> None:
    net = make_pipnet().eval()
    images = torch.randn(4, 1, 16, 16)
    out = net.extract(images)
    assert out["presence_maps"].shape == (4, 6, 4, 4)
    torch.testing.assert_close(out["presence_maps"].sum(1), torch.ones(4, 4, 4))
    pooled = out["presence_maps"].flatten(2).amax(2)
    torch.testing.assert_close(out["pooled"], pooled)
    torch.testing.assert_close(out["features"], torch.where(pooled < 0.1, 0.0, pooled))  # eval: threshold
    torch.testing.assert_close(net.last_layer(out["features"]), out["logits"])
    torch.testing.assert_close(net.contributions(out["features"]).sum(1), out["logits"])
    net.train()
    torch.testing.assert_close(net.extract(images)["features"], net.extract(images)["pooled"])
    assert set(net.parameter_groups()) == {"backbone", "backbone_top", "prototypes", "last_layer"}
    assert net.prototypes_in_use() == 6


def test_pipnet_backbone_top_splits_the_backbone_by_name() -> None:
    net = make_pipnet(backbone_top=["body.10.", "body.11."])
    groups = net.parameter_groups()
    top_names = [n for n, p in net.backbone.named_parameters() if any(p is q for q in groups["backbone_top"])]
    assert top_names and sorted(top_names) == ["body.10.weight", "body.11.bias", "body.11.weight"]
    assert len(groups["backbone"]) + len(groups["backbone_top"]) == len(list(net.backbone.parameters()))
    with pytest.raises(ValueError, match="match no parameter"):
        make_pipnet(backbone_top=["layer4"])


def test_pipnet_visualisation_finds_where_each_prototype_is_most_present() -> None:
    dm = tiny_digits()
    net = make_pipnet().eval()
    loader = dm.push_dataloader()
    report = net.push(loader, step=7)
    with torch.no_grad():
        maps, labels, indices = all_patches(net.presence_maps, loader)  # (N, P, h, w)
    prov = net.provenance()
    for p in range(6):
        flat = maps[:, p].flatten()
        best = int(flat.argmax())
        n, rest = divmod(best, maps.shape[2] * maps.shape[3])
        assert report.presence[p].item() == pytest.approx(flat[best].item(), rel=1e-5)
        assert maps[prov["source_sample"][p], p, prov["location"][p][0], prov["location"][p][1]].item() == (
            pytest.approx(flat[best].item(), rel=1e-5)
        )
        assert int(prov["owner"][p]) == int(labels[indices == prov["source_sample"][p]][0])
        del n, rest
    assert (prov["step"] == 7).all() and (prov["activation_box"] >= 0).all()
    torch.testing.assert_close(net.bank.vectors, torch.eye(6))  # the visualisation moves no prototype
    absent = net.drop_absent(torch.tensor([0.05, 0.5, 0.1, 0.9, 0.2, 0.0]))
    assert absent.tolist() == [0, 2, 5] and net.prototypes_in_use() == 3


def test_protopool_forward_matches_the_paper_formula() -> None:
    net = make_protopool().eval()
    images = torch.randn(3, 1, 16, 16)
    out = net.extract(images)
    with torch.no_grad():
        d = squared_l2_distances(net.embed(images), net.bank.vectors).flatten(2)  # (B, M, hw)
        q = net.assignment()  # (C, M, K)

        def g(x: torch.Tensor) -> torch.Tensor:
            return torch.log((x + 1) / (x + 1e-4))

        slots = g(torch.einsum("bm,cmk->bck", d.min(2).values, q)) - g(
            torch.einsum("bm,cmk->bck", d.mean(2), q)
        )
        torch.testing.assert_close(out["features"], slots.flatten(1))
        torch.testing.assert_close(out["logits"], slots.flatten(1) @ net.last_layer.weight.T)
    # slot (c, k) -> class c at 1, other classes 0 (the reference's initialisation)
    assert torch.equal(net.last_layer.weight, torch.eye(3).repeat_interleave(2, dim=1))
    net.assignment.scale.fill_(1e4)  # hard choices: contributions add up to the logits
    out = net.extract(images)
    torch.testing.assert_close(
        net.contributions(out["prototype_similarity"]).sum(1), out["logits"], atol=1e-4, rtol=1e-4
    )


def test_protopool_push_projects_onto_the_nearest_patch_of_the_choosing_classes() -> None:
    dm = tiny_digits()
    net = make_protopool().eval()
    with torch.no_grad():
        net.assignment.logits.zero_()
        for c, chosen in enumerate([[0, 1], [1, 2], [3, 3]]):  # prototype 4 is chosen by nobody
            for k, m in enumerate(chosen):
                net.assignment.logits[c, m, k] = 5.0
    before = net.bank.vectors.detach().clone()
    loader = dm.push_dataloader()
    with torch.no_grad():
        emb, labels, indices = all_patches(net.embed, loader)  # (N, D, h, w)
    report = net.push(loader, step=3)
    choosers = {0: [0], 1: [0, 1], 2: [1], 3: [2]}
    prov = net.provenance()
    for m, classes in choosers.items():
        keep = torch.isin(labels, torch.tensor(classes))
        d = squared_l2_distances(emb[keep], before[m : m + 1])[:, 0].flatten()
        best = int(d.argmin())
        n, rest = divmod(best, emb.shape[2] * emb.shape[3])
        row, col = divmod(rest, emb.shape[3])
        assert int(prov["source_sample"][m]) == int(indices[keep][n])
        assert prov["location"][m].tolist() == [row, col]
        torch.testing.assert_close(net.bank.vectors[m], emb[keep][n, :, row, col])
        assert report.distances[m].item() == pytest.approx(d[best].item(), rel=1e-4, abs=1e-6)
        assert int(prov["owner"][m]) in classes
    torch.testing.assert_close(net.bank.vectors[4], before[4])  # unchosen: not moved
    assert int(prov["source_sample"][4]) == -1 and torch.isnan(report.distances[4])
    with pytest.raises(ValueError, match="does not prune"):
        net.prune(loader)


@pytest.mark.parametrize("network", [PIPNet, ProtoPool])
def test_backbone_options_reach_the_small_cnn(network: type) -> None:
    options = {"padding_mode": "replicate", "coordinates": True, "stride": 2, "blocks_per_stage": 1}
    net = network(3, in_channels=1, image_size=16, backbone="small_cnn", backbone_options=options)
    assert net.backbone.coordinates and net.backbone.body[0].padding_mode == "replicate"
    # stride 2 and one conv per stage: an 8 x 8 map of 8 px receptive fields at 16 px
    assert net.receptive_field.feature_size == (8, 8) and net.receptive_field.size == (8.0, 8.0)
