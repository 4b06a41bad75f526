"""The training loop: :func:`fit` runs optimizer steps until ``train.steps`` (or this run's
``train.max_steps_this_run``, or early stopping), with validation, checkpoints and the log
called through :class:`Hooks`.

One step: thaw a frozen encoder when its time comes (rewrapping DDP), ``train.grad_accum``
micro-batches (DDP syncs gradients on the last only) under autocast and the GradScaler,
gradient clipping, the optimizer and schedule steps. Then, by the step count: a training log
line (loss all-reduced over ranks), validation (best checkpoint, early stopping) and
``last.pt``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from tilenet.patches.data import model_input
from tilenet.runtime import autocast
from tilenet.train.distributed import Dist, all_reduce_sum, barrier, wrap
from tilenet.train.runlog import RunLog
from tilenet.train.setup import Run
from tilenet.train.state import BatchStream, Saver, TrainState
from tilenet.train.validate import Validator

__all__ = ["Hooks", "fit"]


@dataclass(frozen=True)
class Hooks:
    """What the loop calls besides training: validation, checkpoint saving, the log."""

    validate: Validator
    save: Saver
    log: RunLog


def fit(run: Run, state: TrainState, hooks: Hooks) -> None:
    """Train ``run`` from ``state`` (advanced in place) to the end of this run; collective
    under DDP. A finished run (``train.steps`` reached or stopped early) also saves
    ``best.pt`` if no validation chose one, scores the held-out images and draws the curves."""
    from tilenet.progress import progress_bar

    tc, d = run.tc, run.dist
    total = int(tc.steps)
    budget = tc.max_steps_this_run
    stop_at = total if budget is None else min(total, state.step + int(budget))
    freeze = _EncoderFreeze(run, state.step)
    net, fwd = wrap(run.model, d, run.device, compile=bool(tc.compile))
    bar = progress_bar(
        total, initial=state.step, enabled=bool(tc.progress and d.main), unit="step", desc="train"
    )
    run.model.train()
    window = _Window(run.device)
    t_run = time.perf_counter()
    stopped_early = False
    try:
        while state.step < stop_at:
            t0 = time.perf_counter()
            if freeze.thaw(state.step):  # DDP syncs the parameters that require grad
                net, fwd = wrap(run.model, d, run.device, compile=bool(tc.compile))
            freeze.set_batch_norms(state.step)
            lr = _step(run, state.stream, net, fwd, window)
            state.step += 1
            step = state.step
            window.tick(time.perf_counter() - t0)
            if step % tc.log_every == 0 or step == stop_at:
                rec = window.record(step, state.stream.epoch, lr, d)
                hooks.log.write(rec)
                bar.set_postfix(
                    loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", pps=f"{rec['patches_per_s']:.0f}"
                )
            bar.update(1)
            if step % tc.val_every == 0 or step == total:
                stopped_early = _validate(run, state, hooks)
            if step % tc.checkpoint_every == 0 or step == stop_at or stopped_early:
                hooks.save("last.pt")
            if stopped_early:
                if d.main:
                    bar.write(
                        f"early stop at step {step}: no better {tc.best_metric} for "
                        f"{tc.early_stop_patience} validations"
                    )
                break
    finally:
        bar.close()
    _finish(run, state, hooks, finished=state.step >= total or stopped_early, t_run=t_run)


class _EncoderFreeze:
    """``train.freeze_encoder_steps``: the encoder computes no gradients (requires_grad False)
    and keeps its BatchNorm statistics (eval mode) until that step."""

    def __init__(self, run: Run, step: int) -> None:
        self.until = int(run.tc.freeze_encoder_steps)
        self.frozen = bool(self.until) and step < self.until
        self.params = list(getattr(run.model, "encoder", torch.nn.Identity()).parameters())
        self.batch_norms = run.encoder_bns
        for p in self.params if self.frozen else ():
            p.requires_grad_(False)

    def thaw(self, step: int) -> bool:
        """Thaw the encoder if ``step`` is its time; True if it did (rewrap the model)."""
        if not (self.frozen and step >= self.until):
            return False
        self.frozen = False
        for p in self.params:
            p.requires_grad_(True)
        return True

    def set_batch_norms(self, step: int) -> None:
        for bn in self.batch_norms:  # a frozen encoder keeps its running statistics
            bn.train(step >= self.until)


class _Window:
    """Loss, patches and time since the last training log line."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self._reset()

    def _reset(self) -> None:
        self.loss.zero_()
        self.steps, self.patches, self.seconds = 0, 0, 0.0

    def add(self, loss: torch.Tensor, patches: int) -> None:
        self.loss += loss.detach().double()
        self.patches += patches

    def tick(self, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds

    def record(self, step: int, epoch: int, lr: float, d: Dist) -> dict[str, Any]:
        """The log line for the window (all-reduced over ranks), then start a new window."""
        patches = torch.tensor(self.patches, dtype=torch.float64, device=self.device)
        stats = torch.stack([self.loss, patches])
        all_reduce_sum(stats, d)
        rec = {
            "step": step,
            "epoch": epoch,
            "loss": float(stats[0]) / (self.steps * d.world),
            "lr": lr,
            # every rank trains at once: the window's patches over its wall time
            "patches_per_s": float(stats[1]) / max(self.seconds, 1e-9),
        }
        self._reset()
        return rec


def _step(run: Run, stream: BatchStream, net: torch.nn.Module, fwd: Any, window: _Window) -> float:
    """One optimizer step over ``train.grad_accum`` micro-batches; the learning rate it used."""
    tc, d, device = run.tc, run.dist, run.device
    opt, scaler = run.optimizer, run.scaler
    accum = int(tc.grad_accum)
    opt.zero_grad(set_to_none=True)
    for micro in range(accum):
        x, y = stream.next()
        x = model_input(x.to(device, non_blocking=True), run.loader.dataset)
        if tc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        sync = micro == accum - 1 or not d.enabled
        with contextlib.nullcontext() if sync else net.no_sync():  # type: ignore[operator]
            with autocast(device, tc.precision):
                loss = run.loss_fn(fwd(x), y) / accum
            scaler.scale(loss).backward()
        window.add(loss, int(x.shape[0]))
    if tc.grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), float(tc.grad_clip))
    scaler.step(opt)
    scaler.update()
    lr = float(opt.param_groups[0]["lr"])
    run.scheduler.step()
    return lr


def _validate(run: Run, state: TrainState, hooks: Hooks) -> bool:
    """Validate at this step: log it, save ``best.pt`` on a new best; True to stop early."""
    tc = run.tc
    rec = hooks.validate(state.step)
    if not rec:
        return False
    hooks.log.write({"step": state.step, **rec})
    if state.observe(rec.get(tc.best_metric), tc.best_metric):
        hooks.save("best.pt")
    return bool(tc.early_stop_patience and state.bad >= tc.early_stop_patience)


def _finish(run: Run, state: TrainState, hooks: Hooks, *, finished: bool, t_run: float) -> None:
    tc, d = run.tc, run.dist
    if finished and state.best is None:
        hooks.save("best.pt")  # no validation metric: the final weights are the best we know
    train_s = time.perf_counter() - t_run
    if finished and run.held_out:
        rec = hooks.validate.heldout(state.step)
        hooks.log.write({"step": state.step, **rec, "train_s": round(train_s, 2)})
        if d.main:
            print(
                f"held-out images: foreground Dice {_fmt(rec['heldout_dice'])}, "
                f"IoU {_fmt(rec['heldout_iou'])} ({len(run.held_out)} image(s))",
                flush=True,
            )
    if d.main:
        hooks.log.close(curves_metric=tc.best_metric if finished else None)
    barrier(d)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
