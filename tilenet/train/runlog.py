"""The run's log: ``metrics.jsonl`` (one JSON object per line), TensorBoard events in ``tb/``
when tensorboard is installed, and ``curves.png`` drawn when training finishes. Rank 0 writes;
on the other ranks a :class:`RunLog` does nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tilenet.fsutil import write_text_atomic

__all__ = ["RunLog", "plot_curves"]


class RunLog:
    """metrics.jsonl (+ TensorBoard when installed) on rank 0; nothing elsewhere.

    ``resume_step``: the step of the checkpoint a resumed run continues from; the lines the
    interrupted run logged after it are dropped (None: a new run, the file starts empty).
    """

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self.tb: Any = None
        if not enabled:
            return
        if self.path.is_file():
            old = [json.loads(line) for line in self.path.read_text().splitlines() if line]
            # A resumed run drops what the interrupted one logged after its checkpoint.
            keep = [r for r in old if resume_step is not None and r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
            self.records = keep
        self._fh = open(self.path, "a", encoding="utf-8")  # closed in close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (it has a ``step``); its numbers go to TensorBoard too."""
        if not self.enabled:
            return
        self.records.append(record)
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self, *, curves_metric: str | None = None) -> None:
        """Close the files; with ``curves_metric``, draw ``curves.png`` of everything logged."""
        if not self.enabled:
            return
        self._fh.close()
        if self.tb is not None:
            self.tb.close()
        if curves_metric is not None:
            plot_curves(self.records, self.run_dir / "curves.png", metric=curves_metric)


def plot_curves(records: list[dict[str, Any]], path: Path, *, metric: str = "val_dice") -> Path:
    """Loss (train, val) and validation metric curves vs step as a 1000x400 PNG (matplotlib)."""
    # Lazy, and no pyplot: a Figure on its own Agg canvas touches no global backend state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from tilenet.fsutil import atomic_output

    other = "val_iou" if metric != "val_iou" else "val_dice"
    panels = [
        ("loss", "loss", [("loss", "tab:blue"), ("val_loss", "tab:red")]),
        ("validation", metric, [(metric, "tab:green"), (other, "tab:purple")]),
    ]
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, ylabel, series) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        drawn = 0
        for key, colour in series:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
            if not pts:
                continue
            steps, values = zip(*pts, strict=True)
            marker = "o" if len(pts) <= 50 else None  # sparse validation points stay visible
            ax.plot(steps, values, color=colour, marker=marker, markersize=3, label=key)
            drawn += 1
        if drawn:
            ax.grid(alpha=0.3)
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="grey")
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
