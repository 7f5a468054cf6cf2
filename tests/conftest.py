"""Shared fixtures: a tiny real-image ImageFolder tree written to a temp dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
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


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread per test: on 2 shared cores, oversubscribed threads made small steps ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
