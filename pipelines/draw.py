"""Counter-based random draws: every random decision of a view is a pure function of
``(seed, epoch, sample index, view)``.

A loader that draws from a stream (``np.random`` in FFCV's Numba threads, a per-process generator, a
DataLoader worker's torch seed) gives a sample views that depend on thread scheduling, worker count,
batch position or world size, so two runs of one command differ and a resumed run sees other crops.
Here each decision is a hash of its coordinates instead (splitmix64's finaliser, as in counter-based
generators such as Philox): no state, nothing shared, the same value on 1 thread or 16, on 1
process or 8, before or after a resume, and in every backend — which all call these functions.

Slots. A view's key is ``view_key(seed, epoch, index, view)``; decision ``s`` of that view is the
uniform ``uniform(key, s)`` in [0, 1). The slots are fixed (:data:`SLOTS`), so adding an op never
moves the draws of the others:

  * crop: torchvision's ``RandomResizedCrop.get_params`` algorithm, attempt ``a`` (0..9) using slots
    ``4a .. 4a+3`` for (area scale, log aspect ratio, top, left); after 10 misses, the same central
    fallback crop. The box depends on the image's own height and width, as torchvision's does.
  * flip, jitter (on/off, brightness, contrast, saturation, hue), grayscale, blur (on/off, sigma),
    solarize: one slot each.

Every function here is a Numba kernel (behind the project's JIT switch), callable from Python, from
other kernels and from FFCV's compiled pipeline code alike.
"""

from __future__ import annotations

import math

import numpy as np

from .formats.kernels import kernel
from .spec import ViewSpec

__all__ = ["SLOTS", "CROP_ATTEMPTS", "mix64", "view_key", "uniform", "crop_box", "crop_boxes", "draw_uniforms",
           "view_decisions", "view_crops"]

CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its central fallback
SLOTS = {
    "crop": 0,  # 4 per attempt: 0 .. 4 * CROP_ATTEMPTS - 1
    "flip": 40,
    "jitter": 41,
    "brightness": 42,
    "contrast": 43,
    "saturation": 44,
    "hue": 45,
    "gray": 46,
    "blur": 47,
    "sigma": 48,
    "solarize": 49,
}
NUM_SLOTS = 50

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53


@kernel
def mix64(z):
    """splitmix64's finaliser: a bijection of 64-bit words whose output bits all depend on every input bit."""
    z = np.uint64(z)
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@kernel
def view_key(seed, epoch, index, view):
    """The 64-bit key of one view of one sample in one epoch (each coordinate mixed in turn)."""
    k = mix64(np.uint64(seed) + _GOLDEN)
    k = mix64(k + np.uint64(epoch) * _GOLDEN)
    k = mix64(k + np.uint64(index) * _GOLDEN)
    return mix64(k + np.uint64(view) * _GOLDEN)


@kernel
def uniform(key, slot):
    """Decision ``slot`` of the view with ``key``: a float64 in [0, 1) with 53 random bits."""
    z = mix64(np.uint64(key) + np.uint64(slot + 1) * _GOLDEN)
    return float(z >> _S11) * _TO_UNIT


@kernel
def crop_box(key, height, width, scale_lo, scale_hi, ratio_lo, ratio_hi):
    """``(top, left, crop_height, crop_width)`` of a random resized crop, torchvision's algorithm.

    Up to 10 attempts: area = image area x U(scale), aspect = exp(U(log ratio)); the first box that
    fits is placed uniformly; else the central crop clamped to the ratio range.
    """
    area = float(height) * float(width)
    log_lo = math.log(ratio_lo)
    log_hi = math.log(ratio_hi)
    for a in range(CROP_ATTEMPTS):
        target = area * (scale_lo + (scale_hi - scale_lo) * uniform(key, 4 * a))
        aspect = math.exp(log_lo + (log_hi - log_lo) * uniform(key, 4 * a + 1))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= width and 0 < ch <= height:
            top = int(uniform(key, 4 * a + 2) * (height - ch + 1))
            left = int(uniform(key, 4 * a + 3) * (width - cw + 1))
            return top, left, ch, cw
    in_ratio = float(width) / float(height)
    if in_ratio < ratio_lo:
        cw = width
        ch = int(round(cw / ratio_lo))
    elif in_ratio > ratio_hi:
        ch = height
        cw = int(round(ch * ratio_hi))
    else:
        cw = width
        ch = height
    return (height - ch) // 2, (width - cw) // 2, ch, cw


@kernel
def crop_boxes(seed, epoch, indices, view, heights, widths, scale_lo, scale_hi, ratio_lo, ratio_hi, out):
    """:func:`crop_box` for a batch: ``out[k] = (top, left, h, w)`` of sample ``indices[k]`` (int64 [B, 4])."""
    for k in range(indices.shape[0]):
        key = view_key(seed, epoch, indices[k], view)
        box = crop_box(key, heights[k], widths[k], scale_lo, scale_hi, ratio_lo, ratio_hi)
        for c in range(4):
            out[k, c] = box[c]


@kernel
def draw_uniforms(seed, epoch, indices, view, slots, out):
    """``out[k, j] = uniform(view_key(seed, epoch, indices[k], view), slots[j])`` (float64 [B, len(slots)])."""
    for k in range(indices.shape[0]):
        key = view_key(seed, epoch, indices[k], view)
        for j in range(slots.shape[0]):
            out[k, j] = uniform(key, slots[j])


def _span(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return lo + (hi - lo) * u


def view_decisions(view: ViewSpec, seed: int, epoch: int, indices: np.ndarray, view_id: int) -> dict[str, np.ndarray]:
    """Every non-crop decision of ``view`` for the samples ``indices``, as ``[B]`` arrays.

    Keys: ``flip``, ``jitter``, ``gray``, ``blur``, ``solarize`` (bool: the op applies) and the factors
    ``brightness``, ``contrast``, ``saturation`` (torchvision's ranges ``[max(0, 1-s), 1+s]``, 1 where
    jitter is off), ``hue`` (turns in ``[-hue, hue]``, 0 where off) and ``sigma`` (the blur's, drawn
    whether or not the blur applies).
    """
    idx = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    names = ("flip", "jitter", "brightness", "contrast", "saturation", "hue", "gray", "blur", "sigma", "solarize")
    u = np.empty((idx.shape[0], len(names)), np.float64)
    with np.errstate(over="ignore"):  # the hash wraps modulo 2**64 by design (JIT off: numpy scalars warn)
        draw_uniforms(int(seed), int(epoch), idx, int(view_id), np.array([SLOTS[n] for n in names], np.int64), u)
    d = dict(zip(names, u.T, strict=True))
    js = view.jitter
    jitter = d["jitter"] < (js.p if js is not None else 0.0)
    out = {"flip": d["flip"] < view.flip_p, "jitter": jitter, "gray": d["gray"] < view.gray_p,
           "blur": d["blur"] < view.blur_p, "solarize": d["solarize"] < view.solarize_p,
           "sigma": _span(d["sigma"], *view.blur_sigma)}
    for name in ("brightness", "contrast", "saturation"):
        s = getattr(js, name) if js is not None else 0.0
        out[name] = np.where(jitter, _span(d[name], max(0.0, 1.0 - s), 1.0 + s), 1.0)
    h = js.hue if js is not None else 0.0
    out["hue"] = np.where(jitter, _span(d["hue"], -h, h), 0.0)
    return out


def view_crops(view: ViewSpec, seed: int, epoch: int, indices: np.ndarray, view_id: int, heights: np.ndarray,
               widths: np.ndarray) -> np.ndarray:
    """``[B, 4]`` int64 crop boxes ``(top, left, height, width)`` of ``view`` for samples ``indices`` whose
    stored images are ``heights`` x ``widths``."""
    idx = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    out = np.empty((idx.shape[0], 4), np.int64)
    with np.errstate(over="ignore"):
        crop_boxes(int(seed), int(epoch), idx, int(view_id),
                   np.ascontiguousarray(heights, dtype=np.int64).reshape(-1),
                   np.ascontiguousarray(widths, dtype=np.int64).reshape(-1), float(view.scale[0]),
                   float(view.scale[1]), float(view.ratio[0]), float(view.ratio[1]), out)
    return out
