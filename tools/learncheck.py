"""Does it learn? Random init vs MoCo v2 vs ReSSL vs TPAMI vs the instance term at one budget, over seeds.

    python tools/learncheck.py                                   # demo data, configs/demo.yaml, its epochs, seed 0
    python tools/learncheck.py --seeds 0,1,2                     # every row for 3 seeds: mean +- sd
    python tools/learncheck.py --variants as-configured --seeds 0,1,2 --out-dir runs/demo-seeds   # `make train` x3
    python tools/learncheck.py --epochs 4 --out-dir runs/lc4 batch_size=32
    make learn-check [SEEDS=3] [ARGS="--epochs 4"]               # SEEDS=N: seeds 0 .. N-1

Each variant is a ``tools/train.py`` run (its ``main``, nothing re-implemented) of the same config,
changed only by the keys below, trained once per seed at the same budget (``ressl-3x`` at three times
it: epochs, and ``max_steps`` when the config caps steps); each checkpoint is then evaluated by
``tools/eval.py`` (weighted kNN, the same code as the training monitor, and a linear probe). The
random-init row evaluates the model as ``ressl.step.build_ressl`` creates it under each seed. Runs go
to ``--out-dir``/VARIANT-sSEED/; without ``--reuse`` each is trained afresh (``resume=no overwrite=true``:
the outputs of an earlier run of that name are moved to VARIANT-sSEED.replaced-DATE/, not deleted).

Writes ``learncheck.json`` (every run: its seed, kNN, linear top-1, training wall time, steps, and for
relation-only runs when they left the collapsed plateau) and ``learncheck.md``: the command that
regenerates it, then per row the mean +- sample standard deviation over the seeds (n noted) and the
per-seed values. A relation-only run (no InfoNCE warm-up, no instance term) is *on the plateau* while
its relation loss is within 1% of log K (K = ``queue_size``: a uniform relation) and ``key_std`` is below
0.5/sqrt(D) (D = ``proj_dim``; spread unit keys give about 1/sqrt(D)); it *left* the plateau at the first
logged step after that where the loss fell more than 1% below log K or ``key_std`` rose above 0.5/sqrt(D)
(read from the run's ``metrics.csv``, so at ``log_every`` resolution).

Variants (MoCo v2 in this code is the InfoNCE loss of the TPAMI warm-up for every epoch: positive the
teacher key, negatives the queue, tau = ``infonce_tau``; "{epochs}" is the variant's own budget):
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ressl.config import Config, ConfigError, load_config, run_tool  # noqa: E402
from ressl.io import atomic_open, atomic_write_bytes, atomic_write_json  # noqa: E402
from ressl.step import build_ressl  # noqa: E402
from tools import eval as eval_tool  # noqa: E402  (each variant runs these two tools' mains)
from tools import train  # noqa: E402

log = logging.getLogger("learncheck")

__all__ = ["VARIANTS", "Variant", "variant_overrides", "run_name", "parse_seeds", "plateau", "summarize", "run",
           "main"]


@dataclass(frozen=True)
class Variant:
    """One row: what it is, the config keys on top of the base config, and its budget in base budgets."""

    what: str
    keys: dict[str, str] = field(default_factory=dict)
    budget: int = 1


_RELATION_ONLY = {"warmup_infonce_epochs": "0", "infonce_blend_epochs": "0", "predictor": "false", "w_sim": "0"}

VARIANTS: dict[str, Variant] = {
    "random-init": Variant("no training: the initial backbone"),
    "moco-v2": Variant("InfoNCE every epoch", {"warmup_infonce_epochs": "{epochs}", "infonce_blend_epochs": "0",
                                               "predictor": "false", "w_sim": "0"}),
    "ressl": Variant("relation loss only (NeurIPS 2021)", _RELATION_ONLY),
    # does the relation loss alone leave the plateau given time? (the demo budget keeps it there ~half the run)
    "ressl-3x": Variant("relation loss only, 3x the budget", _RELATION_ONLY, budget=3),
    "tpami": Variant("predictor + InfoNCE warm-up, then relation", {"predictor": "true", "w_sim": "0"}),
    "instance-term": Variant("relation + instance term 2 - 2cos(p, k)", {
        "warmup_infonce_epochs": "0", "infonce_blend_epochs": "0", "predictor": "true", "w_sim": "1"}),
    # the run `make train` makes (demo: relation loss after a 4+2-epoch InfoNCE warm-up, no predictor)
    "as-configured": Variant("the config unchanged"),
}
__doc__ += "".join(f"\n    {n:14s} {v.what}: {' '.join(f'{k}={x}' for k, x in v.keys.items()) or '-'}"
                   + (f" (budget x{v.budget})" if v.budget != 1 else "")
                   for n, v in VARIANTS.items()) + "\n"

# plateau thresholds: within 1% of log K, key_std below half the spread value 1/sqrt(D)
PLATEAU_TOL, SPREAD_FRACTION = 0.01, 0.5


def variant_overrides(name: str, epochs: int, max_steps: int = 0) -> list[str]:
    """``key=value`` overrides of variant ``name`` at a base budget of ``epochs`` (and ``max_steps``, 0 = none)."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    v = VARIANTS[name]
    budget = [f"epochs={epochs * v.budget}"] + ([f"max_steps={max_steps * v.budget}"] if max_steps else [])
    return budget + [f"{k}={x.format(epochs=epochs * v.budget)}" for k, x in v.keys.items()]


def run_name(variant: str, seed: int) -> str:
    """Name (and directory under ``--out-dir``) of one variant's run for one seed."""
    return f"{variant}-s{seed}"


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; distinct non-negative integers, in the order given."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds expects a comma list of integers such as 0,1,2, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds expects distinct integers >= 0, got {text!r}")
    return seeds


def _random_init_checkpoint(cfg: Config, path: Path) -> None:
    """A checkpoint of the untrained model under the run's seed, in the trainer's format (step 0)."""
    set_seed(cfg.seed)
    model = build_ressl(cfg, "cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": 0}, f)


def plateau(metrics_csv: str | Path, queue_size: int, dim: int) -> dict[str, Any]:
    """When a relation-only run sat on the collapsed plateau and when it left it (see the module docstring).

    Returns:
        ``log_k``, ``key_std_threshold``, ``entered`` (first step on the plateau, None if never),
        ``left`` (first step after that off it, None if never), ``left_by`` ("loss_rel", "key_std" or
        "loss_rel+key_std"), ``last_step`` and the last ``loss_rel`` / ``key_std`` logged.
    """
    log_k, std_min = math.log(queue_size), SPREAD_FRACTION / math.sqrt(dim)
    out: dict[str, Any] = {"log_k": log_k, "key_std_threshold": std_min, "entered": None, "left": None,
                           "left_by": None, "last_step": None, "last_loss_rel": None, "last_key_std": None}
    with open(metrics_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss_rel") and r.get("key_std")]
    for r in rows:
        step, loss, std = int(r["step"]), float(r["loss_rel"]), float(r["key_std"])
        out.update(last_step=step, last_loss_rel=loss, last_key_std=std)
        if out["entered"] is None:
            if abs(loss - log_k) <= PLATEAU_TOL * log_k and std <= std_min:
                out["entered"] = step
        elif out["left"] is None:
            by = [name for name, off in (("loss_rel", loss < (1 - PLATEAU_TOL) * log_k), ("key_std", std > std_min))
                  if off]
            if by:
                out["left"], out["left_by"] = step, "+".join(by)
    return out


def summarize(values: list[float | None]) -> dict[str, Any] | None:
    """Mean, sample standard deviation (None for n < 2), n and the values; None when there are none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "values": vals}


def _mean_sd(s: dict[str, Any] | None, digits: int = 2) -> str:
    if s is None:
        return "—"
    return f"{s['mean']:.{digits}f}" + (f" ± {s['sd']:.{digits}f}" if s["sd"] is not None else "")


def _per_seed(values: list[float | None], digits: int = 2) -> str:
    return " / ".join("—" if v is None else f"{v:.{digits}f}" for v in values)


def _plateau_cell(p: dict[str, Any] | None) -> str:
    if p is None:
        return "—"
    if p["entered"] is None:
        return "never on it"
    if p["left"] is None:
        return f"no (on it from step {p['entered']} to {p['last_step']})"
    return f"step {p['left']} ({p['left_by']})"


def format_table(report: dict[str, Any]) -> str:
    """``learncheck.md``: the command, the budget, then one row per variant (mean ± sd, per-seed values)."""
    seeds, n = report["seeds"], len(report["seeds"])
    stat = (f"mean ± sample sd over n={n} seeds" if n > 1 else "one seed (n=1): no spread")
    lines = [f"Regenerate: `{report['command']}`", "",
             f"Budget: {report['budget']}; seeds {', '.join(map(str, seeds))}: each row is the {stat}, "
             f"the per-seed values in seed order after it; linear probe: {report['probe']}. Relation-only rows: "
             f"left the plateau (loss within 1% of log K and key_std < 0.5/sqrt(D)) at step, per seed.", "",
             "| variant | what | epochs | kNN top-1 | linear top-1 | kNN per seed | linear per seed "
             "| train s per seed | left the plateau |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        runs = r["runs"]
        plateau_cell = "—" if r["plateau"] is None else " / ".join(_plateau_cell(x["plateau"]) for x in runs)
        lines.append(f"| {r['variant']} | {r['what']} | {r['epochs']} | {_mean_sd(r['knn_top1'])} "
                     f"| {_mean_sd(r['linear_top1'])} | {_per_seed([x['knn_top1'] for x in runs])} "
                     f"| {_per_seed([x['linear_top1'] for x in runs])} "
                     f"| {_per_seed([x['train_s'] for x in runs], 0)} | {plateau_cell} |")
    table = "\n".join(lines) + "\n"
    verdict = report["ressl_ge_moco_v2"]
    if verdict is not None:
        yes = {m: "yes" if ok else "no" for m, ok in verdict.items()}
        table += (f"\nReSSL >= MoCo v2 at this budget (means over {n} seed{'s' * (n > 1)}): "
                  f"kNN {yes['knn_top1']}, linear {yes['linear_top1']}.\n")
    return table


def _command(config: str | None, overrides: list[str], epochs: int, out_dir: Path, probe: str, probe_epochs: int,
             variants: list[str], seeds: list[int]) -> str:
    argv = ["python", "tools/learncheck.py", "--config", config or "", "--epochs", str(epochs),
            "--seeds", ",".join(map(str, seeds))]
    if variants != list(VARIANTS):
        argv += ["--variants", ",".join(variants)]
    argv += ["--probe", probe, "--probe-epochs", str(probe_epochs), "--out-dir", str(out_dir), *overrides]
    return shlex.join(argv)


def run(config: str | None, overrides: list[str], epochs: int, out_dir: Path, probe: str = "fast",
        probe_epochs: int = 100, variants: list[str] | None = None, eval_args: list[str] | None = None,
        reuse: bool = False, seeds: list[int] | None = None) -> dict[str, Any]:
    """Train and evaluate every variant for every seed; returns (and writes) the JSON report.

    Every run's config is built and checked before the first one trains. With ``reuse``, a run in
    ``out_dir`` that finished with the same config (variant and seed included) is evaluated without
    training it again, so runs can be trained by separate processes, then tabled at once.
    """
    variants = variants or list(VARIANTS)
    t_all = time.perf_counter()
    base_cfg = load_config(config, overrides)
    seeds = [base_cfg.seed] if seeds is None else seeds
    plan: list[tuple[str, int, Config]] = []
    config_log = logging.getLogger("ressl.config")
    level = config_log.level
    config_log.setLevel(logging.WARNING)  # the base config's overrides were printed once, above
    try:
        for v in variants:
            for seed in seeds:
                # trained afresh; the trainer moves an earlier run's outputs to NAME.replaced-DATE/ first
                keys = [*overrides, *variant_overrides(v, epochs, base_cfg.max_steps), f"out_dir={out_dir}",
                        "resume=no", "overwrite=true", f"seed={seed}", f"name={run_name(v, seed)}"]
                plan.append((v, seed, load_config(config, keys)))
    finally:
        config_log.setLevel(level)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for i, (v, seed, cfg) in enumerate(plan, 1):
        run_dir = out_dir / cfg.name
        ckpt, done = run_dir / "last.pt", run_dir / "learncheck_run.json"
        summary, train_s, reused = None, None, False
        previous = json.loads(done.read_text()) if reuse and done.is_file() else None
        if v == "random-init":
            _random_init_checkpoint(cfg, ckpt)
        elif previous is not None and previous["config"] == cfg.to_dict():
            log.info("learn-check %d/%d: %s already trained with this config (%s), evaluating it", i, len(plan),
                     cfg.name, done)
            summary, train_s, reused = previous["summary"], previous["train_s"], True
        else:
            log.info("learn-check %d/%d: training %s (%s)", i, len(plan), cfg.name,
                     " ".join(variant_overrides(v, epochs, base_cfg.max_steps)))
            t0 = time.perf_counter()
            summary = train.main(cfg)
            train_s = time.perf_counter() - t0
            atomic_write_json(done, {"config": cfg.to_dict(), "summary": summary, "train_s": train_s})
        t0 = time.perf_counter()
        res = eval_tool.main(["--ckpt", str(ckpt), "--probe", probe, "--probe-epochs", str(probe_epochs),
                              "--no-tsne", "--num-workers", str(min(cfg.num_workers, 2)), *(eval_args or [])])
        relation_only = v != "random-init" and cfg.warmup_infonce_epochs == 0 and cfg.w_sim == 0
        runs[v].append({
            "seed": seed, "run_dir": str(run_dir), "knn_top1": res["knn_top1"], "linear_top1": res["linear_top1"],
            "probe": res["probe"], "knn_monitor": None if summary is None else summary["knn_after"],
            "train_s": train_s, "eval_s": time.perf_counter() - t0, "reused": reused,
            "steps": None if summary is None else summary["steps"],
            "final_loss": None if summary is None or not summary["losses"] else summary["losses"][-1],
            "plateau": plateau(run_dir / "metrics.csv", cfg.queue_size, cfg.proj_dim) if relation_only else None,
        })
    rows = []
    for v in variants:
        rs = runs[v]
        rows.append({"variant": v, "what": VARIANTS[v].what, "epochs": epochs * VARIANTS[v].budget,
                     "overrides": variant_overrides(v, epochs, base_cfg.max_steps),
                     "knn_top1": summarize([r["knn_top1"] for r in rs]),
                     "linear_top1": summarize([r["linear_top1"] for r in rs]),
                     "train_s": summarize([r["train_s"] for r in rs]),
                     "plateau": None if rs[0]["plateau"] is None else {
                         "left": sum(r["plateau"]["left"] is not None for r in rs), "n": len(rs),
                         "steps": [r["plateau"]["left"] for r in rs]},
                     "runs": rs})
    by = {r["variant"]: r for r in rows}
    verdict = None
    if "ressl" in by and "moco-v2" in by:
        verdict = {m: by["ressl"][m]["mean"] >= by["moco-v2"][m]["mean"] for m in ("knn_top1", "linear_top1")}
    budget = (f"{epochs} epochs of `{config}`" if config else f"{epochs} epochs of the Config defaults") + (
        f" with {' '.join(overrides)}" if overrides else "")
    if base_cfg.max_steps:
        budget += f", at most {base_cfg.max_steps} steps"
    longer = [f"{v} x{VARIANTS[v].budget}" for v in variants if VARIANTS[v].budget != 1]
    if longer:
        budget += f" ({', '.join(longer)})"
    report = {"command": _command(config, overrides, epochs, out_dir, probe, probe_epochs, variants, seeds),
              "config": config, "overrides": overrides, "epochs": epochs, "max_steps": base_cfg.max_steps,
              "seeds": seeds, "budget": budget, "probe": rows[0]["runs"][0]["probe"] if rows else probe,
              "rows": rows, "ressl_ge_moco_v2": verdict, "wall_s": time.perf_counter() - t_all}
    table = format_table(report)
    atomic_write_json(out_dir / "learncheck.json", report)
    atomic_write_bytes(out_dir / "learncheck.md", table.encode())
    print(table)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--epochs", type=int, default=None,
                   help="the budget every variant trains for (default: the config's epochs; ressl-3x: 3x)")
    p.add_argument("--out-dir", default="runs/learncheck")
    p.add_argument("--probe", default="fast", choices=("fast", "full"),
                   help="linear probe of tools/eval.py (fast: cached features; full: the paper's protocol)")
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", default=None, help="comma list of seeds, each row trained for each "
                                                     "(default: the config's seed)")
    seeds.add_argument("--num-seeds", type=int, default=None, help="seeds 0 .. N-1 (make learn-check SEEDS=N)")
    p.add_argument("--reuse", action="store_true", help="evaluate runs already trained in --out-dir with the same "
                                                        "config (variant and seed) instead of retraining them")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every variant")
    a = p.parse_intermixed_args(argv)  # options may follow the overrides (make appends ARGS after data=)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"--variants: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                          f"known: {', '.join(VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise ConfigError(f"--variants names a variant twice: {a.variants!r}")
    seed_list = None
    if a.num_seeds is not None:
        if a.num_seeds < 1:
            raise ConfigError(f"--num-seeds (make SEEDS=) must be >= 1, got {a.num_seeds}")
        seed_list = list(range(a.num_seeds))
    elif a.seeds is not None:
        seed_list = parse_seeds(a.seeds)
    if seed_list is not None and any(o.split("=", 1)[0].strip() == "seed" for o in a.overrides):
        raise ConfigError("seed= in the overrides and --seeds / SEEDS= both given: use one")
    if a.epochs is None:
        a.epochs = load_config(a.config or None, a.overrides).epochs
    if a.epochs <= 0 or a.probe_epochs <= 0:
        raise ConfigError(f"--epochs and --probe-epochs must be > 0, got {a.epochs} and {a.probe_epochs}")
    return run(a.config or None, a.overrides, a.epochs, Path(a.out_dir), a.probe, a.probe_epochs, variants,
               reuse=a.reuse, seeds=seed_list)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_tool(main)
