"""Worker processes that never outlive the process that forked them (Linux).

A writer killed with SIGKILL cannot clean up; its forked workers would keep running, blocked on a
queue whose other end they hold themselves, keeping open a deleted temporary file and FFCV's
``/dev/shm`` segment. :func:`die_with_parent` asks the kernel to SIGKILL the calling process when its
parent dies (``prctl(PR_SET_PDEATHSIG)``); :func:`children_die_with_us` applies it in every process
forked inside the block, including those a library forks for us (FFCV's writer).

The death signal fires when the *thread* that forked the child exits, so fork from a thread that
outlives the children (the converter forks from its main thread).

:func:`ordered_map` is the converters' process pool: results in order, bounded memory, and a worker
that dies ends the map with an error naming what it was working on instead of a hang.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["WorkerDiedError", "children_die_with_us", "die_with_parent", "ordered_map"]

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


# ------------------------------------------------------------------------------------------------
# an ordered map over forked workers that cannot hang on a dead worker


class WorkerDiedError(RuntimeError):
    """A worker process ended abruptly (killed, crashed); the message names the items it held."""


_SLOTS: dict[str, Any] = {}  # in a worker: its slot in the shared "item in progress" array
_STATES: dict[int, Any] = {}  # the running maps' states by key, set before their workers fork


def _worker_start(parent: int, slots: Any, counter: Any, init: Callable[[], None] | None) -> None:
    die_with_parent(parent)
    with counter.get_lock():
        slot = counter.value
        counter.value += 1
    _SLOTS.update(slots=slots, slot=slot)

    def on_term(*_: object) -> None:  # the pool ends the healthy workers with SIGTERM when one dies
        slots[slot] = -1
        os._exit(143)

    signal.signal(signal.SIGTERM, on_term)
    if init is not None:
        init()


def _run_chunk(fn: Callable[[Any, int], Any], key: int, items: list[int]) -> list[Any]:
    slots, slot, state = _SLOTS["slots"], _SLOTS["slot"], _STATES[key]
    out = []
    for item in items:
        slots[slot] = item
        out.append(fn(state, item))
    slots[slot] = -1
    return out


def ordered_map(fn: Callable[[Any, int], Any], items: Sequence[int], workers: int, *, state: Any = None,
                chunk_size: int = 16, window: int = 4, describe: Callable[[int], str] = str,
                init: Callable[[], None] | None = None) -> Iterator[Any]:
    """``fn(state, item)`` of every item, yielded in ``items``' order, computed by ``workers`` forked processes.

    Unlike ``multiprocessing.Pool.imap``, which waits forever for the result of a worker that was
    killed (out of memory, a crashing decoder), a dead worker ends the map with
    :class:`WorkerDiedError` naming the item it was working on; an exception raised by ``fn`` is
    re-raised here as it is. At most ``window`` chunks per worker are in flight (bounded memory), the
    workers die with this process (:func:`die_with_parent`), and when the caller stops early (an
    exception, a closed generator) the pending chunks are cancelled and the running ones waited for,
    so no worker still writes when the caller cleans up.

    Args:
        fn: a module-level function (pickled by name for every chunk).
        state: what ``fn`` works on (a split, the encoders): inherited by the forked workers, never
            pickled, so it may hold large arrays and open files.
        items: non-negative integers (indices).
        workers: processes; 1 runs ``fn`` in this process.
        chunk_size: items per task.
        window: chunks in flight per worker.
        describe: how an item is named in the error.
        init: run once in each worker after the fork.
    """
    if workers <= 1 or len(items) < 2:
        for item in items:
            yield fn(state, item)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("fork")
    workers = min(workers, len(items))
    slots = ctx.Array("q", [-1] * workers, lock=False)
    counter = ctx.Value("i", 0)
    chunks = [list(items[i:i + chunk_size]) for i in range(0, len(items), chunk_size)]
    key = id(state)
    _STATES[key] = state  # before the first submit: the pool forks its workers then, and they inherit it
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_start,
                               initargs=(os.getpid(), slots, counter, init))
    pending: collections.deque = collections.deque()
    try:
        nxt = 0
        while nxt < len(chunks) or pending:
            while nxt < len(chunks) and len(pending) < window * workers:
                pending.append(pool.submit(_run_chunk, fn, key, chunks[nxt]))
                nxt += 1
            try:
                results = pending.popleft().result()
            except BrokenProcessPool:
                pool.shutdown(wait=True, cancel_futures=True)  # the healthy workers clear their slots
                held = [describe(int(s)) for s in slots if s >= 0]
                raise WorkerDiedError(
                    "a worker process died (killed, out of memory, or a crash inside a library) while working on "
                    + (", ".join(held) if held else "an item it had not yet reported") + "; nothing was written"
                ) from None
            yield from results
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        _STATES.pop(key, None)
