"""ReSSL losses as pure functions: embeddings, queue and temperatures in, a scalar out.

All three compute in float32 with autocast switched off, whatever the input dtype: the relation loss
divides by a teacher temperature of 0.04, so bf16 logits (8 mantissa bits) would turn the sharpened
teacher distribution into noise. Gradients flow only into the student side (``q`` / ``p``); the
teacher keys and the queue are treated as constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["relation_loss", "infonce_loss", "similarity_loss"]


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype != torch.float32 else x


def _check(name: str, x: torch.Tensor, dim: int | None = None) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] tensor, got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has embedding dim {x.shape[1]}, expected {dim} (the student's)")


def relation_loss(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau_s: float = 0.1, tau_t: float = 0.04
) -> torch.Tensor:
    """Cross-entropy between the teacher's and the student's similarity distributions over the queue.

    ``mean_b( -sum_j softmax(k_b . Q_j / tau_t) * log_softmax(q_b . Q_j / tau_s) )``; logits are taken
    against the queue only (no positive column), as in ReSSL.

    The anchor set may also differ per row (``queue`` of shape [B, K, D]): RGRL's local loss compares
    each node with its own diffusion neighbours, and its global loss with anchors shared by all rows.

    Args:
        q: [B, D] student embeddings, L2-normalised.
        k: [B, D] teacher embeddings of the weak view, L2-normalised (no gradient taken).
        queue: [K, D] L2-normalised teacher embeddings of earlier batches (no gradient taken), or
            [B, K, D] anchors of each row.
        tau_s: student temperature.
        tau_t: teacher temperature (smaller = sharper target).

    Returns:
        0-dim float32 tensor.
    """
    _check("q", q)
    _check("k", k, q.shape[1])
    if queue.ndim == 3:
        if queue.shape[0] != q.shape[0] or queue.shape[2] != q.shape[1] or k.shape[0] != q.shape[0]:
            raise ValueError(f"per-row anchors must be [B, K, D] = [{q.shape[0]}, K, {q.shape[1]}] with k of "
                             f"{q.shape[0]} rows; got queue {tuple(queue.shape)}, k {tuple(k.shape)}")
    else:
        _check("queue", queue, q.shape[1])
    with torch.autocast(device_type=q.device.type, enabled=False):
        qf, kf, bank = _fp32(q), _fp32(k).detach(), _fp32(queue).detach()
        logits_s = _anchor_logits(qf, bank) / tau_s
        with torch.no_grad():
            target = F.softmax(_anchor_logits(kf, bank) / tau_t, dim=1)
        return -(target * F.log_softmax(logits_s, dim=1)).sum(dim=1).mean()


def _anchor_logits(x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """[B, D] x [K, D] (shared anchors) or [B, K, D] (anchors per row) -> [B, K] dot products."""
    return x @ bank.T if bank.ndim == 2 else torch.einsum("bd,bkd->bk", x, bank)


def infonce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    """MoCo-style InfoNCE used for the TPAMI warm-up: positive ``q_b . k_b``, negatives the queue.

    Args:
        q: [B, D] student embeddings, L2-normalised.
        k: [B, D] teacher embeddings of the same images, L2-normalised (no gradient taken).
        queue: [K, D] negatives, L2-normalised (no gradient taken).
        tau: temperature.

    Returns:
        0-dim float32 tensor: mean cross-entropy with the positive in column 0.
    """
    _check("q", q)
    _check("k", k, q.shape[1])
    _check("queue", queue, q.shape[1])
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must hold the same images: got {q.shape[0]} and {k.shape[0]} rows")
    with torch.autocast(device_type=q.device.type, enabled=False):
        qf, kf, bank = _fp32(q), _fp32(k).detach(), _fp32(queue).detach()
        pos = (qf * kf).sum(dim=1, keepdim=True)
        logits = torch.cat([pos, qf @ bank.T], dim=1) / tau
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels)


def similarity_loss(p: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Instance-similarity term: ``mean_b(2 - 2 cos(p_b, k_b))``.

    Args:
        p: [B, D] student output (predictor output when the predictor is on); need not be normalised.
        k: [B, D] teacher embeddings of the same images (no gradient taken).

    Returns:
        0-dim float32 tensor in [0, 4].
    """
    _check("p", p)
    _check("k", k, p.shape[1])
    if k.shape[0] != p.shape[0]:
        raise ValueError(f"p and k must hold the same images: got {p.shape[0]} and {k.shape[0]} rows")
    with torch.autocast(device_type=p.device.type, enabled=False):
        pf = F.normalize(_fp32(p), dim=1)
        kf = F.normalize(_fp32(k).detach(), dim=1)
        return (2.0 - 2.0 * (pf * kf).sum(dim=1)).mean()
