"""Run infrastructure shared by the training tools: checkpoints, CSV/TensorBoard log, curves, lock.

Nothing here knows the method or the data; ``tools/train.py`` and ``tools/train_graph.py`` pass their
own metric columns, plot keys and checkpoint contents.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, RunError
from .io import atomic_open, fsync_dir

log = logging.getLogger(__name__)

__all__ = [
    "TRAIN_FIELDS",
    "NonFiniteLossError",
    "RunLock",
    "RunLockedError",
    "RunLog",
    "load_optimizer_state",
    "move_run_aside",
    "plot_curves",
    "run_outputs",
    "save_checkpoint",
]

# Columns of tools/train.py's metrics.csv (another tool passes its own list to RunLog).
TRAIN_FIELDS = ("step", "epoch", "loss", "loss_rel", "loss_nce", "loss_sim", "key_std", "lr", "momentum",
                "infonce_weight", "images_per_s", "knn_top1")


class NonFiniteLossError(RunError):
    """Training produced a NaN or inf loss; the run stops before saving anything from that state."""


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Resume the optimiser: its per-parameter state (SGD momentum buffers) from the checkpoint, its
    hyperparameters (lr, weight decay, momentum) from the current config.

    ``optimizer`` must be freshly built from the current config (so its groups hold its values); a plain
    ``load_state_dict`` would bring back the checkpoint's. The lr itself is set by every step from
    ``ressl.schedule``, a pure function of the step.
    """
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, values in zip(optimizer.param_groups, current):
        group.update(values)


class _WriteErrors:
    """A file that remembers the OSError of a failed write: torch.save's zip writer turns a short write
    (a full disk) into its own "unexpected pos" RuntimeError, which does not say what happened."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temp file, fsync, rename): a kill at any moment leaves the old or the new file.

    Raises:
        RunError: the file could not be written (disk full, file too large, permission); the previous
            checkpoint, if any, is left as it was and the temp file is removed.
    """
    sink = None
    try:
        with atomic_open(path) as f:
            sink = _WriteErrors(f)
            torch.save(state, sink)
    except OSError as e:
        raise RunError(f"disk full / could not write {path}: {e.strerror or e}") from None
    except RuntimeError:
        if sink is None or sink.error is None:
            raise
        raise RunError(f"disk full / could not write {path}: {sink.error.strerror or sink.error}") from None


def run_outputs(run_dir: Path) -> list[str]:
    """Names of the earlier run's outputs in ``run_dir`` (its own files, ``eval*.json`` and any other
    file but the lock and temporaries): what a fresh start there would replace or leave stale."""
    if not run_dir.is_dir():
        return []
    return sorted(e.name for e in run_dir.iterdir() if e.name != ".lock" and ".tmp-" not in e.name)


def move_run_aside(run_dir: Path) -> Path:
    """Move every output of ``run_dir`` (not its lock, which the caller holds) into a new sibling
    ``NAME.replaced-YYYYmmdd-HHMMSS``; returns it. Nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}")
    dest.mkdir()
    for name in run_outputs(run_dir):
        os.replace(run_dir / name, dest / name)
    fsync_dir(dest)
    fsync_dir(run_dir)
    return dest


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
        with atomic_open(self.csv_path) as f:  # the kept prefix, rewritten whole: a kill here loses nothing
            text = _csv_text(self.fields, kept)
            f.write(text.encode())
        self.rows = len(kept)
        self.f = open(self.csv_path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=self.fields, extrasaction="ignore")

    def row(self, step: int, **values: float | None) -> None:
        """Append one row (missing columns stay empty) and the same scalars to TensorBoard."""
        if not self.enabled:
            return
        self.w.writerow({"step": step, **values})
        self.f.flush()
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


class RunLockedError(ConfigError):
    """Another live run holds the run directory (same ``name`` and ``out_dir``)."""


class RunLock:
    """Exclusive hold on a run directory for one training process: ``RUN_DIR/.lock``.

    The lock is an ``flock`` on that file (the kernel drops it when the holder dies, even by kill -9)
    plus the holder's pid, host and start time written inside, so a refusal can name the holder. A
    lock file left by a dead process on this host is taken over with a warning. A holder on another
    host cannot be checked from here: that is refused too, naming the host and the file to delete.

    Use as a context manager; only the main process of a run takes it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # read-only file system or directory, not a directory, ...
                raise ConfigError(f"cannot write in the run directory {self.path.parent}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(f"{self.path.parent} is in use by {_describe(holder)} (lock {self.path}); "
                                     "wait for that run, stop it, or give this one another name=") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released (unlinked) it between our open and flock: take the new file
        prev = _read_holder(fd)
        if prev and prev.get("host") != socket.gethostname():
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is locked by {_describe(prev)}, on another host, which "
                                 f"this one cannot check; if that run is gone, delete {self.path}")
        if prev and _alive(prev):  # a file system where flock does not hold: trust the pid check
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is in use by {_describe(prev)} (lock {self.path}); "
                                 "wait for that run, stop it, or give this one another name=")
        if prev:
            log.warning("taking over the lock %s of %s: that process is gone", self.path, _describe(prev))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiter then retries on a fresh file
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int) -> dict[str, Any] | None:
    raw = os.pread(fd, 65536, 0)
    if not raw.strip():
        return None
    try:
        holder = json.loads(raw)
    except ValueError:
        return {"pid": None, "host": "?", "raw": raw[:200].decode(errors="replace")}
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    cmd = " ".join(holder.get("argv") or [])
    return (f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since', '?')}"
            + (f": {cmd}" if cmd else "") + ")")


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(holder: dict[str, Any]) -> bool:
    """The recorded process still runs (same pid and start time, so a reused pid does not count)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() and holder.get("started") == _start_time(pid):
        return False
    started = _start_time(pid)
    return started is not None and (holder.get("started") is None or abs(started - holder["started"]) < 1e-3)
