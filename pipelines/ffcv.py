"""FFCV backend: ``<data>/<split>.beton`` -> :class:`~pipelines.Batch` on the training device.

FFCV reads the stored JPEG (or raw pixels) once per view in its own Numba threads and decodes
straight into a random-resized crop of the view's size, flips it, and hands the uint8 batch over
(``ToTensor -> ToDevice -> ToTorchImage``); :func:`pipelines.gpu_augment.augment_view` then does the
colour ops, blur and normalisation for the whole batch on the device — batched tensor ops on an
accelerator, its fused Numba kernel on the CPU, running beside FFCV's decoding threads. The pipeline
is the same on every device.

``augment_in_pipeline=True`` instead runs that kernel inside FFCV as :class:`ViewAugment`, an FFCV
operation (flip + colour + blur + normalise per sample in FFCV's threads). Measured on a loaded
2-core CPU it was a little slower than the default (see the benchmark in the README); it stays as an
option for machines where FFCV's threads are the only ones worth having.

FFCV 1.0.2 has no field mapper: each extra view is ``PipelineSpec("image", ...)`` under its own key,
and batches come back as the stored fields first, then the extra pipelines; outputs are picked by
key here so nothing depends on that order. The stored ``image`` field carries the weak view.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import Batch, LoaderConfig
from .gpu_augment import augment_sample, augment_view
from .spec import RecipeSpec, ViewSpec, blur_kernel_size

try:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader as _FFCVLoader
    from ffcv.loader import OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation
    from ffcv.pipeline.state import State
    from ffcv.reader import Reader
    from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.traversal_order.quasi_random import QuasiRandom
except ImportError as e:  # pragma: no cover - exercised by a test that hides ffcv
    raise ImportError(
        "the FFCV backend needs the [ffcv] extra, which builds from source against Debian's "
        "libturbojpeg0-dev libopencv-dev pkg-config: `apt-get install libturbojpeg0-dev libopencv-dev "
        f"pkg-config && pip install -e '.[ffcv]'` (import failed: {e})"
    ) from e

__all__ = ["FFCVLoader", "ViewAugment", "build_ffcv_loader", "ORDERS"]

log = logging.getLogger(__name__)

ORDERS = ("auto", "random", "quasi_random", "sequential")


class ViewAugment(Operation):
    """FFCV operation: a whole view's per-sample random flip + colour + blur + solarize + normalise.

    Input: the decoder's ``[B,H,W,3]`` uint8 crops. Output: ``[B,H,W,3]`` float32, normalised with
    ``mean``/``std`` (use ``ToTensor`` + ``ToTorchImage`` to get a channels_last NCHW tensor).
    Random draws use Numba's per-thread NumPy generator, like FFCV's own crop and flip.
    """

    def __init__(self, view: ViewSpec, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"ViewAugment({view.name!r}): need 3 means and 3 positive stds, got {mean}, {std}")
        self.view = view
        self.mul = np.array([1.0 / s for s in std], np.float32)
        self.add = np.array([-m / s for m, s in zip(mean, std, strict=True)], np.float32)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        if len(previous_state.shape) != 3 or previous_state.shape[2] != 3 or previous_state.dtype != np.uint8:
            raise ValueError(f"ViewAugment({self.view.name!r}) needs [H,W,3] uint8 crops from the decoder, got "
                             f"shape {previous_state.shape} dtype {previous_state.dtype}")
        out_dtype = np.dtype(np.float32)
        return (replace(previous_state, jit_mode=True, dtype=out_dtype),
                AllocationQuery(previous_state.shape, out_dtype))

    def generate_code(self):
        my_range = Compiler.get_iterator()
        view = self.view
        flip_p = view.flip_p
        js = view.jitter
        jit_p = js.p if js is not None else 0.0
        b_lo, b_hi = (max(0.0, 1 - js.brightness), 1 + js.brightness) if js is not None else (1.0, 1.0)
        c_lo, c_hi = (max(0.0, 1 - js.contrast), 1 + js.contrast) if js is not None else (1.0, 1.0)
        s_lo, s_hi = (max(0.0, 1 - js.saturation), 1 + js.saturation) if js is not None else (1.0, 1.0)
        hue_max = js.hue if js is not None else 0.0
        gray_p = view.gray_p
        blur_p = view.blur_p
        sig_lo, sig_hi = view.blur_sigma
        ksize = (view.blur_kernel or blur_kernel_size(view.size)) if blur_p > 0 else 1
        sol_p = view.solarize_p
        thr = view.solarize_threshold
        mul = self.mul
        add = self.add
        kernel = augment_sample

        def view_augment(images, dst):
            n = images.shape[0]
            flip = np.random.rand(n) < flip_p
            jitter = np.random.rand(n) < jit_p
            bri = np.random.uniform(b_lo, b_hi, n)
            con = np.random.uniform(c_lo, c_hi, n)
            sat = np.random.uniform(s_lo, s_hi, n)
            hue = np.random.uniform(-hue_max, hue_max, n)
            gray = np.random.rand(n) < gray_p
            sigma = np.random.uniform(sig_lo, sig_hi, n) * (np.random.rand(n) < blur_p)
            sol = np.random.rand(n) < sol_p
            for i in my_range(n):
                kernel(images[i], dst[i], flip[i], jitter[i], bri[i], con[i], sat[i], hue[i], gray[i],
                       sigma[i], ksize, sol[i], thr, mul, add)
            return dst[:n]

        view_augment.is_parallel = True
        return view_augment


# --------------------------------------------------------------------------------------------------
# Traversal order: explicit shards (rank / world_size given, no torch.distributed needed) + resume.
# --------------------------------------------------------------------------------------------------


class _ShardedOrder(TraversalOrder):
    """Epoch order of this process's samples; ``skip`` drops the first samples (mid-epoch resume).

    ``random``/``sequential``: a global permutation seeded by (seed, epoch), padded by wrapping (or
    truncated with ``drop_last``) to a multiple of ``world_size`` and dealt round-robin, as
    ``DistributedSampler`` — every sample once per epoch across ranks, equal counts per rank.
    ``quasi_random``: FFCV's page-aware order (single process only).
    """

    def __init__(self, loader: _FFCVLoader, *, kind: str, rank: int, world_size: int, drop_last: bool):
        super().__init__(loader)
        self.kind = kind
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.skip = 0
        self._quasi = QuasiRandom(loader) if kind == "quasi_random" else None

    def sample_order(self, epoch: int) -> np.ndarray:
        if self._quasi is not None:
            order = np.asarray(self._quasi.sample_order(epoch))
        else:
            idx = np.asarray(self.indices)
            if self.kind == "random":
                idx = np.random.default_rng([self.seed, epoch]).permutation(idx)
            n = len(idx)
            per_rank = n // self.world_size if self.drop_last else -(-n // self.world_size)
            total = per_rank * self.world_size
            if total > n:
                idx = np.concatenate([idx, idx[: total - n]])
            order = idx[:total][self.rank::self.world_size]
        return order[self.skip:]


# --------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------


class FFCVLoader:
    """:class:`pipelines.Loader` over an FFCV ``.beton``: iterate for :class:`~pipelines.Batch`es.

    Build it with :func:`build_ffcv_loader`. Tensors yielded are this loader's own (not views of
    FFCV's ring buffer), so keeping a batch past the next step is safe.
    """

    def __init__(self, path: Path, spec: RecipeSpec, *, batch_size: int, num_threads: int, device: torch.device,
                 rank: int, world_size: int, seed: int, order: str, os_cache: bool, batches_ahead: int,
                 drop_last: bool, channels_last: bool, out_dtype: torch.dtype, augment_in_pipeline: bool,
                 augment_impl: str = "auto"):
        self.path = path
        self.spec = spec
        self.batch_size = batch_size
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.out_dtype = out_dtype
        self.augment_in_pipeline = augment_in_pipeline
        self.augment_impl = augment_impl
        self._epoch = 0
        self._keys = {v.name: ("image" if v is spec.weak else f"view_{v.name}") for v in spec.views}
        pipelines: dict[str, object] = {}
        for v in spec.views:
            ops = self._view_ops(v)
            pipelines[self._keys[v.name]] = PipelineSpec("image", decoder=ops[0], transforms=ops[1:])
        label_ops = [IntDecoder(), ToTensor()]
        if device.type != "cpu":
            label_ops.append(ToDevice(device, non_blocking=True))
        pipelines["label"] = label_ops
        # FFCV 1.0.2 accepts a custom TraversalOrder only as a class it then fails to call, so the
        # loader is built with SEQUENTIAL and its order swapped for ours before the first epoch.
        self._loader = _FFCVLoader(str(path), batch_size=batch_size, num_workers=num_threads, os_cache=os_cache,
                                   order=OrderOption.SEQUENTIAL, distributed=False, seed=seed, pipelines=pipelines,
                                   drop_last=drop_last, batches_ahead=batches_ahead)
        self._order = _ShardedOrder(self._loader, kind=order, rank=rank, world_size=world_size, drop_last=drop_last)
        self._loader.traversal_order = self._order
        self._loader.first_traversal_order = self._order.sample_order(0)
        self._names = list(self._loader.pipeline_specs)
        self._samples = len(self._order.sample_order(0))
        self._generator = torch.Generator()

    def _view_ops(self, v: ViewSpec) -> list:
        decoder = RandomResizedCropRGBImageDecoder((v.size, v.size), scale=v.scale, ratio=v.ratio)
        if self.augment_in_pipeline:
            return [decoder, ViewAugment(v, self.spec.mean, self.spec.std), ToTensor(),
                    ToTorchImage(channels_last=True, convert_back_int16=False)]
        ops = [decoder]
        if v.flip_p > 0:
            ops.append(RandomHorizontalFlip(flip_prob=v.flip_p))
        ops.append(ToTensor())
        if self.device.type != "cpu":  # on the CPU it would only copy the batch once more
            ops.append(ToDevice(self.device, non_blocking=True))
        ops.append(ToTorchImage(channels_last=True, convert_back_int16=False))
        return ops

    def __len__(self) -> int:
        n = self._samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Next iteration yields epoch ``epoch`` from batch ``start_batch`` (skipped batches aren't read)."""
        if epoch < 0 or start_batch < 0:
            raise ValueError(f"set_epoch: epoch and start_batch must be >= 0, got {epoch}, {start_batch}")
        self._epoch = epoch
        self._order.skip = start_batch * self.batch_size

    def _finish(self, x: torch.Tensor, v: ViewSpec) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.augment_in_pipeline:
            # Copy out of FFCV's reused buffer (and cast / re-layout in the same pass).
            return x.to(self.device, dtype=self.out_dtype, memory_format=fmt, copy=True)
        return augment_view(x, v, self.spec.mean, self.spec.std, self._generator, flip=False,
                            out_dtype=self.out_dtype, channels_last=self.channels_last, impl=self.augment_impl)

    def __iter__(self) -> Iterator[Batch]:
        self._loader.next_epoch = self._epoch
        self._generator.manual_seed((self.seed * 1_000_003 + self.rank) * 10_007 + self._epoch)
        self._epoch += 1
        epoch_iter = iter(self._loader)  # draws this epoch's order, which consumes the skip
        self._order.skip = 0
        try:
            for out in epoch_iter:
                got = dict(zip(self._names, out, strict=True))
                views = [self._finish(got[self._keys[v.name]], v) for v in self.spec.views]
                yield Batch(weak=views[0], strong=views[1:], label=got["label"].view(-1).long())
        finally:
            epoch_iter.close()  # stops FFCV's producer thread if the consumer leaves early


def _check_fields(path: Path) -> None:
    """The .beton must hold ``image`` (RGBImageField) and ``label`` (IntField); reads only its header."""
    try:
        handlers = Reader(str(path)).handlers
    except Exception as e:  # FFCV raises assorted errors on a truncated or foreign file
        raise ValueError(f"FFCV backend: cannot read {str(path)!r} as a .beton: {e}") from e
    want = {"image": RGBImageField, "label": IntField}
    for name, cls in want.items():
        if not isinstance(handlers.get(name), cls):
            got = {k: type(v).__name__ for k, v in handlers.items()}
            raise ValueError(f"FFCV backend: {str(path)!r} needs field {name!r} of type {cls.__name__}; "
                             f"its fields are {got}")


def _option(cfg: LoaderConfig, name: str, value):
    """A keyword argument wins; else the config's attribute of that name; else the default."""
    return value if value is not None else getattr(cfg, name, None)


def build_ffcv_loader(
    cfg: LoaderConfig,
    spec: RecipeSpec,
    *,
    split: str,
    device: torch.device,
    rank: int,
    world_size: int,
    order: str | None = None,
    os_cache: bool | None = None,
    batches_ahead: int | None = None,
    drop_last: bool | None = None,
    out_dtype: torch.dtype = torch.float32,
    augment_in_pipeline: bool = False,
    augment_impl: str = "auto",
) -> FFCVLoader:
    """FFCV loader over ``<cfg.data>/<split>.beton`` for process ``rank`` of ``world_size``.

    Args:
        cfg: ``data``, ``batch_size`` (global), ``num_workers`` (= FFCV threads), ``seed``,
            ``channels_last``; optional ``ffcv_order``, ``os_cache``, ``batches_ahead``, ``drop_last``.
        spec: the recipe; one FFCV pipeline per view.
        order: "auto" (quasi_random for one process without the OS cache, else random), "random",
            "quasi_random" (one process only: FFCV 1.0.2 has no distributed version) or "sequential".
        os_cache: let the OS page cache hold the file (default True; False = FFCV's process cache).
        batches_ahead: batches FFCV prepares in advance (default 3).
        drop_last: drop the short last batch (default True).
        out_dtype: float32, float16 or bfloat16 batches.
        augment_in_pipeline: run the colour ops in FFCV's threads (:class:`ViewAugment`, CPU only)
            instead of :func:`augment_view` after the loader (default False).
        augment_impl: ``impl`` of :func:`augment_view` when it runs ("auto", "torch", "numba").
    """
    path = Path(cfg.data) / f"{split}.beton"
    if not path.is_file():
        raise FileNotFoundError(f"FFCV backend: {str(path)!r} does not exist (write it with `make dataset`)")
    if not 0 <= rank < world_size:
        raise ValueError(f"FFCV backend: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if cfg.batch_size % world_size:
        raise ValueError(f"FFCV backend: batch_size={cfg.batch_size} is not divisible by world_size={world_size}")
    order = _option(cfg, "ffcv_order", order) or "auto"
    os_cache = _option(cfg, "os_cache", os_cache)
    os_cache = True if os_cache is None else bool(os_cache)
    batches_ahead = _option(cfg, "batches_ahead", batches_ahead)
    batches_ahead = 3 if batches_ahead is None else int(batches_ahead)
    drop_last = _option(cfg, "drop_last", drop_last)
    drop_last = True if drop_last is None else bool(drop_last)
    if order not in ORDERS:
        raise ValueError(f"FFCV backend: order must be one of {ORDERS}, got {order!r}")
    if order == "auto":
        order = "quasi_random" if world_size == 1 and not os_cache else "random"
    if order == "quasi_random" and world_size > 1:
        raise ValueError(f"FFCV backend: order='quasi_random' works in one process only (FFCV 1.0.2), got "
                         f"world_size={world_size}; use order='random'")
    if batches_ahead < 1:
        raise ValueError(f"FFCV backend: batches_ahead must be >= 1, got {batches_ahead}")
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"FFCV backend: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if augment_impl not in ("auto", "torch", "numba"):
        raise ValueError(f"FFCV backend: augment_impl must be 'auto', 'torch' or 'numba', got {augment_impl!r}")
    augment_in_pipeline = bool(augment_in_pipeline)
    if augment_in_pipeline and device.type != "cpu":
        raise ValueError(f"FFCV backend: augment_in_pipeline=True runs on the CPU, but device is {device}")
    _check_fields(path)
    num_threads = cfg.num_workers if cfg.num_workers > 0 else (os.cpu_count() or 1)
    log.info("FFCV loader %s: rank %d/%d, %d threads, order=%s, os_cache=%s, colour ops %s", path, rank,
             world_size, num_threads, order, os_cache, "in FFCV (Numba)" if augment_in_pipeline else
             f"after the loader on {device} ({augment_impl})")
    return FFCVLoader(path, spec, batch_size=cfg.batch_size // world_size, num_threads=num_threads, device=device,
                      rank=rank, world_size=world_size, seed=cfg.seed, order=order, os_cache=os_cache,
                      batches_ahead=batches_ahead, drop_last=drop_last, channels_last=cfg.channels_last,
                      out_dtype=out_dtype, augment_in_pipeline=augment_in_pipeline, augment_impl=augment_impl)
