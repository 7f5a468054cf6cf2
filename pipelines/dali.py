"""DALI backend: read, decode and augment every view inside one DALI pipeline per process.

On a GPU the JPEGs are decoded by nvJPEG (``decoders`` on "mixed") and every op runs on the GPU; on a
machine without one the very same pipeline runs on the CPU (``device_id=None``, decoders on "cpu"). The
only difference between the two is :func:`_decoder_device` and the ``device_id`` passed at the call.

Per view, the spec's order (crop -> flip -> jitter -> grayscale -> blur -> solarize -> normalise) becomes::

    random resized crop   on the image decoded once for all views (or fused into the decoder)
    brightness_contrast   jitter's brightness and contrast, pivot = the image's mean grey (torchvision's)
    color_twist           jitter's saturation and hue (degrees) AND grayscale (saturation 0)
    gaussian_blur         per-sample sigma, window 2*ceil(3 sigma)+1 capped at the spec's window
    solarize              arithmetic on uint8, only when the spec asks for it
    crop_mirror_normalize flip + normalise + layout + dtype in one pass

Flip moves to the end: it commutes with every colour op and with the symmetric blur, so the result is
the spec's. Probabilities are coin flips: jitter and grayscale fold into the ops' factors (1 / hue 0
when off, saturation 0 when grey); blur and solarize sit under DALI conditionals so unselected samples
cost nothing. Colour ops run after the crop, on output-size pixels only.

Known, accepted differences from torchvision (the parity test compares statistics, not pixels): the
four jitter factors are applied in one fixed order instead of a random one, and hue rotates in YIQ
space (DALI) instead of HSV (a few grey levels on saturated colours). The blur window is the 3-sigma
one (at most the spec's): it drops < 0.3% of the kernel's mass per axis and costs 5x less than 23 taps.

Reading, order and resume. The pipeline's input is an index-driven ``fn.external_source``: batch
``b`` of epoch ``e`` is the samples :func:`pipelines.folder.epoch_order` gives this rank (one global
permutation per (seed, epoch), dealt as ``DistributedSampler`` deals it), read by index from an
ImageFolder tree or from a ``.rec`` at the ``.idx`` offsets (:mod:`pipelines.samples`). So every
format gets class-mixed batches and a fresh order each epoch (``readers.mxnet`` could only shard
contiguously, which kept a class-sorted file's classes apart), a resume at ``start_batch`` seeks
straight to its batch without decoding the skipped ones, and file names that are not UTF-8 are no
problem (Python reads the bytes). One pipeline serves consecutive epochs for as long as the caller
asks for them in order (a rebuild would drain DALI's prefetch queue); a jump elsewhere rebuilds it.
Before the first pipeline every sample is checked once (:func:`pipelines.samples.bad_samples`, cached
next to the data): zero-byte, truncated, random-bytes files and corrupt records are skipped,
counted in ``bad_files`` and reported by name (file, or record index and file). Last-batch policy:
drop the partial batch; every process yields ``(N // world_size) // batch_size`` batches over the N
good samples, so all processes step together with a full global batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
except ImportError as e:  # pragma: no cover - exercised only where DALI is absent
    raise ImportError(
        "the DALI backend needs NVIDIA DALI; install it with: pip install -e '.[dali]' "
        f"(nvidia-dali-cuda130) [{e}]"
    ) from e

from .batch import Batch, LoaderConfig
from .folder import epoch_order, train_classes
from .samples import RecordSamples, Samples, TreeSamples, bad_samples
from .spec import RecipeSpec, ViewSpec

__all__ = ["DaliLoader", "IndexedSource", "build_dali_loader", "ressl_pipeline"]

log = logging.getLogger(__name__)

# Decode once and crop each view from it (False), or decode each view's crop window (True); measured, see README.
DEFAULT_FUSED_CROP = False
_DTYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}


def _decoder_device(gpu: bool) -> str:
    """The one CPU/GPU switch of the graph: nvJPEG on "mixed" puts everything after it on the GPU."""
    return "mixed" if gpu else "cpu"


def _crop(encoded, decoded, view: ViewSpec, gpu: bool):
    """Random resized crop to ``view.size``: fused into the decoder when ``decoded`` is None."""
    area, aspect = list(view.scale), list(view.ratio)
    if decoded is None:
        img = fn.decoders.image_random_crop(encoded, device=_decoder_device(gpu), output_type=types.RGB,
                                            random_area=area, random_aspect_ratio=aspect, num_attempts=10)
        return fn.resize(img, size=[view.size, view.size], antialias=True)
    return fn.random_resized_crop(decoded, size=[view.size, view.size], random_area=area,
                                  random_aspect_ratio=aspect, num_attempts=10, antialias=True)


def _uniform(lo: float, hi: float):
    return fn.random.uniform(range=[lo, hi]) if hi > lo else lo


def _coin(p: float):
    """Per-sample 1.0 with probability ``p``, else 0.0 (a float factor for arithmetic on op arguments)."""
    return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)


def _mean_luma(img, gpu: bool):
    """Per-sample mean grey level (an argument input, so it is brought to the CPU in GPU mode)."""
    rgb = fn.reductions.mean(img, axes=[0, 1])
    luma = rgb[0] * 0.299 + rgb[1] * 0.587 + rgb[2] * 0.114
    return luma.cpu() if gpu else luma


def _view(encoded, decoded, view: ViewSpec, spec: RecipeSpec, gpu: bool, dtype, layout: str):
    """Build one view from its ViewSpec (uint8 HWC image in, normalised ``layout`` tensor out)."""
    img = _crop(encoded, decoded, view, gpu)
    jit = view.jitter if view.jitter is not None and view.jitter.p > 0 else None
    saturation, hue = 1.0, 0.0
    if jit is not None:
        on = _coin(jit.p)
        # off -> factor 1 and hue 0; torchvision draws factors in [max(0, 1-s), 1+s] and the hue in turns.
        brightness = 1.0 + on * (_uniform(max(0.0, 1 - jit.brightness), 1 + jit.brightness) - 1.0)
        contrast = 1.0 + on * (_uniform(max(0.0, 1 - jit.contrast), 1 + jit.contrast) - 1.0)
        saturation = 1.0 + on * (_uniform(max(0.0, 1 - jit.saturation), 1 + jit.saturation) - 1.0)
        hue = on * _uniform(-360.0 * jit.hue, 360.0 * jit.hue)
        # torchvision's contrast pivots on the image's mean grey, DALI's default on 128: pass the mean.
        img = fn.brightness_contrast(img, brightness=brightness, contrast=contrast,
                                     contrast_center=_mean_luma(img, gpu))
    if view.gray_p > 0:
        # Grey after jitter: zero saturation keeps only luma (0.299, 0.587, 0.114), torchvision's weights.
        saturation = saturation * (1.0 - _coin(view.gray_p))
    if jit is not None or view.gray_p > 0:
        img = fn.color_twist(img, saturation=saturation, hue=hue)
    if view.blur_p > 0:
        lo, hi = view.blur_sigma  # DALI rejects an empty range: a fixed sigma is a one-value draw
        sigma = fn.random.uniform(range=[lo, hi]) if hi > lo else fn.random.uniform(values=[float(lo)])
        # DALI's own window for sigma alone is 2*ceil(3 sigma)+1 (the cheap one); never wider than the spec's.
        window = fn.cast(dmath.min(2.0 * dmath.ceil(3.0 * sigma) + 1.0, float(view.blur_kernel)), dtype=types.INT32)
        if fn.random.coin_flip(probability=view.blur_p, dtype=types.BOOL):
            img = fn.gaussian_blur(img, sigma=sigma, window_size=window)
    if view.solarize_p > 0:
        threshold = round(view.solarize_threshold * 255)
        if fn.random.coin_flip(probability=view.solarize_p, dtype=types.BOOL):
            x = fn.cast(img, dtype=types.INT16)
            img = fn.cast(x + (x >= threshold) * (255 - 2 * x), dtype=types.UINT8)
    flip = fn.random.coin_flip(probability=view.flip_p) if view.flip_p > 0 else 0
    return fn.crop_mirror_normalize(img, dtype=dtype, output_layout=layout, mirror=flip,
                                    mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std])




@pipeline_def(enable_conditionals=True)
def ressl_pipeline(spec: RecipeSpec, *, source, gpu: bool = False, fused_crop: bool = False, dtype=types.FLOAT,
                   layout: str = "HWC"):
    """Source -> decode once -> one :func:`_view` per view of ``spec``; outputs are views then labels.

    ``source`` is called with DALI's ``BatchInfo`` and returns (encoded images, int64 labels) for that
    batch (an :class:`IndexedSource`). With ``fused_crop`` each view decodes only its own crop window
    instead of sharing one full decode.
    """
    encoded, label = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                        dtype=[types.UINT8, types.INT64])
    decoded = None if fused_crop else fn.decoders.image(encoded, device=_decoder_device(gpu), output_type=types.RGB)
    views = [_view(encoded, decoded, v, spec, gpu, dtype, layout) for v in spec.views]
    return (*views, label)


class IndexedSource:
    """``fn.external_source`` callable: iteration ``k`` is batch ``start_batch + k`` of the endless run of
    epochs that begins at ``epoch`` (whole batches of :func:`epoch_order` over the good samples)."""

    def __init__(self, samples: Samples, good: np.ndarray, *, batch_size: int, rank: int, world_size: int,
                 seed: int, epoch: int, start_batch: int):
        self.samples, self.good = samples, good
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.epoch, self.start_batch = epoch, start_batch
        self.per_epoch = (len(good) // world_size) // batch_size
        self._orders: dict[int, np.ndarray] = {}

    def indices(self, epoch: int, batch: int) -> np.ndarray:
        """Sample indices (into ``samples``) of batch ``batch`` of ``epoch`` for this rank."""
        if epoch not in self._orders:
            self._orders = {epoch: self.good[epoch_order(len(self.good), seed=self.seed, epoch=epoch, rank=self.rank,
                                                         world_size=self.world_size)]}
        return self._orders[epoch][batch * self.batch_size : (batch + 1) * self.batch_size]

    def __call__(self, info) -> tuple[list[np.ndarray], np.ndarray]:
        e, b = divmod(self.start_batch + info.iteration, self.per_epoch)
        idx = self.indices(self.epoch + e, b)
        images = [np.frombuffer(self.samples.encoded(int(i)), dtype=np.uint8) for i in idx]
        return images, self.samples.labels[idx].astype(np.int64)


class DaliLoader:
    """Per-process DALI loader that yields :class:`pipelines.batch.Batch` on ``device``.

    Args:
        spec: the recipe.
        samples: the split (:class:`~pipelines.samples.TreeSamples` or :class:`~pipelines.samples.RecordSamples`).
        batch_size: images per process per step.
        device: where batches are delivered; CUDA selects the GPU pipeline on that device.
        rank, world_size: this process's shard.
        seed: base seed (per-epoch order; augmentation stream with the rank and position).
        num_threads: DALI CPU threads (also the threads of the one-time sample check).
        channels_last: deliver NCHW tensors with channels-last strides (DALI writes HWC, no copy).
        dtype: torch.float32, or torch.float16 to feed AMP directly.
        fused_crop: decode only each view's crop window (one partial decode per view) instead of one
            full decode shared by all views.
    """

    def __init__(self, spec: RecipeSpec, samples: Samples, *, batch_size: int, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_threads: int = 2,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32, fused_crop: bool = False):
        if dtype not in _DTYPES:
            raise ValueError(f"DaliLoader dtype must be torch.float32 or torch.float16, got {dtype}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"shard rank={rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        if self.gpu and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device} requested but CUDA is not available")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"DALI delivers to cpu or cuda devices, got {self.device}")
        if len(samples) // world_size < batch_size:
            raise ValueError(f"{len(samples)} samples are too few for {world_size} process(es) x batch {batch_size}: "
                             f"each shard must hold at least one whole batch")
        self.spec, self.samples, self.batch_size = spec, samples, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_threads, self.channels_last = num_threads, channels_last
        self.dtype, self.fused_crop = dtype, fused_crop
        bad = bad_samples(samples, threads=num_threads)
        self.bad_files = len(bad)
        self.bad = bad
        self.good = np.setdiff1d(np.arange(len(samples)), np.fromiter(bad, dtype=np.int64, count=len(bad)))
        self.num_samples = len(self.good)
        if self.num_samples // world_size < batch_size:
            raise ValueError(f"{self.num_samples} readable samples ({self.bad_files} unreadable skipped) are too "
                             f"few for {world_size} process(es) x batch {batch_size}")
        self.device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if self.gpu else None
        self.epoch, self.start_batch = 0, 0
        self._live: _LivePipeline | None = None
        self.names = [v.name for v in spec.views]
        self.weak_name, self.strong_names = spec.weak.name, [v.name for v in spec.strong]

    def __len__(self) -> int:
        return (self.num_samples // self.world_size) // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Shuffle for ``epoch`` and skip its first ``start_batch`` batches (resume mid-epoch, no decode)."""
        if epoch < 0 or not 0 <= start_batch <= len(self):
            raise ValueError(f"set_epoch: need epoch >= 0 and 0 <= start_batch <= {len(self)}, "
                             f"got epoch={epoch}, start_batch={start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def _build(self, start_batch: int) -> _LivePipeline:
        """A pipeline whose stream starts at batch ``start_batch`` of epoch ``epoch``."""
        source = IndexedSource(self.samples, self.good, batch_size=self.batch_size, rank=self.rank,
                               world_size=self.world_size, seed=self.seed, epoch=self.epoch,
                               start_batch=start_batch)
        # The augmentation stream: base seed + rank, moved on by the position the stream starts at.
        position = self.epoch * len(self) + start_batch
        seed = (self.seed + self.rank + 1_000_003 * position) % (1 << 31)
        # channels_last: DALI writes HWC and torch sees NCHW with channels-last strides, no copy either way.
        layout = "HWC" if self.channels_last else "CHW"
        pipe = ressl_pipeline(self.spec, source=source, gpu=self.gpu, fused_crop=self.fused_crop,
                              dtype=_DTYPES[self.dtype], layout=layout, batch_size=self.batch_size,
                              num_threads=self.num_threads, device_id=self.device_id, seed=seed,
                              prefetch_queue_depth=2, exec_dynamic=True)
        # Endless iterator (the source never ends): this class counts the batches of an epoch.
        it = DALIGenericIterator([pipe], [*self.names, "label"], size=-1, auto_reset=False,
                                 last_batch_policy=LastBatchPolicy.DROP)
        return _LivePipeline(pipe, it, self.epoch, start_batch)

    def _to_batch(self, out: dict[str, torch.Tensor]) -> Batch:
        views = {n: out[n].permute(0, 3, 1, 2) if self.channels_last else out[n] for n in self.names}
        weak = views[self.weak_name]
        label = out["label"].reshape(len(weak), -1)[:, 0].to(torch.int64)
        return Batch(weak=weak, strong=[views[n] for n in self.strong_names],
                     label=label.to(self.device, non_blocking=True))

    def __iter__(self) -> Iterator[Batch]:
        start, self.start_batch = self.start_batch, 0  # a resume position serves one pass
        todo = len(self) - start
        if todo <= 0:
            return
        live = self._live
        if live is None or live.busy or (live.epoch, live.batch) != (self.epoch, start):
            self._live = None  # shuts the old pipeline down (drains its prefetch queue)
            live = self._live = self._build(start)
        live.busy = True
        try:
            for _ in range(todo):
                out = next(live.it)
                live.batch += 1
                yield self._to_batch(out[0])
        finally:
            live.busy = False
            if live.batch == len(self):
                live.epoch, live.batch = live.epoch + 1, 0


class _LivePipeline:
    """A built pipeline and its iterator; the next batch it delivers is batch ``batch`` of ``epoch``."""

    def __init__(self, pipe, it, epoch: int, batch: int):
        self.pipe, self.it, self.epoch, self.batch = pipe, it, epoch, batch
        self.busy = False


def dali_samples(data: str | Path, split: str, classes: list[str] | None = None) -> Samples:
    """The split DALI reads: ``<split>.rec`` + ``.idx`` (preferred) or the ``<split>/`` tree, labelled by
    the train class list (the manifest's ``classes``, else train/'s folders)."""
    data = Path(data)
    rec, idx, folder = data / f"{split}.rec", data / f"{split}.idx", data / split
    classes = train_classes(data) if classes is None else classes
    if rec.is_file() or idx.is_file():
        return RecordSamples(rec, idx, num_classes=len(classes) if classes else None)
    if folder.is_dir():
        return TreeSamples(folder, classes)
    raise FileNotFoundError(f"no DALI-readable data for split {split!r} in {str(data)!r}: expected "
                            f"{split}.rec + {split}.idx (RecordIO) or {split}/ (ImageFolder)")


def build_dali_loader(cfg: LoaderConfig, spec: RecipeSpec, *, split: str, device: torch.device, rank: int,
                      world_size: int, dtype: torch.dtype = torch.float32,
                      fused_crop: bool | None = None) -> DaliLoader:
    """The DALI training loader over ``<cfg.data>/<split>.rec`` + ``.idx`` (preferred) or ``<split>/``.

    Args:
        cfg: the loader options (``num_threads`` = DALI threads; see LoaderConfig).
        spec: the recipe.
        split: dataset split name.
        device: delivery device (CUDA = GPU pipeline on it).
        rank, world_size: Accelerate's process index / count.
        dtype: output dtype, float32 or float16.
        fused_crop: decode per view only its crop window; None = the measured faster default (see README).
    """
    cfg = LoaderConfig.of(cfg)
    batch = cfg.per_process_batch(world_size)
    return DaliLoader(spec, dali_samples(cfg.data, split), batch_size=batch, device=device, rank=rank,
                      world_size=world_size, seed=cfg.seed, num_threads=cfg.threads,
                      channels_last=cfg.channels_last, dtype=dtype,
                      fused_crop=DEFAULT_FUSED_CROP if fused_crop is None else fused_crop)
