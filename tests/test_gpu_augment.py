"""pipelines.gpu_augment: each op against torchvision.transforms.v2.functional sample by sample,
the fused Numba CPU path against the batched torch path, rates of the random ops, output format."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from pipelines import gpu_augment as ga
from pipelines.spec import ColorJitterSpec, ViewSpec, get_recipe

B, H, W = 6, 14, 18
ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    smooth = torch.nn.functional.interpolate(torch.rand(B, 3, 4, 5, generator=g), size=(H, W), mode="bilinear")
    noisy = smooth * 200 + torch.rand(B, 3, H, W, generator=g) * 55
    return noisy.round().clamp(0, 255).to(torch.uint8)


def _u8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def _assert_within_one_level(ours: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (ours.int() - ref.int()).abs()
    assert diff.max().item() <= 1, f"max |diff| = {diff.max().item()} levels (> 1/255)"


FACTORS = torch.tensor([0.6, 0.8, 1.0, 1.1, 1.25, 1.4])
HUES = torch.tensor([-0.1, -0.05, 0.0, 0.02, 0.07, 0.1])


@pytest.mark.parametrize(
    "op,ref,params",
    [
        (ga.adjust_brightness, TF.adjust_brightness, FACTORS),
        (ga.adjust_contrast, TF.adjust_contrast, FACTORS),
        (ga.adjust_saturation, TF.adjust_saturation, FACTORS),
        (ga.adjust_hue, TF.adjust_hue, HUES),
        (ga.adjust_hue, TF.adjust_hue, torch.tensor([-0.5, -0.3, 0.25, 0.33, 0.45, 0.5])),
    ],
)
def test_colour_ops_match_torchvision(images, op, ref, params):
    ours = _u8(op(ga.to_float(images), params))
    for i in range(B):
        _assert_within_one_level(ours[i], ref(images[i], params[i].item()))


def test_grayscale_solarize_flip_match_torchvision(images):
    x = ga.to_float(images)
    gray = _u8(ga.rgb_to_grayscale(x))
    sol = _u8(ga.solarize(x.clone(), 0.5))
    mask = torch.tensor([True, False, True, True, False, False])
    flipped = _u8(ga.hflip(x, mask))
    for i in range(B):
        _assert_within_one_level(gray[i], TF.rgb_to_grayscale(images[i], num_output_channels=3))
        _assert_within_one_level(sol[i], TF.solarize(images[i], 128))
        _assert_within_one_level(flipped[i], TF.horizontal_flip(images[i]) if mask[i] else images[i])


@pytest.mark.parametrize("kernel_size", [5, 9])
def test_blur_per_sample_sigma_matches_torchvision(images, kernel_size):
    sigma = torch.tensor([0.1, 0.5, 0.9, 1.3, 1.7, 2.0])
    ours = _u8(ga.gaussian_blur(ga.to_float(images), sigma, kernel_size))
    for i in range(B):
        _assert_within_one_level(ours[i], TF.gaussian_blur(images[i], [kernel_size] * 2, [sigma[i].item()] * 2))
    with pytest.raises(ValueError, match="kernel_size"):
        ga.gaussian_blur(ga.to_float(images), sigma, 4)


def _one_op_params(op: str, n: int) -> ga.ViewParams:
    """Parameters where only ``op`` acts, with per-sample values."""
    off = torch.zeros(n, dtype=torch.bool)
    on = torch.ones(n, dtype=torch.bool)
    ones = torch.ones(n)
    f = FACTORS[:n]
    return ga.ViewParams(
        flip=on if op == "flip" else off,
        jitter=on if op in ("brightness", "contrast", "saturation", "hue") else off,
        brightness=f if op == "brightness" else ones,
        contrast=f if op == "contrast" else ones,
        saturation=f if op == "saturation" else ones,
        hue=HUES[:n] if op == "hue" else torch.zeros(n),
        gray=on if op == "gray" else off,
        blur=on if op == "blur" else off,
        sigma=torch.linspace(0.1, 2.0, n),
        solarize=on if op == "solarize" else off,
    )


def _torchvision_op(op: str, img: torch.Tensor, i: int, k: int) -> torch.Tensor:
    if op == "flip":
        return TF.horizontal_flip(img)
    if op in ("brightness", "contrast", "saturation"):
        return getattr(TF, f"adjust_{op}")(img, FACTORS[i].item())
    if op == "hue":
        return TF.adjust_hue(img, HUES[i].item())
    if op == "gray":
        return TF.rgb_to_grayscale(img, num_output_channels=3)
    if op == "blur":
        s = torch.linspace(0.1, 2.0, B)[i].item()
        return TF.gaussian_blur(img, [k, k], [s, s])
    return TF.solarize(img, 128)


@pytest.mark.parametrize("impl", ["numba", "torch"])
@pytest.mark.parametrize("op", ["flip", "brightness", "contrast", "saturation", "hue", "gray", "blur", "solarize"])
def test_augment_view_single_op_matches_torchvision(images, impl, op):
    """Each op through augment_view (both implementations) with identity normalisation."""
    view = ViewSpec("v", size=H, flip_p=0.5, jitter=ColorJitterSpec(), gray_p=0.5, blur_p=0.5, blur_kernel=7,
                    solarize_p=0.5, solarize_threshold=128 / 255)
    out = ga.augment_view(images, view, ZERO, ONE, params=_one_op_params(op, B), impl=impl)
    assert out.shape == images.shape and out.dtype == torch.float32
    ours = _u8(out)
    for i in range(B):
        _assert_within_one_level(ours[i], _torchvision_op(op, images[i], i, 7))


def test_numba_and_torch_paths_agree_on_random_params(images):
    """The fused CPU kernel and the batched tensor ops are the same function of the same draws."""
    spec = get_recipe("stl96")
    view = dataclasses.replace(spec.strong[0], size=H, blur_kernel=9, solarize_p=0.3)
    big = images.repeat(8, 1, 1, 1)
    params = ga.sample_view_params(view, big.shape[0], torch.Generator().manual_seed(3))
    a = ga.augment_view(big, view, spec.mean, spec.std, params=params, impl="numba")
    b = ga.augment_view(big, view, spec.mean, spec.std, params=params, impl="torch")
    # 1/255 in [0,1] units is at most 1/(255*0.224) after normalising.
    assert (a - b).abs().max().item() < 1.0 / (255 * 0.224)


def test_one_jit_switch_runs_the_augment_kernels_as_python(images):
    """set_jit_enabled(False) (the switch of pipelines.formats.kernels) runs the whole fused kernel,
    helpers included, as Python: the same outputs as compiled, and no Numba dispatcher is called."""
    from pipelines import augment_kernels
    from pipelines.formats import kernels

    spec = get_recipe("stl96")
    view = dataclasses.replace(spec.strong[0], size=H, blur_kernel=5, solarize_p=0.5)
    params = ga.sample_view_params(view, 2, torch.Generator().manual_seed(5))
    small = images[:2].contiguous()
    compiled = ga.augment_view(small, view, spec.mean, spec.std, params=params, impl="numba")
    python = augment_kernels.augment_sample.python
    assert all(not hasattr(python.__globals__[n], "signatures") for n in ("_jitter_row", "_blur_rows"))
    before = kernels.jit_enabled()
    kernels.set_jit_enabled(False)
    try:
        plain = ga.augment_view(small, view, spec.mean, spec.std, params=params, impl="numba")
    finally:
        kernels.set_jit_enabled(before)
    assert (plain - compiled).abs().max().item() < 1e-4


@pytest.mark.parametrize("impl", ["numba", "torch"])
def test_random_op_rates_match_probabilities(impl):
    """Over 3000 samples: flip, grayscale and blur rates within 4 sigma of the spec's p."""
    n = 3000
    view = ViewSpec("v", size=8, flip_p=0.3, jitter=ColorJitterSpec(p=0.0), gray_p=0.2, blur_p=0.5, blur_kernel=3,
                    blur_sigma=(1.0, 2.0))
    # A left-to-right ramp in red only: flips reverse it, grayscale equalises channels, blur softens it.
    ramp = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    ramp[0, 0] = torch.arange(8, dtype=torch.uint8) * 30
    out = ga.augment_view(ramp.expand(n, 3, 8, 8).contiguous(), view, ZERO, ONE,
                          torch.Generator().manual_seed(0), impl=impl)
    red = out[:, 0, 0]  # first row of the red (or luma) channel
    flipped = red[:, 0] > red[:, -1]
    gray = (out[:, 0] - out[:, 1]).abs().amax(dim=(1, 2)) < 1e-6
    sharp = ((red[:, 1:] - red[:, :-1]).abs() - (30 / 255) * torch.where(gray, 0.2989, 1.0)[:, None]).abs().amax(1)
    blurred = sharp > 1e-3
    for rate, p in ((flipped.float().mean(), 0.3), (gray.float().mean(), 0.2), (blurred.float().mean(), 0.5)):
        assert abs(rate.item() - p) < 4 * (p * (1 - p) / n) ** 0.5, (rate.item(), p)


def test_sample_view_params_ranges_and_identity():
    view = get_recipe("imagenet224").strong[0]
    p = ga.sample_view_params(view, 4000, torch.Generator().manual_seed(0))
    j = p.jitter
    assert abs(j.float().mean().item() - 0.8) < 0.03
    assert p.brightness[j].min() >= 0.6 and p.brightness[j].max() <= 1.4
    assert p.hue[j].abs().max() <= 0.1 and (p.hue[~j] == 0).all() and (p.contrast[~j] == 1).all()
    assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0


@pytest.mark.parametrize("impl", ["numba", "torch"])
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True),
                                                 (torch.float16, True)])
def test_normalise_dtype_and_layout(impl, dtype, channels_last):
    spec = get_recipe("imagenet224")
    flat = torch.full((3, 3, 10, 10), 128, dtype=torch.uint8)
    out = ga.augment_view(flat, dataclasses.replace(spec.weak, size=10), spec.mean, spec.std,
                          torch.Generator().manual_seed(0), out_dtype=dtype, channels_last=channels_last, impl=impl)
    assert out.dtype == dtype and out.shape == flat.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    expect = torch.tensor([(128 / 255 - m) / s for m, s in zip(spec.mean, spec.std, strict=True)])
    torch.testing.assert_close(out.float().mean(dim=(0, 2, 3)), expect, atol=1e-2, rtol=0)


def test_generator_makes_draws_reproducible(images):
    view = get_recipe("stl96").strong[0]
    view = dataclasses.replace(view, size=H, blur_kernel=5)
    run = [ga.augment_view(images, view, ZERO, ONE, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(run[0], run[1])
    assert not torch.equal(run[0], run[2])


def test_bad_inputs_are_named():
    view = get_recipe("imagenet224").weak
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        ga.augment_view(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), view, ZERO, ONE)
    with pytest.raises(ValueError, match="out_dtype"):
        ga.augment_view(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), view, ZERO, ONE, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="impl"):
        ga.augment_view(torch.zeros(2, 3, 8, 8), view, ZERO, ONE, impl="numba")
    with pytest.raises(ValueError, match="std"):
        ga.normalize(torch.zeros(2, 3, 8, 8), ZERO, (1.0, 0.0, 1.0))


@pytest.mark.cuda
def test_cuda_matches_cpu(images):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the device path is the same torch code tested above on CPU")
    spec = get_recipe("stl96")
    view = dataclasses.replace(spec.strong[0], size=H, blur_kernel=5)
    params = ga.sample_view_params(view, B, torch.Generator().manual_seed(0))
    cpu = ga.augment_view(images, view, spec.mean, spec.std, params=params, impl="torch")
    gpu = ga.augment_view(images.cuda(), view, spec.mean, spec.std, params=params)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=0)
