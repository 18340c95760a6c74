"""Explanation toolkit: what prototype models learned and why they predicted, from their own outputs.

``explain`` imports models and Lightning modules, never the reverse.
"""

from explain.attribution import integrated_gradients
from explain.families import Explained, explain_local, explain_prototypes, family_of, load
from explain.local import explain_image
from explain.prototypes import gallery_pages, prototype_picture, render_checkpoint, render_prototypes
from explain.report import build_report, report_checkpoint
from explain.routing import render_routing, routing_purity
from explain.scores import prototype_part_score

__all__ = [
    "Explained",
    "build_report",
    "explain_image",
    "explain_local",
    "explain_prototypes",
    "family_of",
    "gallery_pages",
    "integrated_gradients",
    "load",
    "prototype_part_score",
    "prototype_picture",
    "render_checkpoint",
    "render_prototypes",
    "render_routing",
    "report_checkpoint",
    "routing_purity",
]
