"""Evaluate a ReSSL checkpoint: weighted kNN, linear probe (top-1/top-5) and a t-SNE picture.

    python tools/eval.py --ckpt runs/cifar10/last.pt                 # kNN + the paper's linear probe + t-SNE
    python tools/eval.py --ckpt runs/imagenet/last.pt --probe fast   # quick probe on cached features
    make eval CKPT=runs/demo/last.pt ARGS="--probe-epochs 30"

Data: the checkpoint's ``data`` directory (override with ``--data``), its train and val splits in any
layout ``make dataset`` writes (trees, ``.rec``, ``.beton``, or the source recorded in the manifest;
see ``pipelines/eval.py``), read at the recipe's weak-view size with its normalisation. The linear probe
``full`` (the default) is the paper's protocol: frozen backbone and BN, fresh random-resized-crop +
flip views every epoch, a Linear layer, SGD momentum 0.9, lr 0.3 per 256, cosine, 100 epochs; the final
and the best epoch are reported. ``fast`` trains on standardised features cached once (center crops):
a quick estimate, named as such in ``eval.json`` and the printed table. Results go to ``eval.json`` and
``tsne.png`` next to the checkpoint (``--out-dir``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.spec import RecipeError, resolve_recipe  # noqa: E402
from ressl.config import Config, ConfigError, run_tool  # noqa: E402
from ressl.eval import (  # noqa: E402
    extract_features,
    knn_accuracy,
    linear_probe,
    linear_probe_augmented,
    load_checkpoint,
    tsne_plot,
)
from ressl.io import atomic_write_json  # noqa: E402
from ressl.method import ReSSL  # noqa: E402

log = logging.getLogger("eval")

__all__ = ["PROBES", "load_model", "evaluate", "format_table", "main"]

Loader = Iterable[tuple[Tensor, Tensor]]

# Names of the probes in eval.json and the printed table.
PROBES = {"full": "full (paper: frozen backbone, augmented crops each epoch)",
          "fast": "fast (cached center-crop features, standardised)"}


def format_table(result: dict[str, Any]) -> str:
    """The figures of :func:`evaluate` as a small markdown table."""
    rows = [("kNN top-1", f"{result['knn_top1']:.2f}")]
    if "linear_top1" in result:
        rows += [(f"linear top-1, {result['probe']}", f"{result['linear_top1']:.2f}"),
                 ("linear top-5", f"{result['linear_top5']:.2f}")]
    if "linear_best_top1" in result:
        rows += [(f"linear top-1, best epoch ({result['linear_best_epoch']})", f"{result['linear_best_top1']:.2f}")]
    return "\n".join(["| metric | % |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def load_model(ckpt: str | os.PathLike, branch: str = "student") -> tuple[nn.Module, int, Config]:
    """Backbone of a trainer checkpoint (student by default, as the paper evaluates), its width, config."""
    state, cfg = load_checkpoint(ckpt)
    model = ReSSL.from_config(cfg)
    # checkpoints written before the cross-process shuffle counter existed: it plays no part in evaluation
    state.setdefault("_extra_state", {"shuffle_calls": 0})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{ckpt}: model weights do not match the config's model "
                         f"(backbone={cfg.backbone!r}, predictor={cfg.predictor}): {e}") from None
    backbone = model.eval_backbone() if branch == "student" else model.teacher.backbone
    return backbone, model.feat_dim, cfg


def evaluate(
    backbone: nn.Module,
    feat_dim: int,
    train_loader: Loader,
    val_loader: Loader,
    *,
    knn_k: int = 200,
    knn_t: float = 0.07,
    probe: str = "full",
    probe_epochs: int = 100,
    probe_lr: float = 0.3,
    probe_batch: int = 256,
    aug_train_loader: Loader | None = None,
    tsne_path: str | os.PathLike | None = None,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """kNN, linear probe and t-SNE of ``backbone`` on already-built loaders of ``(images, labels)``.

    Args:
        probe: "full" (the paper's protocol, needs ``aug_train_loader``), "fast" (cached features) or "none".
        aug_train_loader: training images with random-resized-crop + flip, for ``probe="full"``.
        tsne_path: PNG to write, or None for no picture.

    Returns:
        JSON-ready dict: ``knn_top1``; ``probe`` and ``linear_top1`` / ``linear_top5`` (final epoch) and
        ``linear_best_top1`` / ``linear_best_top5`` / ``linear_best_epoch`` (absent when skipped); sizes, timings.
    """
    if probe not in ("fast", "full", "none"):
        raise ValueError(f"probe must be 'fast', 'full' or 'none', got {probe!r}")
    if probe == "full" and aug_train_loader is None:
        raise ValueError("probe='full' needs aug_train_loader (training images with random crops and flips)")
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    train_raw, train_y = extract_features(backbone, train_loader, normalize=False)
    val_raw, val_y = extract_features(backbone, val_loader, normalize=False)
    out["features_s"] = time.perf_counter() - t0
    out["num_train"], out["num_val"] = len(train_y), len(val_y)
    num_classes = int(max(int(train_y.max()), int(val_y.max()))) + 1
    train_f = torch.nn.functional.normalize(train_raw, dim=1)
    val_f = torch.nn.functional.normalize(val_raw, dim=1)
    out["knn_top1"] = knn_accuracy(train_f, train_y, val_f, val_y, k=knn_k, t=knn_t, num_classes=num_classes)
    log.info("kNN (k=%d, t=%g) top-1: %.2f%%", knn_k, knn_t, out["knn_top1"])
    if probe != "none":
        t0 = time.perf_counter()
        if probe == "fast":
            acc = linear_probe(train_raw, train_y, val_raw, val_y, num_classes=num_classes, epochs=probe_epochs,
                               lr=probe_lr, batch_size=probe_batch)
        else:
            acc = linear_probe_augmented(backbone, aug_train_loader, val_loader, num_classes=num_classes,
                                         feat_dim=feat_dim, epochs=probe_epochs, lr=probe_lr,
                                         batch_size=probe_batch)
            out["linear_best_top1"], out["linear_best_top5"] = acc["best_top1"], acc["best_top5"]
            out["linear_best_epoch"] = acc["best_epoch"]
        out["probe"] = PROBES[probe]
        out["linear_top1"], out["linear_top5"] = acc["top1"], acc["top5"]
        out["linear_s"] = time.perf_counter() - t0
        log.info("linear probe (%s, %d epochs) top-1 %.2f%%, top-5 %.2f%%", PROBES[probe], probe_epochs,
                 acc["top1"], acc["top5"])
    if tsne_path is not None:
        out["tsne"] = str(tsne_plot(val_f, val_y, tsne_path, class_names=class_names))
    return out


def main(argv: list[str] | None = None, build_eval_loader: Callable[..., Loader] | None = None) -> dict[str, Any]:
    """Command line entry; ``build_eval_loader`` defaults to ``pipelines.eval.build_eval_loader``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="trainer checkpoint (runs/NAME/last.pt)")
    p.add_argument("--data", default=None, help="dataset directory with train/ and val/ (default: the run's)")
    p.add_argument("--train-split", default=None, help="labelled training split (default: train)")
    p.add_argument("--val-split", default="val")
    p.add_argument("--branch", default="student", choices=("student", "teacher"))
    p.add_argument("--probe", default="full", choices=("full", "fast", "none"),
                   help="full: the paper's protocol (default); fast: cached features; none")
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--probe-lr", type=float, default=0.3, help="per 256 images")
    p.add_argument("--probe-batch", type=int, default=256)
    p.add_argument("--knn-k", type=int, default=None, help="default: the run's knn_k")
    p.add_argument("--knn-t", type=float, default=None, help="default: the run's knn_t")
    p.add_argument("--batch-size", type=int, default=256, help="feature extraction batch")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-tsne", action="store_true")
    p.add_argument("--out-dir", default=None, help="where eval.json and tsne.png go (default: next to --ckpt)")
    args = p.parse_args(argv)
    for key in ("probe_epochs", "probe_batch", "batch_size"):
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be > 0, got {getattr(args, key)}")

    backbone, feat_dim, cfg = load_model(args.ckpt, args.branch)
    data = Path(args.data or cfg.data)
    train_split = args.train_split or ("train" if cfg.train_split == "unlabeled" else cfg.train_split)
    from pipelines.eval import eval_problem
    from pipelines.folder import train_classes

    problem = eval_problem(data, (train_split, args.val_split))
    if problem is not None:
        raise FileNotFoundError(f"kNN and the linear probe need labelled {train_split!r} and {args.val_split!r} "
                                f"splits (--data, --train-split, --val-split): {problem}")
    if build_eval_loader is None:
        from pipelines.eval import build_eval_loader
    device = torch.device(args.device)
    backbone.to(device)
    try:
        spec = resolve_recipe(cfg.recipe, cfg.recipe_overrides)  # the run's recipe, its overrides included
    except RecipeError as e:
        raise ConfigError(f"{args.ckpt}: {e}") from None
    kw = dict(size=spec.weak.size, mean=spec.mean, std=spec.std, batch_size=args.batch_size,
              num_workers=args.num_workers, device=device)
    train_loader = build_eval_loader(str(data), train_split, **kw)
    val_loader = build_eval_loader(str(data), args.val_split, **kw)
    aug = build_eval_loader(str(data), train_split, train_aug=True, **kw) if args.probe == "full" else None
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.ckpt).resolve().parent
    class_names = train_classes(data)  # the list every split's labels index into
    result = evaluate(
        backbone, feat_dim, train_loader, val_loader,
        knn_k=args.knn_k or cfg.knn_k, knn_t=args.knn_t or cfg.knn_t, probe=args.probe,
        probe_epochs=args.probe_epochs, probe_lr=args.probe_lr, probe_batch=args.probe_batch,
        aug_train_loader=aug, tsne_path=None if args.no_tsne else out_dir / "tsne.png", class_names=class_names,
    )
    result.update(ckpt=str(args.ckpt), branch=args.branch, backbone=cfg.backbone, data=str(data),
                  probe_epochs=args.probe_epochs)
    atomic_write_json(out_dir / "eval.json", result)
    print(format_table(result))
    log.info("wrote %s", out_dir / "eval.json")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_tool(main)
