"""Worker processes that never outlive the process that forked them (Linux).

A writer killed with SIGKILL cannot clean up; its forked workers would keep running, blocked on a
queue whose other end they hold themselves, keeping open a deleted temporary file and FFCV's
``/dev/shm`` segment. :func:`die_with_parent` asks the kernel to SIGKILL the calling process when its
parent dies (``prctl(PR_SET_PDEATHSIG)``); :func:`children_die_with_us` applies it in every process
forked inside the block, including those a library forks for us (FFCV's writer).

The death signal fires when the *thread* that forked the child exits, so fork from a thread that
outlives the children (the converter forks from its main thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Iterator

__all__ = ["children_die_with_us", "die_with_parent"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_ACTIVE: list[int] = []  # pids of processes inside children_die_with_us (a stack, innermost last)


def die_with_parent(parent: int | None = None) -> bool:
    """Have this process killed (SIGKILL) when its parent dies; exit now if it already has.

    Args:
        parent: the expected parent pid (checked after arming: a parent that died in between).

    Returns:
        False where the platform has no ``prctl`` (then nothing is armed).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent is not None and os.getppid() != parent:
        os._exit(1)
    return True


def _after_fork_in_child() -> None:
    if _ACTIVE:
        parent = _ACTIVE[-1]
        _ACTIVE.clear()  # the child's own forks are not ours to arm
        die_with_parent(parent)


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def children_die_with_us() -> Iterator[None]:
    """Every process forked (``os.fork`` / multiprocessing's fork) inside the block dies with us."""
    _ACTIVE.append(os.getpid())
    try:
        yield
    finally:
        _ACTIVE.pop()
