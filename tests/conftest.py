"""Shared fixtures: a tiny real-image ImageFolder tree written to a temp dir, a tree with bad files, a dead pid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_files import jpeg_bytes, png_bytes
from PIL import Image


def write_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: tuple[int, int] = (40, 36),
                       seed: int = 0, ext: str = "png") -> Path:
    """Smooth random colour fields (plus noise) per class; each class has its own mean colour."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(1234).uniform(40, 215, size=(classes, 3))  # same class colours in every split
    for c in range(classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        base = palette[c]
        for i in range(per_class):
            h, w = size
            yy, xx = np.mgrid[0:h, 0:w]
            field = base + 40 * np.sin(xx / rng.uniform(3, 9) + rng.uniform(0, 6))[..., None] \
                * np.array([1, -1, 0.5]) + rng.normal(0, 12, (h, w, 3))
            Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(d / f"{i:03d}.{ext}")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """data dir with train/ (3 classes x 8) and val/ (3 classes x 4) ImageFolder trees."""
    root = tmp_path_factory.mktemp("imgdata")
    write_image_folder(root / "train", per_class=8, seed=0)
    write_image_folder(root / "val", per_class=4, seed=1)
    return root


@pytest.fixture()
def bad_tree(tmp_path) -> Path:
    """train/ with 2 classes x 6 good PNGs, plus a zero-byte, a truncated and a random-bytes file, and a
    valid image whose name is not UTF-8."""
    for c in range(2):
        d = tmp_path / "train" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(6):
            (d / f"{i}.png").write_bytes(png_bytes(10 * c + i))
    (tmp_path / "train" / "c0" / "empty.jpg").write_bytes(b"")
    (tmp_path / "train" / "c0" / "truncated.jpg").write_bytes(jpeg_bytes(99)[:200])
    (tmp_path / "train" / "c1" / "noise.png").write_bytes(np.random.default_rng(5).bytes(500))
    with open(os.path.join(os.fsencode(tmp_path / "train" / "c1"), b"caf\xe9.png"), "wb") as f:
        f.write(png_bytes(77))
    return tmp_path


@pytest.fixture()
def dead_pid() -> int:
    """The pid of a process that has exited (what a killed run leaves in its lock or temp-file names)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread per test: on 2 shared cores, oversubscribed threads made small steps ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
