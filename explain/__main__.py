"""Command line of the explanation toolkit: ``python -m explain <command> ...``, for any family.

python -m explain report --checkpoint outputs/.../checkpoints/last.ckpt   # <run>/report/index.html
python -m explain prototypes --checkpoint outputs/.../checkpoints/best-epoch30.ckpt   # <run>/explain/
python -m explain local --checkpoint outputs/.../checkpoints/best-epoch30.ckpt --index 7   # <run>/explain/
python -m explain routing --checkpoint outputs/promoe_vit_parts/.../checkpoints/last.ckpt   # MoE routing
"""

from __future__ import annotations

import argparse

from explain.routing import default_out_dir


def explain_test_image(args: argparse.Namespace) -> None:
    """``local``: why the model decided as it did on one image (and optionally integrated gradients)."""
    from explain.families import explain_local, load

    out_dir = default_out_dir(args.checkpoint, "explain")
    suffix = "" if args.split == "test" else f"-{args.split}"
    args.out = args.out or out_dir / f"local{suffix}-{args.index}.png"
    if args.integrated_gradients == "":  # the flag without a file name
        args.integrated_gradients = out_dir / f"ig{suffix}-{args.index}.png"
    explained = load(args.checkpoint)
    explained.options.update(k=args.k, target=args.target)
    local = explain_local(explained, args.index, args.out, args.split)
    print(f"{args.split} image {args.index}, true class {local.label}\n{local.summary}")
    print(f"wrote {local.picture}")
    if args.integrated_gradients:
        from explain.attribution import integrated_gradients, save_attribution
        from explain.prototypes import to_rgb_uint8

        image = explained.item(args.index, args.split)["image"]
        target = local.predicted if args.target is None else args.target
        attribution = integrated_gradients(explained.net, image, target=target)
        picture = to_rgb_uint8(explained.datamodule.denormalize(image[None]))[0]
        title = f"{args.split} image {args.index}: which pixels raised the logit of {target}"
        print(f"wrote {save_attribution(attribution, picture, args.integrated_gradients, title)}")


def main(argv: list[str] | None = None) -> None:
    """Parse the command and run it."""
    parser = argparse.ArgumentParser(prog="python -m explain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="a static HTML report: model card, prototypes, explanations")
    report.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    report.add_argument("--out", default=None, help="folder of the site (default: <run>/report)")
    report.add_argument("--examples", type=int, default=3, help="local explanations per kind of example")
    report.add_argument("--max-images", type=int, default=200, help="images each score is computed on")
    prototypes = commands.add_parser("prototypes", help="what every prototype of a checkpoint is")
    prototypes.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    prototypes.add_argument(
        "--out", default=None, help="folder for the pictures (default: <run>/explain/prototypes)"
    )
    prototypes.add_argument("--ids", type=int, nargs="+", default=None, help="only these prototypes")
    prototypes.add_argument("--classes-per-page", type=int, default=25, help="gallery rows per page")
    local = commands.add_parser("local", help="why a checkpoint predicted what it did on one image")
    local.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    local.add_argument("--index", type=int, required=True, help="position of the image in the split")
    local.add_argument(
        "--split",
        default="test",
        choices=("test", "held_out"),
        help="test split, or test images of the classes held out of training (OOD; PALM runs)",
    )
    local.add_argument(
        "--out", default=None, help="PNG of the explanation (default: <run>/explain/local-<index>.png)"
    )
    local.add_argument("--target", type=int, default=None, help="class to explain (default: the predicted)")
    local.add_argument("-k", type=int, default=3, help="how many prototypes to show")
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
    elif args.command == "report":
        from explain.report import report_checkpoint

        index = report_checkpoint(args.checkpoint, args.out, args.examples, args.max_images)
        print(f"wrote {index} (open it in a browser)")
    elif args.command == "routing":
        from explain.routing import render_routing_checkpoint

        written = render_routing_checkpoint(args.checkpoint, args.out, args.images, args.per_expert)
        print(f"wrote {len(written)} files to {written[0].parent}")
    else:
        from explain.families import explain_prototypes, load

        out = args.out or default_out_dir(args.checkpoint, "explain") / "prototypes"
        explained = load(args.checkpoint)
        explained.options["classes_per_page"] = args.classes_per_page
        pictures = explain_prototypes(explained, out, args.ids)
        print(f"wrote {len(pictures)} pictures to {out}")


if __name__ == "__main__":
    main()
