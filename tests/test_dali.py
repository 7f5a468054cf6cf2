"""pipelines/dali.py on the CPU: parity with the torchvision reference, exact per-op checks, sharding, errors,
and bad files or records skipped, counted and named.

Most checks use an "identity" recipe: square images read at their own size with scale = ratio = 1, so
the crop is the whole image and the weak view (no flip) reproduces the stored pixels. Each strong
view can then be compared pixel for pixel with the weak one to tell which ops it received.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from data_files import jpeg_bytes, png_bytes
from PIL import Image
from torchvision.transforms import v2

pytest.importorskip("nvidia.dali")

from pipelines import Batch, build_loader  # noqa: E402
from pipelines.dali import DaliLoader, build_dali_loader, ressl_pipeline  # noqa: E402
from pipelines.formats.recordio import RecordIOError, write_recordio  # noqa: E402
from pipelines.samples import RecordSamples  # noqa: E402
from pipelines.spec import ColorJitterSpec, RecipeSpec, TwoViewSpec, ViewSpec, get_recipe  # noqa: E402
from pipelines.torchvision import build_torchvision_loader  # noqa: E402

SIDE = 16  # identity-recipe image side
CPU = torch.device("cpu")


def cfg(data, **kw) -> SimpleNamespace:
    base = dict(data=str(data), recipe="cifar32", batch_size=8, num_workers=1, seed=0, channels_last=False)
    return SimpleNamespace(**{**base, **kw})


def dali(data, spec: RecipeSpec, rank: int = 0, world_size: int = 1, **kw) -> DaliLoader:
    return build_dali_loader(cfg(data, **kw), spec, split="train", device=CPU, rank=rank, world_size=world_size)


def _noise_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct RGB noise squares (every pixel independent: blur and flips are unmistakable)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def noise_data(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """32 noise PNGs in 2 classes, as an ImageFolder tree; returns (data dir, images [N,H,W,3])."""
    root = tmp_path_factory.mktemp("dali_noise")
    imgs = _noise_images(32)
    for i, img in enumerate(imgs):
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.png")
    return root, np.stack(imgs)


def _identity_spec(**strong) -> TwoViewSpec:
    full = dict(size=SIDE, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    return TwoViewSpec(weak=ViewSpec("weak", flip_p=0.0, **full),
                       strong=(ViewSpec("strong", **{"flip_p": 0.0, **full, **strong}),))


def _pixels(x: torch.Tensor, spec: RecipeSpec) -> torch.Tensor:
    """Normalised [B,3,H,W] back to 0..255 floats."""
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    return x.float() * std + mean


def _pairs(loader: DaliLoader, spec: RecipeSpec, epochs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weak, strong) pixels over ``epochs`` epochs."""
    weak, strong = [], []
    for e in range(epochs):
        loader.set_epoch(e)
        for b in loader:
            weak.append(_pixels(b.weak, spec))
            strong.append(_pixels(b.strong[0], spec))
    return torch.cat(weak), torch.cat(strong)


def _match(weak: torch.Tensor, images: np.ndarray) -> list[int]:
    """Index of the stored image each weak view reproduces (asserting that it does)."""
    ref = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    d = (weak[:, None] - ref[None]).abs().amax(dim=(2, 3, 4))
    best = d.argmin(dim=1)
    assert float(d.min(dim=1).values.max()) <= 1.0, "weak identity view does not reproduce a stored image"
    return best.tolist()


def test_missing_dali_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    path = Path(__file__).parents[1] / "pipelines" / "dali.py"
    mod_spec = importlib.util.spec_from_file_location("pipelines._dali_without_dali", path)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[dali\]'"):
        mod_spec.loader.exec_module(importlib.util.module_from_spec(mod_spec))


def test_parity_with_torchvision_reference(image_folder):
    """Same files, same order, same recipe at 32 px (blur included): shapes, dtype, labels, statistics."""
    spec = get_recipe("imagenet224").with_size(32)
    c = cfg(image_folder, batch_size=8, num_workers=0)
    ref = build_torchvision_loader(c, spec, split="train", device=CPU, rank=0, world_size=1)
    ours = build_loader(cfg(image_folder, batch_size=8), "dali", spec=spec)
    assert isinstance(ours, DaliLoader) and len(ours) == len(ref) == 3 and ours.batch_size == 8
    stats = {"ref": [], "dali": []}
    for epoch in range(6):  # 144 samples: the mean of the random brightness factor is known to ~2%
        for name, loader in (("ref", ref), ("dali", ours)):
            loader.set_epoch(epoch)
            stats[name].append(list(loader))
    for bs_ref, bs_dali in zip(stats["ref"], stats["dali"]):
        for a, b in zip(bs_ref, bs_dali):
            assert isinstance(b, Batch)
            assert b.weak.shape == a.weak.shape == (8, 3, 32, 32) and b.weak.dtype == a.weak.dtype == torch.float32
            assert [s.shape for s in b.strong] == [s.shape for s in a.strong]
            assert b.label.dtype == torch.int64 and torch.equal(b.label, a.label)  # reader order = reference order
    for view in ("weak", "strong"):
        per = {}
        for name in ("ref", "dali"):
            x = torch.cat([b.weak if view == "weak" else b.strong[0] for bs in stats[name] for b in bs])
            per[name] = (x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)))
        assert torch.allclose(per["dali"][0], per["ref"][0], atol=0.15), (view, per)
        ratio = per["dali"][1] / per["ref"][1]
        assert bool(((ratio > 0.8) & (ratio < 1.25)).all()), (view, per)


def test_channels_last_float16_and_multicrop(image_folder):
    spec = get_recipe("imagenet224-multicrop").with_size(32)
    loader = build_dali_loader(cfg(image_folder, channels_last=True), spec, split="train", device=CPU, rank=0,
                               world_size=1, dtype=torch.float16)
    b = next(iter(loader))
    assert b.weak.shape == (8, 3, 32, 32) and b.weak.dtype == torch.float16
    assert b.weak.is_contiguous(memory_format=torch.channels_last)
    assert [tuple(s.shape) for s in b.strong] == [(8, 3, v.size, v.size) for v in spec.strong]
    assert len(b.strong) == 5 and all(s.is_contiguous(memory_format=torch.channels_last) for s in b.strong)
    with pytest.raises(ValueError, match="float32 or torch.float16"):
        build_dali_loader(cfg(image_folder), spec, split="train", device=CPU, rank=0, world_size=1,
                          dtype=torch.bfloat16)


def test_weak_view_is_exact_and_flip_rate(noise_data):
    data, images = noise_data
    spec = _identity_spec(flip_p=0.5)
    weak, strong = _pairs(dali(data, spec), spec, epochs=5)
    _match(weak, images)
    same = (strong - weak).abs().amax(dim=(1, 2, 3)) <= 1.0
    flipped = (strong - weak.flip(-1)).abs().amax(dim=(1, 2, 3)) <= 1.0
    assert bool((same ^ flipped).all()), "a strong view is neither the image nor its mirror"
    assert abs(float(flipped.float().mean()) - 0.5) < 0.12


def test_grayscale_rate_and_luma(noise_data):
    data, _ = noise_data
    spec = _identity_spec(gray_p=0.2)
    weak, strong = _pairs(dali(data, spec), spec, epochs=6)
    luma = (weak * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    gray = (strong - luma).abs().amax(dim=(1, 2, 3)) <= 2.0
    untouched = (strong - weak).abs().amax(dim=(1, 2, 3)) <= 1.0
    assert bool((gray ^ untouched).all()), "a strong view is neither the image nor its luma"
    n = gray.numel()  # 4 standard errors of a rate over n independent draws
    assert abs(float(gray.float().mean()) - 0.2) < 4 * (0.2 * 0.8 / n) ** 0.5
    assert float((weak - weak.mean(1, keepdim=True)).abs().amax()) > 10  # the weak view is never grey


def test_blur_only_where_the_spec_says(noise_data):
    data, _ = noise_data
    spec = _identity_spec(blur_p=0.5, blur_sigma=(1.5, 2.0), blur_kernel=7)
    weak, strong = _pairs(dali(data, spec), spec, epochs=5)
    untouched = (strong - weak).abs().amax(dim=(1, 2, 3)) <= 1.0

    def roughness(x: torch.Tensor) -> torch.Tensor:
        return (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))

    blurred = roughness(strong) < 0.5 * roughness(weak)
    assert bool((blurred ^ untouched).all()), "a strong view is neither blurred nor the image"
    assert abs(float(blurred.float().mean()) - 0.5) < 0.12
    # the same data through a spec without blur: every strong view is the image
    plain = _identity_spec()
    weak, strong = _pairs(dali(data, plain), plain, epochs=1)
    assert float((strong - weak).abs().amax()) <= 1.0


def test_solarize_and_hue_in_degrees(noise_data):
    data, _ = noise_data
    spec = _identity_spec(solarize_p=1.0, solarize_threshold=0.5)
    weak, strong = _pairs(dali(data, spec), spec, epochs=1)
    expect = torch.where(weak.round() >= 128, 255 - weak, weak)
    assert float((strong - expect).abs().amax()) <= 1.0
    # hue 0.1 turn = +-36 degrees in DALI's units: colours move about as much as torchvision's hue jitter
    spec = _identity_spec(jitter=ColorJitterSpec(0.0, 0.0, 0.0, hue=0.1, p=1.0))
    weak, strong = _pairs(dali(data, spec), spec, epochs=2)
    gen = torch.Generator().manual_seed(0)
    factors = torch.empty(len(weak)).uniform_(-0.1, 0.1, generator=gen)
    ref = torch.stack([v2.functional.adjust_hue(w.round().to(torch.uint8), float(f)) for w, f in zip(weak, factors)])
    ratio = float((strong - weak).abs().mean() / (ref.float() - weak).abs().mean())
    assert 0.6 < ratio < 1.6, ratio


def test_jitter_rate(noise_data):
    data, _ = noise_data
    spec = _identity_spec(jitter=ColorJitterSpec(0.4, 0.4, 0.4, 0.1, p=0.8))
    weak, strong = _pairs(dali(data, spec), spec, epochs=5)
    changed = (strong - weak).abs().mean(dim=(1, 2, 3)) > 1.0
    assert abs(float(changed.float().mean()) - 0.8) < 0.12


def test_two_shards_cover_the_folder_once_and_resume(noise_data):
    data, images = noise_data
    spec = _identity_spec()
    seen = []
    for rank in (0, 1):
        loader = dali(data, spec, rank=rank, world_size=2, batch_size=8)
        assert len(loader) == 32 // 2 // 4 and loader.batch_size == 4
        loader.set_epoch(3)
        seen += _match(torch.cat([_pixels(b.weak, spec) for b in loader]), images)
    assert sorted(seen) == list(range(32))
    loader = dali(data, spec, batch_size=8)
    loader.set_epoch(1)
    full = [_match(_pixels(b.weak, spec), images) for b in loader]
    loader.set_epoch(1, start_batch=2)
    assert [_match(_pixels(b.weak, spec), images) for b in loader] == full[2:]
    loader.set_epoch(2)
    assert [_match(_pixels(b.weak, spec), images) for b in loader] != full  # a new order each epoch


def test_chained_epochs_match_fresh_pipelines(noise_data):
    """One pipeline serves consecutive epochs; orders equal per-epoch fresh builds."""
    data, images = noise_data
    spec = _identity_spec()
    chained = dali(data, spec, batch_size=8)
    orders = []
    first = None
    for e in range(3):
        chained.set_epoch(e)
        orders.append([_match(_pixels(b.weak, spec), images) for b in chained])
        first = first or chained._live
    assert chained._live is first and chained._live.epoch == 3  # still the first pipeline
    for e in range(3):
        fresh = dali(data, spec, batch_size=8)
        fresh.set_epoch(e)
        assert [_match(_pixels(b.weak, spec), images) for b in fresh] == orders[e]
    chained.set_epoch(3)
    for _ in chained:
        break  # abandoned mid-epoch: the next pass must start the epoch again
    chained.set_epoch(3)
    again = [_match(_pixels(b.weak, spec), images) for b in chained]
    fresh = dali(data, spec, batch_size=8)
    fresh.set_epoch(3)
    assert again == [_match(_pixels(b.weak, spec), images) for b in fresh]


def test_an_abandoned_pass_does_not_undo_a_resume_position(noise_data):
    data, images = noise_data
    spec = _identity_spec()
    loader = dali(data, spec, batch_size=8)
    loader.set_epoch(0)
    full = [_match(_pixels(b.weak, spec), images) for b in loader]
    old = iter(loader)
    next(old)  # abandoned mid-epoch
    loader.set_epoch(0, start_batch=2)
    resumed = iter(loader)
    old.close()  # its clean-up runs after the resume position was set
    assert [_match(_pixels(b.weak, spec), images) for b in resumed] == full[2:]


def _write_rec(data: Path, images: np.ndarray, split: str = "train") -> None:
    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    write_recordio(data / f"{split}.rec", data / f"{split}.idx", ((png(a), i % 3) for i, a in enumerate(images)))


def test_recordio_shards_labels_and_resume(tmp_path):
    images = np.stack(_noise_images(24, seed=1))
    _write_rec(tmp_path, images)
    spec = _identity_spec()
    seen = []
    for rank in (0, 1):
        loader = dali(tmp_path, spec, rank=rank, world_size=2, batch_size=8)
        assert len(loader) == 24 // 2 // 4
        for b in loader:
            idx = _match(_pixels(b.weak, spec), images)
            assert b.label.tolist() == [i % 3 for i in idx]  # labels travel with their record
            seen += idx
    assert sorted(seen) == list(range(24))
    loader = dali(tmp_path, spec, batch_size=4)
    loader.set_epoch(2)
    full = [_match(_pixels(b.weak, spec), images) for b in loader]
    loader.set_epoch(2, start_batch=4)
    assert [_match(_pixels(b.weak, spec), images) for b in loader] == full[4:]
    assert sorted(sum(full, [])) == list(range(24))


def test_recordio_resume_seeks_without_reading_skipped_batches(tmp_path):
    """A resume at batch 4 reads batch 4's records first: nothing of batches 0-3 is read or decoded."""
    images = np.stack(_noise_images(24, seed=4))
    _write_rec(tmp_path, images)
    spec = _identity_spec()
    loader = dali(tmp_path, spec, batch_size=4)
    loader.set_epoch(1)
    full = [_match(_pixels(b.weak, spec), images) for b in loader]
    read: list[int] = []
    encoded = loader.samples.encoded
    loader.samples.encoded = lambda i: (read.append(i), encoded(i))[1]
    loader.set_epoch(1, start_batch=4)
    assert [_match(_pixels(b.weak, spec), images) for b in loader] == full[4:]
    assert read[:8] == full[4] + full[5]  # records are the images in write order


def test_bad_input_is_named(tmp_path, noise_data):
    images = np.stack(_noise_images(8, seed=2))
    _write_rec(tmp_path, images)
    spec = _identity_spec()
    (tmp_path / "train.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.idx"):
        dali(tmp_path, spec)
    other = tmp_path / "other"
    other.mkdir()
    _write_rec(other, np.stack(_noise_images(12, seed=3)))
    (tmp_path / "train.idx").write_bytes((other / "train.idx").read_bytes())
    with pytest.raises(RecordIOError, match="belongs to another .rec"):
        RecordSamples(tmp_path / "train.rec", tmp_path / "train.idx")
    (tmp_path / "train.idx").write_text("0\t0\nnot a line\n")
    with pytest.raises(ValueError, match=r"train\.idx:2"):
        dali(tmp_path, spec)
    data, _ = noise_data
    with pytest.raises(ValueError, match="rank=2"):
        dali(data, spec, rank=2, world_size=2)
    with pytest.raises(ValueError, match="too few"):
        dali(data, spec, batch_size=64, world_size=2, rank=0)
    with pytest.raises(ValueError, match="not divisible"):
        dali(data, spec, batch_size=9, world_size=2)
    with pytest.raises(FileNotFoundError, match="no DALI-readable data"):
        dali(tmp_path / "other" / "nothing", spec)


def test_dali_tree_skips_counts_and_names_bad_files(bad_tree, caplog):
    with caplog.at_level(logging.WARNING):
        loader = dali(bad_tree, get_recipe("cifar32"), batch_size=4, num_workers=0)
    assert loader.bad_files == 3 and loader.num_samples == 13  # 12 good + the non-UTF-8 name
    for name in ("empty.jpg", "truncated.jpg", "noise.png"):
        assert name in caplog.text, name
    assert "3 of 16 samples do not decode" in caplog.text
    loader.set_epoch(0)
    labels = torch.cat([b.label for b in loader])
    assert len(labels) == 12 and set(labels.tolist()) == {0, 1}  # 13 // 4 = 3 whole batches


def test_dali_recordio_skips_and_names_corrupt_records(tmp_path, caplog):
    payloads = [(png_bytes(i), i % 2) for i in range(12)]
    payloads[3] = (np.random.default_rng(1).bytes(300), 1)  # random bytes where an image should be
    payloads[7] = (jpeg_bytes(7)[:150], 1)  # a truncated JPEG
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx", payloads)
    with caplog.at_level(logging.WARNING):
        loader = dali(tmp_path, get_recipe("cifar32"), batch_size=4, num_workers=0)
    assert loader.bad_files == 2 and sorted(loader.bad) == [3, 7]
    assert f"record 3 of {tmp_path / 'train.rec'}" in caplog.text and "record 7 of" in caplog.text
    loader.set_epoch(1)
    assert sum(len(b.label) for b in loader) == 8  # 10 good records: 2 whole batches of 4


@pytest.mark.parametrize("fused", [False, True])
def test_gpu_graph_is_the_cpu_graph_on_another_device(fused):
    """The GPU graph is defined (not built) here: every view lands on the GPU, labels stay on the CPU."""
    spec = replace(get_recipe("imagenet224"), strong=(replace(get_recipe("imagenet224").strong[0], solarize_p=0.2),))
    devices = {}
    for gpu in (False, True):
        source = lambda info: ([np.zeros(4, np.uint8)] * 2, np.zeros(2, np.int64))  # noqa: E731 (never called)
        pipe = ressl_pipeline(spec, source=source, gpu=gpu, fused_crop=fused, batch_size=2,
                              num_threads=1, device_id=0 if gpu else None, exec_dynamic=True)
        outs = getattr(pipe, "_graph_out", None)
        if outs is None:
            pytest.skip("this DALI version does not expose a defined graph's outputs")
        devices[gpu] = [o.device for o in outs]
    assert devices[False] == ["cpu", "cpu", "cpu"]
    assert devices[True] == ["gpu", "gpu", "cpu"]


@pytest.mark.cuda
def test_gpu_pipeline_delivers_on_cuda(image_folder):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: the mixed-decoder / GPU-op pipeline only runs on a GPU")
    spec = get_recipe("imagenet224").with_size(32)
    loader = build_dali_loader(cfg(image_folder), spec, split="train", device=torch.device("cuda"), rank=0,
                               world_size=1)
    b = next(iter(loader))
    assert b.weak.is_cuda and b.strong[0].is_cuda and b.label.is_cuda and b.weak.shape == (8, 3, 32, 32)
