"""Pictures of discovered categories: per cluster its most typical unlabelled images and matched class."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

from protolib.gcd.metrics import hungarian_match
from protolib.utils.io import atomic_savefig
from protolib.utils.modes import evaluating


class ClusterGallery(L.Callback):
    """After testing, draw ``clusters.png``: one row per cluster with the ``num_images`` unlabelled training
    images nearest its prototype (a search of the network's bank), titled with the known or new class the
    Hungarian matching gave it. Needs a GCD datamodule (``unlabelled_dataset``) and a network with a bank.
    """

    def __init__(self, num_images: int = 8, filename: str = "clusters.png", batch_size: int = 256) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.num_images, self.filename, self.batch_size = num_images, filename, batch_size

    @torch.no_grad()
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        dataset = datamodule.unlabelled_dataset
        bank = pl_module.prototype_bank
        feats, labels, preds = [], [], []
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size)
        with evaluating(pl_module):
            for batch in loader:
                out = pl_module.net.extract(batch["image"].to(pl_module.device))
                feats.append(out["features"].float().cpu())
                preds.append(out["logits"].argmax(1).cpu())
                labels.append(batch["label"])
        features, y, pred = torch.cat(feats), torch.cat(labels).numpy(), torch.cat(preds).numpy()
        dist, ids = bank.search(features, 1)  # nearest prototype of each image: its cluster and typicality
        cluster, dist = bank.owners.cpu()[ids[:, 0]].numpy(), dist[:, 0].numpy()
        to_class = {k: c for c, k in hungarian_match(y, pred).items()}
        known = datamodule.num_known_classes
        rows = []
        for k in sorted(set(cluster.tolist())):
            members = np.flatnonzero(cluster == k)
            best = members[np.argsort(dist[members])[: self.num_images]]
            c = to_class.get(int(k))
            name = "unmatched" if c is None or c >= len(datamodule.class_names) else datamodule.class_names[c]
            kind = "" if c is None else (" (known)" if c < known else " (new)")
            rows.append((f"cluster {k}: {len(members)} img -> {name}{kind}", best))
        self.draw(rows, dataset, datamodule, Path(trainer.default_root_dir) / self.filename)

    def draw(self, rows: list[tuple[str, np.ndarray]], dataset, datamodule, path: Path) -> Path:
        """A (clusters x num_images) grid of denormalised images, each row titled."""
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(
            len(rows), self.num_images, figsize=(1.2 * self.num_images, 1.35 * len(rows)), squeeze=False
        )
        for r, (title, members) in enumerate(rows):
            for c in range(self.num_images):
                ax = axes[r, c]
                ax.axis("off")
                if c < len(members):
                    image = datamodule.denormalize(dataset[int(members[c])]["image"])  # (C, H, W)
                    ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray")
            axes[r, 0].set_title(title, loc="left", fontsize=8)
        fig.suptitle(
            "most typical unlabelled images per discovered cluster (nearest its prototype)", fontsize=9
        )
        fig.tight_layout()
        try:
            return atomic_savefig(path, fig, dpi=100)
        finally:
            plt.close(fig)
