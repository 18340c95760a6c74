"""protolib: interpretable prototype networks for vision."""

__version__ = "0.1.0"
