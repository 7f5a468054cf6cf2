"""Crash-safe outputs for the whole project (checkpoints, logs, plots, dataset files): write under a
temporary name, fsync, then rename over the final path.

A run killed at any moment leaves either no new output or a complete one, never a truncated file
with the final name. Temporary names carry the writer's pid (``.NAME.tmp-PID``) so a later run can
tell its own leftovers from those of a run that is still alive (:func:`remove_stale_temps`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "AtomicFile",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "fsync_dir",
    "remove_stale_temps",
    "replace_dir",
    "temp_name",
]

_TEMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")


def temp_name(path: Path) -> Path:
    """Hidden sibling of ``path`` owned by this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A binary file written under a temporary name; :meth:`commit` publishes it, :meth:`abort` drops it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_name(self.path)
        self._f = open(self.tmp, "wb")

    def write(self, data: bytes | memoryview | Any) -> None:
        """Append ``data`` (bytes or any buffer, e.g. a uint8 array, written without a copy)."""
        self._f.write(data)

    def commit(self) -> None:
        if self._f.closed:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        try:
            if not self._f.closed:
                self._f.close()  # flushes what is still buffered: on a full disk that fails again
        except OSError:
            pass  # the write already failed with this error, and the file is dropped anyway
        finally:
            self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """``with atomic_open(p) as f: torch.save(obj, f)``: a binary file, published (fsync + rename) when
    the block ends, deleted if it raises."""
    f = AtomicFile(path)
    try:
        yield f._f
        f.commit()  # a failed fsync (disk full) or rename (path is a directory) must not leave the temp file
    except BaseException:
        f.abort()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def replace_dir(tmp_dir: Path, final: Path) -> None:
    """Move a finished directory into place; an existing ``final`` is swapped out first, then deleted."""
    fsync_dir(tmp_dir)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp_dir, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete temporaries and swapped-out directories left in ``directory`` by processes that died."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        m = _TEMP_RE.match(entry.name) or re.match(r"^\..+\.old-(\d+)$", entry.name)
        if not m or (int(m.group(1)) != os.getpid() and _alive(int(m.group(1)))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def unwritable_reason(directory: str | os.PathLike) -> str | None:
    """Why files cannot be written into ``directory`` (created first if missing), or None: the nearest
    existing ancestor is a file, or is not writable. Tools check it before any expensive work."""
    parent = Path(directory)
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{str(parent)!r} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {str(parent)!r} is not writable"
    return None
