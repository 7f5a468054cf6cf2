"""ressl/schedule.py: the lr (per-256 scaling, warm-up, cosine), EMA momentum and InfoNCE weight schedules."""

from __future__ import annotations

import math

import pytest

from ressl.config import Config
from ressl.schedule import Schedule, infonce_weight, lr_factor, momentum_at, scaled_lr


def test_lr_is_per_256_images():
    assert scaled_lr(0.05, 256) == pytest.approx(0.05)
    assert scaled_lr(0.05, 4096) == pytest.approx(0.8)
    assert scaled_lr(0.06, 32) == pytest.approx(0.0075)


def test_lr_warms_up_linearly_then_follows_a_cosine_to_zero():
    f = [lr_factor(s, 4, 20) for s in range(22)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]  # step 0 already trains, at 1/warmup of the peak
    assert f[4] == 1.0 and f[12] == pytest.approx(0.5) and f[20] == 0.0 and f[21] == 0.0
    assert f[4:] == sorted(f[4:], reverse=True)
    assert [lr_factor(s, 0, 8) for s in (0, 4, 8)] == [1.0, pytest.approx(0.5), 0.0]


def test_momentum_schedule():
    assert momentum_at(37, 100, 0.99, "constant") == 0.99
    assert momentum_at(0, 100, 0.99, "cosine") == pytest.approx(0.99)
    assert momentum_at(100, 100, 0.99, "cosine") == pytest.approx(1.0)
    assert momentum_at(50, 100, 0.99, "cosine") == pytest.approx(1 - 0.01 * (math.cos(math.pi / 2) + 1) / 2)
    values = [momentum_at(s, 100, 0.99, "cosine") for s in range(101)]
    assert values == sorted(values)
    with pytest.raises(ValueError, match="linear"):
        momentum_at(0, 100, 0.99, "linear")


def test_infonce_warmup_schedule_and_switch():
    assert infonce_weight(0.0, 3, 0) == 1.0
    assert infonce_weight(2.99, 3, 0) == 1.0
    assert infonce_weight(3.0, 3, 0) == 0.0  # hard switch exactly at the end of warm-up
    assert infonce_weight(3.0, 3, 2) == 1.0
    assert infonce_weight(4.0, 3, 2) == pytest.approx(0.5)
    assert infonce_weight(5.0, 3, 2) == 0.0
    assert infonce_weight(7.0, 0, 0) == 0.0
    # Steps of a 10-step epoch: the first step with weight 0 is step 30.
    weights = [infonce_weight(s / 10, 3, 0) for s in range(40)]
    assert weights.index(0.0) == 30
    with pytest.raises(ValueError, match=">= 0"):
        infonce_weight(1.0, -1, 0)


def test_schedule_of_a_config_reads_its_keys():
    cfg = Config(lr=0.2, batch_size=64, warmup_epochs=2, momentum=0.99, momentum_schedule="cosine",
                 warmup_infonce_epochs=1, infonce_blend_epochs=2, queue_size=128).validate()
    s = Schedule.from_config(cfg, steps_per_epoch=10, total_steps=100)
    assert s.lr(0) == pytest.approx(0.05 / 20) and s.lr(19) == pytest.approx(0.05)
    assert s.lr(100) == 0.0
    assert s.ema_momentum(0) == pytest.approx(0.99) and s.ema_momentum(100) == pytest.approx(1.0)
    assert s.infonce(0, 9) == 1.0 and s.infonce(2, 0) == pytest.approx(0.5) and s.infonce(3, 0) == 0.0
