"""EMA update against a float64 reference, its edge cases, and the momentum schedule."""

import copy

import pytest
import torch
from torch import nn

from ressl.ema import ema_update_


def _pair(seed=0):
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.data.normal_()
    student.train()(torch.randn(8, 4))  # moves the student's BN running stats
    return teacher, student


def test_matches_float64_reference_and_leaves_buffers_alone():
    teacher, student = _pair()
    t0 = {n: p.detach().double().clone() for n, p in teacher.named_parameters()}
    bufs0 = {n: b.clone() for n, b in teacher.named_buffers()}
    s = {n: p.detach().double() for n, p in student.named_parameters()}
    ema_update_(teacher, student, 0.9)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p.detach().double(), 0.9 * t0[n] + 0.1 * s[n], rtol=1e-6, atol=1e-6)
    # the teacher's BN statistics come from its own forward passes, never from the student's
    for n, b in teacher.named_buffers():
        assert torch.equal(b, bufs0[n]), n
    assert not torch.equal(dict(teacher.named_buffers())["1.running_mean"],
                           dict(student.named_buffers())["1.running_mean"])


def test_momentum_one_leaves_teacher_unchanged_and_zero_copies_student():
    teacher, student = _pair(1)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    ema_update_(teacher, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))


def test_student_may_have_extra_modules_but_not_fewer():
    teacher, student = _pair(2)
    student_ext = nn.Sequential(*student, nn.Linear(3, 3))  # an extra "predictor" layer, index 3
    ema_update_(teacher, student_ext, 0.5)  # ignores the extra layer
    with pytest.raises(KeyError, match="no student"):
        ema_update_(student_ext, teacher, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ema_update_(teacher, student, 1.5)

