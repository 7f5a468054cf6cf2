"""ReSSL losses against float64 references written out element by element."""

import math

import pytest
import torch
import torch.nn.functional as F

from ressl.loss import infonce_loss, relation_loss, similarity_loss

B, D, K = 6, 8, 16


def _unit(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def _ref_relation(q, k, queue, tau_s, tau_t):
    """Loop form of -sum_j softmax(k.Q/tau_t)_j log softmax(q.Q/tau_s)_j, in float64."""
    q, k, queue = q.tolist(), k.tolist(), queue.tolist()
    total = 0.0
    for b in range(len(q)):
        ls = [sum(a * c for a, c in zip(q[b], row)) / tau_s for row in queue]
        lt = [sum(a * c for a, c in zip(k[b], row)) / tau_t for row in queue]
        mt = max(lt)
        zt = sum(math.exp(x - mt) for x in lt)
        ms = max(ls)
        log_zs = ms + math.log(sum(math.exp(x - ms) for x in ls))
        total += -sum(math.exp(lt[j] - mt) / zt * (ls[j] - log_zs) for j in range(len(ls)))
    return total / len(q)


def _ref_infonce(q, k, queue, tau):
    total = 0.0
    for b in range(q.shape[0]):
        logits = [float(q[b] @ k[b]) / tau] + [float(q[b] @ queue[j]) / tau for j in range(queue.shape[0])]
        m = max(logits)
        total += -(logits[0] - m - math.log(sum(math.exp(x - m) for x in logits)))
    return total / q.shape[0]


def _ref_similarity(p, k):
    total = 0.0
    for b in range(p.shape[0]):
        cos = float(p[b] @ k[b]) / (float(p[b].norm()) * float(k[b].norm()))
        total += 2 - 2 * cos
    return total / p.shape[0]


def _numgrad(fn, x, eps=1e-6):
    g = torch.zeros_like(x)
    for idx in range(x.numel()):
        xp, xm = x.clone(), x.clone()
        xp.view(-1)[idx] += eps
        xm.view(-1)[idx] -= eps
        g.view(-1)[idx] = (fn(xp) - fn(xm)) / (2 * eps)
    return g


def test_relation_value_and_grad_match_float64_reference():
    q64, k64, Q64 = _unit(B, D, seed=0), _unit(B, D, seed=1), _unit(K, D, seed=2)
    q = q64.float().requires_grad_(True)
    out = relation_loss(q, k64.float(), Q64.float(), tau_s=0.1, tau_t=0.04)
    assert out.dtype == torch.float32 and out.ndim == 0
    ref = _ref_relation(q64, k64, Q64, 0.1, 0.04)
    assert out.item() == pytest.approx(ref, rel=1e-5)
    out.backward()
    num = _numgrad(lambda x: _ref_relation(x, k64, Q64, 0.1, 0.04), q64)
    torch.testing.assert_close(q.grad.double(), num, rtol=1e-3, atol=1e-5)


def test_relation_gradient_only_into_q():
    q = _unit(B, D, seed=0).float().requires_grad_(True)
    k = _unit(B, D, seed=1).float().requires_grad_(True)
    Q = _unit(K, D, seed=2).float().requires_grad_(True)
    relation_loss(q, k, Q).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and Q.grad is None


def test_relation_is_float32_from_bf16_inputs_under_autocast():
    q64, k64, Q64 = _unit(B, D, seed=3), _unit(B, D, seed=4), _unit(K, D, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = relation_loss(q64.bfloat16(), k64.bfloat16(), Q64.bfloat16())
    assert out.dtype == torch.float32
    ref = _ref_relation(q64.bfloat16().double(), k64.bfloat16().double(), Q64.bfloat16().double(), 0.1, 0.04)
    assert out.item() == pytest.approx(ref, rel=1e-5)


def test_relation_minimised_when_student_matches_teacher_logits():
    # With tau_s == tau_t and q == k the loss equals the teacher entropy: its minimum over q.
    k, Q = _unit(B, D, seed=6), _unit(K, D, seed=7)
    same = relation_loss(k, k, Q, tau_s=0.1, tau_t=0.1).item()
    other = relation_loss(_unit(B, D, seed=8), k, Q, tau_s=0.1, tau_t=0.1).item()
    assert same < other


def test_infonce_value_and_grad_match_float64_reference():
    q64, k64, Q64 = _unit(B, D, seed=10), _unit(B, D, seed=11), _unit(K, D, seed=12)
    q = q64.float().requires_grad_(True)
    k = k64.float().requires_grad_(True)
    out = infonce_loss(q, k, Q64.float(), tau=0.2)
    assert out.item() == pytest.approx(_ref_infonce(q64, k64, Q64, 0.2), rel=1e-5)
    out.backward()
    num = _numgrad(lambda x: _ref_infonce(x, k64, Q64, 0.2), q64)
    torch.testing.assert_close(q.grad.double(), num, rtol=1e-3, atol=1e-5)
    assert k.grad is None


def test_similarity_value_and_grad_match_float64_reference():
    g = torch.Generator().manual_seed(20)
    p64 = torch.randn(B, D, generator=g, dtype=torch.float64) * 3  # unnormalised on purpose
    k64 = _unit(B, D, seed=21)
    p = p64.float().requires_grad_(True)
    out = similarity_loss(p, k64.float())
    assert out.item() == pytest.approx(_ref_similarity(p64, k64), rel=1e-5)
    out.backward()
    num = _numgrad(lambda x: _ref_similarity(x, k64), p64)
    torch.testing.assert_close(p.grad.double(), num, rtol=1e-3, atol=1e-5)
    assert similarity_loss(k64, k64).item() == pytest.approx(0.0, abs=1e-6)
    assert similarity_loss(-k64, k64).item() == pytest.approx(4.0, abs=1e-6)


@pytest.mark.parametrize(
    "call",
    [
        lambda: relation_loss(torch.randn(4, 8), torch.randn(4, 6), torch.randn(16, 8)),
        lambda: relation_loss(torch.randn(4, 8), torch.randn(4, 8), torch.randn(16, 5)),
        lambda: infonce_loss(torch.randn(4, 8), torch.randn(3, 8), torch.randn(16, 8)),
        lambda: similarity_loss(torch.randn(8), torch.randn(8)),
    ],
)
def test_shape_errors_are_clear(call):
    with pytest.raises(ValueError, match="must|dim|rows"):
        call()
