"""RGRL (ressl.graph): losses against float64 loops, anchor sampling, augmentations, diffusion neighbours,
data files, the evaluation protocol and the training tool end to end on CPU."""

from __future__ import annotations

import csv
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torch_geometric", reason="the [graph] extra (torch_geometric) is not installed")

from trainer_config import killed_during_step  # noqa: E402

from ressl.config import ConfigError  # noqa: E402
from ressl.graph.augment import drop_edges, mask_features  # noqa: E402
from ressl.graph.config import load_graph_config  # noqa: E402
from ressl.graph.data import (  # noqa: E402
    GraphDataError,
    digits_knn_graph,
    karate_graph,
    load_graph,
    planetoid_graph,
    save_graph,
)
from ressl.graph.eval import linear_probe_splits, random_splits  # noqa: E402
from ressl.graph.model import RGRL  # noqa: E402
from ressl.graph.sampling import (  # noqa: E402
    anchor_probabilities,
    diffusion_neighbours,
    node_degree,
    sample_anchors,
)
from tools import graph_dataset, train_graph  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------
# float64 references, written out as loops
# ---------------------------------------------------------------------------------------------------
def _ref_ce(student_logits: list[float], teacher_logits: list[float]) -> float:
    """-sum_j softmax(teacher)_j * log_softmax(student)_j for one row."""
    mt, ms = max(teacher_logits), max(student_logits)
    zt = sum(math.exp(v - mt) for v in teacher_logits)
    log_zs = ms + math.log(sum(math.exp(v - ms) for v in student_logits))
    return -sum(math.exp(t - mt) / zt * (s - log_zs) for t, s in zip(teacher_logits, student_logits))


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _ref_global(p, t, anchors, tau_s, tau_t) -> float:
    p, t, anchors = p.tolist(), t.tolist(), anchors.tolist()
    rows = [_ref_ce([_dot(p[i], t[a]) / tau_s for a in anchors], [_dot(t[i], t[a]) / tau_t for a in anchors])
            for i in range(len(p))]
    return sum(rows) / len(rows)


def _ref_local(p, t, neighbours, counted, tau_s, tau_t) -> float:
    p, t, neighbours = p.tolist(), t.tolist(), neighbours.tolist()
    rows = [_ref_ce([_dot(p[i], t[j]) / tau_s for j in neighbours[i]],
                    [_dot(t[i], t[j]) / tau_t for j in neighbours[i]])
            for i in range(len(p)) if counted[i]]
    return sum(rows) / len(rows)


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _tiny_model(n: int = 12, k: int = 3, isolated: tuple[int, ...] = (5,), **kw) -> RGRL:
    g = torch.Generator().manual_seed(0)
    neighbours = torch.randint(0, n, (n, k), generator=g)
    mask = torch.ones(n, dtype=torch.bool)
    mask[list(isolated)] = False
    args = dict(anchor_probs=torch.full((n,), 1.0 / n), neighbours=neighbours, local_mask=mask, num_anchors=5,
                tau_s=0.1, tau_t=0.04, tau_s_local=0.2, tau_t_local=0.5, lam=0.7)
    args.update(kw)
    return RGRL(4, 8, 6, 8, **args)


# ---------------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------------
def test_global_loss_matches_float64_reference():
    m = _tiny_model()
    p, t = _unit(12, 6, 1), _unit(12, 6, 2)
    anchors = torch.tensor([0, 3, 7, 11, 4])
    got = m.global_loss(p, t, anchors)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_ref_global(p, t, anchors, 0.1, 0.04), rel=1e-5)


def test_local_loss_matches_float64_reference_and_skips_isolated_nodes():
    m = _tiny_model(isolated=(5, 9))
    p, t = _unit(12, 6, 3), _unit(12, 6, 4)
    counted = [i not in (5, 9) for i in range(12)]
    ref = _ref_local(p, t, m.neighbours, counted, 0.2, 0.5)
    assert m.local_loss(p, t).item() == pytest.approx(ref, rel=1e-5)
    assert ref != pytest.approx(_ref_local(p, t, m.neighbours, [True] * 12, 0.2, 0.5), rel=1e-4)


def test_forward_sums_both_view_orders_with_the_same_anchors():
    m = _tiny_model()
    x1, x2 = torch.randn(12, 4), torch.randn(12, 4)
    e1 = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 0]])
    e2 = torch.tensor([[6, 7, 8], [7, 8, 6]])
    torch.manual_seed(7)
    loss, metrics = m(x1, e1, x2, e2)
    torch.manual_seed(7)
    anchors = torch.multinomial(m.anchor_probs, m.num_anchors, replacement=False)
    p1 = F.normalize(m.predictor(m.student(x1, e1)), dim=1).double()
    p2 = F.normalize(m.predictor(m.student(x2, e2)), dim=1).double()
    with torch.no_grad():
        t1 = F.normalize(m.teacher(x1, e1), dim=1).double()
        t2 = F.normalize(m.teacher(x2, e2), dim=1).double()
    counted = m.local_nodes.tolist()
    mask = [i in counted for i in range(12)]
    glob = _ref_global(p1.detach(), t2, anchors, 0.1, 0.04) + _ref_global(p2.detach(), t1, anchors, 0.1, 0.04)
    loc = _ref_local(p1.detach(), t2, m.neighbours, mask, 0.2, 0.5) + _ref_local(p2.detach(), t1, m.neighbours,
                                                                                 mask, 0.2, 0.5)
    assert metrics["loss_global"].item() == pytest.approx(glob, rel=1e-4)
    assert metrics["loss_local"].item() == pytest.approx(loc, rel=1e-4)
    assert loss.item() == pytest.approx(glob + 0.7 * loc, rel=1e-4)
    loss.backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert m.predictor[0].weight.grad.abs().sum() > 0


def test_relation_loss_per_row_anchors_rejects_wrong_shapes():
    from ressl.loss import relation_loss

    q = _unit(4, 3, 0).float()
    with pytest.raises(ValueError, match=r"\[B, K, D\]"):
        relation_loss(q, q, torch.zeros(5, 2, 3))


# ---------------------------------------------------------------------------------------------------
# anchors and diffusion neighbours
# ---------------------------------------------------------------------------------------------------
def test_anchor_probabilities_follow_the_inverse_degree_formula():
    deg = torch.tensor([0.0, 1, 2, 5, 40, 300])
    alpha, beta = 0.9, 0.05
    w = [min(1.0, alpha ** math.log(1 + d) + beta) for d in deg.tolist()]
    ref = [v / sum(w) for v in w]
    got = anchor_probabilities(deg, alpha, beta)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(ref, rel=1e-12)
    assert all(a > b for a, b in zip(got[1:-1], got[2:]))  # strictly favours low degrees (beyond the cap)
    assert torch.allclose(anchor_probabilities(deg, 1.0, 0.0), torch.full((6,), 1 / 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="alpha"):
        anchor_probabilities(deg, 1.5, 0.0)


def test_anchor_draws_follow_the_degree_weighting():
    deg = torch.tensor([1.0, 1, 3, 10, 50, 200])
    probs = anchor_probabilities(deg, 0.5, 0.0)
    torch.manual_seed(0)
    draws = 6000
    counts = torch.bincount(torch.cat([sample_anchors(probs, 1) for _ in range(draws)]), minlength=6).double()
    expected = probs * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (counts, expected)  # chi-square, 5 d.o.f.: p = 0.001
    many = sample_anchors(probs, 4)
    assert many.unique().numel() == 4  # without replacement
    with pytest.raises(ValueError, match="1..6"):
        sample_anchors(probs, 7)


def _dense_ppr_topk(edge_index: torch.Tensor, n: int, k: int, alpha: float) -> list[set[int]]:
    a = np.zeros((n, n))
    for i, j in edge_index.T.tolist():
        a[i, j] = 1.0
    a += np.eye(n)
    d = a.sum(1)
    t = a / np.sqrt(d)[:, None] / np.sqrt(d)[None, :]
    ppr = alpha * np.linalg.inv(np.eye(n) - (1 - alpha) * t)
    out = []
    for row in ppr:
        order = np.argsort(-row)
        assert row[order[k - 1]] - row[order[k]] > 1e-9  # no tie at the cut: the top-k set is well defined
        out.append(set(order[:k].tolist()))
    return out


def test_diffusion_neighbours_are_the_top_k_of_personalised_pagerank():
    # an irregular graph whose PageRank rows have no tie at the top-3 cut
    edges = torch.tensor([[0, 1], [0, 3], [0, 4], [0, 6], [0, 8], [1, 10], [2, 9], [2, 10], [3, 6], [3, 7], [3, 9],
                          [4, 9], [4, 10], [5, 11], [6, 7], [6, 11], [7, 10], [8, 9], [8, 11], [9, 11]]).T
    edge_index = torch.cat([edges, edges.flip(0)], dim=1)
    got = diffusion_neighbours(edge_index, 12, 3, ppr_alpha=0.15)
    assert got.shape == (12, 3)
    assert [set(r) for r in got.tolist()] == _dense_ppr_topk(edge_index, 12, 3, 0.15)
    with pytest.raises(ValueError, match="topk"):
        diffusion_neighbours(edge_index, 12, 12)


# ---------------------------------------------------------------------------------------------------
# augmentations
# ---------------------------------------------------------------------------------------------------
def test_feature_masking_keeps_nodes_and_masks_the_stated_fraction_of_columns():
    torch.manual_seed(0)
    x = torch.rand(50, 4000) + 0.5
    out = mask_features(x, 0.3)
    assert out.shape == x.shape and torch.all(x >= 0.5)  # input untouched
    zero_cols = (out == 0).all(dim=0)
    assert ((out == 0) == zero_cols[None, :]).all()  # whole columns, the same for every node
    sigma = math.sqrt(0.3 * 0.7 / 4000)
    assert abs(zero_cols.float().mean().item() - 0.3) < 4 * sigma
    assert torch.equal(mask_features(x, 0.0), x)


def test_edge_dropping_keeps_nodes_and_drops_the_stated_fraction():
    torch.manual_seed(0)
    e = 20000
    edge_index = torch.randint(0, 100, (2, e))
    kept = drop_edges(edge_index, 0.4)
    sigma = math.sqrt(0.4 * 0.6 / e)
    assert abs(1 - kept.shape[1] / e - 0.4) < 4 * sigma
    pairs = set(map(tuple, edge_index.T.tolist()))
    assert set(map(tuple, kept.T.tolist())) <= pairs  # only removes; node ids unchanged
    assert torch.equal(drop_edges(edge_index, 0.0), edge_index)
    with pytest.raises(ValueError, match="edge drop p"):
        drop_edges(edge_index, 1.5)


# ---------------------------------------------------------------------------------------------------
# data files
# ---------------------------------------------------------------------------------------------------
def _write_planetoid(folder: Path, n: int = 520, n_test: int = 10, n_train: int = 6, f: int = 7, c: int = 3
                     ) -> tuple[np.ndarray, np.ndarray, dict[int, list[int]]]:
    """A tiny graph in the Planetoid raw layout (ind.cora.*): test nodes stored last, in shuffled order.

    PyG's reader takes the 500 nodes after the training ones as validation, hence n >= n_train + 500.
    """
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    feats = (rng.random((n, f)) < 0.3).astype(np.float32)
    labels = rng.integers(0, c, n)
    onehot = np.eye(c)[labels]
    test_idx = np.arange(n - n_test, n)
    stored_order = rng.permutation(test_idx)  # order of the rows of tx / ty
    graph = {i: [] for i in range(n)}
    for _ in range(3 * n):
        i, j = rng.integers(0, n, 2)
        if i != j:
            graph[int(i)].append(int(j))
            graph[int(j)].append(int(i))
    parts = {"x": sp.csr_matrix(feats[:n_train]), "allx": sp.csr_matrix(feats[:n - n_test]),
             "tx": sp.csr_matrix(feats[stored_order]), "y": onehot[:n_train], "ally": onehot[:n - n_test],
             "ty": onehot[stored_order], "graph": graph}
    folder.mkdir(parents=True)
    for name, obj in parts.items():
        with open(folder / f"ind.cora.{name}", "wb") as fh:
            pickle.dump(obj, fh)
    (folder / "ind.cora.test.index").write_text("\n".join(map(str, stored_order)) + "\n")
    return feats, labels, graph


def test_planetoid_fixture_loads_and_round_trips(tmp_path):
    feats, labels, graph = _write_planetoid(tmp_path / "src" / "Cora" / "raw")
    data = planetoid_graph(tmp_path / "src", "cora")
    assert data.num_nodes == 520
    assert torch.equal(data.x, torch.tensor(feats))
    assert torch.equal(data.y, torch.tensor(labels))
    edges = set(map(tuple, data.edge_index.T.tolist()))
    assert edges == {(i, j) for i, nb in graph.items() for j in nb}
    assert int(data.train_mask.sum()) == 6 and int(data.test_mask.sum()) == 10
    assert graph_dataset.main(["planetoid", "--src", str(tmp_path / "src"), "--name", "Cora",
                               "--out", str(tmp_path / "data")]) == 0
    back = load_graph(tmp_path / "data" / "cora")
    assert torch.equal(back.x, data.x) and torch.equal(back.edge_index, data.edge_index)
    assert torch.equal(back.test_mask, data.test_mask) and back.name == "cora"


def test_planetoid_errors_name_the_missing_files(tmp_path):
    _write_planetoid(tmp_path / "raw")
    (tmp_path / "raw" / "ind.cora.ty").unlink()
    with pytest.raises(GraphDataError, match=r"ind\.cora\.ty"):
        planetoid_graph(tmp_path, "Cora")
    with pytest.raises(GraphDataError, match="must be one of"):
        planetoid_graph(tmp_path, "Reddit")
    with pytest.raises(GraphDataError, match="does not exist"):
        load_graph(tmp_path / "nowhere")
    torch.save(torch.zeros(3), tmp_path / "graph.pt")
    with pytest.raises(GraphDataError, match="expected a dict"):
        load_graph(tmp_path)
    torch.save({"x": torch.zeros(3, 2), "y": torch.zeros(3, dtype=torch.long),
                "edge_index": torch.tensor([[0], [7]])}, tmp_path / "graph.pt")
    with pytest.raises(GraphDataError, match="outside 0..2"):
        load_graph(tmp_path)


def test_shipped_graphs():
    k = karate_graph()
    assert k.num_nodes == 34 and k.edge_index.shape[1] == 2 * 78 and int(k.y.sum()) == 17
    d = digits_knn_graph(10)
    assert d.x.shape == (1797, 64) and int(d.y.max()) == 9
    deg = node_degree(d.edge_index, d.num_nodes)
    assert int(deg.min()) >= 10  # each node keeps its 10 neighbours, plus those that chose it
    assert not bool((d.edge_index[0] == d.edge_index[1]).any())


# ---------------------------------------------------------------------------------------------------
# evaluation protocol and config
# ---------------------------------------------------------------------------------------------------
def test_random_splits_and_probe():
    train, val, test = random_splits(100, num_splits=4, seed=1)
    assert (train.int() + val.int() + test.int() == 1).all()
    assert test.sum(1).tolist() == [80] * 4 and val.sum(1).tolist() == [10] * 4
    assert not torch.equal(test[0], test[1])
    y = torch.arange(100) % 2
    emb = torch.stack([y.float() * 2 - 1, torch.randn(100) * 0.1], dim=1)
    res = linear_probe_splits(emb, y, train, val, test, epochs=100, lr=0.05)
    assert res["test_mean"] == 100.0 and len(res["test_accs"]) == 4
    noise = linear_probe_splits(torch.randn(100, 2), y, train, val, test)
    assert noise["test_mean"] < 75


def test_config_is_strict():
    with pytest.raises(ConfigError, match="unknown key 'sample'"):
        load_graph_config(None, ["sample=3"])
    with pytest.raises(ConfigError, match="feat_mask_p1"):
        load_graph_config(None, ["feat_mask_p1=1.5"])
    with pytest.raises(ConfigError, match="expects int"):
        load_graph_config(None, ["topk=two"])
    cfg = load_graph_config(ROOT / "configs" / "rgrl-digits.yaml", ["lr=1e-3"])
    assert cfg.lr == 0.001 and cfg.data == "data/digits-knn"
    assert load_graph_config(ROOT / "configs" / "rgrl-cora.yaml").to_dict() == \
        load_graph_config(None, ["name=rgrl-cora", "eval_every=5"]).to_dict()  # the defaults are the Cora run


# ---------------------------------------------------------------------------------------------------
# the training tool
# ---------------------------------------------------------------------------------------------------
def _csv_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as fh:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(fh) if r["loss"]}


def test_short_digits_run_improves_node_accuracy(tmp_path):
    save_graph(tmp_path / "digits" / "graph.pt", digits_knn_graph(10), "digits-knn")
    cfg = load_graph_config(ROOT / "configs" / "rgrl-digits.yaml",
                            [f"data={tmp_path / 'digits'}", f"out_dir={tmp_path}", "epochs=80", "eval_every=0",
                             "eval_splits=10", "ckpt_every=1000"])
    s = train_graph.main(cfg)
    before, after = s["acc_before"]["test_mean"], s["acc_after"]["test_mean"]
    assert after >= before + 2.0, (before, after)
    run = tmp_path / "rgrl-digits"
    assert (run / "curves.png").stat().st_size > 0 and (run / "last.pt").exists()
    assert sorted(_csv_losses(run)) == list(range(10, 81, 10))


def _karate_cfg(tmp_path: Path, *extra: str):
    if not (tmp_path / "karate" / "graph.pt").exists():
        save_graph(tmp_path / "karate" / "graph.pt", karate_graph(), "karate")
    return load_graph_config(None, [f"data={tmp_path / 'karate'}", f"out_dir={tmp_path}", "hidden_dim=16",
                                    "embed_dim=8", "pred_hidden=16", "num_anchors=10", "topk=3", "epochs=8",
                                    "log_every=1", "ckpt_every=3", "eval_every=4", "eval_splits=2", "lr=0.01",
                                    "eval_val_frac=0.2", "eval_test_frac=0.5", *extra])


def test_resume_is_exact(tmp_path):
    full = train_graph.main(_karate_cfg(tmp_path, "name=full"))
    with killed_during_step(RGRL, 5):  # the last checkpoint is from step 3
        train_graph.main(_karate_cfg(tmp_path, "name=cut"))
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["step"] == 3
    resumed = train_graph.main(_karate_cfg(tmp_path, "name=cut"))  # resume=auto
    assert _csv_losses(tmp_path / "cut") == _csv_losses(tmp_path / "full")  # bit-identical, no step twice
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["acc_after"] == full["acc_after"]
    with pytest.raises(ConfigError, match="tau_t: 0.01 in the checkpoint, 0.5 now"):
        train_graph.main(_karate_cfg(tmp_path, "name=cut", "tau_t=0.5", "epochs=9"))


def test_nan_loss_stops_without_saving(tmp_path, monkeypatch):
    real_forward = RGRL.forward

    def nan_forward(self, *a):
        loss, metrics = real_forward(self, *a)
        return loss * float("nan"), metrics

    monkeypatch.setattr(RGRL, "forward", nan_forward)
    with pytest.raises(train_graph.NonFiniteLossError, match="NaN/inf"):
        train_graph.main(_karate_cfg(tmp_path, "name=nan", "log_every=2"))
    assert not (tmp_path / "nan" / "last.pt").exists()


def test_a_run_directory_in_use_is_refused(tmp_path):
    from ressl.run import RunLock, RunLockedError

    cfg = _karate_cfg(tmp_path, "name=locked")
    (tmp_path / "locked").mkdir()
    with RunLock(tmp_path / "locked"), pytest.raises(RunLockedError, match="in use"):
        train_graph.main(cfg)
    assert not (tmp_path / "locked" / "metrics.csv").exists()


def test_bad_data_fails_before_any_output(tmp_path):
    with pytest.raises(ConfigError, match="num_anchors=64 must be <= 34"):
        train_graph.main(_karate_cfg(tmp_path, "name=big", "num_anchors=64"))
    cfg = load_graph_config(None, [f"data={tmp_path / 'missing'}", f"out_dir={tmp_path}", "name=missing"])
    with pytest.raises(ConfigError, match="missing.*does not exist"):
        train_graph.main(cfg)
    assert not (tmp_path / "big").exists() and not (tmp_path / "missing").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the bf16 autocast path of RGRL)")
def test_digits_run_on_cuda_in_bf16(tmp_path):
    save_graph(tmp_path / "digits" / "graph.pt", digits_knn_graph(10), "digits-knn")
    cfg = load_graph_config(ROOT / "configs" / "rgrl-digits.yaml",
                            [f"data={tmp_path / 'digits'}", f"out_dir={tmp_path}", "epochs=80", "eval_every=0",
                             "num_threads=0", "precision=auto"])
    s = train_graph.main(cfg)
    assert s["device"].startswith("cuda") and s["precision"] == "bf16"
    assert s["acc_after"]["test_mean"] >= s["acc_before"]["test_mean"] + 2.0
