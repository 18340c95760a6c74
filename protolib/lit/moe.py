"""The MoE classifier recipe: cross-entropy plus the network's MoE losses, with routing statistics logged."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from protolib.lit.classifier import ClassifierModule
from protolib.nn.moe import expert_share, normalized_entropy


class MoEClassifierModule(ClassifierModule):
    """Train an MoE network (:class:`~protolib.models.moe_vit.MoEViT`): ``CE + sum of its loss_<name>``.

    Besides accuracy and each loss term it logs, for training and validation batches: per MoE block the
    normalised entropy of expert usage (``moe/block<b>/usage_entropy``, 1 = all experts equally used), the
    explained layer's per-expert token share (``moe/share/e<i>``) and its routing confidence
    (``moe/confidence``: mean top-1 gate, the chosen prototype's scaled cosine or the softmax probability).
    A network without MoE layers (the dense counterpart) trains as the plain classifier.
    """

    def compute_loss(
        self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = F.cross_entropy(outputs["logits"], batch["label"])
        aux = {
            name.removeprefix("loss_"): value for name, value in outputs.items() if name.startswith("loss_")
        }
        total = ce + sum(aux.values()) if aux else ce
        terms = {"ce": ce.detach(), **{name: value.detach() for name, value in aux.items()}}
        return total, terms | self.routing_stats()

    def routing_stats(self) -> dict[str, torch.Tensor]:
        """Usage entropy per MoE block, the explained layer's shares and confidence, from the last forward."""
        layers = getattr(self.net, "moe_layers", [])
        stats: dict[str, torch.Tensor] = {}
        for block, layer in zip(getattr(self.net, "moe_blocks", []), layers, strict=True):
            if layer.routing is None:
                continue
            share = expert_share(layer.routing.experts[:, 0].detach(), layer.num_experts)
            stats[f"moe/block{block}/usage_entropy"] = normalized_entropy(share)
            if layer is self.net.explained:
                stats |= {f"moe/share/e{e}": value for e, value in enumerate(share)}
                stats["moe/confidence"] = layer.routing.gates[:, 0].detach().float().mean()
        return stats

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)  # its forward leaves the batch's routing in the layers
        for name, value in self.routing_stats().items():
            self.log(f"val/{name}", value, batch_size=batch["label"].shape[0])
