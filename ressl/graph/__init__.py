"""RGRL (Relational Self-Supervised Learning on Graphs, CIKM 2022): the graph member of the ReSSL family.

Needs the ``[graph]`` extra (PyTorch Geometric). Submodules: ``model`` (GCN encoder, predictor, the RGRL
module), ``sampling`` (degree-weighted global anchors, diffusion neighbours), ``augment`` (feature
masking, edge dropping), ``eval`` (logistic regression over random splits), ``data`` (``graph.pt``
files: Planetoid, karate club, digits k-NN), ``config`` (flat typed config).
"""

from __future__ import annotations

from .augment import augment, drop_edges, mask_features
from .config import GraphConfig, load_graph_config
from .data import digits_knn_graph, karate_graph, load_graph, planetoid_graph, save_graph
from .eval import linear_probe_splits, random_splits
from .model import RGRL, GCNEncoder, GraphPredictor
from .sampling import anchor_probabilities, diffusion_neighbours, node_degree, sample_anchors

__all__ = [
    "RGRL",
    "GCNEncoder",
    "GraphConfig",
    "GraphPredictor",
    "anchor_probabilities",
    "augment",
    "diffusion_neighbours",
    "digits_knn_graph",
    "drop_edges",
    "karate_graph",
    "linear_probe_splits",
    "load_graph",
    "load_graph_config",
    "mask_features",
    "node_degree",
    "planetoid_graph",
    "random_splits",
    "sample_anchors",
    "save_graph",
]
