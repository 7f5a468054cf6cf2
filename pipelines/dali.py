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

Epochs and sharding. A pipeline is built at ``set_epoch(e)`` with seed ``cfg.seed + rank + e *
world_size`` and, for small datasets, serves the following epochs too (``CHAIN_SAMPLES``): rebuilding
drains DALI's prefetch queue, which costs whole batches per epoch. Folder data is read by
``readers.file`` from an explicit file list in exactly the reference backend's order
(:class:`pipelines.torchvision.ShardSampler`: a per-epoch permutation, shard ``rank::world_size``,
whole batches only), so resuming at ``start_batch`` skips files without decoding them. RecordIO is
read by ``readers.mxnet``, which only knows contiguous shards and a shuffle buffer: shard ``(rank + e)
% world_size`` of the file, ``random_shuffle`` with a buffer of up to ``SHUFFLE_BUFFER`` records;
resuming replays (decodes) the skipped batches, since the reader cannot seek. Last-batch policy for
both: drop the partial batch; every process yields ``(N // world_size) // batch_size`` batches, so all
processes step together with a full global batch.
"""

from __future__ import annotations

import logging
import os
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

from . import Batch, LoaderConfig
from .spec import RecipeSpec, ViewSpec
from .torchvision import ImageFolderFiles, ShardSampler

__all__ = [
    "SHUFFLE_BUFFER",
    "RecordIOIndex",
    "DaliLoader",
    "build_dali_loader",
    "ressl_pipeline",
]

log = logging.getLogger(__name__)

RECORDIO_MAGIC = 0xCED7230A  # = formats.kernels.RECORD_MAGIC (not imported: that pulls in Numba)
MAGIC_CHECKS = 4096  # records of a .rec whose magic word is checked against the .idx
CHAIN_SAMPLES = 65536  # one pipeline serves consecutive epochs up to this many samples per process
SHUFFLE_BUFFER = 4096  # records held by readers.mxnet's shuffle buffer (memory-mapped, so cheap)
# Decode once and crop each view from it (False), or decode each view's crop window (True); measured, see README.
DEFAULT_FUSED_CROP = False
_DTYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}


class RecordIOIndex:
    """A checked ``<split>.rec`` + ``<split>.idx`` pair: record count and offsets.

    Checked before any pipeline is built: the index must exist, parse as ``key<TAB>offset`` lines,
    point inside the ``.rec`` file, and sampled offsets must start with the RecordIO magic word. A
    ``.rec`` paired with an index from another file fails here instead of decoding garbage.
    """

    def __init__(self, rec: str | os.PathLike, idx: str | os.PathLike):
        self.rec, self.idx = Path(rec), Path(idx)
        if not self.rec.is_file():
            raise FileNotFoundError(f"RecordIO file {str(self.rec)!r} does not exist")
        if not self.idx.is_file():
            raise FileNotFoundError(
                f"RecordIO index {str(self.idx)!r} does not exist; readers.mxnet needs it next to "
                f"{self.rec.name} (write both with `make dataset ... FORMATS=rec`)"
            )
        offsets = []
        with open(self.idx) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2 or not all(p.isdigit() for p in parts):
                    raise ValueError(f"{self.idx}:{lineno}: expected 'key<TAB>offset' (two integers), got {line!r}")
                offsets.append(int(parts[1]))
        if not offsets:
            raise ValueError(f"RecordIO index {str(self.idx)!r} is empty")
        self.offsets = np.sort(np.asarray(offsets, dtype=np.int64))
        size = self.rec.stat().st_size
        if self.offsets[-1] + 8 > size:
            raise ValueError(
                f"RecordIO index {str(self.idx)!r} points at byte {int(self.offsets[-1])} but "
                f"{str(self.rec)!r} has only {size} bytes: the .idx belongs to another .rec"
            )
        data = np.memmap(self.rec, dtype=np.uint8, mode="r")
        # Up to MAGIC_CHECKS evenly spaced records plus the last: a random read each, seconds at most on
        # ImageNet, and an index written for another file fails on nearly every one of them.
        probe = np.unique(np.r_[np.linspace(0, len(self.offsets) - 1, min(MAGIC_CHECKS, len(self.offsets))).astype(
            np.int64), len(self.offsets) - 1])
        words = data[self.offsets[probe][:, None] + np.arange(4)].astype(np.uint32)
        magic = words[:, 0] | (words[:, 1] << 8) | (words[:, 2] << 16) | (words[:, 3] << 24)
        bad = probe[magic != RECORDIO_MAGIC]
        if bad.size:
            raise ValueError(
                f"{len(bad)} of {len(probe)} checked offsets in {str(self.idx)!r} do not start a record of "
                f"{str(self.rec)!r} (first: byte {int(self.offsets[bad[0]])}): the .idx belongs to another .rec"
            )

    def __len__(self) -> int:
        return len(self.offsets)


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
        sigma = fn.random.uniform(range=list(view.blur_sigma))
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
def ressl_pipeline(spec: RecipeSpec, *, files: list[str] | None = None, labels: list[int] | None = None,
                   rec: str | None = None, idx: str | None = None, shard_id: int = 0, num_shards: int = 1,
                   shuffle_buffer: int = SHUFFLE_BUFFER, gpu: bool = False, fused_crop: bool = False,
                   dtype=types.FLOAT, layout: str = "HWC"):
    """Reader -> decode once -> one :func:`_view` per view of ``spec``; outputs are views then labels.

    Exactly one of ``files`` (with ``labels``) or ``rec`` (with ``idx``) names the data. With
    ``fused_crop`` each view decodes only its own crop window instead of sharing one full decode.
    """
    if rec is not None:
        encoded, label = fn.readers.mxnet(path=[rec], index_path=[idx], shard_id=shard_id, num_shards=num_shards,
                                          random_shuffle=True, initial_fill=shuffle_buffer, stick_to_shard=True,
                                          pad_last_batch=False, name="reader")
    else:
        encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="reader")
    decoded = None if fused_crop else fn.decoders.image(encoded, device=_decoder_device(gpu), output_type=types.RGB)
    views = [_view(encoded, decoded, v, spec, gpu, dtype, layout) for v in spec.views]
    return (*views, label)


class DaliLoader:
    """Per-process DALI loader that yields :class:`pipelines.Batch` on ``device``.

    Args:
        spec: the recipe.
        batch_size: images per process per step.
        files: ImageFolder samples (``ImageFolderFiles``), or None for RecordIO.
        recordio: the checked RecordIO pair, or None for folder data.
        device: where batches are delivered; CUDA selects the GPU pipeline on that device.
        rank, world_size: this process's shard.
        seed: base seed (per-epoch file order, per-rank augmentation stream).
        num_threads: DALI CPU threads.
        channels_last: deliver NCHW tensors with channels-last strides (DALI writes HWC, no copy).
        dtype: torch.float32, or torch.float16 to feed AMP directly.
        fused_crop: decode only each view's crop window (one partial decode per view) instead of one
            full decode shared by all views.
    """

    def __init__(self, spec: RecipeSpec, *, batch_size: int, files: ImageFolderFiles | None = None,
                 recordio: RecordIOIndex | None = None, device: torch.device | str = "cpu", rank: int = 0,
                 world_size: int = 1, seed: int = 0, num_threads: int = 2, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32, fused_crop: bool = False):
        if (files is None) == (recordio is None):
            raise ValueError("DaliLoader needs exactly one of files= (ImageFolder) or recordio= (RecordIO)")
        if dtype not in _DTYPES:
            raise ValueError(f"DaliLoader dtype must be torch.float32 or torch.float16, got {dtype}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"shard rank={rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spec, self.batch_size, self.files, self.recordio = spec, batch_size, files, recordio
        self.device = torch.device(device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_threads, self.channels_last = num_threads, channels_last
        self.dtype, self.fused_crop = dtype, fused_crop
        self.num_samples = len(files) if files is not None else len(recordio)
        if self.num_samples // world_size < batch_size:
            raise ValueError(
                f"{self.num_samples} samples are too few for {world_size} process(es) x batch {batch_size}: "
                f"each shard must hold at least one whole batch"
            )
        self.gpu = self.device.type == "cuda"
        if self.gpu and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device} requested but CUDA is not available")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"DALI delivers to cpu or cuda devices, got {self.device}")
        self.device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if self.gpu else None
        self.sampler = ShardSampler(self.num_samples, batch_size, rank, world_size, seed) if files is not None else None
        self.epoch, self.start_batch = 0, 0
        self._live: _LivePipeline | None = None
        self.names = [v.name for v in spec.views]

    def __len__(self) -> int:
        return (self.num_samples // self.world_size) // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Shuffle for ``epoch`` and skip its first ``start_batch`` batches (resume mid-epoch)."""
        if epoch < 0 or not 0 <= start_batch <= len(self):
            raise ValueError(f"set_epoch: need epoch >= 0 and 0 <= start_batch <= {len(self)}, "
                             f"got epoch={epoch}, start_batch={start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def _epochs_per_pipeline(self) -> int:
        """Consecutive epochs one pipeline serves: a rebuild drains the prefetch queue (wasted batches), so
        small datasets chain epochs up to ``CHAIN_SAMPLES`` samples per process."""
        return max(1, CHAIN_SAMPLES // (len(self) * self.batch_size))

    def _build(self, epochs: int):
        """The pipeline for ``epochs`` epochs from ``self.epoch`` (from its batch ``start_batch`` on)."""
        kwargs = dict(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      seed=self.seed + self.rank + self.epoch * self.world_size, prefetch_queue_depth=2,
                      exec_dynamic=True)
        # channels_last: DALI writes HWC and torch sees NCHW with channels-last strides, no copy either way.
        layout = "HWC" if self.channels_last else "CHW"
        common = dict(gpu=self.gpu, fused_crop=self.fused_crop, dtype=_DTYPES[self.dtype], layout=layout)
        if self.files is not None:
            order = []
            for e in range(self.epoch, self.epoch + epochs):
                self.sampler.set_epoch(e, self.start_batch if e == self.epoch else 0)
                order += [i for batch in self.sampler for i, _ in batch]
            files = [self.files.samples[i][0] for i in order]
            labels = [self.files.samples[i][1] for i in order]
            return ressl_pipeline(self.spec, files=files, labels=labels, **common, **kwargs)
        shard = (self.rank + self.epoch) % self.world_size
        shard_len = len(self.recordio) * (shard + 1) // self.world_size - len(self.recordio) * shard // self.world_size
        return ressl_pipeline(self.spec, rec=str(self.recordio.rec), idx=str(self.recordio.idx), shard_id=shard,
                              num_shards=self.world_size, shuffle_buffer=min(SHUFFLE_BUFFER, shard_len),
                              **common, **kwargs)

    def _to_batch(self, out: dict[str, torch.Tensor]) -> Batch:
        views = []
        for name in self.names:
            views.append(out[name].permute(0, 3, 1, 2) if self.channels_last else out[name])
        label = out["label"].reshape(len(views[0]), -1)[:, 0]
        label = (label.round() if label.is_floating_point() else label).to(torch.int64)  # mxnet labels are float
        return Batch(weak=views[0], strong=views[1:], label=label.to(self.device, non_blocking=True))

    def _close(self) -> None:
        """Shut the live pipeline down (drains its prefetch queue)."""
        self._live = None

    def __iter__(self) -> Iterator[Batch]:
        todo = len(self) - self.start_batch
        if todo <= 0:
            return
        live = self._live
        if live is None or live.busy or live.next_epoch != self.epoch or self.start_batch:
            self._close()
            epochs = self._epochs_per_pipeline()
            pipe = self._build(epochs)
            # Endless iterator: this class counts batches, so the RecordIO stream may cross shard passes.
            it = DALIGenericIterator([pipe], [*self.names, "label"], size=-1, auto_reset=False,
                                     last_batch_policy=LastBatchPolicy.DROP)
            live = self._live = _LivePipeline(pipe, it, self.epoch, epochs)
            if self.recordio is not None and self.start_batch:
                log.info("RecordIO resume: replaying %d batches of epoch %d", self.start_batch, self.epoch)
                for _ in range(self.start_batch):
                    next(it)
        live.busy = True
        done = 0
        try:
            for _ in range(todo):
                out = next(live.it)
                yield self._to_batch(out[0])
                done += 1
        finally:
            live.busy = False
            if self._live is live:  # an abandoned older generator must not touch a newer pipeline
                if done == todo and live.epochs_left > 1:
                    live.next_epoch, live.epochs_left = live.next_epoch + 1, live.epochs_left - 1
                else:
                    self._close()


class _LivePipeline:
    """A built pipeline and its iterator, positioned at the start of epoch ``next_epoch``."""

    def __init__(self, pipe, it, next_epoch: int, epochs_left: int):
        self.pipe, self.it, self.next_epoch, self.epochs_left = pipe, it, next_epoch, epochs_left
        self.busy = False


def build_dali_loader(cfg: LoaderConfig, spec: RecipeSpec, *, split: str, device: torch.device, rank: int,
                      world_size: int, dtype: torch.dtype = torch.float32,
                      fused_crop: bool | None = None) -> DaliLoader:
    """The DALI training loader over ``<cfg.data>/<split>.rec`` + ``.idx`` (preferred) or ``<split>/``.

    Args:
        cfg: config with the LoaderConfig fields (``num_workers`` = DALI threads).
        spec: the recipe.
        split: dataset split name.
        device: delivery device (CUDA = GPU pipeline on it).
        rank, world_size: Accelerate's process index / count.
        dtype: output dtype, float32 or float16.
        fused_crop: decode per view only its crop window; None = the measured faster default (see README).
    """
    data = Path(cfg.data)
    rec, idx, folder = data / f"{split}.rec", data / f"{split}.idx", data / split
    files = recordio = None
    if rec.is_file() or idx.is_file():
        recordio = RecordIOIndex(rec, idx)
    elif folder.is_dir():
        files = ImageFolderFiles(folder)
    else:
        raise FileNotFoundError(f"no DALI-readable data for split {split!r} in {str(data)!r}: expected "
                                f"{split}.rec + {split}.idx (RecordIO) or {split}/ (ImageFolder)")
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {world_size} processes")
    return DaliLoader(spec, batch_size=cfg.batch_size // world_size, files=files, recordio=recordio, device=device,
                      rank=rank, world_size=world_size, seed=cfg.seed, num_threads=max(1, cfg.num_workers),
                      channels_last=cfg.channels_last, dtype=dtype,
                      fused_crop=DEFAULT_FUSED_CROP if fused_crop is None else fused_crop)

