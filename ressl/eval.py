"""Evaluation of a frozen backbone: features, weighted kNN, linear probe, t-SNE picture.

The trainer's kNN monitor and ``tools/eval.py`` share these functions, so the number printed during
training is the number a checkpoint evaluates to.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config, ConfigError
from .io import atomic_open
from .schedule import lr_factor, scaled_lr

__all__ = [
    "Checkpoint",
    "read_checkpoint",
    "load_checkpoint",
    "extract_features",
    "knn_accuracy",
    "topk_accuracy",
    "linear_probe",
    "linear_probe_augmented",
    "EpochLoader",
    "tsne_plot",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """A trainer checkpoint as evaluation needs it: weights, config and what identifies the file."""

    model: dict[str, torch.Tensor]
    config: Config
    step: int | None  # optimiser steps trained (None: a file without the trainer's "step" entry)
    sha256: str  # of the bytes that were loaded


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a trainer checkpoint with ``weights_only=True`` and hash the same bytes.

    The file is opened once: the hash and the weights come from one inode even when a running trainer
    renames a newer checkpoint over ``path`` meanwhile, so a result keyed by this hash is of these weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    with open(path, "rb") as f:
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        f.seek(0)
        try:
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - torch raises several types; its message suggests an unsafe load
            # The file is never unpickled beyond tensors and plain containers; say what it is not, and
            # drop torch's message (it recommends loading the untrusted file with arbitrary code).
            f.seek(0)
            if zipfile.is_zipfile(f):
                what = ("a torch.save archive that holds Python objects other than tensors and plain containers, "
                        "which a checkpoint of tools/train.py never holds")
            else:
                what = f"not a torch.save file at all (no zip archive; {os.fstat(f.fileno()).st_size} bytes)"
            raise ConfigError(f"{path} is not a trainer checkpoint: it is {what}; it was not loaded") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConfigError(f"{path}: expected a trainer checkpoint dict with keys 'model' and 'config', got {found}")
    raw = ckpt["config"]
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'config' must be a dict (Config.to_dict()), got {type(raw).__name__}")
    known = {f for f in Config.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: config has keys this version does not know: {unknown}")
    step = ckpt.get("step")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise ConfigError(f"{path}: 'step' must be a non-negative int, got {step!r}")
    return Checkpoint(ckpt["model"], Config(**raw).validate(), step, digest.hexdigest())


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Config]:
    """The ReSSL state_dict and Config of a trainer checkpoint, read with ``weights_only=True``."""
    ckpt = read_checkpoint(path)
    return ckpt.model, ckpt.config


@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], normalize: bool = True
) -> tuple[Tensor, Tensor]:
    """Backbone features of every image of ``loader``, in eval mode (BN running statistics).

    Args:
        backbone: maps [B, 3, H, W] to [B, F].
        loader: yields ``(images, labels)`` already on the backbone's device.
        normalize: L2-normalise the features (kNN and t-SNE want unit vectors; the linear probe
            standardises raw ones itself).

    Returns:
        ``(feats [N, F] float32, labels [N] int64)`` on the loader's device. The backbone's train/eval
        mode is restored afterwards.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for images, y in loader:
            f = backbone(images).float()
            feats.append(F.normalize(f, dim=1) if normalize else f)
            labels.append(y.long())
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches (empty split?)")
    return torch.cat(feats), torch.cat(labels)


def _num_classes(num_classes: int | None, *labels: Tensor) -> int:
    found = int(max(int(y.max()) for y in labels if y.numel())) + 1
    if num_classes is None:
        return found
    if num_classes < found:
        raise ValueError(f"num_classes={num_classes} but labels go up to {found - 1}")
    return num_classes


@torch.no_grad()
def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k: int = 200,
    t: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 256,
) -> float:
    """Weighted kNN top-1 (%) with cosine similarity (InstDisc / ReSSL monitor).

    Each test feature votes with its ``k`` most similar training features, each weighted by
    ``exp(sim / t)``; the class with the largest total wins. Test rows are processed ``chunk`` at a
    time so memory stays ``chunk x N_train``.

    Args:
        train_feats: [N, F] L2-normalised memory bank; train_labels: [N].
        test_feats: [M, F] L2-normalised queries; test_labels: [M].
        k: neighbours (clipped to N); t: temperature of the vote weights.
        num_classes: number of classes (default: from the labels).
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be [N, F] and [M, F], got {tuple(train_feats.shape)} and "
                         f"{tuple(test_feats.shape)}")
    if len(train_labels) != len(train_feats) or len(test_labels) != len(test_feats):
        raise ValueError("each feature needs exactly one label")
    if k <= 0 or t <= 0:
        raise ValueError(f"kNN needs k > 0 and t > 0, got k={k}, t={t}")
    c = _num_classes(num_classes, train_labels, test_labels)
    k = min(k, len(train_feats))
    bank = train_feats.float()
    bank_labels = train_labels.to(bank.device).long()
    correct = 0
    for start in range(0, len(test_feats), chunk):
        q = test_feats[start:start + chunk].to(bank.device).float()
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), c, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / t).exp())
        pred = votes.argmax(dim=1)
        correct += int((pred == test_labels[start:start + chunk].to(bank.device)).sum())
    return 100.0 * correct / max(len(test_feats), 1)


def topk_accuracy(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Top-k accuracies (%) of ``logits`` [N, C]; k larger than C counts as C."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels.view(-1, 1)
    return {k: 100.0 * float(hit[:, :k].any(dim=1).float().mean()) for k in ks}


def _sgd_cosine(params, lr: float, batch_size: int, momentum: float, weight_decay: float, total_steps: int):
    """SGD at ``lr`` per 256 images, cosine to 0 over ``total_steps`` without warm-up (``ressl.schedule``)."""
    opt = torch.optim.SGD(params, lr=scaled_lr(lr, batch_size), momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, 0, total_steps))
    return opt, sched


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 100,
    lr: float = 0.3,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Fast linear probe on cached features: SGD + cosine, ``lr * batch_size / 256`` (paper: 0.3, 100 ep).

    Features are standardised with the training set's mean and std first. That is a fixed affine map,
    so the classifier is still linear in the backbone features, but it makes one learning rate work
    for any backbone width and feature scale.

    Returns:
        ``{"top1": %, "top5": %}`` on the test features.
    """
    if epochs <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError(f"linear probe needs epochs, batch_size, lr > 0; got {epochs}, {batch_size}, {lr}")
    c = _num_classes(num_classes, train_labels, test_labels)
    device = train_feats.device
    x = train_feats.float()
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    x = (x - mean) / std
    y = train_labels.to(device).long()
    g = torch.Generator(device="cpu").manual_seed(seed)
    fc = nn.Linear(x.shape[1], c)
    with torch.no_grad():
        fc.weight.copy_(0.01 * torch.randn(fc.weight.shape, generator=g))
        fc.bias.zero_()
    fc = fc.to(device)
    steps = math.ceil(len(x) / batch_size)
    opt, sched = _sgd_cosine(fc.parameters(), lr, batch_size, momentum, weight_decay, epochs * steps)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g).to(device)
        for i in range(steps):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(fc(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        logits = fc((test_feats.to(device).float() - mean) / std)
    acc = topk_accuracy(logits, test_labels.to(device).long())
    return {"top1": acc[1], "top5": acc[5]}


class EpochLoader(Protocol):
    """A loader of ``(images, labels)`` that re-draws its crops and order for each epoch."""

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...


def linear_probe_augmented(
    backbone: nn.Module,
    train_loader: EpochLoader,
    test_loader: Iterable[tuple[Tensor, Tensor]],
    *,
    num_classes: int,
    feat_dim: int,
    epochs: int = 100,
    lr: float = 0.3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """The paper's linear probe: frozen backbone and BN (eval mode), fresh augmented crops every epoch.

    As the official ReSSL ``linear_eval.py``: a Linear layer on the raw backbone features (weights
    N(0, 0.01), zero bias), SGD momentum 0.9, ``lr * batch_size / 256`` (0.3 per 256), no weight decay,
    cosine over all steps, 100 epochs, evaluated after every epoch; the final and the best epoch are
    reported. ``train_loader`` applies the training crops (random resized crop + flip) and gets
    ``set_epoch(epoch)`` before each epoch so every epoch sees new crops; ``test_loader`` gives center
    crops, whose features are computed once since the backbone is frozen.

    Returns:
        ``{"top1", "top5"}`` after the last epoch, ``{"best_top1", "best_top5", "best_epoch"}`` of the
        epoch with the best top-1 (epochs counted from 1), all in %.
    """
    if epochs <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError(f"linear probe needs epochs, batch_size, lr > 0; got {epochs}, {batch_size}, {lr}")
    if not callable(getattr(train_loader, "set_epoch", None)):
        raise TypeError(f"the probe's train loader ({type(train_loader).__name__}) has no set_epoch(epoch): "
                        "without it every epoch would see the same crops")
    device = next(backbone.parameters()).device
    test_f, test_y = extract_features(backbone, test_loader, normalize=False)
    g = torch.Generator(device="cpu").manual_seed(seed)
    probe = nn.Linear(feat_dim, num_classes)
    with torch.no_grad():
        probe.weight.copy_(0.01 * torch.randn(probe.weight.shape, generator=g))
        probe.bias.zero_()
    probe = probe.to(device)
    opt, sched = _sgd_cosine(probe.parameters(), lr, batch_size, momentum, weight_decay,
                             epochs * len(train_loader))
    final: dict[int, float] = {}
    best = {"best_top1": -1.0, "best_top5": 0.0, "best_epoch": 0}
    was_training = backbone.training
    backbone.eval()
    try:
        for epoch in range(epochs):
            train_loader.set_epoch(epoch)
            for images, y in train_loader:
                with torch.no_grad():
                    f = backbone(images).float()
                loss = F.cross_entropy(probe(f), y.long())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            with torch.no_grad():
                final = topk_accuracy(probe(test_f), test_y.long())
            if final[1] > best["best_top1"]:
                best = {"best_top1": final[1], "best_top5": final[5], "best_epoch": epoch + 1}
    finally:
        backbone.train(was_training)
    return {"top1": final[1], "top5": final[5], **best}


def tsne_plot(
    feats: Tensor,
    labels: Tensor,
    path: str | os.PathLike,
    *,
    class_names: list[str] | None = None,
    max_points: int = 5000,
    perplexity: float = 30.0,
    seed: int = 0,
    title: str = "t-SNE of validation features",
) -> Path:
    """Write a 2-D t-SNE scatter of ``feats`` coloured by class to the PNG ``path`` (atomically).

    At most ``max_points`` rows, a fixed random subset, are embedded: t-SNE is quadratic-ish and the
    picture does not improve beyond a few thousand points.
    """
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.manifold import TSNE

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"t-SNE output {str(path)!r} must end in .png")
    x = feats.detach().float().cpu().numpy()
    y = labels.detach().cpu().numpy()
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"t-SNE needs >= 3 features with one label each, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    if len(x) > max_points:
        keep = rng.choice(len(x), max_points, replace=False)
        x, y = x[keep], y[keep]
    perp = min(perplexity, (len(x) - 1) / 3)  # sklearn requires perplexity < n_samples
    xy = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(x)

    fig = Figure(figsize=(7, 7), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    classes = np.unique(y)
    many = len(classes) > 20  # tab20 for few classes; a continuous map when they would repeat
    cmap = matplotlib.colormaps["turbo" if many else "tab20"]
    for i, c in enumerate(classes):
        m = y == c
        color = cmap(i / max(len(classes) - 1, 1)) if many else cmap(i)
        name = class_names[int(c)] if class_names and int(c) < len(class_names) else str(int(c))
        ax.scatter(xy[m, 0], xy[m, 1], s=4, color=color, label=name if len(classes) <= 20 else None)
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    with atomic_open(path) as f:
        fig.savefig(f, format="png")
    log.info("wrote t-SNE of %d points to %s", len(x), path)
    return path
