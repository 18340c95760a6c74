"""Command line of the explanation toolkit: ``python -m explain <command> ...``.

    python -m explain prototypes --checkpoint outputs/.../checkpoints/best-epoch30.ckpt --out pictures/
"""

from __future__ import annotations

import argparse

from explain.prototypes import render_checkpoint


def main(argv: list[str] | None = None) -> None:
    """Parse the command and run it."""
    parser = argparse.ArgumentParser(prog="python -m explain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prototypes = commands.add_parser("prototypes", help="render every prototype of a ProtoPNet checkpoint")
    prototypes.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    prototypes.add_argument("--out", required=True, help="folder for pictures, gallery, prototypes.json")
    prototypes.add_argument("--classes-per-page", type=int, default=25, help="gallery rows per page")
    args = parser.parse_args(argv)
    written = render_checkpoint(args.checkpoint, args.out, args.classes_per_page)
    print(f"wrote {len(written)} files to {args.out}")


if __name__ == "__main__":
    main()
