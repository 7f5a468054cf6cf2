"""Batched, per-sample-random augmentation of image tensors on whatever device they live on.

FFCV (and any loader that delivers uint8 crops) hands this module a ``[B,3,H,W]`` batch; every sample
gets its own random parameters — the loaders pass :func:`drawn_view_params`, the counter-based draw of
:mod:`pipelines.draw` for the batch's sample indices; without them a ``torch.Generator`` draws them —
and every op runs once over the
whole batch (or over the subset of samples it applies to) — never a Python loop over samples. The same
code runs on CUDA and on CPU, where it is also the fast path of the CPU benchmark.

Each op has the definition of its ``torchvision.transforms.v2.functional`` namesake, applied to
float images in ``[0, 1]``; the tests compare them sample by sample. Order inside a view (fixed, the
one in :class:`~pipelines.spec.ViewSpec`'s docstring):

    flip -> colour jitter -> grayscale -> blur -> solarize -> normalise

and inside colour jitter the fixed order brightness -> contrast -> saturation -> hue (torchvision
draws a random order per call; a fixed order lets a batch share one code path — the statistics the
parity tests look at do not depend on it).

Parameters live on the CPU (the draw, or the generator's device) and only the small
per-sample parameter tensors are moved to the images' device, so choosing the samples an op applies
to never waits on the accelerator.

Two implementations of :func:`augment_view`, the same function of the same draws (a test holds them
to 1/255 of each other and of torchvision):

* ``torch``: batched tensor ops, any device — the accelerator path;
* ``numba``: uint8 CPU images only; :func:`~pipelines.augment_kernels.augment_sample` runs a whole
  view per sample in one pass (:mod:`pipelines.augment_kernels`: vectorised, GIL released, split here
  over torch's thread count) — several times faster than the tensor ops on a 2-core CPU, and it runs
  beside FFCV's decoding threads without entering Numba's parallel layer. ``RESSL_NUMBA_JIT=0`` runs
  the kernels as plain Python for debugging (the one switch, :mod:`pipelines.formats.kernels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .augment_kernels import augment_range, augment_sample
from .draw import view_decisions
from .spec import ViewSpec

__all__ = [
    "ViewParams",
    "sample_view_params",
    "drawn_view_params",
    "to_float",
    "hflip",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "rgb_to_grayscale",
    "gaussian_kernels",
    "gaussian_blur",
    "solarize",
    "normalize",
    "augment_sample",
    "augment_view",
]

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A ``[B]`` parameter tensor as ``[B,1,1,1]`` on ``x``'s device and dtype, for broadcasting."""
    return values.to(device=x.device, dtype=x.dtype, non_blocking=True).view(-1, 1, 1, 1)


def _check_images(x: torch.Tensor, what: str) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected images of shape [B,3,H,W], got {tuple(x.shape)}")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0,255]`` or float ``[0,1]`` images as a new float32 tensor in ``[0,1]`` (layout kept)."""
    _check_images(images, "to_float")
    if images.dtype == torch.uint8:
        return images.to(torch.float32).mul_(1.0 / 255.0)
    if not images.is_floating_point():
        raise TypeError(f"to_float: expected uint8 or floating-point images, got {images.dtype}")
    return images.to(torch.float32, copy=True)


def hflip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the samples where the bool ``[B]`` mask ``flip`` is set; returns a new tensor."""
    return torch.where(flip.to(x.device, non_blocking=True).view(-1, 1, 1, 1), x.flip(-1), x)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(x * f, 0, 1)`` per sample, in place on float ``x`` in [0,1]. ``factor``: ``[B]``."""
    return x.mul_(_per_sample(factor, x)).clamp_(0.0, 1.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """``[B,1,H,W]`` luma of float ``[B,3,H,W]`` images."""
    r, g, b = x.unbind(1)
    return (r * _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each sample with the mean of its grayscale image, in place: ``f*x + (1-f)*mean``."""
    f = _per_sample(factor, x)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return x.mul_(f).add_(mean * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each sample with its own grayscale image, in place: ``f*x + (1-f)*gray(x)``."""
    f = _per_sample(factor, x)
    gray = _gray(x).mul_(1.0 - f)
    return x.mul_(f).add_(gray).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` turns (``[B]``, in [-0.5, 0.5]) in HSV space; returns a new tensor.

    Max and min over channels (V and V*S) are unchanged by a hue rotation, so the output is written
    straight from them: ``out_c = max - chroma * clamp(min(k_c, 4 - k_c), 0, 1)`` with
    ``k_c = (n_c + 6 h') mod 6`` and ``n = (5, 3, 1)`` for R, G, B — the HSV->RGB formula without
    materialising S and V, a few batched passes instead of torchvision's sector-by-sector assembly.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    vmax = x.amax(dim=1, keepdim=True)
    chroma = vmax - x.amin(dim=1, keepdim=True)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # Hue in sextants [0, 6): which channel holds the max picks the sector (red wins ties, then green).
    h6 = torch.where(vmax == r, (g - b).div_(safe),
                     torch.where(vmax == g, (b - r).div_(safe).add_(2.0), (r - g).div_(safe).add_(4.0)))
    h6.add_(_per_sample(shift, x), alpha=6.0)
    n = torch.tensor((5.0, 3.0, 1.0), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(h6 + n, 6.0)
    t = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return t.mul_(chroma).neg_().add_(vmax)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma replicated over the 3 channels (torchvision ``rgb_to_grayscale(num_output_channels=3)``)."""
    return _gray(x).expand_as(x)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``[B, k]`` normalised 1-D Gaussian windows, one per sample sigma (torchvision's definition)."""
    if kernel_size <= 0 or kernel_size % 2 == 0:
        raise ValueError(f"gaussian_kernels: kernel_size must be a positive odd number, got {kernel_size}")
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, dtype=torch.float32, device=sigma.device)
    return torch.softmax(-0.5 * (t.view(1, -1) / sigma.to(torch.float32).view(-1, 1)) ** 2, dim=1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` (``[B]``), reflect padding; new tensor.

    All samples and channels go through one grouped convolution per axis (groups = B*3), so the
    per-sample kernels cost no loop.
    """
    bsz, c, h, w = x.shape
    pad = kernel_size // 2
    if pad >= min(h, w):
        raise ValueError(f"gaussian_blur: kernel_size {kernel_size} too large for {h}x{w} images (reflect pad)")
    weight = gaussian_kernels(sigma, kernel_size).to(device=x.device, dtype=x.dtype, non_blocking=True)
    weight = weight.repeat_interleave(c, dim=0)  # [B*C, k]
    y = F.pad(x.reshape(1, bsz * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, weight.view(bsz * c, 1, kernel_size, 1), groups=bsz * c)
    y = F.conv2d(y, weight.view(bsz * c, 1, 1, kernel_size), groups=bsz * c)
    return y.view(bsz, c, h, w)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert pixels ``>= threshold`` (in [0,1] units), in place on float ``x``."""
    return torch.where(x >= threshold, 1.0 - x, x, out=x)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], *, scale: float = 1.0,
              out_dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """``(x * scale - mean) / std`` per channel as one fused pass, cast to ``out_dtype``.

    ``scale`` = 1/255 normalises uint8 input directly (the weak view's whole colour path).
    """
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"normalize: expected 3 means and 3 positive stds, got mean={mean}, std={std}")
    mul = torch.tensor([scale / s for s in std], dtype=torch.float32).view(1, 3, 1, 1)
    add = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32).view(1, 3, 1, 1)
    mul = mul.to(x.device, non_blocking=True)
    add = add.to(x.device, non_blocking=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device).contiguous(memory_format=fmt)
    torch.addcmul(add, x, mul, out=out)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(n: int) -> ThreadPoolExecutor:
    """A thread pool per size; the Numba kernels release the GIL, so threads run in parallel without
    Numba's own parallel layer (which must not be entered from two threads, e.g. beside FFCV's)."""
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="gpu_augment")
    return _POOLS[n]


@dataclass(frozen=True)
class ViewParams:
    """Per-sample random parameters of one view, all ``[B]`` tensors on the generator's device.

    ``jitter``, ``gray``, ``blur``, ``solarize`` and ``flip`` are bool masks (op applied or not);
    the factors of samples without jitter are the identity (1, 1, 1, 0).
    """

    flip: torch.Tensor
    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor


def drawn_view_params(view: ViewSpec, seed: int, epoch: int, indices, view_id: int) -> ViewParams:
    """The parameters of ``view`` for the samples ``indices`` from the counter-based draw
    (:func:`pipelines.draw.view_decisions`): the same values every backend uses for those samples."""
    d = view_decisions(view, seed, epoch, np.asarray(indices), view_id)
    as_t = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.bool_ if v.dtype == np.bool_ else np.float32))
            for k, v in d.items()}
    return ViewParams(as_t["flip"], as_t["jitter"], as_t["brightness"], as_t["contrast"], as_t["saturation"],
                      as_t["hue"], as_t["gray"], as_t["blur"], as_t["sigma"], as_t["solarize"])


def sample_view_params(view: ViewSpec, batch_size: int, generator: torch.Generator | None = None) -> ViewParams:
    """Draw every random choice of ``view`` for ``batch_size`` samples from ``generator``."""
    dev = generator.device if generator is not None else torch.device("cpu")

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(batch_size, generator=generator, device=dev).mul_(hi - lo).add_(lo)

    def coin(p: float) -> torch.Tensor:
        return torch.rand(batch_size, generator=generator, device=dev) < p

    flip = coin(view.flip_p)
    js = view.jitter
    if js is not None and js.p > 0:
        jitter = coin(js.p)
        one = torch.ones(batch_size, device=dev)
        b = torch.where(jitter, u(max(0.0, 1 - js.brightness), 1 + js.brightness), one)
        c = torch.where(jitter, u(max(0.0, 1 - js.contrast), 1 + js.contrast), one)
        s = torch.where(jitter, u(max(0.0, 1 - js.saturation), 1 + js.saturation), one)
        h = torch.where(jitter, u(-js.hue, js.hue), torch.zeros_like(one))
    else:
        jitter = torch.zeros(batch_size, dtype=torch.bool, device=dev)
        b = c = s = torch.ones(batch_size, device=dev)
        h = torch.zeros(batch_size, device=dev)
    gray = coin(view.gray_p)
    blur = coin(view.blur_p)
    sigma = u(*view.blur_sigma)
    sol = coin(view.solarize_p)
    return ViewParams(flip, jitter, b, c, s, h, gray, blur, sigma, sol)


def _apply_subset(x: torch.Tensor, mask: torch.Tensor, op, *args: torch.Tensor) -> torch.Tensor:
    """``x[mask] = op(x[mask], *args[mask])`` with the mask on the host (no device sync); in place."""
    idx = mask.nonzero().view(-1)
    if idx.numel() == 0:
        return x
    if idx.numel() == mask.numel():
        x.copy_(op(x, *args))
        return x
    sub = [a[idx] for a in args]
    didx = idx.to(x.device, non_blocking=True)
    x[didx] = op(x[didx], *sub)
    return x


def _augment_view_cpu(images: torch.Tensor, view: ViewSpec, mean: Sequence[float], std: Sequence[float],
                      p: ViewParams, out_dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """The whole view in one Numba pass per sample over uint8 CPU images, split over torch's threads."""
    bsz, _, h, w = images.shape
    src = images.permute(0, 2, 3, 1).contiguous().numpy()  # no copy when images are channels_last
    out = torch.empty((bsz, h, w, 3), dtype=torch.float32)
    mul = np.array([1.0 / s for s in std], np.float32)
    add = np.array([-m / s for m, s in zip(mean, std, strict=True)], np.float32)
    ksize = view.blur_kernel if view.blur_p > 0 else 1  # ViewSpec fills blur_kernel whenever blur_p > 0
    args = [a.cpu().numpy() for a in (p.flip, p.jitter, p.brightness, p.contrast,
                                       p.saturation, p.hue, p.gray)]
    args.append(torch.where(p.blur, p.sigma, torch.zeros_like(p.sigma)).cpu().numpy())
    sol = p.solarize.cpu().numpy()
    nthreads = max(1, min(torch.get_num_threads(), bsz))
    bounds = [bsz * k // nthreads for k in range(nthreads + 1)]
    out_np = out.numpy()

    def work(k: int) -> None:
        augment_range(src, out_np, bounds[k], bounds[k + 1], *args, ksize, sol, view.solarize_threshold, mul, add)

    if nthreads == 1:
        work(0)
    else:
        list(_pool(nthreads).map(work, range(nthreads)))
    x = out.permute(0, 3, 1, 2)  # channels_last NCHW view
    if not channels_last:
        x = x.contiguous()
    return x if out_dtype == torch.float32 else x.to(out_dtype)


def augment_view(
    images: torch.Tensor,
    view: ViewSpec,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator | None = None,
    *,
    out_dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    params: ViewParams | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Apply ``view``'s flip, colour jitter, grayscale, blur and solarize with per-sample randomness,
    then normalise.

    Args:
        images: ``[B,3,H,W]`` uint8 in [0,255] or float in [0,1], on any device (already cropped to
            the view's size; the crop belongs to the decoder).
        view: the view's spec; its probabilities and ranges drive the random draws.
        mean, std: per-channel normalisation in [0,1] units (the recipe's ``mean`` / ``std``).
        generator: source of randomness (CPU or the images' device); None = torch's default.
        out_dtype: float32, float16 or bfloat16.
        channels_last: return a channels_last tensor.
        params: fixed parameters instead of drawing them (tests, replays).
        impl: "torch" (batched tensor ops, any device), "numba" (uint8 CPU images only: one fused
            pass per sample, several times faster on CPU) or "auto" (numba where it applies).

    Returns:
        ``[B,3,H,W]`` normalised tensor of ``out_dtype`` on the images' device.
    """
    _check_images(images, f"augment_view({view.name!r})")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"augment_view: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    bsz = images.shape[0]
    p = params if params is not None else sample_view_params(view, bsz, generator)
    if impl not in ("auto", "torch", "numba"):
        raise ValueError(f"augment_view: impl must be 'auto', 'torch' or 'numba', got {impl!r}")
    cpu_u8 = images.device.type == "cpu" and images.dtype == torch.uint8
    if impl == "numba" and not cpu_u8:
        raise ValueError(f"augment_view: impl='numba' needs uint8 CPU images, got {images.dtype} on {images.device}")
    if impl == "numba" or (impl == "auto" and cpu_u8):
        return _augment_view_cpu(images, view, mean, std, p, out_dtype, channels_last)
    need_colour = bool(p.jitter.any() or p.gray.any() or p.blur.any() or p.solarize.any())
    if not need_colour:
        x = images if images.dtype == torch.uint8 or images.dtype == torch.float32 else images.float()
        if p.flip.any():
            x = hflip(x, p.flip)
        scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
        return normalize(x, mean, std, scale=scale, out_dtype=out_dtype, channels_last=channels_last)

    x = to_float(images)
    if p.flip.any():
        x = hflip(x, p.flip)
    if p.jitter.any():
        adjust_brightness(x, p.brightness)
        adjust_contrast(x, p.contrast)
        adjust_saturation(x, p.saturation)
        _apply_subset(x, p.jitter & (p.hue != 0), adjust_hue, p.hue)
    _apply_subset(x, p.gray, rgb_to_grayscale)
    if p.blur.any():
        _apply_subset(x, p.blur, lambda t, s: gaussian_blur(t, s, view.blur_kernel), p.sigma)
    if p.solarize.any():
        _apply_subset(x, p.solarize, lambda t: solarize(t, view.solarize_threshold))
    return normalize(x, mean, std, out_dtype=out_dtype, channels_last=channels_last)
