"""Backbones by name, projection head and predictor.

One explicit registry, :data:`BACKBONES`, maps each name to a builder of a randomly initialised
torchvision classification model; any other torchvision classification builder name works too.
:func:`build_backbone` removes the classifier and reports the feature width read from the removed
layer, so nothing downstream hard-codes 512 or 2048. No pretrained weights are ever downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

__all__ = [
    "BACKBONES",
    "CLASSIFIER_ATTRS",
    "check_backbone_name",
    "build_model",
    "build_backbone",
    "ProjectionHead",
    "Predictor",
]

# Attributes under which torchvision models keep their classifier, in the order they are tried.
CLASSIFIER_ATTRS = ("fc", "classifier", "heads", "head")
# torchvision classifiers whose head is a conv, not a Linear: no feature vector to take.
_NO_LINEAR_HEAD = frozenset({"squeezenet1_0", "squeezenet1_1"})


def _cifar_resnet(arch: str) -> nn.Module:
    """ResNet for 32 px inputs: 3x3 stride-1 stem and no max-pool, so stage 1 still sees 32x32."""
    model = getattr(torchvision.models, arch)(weights=None)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _narrow_resnet18(width: int) -> nn.Module:
    """torchvision's ResNet-18 blocks at ``width`` base channels (``width`` .. 8 x ``width``) with a 3x3
    stride-2 stem and no max-pool, for small inputs on a CPU.

    At 32 px and width 32 it has 2.8 M parameters (ResNet-18: 11.7 M) and stage 1 sees 16 x 16, twice the
    resolution of the ImageNet stem's 8 x 8; one training step of the demo takes about half the time of
    ``resnet18``'s on 2 CPU cores. Initialised as torchvision initialises its ResNets.
    """
    model = torchvision.models.resnet18(weights=None)
    model.inplanes = width  # read by _make_layer: the input width of the next stage
    model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=2, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.maxpool = nn.Identity()
    for i, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
        setattr(model, name, model._make_layer(BasicBlock, width * 2**i, 2, stride=1 if i == 0 else 2))
    model.fc = nn.Linear(8 * width, model.fc.out_features)
    for m in model.modules():  # new BatchNorms already start at weight 1, bias 0, as torchvision sets them
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def _torchvision(arch: str) -> nn.Module:
    return torchvision.models.get_model(arch, weights=None)


BACKBONES: dict[str, Callable[[], nn.Module]] = {
    "resnet18_cifar": partial(_cifar_resnet, "resnet18"),
    "resnet50_cifar": partial(_cifar_resnet, "resnet50"),
    "resnet18_w32": partial(_narrow_resnet18, 32),
    "resnet18": partial(_torchvision, "resnet18"),
    "resnet50": partial(_torchvision, "resnet50"),
    "efficientnet_b0": partial(_torchvision, "efficientnet_b0"),
    "mobilenet_v3_large": partial(_torchvision, "mobilenet_v3_large"),
}


def _torchvision_classifiers() -> set[str]:
    return set(torchvision.models.list_models(module=torchvision.models))


def check_backbone_name(name: str) -> None:
    """Raise KeyError naming the choices unless ``name`` is registered or a torchvision classifier."""
    if name in BACKBONES or (name in _torchvision_classifiers() and name not in _NO_LINEAR_HEAD):
        return
    raise KeyError(
        f"unknown backbone {name!r}; registered: {sorted(BACKBONES)}; or any torchvision classification "
        f"model with a Linear classifier (torchvision.models.list_models(module=torchvision.models), "
        f"except {sorted(_NO_LINEAR_HEAD)})"
    )


def build_model(name: str) -> nn.Module:
    """The full classification model for ``name`` (classifier included), randomly initialised.

    This is the model an exported backbone state_dict loads into.
    """
    check_backbone_name(name)
    builder = BACKBONES.get(name) or partial(_torchvision, name)
    return builder()


def _strip_classifier(model: nn.Module, name: str) -> int:
    """Replace the classifier by what precedes its first Linear; return that Linear's in_features."""
    for attr in CLASSIFIER_ATTRS:
        head = getattr(model, attr, None)
        if head is None:
            continue
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Sequential):
            kept: list[nn.Module] = []
            for child in head:
                if isinstance(child, nn.Linear):
                    # Keep pre-Linear reshaping/normalisation (ConvNeXt: LayerNorm2d, Flatten); drop the rest.
                    setattr(model, attr, nn.Sequential(*kept))
                    return child.in_features
                if not isinstance(child, nn.Dropout):
                    kept.append(child)
    raise ValueError(
        f"backbone {name!r}: found no Linear classifier under any of {CLASSIFIER_ATTRS}; "
        f"it cannot be used headless (choose a backbone from {sorted(BACKBONES)})"
    )


def build_backbone(name: str) -> tuple[nn.Module, int]:
    """Headless backbone and its feature width.

    Args:
        name: key of :data:`BACKBONES` or a torchvision classification builder name.

    Returns:
        ``(module, feat_dim)``; ``module(x)`` maps [B, 3, H, W] to [B, feat_dim].
    """
    model = build_model(name)
    if hasattr(model, "aux_logits"):  # GoogLeNet / Inception return tuples in train mode otherwise
        model.aux_logits = False
        for aux in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    feat_dim = _strip_classifier(model, name)
    return model, feat_dim


class ProjectionHead(nn.Sequential):
    """ReSSL projection: Linear -> ReLU -> Linear, no BatchNorm (as the official ReSSL code; 2048-4096-512 on
    ImageNet)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class Predictor(nn.Sequential):
    """TPAMI asymmetric predictor on the student: Linear -> BN -> ReLU -> Linear, ``dim -> hidden -> dim``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(
            nn.Linear(dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim),
        )
