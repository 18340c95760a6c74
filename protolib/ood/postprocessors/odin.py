"""ODIN (Liang et al., 2018): temperature scaling plus a small input perturbation toward higher confidence."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from protolib.ood.features import module_device
from protolib.ood.postprocessors.base import Postprocessor


class ODIN(Postprocessor):
    """Max softmax at temperature T of the input moved by ``noise`` against the gradient of the loss.

    As OpenOOD's ``odin``: the predicted class is the argmax of the untempered logits, the step is the sign of
    the input gradient of the tempered cross-entropy divided per channel by the normalisation std (so the step
    is ``noise`` in [0, 1] pixel units). Defaults T = 1000, noise = 0.0014. Needs the images (and gradients
    through the model), so it cannot score cached features.
    """

    name = "odin"
    needs_images = True

    def __init__(
        self, temperature: float = 1000.0, noise: float = 0.0014, input_std: Sequence[float] | None = None
    ) -> None:
        if temperature <= 0 or noise < 0:
            raise ValueError(f"ODIN needs temperature > 0 and noise >= 0, got {temperature}, {noise}")
        self.temperature, self.noise = float(temperature), float(noise)
        self.input_std = None if input_std is None else [float(s) for s in input_std]

    def score(self, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "image" not in inputs:
            raise ValueError("odin perturbs the input images: score it on batches with an 'image' entry")
        images = inputs["image"].to(module_device(model)).detach().requires_grad_(True)  # (B, C, H, W)
        with torch.enable_grad():
            logits = model.extract(images)["logits"]  # (B, K)
            loss = F.cross_entropy(logits / self.temperature, logits.detach().argmax(dim=1))
            (grad,) = torch.autograd.grad(loss, images)
        step = torch.where(grad >= 0, 1.0, -1.0) / self._std(images)  # (B, C, H, W)
        with torch.no_grad():
            logits = model.extract(images.detach() - self.noise * step)["logits"]
            return (logits.float() / self.temperature).softmax(dim=1).amax(dim=1)

    def _std(self, images: torch.Tensor) -> torch.Tensor:
        """(1, C, 1, 1) normalisation std; OpenOOD's fallback 0.5 when the data's std is unknown."""
        channels = images.shape[1]
        std = [0.5] * channels if self.input_std is None else self.input_std
        if len(std) == 1:
            std = std * channels
        if len(std) != channels:
            raise ValueError(f"odin input_std has {len(std)} values for {channels}-channel images")
        return images.new_tensor(std).view(1, channels, 1, 1)
