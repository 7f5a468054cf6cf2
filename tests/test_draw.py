"""One random draw per sample, whatever runs it: pipelines.draw and the three backends that use it.

The images encode their own coordinates (red = 4 x column, green = 5 x row, blue = 10 x label), so the
mean red / green of a view tells the crop box it was cut from and the slope of red tells a flip. Each
backend's views are checked against the box and flip that :mod:`pipelines.draw` gives the sample —
the same parameters in torchvision, DALI and FFCV (its threads cropping JPEG or raw records on the
CPU, and raw small images cropped on the device by :mod:`pipelines.resident`). Then: two loaders
that differ only in threads, workers or world size give identical per-sample views, and a resume
mid-epoch gives the straight run's batches bit for bit.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import build_loader, draw
from pipelines.formats.kernels import set_jit_enabled
from pipelines.spec import ColorJitterSpec, RecipeSpec, TwoViewSpec, ViewSpec

N, H, W, SIZE = 16, 40, 56, 16
ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
# crop + flip only, output in [0, 1] pixel units: the geometry of each view can be read off its pixels
GEOMETRY = TwoViewSpec(weak=ViewSpec("weak", SIZE, scale=(0.2, 1.0)),
                       strong=(ViewSpec("strong", SIZE, scale=(0.3, 0.8), ratio=(0.5, 2.0)),), mean=ZERO, std=ONE)
# the full strong recipe, for the identity checks (threads, workers, world size, resume)
FULL = TwoViewSpec(weak=ViewSpec("weak", SIZE), strong=(ViewSpec("strong", SIZE, jitter=ColorJitterSpec(),
                                                                 gray_p=0.2, blur_p=0.5, blur_kernel=3),))


def _image(label: int) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return np.stack([4 * xx, 5 * yy, np.full_like(xx, 10 * label)], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """One image per class (sample index = label) as an ImageFolder tree and, with FFCV, a raw .beton."""
    root = tmp_path_factory.mktemp("drawdata")
    for i in range(N):
        (root / "train" / f"c{i:02d}").mkdir(parents=True)
        Image.fromarray(_image(i)).save(root / "train" / f"c{i:02d}" / "0.png")
    try:
        from pipelines.formats.beton import write_beton
    except ImportError:  # no FFCV
        return root
    write_beton(root / "train.beton", [(_image(i), i) for i in range(N)], mode="raw")
    return root


def _cfg(data: Path, **kw) -> SimpleNamespace:
    base = dict(data=str(data), batch_size=4, num_workers=0, num_threads=1, seed=5, channels_last=False,
                dali_reader_workers=0)
    return SimpleNamespace(**{**base, **kw})


BACKENDS = ["torchvision", "dali", "ffcv", "ffcv-threads"]  # ffcv: raw small images cropped on the device


def _build(data: Path, backend: str, spec: RecipeSpec, rank: int = 0, world_size: int = 1, **kw):
    """A training loader; ``ffcv-threads`` is FFCV's own threads cropping on the CPU (the JPEG path)."""
    pytest.importorskip("nvidia.dali" if backend == "dali" else backend.split("-")[0],
                        reason=f"the {backend} backend is not installed")
    if backend == "ffcv-threads":
        from pipelines.ffcv import build_ffcv_loader

        return build_ffcv_loader(_cfg(data, **kw), spec, split="train", device=torch.device("cpu"), rank=rank,
                                 world_size=world_size, resident=False)
    return build_loader(_cfg(data, **kw), backend, spec=spec, rank=rank, world_size=world_size)


def _epochs(loader, epochs: range, spec: RecipeSpec) -> list[dict[str, torch.Tensor]]:
    out = []
    for e in epochs:
        loader.set_epoch(e)
        for b in loader:
            out.append({"label": b.label.clone(), **{v.name: x.clone() for v, x in zip(spec.views, [b.weak, *b.strong],
                                                                                       strict=True)}})
    return out


def _per_sample(batches: list[dict[str, torch.Tensor]], spec: RecipeSpec, per_epoch: int) -> dict:
    """(epoch, label) -> {view: [3,h,w]} over batches of consecutive epochs with ``per_epoch`` batches each."""
    out = {}
    for k, b in enumerate(batches):
        for r, label in enumerate(b["label"].tolist()):
            out[(k // per_epoch, label)] = {v.name: b[v.name][r] for v in spec.views}
    return out


# ------------------------------------------------------------------------------------------------------
# the draw itself
# ------------------------------------------------------------------------------------------------------


def test_a_draw_is_a_pure_function_of_its_coordinates():
    v = FULL.strong[0]
    idx = np.arange(200)
    a = draw.view_decisions(v, 3, 7, idx, 1)
    b = draw.view_decisions(v, 3, 7, idx[::-1].copy(), 1)  # another order, another batch: the same per sample
    for k in a:
        assert np.array_equal(a[k], b[k][::-1]), k
    for other in ((4, 7, 1), (3, 8, 1), (3, 7, 0)):  # any coordinate changes the draw
        c = draw.view_decisions(v, *other[:2], idx, other[2])
        assert not np.array_equal(a["sigma"], c["sigma"]), other
    single = draw.view_decisions(v, 3, 7, np.array([42]), 1)
    assert all(single[k][0] == a[k][42] for k in a)


def test_draw_rates_and_ranges():
    v = ViewSpec("s", 32, flip_p=0.5, jitter=ColorJitterSpec(0.4, 0.3, 0.2, 0.1, p=0.8), gray_p=0.2, blur_p=0.5,
                 blur_sigma=(0.1, 2.0), solarize_p=0.1)
    n = 20_000
    d = draw.view_decisions(v, 0, 0, np.arange(n), 0)
    for name, p in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5), ("solarize", 0.1)):
        assert abs(d[name].mean() - p) < 4 * (p * (1 - p) / n) ** 0.5, name
    on = d["jitter"]
    for name, s in (("brightness", 0.4), ("contrast", 0.3), ("saturation", 0.2)):
        assert d[name][on].min() >= 1 - s and d[name][on].max() <= 1 + s and (d[name][~on] == 1).all()
    assert np.abs(d["hue"]).max() <= 0.1 and (d["hue"][~on] == 0).all()
    assert d["sigma"].min() >= 0.1 and d["sigma"].max() <= 2.0
    assert abs(np.corrcoef(d["sigma"][:-1], d["sigma"][1:])[0, 1]) < 0.03  # neighbours independent


def test_crop_boxes_follow_torchvision_random_resized_crop():
    v = ViewSpec("s", 32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    n = 5_000
    boxes = draw.view_crops(v, 1, 2, np.arange(n), 0, np.full(n, 300), np.full(n, 400))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 300).all() and (left + w <= 400).all()
    area, aspect = h * w / (300 * 400), w / h
    assert area.min() > 0.07 and area.max() <= 1.0 and aspect.min() > 0.74 and aspect.max() < 1.35
    # the same distribution as torchvision's own sampler (its rejections included), quantile by quantile
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.zeros(3, 300, 400)
    ref = np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    q = [0.1, 0.25, 0.5, 0.75, 0.9]
    ref_area, ref_aspect = ref[:, 2] * ref[:, 3] / (300 * 400), ref[:, 3] / ref[:, 2]
    assert np.abs(np.quantile(area, q) - np.quantile(ref_area, q)).max() < 0.03
    assert np.abs(np.quantile(aspect, q) - np.quantile(ref_aspect, q)).max() < 0.03
    assert abs((top / (300 - h + 1)).mean() - 0.5) < 0.02 and abs((left / (400 - w + 1)).mean() - 0.5) < 0.02
    # a box that cannot fit ten times: torchvision's central fallback clamped to the ratio range
    tall = draw.view_crops(ViewSpec("t", 8, scale=(1.0, 1.0), ratio=(2.0, 3.0)), 0, 0, np.arange(4), 0,
                           np.full(4, 100), np.full(4, 10))
    assert (tall == [[47, 0, 5, 10]]).all()


def test_draws_are_the_same_with_jit_off():
    v = FULL.strong[0]
    idx = np.arange(64)
    jit = draw.view_decisions(v, 9, 1, idx, 1), draw.view_crops(v, 9, 1, idx, 1, np.full(64, 30), np.full(64, 50))
    set_jit_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the wrap-around of the hash is silent in Python too
            py = draw.view_decisions(v, 9, 1, idx, 1), draw.view_crops(v, 9, 1, idx, 1, np.full(64, 30),
                                                                        np.full(64, 50))
    finally:
        set_jit_enabled(True)
    assert all(np.array_equal(jit[0][k], py[0][k]) for k in jit[0]) and np.array_equal(jit[1], py[1])


# ------------------------------------------------------------------------------------------------------
# every backend cuts the drawn box and flips the drawn samples
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_uses_the_drawn_crop_box_and_flip(data, backend):
    loader = _build(data, backend, GEOMETRY)
    seen = _per_sample(_epochs(loader, range(2), GEOMETRY), GEOMETRY, len(loader))
    assert len(seen) == 2 * N
    worst = 0.0
    for (epoch, label), views in seen.items():
        for view_id, v in enumerate(GEOMETRY.views):
            top, left, h, w = draw.view_crops(v, 5, epoch, np.array([label]), view_id, np.array([H]),
                                              np.array([W]))[0]
            flip = draw.view_decisions(v, 5, epoch, np.array([label]), view_id)["flip"][0]
            x = views[v.name].float() * 255
            assert abs(x[2].mean().item() - 10 * label) < 1.0  # the view comes from its own sample
            # mean column / row of the output = centre of the box (the ramps are linear)
            col, row = x[0].mean().item() / 4, x[1].mean().item() / 5
            err = max(abs(col - (left + (w - 1) / 2)), abs(row - (top + (h - 1) / 2)))
            worst = max(worst, err)
            assert err < 1.0, (backend, epoch, label, v.name, (col, row), (top, left, h, w))
            red = x[0].mean(dim=0)
            assert bool(red[0] > red[-1]) == bool(flip), (backend, epoch, label, v.name)


# ------------------------------------------------------------------------------------------------------
# no dependence on threads, workers, world size; exact resume
# ------------------------------------------------------------------------------------------------------


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for k in x:
            assert torch.equal(x[k], y[k]), k


PARALLEL = {"torchvision": dict(num_workers=2), "dali": dict(num_threads=2), "ffcv": dict(num_threads=2),
            "ffcv-threads": dict(num_threads=2)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_workers_and_world_size_do_not_change_a_sample(data, backend):
    one = _build(data, backend, FULL)
    base = _epochs(one, range(2), FULL)
    again = _epochs(one, range(2), FULL)  # the same loader twice: identical
    _assert_same(base, again)
    par = _build(data, backend, FULL, **PARALLEL[backend])
    _assert_same(base, _epochs(par, range(2), FULL))
    # rank 0 and 1 of 2 (batch 4 global = 2 each): every sample's views as in the single process
    want = _per_sample(base, FULL, len(one))
    got = {}
    for rank in (0, 1):
        shard = _build(data, backend, FULL, rank=rank, world_size=2)
        got.update(_per_sample(_epochs(shard, range(2), FULL), FULL, len(shard)))
    assert got.keys() == want.keys()
    for key in want:
        for name in want[key]:
            assert torch.equal(got[key][name], want[key][name]), (key, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_gives_the_straight_runs_batches(data, backend):
    loader = _build(data, backend, FULL)
    straight = _epochs(loader, range(3, 4), FULL)
    loader.set_epoch(3, start_batch=2)
    resumed = [{"label": b.label.clone(), "weak": b.weak.clone(), "strong": b.strong[0].clone()} for b in loader]
    _assert_same(straight[2:], resumed)
    fresh = _build(data, backend, FULL)  # a new process resuming there
    fresh.set_epoch(3, start_batch=2)
    _assert_same(straight[2:], [{"label": b.label, "weak": b.weak, "strong": b.strong[0]} for b in fresh])


def test_eval_loaders_are_deterministic_whatever_the_workers(data):
    from pipelines.eval import build_eval_loader

    def run(workers: int, seed: int = 0, epoch: int = 1) -> list[torch.Tensor]:
        loader = build_eval_loader(data, "train", 12, ZERO, ONE, batch_size=5, num_workers=workers,
                                   train_aug=True, seed=seed)
        loader.set_epoch(epoch)
        return [x for x, _ in loader]

    a, b = run(0), run(2)
    assert len(a) == len(b) == 4 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, run(0, epoch=2), strict=True))  # new crops each epoch
    plain = build_eval_loader(data, "train", 12, ZERO, ONE, batch_size=5, num_workers=0)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(plain, plain, strict=True))  # centre crops, fixed


def test_a_kernel_loaded_from_numbas_cache_gives_what_a_fresh_compile_gives(tmp_path):
    """A machine's first run compiles the colour kernel, later runs load it from Numba's cache: same views."""
    import subprocess
    import sys

    script = (
        "import hashlib, sys, numpy as np, torch; sys.path.insert(0, sys.argv[1])\n"
        "from pipelines.gpu_augment import augment_view, drawn_view_params\n"
        "from pipelines.spec import get_recipe\n"
        "spec = get_recipe('cifar32'); v = spec.strong[0]\n"
        "x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))\n"
        "out = augment_view(x, v, spec.mean, spec.std, params=drawn_view_params(v, 0, 0, np.arange(32), 1),"
        " impl='numba')\n"
        "print(hashlib.sha256(out.numpy().tobytes()).hexdigest())\n"
    )
    env = {**__import__("os").environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "OMP_NUM_THREADS": "1"}
    root = str(Path(__file__).resolve().parents[1])
    fresh, cached = (subprocess.run([sys.executable, "-c", script, root], env=env, capture_output=True, text=True,
                                    check=True, timeout=300).stdout for _ in range(2))
    assert any((tmp_path / "numba").rglob("*.nbi")), "the first run should have written Numba's cache"
    assert fresh == cached and len(fresh.strip()) == 64


def test_dali_reader_processes_give_the_same_batches(data):
    """DALI's parallel external source (reader processes) reads and draws ahead: the same batches, resume too."""
    pytest.importorskip("nvidia.dali", reason="DALI is not installed (the [dali] extra)")
    inline = _build(data, "dali", FULL)
    readers = _build(data, "dali", FULL, dali_reader_workers=2)
    assert readers.reader_workers == 2
    _assert_same(_epochs(inline, range(2), FULL), _epochs(readers, range(2), FULL))
    readers.set_epoch(1, start_batch=2)
    inline.set_epoch(1, start_batch=2)
    _assert_same([{"label": b.label.clone(), "weak": b.weak.clone()} for b in inline],
                 [{"label": b.label.clone(), "weak": b.weak.clone()} for b in readers])
