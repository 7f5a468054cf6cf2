"""Numba kernels for the loops of dataset conversion that Python would run per pixel or per record,
and the one JIT switch of every Numba kernel in ``pipelines`` (these and :mod:`pipelines.augment_kernels`).

Each kernel is a small module-level function on plain NumPy arrays, wrapped by :func:`kernel`: a
call runs the compiled version, or, with JIT off, the very same Python function, so a kernel can be
stepped through in a debugger (like FFCV's ``Compiler.set_enabled``). Kernels that call other kernels
call the compiled ones when compiled and the Python ones when not. The switch:
``set_jit_enabled(False)`` at run time, ``RESSL_NUMBA_JIT=0`` in the environment before import, or
``tools/dataset.py --no-jit``.

Kernels:
  * :func:`planar_to_hwc` - CIFAR rows (R plane, G plane, B plane; each row-major) -> [N,H,W,C].
  * :func:`colmajor_to_hwc` - STL-10 rows (per channel, column-major) -> [N,H,W,C].
  * :func:`record_offsets` / :func:`pack_records` - MXNet RecordIO framing of many payloads into one
    preallocated buffer (see ``recordio.py`` for the layout).
  * :func:`resize_plan` - target sizes that bring the longer side down to ``max_side``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import types
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from .recordio import IR_HEADER_SIZE, MAGIC

__all__ = [
    "Kernel",
    "colmajor_to_hwc",
    "jit_enabled",
    "kernel",
    "pack_records",
    "planar_to_hwc",
    "record_offsets",
    "resize_plan",
    "set_jit_enabled",
]

_JIT = os.environ.get("RESSL_NUMBA_JIT", "1").strip().lower() not in ("0", "false", "no", "off")


def set_jit_enabled(enabled: bool) -> None:
    """Run the compiled kernels (True, default) or their pure-Python bodies (False, for debugging)."""
    global _JIT
    _JIT = bool(enabled)


def jit_enabled() -> bool:
    """Whether kernels currently run compiled."""
    return _JIT


class Kernel:
    """A Numba kernel behind the JIT switch: ``kernel(*args)`` runs ``.jit`` or ``.python``.

    ``.py_func`` is the function as written; ``.jit`` (compiled on first use) and ``.python`` are
    copies of it whose calls to other kernels go to their compiled or Python versions respectively,
    so a kernel calling kernels is compiled as a whole or runs as Python as a whole.
    """

    def __init__(self, fn: Callable[..., Any], **options: Any) -> None:
        functools.update_wrapper(self, fn)
        self.py_func = fn
        self._options = options
        self._jit: Callable[..., Any] | None = None
        self._python: Callable[..., Any] | None = None

    def _bound(self, variant: str) -> Callable[..., Any]:
        fn = self.py_func
        env = dict(fn.__globals__)
        for name in fn.__code__.co_names:  # only the kernels this one calls
            callee = env.get(name)
            if isinstance(callee, Kernel) and callee is not self:
                env[name] = getattr(callee, variant)
        return types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)

    @property
    def jit(self) -> Callable[..., Any]:
        if self._jit is None:
            self._jit = numba.njit(**self._options)(self._bound("jit"))
        return self._jit

    @property
    def python(self) -> Callable[..., Any]:
        if self._python is None:
            self._python = self._bound("python")
        return self._python

    def __call__(self, *args: Any) -> Any:
        return self.jit(*args) if _JIT else self.python(*args)


def kernel(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Decorator: ``@kernel`` or ``@kernel(fastmath=True, ...)`` (``numba.njit`` options; default
    ``cache=True, nogil=True``; ``cache=False`` for kernels that call ctypes functions, which Numba
    cannot cache)."""
    opts = {"cache": True, "nogil": True, **options}
    if fn is None:
        return lambda f: Kernel(f, **opts)
    return Kernel(fn, **opts)


# ------------------------------------------------------------------------------------------------
# raw-array sources


def _planar_to_hwc(src: np.ndarray, height: int, width: int, out: np.ndarray) -> None:
    n = src.shape[0]
    channels = out.shape[3]
    plane = height * width
    for i in range(n):
        for c in range(channels):
            base = c * plane
            for y in range(height):
                row = base + y * width
                for x in range(width):
                    out[i, y, x, c] = src[i, row + x]


planar_to_hwc = kernel(_planar_to_hwc)
planar_to_hwc.__doc__ = """Rows of planar, row-major images (CIFAR's ``data`` [N, C*H*W]) into ``out`` [N,H,W,C].

Args:
    src: uint8 [N, C*H*W]; channel planes one after another, each stored row by row.
    height, width: image side lengths.
    out: uint8 [N,H,W,C], preallocated, written in place.
"""


def _colmajor_to_hwc(src: np.ndarray, height: int, width: int, out: np.ndarray) -> None:
    n = src.shape[0]
    channels = out.shape[3]
    plane = height * width
    for i in range(n):
        for c in range(channels):
            base = c * plane
            for x in range(width):
                col = base + x * height
                for y in range(height):
                    out[i, y, x, c] = src[i, col + y]


colmajor_to_hwc = kernel(_colmajor_to_hwc)
colmajor_to_hwc.__doc__ = """Rows of column-major planar images (STL-10's ``*_X.bin``) into ``out`` [N,H,W,C].

Args:
    src: uint8 [N, C*H*W]; channel planes one after another, each stored column by column.
    height, width: image side lengths.
    out: uint8 [N,H,W,C], preallocated, written in place.
"""


# ------------------------------------------------------------------------------------------------
# RecordIO framing


def _record_offsets(payload_lengths: np.ndarray, start: int) -> np.ndarray:
    n = payload_lengths.shape[0]
    offsets = np.empty(n + 1, dtype=np.int64)
    pos = start
    for i in range(n):
        offsets[i] = pos
        body = payload_lengths[i] + IR_HEADER_SIZE
        pos += 8 + ((body + 3) // 4) * 4
    offsets[n] = pos
    return offsets


record_offsets = kernel(_record_offsets)
record_offsets.__doc__ = """File offsets of records holding payloads of ``payload_lengths`` bytes.

Each record is an 8-byte frame (magic, length) + 24-byte IRHeader + payload, padded to 4 bytes.

Args:
    payload_lengths: int64 [N] image byte counts.
    start: offset of the first record in the file.

Returns:
    int64 [N+1]: start of each record, then the end of the last one.
"""


# libc's memcpy, callable from nopython code through ctypes (as FFCV's libffcv.memcpy): about 3x Numba's
# slice assignment on ~100 KB payloads. The process's own symbols hold it on Linux and macOS.
_memcpy = ctypes.CDLL(None).memcpy
_memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcpy.restype = ctypes.c_void_p


def _pack_records(
    payload: np.ndarray,
    payload_offsets: np.ndarray,
    label_bits: np.ndarray,
    ids: np.ndarray,
    offsets: np.ndarray,
    out: np.ndarray,
) -> None:
    n = payload_offsets.shape[0] - 1
    base = offsets[0]
    for i in range(n):
        p0 = payload_offsets[i]
        length = payload_offsets[i + 1] - p0
        pos = offsets[i] - base
        end = offsets[i + 1] - base
        head = out[pos : pos + 32].view(np.uint32)  # little-endian hosts, as MXNet assumes
        head[0] = MAGIC
        head[1] = length + IR_HEADER_SIZE  # cflag 0 (whole record) in the top 3 bits
        head[2] = 0  # IRHeader.flag: 0 = the single float label that follows
        head[3] = label_bits[i]
        head[4] = ids[i] & 0xFFFFFFFF
        head[5] = ids[i] >> 32
        head[6] = 0  # id2
        head[7] = 0
        q = pos + 32
        _memcpy(int(out.ctypes.data + q), int(payload.ctypes.data + p0), int(length))
        out[q + length : end] = 0


pack_records = kernel(_pack_records, cache=False)
pack_records.__doc__ = """Frame N payloads as MXNet records into ``out`` (sized by :func:`record_offsets`).

Args:
    payload: uint8, all image bytes concatenated.
    payload_offsets: int64 [N+1]; image ``i`` is ``payload[payload_offsets[i]:payload_offsets[i+1]]``.
    label_bits: uint32 [N], bit patterns of the float32 labels (``labels.astype(np.float32).view(np.uint32)``).
    ids: int64 [N], record ids (DALI ignores them; we store the running sample index).
    offsets: int64 [N+1] from :func:`record_offsets`; ``offsets[0]`` is where ``out`` starts in the file.
    out: uint8 [offsets[N] - offsets[0]], written in place.
"""


# ------------------------------------------------------------------------------------------------
# resizing plans


def _resize_plan(widths: np.ndarray, heights: np.ndarray, max_side: int) -> np.ndarray:
    n = widths.shape[0]
    out = np.empty((n, 2), dtype=np.int64)
    for i in range(n):
        w = widths[i]
        h = heights[i]
        longest = max(w, h)
        if max_side <= 0 or longest <= max_side:
            out[i, 0] = w
            out[i, 1] = h
        else:
            scale = max_side / longest
            out[i, 0] = max(1, int(w * scale + 0.5))
            out[i, 1] = max(1, int(h * scale + 0.5))
    return out


resize_plan = kernel(_resize_plan)
resize_plan.__doc__ = """Target (width, height) per image: the longer side shrunk to ``max_side``, aspect kept.

Images already within ``max_side`` (or ``max_side <= 0``) keep their size; none is enlarged.

Returns:
    int64 [N, 2] of (width, height).
"""
