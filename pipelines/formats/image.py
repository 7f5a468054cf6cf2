"""One source image, opened and decoded once: classified (kept, converted or skipped, with the reason),
converted to RGB and encoded for the record, the tree and the ``.beton``.

A bad file is skipped (empty, not an image, truncated/corrupt, too large) or converted to RGB JPEG
(CMYK, grayscale, palette, PNG or other formats) and the reason recorded in the manifest; 16-bit
images are scaled to 8 bits (``v / 257``, not clipped, :func:`pipelines.folder.to_rgb`). Without
pixels to keep, a JPEG is only entropy-decoded (IDCT at 1/8 scale) to check it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.folder import DECODE_ERRORS, WIDE_MODES, decode_failure, to_rgb

from . import kernels

__all__ = ["Inspection", "encode_png", "inspect_image"]

_JPEG_EXTS = (".jpg", ".jpeg", ".jpe", ".jfif")


@dataclass
class Inspection:
    """What :func:`inspect_image` found: ``status`` is ok, converted or skipped; ``reason`` says why."""

    status: str
    reason: str = ""
    width: int = 0
    height: int = 0
    payload: bytes | None = None  # JPEG bytes for the record (original or re-encoded)
    tree_bytes: bytes | None = None  # bytes for the ImageFolder copy when they differ from the file
    pixels: np.ndarray | None = None  # uint8 [H,W,3] (at the draft scale when resizing), when asked


def _encode_jpeg(image: Any, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _wide_reason(mode: str) -> str:
    what = "16-bit" if mode.startswith("I;16") else ("32-bit float" if mode == "F" else "32-bit integer")
    how = "v / 257" if mode.startswith("I;16") else "16-bit range or min..max"
    return f"{what} grey ({mode}) scaled to 8 bits ({how})"


def _target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    plan = kernels.resize_plan(np.array([width], np.int64), np.array([height], np.int64), max_side)
    return int(plan[0, 0]), int(plan[0, 1])


def inspect_image(path: str, max_side: int = 0, quality: int = 90, want_payload: bool = True,
                  want_pixels: bool = False) -> Inspection:
    """Open ``path`` fully and decide: pass through, convert to RGB JPEG, or skip (never raises).

    Args:
        path: image file.
        max_side: longer side of the record payload; larger images are resized and re-encoded.
        quality: JPEG quality when re-encoding.
        want_payload: produce the record/tree bytes (False = classify only).
        want_pixels: keep the decoded RGB pixels (for the .beton): the one decode serves the check,
            the record and the .beton.
    """
    from PIL import Image

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return Inspection("skipped", f"unreadable: {e.strerror or e}")
    if not data:
        return Inspection("skipped", "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode = img.format or "unknown", img.mode
            width, height = img.size
            reasons = []
            if fmt != "JPEG":
                ext = Path(path).suffix.lower()
                reasons.append(f"{fmt} data in a '{ext}' file" if ext in _JPEG_EXTS else f"{fmt} image")
            if mode in WIDE_MODES:
                reasons.append(_wide_reason(mode))
            elif mode != "RGB":
                reasons.append(f"{mode} colour mode")
            status = "converted" if reasons else "ok"
            target = _target_size(width, height, max_side)
            if fmt == "JPEG":
                # Every byte is still entropy-decoded (truncation and corruption are caught), but the
                # IDCT runs only at the scale we need: 1/8 when the pixels are not used at all.
                passthrough = not reasons and target == (width, height)
                cheap = not want_pixels and (passthrough or not want_payload)
                img.draft(mode, (max(1, width // 8), max(1, height // 8)) if cheap else target)
            img.load()
            if not (want_payload or want_pixels):
                return Inspection(status, "; ".join(reasons), width, height)
            rgb = to_rgb(img)
            pixels = np.asarray(rgb) if want_pixels else None
            if not want_payload:
                return Inspection(status, "; ".join(reasons), width, height, pixels=pixels)
            tree_bytes = _encode_jpeg(rgb, quality) if reasons else None
            if target != (width, height):
                payload = _encode_jpeg(rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0), quality)
            else:
                payload = tree_bytes if reasons else data
            return Inspection(status, "; ".join(reasons), width, height, payload, tree_bytes, pixels)
    except DECODE_ERRORS as e:
        return Inspection("skipped", decode_failure(e))
