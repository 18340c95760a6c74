"""Command line of the explanation toolkit: ``python -m explain <command> ...``.

python -m explain prototypes --checkpoint outputs/.../checkpoints/best-epoch30.ckpt   # <run>/explain/
python -m explain local --checkpoint outputs/.../checkpoints/best-epoch30.ckpt --index 7   # <run>/explain/
python -m explain routing --checkpoint outputs/promoe_vit_parts/.../checkpoints/last.ckpt   # MoE routing
"""

from __future__ import annotations

import argparse
from pathlib import Path

from explain.prototypes import load_checkpoint, render_checkpoint, save_png
from explain.routing import default_out_dir


def explain_test_image(args: argparse.Namespace) -> None:
    """``local``: the prototype explanation of one test image (and optionally integrated gradients)."""
    from explain.attribution import integrated_gradients, save_attribution
    from explain.local import explain_image, save_explanation

    out_dir = default_out_dir(args.checkpoint, "explain")
    args.out = args.out or out_dir / f"local-{args.index}.png"
    if args.integrated_gradients == "":  # the flag without a file name
        args.integrated_gradients = out_dir / f"ig-{args.index}.png"
    module, datamodule = load_checkpoint(args.checkpoint)
    test = datamodule.test_dataset
    if not 0 <= args.index < len(test):
        raise ValueError(f"--index {args.index} is out of range: the test split has {len(test)} images")
    item = test[args.index]
    if hasattr(module.net, "tree"):  # ProtoTree: the path the image takes down the tree
        from explain.tree import explain_path

        push_dataset = datamodule.push_dataloader().dataset
        picture, summary = explain_path(
            module.net, item["image"], push_dataset, datamodule.denormalize, datamodule.class_names
        )
        print(f"test image {args.index}, true class {item['label']}\n{summary}")
        print(f"wrote {save_png(Path(args.out), picture)}")
        return
    explanation = explain_image(
        module.net,
        item["image"],
        datamodule.push_dataloader().dataset,
        datamodule.denormalize,
        target=args.target,
        k=args.k,
        percentile=module.schedule.push_percentile,
        class_names=datamodule.class_names,
    )
    print(f"test image {args.index}, true class {item['label']}")
    print(explanation.summary())
    print(f"wrote {save_explanation(explanation, args.out)}")
    if args.integrated_gradients:
        attribution = integrated_gradients(module.net, item["image"], target=explanation.target)
        title = f"test image {args.index}: which pixels raised the logit of {explanation.target}"
        print(f"wrote {save_attribution(attribution, explanation.image, args.integrated_gradients, title)}")


def main(argv: list[str] | None = None) -> None:
    """Parse the command and run it."""
    parser = argparse.ArgumentParser(prog="python -m explain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prototypes = commands.add_parser("prototypes", help="render every prototype of a ProtoPNet checkpoint")
    prototypes.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    prototypes.add_argument(
        "--out",
        default=None,
        help="folder for pictures, gallery, prototypes.json (default: <run>/explain/prototypes)",
    )
    prototypes.add_argument("--classes-per-page", type=int, default=25, help="gallery rows per page")
    local = commands.add_parser("local", help="why a ProtoPNet checkpoint predicted its class")
    local.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    local.add_argument("--index", type=int, required=True, help="position of the image in the test split")
    local.add_argument(
        "--out",
        default=None,
        help="PNG of the prototype explanation (default: <run>/explain/local-<index>.png)",
    )
    local.add_argument("--target", type=int, default=None, help="class to explain (default: the predicted)")
    local.add_argument("-k", type=int, default=3, help="how many top-contributing prototypes to show")
    local.add_argument(
        "--integrated-gradients",
        default=None,
        nargs="?",
        const="",
        metavar="PNG",
        help="also write captum integrated gradients (to PNG; default <run>/explain/ig-<index>.png)",
    )
    routing = commands.add_parser(
        "routing", help="routing maps, expert galleries, usage of an MoE checkpoint"
    )
    routing.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    routing.add_argument("--out", default=None, help="folder for the pictures (default: <run dir>/routing)")
    routing.add_argument("--images", type=int, default=16, help="test images shown as routing maps")
    routing.add_argument("--per-expert", type=int, default=8, help="gallery patches per expert")
    args = parser.parse_args(argv)
    if args.command == "local":
        explain_test_image(args)
    elif args.command == "routing":
        from explain.routing import render_routing_checkpoint

        written = render_routing_checkpoint(args.checkpoint, args.out, args.images, args.per_expert)
        print(f"wrote {len(written)} files to {written[0].parent}")
    else:
        out = args.out or default_out_dir(args.checkpoint, "explain") / "prototypes"
        written = render_checkpoint(args.checkpoint, out, args.classes_per_page)
        print(f"wrote {len(written)} files to {out}")


if __name__ == "__main__":
    main()
