"""Explanation toolkit: pictures of what prototype models learned, read from the models' own outputs.

``explain`` imports models and Lightning modules, never the reverse.
"""

from explain.prototypes import gallery_pages, prototype_picture, render_checkpoint, render_prototypes

__all__ = ["gallery_pages", "prototype_picture", "render_checkpoint", "render_prototypes"]
