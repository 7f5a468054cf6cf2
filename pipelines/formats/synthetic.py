"""Deterministic photo-like JPEGs: the one generator behind the benchmarks' data.

``make_jpeg(index, seed)`` is a pure function of ``(index, seed, GENERATOR_VERSION)``: multi-octave
smooth random colour fields plus per-pixel noise, JPEG-encoded by Pillow at :data:`QUALITY`, about
75 KB at ~500x375 -- close enough to ImageNet photos (~110 KB) that decode cost is realistic, and not
trivially compressible (a flat image would decode several times faster than a photo). The loader
benchmark (``harness/benchdata.py``) caches them as its dataset; the conversion benchmark
(:mod:`.bench`) writes a tree of them with :func:`make_jpeg_tree`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["GENERATOR_VERSION", "QUALITY", "class_dir_name", "make_jpeg", "make_jpeg_tree"]

# Bump when make_jpeg changes, so a cache built by older code is never mistaken for the current one.
GENERATOR_VERSION = 1
QUALITY = 90
_OCTAVES = (2, 4, 8, 16, 32, 64)  # cells across the image width, coarse to fine


def _resize(a: np.ndarray, w: int, h: int, resample: Image.Resampling) -> np.ndarray:
    """Resize a float32 HxWxC array channel by channel with Pillow (mode "F" keeps full precision)."""
    return np.stack([np.asarray(Image.fromarray(a[..., c]).resize((w, h), resample)) for c in range(a.shape[-1])],
                    axis=-1)


def make_jpeg(index: int, seed: int = 0) -> bytes:
    """The JPEG bytes of image ``index``: a pure function of (index, seed, GENERATOR_VERSION).

    Sizes vary around 500x375 (width 400-600, aspect 0.6-0.9, one in five portrait). The colour field
    is summed over octaves at quarter resolution (cheap), upsampled, then given full-resolution noise
    (sigma 12 grey levels) so the JPEG carries high-frequency detail as photos do.
    """
    rng = np.random.default_rng([seed, index, GENERATOR_VERSION])
    w = int(rng.integers(400, 601))
    h = int(round(w * rng.uniform(0.6, 0.9)))
    if rng.random() < 0.2:
        w, h = h, w
    sw, sh = (w + 3) // 4, (h + 3) // 4
    field = np.zeros((sh, sw, 3), np.float32)
    for octave, cells in enumerate(_OCTAVES):
        grid = rng.standard_normal((max(2, cells * h // w), cells, 3), dtype=np.float32)
        field += _resize(grid, sw, sh, Image.Resampling.BICUBIC) * (64.0 / (octave + 1.5))
    img = _resize(field, w, h, Image.Resampling.BILINEAR)
    img += rng.standard_normal(img.shape, dtype=np.float32) * 12.0
    pixels = np.clip(img + 128.0, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="JPEG", quality=QUALITY)
    return buf.getvalue()


def class_dir_name(label: int) -> str:
    """The class folder of label ``label`` in generated trees (``c000``, ``c001``, ...)."""
    return f"c{label:03d}"


def make_jpeg_tree(root: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    """Write ``make_jpeg(i, seed)`` for ``i < n`` as ``root/c{i % classes:03d}/{i:06d}.jpg``; returns ``root``."""
    for i in range(n):
        d = Path(root) / class_dir_name(i % classes)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(make_jpeg(i, seed))
    return Path(root)
