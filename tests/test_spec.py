"""The recipe as data: presets, ``recipe.<view>.<field>`` overrides, and every backend compiling them.

The backend checks use an "identity" base (square images read at their own size, scale = ratio = 1,
no flip, no colour ops): each override then has one visible effect on the batches — a grey strong
view, a flipped weak view, another output side — and every installed backend must show it, because
each compiles the same resolved spec.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines
from pipelines import build_loader
from pipelines.spec import (
    PRESETS,
    ColorJitterSpec,
    RecipeError,
    TwoViewSpec,
    ViewSpec,
    apply_overrides,
    blur_kernel_size,
    get_recipe,
    resolve_recipe,
)

SIDE = 16


def test_overrides_apply_on_top_of_the_preset():
    base = get_recipe("cifar32")
    spec = resolve_recipe("cifar32", {"strong.blur_p": 0.5, "weak.scale": [0.08, 1.0],
                                      "strong.jitter.brightness": 0.2})
    assert spec.view("strong").blur_p == 0.5 and spec.view("strong").blur_kernel == blur_kernel_size(32)
    assert spec.view("weak").scale == (0.08, 1.0)
    assert spec.view("strong").jitter == replace(base.strong[0].jitter, brightness=0.2)
    assert spec.weak.jitter is None and type(spec) is type(base) and spec.mean == base.mean
    assert get_recipe("cifar32") == base  # the preset itself is untouched
    assert resolve_recipe("cifar32") == base


def test_multicrop_size_rederives_the_blur_window_unless_set():
    spec = resolve_recipe("imagenet224-multicrop", {"crop_1.size": 160})
    assert spec.view("crop_1").size == 160 and spec.view("crop_1").blur_kernel == blur_kernel_size(160)
    assert spec.view("crop_0") == get_recipe("imagenet224-multicrop").view("crop_0")
    spec = resolve_recipe("imagenet224-multicrop", {"crop_1.size": 160, "crop_1.blur_kernel": 9})
    assert spec.view("crop_1").blur_kernel == 9


def test_jitter_can_be_added_and_removed():
    spec = resolve_recipe("cifar32", {"weak.jitter.p": 0.3, "strong.jitter": None})
    assert spec.weak.jitter == ColorJitterSpec(p=0.3) and spec.view("strong").jitter is None


@pytest.mark.parametrize("overrides, message", [
    ({"strong.blur_p": 1.5}, "recipe.strong.blur_p=1.5: ViewSpec 'strong': blur_p is a probability"),
    ({"strong.jitter.p": -0.1}, "recipe.strong.jitter.p=-0.1: ColorJitterSpec.p is a probability"),
    ({"crop.blur_p": 0.5}, "recipe.crop.blur_p=0.5: recipe 'cifar32' has no view 'crop' (views: weak, strong)"),
    ({"strong.blurp": 0.5}, "recipe.strong.blurp=0.5: view 'strong' has no field 'blurp'"),
    ({"strong.name": "x"}, "has no field 'name'"),
    ({"weak.scale": [1.0, 0.08]}, "recipe.weak.scale=[1.0, 0.08]: ViewSpec 'weak': scale must satisfy"),
    ({"weak.scale": 0.5}, "recipe.weak.scale=0.5: scale is a range [lo, hi] of two numbers"),
    ({"weak.size": 1.5}, "recipe.weak.size=1.5: expects an integer"),
    ({"weak.size": "big"}, "recipe.weak.size='big': expects a number"),
    ({"strong.jitter.gamma": 1}, "jitter has no field 'gamma'"),
    ({"strong.jitter": 0.4}, "jitter takes null"),
    ({"strong.flip_p.x": 1}, "'flip_p' has no sub-fields"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(RecipeError) as e:
        resolve_recipe("cifar32", overrides)
    assert message in str(e.value)


def test_unknown_recipe_lists_the_presets():
    with pytest.raises(RecipeError, match=r"unknown recipe 'nope'; known recipes: \['cifar32'"):
        resolve_recipe("nope")


def test_views_are_found_by_name():
    for name, spec in PRESETS.items():
        assert spec.view("weak") is spec.weak, name
        assert [spec.view(v.name) for v in spec.strong] == list(spec.strong)


# --- every backend compiles the overridden spec ---------------------------------------------------------------
def _identity() -> TwoViewSpec:
    full = dict(size=SIDE, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    return TwoViewSpec(weak=ViewSpec("weak", **full), strong=(ViewSpec("strong", **full),))


@pytest.fixture(scope="module")
def halves(tmp_path_factory) -> Path:
    """16 px squares, left half dark red and right half bright green (flips and grey are visible), as a
    tree and as a .beton."""
    root = tmp_path_factory.mktemp("halves")
    img = np.zeros((SIDE, SIDE, 3), np.uint8)
    img[:, : SIDE // 2] = (120, 10, 10)
    img[:, SIDE // 2:] = (20, 230, 40)
    for i in range(16):
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:02d}.png")
    if pipelines.available_backends()["ffcv"]:
        from pipelines.formats.beton import write_beton

        write_beton(root / "train.beton", [(img, i % 2) for i in range(16)], mode="raw")
    return root


def _pixels(x: torch.Tensor, spec) -> torch.Tensor:
    return x.float() * torch.tensor(spec.std).view(1, 3, 1, 1) * 255 + torch.tensor(spec.mean).view(1, 3, 1, 1) * 255


OVERRIDES = {
    "grey strong": {"strong.gray_p": 1.0},
    "flipped weak": {"weak.flip_p": 1.0},
    "smaller strong": {"strong.size": 8},
    "blur only": {"strong.blur_p": 1.0, "strong.blur_sigma": [1.5, 2.0], "strong.blur_kernel": 5},
    "blur fixed sigma": {"strong.blur_p": 1.0, "strong.blur_sigma": [2.0, 2.0], "strong.blur_kernel": 5},
}


def _check(name: str, spec, weak: torch.Tensor, strong: torch.Tensor) -> None:
    half = SIDE // 2
    left_green = weak[:, 1, :, :half].mean(dim=(1, 2)) > weak[:, 1, :, half:].mean(dim=(1, 2))
    if name == "flipped weak":
        assert bool(left_green.all())
    else:
        assert not bool(left_green.any())
    if name == "grey strong":
        assert float((strong[:, 0] - strong[:, 1]).abs().amax()) < 3
    else:
        assert float((strong[:, 0] - strong[:, 1]).abs().amax()) > 100
    assert strong.shape[-1] == (8 if name == "smaller strong" else SIDE)
    edge = strong[:, 1, :, half - 1:half + 1]
    if name.startswith("blur"):  # the hard edge between the halves is smoothed
        assert float((edge[..., 1] - edge[..., 0]).abs().amax()) < 80
    elif name != "smaller strong":
        assert float((edge[..., 1] - edge[..., 0]).abs().amin()) > 90


@pytest.mark.parametrize("name", OVERRIDES)
@pytest.mark.parametrize("backend", ["torchvision", "dali", "ffcv"])
def test_backends_compile_the_overridden_recipe(backend, name, halves):
    if not pipelines.available_backends()[backend]:
        pytest.skip(f"{backend} is not installed (extra [{backend}])")
    spec = apply_overrides(_identity(), OVERRIDES[name])
    cfg = SimpleNamespace(data=str(halves), recipe="cifar32", batch_size=8, num_workers=0, seed=0,
                          channels_last=False)
    loader = build_loader(cfg, backend, spec=spec)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 2
    weak = torch.cat([_pixels(b.weak, spec) for b in batches])
    strong = torch.cat([_pixels(b.strong[0], spec) for b in batches])
    _check(name, spec, weak, strong)
