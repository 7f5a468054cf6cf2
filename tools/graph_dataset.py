"""Write a graph dataset as OUT/NAME/graph.pt (``make dataset DATA=planetoid|karate|digits-knn``).

    python tools/graph_dataset.py planetoid --src ~/planetoid --name Cora   # -> data/cora/graph.pt
    python tools/graph_dataset.py karate                                    # -> data/karate/graph.pt
    python tools/graph_dataset.py digits-knn --k 10                         # -> data/digits-knn/graph.pt

Planetoid reads the standard raw files a user already has (no download); karate club and digits ship
inside networkx and scikit-learn, so they work offline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ressl.graph.data import (  # noqa: E402
    GRAPH_FILE,
    PLANETOID_NAMES,
    GraphDataError,
    digits_knn_graph,
    karate_graph,
    planetoid_graph,
    save_graph,
)

GRAPHS = ("planetoid", "karate", "digits-knn")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=GRAPHS, metavar="DATA", help=f"one of {', '.join(GRAPHS)}")
    p.add_argument("--out", default="data", help="output root; the graph goes to OUT/NAME/graph.pt (default: data)")
    p.add_argument("--src", default=None, help="planetoid: folder with the ind.<name>.* raw files")
    p.add_argument("--name", default=None, help=f"planetoid: {', '.join(PLANETOID_NAMES)}")
    p.add_argument("--k", type=int, default=10, help="digits-knn: neighbours per node (default 10)")
    a = p.parse_args(argv)
    try:
        if a.dataset == "planetoid":
            if not a.src or not a.name:
                raise GraphDataError("planetoid needs --src DIR (the raw ind.<name>.* files) and --name "
                                     + "|".join(PLANETOID_NAMES))
            data, name = planetoid_graph(a.src, a.name), a.name.lower()
        elif a.dataset == "karate":
            data, name = karate_graph(), "karate"
        else:
            data, name = digits_knn_graph(a.k), "digits-knn"
    except GraphDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = save_graph(Path(a.out) / name / GRAPH_FILE, data, name)
    print(f"wrote {path}: {data.num_nodes} nodes, {data.edge_index.shape[1]} directed edges, "
          f"{data.x.shape[1]} features, {int(data.y.max()) + 1} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
