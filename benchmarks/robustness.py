"""Accuracy under a small L2 PGD attack on digits: the deep CBC / RBF networks against ProtoPNet.

The robustness claim of Saralajew et al. (AAAI 2025), measured as the paper does: attacked test accuracy at
fixed L2 budgets.

    python -m benchmarks.robustness                       # cbc, rbf, protopnet; eps 0.5, 1, 2
    python -m benchmarks.robustness --quick               # smoke size (numbers mean nothing)

Each model is trained by its shipped experiment (``cbc_digits``, ``cbc_digits model.net.head=rbf``,
``protopnet_digits``; CPU), its best pushed checkpoint attacked on the test split with ``steps`` of L2 PGD
(step ``2.5 eps / steps``, Madry et al.) in the model's input space (normalised pixels, 16 x 16 digits).
Torch only. Writes JSON atomically to benchmarks/results/robustness.json.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.variants import RESULTS, compose_experiment
from explain.prototypes import load_checkpoint
from protolib.cli.train import run
from protolib.utils.io import atomic_write_json

MODELS = {
    "cbc": ("cbc_digits", []),
    "rbf": ("cbc_digits", ["model.net.head=rbf"]),
    "protopnet": ("protopnet_digits", []),
}


def score_margin(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Best wrong-class score minus the own class's, per row of scores (B, C): > 0 means misclassified."""
    own = scores.gather(1, labels[:, None])[:, 0]  # (B,)
    wrong = scores.masked_fill(F.one_hot(labels, scores.shape[1]).bool(), float("-inf")).amax(dim=1)
    return wrong - own


def l2_pgd(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
) -> torch.Tensor:
    """Untargeted L2 PGD: ``steps`` normalised-gradient ascent steps on the margin ``max_{c != y} s_c - s_y``
    of the scores ``logits_fn`` returns, each projected back onto the L2 ball of radius ``eps`` around
    ``images`` (B, ...); returns the attacked images. The step defaults to ``2.5 eps / steps``. The margin,
    not the cross-entropy, because the CBC / RBF heads output class probabilities: the cross-entropy of those
    (a softmax over values in [0, 1]) is nearly flat and would attack them more weakly than ProtoPNet's
    logits."""
    step_size = 2.5 * eps / steps if step_size is None else step_size
    delta = torch.zeros_like(images, requires_grad=True)
    for _ in range(steps):
        loss = score_margin(logits_fn(images + delta), labels).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (images.dim() - 1))
            delta += step_size * grad / norms
            scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
            delta *= scale.view(-1, *[1] * (images.dim() - 1))
    return (images + delta).detach()


def attacked_accuracy(module: Any, loader: Any, eps: float, steps: int, limit: int | None) -> float:
    """Test accuracy of ``module.net`` under :func:`l2_pgd` (eps 0: clean accuracy)."""
    net = module.net.eval()
    hits, seen = 0, 0
    for batch in loader:
        images, labels = batch["image"], batch["label"]
        if eps > 0:
            images = l2_pgd(lambda x: net.extract(x)["logits"], images, labels, eps, steps)
        with torch.no_grad():
            hits += int((net.extract(images)["logits"].argmax(1) == labels).sum())
        seen += len(labels)
        if limit is not None and seen >= limit:
            break
    return hits / seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--eps", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="two epochs, 64 test images")
    args = parser.parse_args()
    quick = (
        [
            "model.schedule.train_epochs=2",
            "model.schedule.warm_epochs=1",
            "model.schedule.push_start=1",
            "model.schedule.last_layer_epochs=1",
            "trainer.limit_train_batches=2",
        ]
        if args.quick
        else []
    )
    rows = []
    for name in args.models:
        experiment, overrides = MODELS[name]
        with tempfile.TemporaryDirectory() as out:
            run(compose_experiment(experiment, [f"seed={args.seed}", *overrides, *quick], out))
            (checkpoint,) = Path(out, "checkpoints").glob("best-*.ckpt")
            module, datamodule = load_checkpoint(checkpoint)
            datamodule.setup("test")
            loader = datamodule.test_dataloader()
            row = {
                "model": name,
                "clean": attacked_accuracy(module, loader, 0.0, 0, 64 if args.quick else None),
            }
            for eps in args.eps:
                row[f"eps={eps}"] = attacked_accuracy(
                    module, loader, eps, args.steps, 64 if args.quick else None
                )
        rows.append(row)
        print(row, flush=True)
    name = "robustness_quick.json" if args.quick else "robustness.json"
    atomic_write_json(
        RESULTS / name, {"quick": args.quick, "steps": args.steps, "seed": args.seed, "rows": rows}
    )


if __name__ == "__main__":
    main()
