"""The graph SSL evaluation protocol of RGRL's authors: a logistic regression trained on frozen node
embeddings over 20 random splits (10% train, 10% validation, 80% test), reported as mean ± std.

The classifiers of all splits are trained at once (one weight tensor per split, one Adam): Adam is
element-wise and the splits share no parameter, so this equals 20 separate runs, at a 20th of the calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["random_splits", "linear_probe_splits"]


def random_splits(num_nodes: int, num_splits: int = 20, val_frac: float = 0.1, test_frac: float = 0.8,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random node splits: ``int(test_frac * N)`` test, ``int(val_frac * N)`` validation, the rest train.

    Returns:
        (train, val, test) bool masks, each [num_splits, N]; disjoint and covering every node.
    """
    if num_splits <= 0 or val_frac < 0 or test_frac <= 0 or val_frac + test_frac >= 1:
        raise ValueError(f"need num_splits > 0, val_frac >= 0, test_frac > 0, val_frac + test_frac < 1; got "
                         f"{num_splits}, {val_frac}, {test_frac}")
    g = torch.Generator().manual_seed(seed)
    n_test, n_val = int(test_frac * num_nodes), int(val_frac * num_nodes)
    train = torch.zeros(num_splits, num_nodes, dtype=torch.bool)
    val, test = torch.zeros_like(train), torch.zeros_like(train)
    for s in range(num_splits):
        perm = torch.randperm(num_nodes, generator=g)
        test[s, perm[:n_test]] = True
        val[s, perm[n_test:n_test + n_val]] = True
        train[s, perm[n_test + n_val:]] = True
    if not bool(train.any(dim=1).all()):
        raise ValueError(f"{num_nodes} nodes leave no training node with val_frac={val_frac}, test_frac={test_frac}")
    return train, val, test


def linear_probe_splits(emb: torch.Tensor, y: torch.Tensor, train: torch.Tensor, val: torch.Tensor,
                        test: torch.Tensor, epochs: int = 100, lr: float = 0.01, seed: int = 0
                        ) -> dict[str, float | list[float]]:
    """Logistic regression (Adam, full batch, Xavier init, zero bias) per split; accuracies in %.

    Uses its own generator, so evaluating in the middle of training leaves the training RNG untouched.

    Args:
        emb: [N, D] frozen embeddings.
        y: [N] int labels.
        train, val, test: [S, N] bool masks (``random_splits``).

    Returns:
        ``val_mean``, ``val_std``, ``test_mean``, ``test_std`` (population std over splits, as the
        authors) and ``test_accs`` (one per split).
    """
    emb = emb.detach().float()
    s, n = train.shape
    if emb.shape[0] != n or y.shape != (n,):
        raise ValueError(f"embeddings {tuple(emb.shape)} and labels {tuple(y.shape)} must cover the {n} nodes "
                         "of the split masks")
    dev = emb.device
    c = int(y.max()) + 1
    train, val, test, y = train.to(dev), val.to(dev), test.to(dev), y.to(dev)
    g = torch.Generator().manual_seed(seed)
    bound = (6.0 / (emb.shape[1] + c)) ** 0.5  # Xavier-uniform for a [D, C] weight
    w = ((torch.rand(s, emb.shape[1], c, generator=g) * 2 - 1) * bound).to(dev).requires_grad_()
    b = torch.zeros(s, 1, c, device=dev, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    y_rep = y.repeat(s)
    weights = train.float() / train.sum(dim=1, keepdim=True)
    with torch.enable_grad():
        for _ in range(epochs):
            logits = torch.einsum("nd,sdc->snc", emb, w) + b
            ce = F.cross_entropy(logits.reshape(-1, c), y_rep, reduction="none").view(s, n)
            loss = (ce * weights).sum()  # sum over splits of each split's mean training loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        correct = ((torch.einsum("nd,sdc->snc", emb, w) + b).argmax(dim=2) == y).float()
        val_acc = 100 * (correct * val).sum(1) / val.sum(1).clamp(min=1)
        test_acc = 100 * (correct * test).sum(1) / test.sum(1)
    return {"val_mean": val_acc.mean().item(), "val_std": val_acc.std(correction=0).item(),
            "test_mean": test_acc.mean().item(), "test_std": test_acc.std(correction=0).item(),
            "test_accs": test_acc.tolist()}
