"""OOD-detection evaluation (OpenOOD v1.5): metrics, postprocessors, benchmarks, evaluator, reports.

``python evaluate_ood.py checkpoint=<ckpt> benchmark=digits "postprocessors=[msp,energy,knn]"`` runs it all;
the pieces are importable for use in code and callbacks.
"""

from protolib.ood.features import FeatureCache, extract_features
from protolib.ood.metrics import ood_metrics, roc_curve
from protolib.ood.postprocessors import Postprocessor

__all__ = ["FeatureCache", "Postprocessor", "extract_features", "ood_metrics", "roc_curve"]
