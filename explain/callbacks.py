"""Lightning callback that renders the prototype pictures into the run directory after every push."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

from explain.prototypes import render_prototypes
from explain.push_quality import datamodule_push_quality
from protolib.lit.callbacks.protopnet import push_loader
from protolib.utils.io import atomic_write_json
from protolib.utils.modes import evaluating

log = logging.getLogger(__name__)


class PrototypePictures(L.Callback):
    """After each push (and pruning), write every prototype's picture, the class gallery,
    ``prototypes.json`` and ``quality.json`` (:mod:`explain.push_quality`: background share, distinct
    sources, duplicates, part score) into ``<run dir>/<dirname>/epoch-XXX`` (run dir =
    ``trainer.default_root_dir``), and log the measures as ``push/<name>``; at test time they are logged
    for the tested model as ``test/push_<name>``, so they reach ``metrics.json``.

    Works with any module whose ``model`` is a :class:`~protolib.models.protopnet.ProtoPNet`; renders at the
    end of the epoch that follows a push, when the prototypes are final for that push.
    """

    def __init__(self, dirname: str = "prototypes", classes_per_page: int = 25) -> None:
        self.dirname = dirname
        self.classes_per_page = classes_per_page
        self.rendered_revision = 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        revision = int(pl_module.net.revision)
        if revision == self.rendered_revision:
            return
        self.rendered_revision = revision
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        out_dir = Path(trainer.default_root_dir) / self.dirname / f"epoch-{trainer.current_epoch:03d}"
        with evaluating(pl_module):
            written = render_prototypes(
                pl_module.net,
                push_loader(trainer).dataset,
                out_dir,
                datamodule.denormalize,
                class_names=getattr(datamodule, "class_names", None),
                classes_per_page=self.classes_per_page,
            )
        quality = datamodule_push_quality(pl_module.net, datamodule).summary()
        atomic_write_json(out_dir / "quality.json", quality)
        pl_module.log_dict({f"push/{name}": value for name, value in quality.items()}, rank_zero_only=True)
        log.info(
            "wrote %d prototype pictures to %s; push quality: %s",
            len(written),
            out_dir,
            ", ".join(f"{name} {value:.3g}" for name, value in quality.items()),
        )

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if int(pl_module.net.revision) == 0:  # never pushed: nothing to measure
            return
        quality = datamodule_push_quality(pl_module.net, trainer.datamodule).summary()
        pl_module.log_dict({f"test/push_{name}": value for name, value in quality.items()}, sync_dist=True)

    def state_dict(self) -> dict[str, Any]:
        return {"rendered_revision": self.rendered_revision}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rendered_revision = int(state_dict["rendered_revision"])
