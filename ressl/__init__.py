"""ReSSL (NeurIPS 2021 + TPAMI 2024): the method, independent of where batches come from.

Submodules: ``loss`` (relation / InfoNCE / similarity losses), ``schedule`` (lr, EMA momentum and
InfoNCE weight as functions of the step), ``ema`` (teacher update), ``queue`` (memory queue), ``models``
(backbone registry, heads), ``method`` (the ReSSL module), ``step`` (one optimiser step), ``run`` (run
directory, lock, checkpoints, log), ``eval`` (kNN, linear probe, t-SNE), ``config`` (flat typed config).
The names below are imported lazily so that ``import ressl.config`` stays cheap (no torchvision import).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ReSSL",
    "infonce_weight",
    "relation_loss",
    "infonce_loss",
    "similarity_loss",
    "ema_update_",
    "momentum_at",
    "scaled_lr",
    "Schedule",
    "FeatureQueue",
    "BACKBONES",
    "build_backbone",
    "check_backbone_name",
    "ProjectionHead",
    "Predictor",
    "extract_features",
    "knn_accuracy",
    "linear_probe",
    "linear_probe_augmented",
    "tsne_plot",
    "Config",
    "load_config",
]

_WHERE = {
    "ReSSL": "method",
    "Schedule": "schedule", "infonce_weight": "schedule", "momentum_at": "schedule", "scaled_lr": "schedule",
    "relation_loss": "loss", "infonce_loss": "loss", "similarity_loss": "loss",
    "ema_update_": "ema",
    "FeatureQueue": "queue",
    "BACKBONES": "models", "build_backbone": "models", "check_backbone_name": "models",
    "ProjectionHead": "models", "Predictor": "models",
    "extract_features": "eval", "knn_accuracy": "eval", "linear_probe": "eval",
    "linear_probe_augmented": "eval", "tsne_plot": "eval",
    "Config": "config", "load_config": "config",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'ressl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
