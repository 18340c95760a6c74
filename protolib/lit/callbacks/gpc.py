"""GPC's EM alternation: the E-step at the start of training epochs, K logged every epoch and drawn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import lightning as L
import torch

from protolib.gcd.gmm import EStepResult
from protolib.utils.io import atomic_savefig

log = logging.getLogger(__name__)


class EMModule(Protocol):
    """What the schedule drives (`protolib.lit.gpc.GPCModule`)."""

    num_clusters: int
    k_history: list[tuple[int, int]]

    def gpc_e_step(self, generator: torch.Generator | None = None, moves: bool = True) -> EStepResult: ...


class GPCSchedule(L.Callback):
    """Run the module's E-step before epochs ``warmup_epochs, warmup_epochs + interval, ...`` (reference
    ``--warmup_epochs``, ``--pcl_update_interval`` 1) and after the last, log ``train/k`` every epoch, and
    draw ``k_over_epochs.png`` at the end of fitting. Each E-step's random moves draw from ``seed + epoch``.
    E-steps before epoch ``moves_from`` refit the clusters without split / merge (K fixed; default: moves
    from the first E-step, as the code).
    """

    def __init__(
        self,
        warmup_epochs: int = 5,
        interval: int = 1,
        seed: int = 0,
        moves_from: int = 0,
        filename: str = "k_over_epochs.png",
    ) -> None:
        if warmup_epochs < 0 or interval < 1:
            raise ValueError(f"need warmup_epochs >= 0 and interval >= 1, got {warmup_epochs}, {interval}")
        self.warmup_epochs, self.interval, self.seed, self.filename = warmup_epochs, interval, seed, filename
        self.moves_from = moves_from

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.warmup_epochs == 0 and trainer.current_epoch == 0:
            self.e_step(pl_module, 0)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The E-step for epoch e runs at the end of epoch e - 1 (the same features as at the start of e), so
        # the last epoch's E-step leaves prototypes of the final features in the checkpoint the test reads.
        following = trainer.current_epoch + 1
        last = following >= (trainer.max_epochs or following + 1)
        due = following >= self.warmup_epochs and (following - self.warmup_epochs) % self.interval == 0
        if due or (last and following > self.warmup_epochs):
            result = self.e_step(pl_module, following)
            pl_module.log("train/gmm_log_likelihood", result.log_likelihood, on_step=False, on_epoch=True)
        module: EMModule = pl_module  # type: ignore[assignment]
        module.k_history.append((trainer.current_epoch, module.num_clusters))
        pl_module.log("train/k", float(module.num_clusters), on_step=False, on_epoch=True)

    def e_step(self, pl_module: L.LightningModule, epoch: int) -> EStepResult:
        """One E-step for ``epoch``, logged."""
        module: EMModule = pl_module  # type: ignore[assignment]
        result = module.gpc_e_step(torch.Generator().manual_seed(self.seed + epoch), epoch >= self.moves_from)
        moves = result.moves
        log.info(
            "GPC E-step (for epoch %d): K %d -> %d (%d split, %d merged pairs, %d empty), log-lik %.3f",
            epoch, result.k_before, result.k, len(moves.splits), len(moves.merges), len(moves.empty),
            result.log_likelihood,
        )  # fmt: skip
        return result

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module: EMModule = pl_module  # type: ignore[assignment]
        if trainer.is_global_zero and module.k_history:
            true_k = getattr(trainer.datamodule, "num_classes", None)
            self.draw(module.k_history, true_k, Path(trainer.default_root_dir) / self.filename)

    def draw(self, history: list[tuple[int, int]], true_k: int | None, path: Path) -> Path:
        """K after each epoch's E-step, with the true number of classes dashed when the data knows it."""
        import matplotlib.pyplot as plt

        epochs, ks = zip(*history, strict=True)
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.step(epochs, ks, where="post", marker="o", markersize=3, label="K (clusters)")
        if true_k is not None:
            ax.axhline(true_k, color="gray", linestyle="--", label=f"true classes ({true_k})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("K")
        ax.set_title("GPC: number of clusters over training")
        ax.legend(fontsize=8)
        fig.tight_layout()
        try:
            return atomic_savefig(path, fig, dpi=110)
        finally:
            plt.close(fig)
