"""Graphs on disk: one ``graph.pt`` per dataset, built offline from files the user already has or from
graphs that ship inside installed packages.

``graph.pt`` holds plain tensors only (``x`` [N, F] float32, ``edge_index`` [2, E] int64, undirected, no
self-loops, ``y`` [N] int64, optional boolean ``train_mask`` / ``val_mask`` / ``test_mask`` of a public
split) plus a ``name`` string, so it loads with ``torch.load(weights_only=True)``. Sources:

- Planetoid (Cora, CiteSeer, PubMed): the standard ``ind.<name>.{x,tx,allx,y,ty,ally,graph,test.index}``
  raw files, read with PyG's own reader (they are Python pickles: read only files you trust);
- Zachary's karate club from networkx (34 nodes, one-hot identity features, the two clubs as labels);
- a k-NN graph over scikit-learn's handwritten digits (1,797 nodes, 64 pixel features, 10 classes).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch_geometric.data import Data
from torch_geometric.utils import coalesce, remove_self_loops, to_undirected

from ressl.io import atomic_open

__all__ = [
    "GRAPH_FILE",
    "GraphDataError",
    "PLANETOID_NAMES",
    "digits_knn_graph",
    "karate_graph",
    "load_graph",
    "planetoid_graph",
    "save_graph",
]

log = logging.getLogger(__name__)

GRAPH_FILE = "graph.pt"
PLANETOID_NAMES = ("Cora", "CiteSeer", "PubMed")
_PLANETOID_PARTS = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
_MASKS = ("train_mask", "val_mask", "test_mask")


class GraphDataError(ValueError):
    """A graph source or ``graph.pt`` that cannot be used; the message names the file and the problem."""


def _undirected(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Both directions of every edge, once each, without self-loops (the GCN adds its own)."""
    edge_index, _ = remove_self_loops(edge_index)
    return coalesce(to_undirected(edge_index, num_nodes=num_nodes), num_nodes=num_nodes)


def save_graph(path: str | Path, data: Data, name: str) -> Path:
    """Write ``data`` (x, edge_index, y and any split masks) to ``path`` atomically."""
    path = Path(path)
    state: dict[str, object] = {
        "name": name,
        "x": data.x.float().contiguous(),
        "edge_index": data.edge_index.long().contiguous(),
        "y": data.y.long().contiguous(),
    }
    for m in _MASKS:
        if getattr(data, m, None) is not None:
            state[m] = getattr(data, m).bool().contiguous()
    with atomic_open(path) as f:
        torch.save(state, f)
    return path


def load_graph(path: str | Path) -> Data:
    """Read a ``graph.pt`` (or a directory holding one) into a PyG ``Data``, checking its shapes."""
    path = Path(path)
    if path.is_dir():
        path = path / GRAPH_FILE
    if not path.is_file():
        raise GraphDataError(f"graph file {str(path)!r} does not exist; write it with "
                             "`make dataset DATA=digits-knn` (or karate, or planetoid SRC=DIR NAME=Cora)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise GraphDataError(f"{path}: expected a dict of tensors (x, edge_index, y), got {type(state).__name__}")
    missing = [k for k in ("x", "edge_index", "y") if k not in state]
    if missing:
        raise GraphDataError(f"{path}: missing {', '.join(missing)} (expected x, edge_index, y)")
    x, ei, y = state["x"], state["edge_index"], state["y"]
    n = x.shape[0]
    if x.ndim != 2 or y.shape != (n,) or ei.ndim != 2 or ei.shape[0] != 2:
        raise GraphDataError(f"{path}: expected x [N, F], y [N], edge_index [2, E]; got x {tuple(x.shape)}, "
                             f"y {tuple(y.shape)}, edge_index {tuple(ei.shape)}")
    if ei.numel() and (int(ei.min()) < 0 or int(ei.max()) >= n):
        raise GraphDataError(f"{path}: edge_index refers to nodes outside 0..{n - 1}")
    data = Data(x=x.float(), edge_index=ei.long(), y=y.long(), num_nodes=n)
    for m in _MASKS:
        if m in state:
            setattr(data, m, state[m])
    data.name = str(state.get("name", path.parent.name))
    return data


def _find_planetoid_dir(src: Path, name: str) -> Path:
    """The folder under ``src`` that holds ``ind.<name>.*``: ``src``, ``src/raw`` or ``src/<Name>/raw``."""
    for d in (src, src / "raw", src / name / "raw", src / name.lower() / "raw"):
        if (d / f"ind.{name.lower()}.graph").is_file():
            return d
    raise GraphDataError(f"no Planetoid raw files for {name} under {str(src)!r}: expected "
                         f"ind.{name.lower()}.{{{','.join(_PLANETOID_PARTS)}}} in it, in raw/ or in {name}/raw/")


def planetoid_graph(src: str | Path, name: str) -> Data:
    """Cora / CiteSeer / PubMed from the standard Planetoid raw files in ``src`` (public split kept as masks)."""
    from torch_geometric.io import read_planetoid_data

    canonical = {n.lower(): n for n in PLANETOID_NAMES}.get(name.lower())
    if canonical is None:
        raise GraphDataError(f"Planetoid NAME must be one of {', '.join(PLANETOID_NAMES)}, got {name!r}")
    folder = _find_planetoid_dir(Path(src), canonical)
    absent = [p for p in _PLANETOID_PARTS if not (folder / f"ind.{canonical.lower()}.{p}").is_file()]
    if absent:
        raise GraphDataError(f"{folder}: Planetoid {canonical} is missing "
                             + ", ".join(f"ind.{canonical.lower()}.{p}" for p in absent))
    data = read_planetoid_data(str(folder), canonical)
    data.edge_index = _undirected(data.edge_index, data.num_nodes)
    return data


def karate_graph() -> Data:
    """Zachary's karate club (networkx): 34 nodes, 78 edges, identity features, label = club (0 = Mr. Hi)."""
    import networkx as nx

    g = nx.karate_club_graph()
    n = g.number_of_nodes()
    edges = torch.tensor(list(g.edges()), dtype=torch.long).T
    y = torch.tensor([0 if g.nodes[i]["club"] == "Mr. Hi" else 1 for i in range(n)], dtype=torch.long)
    return Data(x=torch.eye(n), edge_index=_undirected(edges, n), y=y, num_nodes=n)


def digits_knn_graph(k: int = 10) -> Data:
    """scikit-learn's 8x8 digits as nodes (pixels / 16 as features), each linked to its ``k`` nearest
    neighbours in pixel space (Euclidean), symmetrised."""
    from sklearn.datasets import load_digits
    from sklearn.neighbors import NearestNeighbors

    if k <= 0:
        raise GraphDataError(f"k must be > 0 for the digits k-NN graph, got {k}")
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    n = x.shape[0]
    # kneighbors() without a query set leaves each point out of its own neighbour list
    idx = NearestNeighbors(n_neighbors=k).fit(digits.data).kneighbors(return_distance=False)
    rows = torch.arange(n).repeat_interleave(k)
    edges = torch.stack([rows, torch.as_tensor(idx, dtype=torch.long).reshape(-1)])
    return Data(x=x, edge_index=_undirected(edges, n), y=torch.as_tensor(digits.target, dtype=torch.long),
                num_nodes=n)
