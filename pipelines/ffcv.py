"""FFCV backend: ``<data>/<split>.beton`` -> :class:`~pipelines.Batch` on the training device.

In FFCV's own Numba threads, :class:`MultiCropDecoder` decodes each stored JPEG (or raw image) once
and cuts every view of one output size from it — random resized crops with each view's scale and
ratio — into a ``[B, V, size, size, 3]`` uint8 batch (``ToTensor``, then ``ToDevice`` off the CPU).
:func:`pipelines.gpu_augment.augment_view` then flips, colours, blurs and normalises each view on
the device: batched tensor ops on an accelerator, its fused Numba kernel on the CPU, running beside
FFCV's decoding threads. The pipeline is the same on every device.

Measured on a loaded 2-core CPU (224 px, weak + strong): decoding once instead of once per view was
~1.4x faster, and running the colour kernel inside FFCV's threads (an FFCV operation) was no faster
than after the loader, so the colour ops stay in gpu_augment, shared with the accelerator path.

Views of different sizes (multi-crop) get one decoder each: FFCV 1.0.2 has no field mapper, so each
extra one is ``PipelineSpec("image", ...)`` under its own key, and batches come back as the stored
fields first, then the extra pipelines; outputs are picked by key here so nothing depends on that
order. The stored ``image`` field carries the weak view's size group.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from numba import types as nb_types
from numba.extending import intrinsic, overload

from .batch import FFCV_ORDERS, Batch, LoaderConfig
from .draw import crop_box, view_key
from .gpu_augment import augment_view, drawn_view_params
from .order import epoch_order
from .resident import ResidentLoader, fits_resident
from .samples import BetonSamples, bad_samples
from .spec import RecipeSpec, ViewSpec

try:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.loader import Loader as _FFCVLoader
    from ffcv.loader import OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation
    from ffcv.pipeline.state import State
    from ffcv.reader import Reader
    from ffcv.transforms import ToDevice, ToTensor
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.traversal_order.quasi_random import QuasiRandom
except ImportError as e:  # pragma: no cover - exercised by a test that hides ffcv
    raise ImportError(
        "the FFCV backend needs the [ffcv] extra, which builds from source against Debian's "
        "libturbojpeg0-dev libopencv-dev pkg-config: `apt-get install libturbojpeg0-dev libopencv-dev "
        f"pkg-config && pip install -e '.[ffcv]'` (import failed: {e})"
    ) from e

__all__ = ["FFCVLoader", "MultiCropDecoder", "SampleIndex", "build_ffcv_loader", "ORDERS"]

ORDERS = FFCV_ORDERS

log = logging.getLogger(__name__)


@intrinsic
def _load_i64(typingctx, address):
    """JIT code: the int64 stored at ``address`` (a pointer given as an integer)."""
    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], context.get_value_type(nb_types.CPointer(nb_types.int64))))
    return nb_types.int64(nb_types.intp), codegen


def read_cell(address: int) -> int:
    """The int64 at ``address``: how FFCV's compiled code reads the epoch, which changes after it is compiled
    (Numba freezes every closure and global value at compile time; a loader-owned cell is read at run time)."""
    return ctypes.c_int64.from_address(address).value


@overload(read_cell)
def _read_cell_jit(address):
    return lambda address: _load_i64(address)


class EpochCell:
    """One int64 the loader writes (the epoch being read) and the compiled decoders read."""

    def __init__(self) -> None:
        self._value = np.zeros(1, np.int64)
        self.address = int(self._value.ctypes.data)

    def set(self, epoch: int) -> None:
        self._value[0] = epoch


class MultiCropDecoder(Operation):
    """FFCV decoder: decode each stored image once and cut several random resized crops from it.

    FFCV's own decoder gives one crop per pipeline, so two views cost two JPEG decodes (the largest
    CPU cost left once the colour ops are fused). This one takes views of equal output size and
    writes ``[B, V, size, size, 3]`` uint8: crop ``v`` with ``scales[v]`` / ``ratios[v]``.

    The crop box of sample ``i`` in view ``view_ids[v]`` is :func:`pipelines.draw.crop_box` of
    ``(seed, epoch, i, view_ids[v])`` — FFCV's own crop draws from ``np.random`` in its worker
    threads, so its crops change from run to run and with the thread count. ``epoch`` is read at
    run time from ``epoch_cell`` (an address, see :func:`read_cell`). Flip is left to
    :func:`~pipelines.gpu_augment.augment_view` (FFCV's flip expects one image).
    """

    def __init__(self, size: int, scales: list[tuple[float, float]], ratios: list[tuple[float, float]],
                 view_ids: list[int], seed: int, epoch_cell: int):
        super().__init__()
        if size <= 0 or not scales or not len(scales) == len(ratios) == len(view_ids):
            raise ValueError(f"MultiCropDecoder: need size > 0 and one (scale, ratio, view id) per crop, got "
                             f"size={size}, scales={scales}, ratios={ratios}, view_ids={view_ids}")
        self.size = size
        self.scales = np.array(scales, np.float64)
        self.ratios = np.array(ratios, np.float64)
        self.view_ids = np.array(view_ids, np.int64)
        self.seed = int(seed)
        self.epoch_cell = int(epoch_cell)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        max_pixels = int(self.metadata["height"].max()) * int(self.metadata["width"].max())
        out_shape = (len(self.scales), self.size, self.size, 3)
        u8 = np.dtype(np.uint8)
        return (replace(previous_state, jit_mode=True, shape=out_shape, dtype=u8),
                (AllocationQuery(out_shape, u8), AllocationQuery((max_pixels * 3,), u8)))

    def generate_code(self):
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        decode_c = Compiler.compile(imdecode)
        resize_c = Compiler.compile(resize_crop)
        key_c = view_key.jit
        crop_c = crop_box.jit
        jpg = IMAGE_MODES["jpg"]
        scales, ratios, view_ids = self.scales, self.ratios, self.view_ids
        n_crops = len(scales)
        seed, cell = self.seed, self.epoch_cell

        def decode_crops(batch_indices, storage, metadata, storage_state):
            out, scratch = storage
            epoch = read_cell(cell)
            for k in my_range(len(batch_indices)):
                sample = batch_indices[k]
                field = metadata[sample]
                data = mem_read(field["data_ptr"], storage_state)
                h = np.uint32(field["height"])
                w = np.uint32(field["width"])
                if field["mode"] == jpg:
                    decode_c(data, scratch[k], h, w, h, w, 0, 0, 1, 1, False, False)
                    image = scratch[k][: 3 * h * w].reshape(h, w, 3)
                else:
                    image = data.reshape(h, w, 3)
                for v in range(n_crops):
                    key = key_c(seed, epoch, sample, view_ids[v])
                    i, j, ch, cw = crop_c(key, np.int64(h), np.int64(w), scales[v, 0], scales[v, 1], ratios[v, 0],
                                          ratios[v, 1])
                    resize_c(image, i, i + ch, j, j + cw, out[k, v])
            return out[: len(batch_indices)]

        decode_crops.is_parallel = True
        return decode_crops


class SampleIndex(Operation):
    """FFCV decoder of any field that yields the batch's sample indices (int64), so the loader knows which
    samples a batch holds whatever order, prefetch or thread count produced it."""

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        i64 = np.dtype(np.int64)
        return replace(previous_state, jit_mode=True, shape=(1,), dtype=i64), AllocationQuery((1,), i64)

    def generate_code(self):
        def sample_indices(batch_indices, destination, metadata, storage_state):
            for k in range(len(batch_indices)):
                destination[k, 0] = batch_indices[k]
            return destination[: len(batch_indices)]

        return sample_indices


# --------------------------------------------------------------------------------------------------
# Traversal order: explicit shards (rank / world_size given, no torch.distributed needed) + resume.
# --------------------------------------------------------------------------------------------------


class _ShardedOrder(TraversalOrder):
    """Epoch order of this process's samples; ``skip`` drops the first samples (mid-epoch resume).

    ``random``/``sequential``: :func:`pipelines.order.epoch_order` over the loader's ``indices`` (the
    samples that decode), the order every backend uses: one permutation per (seed, epoch), dealt as
    ``DistributedSampler`` deals it — every sample once per epoch across ranks, equal counts per rank.
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
            order = idx[epoch_order(len(idx), seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                                    shuffle=self.kind == "random", drop_last=self.drop_last)]
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
                 drop_last: bool, channels_last: bool, out_dtype: torch.dtype, augment_impl: str = "auto",
                 indices: np.ndarray | None = None, bad_files: int = 0):
        self.path = path
        self.bad_files = bad_files
        self.spec = spec
        self.batch_size = batch_size
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.out_dtype = out_dtype
        self.augment_impl = augment_impl
        self._epoch = 0
        self._cell = EpochCell()  # the epoch the decoders' crop draws read
        self._view_id = {v.name: n for n, v in enumerate(spec.views)}  # the draw's view coordinate
        # Views grouped by output size, weak view's group first; view name -> (pipeline key, crop index).
        groups: dict[int, list[ViewSpec]] = {}
        for v in spec.views:
            groups.setdefault(v.size, []).append(v)
        self._where: dict[str, tuple[str, int]] = {}
        pipelines: dict[str, object] = {}
        for n, (size, views) in enumerate(groups.items()):
            key = "image" if n == 0 else f"crops_{size}"
            self._where.update({v.name: (key, k) for k, v in enumerate(views)})
            ops = [ToTensor()] + ([ToDevice(device, non_blocking=True)] if device.type != "cpu" else [])
            decoder = MultiCropDecoder(size, [v.scale for v in views], [v.ratio for v in views],
                                       [self._view_id[v.name] for v in views], seed, self._cell.address)
            pipelines[key] = PipelineSpec("image", decoder=decoder, transforms=ops)
        label_ops = [IntDecoder(), ToTensor()]
        if device.type != "cpu":
            label_ops.append(ToDevice(device, non_blocking=True))
        pipelines["label"] = label_ops
        pipelines["index"] = PipelineSpec("label", decoder=SampleIndex(), transforms=[ToTensor()])
        # FFCV 1.0.2 accepts a custom TraversalOrder only as a class it then fails to call, so the
        # loader is built with SEQUENTIAL and its order swapped for ours before the first epoch.
        self._loader = _FFCVLoader(str(path), batch_size=batch_size, num_workers=num_threads, os_cache=os_cache,
                                   order=OrderOption.SEQUENTIAL, distributed=False, seed=seed, pipelines=pipelines,
                                   drop_last=drop_last, batches_ahead=batches_ahead,
                                   indices=None if indices is None else indices.tolist())
        self._order = _ShardedOrder(self._loader, kind=order, rank=rank, world_size=world_size, drop_last=drop_last)
        self._loader.traversal_order = self._order
        self._loader.first_traversal_order = self._order.sample_order(0)
        self._names = list(self._loader.pipeline_specs)
        self._samples = len(self._order.sample_order(0))
        if len(self) == 0:
            raise ValueError(f"FFCV backend: {str(path)!r} has {len(self._order.indices)} samples, too few for "
                             f"{world_size} process(es) x batch {batch_size} with drop_last={drop_last}")

    def __len__(self) -> int:
        n = self._samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Next iteration yields epoch ``epoch`` from batch ``start_batch`` (skipped batches aren't read).

        Without a call, each new iteration goes on to the following epoch.
        """
        if epoch < 0 or start_batch < 0:
            raise ValueError(f"set_epoch: epoch and start_batch must be >= 0, got {epoch}, {start_batch}")
        self._epoch = epoch
        self._order.skip = start_batch * self.batch_size

    def _view(self, got: dict[str, torch.Tensor], v: ViewSpec, epoch: int, indices: np.ndarray) -> torch.Tensor:
        key, k = self._where[v.name]
        crops = got[key][:, k].permute(0, 3, 1, 2)  # [B,3,H,W] uint8 view into FFCV's buffer
        params = drawn_view_params(v, self.seed, epoch, indices, self._view_id[v.name])
        return augment_view(crops, v, self.spec.mean, self.spec.std, params=params, out_dtype=self.out_dtype,
                            channels_last=self.channels_last, impl=self.augment_impl)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._epoch
        self._loader.next_epoch = epoch
        self._cell.set(epoch)
        self._epoch += 1
        threads = torch.get_num_threads()
        epoch_iter = iter(self._loader)  # draws this epoch's order, which consumes the skip
        torch.set_num_threads(threads)  # FFCV's __iter__ sets torch's intra-op threads to its num_workers
        self._order.skip = 0
        try:
            for out in epoch_iter:
                got = dict(zip(self._names, out, strict=True))
                indices = got["index"].view(-1).cpu().numpy()
                views = {v.name: self._view(got, v, epoch, indices) for v in self.spec.views}
                label = got["label"].view(-1).to(torch.int64, copy=True)  # FFCV reuses its buffer
                yield Batch(weak=views[self.spec.weak.name], strong=[views[v.name] for v in self.spec.strong],
                            label=label)
        finally:
            # FFCV's close() frees the batch memory without waiting for its producer thread: stop and join
            # the thread first, or a consumer leaving mid-epoch can crash the process at exit
            epoch_iter.terminate_event.set()
            epoch_iter.join(timeout=10)
            epoch_iter.close()


def build_ffcv_loader(
    cfg: LoaderConfig,
    spec: RecipeSpec,
    *,
    split: str,
    device: torch.device,
    rank: int,
    world_size: int,
    drop_last: bool = True,
    out_dtype: torch.dtype = torch.float32,
    augment_impl: str = "auto",
    resident: bool | None = None,
) -> FFCVLoader | ResidentLoader:
    """FFCV loader over ``<cfg.data>/<split>.beton`` for process ``rank`` of ``world_size``.

    Records whose JPEG bytes do not decode are found once (cached next to the file, see
    :func:`pipelines.samples.bad_samples`), reported by index and left out of every epoch: FFCV's
    decoder would otherwise hand them on as black images.

    Args:
        cfg: loader options: ``data``, ``batch_size`` (global), ``num_threads`` (FFCV threads),
            ``seed``, ``channels_last``, ``ffcv_order`` ("auto" = quasi_random for one process without
            the OS cache, else random; quasi_random works in one process only: FFCV 1.0.2 has no
            distributed version), ``ffcv_os_cache``, ``ffcv_batches_ahead``.
        spec: the recipe; one FFCV pipeline per view size.
        drop_last: drop the short last batch (training always does: the queue takes whole batches).
        out_dtype: float32, float16 or bfloat16 batches.
        augment_impl: ``impl`` of :func:`augment_view` when it runs ("auto", "torch", "numba").
        resident: hold the split on ``device`` and crop there (:mod:`pipelines.resident`); None = whenever
            it applies (raw pixels, at most 64 px, one size, within the memory budget, order "auto" or
            "random"), True = require it, False = FFCV's threads crop on the CPU.
    """
    cfg = LoaderConfig.of(cfg)
    path = Path(cfg.data) / f"{split}.beton"
    if not path.is_file():
        raise FileNotFoundError(f"FFCV backend: {str(path)!r} does not exist (write it with `make dataset`)")
    if not 0 <= rank < world_size:
        raise ValueError(f"FFCV backend: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    batch = cfg.per_process_batch(world_size)
    order, os_cache = cfg.ffcv_order, cfg.ffcv_os_cache
    if order == "auto":
        order = "quasi_random" if world_size == 1 and not os_cache else "random"
    if order == "quasi_random" and world_size > 1:
        raise ValueError(f"FFCV backend: ffcv_order='quasi_random' works in one process only (FFCV 1.0.2), got "
                         f"world_size={world_size}; use ffcv_order=random")
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"FFCV backend: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if augment_impl not in ("auto", "torch", "numba"):
        raise ValueError(f"FFCV backend: augment_impl must be 'auto', 'torch' or 'numba', got {augment_impl!r}")
    _check_fields(path)
    samples = BetonSamples(path)
    bad = bad_samples(samples, threads=cfg.threads)
    good = np.setdiff1d(np.arange(len(samples)), np.fromiter(bad, dtype=np.int64, count=len(bad)))
    if resident is not False:
        meta = samples.meta
        why = fits_resident(meta["height"], meta["width"], meta["mode"] != IMAGE_MODES["jpg"])
        if why is None and cfg.ffcv_order not in ("auto", "random"):
            why = f"ffcv_order={cfg.ffcv_order!r} (the resident loader visits in the random order)"
        if why is None:
            images = torch.from_numpy(np.stack([np.asarray(samples.image(i)) for i in range(len(samples))]))
            log.info("%s: %d raw %dx%d images held on %s, cropped there (rank %d/%d)", path, len(samples),
                     images.shape[1], images.shape[2], device, rank, world_size)
            return ResidentLoader(images, samples.labels, good, spec, batch_size=batch, device=device, rank=rank,
                                  world_size=world_size, seed=cfg.seed, channels_last=cfg.channels_last,
                                  out_dtype=out_dtype, bad_files=len(bad))
        if resident:
            raise ValueError(f"FFCV backend: {str(path)!r} cannot be held on the device: {why}")
        log.info("%s: crops on the CPU in FFCV's threads (device crops need: %s)", path, why)
    log.info("FFCV loader %s: rank %d/%d, %d threads, order=%s, os_cache=%s, augment on %s (%s), %d bad records",
             path, rank, world_size, cfg.threads, order, os_cache, device, augment_impl, len(bad))
    return FFCVLoader(path, spec, batch_size=batch, num_threads=cfg.threads, device=device, rank=rank,
                      world_size=world_size, seed=cfg.seed, order=order, os_cache=os_cache,
                      batches_ahead=cfg.ffcv_batches_ahead, drop_last=drop_last, channels_last=cfg.channels_last,
                      out_dtype=out_dtype, augment_impl=augment_impl, indices=good, bad_files=len(bad))


def _check_fields(path: Path) -> None:
    """The .beton must hold ``image`` (RGBImageField) and ``label`` (IntField)."""
    try:
        handlers = Reader(str(path)).handlers
    except Exception as e:  # FFCV raises assorted errors on a truncated or foreign file
        raise ValueError(f"FFCV backend: cannot read {str(path)!r} as a .beton: {e}") from e
    for name, cls in {"image": RGBImageField, "label": IntField}.items():
        if not isinstance(handlers.get(name), cls):
            got = {k: type(v).__name__ for k, v in handlers.items()}
            raise ValueError(f"FFCV backend: {str(path)!r} needs field {name!r} of type {cls.__name__}; "
                             f"its fields are {got}")
