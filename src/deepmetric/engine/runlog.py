"""What a run writes besides checkpoints: metrics.jsonl, optional TensorBoard, PNG plots,
and the lines it prints.

``metrics.jsonl`` holds one JSON object per line: training records
(``{"iteration", "epoch", "loss", "num_active", "lr", "images_per_s", "time_s"}``), evaluation
records (``{"iteration", "split": "val" | "test", "recall@1", ..., "map@r", ...}``) and events
(``{"iteration", "event": "resume", ...}``). Plots (``loss.png``, ``recall.png``) are drawn with
matplotlib's Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from deepmetric import distributed as dist
from deepmetric.evaluation import display_name, ordered_keys

# Deferred imports: tensorboard and matplotlib (optional / slow to import), inside the
# functions that use them.

__all__ = ["LossMeter", "RunLog", "format_metrics", "say"]


def say(message: str) -> None:
    """Print a line on rank 0 (through tqdm, so a progress bar is not broken)."""
    if dist.is_main_process():
        tqdm.write(message, file=sys.stdout)


def format_metrics(metrics: dict[str, float]) -> str:
    """``"recall@1 0.9330  recall@2 0.9688  map@r 0.3375"``: every metric present, in the
    order of ``deepmetric.evaluation.METRICS``."""
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in ordered_keys(metrics))


class LossMeter:
    """Mean training loss and images/s over the iterations since the last :meth:`record`.

    The loss is summed on its device (no host sync per step); time spent evaluating or saving
    is excluded by :meth:`restart_clock`.
    """

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.steps = self.images = 0
        self.run_start = self.window_start = time.perf_counter()

    def add(self, loss: torch.Tensor, images: int) -> None:
        """One step's (detached) loss and number of images (global batch)."""
        self.loss_sum += loss
        self.steps += 1
        self.images += images

    def record(self) -> dict[str, float]:
        """``{"loss", "images_per_s", "time_s"}`` of the window, then start a new one."""
        elapsed = time.perf_counter() - self.window_start
        record = {
            "loss": float(self.loss_sum) / max(1, self.steps),
            "images_per_s": round(self.images / max(elapsed, 1e-9), 1),
            "time_s": round(time.perf_counter() - self.run_start, 2),
        }
        self.loss_sum.zero_()
        self.steps = self.images = 0
        self.restart_clock()
        return record

    def restart_clock(self) -> None:
        """Start the throughput clock now (after an evaluation or a checkpoint)."""
        self.window_start = time.perf_counter()


class RunLog:
    """Appends records to ``run_dir/metrics.jsonl`` and mirrors numbers to TensorBoard.

    Args:
        run_dir: the run folder; None disables every output (non-main ranks).
        tensorboard: also write TensorBoard event files to ``run_dir/tensorboard`` when the
            ``tensorboard`` package is installed (a warning otherwise).
        plots: redraw ``loss.png`` and ``recall.png`` at each :meth:`plot` call.
    """

    def __init__(self, run_dir: Path | None, tensorboard: bool = False, plots: bool = True) -> None:
        self.run_dir = run_dir
        self.plots = plots and run_dir is not None
        self.records: list[dict[str, Any]] = []
        self._tb = None
        if run_dir is None:
            return
        self.path = run_dir / "metrics.jsonl"
        if self.path.is_file():
            with open(self.path) as f:
                self.records = [json.loads(line) for line in f if line.strip()]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed
                warnings.warn(
                    "output.tensorboard is true but the tensorboard package is not "
                    "installed (pip install tensorboard); skipping it",
                    stacklevel=2,
                )
            else:
                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def truncate(self, iteration: int) -> None:
        """Drop records after ``iteration`` (written by a killed run after its last checkpoint)."""
        if self.run_dir is None:
            return
        self.records = [r for r in self.records if r.get("iteration", 0) <= iteration]
        with open(self.path, "w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (numbers, strings, small dicts) and flush it."""
        if self.run_dir is None:
            return
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            prefix = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self._tb.add_scalar(f"{prefix}/{key}", value, record.get("iteration", 0))
            self._tb.flush()

    def plot(self) -> None:
        """Rewrite loss.png (training loss, log scale when positive) and recall.png (every
        evaluated metric against iterations, one colour each)."""
        if not self.plots:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        train = [r for r in self.records if "loss" in r and "split" not in r]
        if train:
            fig = Figure(figsize=(6, 4), dpi=100)
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            its = [r["iteration"] for r in train]
            losses = [r["loss"] for r in train]
            ax.plot(its, losses, lw=1.2)
            if all(v > 0 and math.isfinite(v) for v in losses):
                ax.set_yscale("log")
            ax.set_xlabel("iteration")
            ax.set_ylabel("training loss")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(self.run_dir / "loss.png")
        evals = [r for r in self.records if "split" in r and r.get("checkpoint") is None]
        if evals:
            fig = Figure(figsize=(6, 4), dpi=100)
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            for split, style in (("val", "-"), ("test", "--")):
                rows = [r for r in evals if r["split"] == split]
                if not rows:
                    continue
                keys = ordered_keys(rows[-1])
                for key in keys:
                    pts = [(r["iteration"], r[key]) for r in rows if key in r]
                    label = f"{split} {display_name(key)}"
                    ax.plot(*zip(*pts), style, marker="o", ms=3, label=label)
            ax.set_xlabel("iteration")
            ax.set_ylabel("retrieval metric")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right", ncol=2)
            fig.tight_layout()
            fig.savefig(self.run_dir / "recall.png")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
