"""Typed, strict configuration: YAML preset -> flat dataclass, plus ``key=value`` overrides.

The defaults below reproduce the paper's ImageNet run (ReSSL, RN50, 200 epochs, batch 256); presets in
``configs/`` change only what differs. An unknown key, a wrongly typed value or an impossible
combination is an error raised here, before any data is read or any model is built.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Config", "ConfigError", "load_config", "parse_overrides"]

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file, key or value that cannot work; the message names it."""


@dataclass
class Config:
    # --- run -------------------------------------------------------------------------------------
    name: str = "imagenet"  # run name: logs and checkpoints go to {out_dir}/{name}/
    out_dir: str = "runs"
    seed: int = 0
    resume: str = "auto"  # "auto" = continue from {out_dir}/{name}/last.pt if present; "no"; or a path

    # --- data ------------------------------------------------------------------------------------
    data: str = "data/imagenet"  # directory with train/ val/ (ImageFolder) and/or train.beton, train.rec
    train_split: str = "train"  # STL-10 trains on "unlabeled"
    backend: str = "auto"  # auto | torchvision | dali | ffcv
    recipe: str = "imagenet224"  # augmentation preset in pipelines/spec.py
    num_workers: int = 8  # loader PROCESSES per training process (torchvision DataLoader workers; 0 = in-process)
    num_threads: int = 0  # loader THREADS per training process (DALI CPU threads, FFCV threads); 0 = num_workers
    ffcv_order: str = "auto"  # FFCV visiting order: auto | random | quasi_random (one process only) | sequential
    ffcv_os_cache: bool = True  # FFCV: let the OS page cache hold the .beton (false = FFCV's own process cache)
    ffcv_batches_ahead: int = 3  # FFCV: batches prepared in advance
    channels_last: bool = True

    # --- model -----------------------------------------------------------------------------------
    backbone: str = "resnet50"  # name in ressl.models.BACKBONES or any torchvision classification builder
    proj_hidden: int = 4096  # projection head: feat -> proj_hidden -> ReLU -> proj_dim (no BN)
    proj_dim: int = 512
    predictor: bool = False  # TPAMI: asymmetric MLP predictor on the student only
    pred_hidden: int = 4096

    # --- method ----------------------------------------------------------------------------------
    queue_size: int = 131072  # K, memory queue of teacher embeddings; multiple of batch_size
    tau_s: float = 0.1  # student temperature
    tau_t: float = 0.04  # teacher temperature (sharper)
    momentum: float = 0.999  # EMA momentum m (start value for the cosine schedule)
    momentum_schedule: str = "constant"  # constant | cosine (m -> 1 over training)
    w_rel: float = 1.0  # weight of the relation loss
    w_sim: float = 0.0  # seed-004 instance term 2 - 2 cos(p, k) (p = predictor output when predictor is on)
    warmup_infonce_epochs: int = 0  # TPAMI: InfoNCE instead of the relation loss for these epochs
    infonce_blend_epochs: int = 0  # linear blend InfoNCE -> relation over this many epochs after warm-up
    infonce_tau: float = 0.2
    shuffle_bn_splits: int = 2  # BN statistics from this many groups of each process's batch (1 = off; see ReSSL)

    # --- optimisation ----------------------------------------------------------------------------
    epochs: int = 200
    batch_size: int = 256  # global batch (all processes); each loads batch_size / num_processes
    lr: float = 0.05  # learning rate per 256 images: actual lr = lr * batch_size / 256
    weight_decay: float = 1e-4  # not applied to norm weights and biases unless decay_norm_bias
    decay_norm_bias: bool = False  # True: decay every parameter (the official CIFAR code: 5e-4 on all)
    sgd_momentum: float = 0.9
    warmup_epochs: int = 5  # linear warm-up, then cosine to 0
    max_steps: int = 0  # stop after this many optimiser steps (0 = epochs * steps per epoch)

    # --- speed -----------------------------------------------------------------------------------
    precision: str = "auto"  # auto (bf16 on GPU, no on CPU) | no | bf16 | fp16
    compile: bool = False  # torch.compile the student and teacher

    # --- monitoring and saving -------------------------------------------------------------------
    log_every: int = 10  # steps between CSV / TensorBoard rows
    knn_every: int = 10  # epochs between kNN monitors (0 = only at the start and end)
    knn_k: int = 200
    knn_t: float = 0.07
    knn_before: bool = False  # also measure kNN before training (the demo shows before/after)
    ckpt_every: int = 1000  # steps between checkpoints (and one at the end)

    def validate(self) -> Config:
        """Raise ConfigError for impossible values; return self for chaining."""
        errs = []
        positive = ["shuffle_bn_splits", "batch_size", "epochs", "queue_size", "proj_hidden", "proj_dim",
                    "pred_hidden", "log_every", "ckpt_every", "knn_k"]
        errs += [f"{k} must be > 0, got {getattr(self, k)}" for k in positive if getattr(self, k) <= 0]
        nonneg = ["num_workers", "num_threads", "warmup_epochs", "warmup_infonce_epochs", "infonce_blend_epochs", "max_steps",
                  "knn_every", "w_rel", "w_sim", "weight_decay"]
        errs += [f"{k} must be >= 0, got {getattr(self, k)}" for k in nonneg if getattr(self, k) < 0]
        errs += [f"{k} must be > 0, got {getattr(self, k)}" for k in ("tau_s", "tau_t", "infonce_tau", "lr", "knn_t")
                 if getattr(self, k) <= 0]
        if not 0.0 <= self.momentum <= 1.0:
            errs.append(f"momentum must be in [0, 1], got {self.momentum}")
        if self.momentum_schedule not in ("constant", "cosine"):
            errs.append(f"momentum_schedule must be 'constant' or 'cosine', got {self.momentum_schedule!r}")
        if self.precision not in ("auto", "no", "bf16", "fp16"):
            errs.append(f"precision must be one of auto/no/bf16/fp16, got {self.precision!r}")
        if self.ffcv_order not in ("auto", "random", "quasi_random", "sequential"):
            errs.append(f"ffcv_order must be one of auto/random/quasi_random/sequential, got {self.ffcv_order!r}")
        if self.ffcv_batches_ahead < 1:
            errs.append(f"ffcv_batches_ahead must be >= 1, got {self.ffcv_batches_ahead}")
        if self.backend not in ("auto", "torchvision", "dali", "ffcv"):
            errs.append(f"backend must be one of auto/torchvision/dali/ffcv, got {self.backend!r}")
        if self.w_rel == 0 and self.w_sim == 0:
            errs.append("w_rel and w_sim are both 0: there is no loss to train")
        if self.queue_size % self.batch_size:
            errs.append(f"queue_size={self.queue_size} must be a multiple of the global batch_size={self.batch_size}")
        try:
            from pipelines.spec import get_recipe

            get_recipe(self.recipe)
        except KeyError as e:
            errs.append(str(e.args[0]))
        try:
            from ressl.models import check_backbone_name

            check_backbone_name(self.backbone)
        except KeyError as e:
            errs.append(str(e.args[0]))
        if errs:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
        return self

    def check_world(self, num_processes: int) -> None:
        """Checks that need the process count (known only once Accelerate has started)."""
        if self.batch_size % num_processes:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by {num_processes} processes")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def _coerce(key: str, value: Any, typ: type, source: str) -> Any:
    """Convert ``value`` to the field's type; strings from the command line are parsed as YAML."""
    if isinstance(value, str) and typ is not str:
        value = yaml.safe_load(value)
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{source}: key {key!r} expects {typ.__name__}, got {value!r} ({type(value).__name__})")


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["lr=0.1", "epochs=5"]`` -> ``{"lr": "0.1", "epochs": "5"}``; anything else is an error."""
    out = {}
    for a in args:
        if "=" not in a or a.startswith("="):
            raise ConfigError(f"override {a!r} is not of the form key=value")
        k, v = a.split("=", 1)
        out[k.strip().lstrip("-")] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read a YAML preset, apply overrides, validate. Logs every overridden key.

    Args:
        path: YAML file with a flat mapping of Config keys (None = the defaults).
        overrides: ``key=value`` strings (command line) or a dict.
    """
    types_ = _field_types()
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value, got {type(raw).__name__}")
        for k, v in raw.items():
            if k not in types_:
                raise ConfigError(f"{path}: unknown key {k!r} (known keys: {', '.join(sorted(types_))})")
            values[k] = _coerce(k, v, types_[k], str(path))
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for k, v in (overrides or {}).items():
        if k not in types_:
            raise ConfigError(f"override: unknown key {k!r} (known keys: {', '.join(sorted(types_))})")
        values[k] = _coerce(k, v, types_[k], "override")
        log.info("override %s = %r", k, values[k])
    return Config(**values).validate()
