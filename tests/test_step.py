"""ressl/step.py: the one training step of train and bench, the optimiser and the precision rule."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from ressl.config import Config
from ressl.step import TrainStep, build_optimizer, build_ressl, resolve_precision

TINY = dict(backbone="resnet18_cifar", proj_hidden=32, proj_dim=16, queue_size=16, batch_size=4, lr=0.5,
            momentum=0.9, channels_last=False, recipe="cifar32", precision="no")


@pytest.fixture
def accelerator():
    """A CPU float32 Accelerator of this test alone (Accelerate keeps one state per process)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(mixed_precision="no", cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def _setup(accelerator, **over):
    torch.manual_seed(0)
    cfg = Config(**{**TINY, **over}).validate()
    model = build_ressl(cfg, accelerator.device)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    return cfg, TrainStep(model, optimizer, accelerator)


def _views(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 16, 16, generator=g), [torch.randn(4, 3, 16, 16, generator=g)]


@pytest.mark.parametrize("precision, device, want", [
    ("auto", "cpu", "no"), ("auto", "cuda", "bf16"), ("auto", torch.device("cuda", 1), "bf16"),
    ("fp16", "cpu", "fp16"), ("no", "cuda", "no"), ("bf16", "cpu", "bf16"),
])
def test_precision_auto_is_bf16_on_cuda_only(precision, device, want):
    assert resolve_precision(precision, device) == want


def test_precision_auto_without_a_device_follows_cuda_availability():
    assert resolve_precision("auto") == ("bf16" if torch.cuda.is_available() else "no")
    with pytest.raises(ValueError, match="precision must be one of auto/no/bf16/fp16, got 'fp8'"):
        resolve_precision("fp8", "cpu")


def test_optimizer_scales_lr_and_spares_norms_and_biases(accelerator):
    cfg = Config(**TINY).validate()
    model = build_ressl(cfg, "cpu")
    opt = build_optimizer(model, cfg)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.5 * 4 / 256)] * 2
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert opt.defaults["momentum"] == cfg.sgd_momentum


def test_channels_last_model(accelerator):
    model = build_ressl(Config(**{**TINY, "channels_last": True}).validate(), "cpu")
    conv = next(p for p in model.student.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_one_step_trains_student_at_its_lr_then_moves_teacher_and_queue(accelerator):
    cfg, step = _setup(accelerator)
    core = step.core
    student0 = [p.detach().clone() for p in core.student.parameters()]
    teacher0 = [p.detach().clone() for p in core.teacher.parameters()]
    queue0 = core.queue.buffer.clone()
    lr0 = step.optimizer.param_groups[0]["lr"]
    weak, strong = _views()
    loss, metrics = step(weak, strong, momentum=0.5, lr=lr0 / 2)
    assert loss.ndim == 0 and torch.isfinite(loss) and "loss" in metrics
    assert all(p.grad is None for p in core.student.parameters()), "zero_grad(set_to_none) after the step"
    assert any(not torch.equal(a, p) for a, p in zip(student0, core.student.parameters()))
    # EMA with m = 0.5 over matched names: teacher = (teacher0 + new student) / 2 for the backbone weights
    s_new = dict(core.student.named_parameters())
    for (name, t), t0 in zip(core.teacher.named_parameters(), teacher0):
        torch.testing.assert_close(t, 0.5 * t0 + 0.5 * s_new[name].detach(), rtol=1e-5, atol=1e-6)
    assert int(core.queue.ptr) == 4  # one batch of teacher keys enqueued
    assert not torch.equal(queue0[:4], core.queue.buffer[:4]) and torch.equal(queue0[4:], core.queue.buffer[4:])
    assert [g["lr"] for g in step.optimizer.param_groups] == [lr0 / 2] * 2, "the step's lr, every group"
    assert not step.nonfinite.item()


def test_a_nan_loss_raises_the_device_flag_and_it_stays_up(accelerator, monkeypatch):
    _, step = _setup(accelerator)
    from ressl.method import ReSSL

    real = ReSSL.forward

    def nan_forward(self, *a, **k):
        loss, metrics = real(self, *a, **k)
        return loss * float("nan"), metrics

    monkeypatch.setattr(ReSSL, "forward", nan_forward)
    step(*_views(), momentum=0.9)
    monkeypatch.setattr(ReSSL, "forward", real)
    step(*_views(1), momentum=0.9)
    assert step.nonfinite.device == accelerator.device and step.nonfinite.item()


def test_same_seed_same_steps(accelerator):
    losses = []
    for _ in range(2):
        _, step = _setup(accelerator)
        losses.append([step(*_views(i), momentum=0.9)[0].item() for i in range(3)])
    assert losses[0] == losses[1]


@pytest.mark.cuda
def test_bf16_step_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: the bf16 autocast step training takes on a GPU")
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        acc = Accelerator(mixed_precision="bf16")
        _, step = _setup(acc, channels_last=True)
        weak, strong = _views()
        fmt = torch.channels_last
        loss, _ = step(weak.to(acc.device, memory_format=fmt), [s.to(acc.device, memory_format=fmt) for s in strong],
                       momentum=0.9)
        assert loss.dtype == torch.float32, "the loss is computed in float32 under autocast"
        assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in step.core.parameters())
        assert step.nonfinite.device.type == "cuda" and not step.nonfinite.item()
        assert int(step.core.queue.ptr) == 4
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
