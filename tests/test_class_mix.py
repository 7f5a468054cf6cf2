"""Class-mixed batches on every backend x format, from a class-sorted source (2 ranks, 2 epochs).

The stored order is the worst case: all images of class 0, then all of class 1, ... (a tree is read
in that order, and converters that do not shuffle write .rec / .beton that way). Every backend must
still deal each rank batches as mixed as independent sampling would (>= 0.9 x its expectation), show
every rank every class every epoch, and change the order between epochs.
"""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines
from pipelines import build_loader

CLASSES, PER_CLASS, SIDE = 10, 16, 8
PER_RANK, WORLD = 16, 2  # 16 images per rank per step, 2 ranks: a global batch of 32
IID = CLASSES * (1 - (1 - 1 / CLASSES) ** PER_RANK)  # expected distinct classes in 16 i.i.d. draws: 8.15


def _images() -> list[tuple[np.ndarray, int]]:
    """Class-sorted (image, label) pairs: class c's images are a flat colour plus noise."""
    rng = np.random.default_rng(0)
    out = []
    for c in range(CLASSES):
        for _ in range(PER_CLASS):
            img = np.clip(rng.normal(20 + 20 * c, 8, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
            out.append((img, c))
    return out


@pytest.fixture(scope="module")
def sorted_data(tmp_path_factory) -> Path:
    """One class-sorted dataset in every layout: train/ tree, train.rec + .idx, train.beton."""
    root = tmp_path_factory.mktemp("classmix")
    items = _images()
    encoded = []
    for i, (img, c) in enumerate(items):
        d = root / "train" / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        (d / f"{i:04d}.png").write_bytes(buf.getvalue())
        encoded.append((buf.getvalue(), c))
    from pipelines.formats.recordio import write_recordio

    write_recordio(root / "train.rec", root / "train.idx", encoded)
    if pipelines.available_backends()["ffcv"]:
        from pipelines.formats.beton import write_beton

        write_beton(root / "train.beton", items, mode="raw")
    return root


def _only(data: Path, fmt: str, tmp_path: Path) -> Path:
    """A view of ``data`` holding only ``fmt`` (symlinks), so each backend reads the format under test."""
    names = {"tree": ["train"], "rec": ["train.rec", "train.idx"], "beton": ["train.beton"]}[fmt]
    for n in names:
        (tmp_path / n).symlink_to(data / n)
    return tmp_path


CASES = [("torchvision", "tree"), ("dali", "tree"), ("dali", "rec"), ("ffcv", "beton")]


def class_mix(data: Path, backend: str, epochs: int = 2) -> dict:
    """Labels per batch for each (epoch, rank): the figures the test and the README report."""
    cfg = SimpleNamespace(data=str(data), recipe="cifar32", batch_size=PER_RANK * WORLD, num_workers=0, seed=0,
                          channels_last=False)
    labels: dict[tuple[int, int], list[list[int]]] = {}
    for rank in range(WORLD):
        loader = build_loader(cfg, backend, rank=rank, world_size=WORLD)
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            labels[epoch, rank] = [b.label.tolist() for b in loader]
    per_batch = [len(set(b)) for bs in labels.values() for b in bs]
    return {"labels": labels, "classes_per_batch": float(np.mean(per_batch))}


@pytest.mark.parametrize("backend,fmt", CASES, ids=[f"{b}-{f}" for b, f in CASES])
def test_batches_are_class_mixed(sorted_data, tmp_path, backend, fmt):
    if not pipelines.available_backends()[backend]:
        pytest.skip(f"the {backend} backend is not installed")
    torch.manual_seed(0)
    got = class_mix(_only(sorted_data, fmt, tmp_path), backend)
    labels = got["labels"]
    assert got["classes_per_batch"] >= 0.9 * IID, (got["classes_per_batch"], IID)
    for (epoch, rank), batches in labels.items():
        assert len(batches) == CLASSES * PER_CLASS // WORLD // PER_RANK
        assert set(sum(batches, [])) == set(range(CLASSES)), f"rank {rank} misses classes in epoch {epoch}"
    for rank in range(WORLD):
        assert labels[0, rank] != labels[1, rank], f"rank {rank}: epoch 1 repeats epoch 0's order"
    for epoch in range(2):  # the two ranks together see each image at most once per epoch: labels add up
        counts = np.bincount(sum(labels[epoch, 0] + labels[epoch, 1], []), minlength=CLASSES)
        assert counts.sum() == CLASSES * PER_CLASS and (counts == PER_CLASS).all(), counts
