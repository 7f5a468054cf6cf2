"""RGRL's two graph augmentations (as in GRACE / BGRL): feature-column masking and edge dropping.

Both keep every node, so node ``i`` of one view is node ``i`` of the other and of the original graph.
Randomness comes from torch's global generator of the tensor's device: the trainer saves and restores
that state, which is what makes a resumed run draw the same views.
"""

from __future__ import annotations

import torch
from torch_geometric.utils import dropout_edge

__all__ = ["drop_edges", "mask_features", "augment"]


def _check_p(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


def mask_features(x: torch.Tensor, p: float) -> torch.Tensor:
    """Zero each feature *column* with probability ``p`` (one mask shared by all nodes).

    Args:
        x: [N, F] node features.
        p: probability that a column is zeroed.

    Returns:
        [N, F] masked copy; ``x`` is unchanged.
    """
    _check_p("feature mask p", p)
    keep = torch.rand(x.shape[1], device=x.device) >= p
    return x * keep.to(x.dtype)


def drop_edges(edge_index: torch.Tensor, p: float) -> torch.Tensor:
    """Drop each directed edge independently with probability ``p`` (PyG's ``dropout_edge``).

    As in the authors' code the two directions of an undirected edge are dropped independently.

    Args:
        edge_index: [2, E].
        p: drop probability.

    Returns:
        [2, E'] kept edges, E' ~ Binomial(E, 1 - p).
    """
    _check_p("edge drop p", p)
    return dropout_edge(edge_index, p=p)[0]


def augment(x: torch.Tensor, edge_index: torch.Tensor, p_feat: float, p_edge: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented view: masked features and dropped edges, same node set."""
    return mask_features(x, p_feat), drop_edges(edge_index, p_edge)
