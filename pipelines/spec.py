"""The augmentation recipe as data — the one place it exists.

Every backend (torchvision, DALI, FFCV + gpu_augment) reads these frozen dataclasses and turns them
into its own ops; none of them hard-codes a probability or a crop scale. Views are looked up by name
(``weak``, ``strong``, ``crop_0`` ...), never by list position, so which view feeds the teacher can
never depend on the order of a list.

A run changes a preset with ``recipe.<view>.<field>=value`` keys (:func:`resolve_recipe`), e.g.
``recipe.strong.blur_p=0.5``, ``recipe.weak.scale=[0.08,1.0]``, ``recipe.strong.jitter.brightness=0.4``.

Randomness: every backend takes each view's random choices from :mod:`pipelines.draw`, a pure function
of (seed, epoch, sample index, view), so a sample gets the same crop box, flip, jitter factors, grayscale,
blur sigma and solarize in torchvision, DALI and FFCV. What no backend can take from outside is
``ColorJitter``'s random order of its four ops (torchvision draws it per call; DALI's ops and the batched
device ops have one order): every backend applies brightness, contrast, saturation, hue in that order.

Presets follow ReSSL (NeurIPS 2021, TPAMI 2024):
  weak   = RandomResizedCrop(scale 0.2-1) + flip
  strong = RandomResizedCrop(scale 0.2-1) + ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 + grayscale p=0.2
           + Gaussian blur sigma in [0.1, 2] p=0.5 (ImageNet-size only) + flip
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "ColorJitterSpec",
    "ViewSpec",
    "RecipeSpec",
    "TwoViewSpec",
    "MultiCropSpec",
    "PRESETS",
    "RecipeError",
    "apply_overrides",
    "get_recipe",
    "resolve_recipe",
    "blur_kernel_size",
]

# Normalisation constants, in [0, 1] pixel units.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian kernel side of about 10% of the crop, as in SimCLR/ReSSL (23 px at 224)."""
    k = int(0.1 * size)
    return k + 1 if k % 2 == 0 else k


@dataclass(frozen=True)
class ColorJitterSpec:
    """torchvision ColorJitter strengths; brightness/contrast/saturation factors are drawn from
    [1-s, 1+s] and the hue shift from [-hue, hue] (hue in turns, i.e. 0.1 = 36 degrees)."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    p: float = 0.8

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"ColorJitterSpec.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"ColorJitterSpec.hue must be in [0, 0.5], got {self.hue}")
        _check_p("ColorJitterSpec.p", self.p)


@dataclass(frozen=True)
class ViewSpec:
    """One view of an image: crop, flip and the colour / blur ops applied with probability ``*_p``.

    Order of ops in every backend: random resized crop -> flip -> colour jitter -> grayscale ->
    blur -> solarize -> normalise. (The crop comes first so colour ops touch only output pixels.)
    """

    name: str
    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: ColorJitterSpec | None = None
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 0  # odd side of the Gaussian window; 0 = blur_kernel_size(size)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5  # in [0, 1] pixel units (128/255 for uint8 data)

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"ViewSpec {self.name!r}: size must be > 0, got {self.size}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"ViewSpec {self.name!r}: scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ViewSpec {self.name!r}: ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        for p in ("flip_p", "gray_p", "blur_p", "solarize_p"):
            _check_p(f"ViewSpec {self.name!r}: {p}", getattr(self, p))
        if self.blur_p > 0 and not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"ViewSpec {self.name!r}: blur_sigma must be 0 < lo <= hi, got {self.blur_sigma}")
        if self.blur_kernel and self.blur_kernel % 2 == 0:
            raise ValueError(f"ViewSpec {self.name!r}: blur_kernel must be odd, got {self.blur_kernel}")
        if self.blur_p > 0 and self.blur_kernel == 0:
            object.__setattr__(self, "blur_kernel", blur_kernel_size(self.size))


@dataclass(frozen=True)
class RecipeSpec:
    """A weak view for the EMA teacher, one or more strong views for the student, and normalisation.

    ``strong`` is a tuple of views with distinct names; the loss averages over them.
    """

    weak: ViewSpec
    strong: tuple[ViewSpec, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not self.strong:
            raise ValueError("a recipe needs at least one strong view")
        names = [self.weak.name, *(v.name for v in self.strong)]
        if len(set(names)) != len(names):
            raise ValueError(f"view names must be unique, got {names}")

    @property
    def views(self) -> tuple[ViewSpec, ...]:
        """Weak view first, then the strong views — the order backends emit them in."""
        return (self.weak, *self.strong)

    def view(self, name: str) -> ViewSpec:
        for v in self.views:
            if v.name == name:
                return v
        raise KeyError(f"no view named {name!r}; views are {[v.name for v in self.views]}")

    def with_size(self, size: int) -> RecipeSpec:
        """The same recipe at another output side (e.g. for a quick benchmark); multi-crop keeps ratios."""
        base = self.weak.size

        def rescale(v: ViewSpec) -> ViewSpec:
            s = max(1, round(v.size * size / base))
            return replace(v, size=s, blur_kernel=blur_kernel_size(s) if v.blur_p > 0 else 0)

        return replace(self, weak=rescale(self.weak), strong=tuple(rescale(v) for v in self.strong))


@dataclass(frozen=True)
class TwoViewSpec(RecipeSpec):
    """ReSSL's default: one weak view and one strong view named ``strong``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.strong) != 1:
            raise ValueError(f"TwoViewSpec has exactly one strong view, got {len(self.strong)}")


@dataclass(frozen=True)
class MultiCropSpec(RecipeSpec):
    """One weak view plus several strong crops ``crop_0..crop_{n-1}`` of decreasing size."""


def _check_p(what: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{what} is a probability and must be in [0, 1], got {p}")


def _weak(size: int) -> ViewSpec:
    return ViewSpec(name="weak", size=size, scale=(0.2, 1.0))


def _strong(size: int, name: str = "strong", scale: tuple[float, float] = (0.2, 1.0), blur: bool = True) -> ViewSpec:
    return ViewSpec(
        name=name,
        size=size,
        scale=scale,
        jitter=ColorJitterSpec(0.4, 0.4, 0.4, 0.1, p=0.8),
        gray_p=0.2,
        blur_p=0.5 if blur else 0.0,
        blur_sigma=(0.1, 2.0),
    )


# Multi-crop sizes and scale ranges of the ReSSL paper (NeurIPS 2021, multi-crop ImageNet run).
MULTICROP_224 = ((224, (0.2, 1.0)), (192, (0.172, 0.86)), (160, (0.143, 0.715)), (128, (0.114, 0.571)),
                 (96, (0.086, 0.429)))


def _multicrop(sizes=MULTICROP_224) -> MultiCropSpec:
    crops = tuple(_strong(s, name=f"crop_{i}", scale=sc) for i, (s, sc) in enumerate(sizes))
    return MultiCropSpec(weak=_weak(224), strong=crops)


PRESETS: dict[str, RecipeSpec] = {
    # CIFAR-10/100 at 32 px. The strong view keeps the Gaussian blur at p=0.5, as both public references
    # do at 32 px (the official ReSSL CIFAR code and solo-learn's ReSSL CIFAR preset).
    "cifar32": TwoViewSpec(weak=_weak(32), strong=(_strong(32),), mean=CIFAR_MEAN, std=CIFAR_STD),
    # Tiny-ImageNet at 64 px: small data, no blur.
    "tiny64": TwoViewSpec(weak=_weak(64), strong=(_strong(64, blur=False),)),
    # STL-10 at 96 px: large enough for a 9-px blur window.
    "stl96": TwoViewSpec(weak=_weak(96), strong=(_strong(96),)),
    "imagenet224": TwoViewSpec(weak=_weak(224), strong=(_strong(224),)),
    "imagenet224-multicrop": _multicrop(),
}


def get_recipe(name: str) -> RecipeSpec:
    """Preset by name (see ``PRESETS``); an unknown name is an error that lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; known recipes: {sorted(PRESETS)}") from None



class RecipeError(ValueError):
    """An unknown recipe, or a ``recipe.<view>.<field>`` override that names no field or cannot work."""


def resolve_recipe(name: str, overrides: Mapping[str, Any] | None = None) -> RecipeSpec:
    """The preset ``name`` with ``overrides`` applied: the one recipe a run uses, resolved once.

    Raises:
        RecipeError: unknown preset, or an override that :func:`apply_overrides` rejects.
    """
    try:
        spec = get_recipe(name)
    except KeyError as e:
        raise RecipeError(e.args[0]) from None
    return apply_overrides(spec, overrides or {}, recipe=name)


def apply_overrides(spec: RecipeSpec, overrides: Mapping[str, Any], recipe: str = "recipe") -> RecipeSpec:
    """Apply ``{"<view>.<field>": value}`` changes (``"<view>.jitter.<field>"`` for colour jitter).

    Values are checked against the field's type (``size`` an int, ``scale`` a pair of numbers, ...) and
    by the spec's own validation (probabilities in [0, 1], ranges lo <= hi), one key at a time, so the
    error names the key. A view without jitter that gets a ``jitter.<field>`` starts from
    ``ColorJitterSpec()`` (the paper's strengths and p); ``<view>.jitter=null`` removes jitter. Changing
    ``size`` re-derives a blur window that was derived from the old size, unless ``blur_kernel`` is set too.

    Args:
        spec: the preset.
        overrides: keys without the ``recipe.`` prefix, values as parsed from YAML.
        recipe: the preset's name, for messages.
    """
    names = [v.name for v in spec.views]
    views = {v.name: v for v in spec.views}
    # per view: size before blur_kernel (so an explicit blur_kernel wins), then the rest in key order
    order = sorted(overrides, key=lambda k: (k.split(".")[0], k.split(".")[1:2] == ["blur_kernel"], k))
    for key in order:
        value = overrides[key]
        where = f"recipe.{key}={value!r}"
        view_name, *path = key.split(".")
        if view_name not in views:
            raise RecipeError(f"{where}: recipe {recipe!r} has no view {view_name!r} (views: {', '.join(names)})")
        view = views[view_name]
        try:
            views[view_name] = _override_view(view, path, value, where)
        except (TypeError, ValueError) as e:
            raise RecipeError(e.args[0] if isinstance(e, RecipeError) else f"{where}: {e}") from None
    return replace(spec, weak=views[spec.weak.name], strong=tuple(views[v.name] for v in spec.strong))


_VIEW_FIELDS = {f.name: f for f in fields(ViewSpec) if f.name != "name"}
_JITTER_FIELDS = [f.name for f in fields(ColorJitterSpec)]


def _override_view(view: ViewSpec, path: list[str], value: Any, where: str) -> ViewSpec:
    field = path[0] if path else ""
    if field not in _VIEW_FIELDS:
        raise RecipeError(f"{where}: view {view.name!r} has no field {field!r} "
                          f"(fields: {', '.join(_VIEW_FIELDS)}, jitter.<{'|'.join(_JITTER_FIELDS)}>)")
    if field == "jitter":
        if len(path) == 1:
            if value is not None:
                raise RecipeError(f"{where}: jitter takes null (no jitter) or is changed field by field, "
                                  f"as jitter.<{'|'.join(_JITTER_FIELDS)}>")
            return replace(view, jitter=None)
        if len(path) != 2 or path[1] not in _JITTER_FIELDS:
            raise RecipeError(f"{where}: jitter has no field {'.'.join(path[1:])!r} "
                              f"(fields: {', '.join(_JITTER_FIELDS)})")
        jitter = view.jitter or ColorJitterSpec()
        return replace(view, jitter=replace(jitter, **{path[1]: _number(value, float, where)}))
    if len(path) != 1:
        raise RecipeError(f"{where}: {field!r} has no sub-fields")
    hint = typing.get_type_hints(ViewSpec)[field]
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise RecipeError(f"{where}: {field} is a range [lo, hi] of two numbers")
        new: Any = tuple(_number(x, float, where) for x in value)
    else:
        new = _number(value, hint, where)
    changes: dict[str, Any] = {field: new}
    if field == "size" and view.blur_kernel and view.blur_kernel == blur_kernel_size(view.size):
        changes["blur_kernel"] = 0  # derived from the old size: derive it again
    return replace(view, **changes)


def _number(value: Any, typ: type, where: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{where}: expects a number, got {type(value).__name__}")
    if typ is int:
        if isinstance(value, float) and not value.is_integer():
            raise RecipeError(f"{where}: expects an integer")
        return int(value)
    return float(value)
