"""Metrics: device-side meters, the CSV / TensorBoard log, and the plot of the curves.

Training loss and top-1 / top-5 error accumulate on the device (no host sync per step)
and are summed over processes when read. Rows go to ``metrics.csv`` (one per logging
interval for training, one per evaluation) and, when ``tensorboard`` is installed, to a
TensorBoard event file in the same folder; :func:`plot_curves` draws ``curves.png``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

CSV_NAME = "metrics.csv"
PLOT_NAME = "curves.png"
FIELDS = ("phase", "epoch", "iteration", "loss", "top1_error", "top5_error", "lr", "images_per_s", "elapsed_s")


@dataclass(frozen=True)
class MeterReading:
    """Mean loss and top-1 / top-5 error (in %) over ``count`` samples."""

    loss: float
    top1_error: float
    top5_error: float
    count: int


class Meter:
    """Sums of loss, top-1 hits, top-5 hits and samples, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    def update(self, logits: Tensor, labels: Tensor, loss_sum: Tensor) -> None:
        """Add a batch: ``logits`` (N, classes) — or (N, crops, classes), averaged — and the
        batch's summed loss."""
        hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels[:, None]
        # the count by a fill, not a host-to-device copy: a CUDA graph can capture it
        count = torch.full((), float(len(labels)), dtype=torch.float64, device=labels.device)
        batch = torch.stack([loss_sum.detach().double(), hits[:, 0].sum().double(),
                             hits.any(dim=1).sum().double(), count])
        self.sums += batch

    def read(self, reset: bool = True) -> MeterReading:
        """The means over every process since the last reset (a host sync)."""
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        loss_sum, top1, top5, count = sums.tolist()
        if reset:
            self.sums.zero_()
        if count == 0:
            return MeterReading(math.nan, math.nan, math.nan, 0)
        return MeterReading(loss_sum / count, 100 * (1 - top1 / count), 100 * (1 - top5 / count), int(count))

    def state_dict(self) -> dict[str, Tensor]:
        return {"sums": self.sums.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.sums.copy_(state["sums"])


class MetricsLog:
    """``metrics.csv`` and TensorBoard scalars under ``out_dir`` (written by rank 0 only).

    ``resume_iteration``: the CSV of the interrupted run is kept up to that iteration (rows
    logged after the checkpoint was written are dropped, the resumed run logs them again).
    """

    def __init__(self, out_dir: Path, enabled: bool, resume_iteration: int | None = None) -> None:
        self.enabled = enabled
        self.path = out_dir / CSV_NAME
        self.writer: Any = None
        self.note = ""
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = [row for row in read_metrics(self.path) if int(row["iteration"]) <= resume_iteration] \
            if resume_iteration is not None and self.path.exists() else []
        with open(self.path, "w", newline="") as file:
            writer = csv.DictWriter(file, FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.note = "tensorboard is not installed: metrics go to the CSV only (pip install tensorboard)"
        else:
            self.writer = SummaryWriter(str(out_dir), purge_step=resume_iteration)

    def log(self, row: dict[str, Any]) -> None:
        """Append one row (keys from :data:`FIELDS`) to the CSV and to TensorBoard."""
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as file:
            csv.DictWriter(file, FIELDS).writerow({key: _format(row.get(key)) for key in FIELDS})
        if self.writer is not None:
            for key in ("loss", "top1_error", "top5_error", "lr", "images_per_s"):
                if row.get(key) is not None:
                    self.writer.add_scalar(f"{row['phase']}/{key}", row[key], row["iteration"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _format(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else ("" if value is None else value)


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv``."""
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def plot_curves(rows: list[dict[str, str]], path: str | Path) -> Path:
    """Loss, top-1 error and learning rate against iterations, training and evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(phase: str, key: str) -> tuple[list[int], list[float]]:
        points = [(int(row["iteration"]), float(row[key])) for row in rows if row["phase"] == phase and row[key]]
        return [x for x, _ in points], [y for _, y in points]

    figure, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for axis, key, title in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "top1_error", "top-1 error (%)")):
        for phase, style in (("train", "-"), ("eval", "o-")):
            xs, ys = series(phase, key)
            if xs:
                axis.plot(xs, ys, style, label=phase, markersize=3)
        axis.set(title=title, xlabel="iteration")
        axis.legend()
    xs, ys = series("train", "lr")
    axes[2].step(xs, ys, where="pre")  # each row's rate held over the interval it closes
    axes[2].set(title="learning rate", xlabel="iteration", yscale="log")
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
