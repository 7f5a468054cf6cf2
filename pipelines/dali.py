"""DALI backend: read, decode and augment every view inside one DALI pipeline per process.

On a GPU the JPEGs are decoded by nvJPEG (``decoders`` on "mixed") and every op runs on the GPU; on a
machine without one the very same pipeline runs on the CPU (``device_id=None``, decoders on "cpu"). The
only difference between the two is :func:`_decoder_device` and the ``device_id`` passed at the call.

Per view, the spec's order (crop -> flip -> jitter -> grayscale -> blur -> solarize -> normalise) becomes::

    resized crop          resize with the drawn ROI, on the image decoded once for all views (or a
                          decode of the crop window alone, ``decoders.image_slice``)
    brightness_contrast   jitter's brightness and contrast, pivot = the image's mean grey (torchvision's)
    color_twist           jitter's saturation and hue (degrees) AND grayscale (saturation 0)
    gaussian_blur         per-sample sigma, window 2*ceil(3 sigma)+1 capped at the spec's window
    solarize              arithmetic on uint8, only when the spec asks for it
    crop_mirror_normalize flip + normalise + layout + dtype in one pass

Flip moves to the end: it commutes with every colour op and with the symmetric blur, so the result is
the spec's. Every random choice — crop box, flip, jitter factors, grayscale, blur and its sigma,
solarize — is drawn outside the graph by :mod:`pipelines.draw` from (seed, epoch, sample index, view)
and fed in by the source as per-sample argument inputs: the values the torchvision and FFCV backends
use for the same sample, whatever the thread count, prefetch depth or world size. Jitter and grayscale
fold into the ops' factors (1 / hue 0 when off, saturation 0 when grey); blur and solarize sit under
DALI conditionals so unselected samples cost nothing. Colour ops run after the crop, on output-size
pixels only. Crop boxes are drawn on the stored height x width (read once per sample from the encoded
header), so the decoders leave EXIF orientation alone, as PIL and FFCV do.

Known, accepted differences from torchvision (the parity test compares statistics, not pixels): hue
rotates in YIQ space (DALI) instead of HSV (a few grey levels on saturated colours), and resampling
differs in the last grey level. The blur window is the 3-sigma one (at most the spec's): it drops
< 0.3% of the kernel's mass per axis and costs 5x less than 23 taps.

Reading, order and resume. The pipeline's input is an index-driven ``fn.external_source``: batch
``b`` of epoch ``e`` is the samples :func:`pipelines.order.epoch_order` gives this rank (one global
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

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
    from nvidia.dali.pipeline import do_not_convert
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
except ImportError as e:  # pragma: no cover - exercised only where DALI is absent
    raise ImportError(
        "the DALI backend needs NVIDIA DALI; install it with: pip install -e '.[dali]' "
        f"(nvidia-dali-cuda130) [{e}]"
    ) from e

from .batch import Batch, LoaderConfig
from .draw import view_crops, view_decisions
from .folder import train_classes
from .order import epoch_order
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


# Per view, the parameters the source hands the graph (one [B] or [B,2] array each), from pipelines.draw.
PARAMS = ("roi_start", "roi_end", "flip", "brightness", "contrast", "saturation", "hue", "blur", "sigma", "solarize")
_PARAM_TYPES = {"flip": types.INT32, "blur": types.BOOL, "solarize": types.BOOL}
# nvJPEG scratch sizes of DALI's own ResNet-50 example (bytes): large enough that the decoder does not
# reallocate for ImageNet-size images after the first batches.
_MIXED_HINTS = dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512)


def used_params(view: ViewSpec) -> tuple[str, ...]:
    """The :data:`PARAMS` a view's graph reads (the source hands DALI only those)."""
    jitter = view.jitter is not None and view.jitter.p > 0
    use = {"roi_start", "roi_end", "flip"}
    use |= {"brightness", "contrast"} if jitter else set()
    use |= {"saturation", "hue"} if jitter or view.gray_p > 0 else set()
    use |= {"blur", "sigma"} if view.blur_p > 0 else set()
    use |= {"solarize"} if view.solarize_p > 0 else set()
    return tuple(k for k in PARAMS if k in use)


def _decoder_hints(gpu: bool) -> dict:
    """Decoder options: EXIF orientation off (crop boxes are drawn on the stored height x width, the grid
    PIL decodes and FFCV stores) and, on the GPU, nvJPEG's memory padding."""
    return dict(adjust_orientation=False, **(_MIXED_HINTS if gpu else {}))


def _crop(encoded, decoded, view: ViewSpec, p: dict, gpu: bool):
    """The drawn resized crop to ``view.size``; decoded from the crop window alone when ``decoded`` is None."""
    size = [view.size, view.size]
    if decoded is None:
        shape = p["roi_end"] - p["roi_start"]
        img = fn.decoders.image_slice(encoded, p["roi_start"], shape, device=_decoder_device(gpu),
                                      output_type=types.RGB, axis_names="HW", normalized_anchor=False,
                                      normalized_shape=False, **_decoder_hints(gpu))
        return fn.resize(img, size=size, antialias=True)
    return fn.resize(decoded, size=size, roi_start=p["roi_start"], roi_end=p["roi_end"], roi_relative=False,
                     antialias=True)


def _mean_luma(img, gpu: bool):
    """Per-sample mean grey level (an argument input, so it is brought to the CPU in GPU mode)."""
    rgb = fn.reductions.mean(img, axes=[0, 1])
    luma = rgb[0] * 0.299 + rgb[1] * 0.587 + rgb[2] * 0.114
    return luma.cpu() if gpu else luma


def _view(encoded, decoded, view: ViewSpec, p: dict, spec: RecipeSpec, gpu: bool, dtype, layout: str):
    """Build one view from its ViewSpec and its drawn parameters ``p`` (uint8 HWC in, normalised ``layout`` out)."""
    img = _crop(encoded, decoded, view, p, gpu)
    if view.jitter is not None and view.jitter.p > 0:
        # torchvision's contrast pivots on the image's mean grey, DALI's default on 128: pass the mean.
        img = fn.brightness_contrast(img, brightness=p["brightness"], contrast=p["contrast"],
                                     contrast_center=_mean_luma(img, gpu))
    if (view.jitter is not None and view.jitter.p > 0) or view.gray_p > 0:
        # saturation 0 where the sample is grey: only luma (0.299, 0.587, 0.114) is left, torchvision's weights
        img = fn.color_twist(img, saturation=p["saturation"], hue=p["hue"])
    if view.blur_p > 0:
        # DALI's own window for sigma alone is 2*ceil(3 sigma)+1 (the cheap one); never wider than the spec's.
        sigma = p["sigma"]
        window = fn.cast(dmath.min(2.0 * dmath.ceil(3.0 * sigma) + 1.0, float(view.blur_kernel)), dtype=types.INT32)
        if p["blur"]:
            img = fn.gaussian_blur(img, sigma=sigma, window_size=window)
    if view.solarize_p > 0:
        threshold = round(view.solarize_threshold * 255)
        if p["solarize"]:
            x = fn.cast(img, dtype=types.INT16)
            img = fn.cast(x + (x >= threshold) * (255 - 2 * x), dtype=types.UINT8)
    return fn.crop_mirror_normalize(img, dtype=dtype, output_layout=layout, mirror=p["flip"],
                                    mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std])


@pipeline_def(enable_conditionals=True)
def ressl_pipeline(spec: RecipeSpec, *, source, gpu: bool = False, fused_crop: bool = False, dtype=types.FLOAT,
                   layout: str = "HWC", parallel: bool = False):
    """Source -> decode once -> one :func:`_view` per view of ``spec``; outputs are views then labels.

    ``source`` is called with DALI's ``BatchInfo`` and returns the encoded images, the int64 labels and,
    per view, the arrays named in :data:`PARAMS` (an :class:`IndexedSource`). With ``fused_crop`` each
    view decodes only its own crop window instead of sharing one full decode. With ``parallel`` the source
    runs in the pipeline's ``py_num_workers`` processes, batches ahead of the one being decoded.
    """
    names = [used_params(v) for v in spec.views]
    dtypes = [types.UINT8, types.INT64] + [_PARAM_TYPES.get(k, types.FLOAT) for used in names for k in used]
    reader = dict(parallel=True, prefetch_queue_depth=2) if parallel else {}
    encoded, label, *flat = fn.external_source(source=source, num_outputs=len(dtypes), batch=True, batch_info=True,
                                               dtype=dtypes, **reader)
    params, at = [], 0
    for used in names:  # (DALI's autograph rewrites zip() without its strict= argument: index instead)
        params.append({name: flat[at + j] for j, name in enumerate(used)})
        at += len(used)
    decoded = None if fused_crop else fn.decoders.image(encoded, device=_decoder_device(gpu), output_type=types.RGB,
                                                        **_decoder_hints(gpu))
    views = [_view(encoded, decoded, v, params[k], spec, gpu, dtype, layout) for k, v in enumerate(spec.views)]
    return (*views, label)


def view_params(view: ViewSpec, seed: int, epoch: int, indices: np.ndarray, view_id: int, heights: np.ndarray,
                widths: np.ndarray) -> list[np.ndarray]:
    """The :func:`used_params` arrays of one view for a batch, from :mod:`pipelines.draw` (the values every backend
    uses for these samples): ROI corners in pixels, hue in degrees, saturation 0 for grey samples."""
    boxes = view_crops(view, seed, epoch, indices, view_id, heights, widths).astype(np.float32)
    d = view_decisions(view, seed, epoch, indices, view_id)
    start = boxes[:, :2]
    out = {"roi_start": start, "roi_end": start + boxes[:, 2:], "flip": d["flip"].astype(np.int32),
           "brightness": d["brightness"], "contrast": d["contrast"],
           "saturation": np.where(d["gray"], 0.0, d["saturation"]), "hue": 360.0 * d["hue"],
           "blur": d["blur"], "sigma": d["sigma"], "solarize": d["solarize"]}
    return [np.ascontiguousarray(out[k], dtype=np.bool_ if out[k].dtype == np.bool_ else
                                 (np.int32 if k == "flip" else np.float32)) for k in used_params(view)]


class IndexedSource:
    """``fn.external_source`` callable: iteration ``k`` is batch ``start_batch + k`` of the endless run of
    epochs that begins at ``epoch`` (whole batches of :func:`epoch_order` over the good samples), with
    every view's drawn parameters for exactly those samples."""

    def __init__(self, samples: Samples, good: np.ndarray, spec: RecipeSpec, *, batch_size: int, rank: int,
                 world_size: int, seed: int, epoch: int, start_batch: int, sizes: np.ndarray | None = None):
        self.samples, self.good, self.spec = samples, good, spec
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.epoch, self.start_batch = epoch, start_batch
        self.per_epoch = (len(good) // world_size) // batch_size
        self._orders: dict[int, np.ndarray] = {}
        # stored (height, width) per sample, read from the encoded header once (-1: not read yet)
        self.sizes = np.full((len(samples), 2), -1, np.int64) if sizes is None else sizes

    def indices(self, epoch: int, batch: int) -> np.ndarray:
        """Sample indices (into ``samples``) of batch ``batch`` of ``epoch`` for this rank."""
        if epoch not in self._orders:
            self._orders = {epoch: self.good[epoch_order(len(self.good), seed=self.seed, epoch=epoch, rank=self.rank,
                                                         world_size=self.world_size)]}
        return self._orders[epoch][batch * self.batch_size : (batch + 1) * self.batch_size]

    def _size(self, i: int, data: bytes) -> tuple[int, int]:
        if self.sizes[i, 0] < 0:
            with Image.open(io.BytesIO(data)) as img:  # the header only: no pixel is decoded
                self.sizes[i] = (img.height, img.width)
        return int(self.sizes[i, 0]), int(self.sizes[i, 1])

    @do_not_convert  # a parallel source is pickled to the workers as written, not rewritten by AutoGraph
    def __call__(self, info) -> list:
        e, b = divmod(self.start_batch + info.iteration, self.per_epoch)
        epoch = self.epoch + e
        idx = self.indices(epoch, b)
        data = [self.samples.encoded(int(i)) for i in idx]
        hw = np.array([self._size(int(i), d) for i, d in zip(idx, data, strict=True)], np.int64)
        out = [[np.frombuffer(d, dtype=np.uint8) for d in data], self.samples.labels[idx].astype(np.int64)]
        for view_id, v in enumerate(self.spec.views):
            out += view_params(v, self.seed, epoch, idx, view_id, hw[:, 0], hw[:, 1])
        return out


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
        reader_workers: processes that run the source (read the encoded files, draw every view's
            parameters) ahead of the pipeline, DALI's parallel external source; 0 = in the training process.
            Every choice is still a function of the batch's position, so the batches are the same.
    """

    def __init__(self, spec: RecipeSpec, samples: Samples, *, batch_size: int, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_threads: int = 2,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32, fused_crop: bool = False,
                 reader_workers: int = 0):
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
        if reader_workers < 0:
            raise ValueError(f"reader_workers must be >= 0, got {reader_workers}")
        self.reader_workers = reader_workers
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
        self._sizes = np.full((len(samples), 2), -1, np.int64)  # stored image sizes, shared by every pipeline
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
        source = IndexedSource(self.samples, self.good, self.spec, batch_size=self.batch_size, rank=self.rank,
                               world_size=self.world_size, seed=self.seed, epoch=self.epoch,
                               start_batch=start_batch, sizes=self._sizes)
        # Every random choice comes from the source (the counter-based draw); DALI's own seed only fixes the
        # graph's remaining internals.
        seed = self.seed % (1 << 31)
        # channels_last: DALI writes HWC and torch sees NCHW with channels-last strides, no copy either way.
        layout = "HWC" if self.channels_last else "CHW"
        workers = {}
        if self.reader_workers:  # fork is cheap, but not once CUDA is initialised in this process
            workers = dict(py_num_workers=self.reader_workers, py_start_method="spawn" if self.gpu else "fork")
        pipe = ressl_pipeline(self.spec, source=source, gpu=self.gpu, fused_crop=self.fused_crop,
                              dtype=_DTYPES[self.dtype], layout=layout, parallel=bool(self.reader_workers),
                              batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                              seed=seed, prefetch_queue_depth=2, exec_dynamic=True, **workers)
        # Endless iterator (the source never ends): this class counts the batches of an epoch.
        it = DALIGenericIterator([pipe], [*self.names, "label"], size=-1, auto_reset=False,
                                 last_batch_policy=LastBatchPolicy.DROP)
        return _LivePipeline(pipe, it, self.epoch, start_batch)

    def _to_batch(self, out: dict[str, torch.Tensor]) -> Batch:
        views = {n: out[n].permute(0, 3, 1, 2) if self.channels_last else out[n] for n in self.names}
        weak = views[self.weak_name]
        # a copy: the CPU label lives in DALI's buffer, which the next batch may reuse before an async copy ran
        label = out["label"].reshape(len(weak), -1)[:, 0].to(torch.int64, copy=True)
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
                      fused_crop=DEFAULT_FUSED_CROP if fused_crop is None else fused_crop,
                      reader_workers=cfg.dali_reader_workers)
