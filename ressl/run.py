"""The scaffolding both trainers share: run directory, lock, resume lookup, checkpoints, RNG state,
summary and command line.

A run lives in ``OUT_DIR/NAME/``. :func:`open_run` prepares it (a fresh start over earlier outputs is
refused, or moves them aside with ``overwrite``), holds its lock and removes temp files a killed run
left; :func:`find_checkpoint` / :func:`read_checkpoint` / :func:`check_resume_config` find, read and
vet the checkpoint to resume; :func:`rng_state` / :func:`restore_rng` carry the CPU and CUDA generators
through it; :func:`finish_run` writes the summary and the curves. Nothing here knows the method or the
data: ``tools/train.py`` and ``tools/train_graph.py`` pass their own config, columns and checkpoint
contents. The metrics record is :mod:`ressl.runlog`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from .config import ConfigError, RunError
from .io import atomic_open, atomic_write_json, fsync_dir, remove_stale_temps
from .runlog import RunLog, plot_curves

log = logging.getLogger(__name__)

__all__ = [
    "NonFiniteLossError",
    "RunConfig",
    "RunLock",
    "RunLockedError",
    "check_resume_config",
    "find_checkpoint",
    "finish_run",
    "load_optimizer_state",
    "move_run_aside",
    "open_run",
    "parse_cli",
    "read_checkpoint",
    "restore_rng",
    "rng_state",
    "run_outputs",
    "save_checkpoint",
]


class RunConfig(Protocol):
    """What the scaffolding reads of a trainer's config (``ressl.config.Config``, ``GraphConfig``)."""

    name: str
    out_dir: str
    resume: str

    def to_dict(self) -> dict[str, Any]: ...


C = TypeVar("C")


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------
def parse_cli(doc: str | None, load: Callable[[str | None, list[str]], C], config_help: str,
              argv: list[str] | None = None) -> C:
    """``--config PRESET key=value ...`` of a trainer, read by ``load(preset, overrides)``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=config_help)
    p.add_argument("overrides", nargs="*", help="key=value overrides of any config key")
    a = p.parse_args(argv)
    return load(a.config, a.overrides)


# ---------------------------------------------------------------------------------------------------
# run directory
# ---------------------------------------------------------------------------------------------------
def prepare_run_dir(cfg: RunConfig, run_dir: Path, is_main: bool, overwrite: bool | None) -> list[str]:
    """Check that ``run_dir`` can be used, create it (main process); returns the earlier outputs that a
    fresh start with ``overwrite=true`` moves aside. A fresh start over outputs without it is refused;
    ``overwrite`` None (a trainer without that key) lets a fresh start write over them in place."""
    earlier = run_outputs(run_dir) if overwrite is not None and cfg.resume == "no" and run_dir.is_dir() else []
    if earlier and not overwrite:
        summary = run_dir / "summary.json"
        finished = ""
        if summary.is_file():
            with contextlib.suppress(ValueError, OSError):
                finished = f"; a finished run of {json.loads(summary.read_text()).get('steps')} steps"
        raise ConfigError(
            f"run {cfg.name!r} already has outputs in {run_dir} ({', '.join(earlier)}{finished}): resume=no would "
            f"replace some and leave the others stale. Start fresh under another name (name={cfg.name}-2), or add "
            f"overwrite=true to move the old outputs to {run_dir}.replaced-<date>/ first, or drop resume=no to "
            "continue the run")
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"out_dir={cfg.out_dir!r}, name={cfg.name!r}: cannot create the run directory "
                              f"{run_dir}: {e.strerror or e}") from None
    return earlier


@contextlib.contextmanager
def open_run(cfg: RunConfig, *, overwrite: bool | None, is_main: bool = True,
             barrier: Callable[[], None] = lambda: None) -> Iterator[Path]:
    """Hold ``OUT_DIR/NAME/`` for the run: prepared (:func:`prepare_run_dir`), locked by the main process
    until the block ends (released on any exit, dropped by the kernel if the process is killed), earlier
    outputs moved aside under the lock (``resume=no overwrite=true``), temp files of a killed save
    removed; then ``barrier()`` (every process waits for the main one). Yields the run directory."""
    run_dir = Path(cfg.out_dir) / cfg.name
    earlier = prepare_run_dir(cfg, run_dir, is_main, overwrite)
    with RunLock(run_dir) if is_main else contextlib.nullcontext():
        if is_main:
            if earlier:
                log.warning("overwrite=true: moved the earlier outputs of %s to %s", run_dir, move_run_aside(run_dir))
            for p in remove_stale_temps(run_dir):  # e.g. the temp file of a checkpoint save that was killed
                log.info("removed %s, left by an interrupted run", p)
        barrier()
        yield run_dir


def finish_run(run_dir: Path, runlog: RunLog, summary: dict[str, Any], curves: Sequence[str]) -> None:
    """Close the metrics record, draw ``curves.png`` and write ``summary.json`` (main process).

    Raises:
        RunError: one of them could not be written (disk full, quota, permission): the message names the file
            and says that the checkpoint, saved before, holds the trained model.
    """
    writes = ((runlog.csv_path, runlog.close),
              (run_dir / "curves.png", lambda: plot_curves(runlog.csv_path, run_dir / "curves.png", curves)),
              (run_dir / "summary.json", lambda: atomic_write_json(run_dir / "summary.json", summary)))
    for path, write in writes:
        try:
            write()
        except OSError as e:
            raise RunError(f"disk full / could not write {path}: {e.strerror or e}; the trained model is saved in "
                           f"{run_dir / 'last.pt'}") from None


# ---------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------
def find_checkpoint(cfg: RunConfig, run_dir: Path) -> Path | None:
    """The checkpoint this run resumes from (``resume=auto``: ``last.pt`` if there is one; a path), or None
    for a fresh start."""
    if cfg.resume == "no":
        return None
    if cfg.resume == "auto":
        path = run_dir / "last.pt"
        return path if path.exists() else None
    path = Path(cfg.resume)
    if not path.is_file():
        raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint file (use auto, no, or a last.pt path)")
    return path


def read_checkpoint(path: Path, required: Sequence[str]) -> dict[str, Any]:
    """The checkpoint to resume from, read with ``weights_only=True``; it must hold the ``required`` keys.

    A file that is not one is a ConfigError that says what it is, in the words of
    ``ressl.eval.load_checkpoint`` (tools/eval.py's reader), which is asked only when the file fails here.
    """
    from .eval import load_checkpoint

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - the reader below re-reads the file and says what it is
        load_checkpoint(path)
        raise
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        names = ", ".join(repr(k) for k in list(state)[:3])
        raise ConfigError(f"{path} is not a trainer checkpoint: it is a bare state_dict of {len(state)} tensors "
                          f"({names}, ...), weights only (as tools/export.py or torchvision write them), without "
                          "the optimiser, step and config a run resumes from; start this run with resume=no")
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        load_checkpoint(path)  # not a trainer checkpoint at all: its message says what the file holds
        raise ConfigError(f"{path} is a trainer checkpoint without {missing}, which resuming needs")
    return state


def check_resume_config(changes: tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]], path: Path) -> None:
    """Refuse a resume whose config differs in a key that cannot change; log the changes that apply.

    Args:
        changes: ``(applied, refused)`` of ``ressl.config.resume_changes`` (or the graph config's).
        path: the checkpoint, named in the message.
    """
    applied, refused = changes
    if refused:
        lines = "\n  ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in refused.items())
        raise ConfigError(f"cannot resume {path}: these keys differ from the checkpoint's config and cannot change "
                          f"mid-run:\n  {lines}\nPut them back, or start a new run (another name=, or resume=no).")
    for k, (old, new) in applied.items():
        log.info("resume: %s changed %r -> %r (applied)", k, old, new)


def rng_state() -> dict[str, torch.Tensor]:
    """The global generators a checkpoint carries: ``rng_cpu``, and ``rng_cuda`` (this device's) on a GPU."""
    state = {"rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the generators of :func:`rng_state`, so a resumed run draws what an unbroken one would."""
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"])


# ---------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# lock
# ---------------------------------------------------------------------------------------------------
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
