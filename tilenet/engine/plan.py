"""``tilenet plan``: what a model costs, and what fits, before anything runs.

Whether a disk can take an inference's outputs is here too (:func:`check_disk`, with
:func:`tilenet.outputs.outputset.planned_bytes`): ``tilenet infer`` refuses a local output
its disk has no room for.

The seeds' arithmetic, kept as small functions (their doctests are the seeds' examples):
a dense first layer on a 1000x1000x3 image with 1000 units needs 3x10^9 weights; a 3x3
conv from 3 to 32 channels needs 896 parameters at any image size; activations take about
``4 * batch * maps * H * W`` bytes in float32 (32 images of 112x112 with 64 maps: ~100 MB),
and as much again for gradients.

:func:`plan_model` applies it to a registered model: parameters, receptive field, stride, the
halo for exact tiling, activation memory per tile (from the traced graph, see
:func:`tilenet.models.model_memory`), the largest batch that fits a memory budget, and with
CUDA the measured peak next to the estimate.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tilenet.errors import InputError
from tilenet.geometry import ceil_to

__all__ = [
    "activation_bytes",
    "check_disk",
    "conv_params",
    "dense_weights",
    "format_plan",
    "max_batch",
    "measure_cuda",
    "parse_memory",
    "plan_model",
]

PRECISIONS = ("fp32", "bf16", "fp16")
#: Tile sides tabulated besides the requested one.
DEFAULT_TILES = (256, 512, 1024, 2048, 4096)
#: Units of the seeds' fully connected first layer.
DENSE_UNITS = 1000

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def conv_params(kernel: int, c_in: int, c_out: int, *, bias: bool = True) -> int:
    """Parameters of a ``kernel`` x ``kernel`` conv: ``(k*k*c_in + bias) * c_out``.

    >>> conv_params(3, 3, 32)
    896
    """
    return (kernel * kernel * c_in + int(bias)) * c_out


def dense_weights(height: int, width: int, channels: int, units: int = DENSE_UNITS) -> int:
    """Weights of a fully connected layer from an ``height x width x channels`` input.

    >>> dense_weights(1000, 1000, 3, 1000)
    3000000000
    """
    return height * width * channels * units


def activation_bytes(
    batch: int, maps: int, height: int, width: int, *, bytes_per_element: int = 4
) -> int:
    """Bytes of ``batch`` x ``maps`` feature maps of ``height x width`` (the seeds' rule).

    >>> activation_bytes(32, 64, 112, 112)  # ~100 MB, and as much again for gradients
    102760448
    """
    return bytes_per_element * batch * maps * height * width


def parse_memory(value: str | int | float) -> int:
    """Bytes from ``"80GiB"``, ``"16GB"``, ``"512MiB"``, ``"1e9"`` or a number.

    >>> parse_memory("80GiB"), parse_memory("1.5 GB"), parse_memory(1024)
    (85899345920, 1500000000, 1024)
    """
    if isinstance(value, bool):
        raise InputError(f"memory must be a size like '80GiB', got {value!r}")
    if isinstance(value, int | float):
        out = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", value.lower())
        if m is None or m.group(2) not in _UNITS:
            raise InputError(f"memory {value!r} is not a size; write e.g. 80GiB, 16GB or 512MiB")
        out = int(float(m.group(1)) * _UNITS[m.group(2)])
    if out <= 0:
        raise InputError(f"memory must be positive, got {value!r}")
    return out


def _bands_line(m: dict[str, Any]) -> list[str]:
    """The ``bands`` line of :func:`format_plan` (none when the model takes all bands)."""
    bands = m.get("bands")
    if not bands:
        return []
    line = (
        f"bands        {','.join(map(str, bands))} of the input image, 1-based, in the model's "
        f"order ({m.get('bands_from') or 'given'})"
    )
    if len(bands) != m["in_channels"]:
        line += f"; but model.in_channels={m['in_channels']}: set model.in_channels={len(bands)}"
    return [line]


def _fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def max_batch(model: Any, *, tile: int, precision: str, training: bool, budget: int) -> int:
    """Largest batch of ``tile`` x ``tile`` inputs whose estimate fits ``budget`` bytes (0: none).

    The estimate is affine in the batch (weights fixed, activations per image).
    """
    from tilenet.models import model_memory

    one = model_memory(model, tile=tile, batch=1, precision=precision, training=training)
    two = model_memory(model, tile=tile, batch=2, precision=precision, training=training)
    per = two["total_bytes"] - one["total_bytes"]
    fixed = one["total_bytes"] - per
    return max(0, int((budget - fixed) // per)) if per > 0 else 0


def measure_cuda(
    model: Any, *, tile: int, batch: int, precision: str, training: bool
) -> dict[str, Any]:
    """Peak CUDA memory (bytes, weights included) of one batch: forward, or a training step.

    The training step is forward, cross-entropy, backward and an AdamW step, under autocast
    for bf16/fp16, as the estimate assumes.
    """
    import torch

    dev = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    model = model.to(dev)
    x = torch.randn(batch, model.in_channels, tile, tile, device=dev)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    try:
        if training:
            model.train()
            target = torch.randint(0, model.num_classes, (batch, tile, tile), device=dev)
            opt = torch.optim.AdamW(model.parameters())
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(model(x).float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del opt, loss, target
        else:
            model.eval()
            with (
                torch.inference_mode(),
                torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None),
            ):
                model(x)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return {"peak_bytes": int(peak), "error": None}
    except torch.cuda.OutOfMemoryError:
        return {"peak_bytes": None, "error": "out of memory"}
    finally:
        del x
        model.to("cpu")
        torch.cuda.empty_cache()


def plan_model(
    model_cfg: Any,
    *,
    tile: int = 1024,
    batch: int = 1,
    memory: str | int | None = None,
    precisions: tuple[str, ...] | list[str] | None = None,
    tiles: tuple[int, ...] | list[int] = DEFAULT_TILES,
    measure: bool | None = None,
    bands: Sequence[int] | None = None,
    bands_from: str | None = None,
) -> dict[str, Any]:
    """The plan for the model of ``model_cfg`` (a ``ModelConfig``) as plain data.

    Its ``weights`` are not read (weights change no sizes, and plan reads no files).

    ``memory`` is the budget (default: the CUDA device's memory, else 16 GiB). ``measure``
    runs one batch on CUDA (default: when CUDA is available). ``bands`` are the input bands
    the model takes (1-based, in its order; None: all), ``bands_from`` the config key they
    came from; both are reported as they are.
    """
    import torch

    from tilenet.models import create_model_from_config, model_memory

    precisions = _checked(precisions, tile, batch)
    cuda = torch.cuda.is_available()
    budget, source = _budget(memory, cuda)

    model = create_model_from_config(model_cfg)
    spec = model.spec
    s, rf = int(model.stride), int(model.receptive_field)
    halo = ceil_to(rf, s)
    tile_used = ceil_to(tile, s)
    params = sum(p.numel() for p in model.parameters())
    c_in = int(model.in_channels)
    core = tile_used - 2 * halo

    per_precision: dict[str, Any] = {}
    for p in precisions:
        per_precision[p] = {
            mode: model_memory(
                model, tile=tile_used, batch=batch, precision=p, training=mode == "training"
            )
            for mode in ("inference", "training")
        }
    table = _batch_table(model, (*tiles, tile_used), precisions, halo=halo, budget=budget)

    measured = None
    if measure is None:
        measure = cuda
    if measure:
        if not cuda:
            raise InputError("--measure needs a CUDA device; none is available")
        measured = _measured(model, tile_used, batch, precisions[0], per_precision[precisions[0]])

    return {
        "model": {
            "name": spec.name,
            "in_channels": spec.in_channels,
            "num_classes": spec.num_classes,
            "kwargs": spec.to_dict()["kwargs"],
            "parameters": params,
            "stride": s,
            "receptive_field": rf,
            "dependency_interval": [list(v) for v in model.analysis.interval],
            "exact": bool(spec.exact),
            "per_pixel_norm": bool(spec.exact),
            "exact_reason": spec.exact_reason,
            "bands": [int(b) for b in bands] if bands else None,
            "bands_from": bands_from if bands else None,
        },
        "seeds": {
            "dense_units": DENSE_UNITS,
            "dense_input": [tile_used, tile_used, c_in],
            "dense_weights": dense_weights(tile_used, tile_used, c_in, DENSE_UNITS),
            "dense_weights_seed_example": dense_weights(1000, 1000, 3, DENSE_UNITS),
            "conv3x3_3_to_32_params": conv_params(3, 3, 32),
            "activation_example_bytes": activation_bytes(32, 64, 112, 112),
        },
        "tiling": {
            "tile": tile_used,
            "halo": halo,
            "min_tile": 2 * halo + s,
            "core": max(0, core),
            "efficiency": (max(0, core) / tile_used) ** 2,
        },
        "memory": {"tile": tile_used, "batch": batch, "estimates": per_precision},
        "budget_bytes": budget,
        "budget_source": source,
        "max_batch": table,
        "measured": measured,
    }


def _checked(
    precisions: tuple[str, ...] | list[str] | None, tile: Any, batch: Any
) -> tuple[str, ...]:
    """The precisions to show (default all), once they, ``tile`` and ``batch`` are checked."""
    precisions = tuple(precisions or PRECISIONS)
    for p in precisions:
        if p not in PRECISIONS:
            raise InputError(f"precision {p!r} is not one of {', '.join(PRECISIONS)}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0:
        raise InputError(f"tile must be a positive int, got {tile!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise InputError(f"batch must be a positive int, got {batch!r}")
    return precisions


def _budget(memory: str | int | None, cuda: bool) -> tuple[int, str]:
    """The memory budget in bytes and where it came from."""
    import torch

    if memory is None:
        if cuda:
            budget = int(torch.cuda.get_device_properties(0).total_memory)
            source = f"CUDA device 0 ({torch.cuda.get_device_name(0)})"
        else:
            budget, source = 16 * 2**30, "default (no CUDA device)"
    else:
        budget, source = parse_memory(memory), "--memory"
    return budget, source


def _batch_table(
    model: Any, tiles: Sequence[int], precisions: Sequence[str], *, halo: int, budget: int
) -> list[dict[str, Any]]:
    """The largest batch per tile side (rounded up to the stride), precision and mode."""
    s = int(model.stride)
    table = []
    for t in sorted({ceil_to(v, s) for v in tiles}):
        row: dict[str, Any] = {"tile": t, "core": max(0, t - 2 * halo)}
        for p in precisions:
            row[p] = {
                mode: max_batch(
                    model, tile=t, precision=p, training=mode == "training", budget=budget
                )
                for mode in ("inference", "training")
            }
        table.append(row)
    return table


def _measured(
    model: Any, tile: int, batch: int, precision: str, estimates: dict[str, Any]
) -> dict[str, Any]:
    """Peak CUDA memory of one batch per mode, next to the estimate (``estimates[mode]``)."""
    import torch

    measured: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "tile": tile,
        "batch": batch,
        "precision": precision,
    }
    for mode in ("inference", "training"):
        got = measure_cuda(
            model, tile=tile, batch=batch, precision=precision, training=mode == "training"
        )
        est = estimates[mode]["total_bytes"]
        got["estimated_bytes"] = est
        got["ratio"] = got["peak_bytes"] / est if got["peak_bytes"] else None
        measured[mode] = got
    return measured


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as the text ``tilenet plan`` prints."""
    m, seeds, tiling, mem = plan["model"], plan["seeds"], plan["tiling"], plan["memory"]
    h, w, c = seeds["dense_input"]
    kw = ", ".join(f"{k}={v!r}" for k, v in m["kwargs"].items())
    lines = [
        f"model        {m['name']}({kw})  in_channels={m['in_channels']} "
        f"num_classes={m['num_classes']}",
        *_bands_line(m),
        f"parameters   {m['parameters']:,} ({_fmt_bytes(4 * m['parameters'])} in fp32), "
        "the same at any input size",
        f"dense        a fully connected layer of {seeds['dense_units']} units on one "
        f"{h}x{w}x{c} tile would need {seeds['dense_weights']:,} weights "
        f"({_fmt_bytes(4 * seeds['dense_weights'])}); "
        f"{seeds['dense_weights'] / max(1, m['parameters']):,.0f}x the whole model",
        f"receptive    radius {m['receptive_field']} px (output pixel p reads input "
        f"p{m['dependency_interval'][0][0]:+d} .. p{m['dependency_interval'][0][1]:+d})",
        f"stride       {m['stride']} (tile and image sides are padded to multiples of it)",
        f"halo         {tiling['halo']} px per side for exact crop-mode tiling "
        f"(smallest tile {tiling['min_tile']}); tile {tiling['tile']} keeps a core of "
        f"{tiling['core']} px, {100 * tiling['efficiency']:.0f}% of the pixels computed",
    ]
    if not m["per_pixel_norm"]:
        why = m.get("exact_reason") or "GroupNorm/InstanceNorm or similar"
        lines.append(
            f"warning      not exact: an operation over the whole input ({why}): "
            "tiled results are not exactly a whole-image pass (crop mode warns; use "
            "--mode gaussian)"
        )
    else:
        lines.append("exact        yes: crop-mode tiles with this halo equal a whole-image pass")
    lines.append("")
    lines.append(
        f"memory for one batch of {mem['batch']} x {mem['tile']}x{mem['tile']}: activations "
        "(inference: forward; training: forward+backward), and the total with backend "
        "workspace, weights (+ gradients and AdamW state for training)"
    )
    lines.append(
        f"  {'precision':<10}{'infer act':>12}{'infer total':>13}{'train act':>12}"
        f"{'train total':>13}{'seed rule (train)':>19}"
    )
    for p, est in mem["estimates"].items():
        inf, tr = est["inference"], est["training"]
        lines.append(
            f"  {p:<10}{_fmt_bytes(inf['activation_bytes']):>12}"
            f"{_fmt_bytes(inf['total_bytes']):>13}{_fmt_bytes(tr['activation_bytes']):>12}"
            f"{_fmt_bytes(tr['total_bytes']):>13}{_fmt_bytes(tr['seed_rule_bytes']):>19}"
        )
    lines.append("")
    lines.append(
        f"largest batch within {_fmt_bytes(plan['budget_bytes'])} ({plan['budget_source']}), "
        "inference / training"
    )
    precs = list(mem["estimates"])
    lines.append(f"  {'tile':>6}{'core':>7}" + "".join(f"{p:>16}" for p in precs))
    for row in plan["max_batch"]:
        # A tile without a core is useless for inference (all halo), fine for training.
        cells = "".join(
            f"{(str(row[p]['inference']) if row['core'] else '-') + ' / ' + str(row[p]['training']):>16}"
            for p in precs
        )
        lines.append(f"  {row['tile']:>6}{row['core']:>7}{cells}")
    meas = plan["measured"]
    if meas:
        lines.append("")
        lines.append(
            f"measured on {meas['device']} ({meas['precision']}, batch {meas['batch']}, "
            f"tile {meas['tile']}): peak CUDA memory vs estimate"
        )
        for mode in ("inference", "training"):
            got = meas[mode]
            if got["peak_bytes"] is None:
                lines.append(f"  {mode:<10} {got['error']}")
            else:
                lines.append(
                    f"  {mode:<10} measured {_fmt_bytes(got['peak_bytes'])}, estimated "
                    f"{_fmt_bytes(got['estimated_bytes'])} (ratio {got['ratio']:.2f})"
                )
    else:
        lines.append("")
        lines.append("measured     no CUDA device: estimates only")
    return "\n".join(lines)


def check_disk(
    out: str | os.PathLike[str],
    need: int,
    *,
    what: str,
    reclaimable: int | Callable[[], int] = 0,
) -> None:
    """Refuse, in one line, an output of ``need`` bytes that the disk holding ``out`` (its
    nearest existing folder) has no room for; ``reclaimable`` bytes already there are the
    output's own (work a resumed run keeps, leftovers it removes) and count as room (a
    function: asked only when the free space alone is too little). ``what`` names the input
    in the message."""
    where = Path(out).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if need <= free:
        return
    if callable(reclaimable):
        reclaimable = reclaimable()
    if need > free + reclaimable:
        mine = f" (+ {_fmt_bytes(reclaimable)} its earlier run holds)" if reclaimable else ""
        raise InputError(
            f"{what}: the outputs in {out} take up to {_fmt_bytes(need)} uncompressed but "
            f"{where} has {_fmt_bytes(free)} free{mine}; free some space, write elsewhere "
            "(--out) or give --no-disk-check (infer.disk_check=false) to write anyway"
        )
