"""ProtoPool's Gumbel-softmax scale schedule, beside the ProtoPNet phase schedule it is trained with."""

from __future__ import annotations

import lightning as L

from protolib.nn.slots import gumbel_scale


class GumbelScaleSchedule(L.Callback):
    """Set the slot assignment's scale at every epoch start: ``gumbel_scale(epoch + 1)`` of the paper
    (0 -> ``end`` over ``epochs``; the reference's epoch 0 only evaluates, so Lightning epoch e is its e + 1),
    and ``hard_scale`` (reference: 1e4) in the last-layer epochs after the push, where choices are final."""

    def __init__(
        self, epochs: int = 30, start: float = 1.3, end: float = 1e3, hard_scale: float = 1e4
    ) -> None:
        if epochs < 1:
            raise ValueError(f"gumbel epochs must be >= 1, got {epochs}")
        self.epochs, self.start, self.end, self.hard_scale = epochs, start, end, hard_scale

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        plan = pl_module.schedule.plan()
        last = epoch < len(plan) and plan[epoch].phase == "last"
        scale = self.hard_scale if last else gumbel_scale(epoch + 1, self.epochs, self.start, self.end)
        pl_module.net.assignment.scale.fill_(scale)
