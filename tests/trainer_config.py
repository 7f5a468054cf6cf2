"""What the training tests share: the small trainer config (a few CPU steps on the tiny image folder), and a
run killed during a chosen step."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

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


class Killed(Exception):
    """Stands for the process being killed in the middle of a training step."""


@contextmanager
def killed_during_step(method: type, step: int) -> Iterator[None]:
    """Within the block, ``method.update`` (the EMA + queue update that ends every step of ReSSL and RGRL)
    raises :class:`Killed` during optimiser step ``step`` (1-based), which the block must end with."""
    real, calls = method.update, {"n": 0}

    def update(self, momentum):
        calls["n"] += 1
        if calls["n"] == step:
            raise Killed
        return real(self, momentum)

    method.update = update
    try:
        with pytest.raises(Killed):
            yield
    finally:
        method.update = real
