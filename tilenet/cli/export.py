"""``tilenet export``: a checkpoint's model as ONNX or TorchScript, dynamic batch/height/width."""

from __future__ import annotations

import argparse
from typing import Any

from tilenet.errors import EXIT_OK

__all__ = ["add_export"]


def add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint's model to ONNX or TorchScript (dynamic batch, height, width)",
        description=(
            "Export the model of CHECKPOINT with dynamic batch, height and width through "
            "torch.export. ONNX carries the model spec (normalisation, classes, stride, "
            "receptive field) in its metadata, so `tilenet infer --model FILE.onnx` runs it "
            "through onnxruntime. The file is checked against the torch model on two input "
            "sizes before it is published. A model that bakes a size into its graph, or uses "
            "an op ONNX lacks, is refused naming the layer (exit 2). Needs "
            '`pip install "tilenet[export]"` for ONNX.'
        ),
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint (.pt) written by training")
    p.add_argument(
        "--format", choices=["onnx", "torchscript"], default="onnx", help="file format (onnx)"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="file to write")
    p.add_argument(
        "--tol",
        type=float,
        default=1e-4,
        help="largest |exported - torch| of the logits on the check inputs (1e-4)",
    )
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from tilenet.engine.export import export_model

    r = export_model(args.checkpoint, args.out, format=args.format, tol=args.tol)
    sizes = ", ".join("x".join(map(str, s)) for s in r.checked)
    print(
        f"{r.path}: {r.format}, dynamic batch/height/width; max |diff| {r.max_abs_diff:.2g} "
        f"vs torch at {sizes}; {r.seconds:.1f} s"
    )
    return EXIT_OK
