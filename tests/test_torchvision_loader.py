"""Reference torchvision backend: shapes, normalisation, op rates, sharding, resume, bad files."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import Batch, build_loader, resolve_backend
from pipelines.eval import build_eval_loader
from pipelines.folder import ImageFolderFiles
from pipelines.spec import ColorJitterSpec, TwoViewSpec, ViewSpec, get_recipe


def cfg(data, **kw):
    base = dict(data=str(data), recipe="cifar32", batch_size=8, num_workers=0, seed=0, channels_last=False)
    return SimpleNamespace(**{**base, **kw})


def test_batch_shapes_dtype_and_normalisation(image_folder):
    loader = build_loader(cfg(image_folder), "torchvision")
    assert len(loader) == 24 // 8 and loader.batch_size == 8
    batches = list(loader)
    assert len(batches) == 3
    b = batches[0]
    assert isinstance(b, Batch)
    assert b.weak.shape == (8, 3, 32, 32) and b.weak.dtype == torch.float32
    assert len(b.strong) == 1 and b.strong[0].shape == (8, 3, 32, 32)
    assert b.label.dtype == torch.int64
    # normalised: values span beyond [0, 1] and the mean is near 0 for mid-grey-ish images
    allw = torch.cat([x.weak for x in batches])
    assert allw.min() < -0.5 and allw.max() > 0.5 and allw.mean().abs() < 1.0
    labels = torch.cat([x.label for x in batches])
    assert sorted(labels.tolist()) == sorted([0] * 8 + [1] * 8 + [2] * 8)  # each sample once per epoch


def test_channels_last(image_folder):
    b = next(iter(build_loader(cfg(image_folder, channels_last=True), "torchvision")))
    assert b.weak.is_contiguous(memory_format=torch.channels_last)


def _halves_folder(root, n=6):
    """Left half dark red, right half bright green: flips and grayscale are visible in the output."""
    d = root / "train" / "a"
    d.mkdir(parents=True)
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :16] = (120, 10, 10)
    img[:, 16:] = (20, 230, 40)
    for i in range(n):
        Image.fromarray(img).save(d / f"{i}.png")
    return root


def test_flip_and_grayscale_rates(tmp_path):
    data = _halves_folder(tmp_path)
    view = ViewSpec("strong", 32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.5, gray_p=0.2,
                    jitter=ColorJitterSpec(p=0.0))
    spec = TwoViewSpec(weak=ViewSpec("weak", 32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0), strong=(view,))
    loader = build_loader(cfg(data, batch_size=6), "torchvision", spec=spec)
    flips, grays, n = 0, 0, 0
    for epoch in range(80):
        loader.set_epoch(epoch)
        for b in loader:
            s = b.strong[0]
            left, right = s[:, :, :, :16].mean(dim=(1, 2, 3)), s[:, :, :, 16:].mean(dim=(1, 2, 3))
            flips += int((left > right).sum())  # green (bright) half moved left
            px = s * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)
            grays += int(((px[:, 0] - px[:, 1]).abs() + (px[:, 1] - px[:, 2]).abs()).amax(dim=(1, 2)).lt(3 / 255).sum())
            n += s.shape[0]
            assert (b.weak[:, :, :, :16].mean() < b.weak[:, :, :, 16:].mean())  # weak view never flipped
    assert n == 480
    assert abs(flips / n - 0.5) < 0.08
    assert abs(grays / n - 0.2) < 0.06


def test_same_seed_same_batches_and_resume_position(image_folder):
    c = cfg(image_folder)
    a = build_loader(c, "torchvision")
    a.set_epoch(3)
    full = list(a)
    b = build_loader(c, "torchvision")
    b.set_epoch(3, start_batch=1)
    resumed = list(b)
    assert len(resumed) == 2
    for x, y in zip(full[1:], resumed):
        assert torch.equal(x.weak, y.weak) and torch.equal(x.strong[0], y.strong[0])
    a.set_epoch(4)
    assert not torch.equal(next(iter(a)).weak, full[0].weak)  # a new epoch reshuffles


def test_two_shards_cover_the_epoch_once(image_folder):
    c = cfg(image_folder, batch_size=8)
    seen = []
    for rank in range(2):
        loader = build_loader(c, "torchvision", rank=rank, world_size=2)
        assert loader.batch_size == 4
        seen += [int(x) for b in loader for x in b.label]
    files = ImageFolderFiles(image_folder / "train")
    assert sorted(seen) == sorted(label for _, label in files.samples)


def test_bad_files_are_counted_and_skipped(tmp_path, image_folder, caplog):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(image_folder / "train", data / "train")
    bad = data / "train" / "class_00"
    (bad / "zero.png").write_bytes(b"")
    (bad / "trunc.png").write_bytes((bad / "000.png").read_bytes()[:60])
    (bad / "text.jpg").write_text("not an image")
    Image.new("CMYK", (40, 36), (10, 200, 30, 0)).save(bad / "cmyk.jpg")
    Image.new("L", (40, 36), 128).save(bad / "gray.png")
    loader = build_loader(cfg(data, batch_size=7), "torchvision")
    with caplog.at_level("WARNING"):
        batches = list(loader)
    assert sum(b.weak.shape[0] for b in batches) == 7 * (29 // 7)
    assert loader.bad_files >= 1  # zero / truncated / text files are skipped; CMYK and grey convert
    assert any("zero.png" in r.message or "trunc.png" in r.message or "text.jpg" in r.message
               for r in caplog.records)


def test_eval_loader_order_and_shapes(image_folder):
    spec = get_recipe("cifar32")
    ev = build_eval_loader(image_folder, "val", 32, spec.mean, spec.std, batch_size=5, num_workers=0)
    out = list(ev)
    labels = torch.cat([y for _, y in out])
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # file order, every sample once
    assert out[0][0].shape == (5, 3, 32, 32)


def test_missing_data_fails_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_backend(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="expected train/"):
        resolve_backend(tmp_path)
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend(tmp_path, "tensorflow")
