"""OOD postprocessors, one small class each: ``fit(model, data)`` if needed, ``score(model, batch) -> (B,)``.

Higher scores mean more in-distribution. Defaults follow OpenOOD v1.5's ``configs/postprocessors``; the Hydra
configs live in ``conf/ood/postprocessors/``.
"""

from protolib.ood.postprocessors.activation import ASH, ReAct, ash
from protolib.ood.postprocessors.base import Postprocessor
from protolib.ood.postprocessors.gaussian import RMDS, GaussianStats, Mahalanobis, SharedGaussians
from protolib.ood.postprocessors.knn import KNN
from protolib.ood.postprocessors.logit import GEN, MSP, Energy, MaxLogit, TopTwo, UniformCrossEntropy, energy
from protolib.ood.postprocessors.odin import ODIN
from protolib.ood.postprocessors.prototype import PALMScore, PrototypeScore, palm_log_likelihood
from protolib.ood.postprocessors.vim import ViM

__all__ = [
    "ASH",
    "GEN",
    "KNN",
    "MSP",
    "ODIN",
    "RMDS",
    "Energy",
    "GaussianStats",
    "Mahalanobis",
    "MaxLogit",
    "PALMScore",
    "Postprocessor",
    "PrototypeScore",
    "ReAct",
    "SharedGaussians",
    "TopTwo",
    "UniformCrossEntropy",
    "ViM",
    "ash",
    "energy",
    "palm_log_likelihood",
]
