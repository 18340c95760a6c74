"""Why does the model find a patch and a prototype alike? The importance of hue, shape, texture, contrast and
saturation ("This Looks Like That, Because ... Explaining Prototypes for Interpretable Image Recognition",
Nauta, Jutte, Provoost and Seifert, 2021; reference code M-Nauta/Explaining_Prototypes).

Every image is modified in one visual characteristic at a time, and each prototype's similarity is read again
at the patch that was most similar to it on the unmodified image. **Local importance** of a characteristic
(for an image and a prototype) = similarity before - similarity after the modification: large when changing
that characteristic makes the patch look much less like the prototype. **Global importance** of a prototype
= the mean of its local importances over the training images weighted by their original similarity, so that
the images the prototype is present in count most (the reference's ``weighted_mean``).

The modifications and their strengths are the reference's (``preprocessing/mod_values.py``,
``create_modified_datasets.py``): hue shifted by 0.1 of the colour circle, saturation x0.7 and contrast x0.45
(torchvision's ``ColorJitter`` operations), texture removed by OpenCV's non-local-means colour denoising
(h = 4, 7 px template, 21 px search window) and shape distorted by a sinusoidal row/column shift of
amplitude 4 px and ``sin(pi * 0.05 * i)``. The reference modifies photos of a few hundred pixels that are
then resized to ProtoPNet's 224 px; on smaller images (``parts`` at 32 px, digits at 16) the shape warp is
done at the reference's size (each pixel repeated k = round(224 / side) times, warped with the paper's
pixel parameters, then averaged back in k x k blocks), so that it moves edges by the same fraction of the
image; colour, contrast and saturation are per-pixel or global and need no adaptation; the denoising runs at
the image's own resolution with the paper's windows (its search is non-local anyway). Grayscale images have
no hue or saturation: those two are left out for one-channel data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from explain.scores.registry import ScoreSpec, register
from protolib.data.base import VisionDataModule
from protolib.utils.io import atomic_savefig
from protolib.utils.modes import evaluating

CHARACTERISTICS = ("hue", "shape", "texture", "contrast", "saturation")  # the paper's five
COLOUR_ONLY = ("hue", "saturation")  # undefined on one-channel images


@dataclass(frozen=True)
class Modifications:
    """The strength of every modification; the defaults are the reference's ``mod_values.py``."""

    hue: float = 0.1  # hue shift, fraction of the colour circle (ColorJitter hue=[0.1, 0.1])
    contrast: float = 0.45  # contrast factor: blend with the image's mean gray (ColorJitter contrast)
    saturation: float = 0.7  # saturation factor: blend with the grayscale image (ColorJitter saturation)
    brightness: float = 0.8  # the reference code's sixth modification (not one of the paper's five)
    shape_amplitude: float = 4.0  # A: rows and columns shifted by int(A sin(pi w i)) pixels
    shape_frequency: float = 0.05  # w
    shape_reference_size: int = 224  # side the warp's pixel parameters are meant for (ProtoPNet's input)
    texture_h: float = 4.0  # non-local-means filter strength for L and for a, b (8-bit Lab units)
    texture_template: int = 7  # template (patch) window side, pixels
    texture_search: int = 21  # search window side, pixels


# ---------------------------------------------------------------------------------------------- modifications
def shift_hue(images: torch.Tensor, shift: float) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] with every hue moved by ``shift`` of the colour circle."""
    return TF.adjust_hue(images, shift)


def scale_saturation(images: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor`` x image + (1 - factor) x its grayscale, clamped to [0, 1]."""
    return TF.adjust_saturation(images, factor)


def scale_contrast(images: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor`` x image + (1 - factor) x the image's mean gray, clamped to [0, 1]."""
    return TF.adjust_contrast(images, factor)


def sine_shifts(length: int, amplitude: float, frequency: float) -> torch.Tensor:
    """(length,) integer shifts ``int(A sin(pi w i))`` (truncated toward zero, as the reference's ``int``)."""
    i = torch.arange(length, dtype=torch.float64)
    return torch.trunc(amplitude * torch.sin(math.pi * frequency * i)).long()


def roll_lines(images: torch.Tensor, shifts: torch.Tensor, line_dim: int, along_dim: int) -> torch.Tensor:
    """Roll every line ``i`` of ``images`` (B, C, H, W) along ``along_dim`` by ``shifts[i]`` (``np.roll``:
    out[j] = in[(j - s) mod n]); lines are indexed by ``line_dim``."""
    n = images.shape[along_dim]
    source = (torch.arange(n)[None, :] - shifts[:, None]) % n  # (lines, n)
    if line_dim == 2:  # lines are rows, roll along W
        index = source[None, None, :, :].expand_as(images)
    else:  # lines are columns, roll along H
        index = source.T[None, None, :, :].expand_as(images)
    return images.gather(along_dim, index.to(images.device))


def warp_shape(images: torch.Tensor, amplitude: float, frequency: float, reference_size: int) -> torch.Tensor:
    """The reference's ``modify_shape`` on (B, C, H, W): row i rolled sideways by ``int(A sin(pi w i))``,
    then column j rolled vertically by ``int(A sin(pi w j))``. Images smaller than ``reference_size`` are
    warped at k = round(reference_size / side) times their size (pixels repeated), then averaged back over
    k x k blocks."""
    k = max(1, round(reference_size / max(images.shape[-2:])))
    big = images.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1) if k > 1 else images
    rows = sine_shifts(big.shape[-2], amplitude, frequency)  # (H,) shift of each row along W
    big = roll_lines(big, rows, line_dim=2, along_dim=3)
    cols = sine_shifts(big.shape[-1], amplitude, frequency)  # (W,) shift of each column along H
    big = roll_lines(big, cols, line_dim=3, along_dim=2)
    return F.avg_pool2d(big, k) if k > 1 else big


# OpenCV's RGB (D65) <-> XYZ matrix and white point, and its 8-bit Lab scaling (L x 255/100, a, b + 128).
RGB_TO_XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
WHITE = torch.tensor([0.950456, 1.0, 1.088754], dtype=torch.float64)
LAB_SCALE = torch.tensor([255.0 / 100.0, 1.0, 1.0], dtype=torch.float64)
LAB_OFFSET = torch.tensor([0.0, 128.0, 128.0], dtype=torch.float64)
EPSILON_Y = 0.008856  # CIE's linear / cube-root switch


def per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(3,) constants as (1, 3, 1, 1) on ``like``'s device."""
    return values.to(like.device)[None, :, None, None]


def rgb_to_lab8(images: torch.Tensor) -> torch.Tensor:
    """RGB (B, 3, H, W) in [0, 1] -> CIE Lab (B, 3, H, W) in OpenCV's 8-bit units (L, a, b in 0..255), with
    the values taken as linear RGB (no sRGB gamma), as OpenCV's denoising converts (``COLOR_LBGR2Lab``)."""
    x = images.double()
    xyz = torch.einsum("ij,bjhw->bihw", RGB_TO_XYZ.to(x.device), x) / per_channel(WHITE, x)
    f = torch.where(xyz > EPSILON_Y, xyz.clamp_min(0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    lab = torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)
    return lab * per_channel(LAB_SCALE, x) + per_channel(LAB_OFFSET, x)


def lab8_to_rgb(lab8: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab8`, clamped to [0, 1] (float64)."""
    lab = (lab8 - per_channel(LAB_OFFSET, lab8)) / per_channel(LAB_SCALE, lab8)
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f > EPSILON_Y ** (1 / 3), f**3, (f - 16 / 116) / 7.787) * per_channel(WHITE, lab8)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(RGB_TO_XYZ).to(lab8.device), xyz).clamp(0, 1)


def reflect_index(n: int, pad: int) -> torch.Tensor:
    """(n + 2 pad,) source indices of a reflect-101 border (OpenCV's BORDER_DEFAULT) of any width."""
    index = torch.arange(-pad, n + pad)
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    index = index.remainder(period)
    return torch.where(index >= n, period - index, index)


def nl_means(values: torch.Tensor, h: float, template: int, search: int) -> torch.Tensor:
    """Non-local-means denoising of (B, C, H, W) values as OpenCV's ``fastNlMeansDenoising`` (L2 norm): every
    pixel becomes the weighted mean of the pixels in its ``search`` window, weighted by
    ``exp(-d / (h^2 C))`` with d the mean over the ``template`` window of the channel-summed squared
    difference of the two neighbourhoods; weights below 0.001 are dropped; reflect-101 borders."""
    if template % 2 == 0 or search % 2 == 0:
        raise ValueError(f"texture_template and texture_search must be odd, got {template} and {search}")
    b, c, height, width = values.shape
    t, s = template // 2, search // 2
    pad = s + t
    rows, cols = reflect_index(height, pad).to(values.device), reflect_index(width, pad).to(values.device)
    padded = values[..., rows, :][..., cols]  # (B, C, H + 2 pad, W + 2 pad)
    centre = padded[..., s : s + height + 2 * t, s : s + width + 2 * t]  # template neighbourhoods
    total = torch.zeros_like(values)
    weights = torch.zeros(b, 1, height, width, dtype=values.dtype, device=values.device)
    scale = 1.0 / (h * h * c)
    smallest = math.log(1e-3)  # exp(-d scale) below 1e-3 is dropped
    for dy in range(search):
        for dx in range(search):
            other = padded[..., dy : dy + height + 2 * t, dx : dx + width + 2 * t]
            d2 = (centre - other).square_().sum(1, keepdim=True)  # (B, 1, H+2t, W+2t)
            d2 = F.avg_pool2d(F.avg_pool2d(d2, (1, template), stride=1), (template, 1), stride=1)  # (B,1,H,W)
            exponent = d2.mul_(-scale)
            w = exponent.exp().masked_fill_(exponent < smallest, 0.0)
            total.addcmul_(w, other[..., t : t + height, t : t + width])
            weights += w
    return total / weights  # the centre pixel always has weight 1


def remove_texture(images: torch.Tensor, h: float, template: int, search: int) -> torch.Tensor:
    """OpenCV's ``fastNlMeansDenoisingColored`` (h = hColor) on RGB (B, 3, H, W) in [0, 1]: Lab rounded to
    8-bit levels as OpenCV holds it (its rounding decides which neighbourhoods count as alike), L denoised
    alone and (a, b) together, rounded again; one-channel images are denoised as 8-bit gray."""
    if images.shape[1] == 1:
        gray = (images.float() * 255).round()  # (B, 1, H, W) 8-bit levels, as OpenCV sees them
        return (nl_means(gray, h, template, search).round() / 255).clamp(0, 1).to(images.dtype)
    lab = rgb_to_lab8(images).round().clamp(0, 255).float()  # OpenCV denoises 8-bit Lab
    lab = torch.cat(
        [nl_means(lab[:, :1], h, template, search), nl_means(lab[:, 1:], h, template, search)], dim=1
    ).round()
    return lab8_to_rgb(lab.double()).to(images.dtype)


def modify(images: torch.Tensor, characteristic: str, mods: Modifications | None = None) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] with one characteristic changed as the paper does."""
    mods = mods or Modifications()
    if characteristic not in MODIFY:
        raise ValueError(f"unknown characteristic {characteristic!r}; choose from {sorted(MODIFY)}")
    return MODIFY[characteristic](images, mods)


MODIFY: dict[str, Callable[[torch.Tensor, Modifications], torch.Tensor]] = {
    "hue": lambda x, m: shift_hue(x, m.hue),
    "shape": lambda x, m: warp_shape(x, m.shape_amplitude, m.shape_frequency, m.shape_reference_size),
    "texture": lambda x, m: remove_texture(x, m.texture_h, m.texture_template, m.texture_search),
    "contrast": lambda x, m: scale_contrast(x, m.contrast),
    "saturation": lambda x, m: scale_saturation(x, m.saturation),
    "brightness": lambda x, m: TF.adjust_brightness(x, m.brightness),
}


def characteristics_for(channels: int, names: Sequence[str] = CHARACTERISTICS) -> tuple[str, ...]:
    """The characteristics that exist for images of ``channels`` channels (no hue or saturation in gray)."""
    return tuple(name for name in names if channels == 3 or name not in COLOUR_ONLY)


# ---------------------------------------------------------------------------------------------- importance
def prototype_similarities(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, P, L) similarity of every prototype at every patch location (L = h x w): the forward output's
    ``similarity_maps`` for patch prototypes (the networks with the ``paired_similarity_maps`` explanation
    API: the ProtoPNet family, ProtoPool, PIP-Net, ProtoTree), else (B, P, 1) from
    ``extract(images)["prototype_similarity"]`` for prototypes of a whole image (PALM, SimGCD, MoE router)."""
    if hasattr(net, "paired_similarity_maps"):
        return net(images).similarity_maps.flatten(2)
    extracted = net.extract(images)
    if "prototype_similarity" not in extracted:
        raise ValueError(
            f"{type(net).__name__} has no prototype similarities (no similarity_maps on its output and no "
            "'prototype_similarity' in extract()): the importance of visual characteristics needs prototypes"
        )
    return extracted["prototype_similarity"][:, :, None]


@dataclass
class LocalImportance:
    """Similarities of a batch before and after each modification, at each prototype's best patch."""

    characteristics: tuple[str, ...]
    similarity: torch.Tensor  # (B, P) similarity of each prototype's most similar patch, unmodified image
    delta: torch.Tensor  # (B, P, M) similarity before - after modification M at that same patch
    change: torch.Tensor  # (B, M) mean absolute pixel change of each modification (in [0, 1] units)

    def table(self, image: int, prototype: int) -> dict[str, float]:
        """``{characteristic: local importance}`` of ``prototype`` on image ``image`` of the batch."""
        return dict(zip(self.characteristics, self.delta[image, prototype].tolist(), strict=True))


@torch.no_grad()
def local_importance(
    net: nn.Module,
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    characteristics: Sequence[str] = CHARACTERISTICS,
    mods: Modifications | None = None,
) -> LocalImportance:
    """Local importance of every characteristic for every prototype on normalised ``images`` (B, C, H, W):
    modified in [0, 1] (``images * std + mean``) and normalised back with ``mean``/``std`` (C, 1, 1)."""
    device = images.device
    mean, std = mean.to(device, images.dtype), std.to(device, images.dtype)
    raw = (images * std + mean).clamp(0, 1)  # (B, C, H, W)
    modified = [modify(raw, name, mods) for name in characteristics]  # M x (B, C, H, W)
    with evaluating(net):
        sims = prototype_similarities(net, images)  # (B, P, L)
        best = sims.argmax(dim=2, keepdim=True)  # (B, P, 1) the reference's nearest patch
        before = sims.gather(2, best)[..., 0]  # (B, P)
        after = [prototype_similarities(net, (x - mean) / std).gather(2, best)[..., 0] for x in modified]
    return LocalImportance(
        characteristics=tuple(characteristics),
        similarity=before.cpu(),
        delta=torch.stack([before - a for a in after], dim=2).cpu(),  # (B, P, M)
        change=torch.stack([(x - raw).abs().flatten(1).mean(1) for x in modified], dim=1).cpu(),  # (B, M)
    )


@dataclass
class PrototypeImportance:
    """Local importances over a set of images and the global importance of every prototype."""

    characteristics: tuple[str, ...]
    indices: torch.Tensor  # (N,) dataset indices of the images
    similarity: torch.Tensor  # (N, P) original similarity of each prototype's best patch
    local: torch.Tensor  # (N, P, M) local importance (similarity before - after)
    change: torch.Tensor  # (N, M) mean absolute pixel change of each modification
    owners: torch.Tensor | None = field(default=None)  # (P,) class of each prototype, when the net has them

    @property
    def global_importance(self) -> torch.Tensor:
        """(P, M) similarity-weighted mean of the local importances (the reference's ``weighted_mean``);
        negative similarities (cosine prototypes) weigh 0; NaN for a prototype no image is similar to."""
        weights = self.similarity.clamp_min(0)[:, :, None]  # (N, P, 1)
        return (weights * self.local).sum(0) / weights.sum(0)

    def table(self) -> dict[int, dict[str, float]]:
        """``{prototype: {characteristic: global importance}}``: the numbers behind the pictures."""
        values = self.global_importance.tolist()
        return {p: dict(zip(self.characteristics, row, strict=True)) for p, row in enumerate(values)}

    def summary(self) -> dict[str, float]:
        """Mean global importance of each characteristic over prototypes, and the mean pixel change of each
        modification (``change_<name>``: a modification that changes nothing cannot matter)."""
        glob = self.global_importance
        out = {name: float(glob[:, m].nanmean()) for m, name in enumerate(self.characteristics)}
        change = self.change.mean(0)  # (M,)
        out.update({f"change_{name}": float(change[m]) for m, name in enumerate(self.characteristics)})
        return out


def generalisation(train: PrototypeImportance, test: PrototypeImportance) -> dict[str, float]:
    """Welch's t-test p-value per characteristic between the prototypes' global importances on training and
    on test images (the reference's check that global explanations generalise: a large p-value means no
    evidence that they differ)."""
    if train.characteristics != test.characteristics:
        raise ValueError(f"characteristics differ: {train.characteristics} vs {test.characteristics}")
    a, b = train.global_importance, test.global_importance  # (P, M) each
    return {
        name: float(stats.ttest_ind(a[:, m], b[:, m], equal_var=False, nan_policy="omit").pvalue)
        for m, name in enumerate(train.characteristics)
    }


def sample_indices(size: int, max_images: int | None) -> torch.Tensor:
    """``max_images`` evenly spaced indices into a dataset of ``size`` (all of them when it is None)."""
    if max_images is None or max_images >= size:
        return torch.arange(size)
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    return torch.linspace(0, size - 1, max_images).round().long().unique()


def vision_data(datamodule: L.LightningDataModule) -> VisionDataModule:
    """The set-up :class:`VisionDataModule` whose images are modified: the datamodule itself or the one a
    wrapper holds as ``base`` (category discovery's ``GCDDataModule``)."""
    data = next(
        (d for d in (datamodule, getattr(datamodule, "base", None)) if isinstance(d, VisionDataModule)), None
    )
    if data is None:
        raise ValueError(
            f"{type(datamodule).__name__} is not a protolib VisionDataModule and wraps none as .base: the "
            "modifications need its images and their normalisation (mean, std)"
        )
    if data.train_dataset is None:
        raise ValueError(f"{type(data).__name__} is not set up: call datamodule.setup('fit') first")
    return data


def split_images(data: VisionDataModule, split: str) -> Dataset:
    """The eval-transform images of ``split``: "train" (the paper's global importance) or "test" (its check
    that global importances generalise)."""
    if split == "train":
        return data.push_dataloader().dataset
    if split == "test":
        return data.test_dataset
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def prototype_importance(
    net: nn.Module,
    datamodule: L.LightningDataModule,
    max_images: int | None = 200,
    characteristics: Sequence[str] | None = None,
    mods: Modifications | None = None,
    split: str = "train",
    progress: bool = True,
) -> PrototypeImportance:
    """Local and global importance of hue, shape, texture, contrast and saturation for every prototype, over
    ``max_images`` evenly spaced images of ``split`` (eval transform; the paper's global importance is over
    the training set)."""
    data = vision_data(datamodule)
    dataset = split_images(data, split)
    indices = sample_indices(len(dataset), max_images)
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=data.batch_size, shuffle=False)
    names = characteristics_for(int(data.mean.shape[0]), characteristics or CHARACTERISTICS)
    device = next(net.parameters()).device
    parts: list[LocalImportance] = []
    for batch in tqdm(loader, desc="because: modified images", disable=not progress):
        parts.append(local_importance(net, batch["image"].to(device), data.mean, data.std, names, mods))
    owners = getattr(getattr(net, "prototype_bank", None), "owners", None)
    return PrototypeImportance(
        characteristics=names,
        indices=indices,
        similarity=torch.cat([part.similarity for part in parts]),
        local=torch.cat([part.delta for part in parts]),
        change=torch.cat([part.change for part in parts]),
        owners=None if owners is None else owners.detach().cpu(),
    )


# ---------------------------------------------------------------------------------------------- pictures
def importance_figure(values: Mapping[str, float], title: str = "") -> Figure:
    """Bar chart of the importance of each characteristic (one prototype, global or on one image)."""
    names = list(values)
    heights = np.array([values[name] for name in names], dtype=float)
    figure = Figure(figsize=(3.2, 2.2), dpi=100)
    axes = figure.add_subplot()
    colours = ["#c0392b" if v > 0 else "#7f8c8d" for v in heights]
    axes.bar(range(len(names)), np.nan_to_num(heights), color=colours)
    axes.axhline(0.0, color="black", linewidth=0.6)
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("similarity drop", fontsize=8)
    axes.tick_params(axis="y", labelsize=7)
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def save_importance_figures(
    importance: PrototypeImportance, out_dir: str | Path, prototypes: Sequence[int] | None = None
) -> dict[int, Path]:
    """One PNG bar chart of the global importances per prototype (``because_prototype_<p>.png``)."""
    table = importance.table()
    chosen = list(table) if prototypes is None else list(prototypes)
    unknown = [p for p in chosen if p not in table]
    if unknown:
        raise ValueError(f"prototype ids {unknown} do not exist; the network has {len(table)} prototypes")
    paths = {}
    for p in chosen:
        owner = "" if importance.owners is None else f" (class {int(importance.owners[p])})"
        figure = importance_figure(table[p], f"prototype {p}{owner}")
        paths[p] = atomic_savefig(Path(out_dir) / f"because_prototype_{p}.png", figure)
    return paths


# ---------------------------------------------------------------------------------------------- the score
def unavailable(net: nn.Module, datamodule: L.LightningDataModule) -> str | None:
    """None when the network has prototype similarities and the data can be un-normalised, else why not."""
    try:
        image = split_images(vision_data(datamodule), "train")[0]["image"][None]  # (1, C, H, W)
        with evaluating(net), torch.no_grad():
            prototype_similarities(net, image.to(next(net.parameters()).device))
    except ValueError as error:
        return str(error)
    return None


def compute(
    net: nn.Module, datamodule: L.LightningDataModule, *, max_images: int = 200, progress: bool = True
) -> dict[str, float]:
    """Mean global importance of each characteristic over prototypes, and each modification's pixel change."""
    return prototype_importance(net, datamodule, max_images=max_images, progress=progress).summary()


register(
    "because",
    ScoreSpec(
        compute=compute,
        unavailable=unavailable,
        higher_is_better=None,
        description=(
            "Nauta et al.'s 'This looks like that, because': mean over prototypes of the similarity drop "
            "when an image's hue, shape, texture, contrast or saturation is modified (descriptive: what the "
            "prototypes rely on), and change_<name>, the mean pixel change each modification makes"
        ),
    ),
)
