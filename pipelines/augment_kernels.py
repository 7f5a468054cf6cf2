"""Numba kernels of :mod:`pipelines.gpu_augment`'s CPU path: a whole view per uint8 sample in one pass.

:func:`augment_sample` flips, colour-jitters, greys, blurs, solarizes and normalises one ``[H,W,3]``
uint8 sample into float32, row by row over planar float32 copies, so every inner loop is branch-free
and vectorised by LLVM; :func:`augment_range` runs it over one thread's share of a batch. They release
the GIL (``nogil``), so :mod:`~pipelines.gpu_augment` splits a batch over plain threads and never
enters Numba's parallel layer, which must not be entered from two threads (e.g. beside FFCV's).

They share the JIT switch of every kernel in ``pipelines`` (:mod:`pipelines.formats.kernels`:
``RESSL_NUMBA_JIT=0`` or ``set_jit_enabled(False)`` runs them as plain Python, for debugging).
"""

from __future__ import annotations

import math

import numpy as np

from .formats.kernels import kernel

__all__ = ["augment_range", "augment_sample"]

# LLVM fast-math flags without "reassoc" (and "contract"/"afn"): reassociation let a freshly compiled kernel
# and the same kernel loaded from Numba's cache round differently (measured: another strong view on a
# machine's first run than on its later runs). These three keep the vectorised min/max loops as fast
# (measured the same images/s as fastmath=True at 32 and 224 px) and the results bit-identical.
FAST = {"nnan", "ninf", "nsz"}




@kernel(fastmath=FAST)
def _reflect(i: int, n: int) -> int:
    if i < 0:
        return -i
    if i >= n:
        return 2 * n - 2 - i
    return i


@kernel(fastmath=FAST)
def _blur_rows(img, out, weights, half, rad):
    """Separable blur of ``[H, W*3]`` float32 rows with reflect padding; taps beyond ``rad`` skipped.

    Both passes run over contiguous rows (the horizontal one on a reflect-padded copy of each row)
    so LLVM vectorises the inner loops.
    """
    h, w3 = img.shape
    w = w3 // 3
    row = np.empty(w3, np.float32)
    padded = np.empty((w + 2 * rad) * 3, np.float32)
    for y in range(h):
        row[:] = 0.0
        for j in range(-rad, rad + 1):
            src = img[_reflect(y + j, h)]
            wt = weights[half + j]
            for q in range(w3):
                row[q] += wt * src[q]
        padded[rad * 3:(rad + w) * 3] = row
        for x in range(rad):
            for c in range(3):
                padded[(rad - 1 - x) * 3 + c] = row[(x + 1) * 3 + c]
                padded[(rad + w + x) * 3 + c] = row[(w - 2 - x) * 3 + c]
        dst = out[y]
        dst[:] = 0.0
        for j in range(2 * rad + 1):
            wt = weights[half - rad + j]
            off = j * 3
            for q in range(w3):
                dst[q] += wt * padded[off + q]


@kernel(fastmath=FAST)
def _jitter_row(r, g, b, bri, con, mean, sat, shift6):
    """Brightness -> contrast -> saturation -> hue on one row of planar float32 pixels, in place.

    Branch-free loops over contiguous rows (LLVM vectorises them). Hue: max and chroma are kept by
    a hue rotation, so each channel is ``max - chroma * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6h') mod 6``, ``n = 5, 3, 1`` for R, G, B — torchvision's HSV round trip in one step.
    """
    f32 = np.float32
    one, zero = f32(1.0), f32(0.0)
    lr, lg, lb = f32(0.2989), f32(0.587), f32(0.114)
    w = r.shape[0]
    for x in range(w):
        rr = min(max(con * min(r[x] * bri, one) + mean, zero), one)
        gg = min(max(con * min(g[x] * bri, one) + mean, zero), one)
        bb = min(max(con * min(b[x] * bri, one) + mean, zero), one)
        lum = (one - sat) * (lr * rr + lg * gg + lb * bb)
        r[x] = min(max(sat * rr + lum, zero), one)
        g[x] = min(max(sat * gg + lum, zero), one)
        b[x] = min(max(sat * bb + lum, zero), one)
    if shift6 == zero:
        return
    sixth = f32(1.0 / 6.0)
    for x in range(w):
        rr, gg, bb = r[x], g[x], b[x]
        vmax = max(rr, gg, bb)
        chroma = vmax - min(rr, gg, bb)
        is_r = vmax == rr
        is_g = vmax == gg
        num = gg - bb if is_r else (bb - rr if is_g else rr - gg)
        off = zero if is_r else (f32(2.0) if is_g else f32(4.0))
        h6 = off + num / max(chroma, f32(1e-12)) + shift6
        kr = h6 + f32(5.0)
        kg = h6 + f32(3.0)
        kb = h6 + f32(1.0)
        kr -= f32(6.0) * math.floor(kr * sixth)
        kg -= f32(6.0) * math.floor(kg * sixth)
        kb -= f32(6.0) * math.floor(kb * sixth)
        r[x] = vmax - chroma * min(max(min(kr, f32(4.0) - kr), zero), one)
        g[x] = vmax - chroma * min(max(min(kg, f32(4.0) - kg), zero), one)
        b[x] = vmax - chroma * min(max(min(kb, f32(4.0) - kb), zero), one)


@kernel(fastmath=FAST)
def augment_sample(src, out, flip, jitter, bri, con, sat, hue, gray, sigma, ksize, sol, thr, mul, add):
    """Flip, jitter (brightness -> contrast -> saturation -> hue), grayscale, blur, solarize and
    normalise one C-contiguous ``[H,W,3]`` uint8 sample into float32 ``out``; flags skip ops.

    Works row by row on planar float32 copies so every loop is branch-free and vectorised. The blur
    uses torchvision's normalised ``ksize`` window but only the taps within 4 sigma (the rest weigh
    < 1e-4 in total, far below 1/255), with reflect padding.
    """
    f32 = np.float32
    h, w = src.shape[0], src.shape[1]
    one, zero = f32(1.0), f32(0.0)
    inv = f32(1.0 / 255.0)
    lr, lg, lb = f32(0.2989), f32(0.587), f32(0.114)
    bri, con, sat, thr = f32(bri), f32(con), f32(sat), f32(thr)
    shift6 = f32(6.0 * hue)
    m0, m1, m2, a0, a1, a2 = f32(mul[0]), f32(mul[1]), f32(mul[2]), f32(add[0]), f32(add[1]), f32(add[2])
    mean = zero
    if jitter:
        acc = 0.0
        binv = inv * bri
        for y in range(h):
            rowsum = zero
            for x in range(w):
                rowsum += (lr * min(f32(src[y, x, 0]) * binv, one) + lg * min(f32(src[y, x, 1]) * binv, one)
                           + lb * min(f32(src[y, x, 2]) * binv, one))
            acc += rowsum
        mean = f32(acc / (h * w)) * (one - con)
    blur = sigma > 0.0
    tmp = np.empty((h, w, 3), np.float32) if blur else out
    r = np.empty(w, np.float32)
    g = np.empty(w, np.float32)
    b = np.empty(w, np.float32)
    for y in range(h):
        if flip:
            for x in range(w):
                r[x] = f32(src[y, w - 1 - x, 0]) * inv
                g[x] = f32(src[y, w - 1 - x, 1]) * inv
                b[x] = f32(src[y, w - 1 - x, 2]) * inv
        else:
            for x in range(w):
                r[x] = f32(src[y, x, 0]) * inv
                g[x] = f32(src[y, x, 1]) * inv
                b[x] = f32(src[y, x, 2]) * inv
        if jitter:
            _jitter_row(r, g, b, bri, con, mean, sat, shift6)
        if gray:
            for x in range(w):
                r[x] = lr * r[x] + lg * g[x] + lb * b[x]
            g[:] = r
            b[:] = r
        dst = tmp[y]
        if blur:
            for x in range(w):
                dst[x, 0] = r[x]
                dst[x, 1] = g[x]
                dst[x, 2] = b[x]
        else:
            if sol:
                for x in range(w):
                    r[x] = one - r[x] if r[x] >= thr else r[x]
                    g[x] = one - g[x] if g[x] >= thr else g[x]
                    b[x] = one - b[x] if b[x] >= thr else b[x]
            for x in range(w):
                dst[x, 0] = r[x] * m0 + a0
                dst[x, 1] = g[x] * m1 + a1
                dst[x, 2] = b[x] * m2 + a2
    if not blur:
        return
    half = ksize // 2
    weights = np.empty(ksize, np.float32)
    for j in range(ksize):
        t = (j - half) / sigma
        weights[j] = math.exp(-0.5 * t * t)
    weights /= weights.sum()
    rad = min(half, int(math.ceil(4.0 * sigma)), h - 1, w - 1)
    flat = out.reshape(h, w * 3)
    _blur_rows(tmp.reshape(h, w * 3), flat, weights, half, rad)
    mul3 = np.empty(w * 3, np.float32)
    add3 = np.empty(w * 3, np.float32)
    for x in range(w):
        mul3[3 * x], mul3[3 * x + 1], mul3[3 * x + 2] = m0, m1, m2
        add3[3 * x], add3[3 * x + 1], add3[3 * x + 2] = a0, a1, a2
    for y in range(h):
        row = flat[y]
        if sol:
            for q in range(w * 3):
                row[q] = one - row[q] if row[q] >= thr else row[q]
        for q in range(w * 3):
            row[q] = row[q] * mul3[q] + add3[q]


@kernel(fastmath=FAST)
def augment_range(src, out, lo, hi, flip, jitter, bri, con, sat, hue, gray, sigma, ksize, sol, thr, mul, add):
    """:func:`augment_sample` over samples ``lo:hi`` of ``[B,H,W,3]`` arrays (one thread's share)."""
    for i in range(lo, hi):
        augment_sample(src[i], out[i], flip[i], jitter[i], bri[i], con[i], sat[i], hue[i], gray[i], sigma[i],
                       ksize, sol[i], thr, mul, add)
