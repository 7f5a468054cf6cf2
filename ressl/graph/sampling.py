"""Where RGRL's anchors come from: global anchors drawn favouring low-degree nodes, and local anchors
taken from a graph diffusion.

Global: a node of degree d is drawn with weight ``min(1, alpha ** log(1 + d) + beta)`` (normalised),
without replacement; ``alpha < 1`` makes low-degree nodes likelier, so that anchors are not dominated
by hubs; ``beta`` lifts the weight of the highest-degree nodes. Local: each node's ``k`` largest entries
of its personalised-PageRank row (PyG's ``GDC`` with top-k sparsification), the node itself included
when its own entry ranks among them, as in the authors' code.
"""

from __future__ import annotations

import torch
from torch_geometric.data import Data
from torch_geometric.transforms import GDC
from torch_geometric.utils import degree

__all__ = ["anchor_probabilities", "sample_anchors", "diffusion_neighbours", "node_degree"]


def node_degree(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """[N] float out-degree (= degree for an undirected edge list)."""
    return degree(edge_index[0], num_nodes=num_nodes)


def anchor_probabilities(deg: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Inverse-degree sampling distribution over nodes.

    Args:
        deg: [N] node degrees.
        alpha: skew in (0, 1]; 1 = uniform.
        beta: minimum weight added to every node (weights are capped at 1).

    Returns:
        [N] float64 probabilities summing to 1.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"anchor alpha must be in (0, 1], got {alpha}")
    if beta < 0:
        raise ValueError(f"anchor beta must be >= 0, got {beta}")
    w = torch.pow(alpha, torch.log1p(deg.double())) + beta
    w = w.clamp(max=1.0)
    return w / w.sum()


def sample_anchors(probs: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` distinct node ids drawn successively with ``probs`` (torch's global generator).

    Returns:
        [n] int64 on ``probs``' device.
    """
    if not 0 < n <= probs.numel():
        raise ValueError(f"number of global anchors must be in 1..{probs.numel()} (the node count), got {n}")
    return torch.multinomial(probs, n, replacement=False)


def diffusion_neighbours(edge_index: torch.Tensor, num_nodes: int, k: int, ppr_alpha: float = 0.15
                         ) -> torch.Tensor:
    """Top-``k`` personalised-PageRank neighbours of every node (exact dense diffusion: O(N^2) memory).

    Args:
        edge_index: [2, E] undirected edges.
        num_nodes: N.
        k: neighbours per node (k < N).
        ppr_alpha: PageRank teleport probability (GDC's default 0.15).

    Returns:
        [N, k] int64 node ids, row ``i`` = the ``k`` largest entries of row ``i`` of the diffusion matrix.
    """
    if not 0 < k < num_nodes:
        raise ValueError(f"local anchors topk must be in 1..{num_nodes - 1} (node count - 1), got {k}")
    gdc = GDC(diffusion_kwargs={"method": "ppr", "alpha": ppr_alpha},
              sparsification_kwargs={"method": "topk", "k": k, "dim": 1})
    out = gdc(Data(edge_index=edge_index.cpu(), num_nodes=num_nodes))
    rows, cols = out.edge_index
    # GDC coalesces its output, so edges are sorted by row and each row holds exactly k of them
    counts = torch.bincount(rows, minlength=num_nodes)
    if not bool((counts == k).all()):
        raise RuntimeError(f"GDC top-{k} returned {int(counts.min())}..{int(counts.max())} neighbours per node")
    return cols.reshape(num_nodes, k).to(edge_index.device)
