"""``stagewise export``: a checkpoint as one consolidated state dict, or the reverse.

::

    stagewise export CKPT_DIR model.safetensors       # --tag TAG, default: latest
    stagewise export --split model.pt CKPT_DIR --tied embed=0,6
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from stagewise.checkpoint import CheckpointError, export_checkpoint, import_state_dict

__all__ = ["build_export_parser", "export_main"]


def _tied_arg(text: str) -> tuple[str, list[int]]:
    key, sep, rest = text.partition("=")
    try:
        indices = [int(i) for i in rest.split(",") if i.strip()]
    except ValueError:
        indices = []
    if not sep or not key or not indices:
        raise argparse.ArgumentTypeError(
            f"expected KEY=INDEX[,INDEX...], e.g. embed=0,6, got {text!r}"
        )
    return key, indices


def build_export_parser(prog: str = "stagewise export") -> argparse.ArgumentParser:
    """The argument parser of ``stagewise export``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Write a checkpoint's weights as one consolidated state dict (.pt or "
            ".safetensors) with the keys of a one-process model, or with --split turn such "
            "a state dict into layer files a pipeline loads with load_module_only=True."
        ),
    )
    parser.add_argument(
        "source", help="checkpoint (save or tag directory); with --split a state dict"
    )
    parser.add_argument("out", help="the state dict to write; with --split the save directory")
    parser.add_argument(
        "--split", action="store_true", help="split a consolidated state dict into layer files"
    )
    parser.add_argument(
        "--tag",
        help="the checkpoint to export (default: latest); with --split the tag to write "
        "(default: global_step0)",
    )
    parser.add_argument(
        "--tied",
        action="append",
        type=_tied_arg,
        default=[],
        metavar="KEY=INDEX[,INDEX...]",
        help="the layers of a tied module (needed by --split, and to export a checkpoint "
        "without a manifest, e.g. DeepSpeed's); repeat per key",
    )
    return parser


def export_main(argv: Sequence[str] | None = None) -> int:
    """Run ``stagewise export`` with ``argv``; return the exit status."""
    parser = build_export_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    tied = dict(args.tied) or None
    try:
        if args.split:
            written = import_state_dict(
                args.source, args.out, tag=args.tag or "global_step0", tied=tied
            )
            print(f"layer files written to {written}")
        else:
            written = export_checkpoint(args.source, args.out, tag=args.tag, tied=tied)
            print(f"state dict written to {written}")
    except (CheckpointError, ValueError, OSError, ImportError) as error:
        print(f"stagewise export: {error}", file=sys.stderr)
        return 1
    return 0
