"""The small trainer config the training tests share: a few CPU steps on the tiny image folder."""

from __future__ import annotations

from ressl.config import Config, load_config

BASE = {"recipe": "cifar32", "backbone": "resnet18", "proj_hidden": 32, "proj_dim": 16, "queue_size": 32,
        "batch_size": 8, "num_workers": 0, "channels_last": "false", "warmup_epochs": 0, "knn_every": 0,
        "knn_k": 5, "momentum": 0.9, "log_every": 1, "lr": 0.2}


def small_args(**changes) -> list[str]:
    """``key=value`` overrides of the base, with ``changes`` applied (``None`` drops a key)."""
    keys = {**BASE, **changes}
    return [f"{k}={v}" for k, v in keys.items() if v is not None]


def small_config(data, out, *extra: str, **changes) -> Config:
    """The base config on ``data``, writing under ``out``, then ``extra`` overrides."""
    return load_config(None, [f"data={data}", f"out_dir={out}", *small_args(**changes), *extra])
