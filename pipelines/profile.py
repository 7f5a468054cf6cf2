"""What each loader stage costs, and which one limits the loader: a per-stage profile per backend.

A loader's rate says how fast it is, not why. Here each backend's own pieces are timed apart, one batch
per call, in the unit of the training step: weak+strong **pairs** (a sample gives one pair per strong
view). Each stage gets its rate as it ran (on ``threads`` threads, device synchronised) and its **CPU
core-seconds per 1,000 pairs**: the CPU seconds of this process, its threads and its child processes
while the stage ran (:func:`cpu_seconds`), the figure that adds up across stages sharing the cores.

Stages, and the piece each backend runs (its own, called directly):

=========  ===============================  ================================  ===============================
stage      torchvision                      DALI                              FFCV (JPEG) / FFCV resident
=========  ===============================  ================================  ===============================
read       ``Samples.encoded`` (file)       ``IndexedSource`` (bytes, header  ``BetonSamples.encoded`` /
                                            sizes, every view's draws)        the batch's index + draws
decode     PIL (``folder.decode_rgb``)      a decode-only DALI pipeline       ``ffcv.libffcv.imdecode`` / none
crop       ``F.resized_crop``, drawn boxes  ``fn.resize`` with the drawn ROI  ``ffcv.libffcv.resize_crop`` /
                                            on decoded images                 one ``roi_align`` per size
augment    ``DrawnView`` on the cropped     each view's colour ops and        ``gpu_augment.augment_view``
           image (identity crop) +          ``crop_mirror_normalize`` on
           normalise                        cropped images
h2d        ``.to(device)`` of the uint8     inside the pipeline               ``.to(device)`` / none (the
           views                                                              split is copied once)
=========  ===============================  ================================  ===============================

The loaders fuse some of these (DALI runs decode, crop and augment in one pipeline; FFCV decodes and
crops in one compiled pass per sample): each stage row says so in ``fused``, and the bench puts the
loader's own measured total next to the sum.

Every stage also has a ``side``: ``host`` stages run on the CPU whatever the training device is;
``device`` stages run where the batches go (on a GPU machine they leave the CPU). :func:`bottleneck`
names the stage that limits a backend (CPU-, IO- or device-bound) and :func:`project` scales the host
stages to a machine with more cores: a projection from these per-core costs, not a measurement.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from .batch import LoaderConfig
from .draw import view_crops
from .folder import decode_rgb, train_classes
from .gpu_augment import augment_view, drawn_view_params, normalize
from .order import epoch_order
from .samples import BetonSamples, Samples, TreeSamples, bad_samples
from .spec import RecipeSpec, ViewSpec

__all__ = ["STAGES", "StageCost", "bottleneck", "cpu_seconds", "profile_backend", "project", "sync", "time_stage"]

log = logging.getLogger(__name__)

STAGES = ("read", "decode", "crop", "augment", "h2d", "model")
NUM_BATCHES = 2  # distinct batches a stage cycles through (inputs of later stages are prepared for each)
MIN_WINDOW_S = 0.25  # shortest timed window of a stage: fast stages get more calls per window
MAX_CALLS = 2000  # most calls per window


def cpu_seconds() -> float:
    """CPU seconds used so far by this process (all its threads) and its children, live and reaped.

    The process's own time comes from ``getrusage`` (microseconds; ``/proc``'s ticks are 10 ms, too coarse
    for a short stage); live children (DataLoader workers) from ``/proc`` through psutil.
    """
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            ct = child.cpu_times()
            total += ct.user + ct.system
    return total


def sync(device: torch.device) -> None:
    """Wait for queued device work so a timer brackets the work itself (a host-device sync on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StageCost:
    """One stage of one backend. ``pairs_per_s`` is None for a stage with nothing to do (say why in
    ``note``); its ``core_s_per_1k_pairs`` is then 0."""

    stage: str
    side: str  # "host": on the CPU whatever the device; "device": where the batches go
    pairs_per_s: float | None
    pairs_per_s_std: float | None
    core_s_per_1k_pairs: float
    threads: int | None
    fused: str = ""  # how the loader runs this stage together with others, when it does
    note: str = ""

    def row(self) -> dict[str, Any]:
        return asdict(self)


def time_stage(step: Callable[[int], object], *, pairs_per_call: int, warmup: int, steps: int, repeats: int,
               device: torch.device, min_window_s: float = MIN_WINDOW_S) -> tuple[list[float], float]:
    """Call ``step(k)`` (k cycles over :data:`NUM_BATCHES`) ``warmup`` times, then time ``repeats`` windows
    of at least ``steps`` calls and ``min_window_s`` seconds each (the call count is set from one timed
    call), synchronising the device around each window.

    Returns:
        pairs/s of each window, and CPU core-seconds per 1,000 pairs over all windows.
    """
    calls = itertools.count()
    for _ in range(warmup):
        step(next(calls) % NUM_BATCHES)
    sync(device)
    t0 = time.perf_counter()
    step(next(calls) % NUM_BATCHES)
    sync(device)
    steps = max(steps, min(MAX_CALLS, math.ceil(min_window_s / max(time.perf_counter() - t0, 1e-6))))
    rates, cpu0, pairs = [], cpu_seconds(), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step(next(calls) % NUM_BATCHES)
        sync(device)
        rates.append(steps * pairs_per_call / (time.perf_counter() - t0))
        pairs += steps * pairs_per_call
    return rates, 1000.0 * (cpu_seconds() - cpu0) / pairs


@dataclass
class _Run:
    """What every backend's profile shares: the recipe, the batches, the timing and a thread pool."""

    cfg: LoaderConfig
    spec: RecipeSpec
    split: str
    device: torch.device
    threads: int
    warmup: int
    steps: int
    repeats: int

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="profile") if self.threads > 1 else None
        self.n_strong = len(self.spec.strong)

    def map(self, fn: Callable, items: Sequence) -> list:
        """``fn`` over ``items`` on the stage's threads (the per-sample work a loader spreads over workers)."""
        return list(self.pool.map(fn, items)) if self.pool is not None else [fn(x) for x in items]

    def batches(self, good: np.ndarray) -> list[np.ndarray]:
        """The first :data:`NUM_BATCHES` batches of epoch 0, in the order every backend visits."""
        order = good[epoch_order(len(good), seed=self.cfg.seed, epoch=0)]
        b = self.cfg.batch_size
        if len(order) < NUM_BATCHES * b:
            raise ValueError(f"the stage profile needs {NUM_BATCHES} batches of {b}, the split has {len(order)} "
                             "readable samples")
        return [order[k * b:(k + 1) * b] for k in range(NUM_BATCHES)]

    def cost(self, stage: str, side: str, step: Callable[[int], object], threads: int | None, *, fused: str = "",
             note: str = "") -> StageCost:
        rates, core_s = time_stage(step, pairs_per_call=self.cfg.batch_size * self.n_strong, warmup=self.warmup,
                                   steps=self.steps, repeats=self.repeats, device=self.device)
        std = statistics.stdev(rates) if len(rates) > 1 else 0.0
        return StageCost(stage, side, statistics.fmean(rates), std, core_s, threads, fused, note)

    def h2d(self, views: list[list[torch.Tensor]], what: str) -> StageCost:
        """``.to(device)`` of uint8 host tensors (pinned, as the loaders pin them), or why there is none."""
        if self.device.type == "cpu":
            return StageCost("h2d", "device", None, None, 0.0, None, note="no copy: the device is the CPU")
        pinned = [[t.pin_memory() for t in batch] for batch in views]
        return self.cost("h2d", "device", lambda k: [t.to(self.device, non_blocking=True) for t in pinned[k]], None,
                         note=what)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _good(samples: Samples, threads: int) -> np.ndarray:
    """Indices of the samples that decode (the loaders' own check, cached next to the data)."""
    bad = bad_samples(samples, threads=threads)
    return np.setdiff1d(np.arange(len(samples)), np.fromiter(bad, dtype=np.int64, count=len(bad)))


def _identity_crop(view: ViewSpec) -> ViewSpec:
    """The view with a crop that keeps the whole image: its colour draws are the view's own (other slots)."""
    return replace(view, scale=(1.0, 1.0), ratio=(1.0, 1.0))


def _torchvision(run: _Run) -> list[StageCost]:
    from torchvision.transforms.v2 import functional as F

    from .torchvision import DrawnView

    spec, seed, views = run.spec, run.cfg.seed, run.spec.views
    torch.set_num_threads(1)  # as in each DataLoader worker (torch's ops inside DrawnView, e.g. the blur)
    samples = TreeSamples(Path(run.cfg.data) / run.split, train_classes(run.cfg.data))
    batches = run.batches(_good(samples, run.threads))
    encoded = [[samples.encoded(int(i)) for i in idx] for idx in batches]
    images = [[decode_rgb(b) for b in enc] for enc in encoded]

    def crop(k: int) -> list[list]:
        idx, imgs = batches[k], images[k]
        h, w = np.array([im.height for im in imgs]), np.array([im.width for im in imgs])
        boxes = [view_crops(v, seed, 0, idx, n, h, w) for n, v in enumerate(views)]
        return run.map(lambda s: [F.resized_crop(imgs[s], *(int(x) for x in boxes[n][s]), [v.size, v.size],
                                                 antialias=True) for n, v in enumerate(views)], range(len(idx)))

    crops = [crop(k) for k in range(NUM_BATCHES)]
    colour = [DrawnView(_identity_crop(v), n, seed) for n, v in enumerate(views)]

    def colour_views(k: int) -> list[torch.Tensor]:
        out = run.map(lambda s: [colour[n](crops[k][s][n], 0, int(batches[k][s])) for n in range(len(views))],
                      range(len(batches[k])))
        return [torch.stack([o[n] for o in out]) for n in range(len(views))]

    def augment(k: int) -> list[torch.Tensor]:
        return [normalize(x.to(run.device), spec.mean, spec.std, scale=1 / 255, channels_last=run.cfg.channels_last)
                for x in colour_views(k)]

    per_sample = f"{run.threads} thread(s) here; {max(1, run.cfg.num_workers)} DataLoader process(es) in the loader"
    return [
        run.cost("read", "host", lambda k: run.map(samples.encoded, batches[k].tolist()), run.threads,
                 note=f"file bytes; {per_sample}"),
        run.cost("decode", "host", lambda k: run.map(decode_rgb, encoded[k]), run.threads, note="PIL"),
        run.cost("crop", "host", crop, run.threads, note="F.resized_crop (antialiased) of the drawn boxes"),
        run.cost("augment", "host", augment, run.threads,
                 note="DrawnView's colour ops (PIL) in the workers, then normalise on the device"),
        run.h2d([colour_views(k) for k in range(NUM_BATCHES)], "uint8 views, pinned"),
    ]


def _ffcv(run: _Run) -> list[StageCost]:
    from .ffcv import build_ffcv_loader
    from .resident import ResidentLoader

    loader = build_ffcv_loader(run.cfg, run.spec, split=run.split, device=run.device, rank=0, world_size=1)
    if isinstance(loader, ResidentLoader):
        return _resident(run, loader)
    from ffcv.libffcv import imdecode, resize_crop

    spec, seed, views = run.spec, run.cfg.seed, run.spec.views
    samples = BetonSamples(Path(run.cfg.data) / f"{run.split}.beton")
    batches = run.batches(_good(samples, run.threads))
    meta = samples.meta
    encoded = [[np.frombuffer(samples.encoded(int(i)) if samples.is_jpeg(int(i)) else samples.image(int(i)).tobytes(),
                              np.uint8) for i in idx] for idx in batches]
    hw = [(meta["height"][idx].astype(np.int64), meta["width"][idx].astype(np.int64)) for idx in batches]
    images = [[np.empty((int(h), int(w), 3), np.uint8) for h, w in zip(*hw[k], strict=True)]
              for k in range(NUM_BATCHES)]

    def decode_one(k: int, s: int) -> None:
        h, w = images[k][s].shape[:2]
        if samples.is_jpeg(int(batches[k][s])):
            imdecode(encoded[k][s], images[k][s], h, w, h, w, 0, 0, 1, 1, False, False)
        else:  # raw pixels: FFCV's "decode" is the copy out of the page
            images[k][s][...] = encoded[k][s].reshape(h, w, 3)

    def decode(k: int) -> None:
        run.map(lambda s: decode_one(k, s), range(len(batches[k])))

    out = [[np.empty((len(idx), v.size, v.size, 3), np.uint8) for v in views] for idx in batches]

    def crop(k: int) -> None:
        boxes = [view_crops(v, seed, 0, batches[k], n, *hw[k]) for n, v in enumerate(views)]

        def one(s: int) -> None:
            for n in range(len(views)):
                t, left, h, w = (int(x) for x in boxes[n][s])
                resize_crop(images[k][s], t, t + h, left, left + w, out[k][n][s])

        run.map(one, range(len(batches[k])))

    for k in range(NUM_BATCHES):
        decode(k)
        crop(k)
    on_device = [[torch.from_numpy(o).permute(0, 3, 1, 2).to(run.device) for o in out[k]] for k in range(NUM_BATCHES)]

    def augment(k: int) -> list[torch.Tensor]:
        return [augment_view(on_device[k][n], v, spec.mean, spec.std,
                             params=drawn_view_params(v, seed, 0, batches[k], n), channels_last=run.cfg.channels_last)
                for n, v in enumerate(views)]

    fused = "decode + crop: one compiled pass per sample in FFCV's threads"
    return [
        run.cost("read", "host", lambda k: run.map(samples.encoded, batches[k].tolist()), run.threads,
                 note=".beton bytes (memory-mapped)"),
        run.cost("decode", "host", decode, run.threads, fused=fused, note="ffcv.libffcv.imdecode (libjpeg-turbo)"),
        run.cost("crop", "host", crop, run.threads, fused=fused, note="ffcv.libffcv.resize_crop of the drawn boxes"),
        run.cost("augment", "device", augment, torch.get_num_threads(),
                 note=f"gpu_augment.augment_view on {run.device.type}"),
        run.h2d([[torch.from_numpy(o) for o in out[k]] for k in range(NUM_BATCHES)], "uint8 crops (FFCV's ToDevice)"),
    ]


def _resident(run: _Run, loader) -> list[StageCost]:
    spec, seed, views, device = run.spec, run.cfg.seed, run.spec.views, run.device
    batches = run.batches(loader.indices)
    groups: dict[int, list[tuple[int, ViewSpec]]] = {}
    for n, v in enumerate(views):
        groups.setdefault(v.size, []).append((n, v))

    def read(k: int) -> tuple:
        idx = batches[k]
        return (torch.from_numpy(idx).to(device, non_blocking=True), loader.labels[torch.from_numpy(idx)],
                [drawn_view_params(v, seed, 0, idx, n) for n, v in enumerate(views)])

    def crop(k: int) -> dict[int, torch.Tensor]:
        idx = batches[k]
        images = loader.images[torch.from_numpy(idx).to(device)]
        out = {}
        for g in groups.values():
            size = g[0][1].size
            c = loader._crops(images, idx, 0, g).view(len(g), len(idx), 3, size, size)
            out.update({n: c[j] for j, (n, _) in enumerate(g)})
        return out

    crops = [crop(k) for k in range(NUM_BATCHES)]
    params = [[drawn_view_params(v, seed, 0, batches[k], n) for n, v in enumerate(views)] for k in range(NUM_BATCHES)]

    def augment(k: int) -> list[torch.Tensor]:
        return [augment_view(crops[k][n], v, spec.mean, spec.std, params=params[k][n],
                             channels_last=run.cfg.channels_last) for n, v in enumerate(views)]

    mib = loader.images.numel() / 2**20
    return [
        run.cost("read", "host", read, 1, note="the batch's indices and every view's draws: the whole CPU side"),
        StageCost("decode", "device", None, None, 0.0, None, note="raw pixels held on the device: nothing to decode"),
        run.cost("crop", "device", crop, torch.get_num_threads(),
                 note=f"gather + one roi_align per size on {device.type} (boxes drawn on the host)"),
        run.cost("augment", "device", augment, torch.get_num_threads(),
                 note=f"gpu_augment.augment_view on {device.type}"),
        StageCost("h2d", "device", None, None, 0.0, None,
                  note=f"none per batch: the split ({mib:.0f} MiB) was copied to the device once"),
    ]


def _dali(run: _Run) -> list[StageCost]:
    from .dali import dali_samples
    from .profile_dali import dali_stage_steps

    samples = dali_samples(run.cfg.data, run.split)
    batches = run.batches(_good(samples, run.threads))
    steps = dali_stage_steps(run.spec, samples, batches, seed=run.cfg.seed, threads=run.threads, device=run.device)
    side = "device"  # the graph runs where the batches go: decoders on "mixed" put every op after on the GPU
    fused = "decode + crop + augment: one DALI pipeline"
    h2d = (StageCost("h2d", "device", None, None, 0.0, None, note="no copy: the device is the CPU")
           if run.device.type == "cpu" else
           StageCost("h2d", "device", None, None, 0.0, None, fused=fused,
                     note="inside the pipeline: the mixed decoder uploads the encoded bytes"))
    return [
        run.cost("read", "host", steps["read"], 1,
                 note="IndexedSource in the training thread: bytes, header sizes, every view's draws"),
        run.cost("decode", side, steps["decode"], run.threads, fused=fused, note="a decode-only DALI pipeline"),
        run.cost("crop", side, steps["crop"], run.threads, fused=fused,
                 note="fn.resize with the drawn ROI, fed decoded images"),
        run.cost("augment", side, steps["augment"], run.threads, fused=fused,
                 note="colour ops + crop_mirror_normalize, fed cropped views (incl. a same-size resize)"),
        h2d,
    ]


_BACKENDS = {"torchvision": _torchvision, "dali": _dali, "ffcv": _ffcv}


def profile_backend(backend: str, cfg: LoaderConfig, spec: RecipeSpec, *, split: str = "train",
                    device: torch.device | str = "cpu", warmup: int = 1, steps: int = 2,
                    repeats: int = 2) -> list[StageCost]:
    """The read, decode, crop, augment and h2d stages of ``backend`` on ``cfg``'s data, one batch of
    ``cfg.batch_size`` samples per call.

    Args:
        backend: "torchvision", "dali" or "ffcv" (FFCV's resident path when its loader takes it).
        cfg: the loader options (data, batch size, workers / threads, seed, channels_last).
        spec: the recipe, at the size being measured.
        device: where the batches go.
        warmup, steps, repeats: untimed calls, then ``repeats`` timed windows of ``steps`` calls per stage.
    """
    cfg = LoaderConfig.of(cfg)
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {tuple(_BACKENDS)}")
    threads = torch.get_num_threads()
    run = _Run(cfg, spec, split, torch.device(device), max(1, cfg.threads), warmup, steps, repeats)
    try:
        return _BACKENDS[backend](run)
    finally:
        run.close()
        torch.set_num_threads(threads)  # importing ffcv and building its loader change torch's thread count


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.3g}"


def bottleneck(stages: Sequence[dict[str, Any]], cores: int, device_type: str) -> dict[str, Any]:
    """The stage that limits one backend, from its stage rows (:meth:`StageCost.row`, plus a ``model`` row
    when the training step was measured).

    Stages that run on the CPU share its ``cores``: together they allow at most ``cores * 1000 / (sum of
    core-s per 1k pairs)`` pairs/s, limited most by the stage with the largest share (CPU-bound). A read
    whose threads mostly wait (CPU busy < 50% of its wall time) is limited by storage instead: its own
    rate (IO-bound). Device stages run one after another on the accelerator: ``1 / sum(1 / rate)``, limited
    most by the slowest (device-bound). Without an accelerator the device stages run on the CPU too.

    Returns:
        ``limit`` (CPU / IO / device), ``stage``, ``pairs_per_s`` (the ceiling), ``loader_cpu_pairs_per_s``
        (the CPU ceiling of the loader's stages alone) and ``line``, one sentence saying all that.
    """
    rows = [s for s in stages if s.get("pairs_per_s") is not None]
    on_cpu = [s for s in rows if device_type == "cpu" or s["side"] == "host"]
    on_device = [s for s in rows if device_type != "cpu" and s["side"] == "device"]

    def cpu_ceiling(group: list[dict[str, Any]]) -> tuple[float, dict[str, Any] | None, float]:
        total = sum(s["core_s_per_1k_pairs"] for s in group)
        top = max(group, key=lambda s: s["core_s_per_1k_pairs"], default=None)
        return (cores * 1000.0 / total if total > 0 else float("inf")), top, total

    limits: list[tuple[float, str, dict[str, Any] | None, str]] = []
    ceiling, top, total = cpu_ceiling(on_cpu)
    if top is not None:
        share = top["core_s_per_1k_pairs"] / total if total else 0.0
        shared = " (no GPU: the model step shares them)" if device_type == "cpu" and any(
            s["stage"] == "model" for s in on_cpu) else ""
        limits.append((ceiling, "CPU", top, f"{top['stage']} takes {100 * share:.0f}% of the {_fmt(total)} core-s "
                       f"per 1k pairs on the CPU -> <= {_fmt(ceiling)} pairs/s on {cores} cores{shared}"))
    read = next((s for s in rows if s["stage"] == "read"), None)
    if read is not None and read.get("threads"):
        busy = read["core_s_per_1k_pairs"] * read["pairs_per_s"] / 1000.0 / read["threads"]
        if busy < 0.5:
            limits.append((read["pairs_per_s"], "IO", read, f"read waits on storage (CPU busy {100 * busy:.0f}% of "
                           f"its threads) -> <= {_fmt(read['pairs_per_s'])} pairs/s"))
    if on_device:
        slow = min(on_device, key=lambda s: s["pairs_per_s"])
        rate = 1.0 / sum(1.0 / s["pairs_per_s"] for s in on_device)
        limits.append((rate, "device", slow, f"device stages in turn -> <= {_fmt(rate)} pairs/s, slowest "
                       f"{slow['stage']} ({_fmt(slow['pairs_per_s'])} pairs/s)"))
    loader_cpu, loader_top, loader_total = cpu_ceiling([s for s in on_cpu if s["stage"] != "model"])
    if not limits:
        return {"limit": None, "stage": None, "pairs_per_s": None, "loader_cpu_pairs_per_s": None,
                "line": "no stage measured"}
    rate, limit, stage, why = min(limits, key=lambda x: x[0])
    line = f"{limit}-bound: {stage['stage']} limits it ({why})"
    if any(s["stage"] == "model" for s in on_cpu) and loader_top is not None:
        line += (f"; the loader's stages alone: {loader_top['stage']} is "
                 f"{100 * loader_top['core_s_per_1k_pairs'] / loader_total:.0f}% of {_fmt(loader_total)} core-s "
                 f"-> <= {_fmt(loader_cpu)} pairs/s")
    return {"limit": limit, "stage": stage["stage"], "pairs_per_s": rate,
            "loader_cpu_pairs_per_s": loader_cpu if loader_top is not None else None, "line": line}


def project(stages: Sequence[dict[str, Any]], cores: int) -> dict[str, Any]:
    """A projection (not a measurement) for a GPU machine with ``cores`` CPU cores: the ``host`` stages only,
    at the per-core cost measured here, scaled linearly; the ``device`` stages (augmentation, and for
    small raw images the crop; DALI's whole graph) leave the CPU there.

    Returns:
        ``cores``, ``cpu_stages`` (names), ``core_s_per_1k_pairs`` (their sum), ``pairs_per_s`` (the
        CPU-side ceiling, None when nothing is left on the CPU) and ``line``.
    """
    host = [s for s in stages if s.get("pairs_per_s") is not None and s["side"] == "host" and s["stage"] != "model"]
    total = sum(s["core_s_per_1k_pairs"] for s in host)
    rate = cores * 1000.0 / total if total > 0 else None
    names = " + ".join(s["stage"] for s in host) or "nothing"
    moved = ", ".join(s["stage"] for s in stages if s["side"] == "device" and s["stage"] != "model"
                      and s.get("pairs_per_s") is not None) or "nothing"
    line = (f"PROJECTION, not measured: on a GPU machine with {cores} cores the CPU side ({names}) costs "
            f"{_fmt(total)} core-s per 1k pairs as here -> <= {_fmt(rate) if rate else 'unbounded'} pairs/s "
            f"(linear in cores, this machine's per-core speed); on the device there: {moved}")
    return {"cores": cores, "cpu_stages": [s["stage"] for s in host], "core_s_per_1k_pairs": total,
            "pairs_per_s": rate, "line": line}
