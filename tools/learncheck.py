"""Does it learn? Random init vs MoCo v2 vs ReSSL vs TPAMI vs seed-004 at one budget, same seed.

    python tools/learncheck.py                                   # demo data, configs/demo.yaml, its epochs
    python tools/learncheck.py --epochs 4 --out-dir runs/lc4 batch_size=32
    make learn-check [ARGS="--epochs 4"]

Each variant is a ``tools/train.py`` run (its ``main``, nothing re-implemented) of the same config with
the same seed and budget, changed only by the keys below; each checkpoint is then evaluated by
``tools/eval.py`` (weighted kNN, the same code as the training monitor, and a linear probe). The
random-init row evaluates the model as ``ressl.step.build_model`` creates it under the run's seed.
Writes ``learncheck.json`` and ``learncheck.md`` (a markdown table) to ``--out-dir``.

Variants (MoCo v2 in this code is the InfoNCE loss of the TPAMI warm-up for every epoch: positive the
teacher key, negatives the queue, tau = ``infonce_tau``):
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import eval as eval_tool  # noqa: E402  (tools/eval.py)
import train  # noqa: E402  (tools/train.py)

from ressl.config import Config, load_config  # noqa: E402
from ressl.io import atomic_open, atomic_write_bytes, atomic_write_json  # noqa: E402
from ressl.step import build_model  # noqa: E402

log = logging.getLogger("learncheck")

__all__ = ["VARIANTS", "variant_overrides", "run", "main"]

# name -> (what it is, config keys on top of the base config); "{epochs}" is the budget.
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "random-init": ("no training: the initial backbone", {}),
    "moco-v2": ("InfoNCE every epoch", {"warmup_infonce_epochs": "{epochs}", "infonce_blend_epochs": "0",
                                        "predictor": "false", "w_sim": "0"}),
    "ressl": ("relation loss only (NeurIPS 2021)", {"warmup_infonce_epochs": "0", "infonce_blend_epochs": "0",
                                                    "predictor": "false", "w_sim": "0"}),
    "tpami": ("predictor + InfoNCE warm-up, then relation", {"predictor": "true", "w_sim": "0"}),
    "seed-004": ("relation + instance term 2 - 2cos(p, k)", {"warmup_infonce_epochs": "0",
                                                             "infonce_blend_epochs": "0", "predictor": "true",
                                                             "w_sim": "1"}),
    # the run `make train` makes (demo: relation loss after a 4+2-epoch InfoNCE warm-up, no predictor)
    "as-configured": ("the config unchanged", {}),
}
__doc__ += "".join(f"\n    {n:12s} {what}: {' '.join(f'{k}={v}' for k, v in kv.items()) or '-'}"
                   for n, (what, kv) in VARIANTS.items()) + "\n"


def variant_overrides(name: str, epochs: int) -> list[str]:
    """``key=value`` overrides of variant ``name`` at a budget of ``epochs``."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known: {list(VARIANTS)}")
    return [f"{k}={v.format(epochs=epochs)}" for k, v in VARIANTS[name][1].items()]


def _random_init_checkpoint(cfg: Config, path: Path) -> None:
    """A checkpoint of the untrained model (same seed as the runs), in the trainer's format."""
    set_seed(cfg.seed)
    model = build_model(cfg, "cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, f)


def format_table(rows: list[dict[str, Any]], budget: str, probe: str) -> str:
    lines = [f"Budget: {budget}; same seed for every row; linear probe: {probe}.", "",
             "| variant | what | kNN top-1 | linear top-1 | train minutes |", "|---|---|---|---|---|"]
    for r in rows:
        mins = "—" if r["minutes"] is None else f"{r['minutes']:.1f}"
        lines.append(f"| {r['variant']} | {r['what']} | {r['knn_top1']:.2f} | {r['linear_top1']:.2f} | {mins} |")
    return "\n".join(lines) + "\n"


def run(config: str | None, overrides: list[str], epochs: int, out_dir: Path, probe: str = "fast",
        probe_epochs: int = 100, variants: list[str] | None = None, eval_args: list[str] | None = None,
        reuse: bool = False) -> dict[str, Any]:
    """Train and evaluate every variant; returns (and writes) the JSON report.

    With ``reuse``, a variant whose run in ``out_dir`` finished with the same config is evaluated
    without training it again (so variants can be trained by separate processes, then tabled at once).
    """
    variants = variants or list(VARIANTS)
    for v in variants:
        variant_overrides(v, epochs)  # unknown names fail before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    base = [*overrides, f"epochs={epochs}", f"out_dir={out_dir}", "resume=no"]
    rows = []
    for v in variants:
        cfg = load_config(config, [*base, *variant_overrides(v, epochs), f"name={v}"])
        ckpt = out_dir / v / "last.pt"
        t0, summary, minutes = time.perf_counter(), None, None
        done = out_dir / v / "learncheck_run.json"
        previous = json.loads(done.read_text()) if reuse and done.is_file() else None
        if v == "random-init":
            _random_init_checkpoint(cfg, ckpt)
        elif previous is not None and previous["config"] == cfg.to_dict():
            log.info("learn-check: %s already trained with this config (%s), evaluating it", v, done)
            summary, minutes = previous["summary"], previous["minutes"]
        else:
            log.info("learn-check: training %s (%s)", v, " ".join(variant_overrides(v, epochs)))
            summary = train.main(cfg)
            minutes = (time.perf_counter() - t0) / 60
            atomic_write_json(done, {"config": cfg.to_dict(), "summary": summary, "minutes": minutes})
        res = eval_tool.main(["--ckpt", str(ckpt), "--probe", probe, "--probe-epochs", str(probe_epochs),
                              "--no-tsne", "--num-workers", str(min(cfg.num_workers, 2)), *(eval_args or [])])
        rows.append({"variant": v, "what": VARIANTS[v][0], "overrides": variant_overrides(v, epochs),
                     "knn_top1": res["knn_top1"], "linear_top1": res["linear_top1"], "probe": res["probe"],
                     "knn_monitor": None if summary is None else summary["knn_after"], "minutes": minutes,
                     "steps": None if summary is None else summary["steps"],
                     "final_loss": None if summary is None or not summary["losses"] else summary["losses"][-1]})
    by = {r["variant"]: r for r in rows}
    verdict = None
    if "ressl" in by and "moco-v2" in by:
        verdict = {metric: by["ressl"][metric] >= by["moco-v2"][metric] for metric in ("knn_top1", "linear_top1")}
    budget = f"{epochs} epochs of `{config}`" + (f" with {' '.join(overrides)}" if overrides else "")
    report = {"config": config, "overrides": overrides, "epochs": epochs, "budget": budget, "rows": rows,
              "ressl_ge_moco_v2": verdict}
    table = format_table(rows, budget, rows[0]["probe"] if rows else probe)
    if verdict is not None:
        table += (f"\nReSSL >= MoCo v2 at this budget: kNN {'yes' if verdict['knn_top1'] else 'no'}, "
                  f"linear {'yes' if verdict['linear_top1'] else 'no'}.\n")
    atomic_write_json(out_dir / "learncheck.json", report)
    atomic_write_bytes(out_dir / "learncheck.md", table.encode())
    print(table)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--epochs", type=int, default=None,
                   help="the one budget every variant trains for (default: the config's epochs)")
    p.add_argument("--out-dir", default="runs/learncheck")
    p.add_argument("--probe", default="fast", choices=("fast", "full"),
                   help="linear probe of tools/eval.py (fast: cached features; full: the paper's protocol)")
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    p.add_argument("--reuse", action="store_true",
                   help="evaluate variants already trained in --out-dir with the same config instead of retraining")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every variant")
    a = p.parse_args(argv)
    if a.epochs is None:
        a.epochs = load_config(a.config or None, a.overrides).epochs
    if a.epochs <= 0 or a.probe_epochs <= 0:
        p.error(f"--epochs and --probe-epochs must be > 0, got {a.epochs} and {a.probe_epochs}")
    return run(a.config or None, a.overrides, a.epochs, Path(a.out_dir), a.probe, a.probe_epochs,
               [v for v in a.variants.split(",") if v], reuse=a.reuse)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
