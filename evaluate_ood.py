"""Evaluate OOD detection: ``python evaluate_ood.py checkpoint=<ckpt> benchmark=digits``."""

from protolib.ood.cli import main

if __name__ == "__main__":
    main()
