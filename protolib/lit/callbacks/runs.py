"""Callbacks that keep a training run safe to interrupt and honest about failure, for every family.

`LastCheckpoint` writes ``last.ckpt`` after every finished epoch and when SIGTERM or Ctrl-C stops training;
`DivergenceCheck` stops a run whose loss has exploded or whose push landed absurdly far away, with the same
``FloatingPointError`` the recipes raise on a non-finite loss.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from protolib.lit.classifier import divergence_error

log = logging.getLogger(__name__)


class LastCheckpoint(Checkpoint):
    """``<dirpath>/<filename>.ckpt`` is always the latest state: rewritten (atomically, through the trainer's
    checkpoint I/O) after every finished training epoch, and at the stop when SIGTERM or Ctrl-C interrupts
    training. Best-by-metric checkpoints stay ModelCheckpoint's job; resume from this one."""

    def __init__(self, dirpath: str | Path, filename: str = "last") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.stopped_at: tuple[int, int] | None = None  # (epoch, step) of a save at an interruption

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and not trainer.fast_dev_run:
            trainer.save_checkpoint(self.path)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Only a stop by the user or the scheduler saves: a diverged or crashed state is not worth resuming.
        interrupted = isinstance(exception, (SIGTERMException, KeyboardInterrupt))
        if not interrupted or trainer.state.fn != TrainerFn.FITTING or trainer.fast_dev_run:
            return
        trainer.save_checkpoint(self.path)
        self.stopped_at = (trainer.current_epoch, trainer.global_step)
        log.warning(
            "training interrupted (%s) at epoch %d, step %d; state saved to %s: resume with resume=%s",
            type(exception).__name__,
            trainer.current_epoch,
            trainer.global_step,
            self.path,
            self.path,
        )


class DivergenceCheck(L.Callback):
    """Stop training that has diverged, for every family, with the recipes' ``FloatingPointError``.

    * a training loss that is non-finite, or whose magnitude exceeds ``loss_factor`` x its starting value
      (the mean |loss| of the first ``reference_steps`` steps, at least 1, so a loss starting near zero does
      not trip it on noise);
    * a prototype push (``pl_module.last_push``, a ``PushReport``) whose mean prototype-to-patch squared
      distance is non-finite or above ``push_factor`` per embedding dimension (D): embeddings with entries
      of order one, as after ProtoPNet's sigmoid add-on, are at most about 1 per dimension apart.

    The starting value travels in checkpoints, so a resumed run is judged against the run's own start.
    """

    def __init__(
        self, loss_factor: float = 1000.0, reference_steps: int = 10, push_factor: float = 1000.0
    ) -> None:
        if not loss_factor > 1 or not push_factor > 0 or reference_steps < 1:
            raise ValueError(
                f"DivergenceCheck needs loss_factor > 1, push_factor > 0 and reference_steps >= 1, got "
                f"{loss_factor}, {push_factor}, {reference_steps}"
            )
        self.loss_factor, self.reference_steps, self.push_factor = loss_factor, reference_steps, push_factor
        self.reference: float | None = None
        self._start: list[float] = []  # |loss| of the first steps, until the reference is fixed
        self._checked_push: Any = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        report = getattr(pl_module, "last_push", None)
        if report is None or report is self._checked_push:
            return
        self._checked_push = report
        bank = getattr(pl_module, "prototype_bank", None)
        dim = int(getattr(bank, "dim", 1) or 1)
        mean = float(report.distances.float().nanmean())  # NaN entries: prototypes not pushed (ProtoPool)
        if not math.isfinite(mean) or mean / dim > self.push_factor:
            raise divergence_error(
                f"push: mean prototype-to-patch distance is {mean:.4g} ({mean / dim:.4g} per dimension of "
                f"D={dim}; the limit is callbacks.divergence.push_factor={self.push_factor:g})",
                trainer.global_step,
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return  # manual optimisation without a returned loss: nothing to judge
        value = float(loss.detach())
        if not math.isfinite(value):
            raise divergence_error(f"loss is {value}", trainer.global_step)
        if self.reference is None:
            self._start.append(abs(value))
            if len(self._start) >= self.reference_steps:
                self.reference = max(sum(self._start) / len(self._start), 1.0)
            return
        if abs(value) > self.loss_factor * self.reference:
            raise divergence_error(
                f"loss is {value:.4g}, more than callbacks.divergence.loss_factor={self.loss_factor:g} x its "
                f"starting value {self.reference:.4g}",
                trainer.global_step,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "start": list(self._start)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict.get("reference")
        self._start = list(state_dict.get("start", []))
