"""pipelines/ffcv.py on a tiny .beton written here with FFCV's own writer.

Each image is a left-to-right red ramp (so flips show) with a flat green level = its label (so the
views and the label of a sample can be checked to come from the same stored image). The same images
as an ImageFolder tree feed the torchvision reference for the parity test. Two loaders (rank 0 and 1
of 2; gpu_augment's CPU kernel on one, its batched tensor ops on the other) serve all tests, because
every FFCV loader pays a JIT compile. SPEC has two views of one size (decoded once, cropped twice)
and one of another size (its own decoder). A .beton with a corrupt JPEG record checks that it is counted,
named and never trained on.
"""

from __future__ import annotations

import gc
import importlib
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from data_files import loader_cfg
from PIL import Image

pytest.importorskip("ffcv", reason="FFCV is not installed (the [ffcv] extra)")
# FFCV recompiles its module-level Numba helpers for every decoder; when the duplicates are collected
# Numba's dispatcher finaliser raises a harmless KeyError that pytest would report as a warning.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

from pipelines import Loader, build_loader  # noqa: E402
from pipelines.spec import ColorJitterSpec, MultiCropSpec, ViewSpec, get_recipe  # noqa: E402

N, H, W = 24, 20, 28
EPOCHS = 16
SPEC = MultiCropSpec(
    weak=ViewSpec("weak", size=16, scale=(0.5, 1.0)),
    strong=(
        ViewSpec("plain", size=12, scale=(0.5, 1.0)),
        ViewSpec("strong", size=16, scale=(0.5, 1.0), jitter=ColorJitterSpec(p=0.8), gray_p=0.3, blur_p=0.5,
                 blur_kernel=3),
    ),
)


def _image(label: int) -> np.ndarray:
    img = np.empty((H, W, 3), np.uint8)
    img[..., 0] = (20 + 7 * np.arange(W)).astype(np.uint8)[None, :]
    img[..., 1] = 10 * label + 5
    img[..., 2] = 128
    return img


class _Images:
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return _image(i), i


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    root = tmp_path_factory.mktemp("ffcvdata")
    for i in range(N):
        (root / "train" / f"c{i:02d}").mkdir(parents=True)
        Image.fromarray(_image(i)).save(root / "train" / f"c{i:02d}" / "0.png")
    writer = DatasetWriter(str(root / "train.beton"), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                           num_workers=1)
    writer.from_indexed_dataset(_Images())
    return root


def _cfg(data: Path, **kw) -> SimpleNamespace:
    base = dict(data=str(data), recipe="stl96", batch_size=8, num_workers=1, seed=3, channels_last=True)
    return SimpleNamespace(**{**base, **kw})


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(SPEC.mean).view(1, 3, 1, 1)
    std = torch.tensor(SPEC.std).view(1, 3, 1, 1)
    return x.float() * std + mean


def _collect(loader: Loader, epochs: int) -> dict[str, torch.Tensor]:
    views: dict[str, list[torch.Tensor]] = {v.name: [] for v in SPEC.views}
    labels = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            for v, x in zip(SPEC.views, [batch.weak, *batch.strong], strict=True):
                views[v.name].append(x)
            labels.append(batch.label)
    return {**{k: torch.cat(v) for k, v in views.items()}, "label": torch.cat(labels)}


@pytest.fixture(scope="module")
def runs(data) -> dict[int, dict[str, torch.Tensor]]:
    """Rank 0 (held on the device, Numba colour kernel) and rank 1 (FFCV's threads crop, batched torch ops)
    of 2, EPOCHS epochs each."""
    out = {}
    from pipelines.ffcv import build_ffcv_loader

    for rank in (0, 1):
        if rank == 0:  # through the package's dispatch: raw 20x28 images, cropped by the resident loader
            loader = build_loader(_cfg(data), "ffcv", spec=SPEC, rank=rank, world_size=2)
        else:  # gpu_augment's batched tensor ops, the accelerator path, here on the CPU
            loader = build_ffcv_loader(_cfg(data), SPEC, split="train", device=torch.device("cpu"), rank=rank,
                                       world_size=2, augment_impl="torch", resident=False)
        assert isinstance(loader, Loader) and loader.batch_size == 4 and len(loader) == 3
        out[rank] = _collect(loader, EPOCHS)
        out[rank]["loader"] = loader
    return out


def test_beton_corrupt_jpeg_is_counted_reported_and_never_trained(tmp_path, caplog):
    from pipelines.ffcv import build_ffcv_loader
    from pipelines.formats.beton import write_beton
    from pipelines.samples import BetonSamples

    spec = get_recipe("cifar32")
    rng = np.random.default_rng(0)
    items = [(rng.integers(60, 200, (24, 24, 3), dtype=np.uint8), i % 2) for i in range(12)]
    write_beton(tmp_path / "train.beton", items, mode="jpg")
    samples = BetonSamples(tmp_path / "train.beton")
    assert all(samples.is_jpeg(i) for i in range(len(samples)))
    ptr = int(samples.meta["data_ptr"][5])
    raw = bytearray((tmp_path / "train.beton").read_bytes())
    raw[ptr : ptr + 64] = bytes(64)  # record 5's JPEG header: FFCV would decode it to a black image
    (tmp_path / "train.beton").write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        loader = build_ffcv_loader(loader_cfg(tmp_path, num_threads=1), spec, split="train", device=torch.device("cpu"),
                                   rank=0, world_size=1)
    assert loader.bad_files == 1 and f"record 5 of {tmp_path / 'train.beton'}" in caplog.text
    seen = 0
    for b in loader:
        pixels = b.weak * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)
        assert float(pixels.amax(dim=(1, 2, 3)).min()) > 0.1, "an all-black image was trained on"
        seen += len(b.label)
    assert seen == 8  # 11 good records: 2 whole batches of 4
    # Free this loader's compiled FFCV helpers before the shared loaders (``runs``) compile theirs: with two
    # live copies of one helper, Numba's finaliser raises its harmless KeyError at interpreter exit, where the
    # filter above does not reach. So this test comes first in the file.
    del loader, b
    gc.collect()


def test_batches_shapes_dtype_layout(runs):
    for r in runs.values():
        n = EPOCHS * 12
        assert r["weak"].shape == (n, 3, 16, 16) and r["plain"].shape == (n, 3, 12, 12)
        assert r["strong"].shape == (n, 3, 16, 16)
        assert r["weak"].dtype == torch.float32 and r["label"].dtype == torch.int64
        loader = r["loader"]
        batch = next(iter(loader))
        assert batch.weak.is_contiguous(memory_format=torch.channels_last)


def test_views_and_label_come_from_the_same_stored_image(runs):
    for r in runs.values():
        want = (10 * r["label"] + 5).float() / 255
        for name in ("weak", "plain"):
            green = _unnormalise(r[name])[:, 1]
            torch.testing.assert_close(green.mean(dim=(1, 2)), want, atol=1.5 / 255, rtol=0)
            assert (green.amax(dim=(1, 2)) - green.amin(dim=(1, 2))).max() < 1.5 / 255


def test_two_ranks_cover_each_sample_once_per_epoch(runs):
    per_epoch = [r["label"].view(EPOCHS, 12) for r in (runs[0], runs[1])]
    for e in range(EPOCHS):
        both = torch.cat([per_epoch[0][e], per_epoch[1][e]])
        assert sorted(both.tolist()) == list(range(N)), f"epoch {e}: {both.tolist()}"
    assert not torch.equal(per_epoch[0][0], per_epoch[0][1]), "epochs should be shuffled differently"


def _flip_rate(x: torch.Tensor) -> float:
    red = _unnormalise(x)[:, 0].mean(dim=1)  # [n, w] column means of the red ramp
    return (red[:, 0] > red[:, -1]).float().mean().item()


def _gray_rate(x: torch.Tensor) -> float:
    u = _unnormalise(x)
    return ((u[:, 0] - u[:, 1]).abs().amax(dim=(1, 2)) < 2e-3).float().mean().item()


def test_flip_and_grayscale_rates(runs):
    n = EPOCHS * 12
    for r in runs.values():
        for name, p, rate in (("weak", 0.5, _flip_rate(r["weak"])), ("plain", 0.5, _flip_rate(r["plain"])),
                              ("strong", 0.3, _gray_rate(r["strong"]))):
            assert abs(rate - p) < 4 * (p * (1 - p) / n) ** 0.5, (name, rate, p)
        assert _gray_rate(r["weak"]) == 0.0


def test_parity_with_torchvision_reference(data, runs):
    """Same images, same recipe: per-view shapes, dtype, per-channel mean / std within tolerance.

    The two ranks together see every image once per epoch, as the reference does, so the label mix
    (which drives the green channel) is the same on both sides and only crops and colours differ.
    """
    ref = build_loader(_cfg(data, num_workers=0, channels_last=False), "torchvision", spec=SPEC)
    tv = _collect(ref, EPOCHS)
    for v in SPEC.views:
        a, b = torch.cat([runs[0][v.name], runs[1][v.name]]), tv[v.name]
        assert a.shape == b.shape and a.dtype == b.dtype
        ma, mb = a.mean(dim=(0, 2, 3)), b.mean(dim=(0, 2, 3))
        sa, sb = a.std(dim=(0, 2, 3)), b.std(dim=(0, 2, 3))
        assert (ma - mb).abs().max() < 0.12, (v.name, ma, mb)
        assert ((sa - sb).abs() <= 0.15 * sb + 0.03).all(), (v.name, sa, sb)
    assert abs(_gray_rate(tv["strong"]) - 0.3) < 0.1


def test_set_epoch_resumes_mid_epoch(runs):
    loader = runs[0]["loader"]
    loader.set_epoch(5)
    full = [b.label for b in loader]
    loader.set_epoch(5, start_batch=1)
    tail = [b.label for b in loader]
    assert len(tail) == len(full) - 1
    assert torch.equal(torch.cat(tail), torch.cat(full[1:]))


def test_bad_options_fail_before_reading(data, tmp_path):
    from pipelines.ffcv import build_ffcv_loader

    cpu = torch.device("cpu")
    with pytest.raises(FileNotFoundError, match="train.beton"):
        build_ffcv_loader(_cfg(tmp_path), SPEC, split="train", device=cpu, rank=0, world_size=1)
    with pytest.raises(ValueError, match="quasi_random"):
        build_ffcv_loader(_cfg(data, ffcv_order="quasi_random"), SPEC, split="train", device=cpu, rank=0,
                          world_size=2)
    with pytest.raises(ValueError, match="ffcv_order must be one of"):
        build_ffcv_loader(_cfg(data, ffcv_order="shuffled"), SPEC, split="train", device=cpu, rank=0, world_size=1)
    with pytest.raises(ValueError, match="rank"):
        build_ffcv_loader(_cfg(data), SPEC, split="train", device=cpu, rank=2, world_size=2)
    with pytest.raises(ValueError, match="augment_impl"):
        build_ffcv_loader(_cfg(data), SPEC, split="train", device=cpu, rank=0, world_size=1, augment_impl="cuda")
    with pytest.raises(ValueError, match="batches_ahead"):
        build_ffcv_loader(_cfg(data, ffcv_batches_ahead=0), SPEC, split="train", device=cpu, rank=0, world_size=1)
    with pytest.raises(ValueError, match="too few"):
        build_ffcv_loader(_cfg(data, batch_size=64), SPEC, split="train", device=cpu, rank=0, world_size=2)
    (tmp_path / "junk.beton").write_bytes(b"not a beton")
    with pytest.raises(ValueError, match="junk.beton"):
        build_ffcv_loader(_cfg(tmp_path), SPEC, split="junk", device=cpu, rank=0, world_size=1)


def test_wrong_fields_are_named(tmp_path):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from pipelines.ffcv import build_ffcv_loader

    DatasetWriter(str(tmp_path / "train.beton"), {"picture": RGBImageField(), "label": IntField()},
                  num_workers=1).from_indexed_dataset(_Images())
    with pytest.raises(ValueError, match="needs field 'image' of type RGBImageField.*picture"):
        build_ffcv_loader(_cfg(tmp_path), SPEC, split="train", device=torch.device("cpu"), rank=0, world_size=1)


def test_missing_ffcv_names_the_extra_and_debian_packages(monkeypatch):
    for name in [m for m in sys.modules if m == "ffcv" or m.startswith("ffcv.") or m == "pipelines.ffcv"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ffcv", None)
    with pytest.raises(ImportError, match=r"\[ffcv\].*libturbojpeg0-dev libopencv-dev pkg-config"):
        importlib.import_module("pipelines.ffcv")


def test_multicrop_decoder_checks_its_arguments():
    from pipelines.ffcv import MultiCropDecoder

    with pytest.raises(ValueError, match="one \\(scale, ratio, view id\\) per crop"):
        MultiCropDecoder(16, [(0.2, 1.0)], [], [0], seed=0, epoch_cell=0)
    with pytest.raises(ValueError, match="one \\(scale, ratio, view id\\) per crop"):
        MultiCropDecoder(16, [(0.2, 1.0)], [(0.75, 1.33)], [0, 1], seed=0, epoch_cell=0)
    with pytest.raises(ValueError, match="size > 0"):
        MultiCropDecoder(0, [(0.2, 1.0)], [(0.75, 1.33)], [0], seed=0, epoch_cell=0)


@pytest.mark.cuda
def test_cuda_batches_land_on_the_device(data):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA path differs only by ToDevice and gpu_augment's torch ops")
    loader = build_loader(_cfg(data), "ffcv", spec=SPEC, device="cuda", rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch.weak.device.type == "cuda" and batch.label.device.type == "cuda"
    assert batch.strong[1].shape == (8, 3, 16, 16) and batch.weak.is_contiguous(memory_format=torch.channels_last)
