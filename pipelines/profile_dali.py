"""DALI's stages apart: decode alone, crop alone, the colour ops alone (see :mod:`pipelines.profile`).

The DALI loader runs decode, crop and the colour ops in one pipeline (:func:`pipelines.dali.ressl_pipeline`).
To cost them apart, each pipeline here runs one of them, fed by ``fn.external_source`` with that op's
input prepared beforehand (encoded bytes, decoded images, cropped images), and built from the loader's
own helpers (:func:`pipelines.dali._crop`, :func:`pipelines.dali._view`), so each op is the loader's.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from . import dali as D
from .spec import RecipeSpec

__all__ = ["dali_stage_steps"]


def _cycle(batches: list) -> Callable:
    """An ``external_source`` callable: iteration ``i`` gets prepared batch ``i mod len(batches)``."""
    return lambda info: batches[info.iteration % len(batches)]


@pipeline_def(exec_dynamic=True)
def _decode_pipeline(*, source, gpu: bool):
    """Encoded bytes -> the loader's decoder (nvJPEG "mixed" on a GPU, libjpeg-turbo on the CPU)."""
    encoded = fn.external_source(source=source, batch=True, batch_info=True, dtype=types.UINT8)
    return fn.decoders.image(encoded, device=D._decoder_device(gpu), output_type=types.RGB, **D._decoder_hints(gpu))


@pipeline_def(exec_dynamic=True)
def _crop_pipeline(spec: RecipeSpec, *, images, rois, gpu: bool):
    """Decoded HWC images -> every view's resized crop of its drawn ROI (the loader's ``_crop``)."""
    img = fn.external_source(source=images, batch=True, batch_info=True, layout="HWC", dtype=types.UINT8,
                             device="gpu" if gpu else "cpu")
    flat = fn.external_source(source=rois, num_outputs=2 * len(spec.views), batch=True, batch_info=True,
                              dtype=types.FLOAT)
    return tuple(D._crop(None, img, v, {"roi_start": flat[2 * k], "roi_end": flat[2 * k + 1]}, gpu)
                 for k, v in enumerate(spec.views))


@pipeline_def(enable_conditionals=True, exec_dynamic=True)
def _colour_pipeline(spec: RecipeSpec, *, crops, params, gpu: bool):
    """Cropped HWC views -> the loader's ``_view`` with a whole-image ROI: colour ops, flip, normalise."""
    names = [D.used_params(v) for v in spec.views]
    dtypes = [D._PARAM_TYPES.get(k, types.FLOAT) for used in names for k in used]
    imgs = fn.external_source(source=crops, num_outputs=len(spec.views), batch=True, batch_info=True, layout="HWC",
                              dtype=types.UINT8, device="gpu" if gpu else "cpu")
    flat = fn.external_source(source=params, num_outputs=len(dtypes), batch=True, batch_info=True, dtype=dtypes)
    out, at = [], 0
    for k, v in enumerate(spec.views):
        p = {name: flat[at + j] for j, name in enumerate(names[k])}
        at += len(names[k])
        out.append(D._view(None, imgs[k], v, p, spec, gpu, types.FLOAT, "CHW"))
    return tuple(out)


def dali_stage_steps(spec: RecipeSpec, samples, batches: list[np.ndarray], *, seed: int, threads: int,
                     device: torch.device) -> dict[str, Callable[[int], object]]:
    """``read``, ``decode``, ``crop`` and ``augment`` steps of the DALI loader for ``batches`` (step ``k`` runs
    prepared batch ``k``; the pipelines' own batch counter cycles the same way)."""
    from torchvision.transforms.v2 import functional as F

    from .draw import view_crops
    from .folder import decode_rgb

    gpu = device.type == "cuda"
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
    b = len(batches[0])
    good = np.concatenate(batches)
    source = D.IndexedSource(samples, good, spec, batch_size=b, rank=0, world_size=1, seed=seed, epoch=0,
                             start_batch=0)
    # IndexedSource visits its own epoch order of `good`: the same samples, in batches of b
    encoded = [[np.frombuffer(samples.encoded(int(i)), np.uint8) for i in idx] for idx in batches]
    images = [[decode_rgb(e.tobytes()) for e in enc] for enc in encoded]
    hw = [(np.array([im.height for im in imgs]), np.array([im.width for im in imgs])) for imgs in images]
    boxes = [[view_crops(v, seed, 0, idx, n, *hw[k]) for n, v in enumerate(spec.views)]
             for k, idx in enumerate(batches)]
    rois = []
    for k in range(len(batches)):
        flat = []
        for box in boxes[k]:
            start = np.ascontiguousarray(box[:, :2], np.float32)
            flat += [start, start + box[:, 2:].astype(np.float32)]
        rois.append(flat)
    crops = [[[np.ascontiguousarray(np.asarray(F.resized_crop(images[k][s], *(int(x) for x in boxes[k][n][s]),
                                                                [v.size, v.size], antialias=True)))
               for s in range(b)] for n, v in enumerate(spec.views)] for k in range(len(batches))]
    params = []
    for idx in batches:
        flat = []
        for n, v in enumerate(spec.views):
            size = np.full(len(idx), v.size)
            got = D.view_params(v, seed, 0, idx, n, size, size)
            got[0] = np.zeros_like(got[0])  # whole-image ROI: the view is already cropped
            got[1] = np.full_like(got[1], float(v.size))
            flat += got
        params.append(flat)
    common = dict(batch_size=b, num_threads=threads, device_id=device_id, seed=seed % (1 << 31),
                  prefetch_queue_depth=2)
    pipes = {"decode": _decode_pipeline(source=_cycle(encoded), gpu=gpu, **common),
             "crop": _crop_pipeline(spec, images=_cycle([[np.asarray(im) for im in imgs] for imgs in images]),
                                    rois=_cycle(rois), gpu=gpu, **common),
             "augment": _colour_pipeline(spec, crops=_cycle(crops), params=_cycle(params), gpu=gpu, **common)}
    for pipe in pipes.values():
        pipe.build()
    steps: dict[str, Callable[[int], object]] = {"read": lambda k: source(SimpleNamespace(iteration=k))}
    steps.update({name: (lambda k, pipe=pipe: pipe.run()) for name, pipe in pipes.items()})
    return steps
