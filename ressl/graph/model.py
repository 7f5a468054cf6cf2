"""RGRL (Relational Self-Supervised Learning on Graphs, CIKM 2022): a student GCN + predictor is trained
so that each node's similarity distribution over anchor nodes, computed on one augmented view, matches
the EMA teacher's sharper distribution computed on the other view.

Two anchor sets per view pair: *global* anchors, a degree-weighted sample of nodes shared by every node,
and *local* anchors, each node's own top-k diffusion neighbours. Both use ``ressl.loss.relation_loss``
(the ReSSL relation cross-entropy: its teacher entropy is constant, so its gradient equals that of the
KL divergence the authors minimise) in both view orders; the teacher follows the student encoder by
``ressl.ema.ema_update_``. Full-batch: one step sees the whole graph.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GCNConv

from ressl.ema import ema_update_
from ressl.loss import relation_loss

from .sampling import sample_anchors

__all__ = ["GCNEncoder", "GraphPredictor", "RGRL"]


class GCNEncoder(nn.Module):
    """Two GCN layers, each followed by BatchNorm (momentum 0.01) and PReLU, as in the authors' encoder.

    Attributes:
        out_dim: width of the node embeddings.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = GCNConv(in_dim, hidden_dim)
        self.bn1 = nn.BatchNorm1d(hidden_dim, momentum=0.01)
        self.act1 = nn.PReLU()
        self.conv2 = GCNConv(hidden_dim, out_dim)
        self.bn2 = nn.BatchNorm1d(out_dim, momentum=0.01)
        self.act2 = nn.PReLU()
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """[N, F] features, [2, E] edges -> [N, out_dim] embeddings."""
        h = self.act1(self.bn1(self.conv1(x, edge_index)))
        return self.act2(self.bn2(self.conv2(h, edge_index)))


class GraphPredictor(nn.Sequential):
    """Student-only MLP ``dim -> hidden -> PReLU -> dim`` (Xavier-uniform weights, biases 0.01)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.PReLU(), nn.Linear(hidden, dim))
        for m in self:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0.01)


class RGRL(nn.Module):
    """Student encoder + predictor, EMA teacher encoder, and the graph's anchor distributions.

    Args:
        in_dim, hidden_dim, embed_dim: encoder widths.
        pred_hidden: predictor hidden width.
        anchor_probs: [N] global-anchor sampling distribution (``sampling.anchor_probabilities``).
        neighbours: [N, k] local anchors of each node (``sampling.diffusion_neighbours``).
        local_mask: [N] bool, nodes whose local loss counts (the authors skip isolated nodes).
        num_anchors: global anchors drawn per step.
        tau_s, tau_t: student / teacher temperature of the global loss.
        tau_s_local, tau_t_local: the same for the local loss.
        lam: weight of the local loss.
    """

    def __init__(self, in_dim: int, hidden_dim: int, embed_dim: int, pred_hidden: int, *,
                 anchor_probs: torch.Tensor, neighbours: torch.Tensor, local_mask: torch.Tensor,
                 num_anchors: int, tau_s: float, tau_t: float, tau_s_local: float, tau_t_local: float,
                 lam: float) -> None:
        super().__init__()
        n = anchor_probs.numel()
        if neighbours.ndim != 2 or neighbours.shape[0] != n or local_mask.shape != (n,):
            raise ValueError(f"anchor_probs [{n}], neighbours [{n}, k] and local_mask [{n}] must cover the same "
                             f"nodes; got {tuple(neighbours.shape)} and {tuple(local_mask.shape)}")
        if not 0 < num_anchors <= n:
            raise ValueError(f"num_anchors must be in 1..{n} (the node count), got {num_anchors}")
        self.student = GCNEncoder(in_dim, hidden_dim, embed_dim)
        self.predictor = GraphPredictor(embed_dim, pred_hidden)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        # derived from the graph, rebuilt from it at every start: not part of the checkpoint
        self.register_buffer("anchor_probs", anchor_probs.double(), persistent=False)
        self.register_buffer("neighbours", neighbours.long(), persistent=False)
        self.register_buffer("local_nodes", local_mask.nonzero().squeeze(1), persistent=False)
        self.num_anchors = num_anchors
        self.tau_s, self.tau_t = tau_s, tau_t
        self.tau_s_local, self.tau_t_local = tau_s_local, tau_t_local
        self.lam = lam

    def global_loss(self, p: torch.Tensor, t: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Relation loss of student predictions ``p`` [N, D] against teacher ``t`` [N, D] (other view) over
        the shared anchors ``t[anchors]``."""
        return relation_loss(p, t, t[anchors], self.tau_s, self.tau_t)

    def local_loss(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Relation loss of each counted node against its own diffusion neighbours ``t[neighbours[i]]``."""
        idx = self.local_nodes
        return relation_loss(p[idx], t[idx], t[self.neighbours[idx]], self.tau_s_local, self.tau_t_local)

    def forward(self, x1: torch.Tensor, edge_index1: torch.Tensor, x2: torch.Tensor, edge_index2: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one pair of views (same nodes, different features/edges), both view orders summed.

        Returns:
            (loss, metrics): 0-dim loss with gradient into student + predictor; detached metrics.
        """
        p1 = F.normalize(self.predictor(self.student(x1, edge_index1)), dim=1)
        p2 = F.normalize(self.predictor(self.student(x2, edge_index2)), dim=1)
        with torch.no_grad():
            t1 = F.normalize(self.teacher(x1, edge_index1), dim=1)
            t2 = F.normalize(self.teacher(x2, edge_index2), dim=1)
            anchors = sample_anchors(self.anchor_probs, self.num_anchors)
        loss_global = self.global_loss(p1, t2, anchors) + self.global_loss(p2, t1, anchors)
        loss_local = self.local_loss(p1, t2) + self.local_loss(p2, t1)
        loss = loss_global + self.lam * loss_local
        metrics = {"loss": loss.detach(), "loss_global": loss_global.detach(), "loss_local": loss_local.detach(),
                   "key_std": t1.std(dim=0).mean()}
        return loss, metrics

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """EMA step of the teacher towards the student encoder (the predictor has no teacher twin)."""
        ema_update_(self.teacher, self.student, momentum)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """[N, D] frozen embeddings of the clean graph: the student encoder in eval mode (BN running
        statistics), as the authors evaluate."""
        was_training = self.student.training
        self.student.eval()
        out = self.student(x, edge_index)
        self.student.train(was_training)
        return out
