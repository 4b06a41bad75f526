"""``tilenet embed``: patch embeddings of slides with a foundation model or any timm model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tilenet.cli._common import add_resolution_flags
from tilenet.errors import EXIT_OK, ConfigError, InputError

__all__ = ["add_embed"]

_ENCODER_HELP = (
    "a preset (uni, uni2-h, virchow, virchow2, gigapath, h-optimus-0, h-optimus-1, phikon, "
    "phikon-v2, conch, resnet50-trunc: architecture, input, mean/std, pooling and precision as their authors "
    "define them) or timm:<any timm model name> (its own data config, pooled pre-logits)"
)


def add_embed(sub: Any) -> None:
    p = sub.add_parser(
        "embed",
        help="patch embeddings of slides (foundation models, timm): TRIDENT-compatible .h5",
        description=(
            "Cut each INPUT at a pixel size (default: the encoder's, e.g. 0.5 µm/px) into "
            "patches and write their embeddings to OUT_DIR/features/<stem>.h5: 'features' "
            "(N, D) float32 and 'coords' (N, 2) int64 level-0 top-left (x, y), with TRIDENT's "
            "attributes plus the exact mpp, encoder, weights checksum, pooling and precision. "
            "Written as it streams; a rerun resumes an interrupted file and skips finished ones."
        ),
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="slides or images, directories or glob patterns (several: a batch with "
        "OUT_DIR/manifest.jsonl; failures are listed, exit 1)",
    )
    p.add_argument("--encoder", required=True, metavar="NAME", help=_ENCODER_HELP)
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory")
    p.add_argument(
        "--weights",
        metavar="FILE|DIR",
        help="local weights (safetensors, or a torch file read as data only), or a folder "
        "holding model.safetensors / pytorch_model.bin; 'random' for a smoke test; default: "
        "the published weights from the Hugging Face hub (gated models say how to get access)",
    )
    add_resolution_flags(p)
    p.add_argument(
        "--patch",
        type=int,
        help="patch side in pixels at the target pixel size (default: the encoder's)",
    )
    p.add_argument("--overlap", type=int, default=0, help="pixels shared by neighbours (0)")
    p.add_argument("--batch", type=int, default=64, help="patches per forward pass (64)")
    p.add_argument("--readers", type=int, default=4, help="reader threads (4)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (auto)")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        help="default: the encoder's on a GPU (fp16/bf16), fp32 on a CPU",
    )
    p.add_argument("--format", choices=["h5", "zarr"], default="h5", help="feature file (h5)")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=8,
        metavar="N",
        help="batches between resume markers (8)",
    )
    p.add_argument(
        "--tissue",
        type=float,
        nargs="?",
        const=0.25,
        metavar="FRACTION",
        help="embed only patches on tissue: at least FRACTION of the patch (0.25 when given "
        "alone) on the tissue mask of `tilenet tissue`; recorded in the file; off by default",
    )
    p.add_argument(
        "--stain",
        metavar="REF_IMAGE",
        help="normalise the stain to this RGB reference image (H&E) before encoding: fitted "
        "once; each slide's stains are estimated once, on its tissue",
    )
    p.add_argument(
        "--stain-method",
        choices=["macenko", "reinhard"],
        default="macenko",
        help="stain normaliser (macenko)",
    )
    p.add_argument("--workers", type=int, default=0, help="batch: dask worker processes (0)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="batch: an existing dask cluster")
    p.add_argument("--threads", type=int, help="torch threads per process")
    p.add_argument("--force", action="store_true", help="redo finished files")
    p.add_argument("--wait", action="store_true", help="wait for another run on the same file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_embed)


def _cmd_embed(args: argparse.Namespace) -> int:

    from tilenet.config import ResolutionConfig
    from tilenet.engine.embed import EmbedConfig
    from tilenet.io.resolution import check_resolution

    resolution = ResolutionConfig(
        mpp=args.mpp,
        gsd=args.gsd,
        magnification=args.magnification,
        assume_mpp=args.assume_mpp,
        **({"max_upsample": args.max_upsample} if args.max_upsample else {}),
    )
    check_resolution(resolution)
    config = EmbedConfig(
        patch=args.patch,
        overlap=args.overlap,
        batch=args.batch,
        readers=args.readers,
        device=args.device,
        precision=args.precision,
        format=args.format,
        checkpoint_every=args.checkpoint_every,
    )
    hooks = _hooks(args)
    inputs = list(args.inputs)
    batch = args.workers or args.scheduler or len(inputs) > 1 or not Path(inputs[0]).is_file()
    if batch:
        from tilenet.jobs import format_report
        from tilenet.jobs.embed import embed_jobs

        report = embed_jobs(
            inputs,
            args.encoder,
            args.out,
            weights=args.weights,
            workers=args.workers,
            scheduler=args.scheduler,
            threads=args.threads,
            quiet=args.quiet,
            force=args.force,
            wait=args.wait,
            resolution=resolution,
            config=config,
            **hooks,
        )
        print(format_report(report))
        return report.exit_code
    from tilenet.engine.embed import embed_image
    from tilenet.runtime import torch_threads

    if not Path(inputs[0]).exists():
        raise InputError(f"{inputs[0]}: no such file")
    with torch_threads(args.threads):
        r = embed_image(
            inputs[0],
            args.encoder,
            args.out,
            config=config,
            weights=args.weights,
            resolution=resolution,
            force=args.force,
            wait=args.wait,
            progress=not args.quiet,
            **hooks,
        )
    if r.skipped:
        print(f"{r.path}: already done ({r.patches} patches)")
    else:
        resumed = f", {r.rows_resumed} resumed" if r.rows_resumed else ""
        print(
            f"{r.path}: {r.patches} patches x {r.dim}{resumed} in {r.seconds:.1f} s "
            f"({r.patches_per_s:.1f} patches/s)"
        )
    return EXIT_OK


def _hooks(args: argparse.Namespace) -> dict[str, Any]:
    """``--tissue`` and ``--stain`` as embed_image's per-slide hooks (partials of module
    functions, so they pickle to dask workers) and their record in the feature file."""
    from functools import partial

    from tilenet.engine.embed import stain_transform, tissue_filter

    hooks: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if args.tissue is not None:
        if not 0 <= args.tissue <= 1:
            raise ConfigError(f"--tissue must be in [0, 1], got {args.tissue}")
        hooks["keep_for"] = partial(tissue_filter, fraction=args.tissue)
        extra["tissue"] = {"fraction": args.tissue, "method": "otsu (tilenet.tissue defaults)"}
    if args.stain:
        from tilenet.io import open_image
        from tilenet.io.sniff import fingerprint
        from tilenet.stain import make_stain, plain_state
        from tilenet.tissue import overview

        if not Path(args.stain).exists():
            raise InputError(f"{args.stain}: no such file (--stain)")
        # fitted once, here: every slide (and worker) gets the same state, and the file keeps it
        with open_image(args.stain) as ref:
            state = plain_state(make_stain(args.stain_method, overview(ref)))
        hooks["transform_for"] = partial(stain_transform, state=state, method=args.stain_method)
        extra["stain"] = {
            "method": args.stain_method,
            "reference": str(args.stain),
            "reference_fingerprint": fingerprint(args.stain),
            "state": state,
        }
    if extra:
        hooks["extra_attrs"] = extra
    return hooks
