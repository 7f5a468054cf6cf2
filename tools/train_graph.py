"""Train RGRL on one graph: two augmented views per step, the student's relations to global and local
anchors matched to the EMA teacher's; node accuracy by logistic regression on frozen embeddings.

Launch (configs/rgrl-*.yaml are flat GraphConfig presets; any key can be overridden as key=value):

    make dataset DATA=digits-knn && python tools/train_graph.py --config configs/rgrl-digits.yaml
    make dataset DATA=planetoid SRC=~/planetoid NAME=Cora && python tools/train_graph.py --config configs/rgrl-cora.yaml
    make train-graph        # the first line, ~1 minute on 2 CPU cores

Full batch: every step sees the whole graph, so a run is one process on one device (CPU or one GPU,
bf16 autocast there by default); Accelerate picks the device and precision.

Outputs under runs/NAME/: metrics.csv, tb/ (TensorBoard), curves.png, last.pt (resumable checkpoint,
written atomically), summary.json; while it trains a run holds runs/NAME/.lock, so a second run of
the same name is refused. ``resume=auto`` (the default) continues a killed run from last.pt,
drawing the same views and anchors it would have drawn.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor
from torch_geometric.data import Data
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ressl.config import ConfigError, run_tool  # noqa: E402
from ressl.graph.augment import augment  # noqa: E402
from ressl.graph.config import GraphConfig, graph_resume_changes, load_graph_config  # noqa: E402
from ressl.graph.data import GraphDataError, load_graph  # noqa: E402
from ressl.graph.eval import linear_probe_splits, random_splits  # noqa: E402
from ressl.graph.model import RGRL  # noqa: E402
from ressl.graph.sampling import anchor_probabilities, diffusion_neighbours, node_degree  # noqa: E402
from ressl.run import (  # noqa: E402
    NonFiniteLossError,
    check_resume_config,
    find_checkpoint,
    finish_run,
    open_run,
    parse_cli,
    read_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from ressl.runlog import RunLog  # noqa: E402
from ressl.step import resolve_precision  # noqa: E402

log = logging.getLogger("train_graph")

FIELDS = ("step", "epoch", "loss", "loss_global", "loss_local", "key_std", "lr", "momentum", "steps_per_s",
          "acc_val", "acc_test", "acc_test_std")
EVAL_KEYS = ("acc_val", "acc_test", "acc_test_std")
CURVES = ("loss", "loss_global", "loss_local", "key_std", "steps_per_s", "acc_test")
# what a checkpoint must hold to be resumed (every checkpoint this tool writes has all of it)
RESUME_KEYS = ("model", "optimizer", "step", "history", "log_rows", "rng_cpu", "config")


def _fmt(acc: dict[str, Any] | None) -> str:
    return "n/a" if acc is None else f"{acc['test_mean']:.2f} ± {acc['test_std']:.2f}%"


def main(cfg: GraphConfig) -> dict[str, Any]:
    """Train with ``cfg``; returns the summary that is also written to runs/NAME/summary.json."""
    t_begin = time.perf_counter()
    # --- accelerator + seeds --------------------------------------------------------------------------
    precision = resolve_precision(cfg.precision)
    accelerator = Accelerator(mixed_precision=precision)
    if accelerator.num_processes != 1:
        raise ConfigError(f"RGRL trains full-batch on one device; launched with {accelerator.num_processes} "
                          "processes (run it without accelerate launch --num_processes)")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        data = load_graph(cfg.data)
    except GraphDataError as e:
        raise ConfigError(f"data={cfg.data!r}: {e}") from None
    if cfg.num_anchors > data.num_nodes or cfg.topk >= data.num_nodes:
        raise ConfigError(f"{cfg.data}: {data.num_nodes} nodes; num_anchors={cfg.num_anchors} must be <= "
                          f"{data.num_nodes} and topk={cfg.topk} < {data.num_nodes}")
    # runs/NAME: created and locked until the end; without an overwrite key, resume=no writes over it in place
    with open_run(cfg, overwrite=None) as run_dir:
        return _train(cfg, accelerator, precision, data, run_dir, t_begin)


def evaluate(cfg: GraphConfig, core: RGRL, graph: tuple[Tensor, Tensor, Tensor, Any], step: int, tag: str,
             history: dict[str, Any], runlog: RunLog) -> dict[str, Any]:
    """Logistic regression on the student's frozen embeddings of ``graph`` = (x, edge_index, y, splits), logged
    and appended to ``history["evals"]`` at ``step`` (its own generator: the training RNG is untouched)."""
    x, edge_index, y, splits = graph
    res = linear_probe_splits(core.embed(x, edge_index), y, *splits, epochs=cfg.probe_epochs, lr=cfg.probe_lr,
                              seed=cfg.seed)
    log.info("node accuracy %s: test %s, val %.2f%%", tag, _fmt(res), res["val_mean"])
    history["evals"].append({"step": step, **{k: v for k, v in res.items() if k != "test_accs"}})
    runlog.row(step, acc_val=res["val_mean"], acc_test=res["test_mean"], acc_test_std=res["test_std"])
    return res


def save_graph_run(path: Path, cfg: GraphConfig, core: RGRL, optimizer: torch.optim.Optimizer, step: int,
                   history: dict[str, Any], runlog: RunLog) -> None:
    """``last.pt``: model, optimiser, step, evaluation history, the metrics rows written so far, RNG, config."""
    save_checkpoint(path, {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                           "history": history, "log_rows": runlog.rows, **rng_state(), "config": cfg.to_dict()})


def _train(cfg: GraphConfig, accelerator: Accelerator, precision: str, data: Data, run_dir: Path,
           t_begin: float) -> dict[str, Any]:
    set_seed(cfg.seed)
    device = accelerator.device

    # --- data: the graph's anchor distribution and diffusion neighbours, the evaluation splits ---------
    n = data.num_nodes
    t0 = time.perf_counter()
    deg = node_degree(data.edge_index, n)
    neighbours = diffusion_neighbours(data.edge_index, n, cfg.topk, cfg.ppr_alpha)
    log.info("graph %s: %d nodes, %d directed edges, %d features, %d classes; GDC top-%d in %.1f s",
             data.name, n, data.edge_index.shape[1], data.x.shape[1], int(data.y.max()) + 1, cfg.topk,
             time.perf_counter() - t0)
    splits = random_splits(n, cfg.eval_splits, cfg.eval_val_frac, cfg.eval_test_frac, seed=cfg.seed)
    x, edge_index, y = data.x.to(device), data.edge_index.to(device), data.y.to(device)

    # --- model + optimiser (AdamW at a constant lr, as the authors) -------------------------------------
    model = RGRL(data.x.shape[1], cfg.hidden_dim, cfg.embed_dim, cfg.pred_hidden,
                 anchor_probs=anchor_probabilities(deg, cfg.anchor_alpha, cfg.anchor_beta),
                 neighbours=neighbours, local_mask=deg > 0, num_anchors=cfg.num_anchors, tau_s=cfg.tau_s,
                 tau_t=cfg.tau_t, tau_s_local=cfg.tau_s_local, tau_t_local=cfg.tau_t_local, lam=cfg.lam).to(device)
    trained = [*model.student.parameters(), *model.predictor.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    core: RGRL = accelerator.unwrap_model(model)

    # --- resume -----------------------------------------------------------------------------------------
    ckpt_path = run_dir / "last.pt"
    resume_from = find_checkpoint(cfg, run_dir)
    step, history, log_rows = 0, {"evals": []}, None
    if resume_from is not None:
        state = read_checkpoint(resume_from, RESUME_KEYS)
        check_resume_config(graph_resume_changes(state["config"], cfg), resume_from)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, log_rows = state["step"], state["history"], state["log_rows"]
        restore_rng(state)  # the same augmentations and anchors as an unbroken run
        log.info("resumed from %s at step %d", resume_from, step)
    runlog = RunLog(run_dir, True, resume_step=step if resume_from is not None else None, keep_rows=log_rows,
                    fields=FIELDS, eval_keys=EVAL_KEYS)

    graph = (x, edge_index, y, splits)
    if cfg.eval_before and resume_from is None:
        history["before"] = evaluate(cfg, core, graph, step, "before training (random-init encoder)", history, runlog)

    # --- loop: one full-batch step per epoch --------------------------------------------------------------
    losses: list[float] = []
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    bar = tqdm(total=cfg.epochs, initial=step, dynamic_ncols=True, unit="step")
    t_start, step_start, t_last, step_last = time.perf_counter(), step, time.perf_counter(), step
    model.train()
    while step < cfg.epochs:
        v1 = augment(x, edge_index, cfg.feat_mask_p1, cfg.edge_drop_p1)
        v2 = augment(x, edge_index, cfg.feat_mask_p2, cfg.edge_drop_p2)
        with accelerator.autocast():
            loss, metrics = model(*v1, *v2)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        core.update(cfg.momentum)
        nonfinite |= ~torch.isfinite(loss.detach())  # on device: no host sync here
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.epochs:
            # host sync: the only one per log_every steps (loss values + the non-finite flag)
            if nonfinite.item():
                raise NonFiniteLossError(f"loss became NaN/inf by step {step} (lr {cfg.lr:g}); stopping without "
                                         "saving. Lower lr or raise the temperatures, or use precision=no.")
            now = time.perf_counter()
            sps = (step - step_last) / (now - t_last)
            t_last, step_last = now, step
            vals = {k: v.item() for k, v in metrics.items()}
            losses.append(vals["loss"])
            runlog.row(step, epoch=step, lr=cfg.lr, momentum=cfg.momentum, steps_per_s=sps, **vals)
            bar.set_postfix(loss=f"{vals['loss']:.4f}", steps_s=f"{sps:.1f}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.epochs:
            t_eval = time.perf_counter()
            evaluate(cfg, core, graph, step, f"after step {step}", history, runlog)
            t_last += time.perf_counter() - t_eval  # steps/s counts training only
        if step % cfg.ckpt_every == 0 and step < cfg.epochs:
            if nonfinite.item():  # host sync; never save a state that has seen a NaN
                raise NonFiniteLossError(f"loss became NaN/inf before step {step}; stopping without saving.")
            save_graph_run(ckpt_path, cfg, core, optimizer, step, history, runlog)
    bar.close()
    train_s = time.perf_counter() - t_start

    # --- save -------------------------------------------------------------------------------------------
    if nonfinite.item():
        raise NonFiniteLossError(f"loss became NaN/inf by step {step}; stopping without saving.")
    after = evaluate(cfg, core, graph, step, "after training", history, runlog)
    save_graph_run(ckpt_path, cfg, core, optimizer, step, history, runlog)
    best = max(history["evals"], key=lambda e: e["val_mean"])  # the authors' model selection, for reference
    before = history.get("before")
    summary = {
        "name": cfg.name, "graph": data.name, "num_nodes": n, "steps": step, "precision": precision,
        "device": str(device), "losses": losses,
        "acc_before": None if before is None else {k: v for k, v in before.items() if k != "test_accs"},
        "acc_after": {k: v for k, v in after.items() if k != "test_accs"}, "acc_best_val": best,
        "train_s": train_s, "wall_s": time.perf_counter() - t_begin,
        "steps_per_s": (step - step_start) / train_s if step > step_start else None,
    }
    finish_run(run_dir, runlog, summary, CURVES)
    print(f"done: {step} steps in {summary['wall_s']:.0f} s, node accuracy before {_fmt(before)} -> after "
          f"{_fmt(after)} (logistic regression, {cfg.eval_splits} random splits); logs in {run_dir}")
    accelerator.end_training()
    return summary


def parse_args(argv: list[str] | None = None) -> GraphConfig:
    return parse_cli(__doc__, load_graph_config, "YAML preset in configs/ (default: the authors' Cora run)", argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_tool(lambda: main(parse_args()))
