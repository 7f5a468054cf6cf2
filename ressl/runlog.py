"""The record of a run: ``metrics.csv`` and TensorBoard rows (main process only), and ``curves.png``.

Nothing here knows the method; each trainer passes its own columns and plotted keys.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from .config import RunError
from .io import atomic_open

__all__ = ["TRAIN_FIELDS", "RunLog", "plot_curves"]

# Columns of tools/train.py's metrics.csv (another tool passes its own list to RunLog).
TRAIN_FIELDS = ("step", "epoch", "loss", "loss_rel", "loss_nce", "loss_sim", "key_std", "lr", "momentum",
                "infonce_weight", "images_per_s", "knn_top1")


def plot_curves(csv_path: Path, png_path: Path, keys: Sequence[str] | None = None) -> None:
    """One panel per metric against the step, in a grid of up to four columns.

    Args:
        csv_path: a ``metrics.csv`` written by :class:`RunLog` (needs a ``step`` column).
        png_path: output, written atomically.
        keys: columns to plot, in order; None = every column but ``step`` and ``epoch``. Columns with no
            value in any row are left out. Sparse columns (values in under half the rows, e.g. a kNN
            monitor run once per epoch) are drawn with markers so single points stay visible.
    """
    try:
        import matplotlib
    except ImportError:  # optional (a bare GPU machine may lack it): metrics.csv holds the same numbers
        logging.getLogger(__name__).warning("matplotlib is not installed: %s not drawn", png_path)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = [c for c in (reader.fieldnames or []) if c not in ("step", "epoch")]
    if not rows:
        return
    keys = [k for k in (columns if keys is None else keys) if any(r.get(k) for r in rows)]
    if not keys:
        return
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, k in zip(axes.flat, keys):
        pts = [(int(r["step"]), float(r[k])) for r in rows if r.get(k)]
        sparse = len(pts) < 0.5 * len(rows)
        ax.plot(*zip(*pts), marker="o" if sparse else None, markersize=3)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(png_path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


class RunLog:
    """``metrics.csv`` + TensorBoard rows, written by the main process only.

    On resume the CSV keeps only the rows written before the checkpoint (``keep_rows``, the row count the
    checkpoint recorded; or, for a checkpoint without it, the rows up to ``resume_step``), so replayed
    steps are never logged twice; TensorBoard is told to purge its events after ``resume_step``.

    Args:
        run_dir: directory of the run; the CSV is ``run_dir/metrics.csv``, events go to ``run_dir/tb``.
        enabled: False on every process but the main one (then every call is a no-op).
        resume_step: the checkpoint's step when resuming, None for a fresh run (the CSV is rewritten).
        keep_rows: number of data rows the CSV held when the checkpoint was written.
        fields: CSV columns; the first must be ``step``. Values for other keys are dropped from the CSV.
        eval_keys: keys logged under ``eval/`` in TensorBoard (the rest under ``train/``).
    """

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None, keep_rows: int | None = None,
                 fields: Sequence[str] = TRAIN_FIELDS, eval_keys: Sequence[str] = ("knn_top1",)):
        if not fields or fields[0] != "step":
            raise ValueError(f"RunLog fields must start with 'step', got {list(fields)}")
        self.enabled = enabled
        self.csv_path = run_dir / "metrics.csv"
        self.fields = list(fields)
        self.eval_keys = set(eval_keys)
        self.rows = 0  # data rows in the CSV (stored in checkpoints as the resume point)
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional (a bare GPU machine may lack it): metrics.csv is the record
            logging.getLogger(__name__).warning("tensorboard is not installed: logging to %s only", self.csv_path)
            SummaryWriter = None

        kept: list[dict[str, str]] = []
        if resume_step is not None and self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                old = list(csv.DictReader(f))
            if keep_rows is not None:
                kept = old[:keep_rows]
            else:
                kept = [r for r in old if r.get("step") and int(r["step"]) <= resume_step]
        self.tb = None if SummaryWriter is None else SummaryWriter(
            str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)
        try:
            with atomic_open(self.csv_path) as f:  # the kept prefix, rewritten whole: a kill here loses nothing
                f.write(_csv_text(self.fields, kept).encode())
        except OSError as e:
            raise RunError(f"disk full / could not write {self.csv_path}: {e.strerror or e}") from None
        self.rows = len(kept)
        self.f = open(self.csv_path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=self.fields, extrasaction="ignore")

    def row(self, step: int, **values: float | None) -> None:
        """Append one row (missing columns stay empty) and the same scalars to TensorBoard."""
        if not self.enabled:
            return
        try:
            self.w.writerow({"step": step, **values})
            self.f.flush()  # a full disk shows here, at the row, not at close
        except OSError as e:
            raise RunError(f"disk full / could not write {self.csv_path}: {e.strerror or e}; once there is space, "
                           "the same command continues from the last checkpoint") from None
        self.rows += 1
        for k, v in values.items():
            if k != "epoch" and v is not None and self.tb is not None:
                self.tb.add_scalar(f"eval/{k}" if k in self.eval_keys else f"train/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def _csv_text(fields: Sequence[str], rows: list[dict[str, str]]) -> str:
    import io

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
