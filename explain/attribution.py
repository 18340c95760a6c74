"""Pixel attributions of a decision with captum: a second view of the same prediction (any network with
the extract contract; prototype similarities where it has them).

Integrated gradients (Sundararajan et al., 2017) of a class logit, or of one prototype's max similarity,
with respect to the input pixels. Unlike the prototype explanation it says which *pixels* moved the number,
not which training patch the image resembles; the two can be compared side by side. Attributions are
complete up to the integral's discretisation: they sum to ``f(image) - f(baseline)``, and the remainder
(captum's convergence delta) is reported so that a reader can see how far to trust them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from captum.attr import IntegratedGradients
from matplotlib.figure import Figure
from torch import nn

from protolib.utils.io import atomic_savefig
from protolib.utils.modes import evaluating


@dataclass
class Attribution:
    """Integrated-gradients attributions of one scalar output (a logit or a prototype's similarity)."""

    attributions: torch.Tensor  # (C, H, W) one value per input channel and pixel
    explained: str  # "logit" or "prototype similarity"
    target: int  # the class (logit) or the prototype (similarity)
    output: float  # f(image)
    baseline_output: float  # f(baseline)
    delta: float  # sum(attributions) - (output - baseline_output): the integral's discretisation error

    @property
    def heatmap(self) -> np.ndarray:
        """(H, W) attributions summed over channels: positive pixels raised the output, negative ones lowered
        it."""
        return self.attributions.sum(dim=0).cpu().numpy()


def integrated_gradients(
    model: nn.Module,
    image: torch.Tensor,
    target: int | None = None,
    prototype: int | None = None,
    baseline: torch.Tensor | None = None,
    steps: int = 64,
) -> Attribution:
    """Integrated gradients of the logit of class ``target`` (default: the predicted class), or, when
    ``prototype`` is given, of that prototype's max similarity, w.r.t. the normalised ``image`` (C, H, W).

    ``baseline`` (C, H, W) defaults to zeros, i.e. the dataset's mean colour in normalised space. ``steps``
    Gauss-Legendre points approximate the path integral; more steps give a smaller ``delta``.
    """
    if image.dim() != 3:
        raise ValueError(f"integrated_gradients takes one image (C, H, W), got shape {tuple(image.shape)}")
    if target is not None and prototype is not None:
        raise ValueError("give either target (explain a class logit) or prototype (its similarity), not both")
    device = next(model.parameters()).device
    inputs = image[None].to(device)  # (1, C, H, W)
    baselines = torch.zeros_like(inputs) if baseline is None else baseline[None].to(device)
    if baselines.shape != inputs.shape:
        raise ValueError(
            f"baseline shape {tuple(baselines.shape[1:])} differs from the image's {tuple(inputs.shape[1:])}"
        )

    def forward(x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C) logits or (N, P) similarities
        return model.extract(x)["logits" if prototype is None else "prototype_similarity"]

    with evaluating(model):
        with torch.no_grad():
            outputs = forward(torch.cat([inputs, baselines]))  # (2, C) or (2, P)
        index = prototype if prototype is not None else int(outputs[0].argmax()) if target is None else target
        if not 0 <= index < outputs.shape[1]:
            kind = "prototype" if prototype is not None else "target class"
            raise ValueError(f"{kind} {index} is out of range 0..{outputs.shape[1] - 1}")
        attributions, delta = IntegratedGradients(forward).attribute(
            inputs, baselines=baselines, target=index, n_steps=steps, return_convergence_delta=True
        )
    return Attribution(
        attributions=attributions[0].detach().cpu(),
        explained="logit" if prototype is None else "prototype similarity",
        target=int(index),
        output=float(outputs[0, index]),
        baseline_output=float(outputs[1, index]),
        delta=float(delta),
    )


def logit_attributions(
    net: nn.Module, images: torch.Tensor, targets: torch.Tensor, steps: int = 32, baseline: float = 0.0
) -> torch.Tensor:
    """Integrated gradients (B, C, H, W) of the logit of class ``targets[i]`` (B,) of each image of
    ``images`` (B, C, H, W), from a constant ``baseline`` image, in one batched call (the scores' saliency
    maps); any network with the extract contract."""
    inputs = images.to(next(net.parameters()).device)
    baselines = torch.full_like(inputs, baseline)
    attributions = IntegratedGradients(lambda x: net.extract(x)["logits"]).attribute(
        inputs, baselines=baselines, target=targets.to(inputs.device), n_steps=steps
    )
    return attributions.detach()


def plot_attribution(attribution: Attribution, image: np.ndarray, title: str = "") -> Figure:
    """The image (H, W, 3) uint8 next to its attribution heat-map (red raised the output, blue lowered it)."""
    figure = Figure(figsize=(6, 3.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.imshow(image)
    left.set_title("image", fontsize=9)
    heat = attribution.heatmap
    bound = float(np.abs(heat).max()) or 1.0
    shown = right.imshow(heat, cmap="bwr", vmin=-bound, vmax=bound)
    figure.colorbar(shown, ax=right, shrink=0.8)
    right.set_title(
        f"integrated gradients of {attribution.explained} {attribution.target}\n"
        f"sum {attribution.attributions.sum():.2f}; f(image) - f(baseline) = "
        f"{attribution.output - attribution.baseline_output:.2f}; delta {attribution.delta:.1e}",
        fontsize=8,
    )
    for axis in (left, right):
        axis.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def save_attribution(attribution: Attribution, image: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Render ``plot_attribution`` into one PNG, written atomically."""
    return atomic_savefig(path, plot_attribution(attribution, image, title), dpi=100)
