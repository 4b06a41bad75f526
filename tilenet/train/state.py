"""Where training stands, and its checkpoints: :class:`TrainState`, :func:`resume`, :class:`Saver`.

Exact resume: each epoch's data order and augmentation are a function of (seed, epoch, rank)
(:class:`BatchStream`); a checkpoint stores every rank's position in its epoch and every RNG
state, so a resumed run replays the interrupted epoch up to that position (reading, not
training) and then continues bit for bit.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from tilenet.errors import CheckpointError, ConfigError, InputError, one_line
from tilenet.train.distributed import gather
from tilenet.train.setup import Run

__all__ = [
    "BatchStream",
    "Saver",
    "TrainState",
    "improved",
    "resume",
    "rng_state",
    "set_rng_state",
]


# -- RNG --------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every global RNG state as plain data (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "python": [int(version), [int(v) for v in internal], gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, rank)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


# -- data position ----------------------------------------------------------------------------
class BatchStream:
    """Endless training batches, epoch after epoch, resumable at any (epoch, position).

    At the start of each epoch the dataset is told the epoch and the global torch RNG is
    reseeded from (seed, epoch, rank), so the epoch's batches (order and augmentation, also
    in DataLoader workers, which take their seeds from it) depend on nothing else.
    """

    def __init__(self, loader: Any, *, seed: int, rank: int) -> None:
        self.loader = loader
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.pos = 0
        self._it: Iterator[Any] | None = None

    def _start(self) -> None:
        ds = self.loader.dataset
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(self.epoch)
        torch.manual_seed(_derived_seed(self.seed, self.epoch, self.rank))
        self._it = iter(self.loader)
        self.pos = 0

    def resume(self, epoch: int, pos: int, rng: dict[str, Any] | None) -> None:
        """Replay ``epoch`` up to ``pos`` batches, then restore the RNG states of that moment."""
        self.epoch = int(epoch)
        self._start()
        assert self._it is not None
        for _ in range(int(pos)):
            if next(self._it, None) is None:
                break
            self.pos += 1
        if rng is not None:
            set_rng_state(rng)

    def next(self) -> Any:
        """The next batch, starting the next epoch when this one ends."""
        if self._it is None:
            self._start()
        while True:
            assert self._it is not None
            batch = next(self._it, None)
            if batch is not None:
                self.pos += 1
                return batch
            if self.pos == 0:
                raise InputError(
                    f"rank {self.rank} receives no training batches: the patch stores have "
                    "fewer chunks than ranks x data workers; use fewer data.num_workers or "
                    "ranks, or tile with a smaller chunk_patches"
                )
            self.epoch += 1
            self._start()


# -- where training stands --------------------------------------------------------------------
@dataclass
class TrainState:
    """Optimizer steps done, the best metric so far, validations without gain since, and this
    rank's data position (``stream``); ``resumed_from`` is the checkpoint it continued from."""

    stream: BatchStream
    step: int = 0
    best: float | None = None
    bad: int = 0
    resumed_from: Path | None = field(default=None)

    def observe(self, value: float | None, metric: str) -> bool:
        """Count a validation's ``metric`` value; True if it is a new best."""
        if value is not None and improved(value, self.best, metric):
            self.best, self.bad = float(value), 0
            return True
        if value is not None:
            self.bad += 1
        return False


def improved(value: float | None, best: float | None, metric: str) -> bool:
    """Is ``value`` better than ``best``? Lower for a loss, higher for anything else."""
    if value is None:
        return False
    if best is None:
        return True
    return value < best if "loss" in metric else value > best


def _bands_text(bands: Sequence[int] | None) -> str:
    """``bands 4,2``, or ``all bands``."""
    return f"bands {','.join(map(str, bands))}" if bands else "all bands"


def _resume_path(resume: Any, run_dir: Path) -> Path | None:
    if resume is None or resume is False or (isinstance(resume, str) and not resume):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() in ("true", "last")):
        last = run_dir / "last.pt"
        return last if last.is_file() else None
    if isinstance(resume, str):
        p = Path(resume)
        if not p.is_file():
            raise CheckpointError(f"{p}: train.resume checkpoint not found")
        return p
    raise ConfigError(f"train.resume must be true/false or a checkpoint path, got {resume!r}")


def resume(run: Run) -> TrainState:
    """The state to start from: step 0, or the checkpoint ``train.resume`` names loaded into
    ``run`` (model, optimizer, schedule, scaler) with this rank's data position and RNG."""
    tc, d = run.tc, run.dist
    ckpt_path = _resume_path(tc.resume, run.run_dir)
    if tc.resume is True and ckpt_path is None and d.main:
        print(f"train.resume: no {run.run_dir / 'last.pt'} yet; starting from step 0", flush=True)
    stream = BatchStream(run.loader, seed=int(tc.seed) + int(run.cfg.data.seed), rank=d.rank)
    state = TrainState(stream, resumed_from=ckpt_path)
    if ckpt_path is not None:
        _load(run, state, ckpt_path)
    return state


def _load(run: Run, state: TrainState, ckpt_path: Path) -> None:
    from tilenet.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    try:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, RuntimeError, ValueError) as exc:
        first = one_line(exc, typed=False)
        raise CheckpointError(
            f"{ckpt_path}: cannot resume with this config: {first[:200]}"
        ) from None
    # Same channel count, other bands (4,2 -> 2,4) loads: it would go on silently as
    # another experiment, under the checkpoint's name.
    was = [int(b) for b in (ckpt.get("spec") or {}).get("bands") or []]
    if was != list(run.train_bands or []):
        raise CheckpointError(
            f"{ckpt_path}: cannot resume with this config: it was trained on "
            f"{_bands_text(was)}, the data now gives {_bands_text(run.train_bands)}; resume "
            "with the same data.bands (or stores tiled with them), or start a new run"
        )
    done = ckpt.get("metrics") or {}
    state.best, state.bad = done.get("best"), int(done.get("bad", 0))
    state.step = int(ckpt["step"])
    d = run.dist
    positions = ckpt.get("data_pos") or [[ckpt.get("epoch", 0), 0]]
    rngs = ckpt.get("rng") or [None]
    same_world = len(positions) == d.world
    epoch, pos = positions[d.rank] if same_world else positions[0]
    state.stream.resume(
        int(epoch), int(pos) if same_world else 0, rngs[d.rank] if same_world else None
    )


class Saver:
    """Writes ``run_dir/NAME`` checkpoints: the complete training state, and alone enough for
    inference (the spec). Collective under DDP: every rank calls it; rank 0 writes."""

    def __init__(self, run: Run, state: TrainState) -> None:
        self.run = run
        self.state = state

    def __call__(self, name: str) -> None:
        from tilenet.engine.checkpoint import save_checkpoint

        run, state, d = self.run, self.state, self.run.dist
        # Every rank's data position and RNG states, so each resumes its own shard exactly.
        positions = gather([state.stream.epoch, state.stream.pos], d)
        rngs = gather(rng_state(), d)
        if not d.main:
            return
        payload = {
            "spec": run.spec,
            "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.tc.precision == "fp16" else {},
            "step": state.step,
            "epoch": state.stream.epoch,
            "data_pos": positions,
            "rng": rngs,
            "config": OmegaConf.to_container(run.cfg, resolve=True),
            "metrics": {"best": state.best, "bad": state.bad},
        }
        if run.fetched is not None:  # in [0, 1], as published with the weights
            payload["encoder_pretrained"] = {
                k: list(v) if isinstance(v, tuple) else v for k, v in run.fetched.items()
            }
        save_checkpoint(run.run_dir / name, payload)
