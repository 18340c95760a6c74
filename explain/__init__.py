"""Explanation toolkit: what prototype models learned and why they predicted, from their own outputs.

``explain`` imports models and Lightning modules, never the reverse.
"""

from explain.attribution import integrated_gradients
from explain.local import explain_image
from explain.prototypes import gallery_pages, prototype_picture, render_checkpoint, render_prototypes
from explain.routing import render_routing, routing_purity
from explain.scores import prototype_part_score

__all__ = [
    "explain_image",
    "gallery_pages",
    "integrated_gradients",
    "prototype_part_score",
    "prototype_picture",
    "render_checkpoint",
    "render_prototypes",
    "render_routing",
    "routing_purity",
]
