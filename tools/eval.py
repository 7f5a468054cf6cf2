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
a quick estimate, named as such in ``eval.json`` and the printed table.

Results go next to the checkpoint (``--out-dir``): ``eval.json`` keeps one entry per producer,
``"BRANCH/PROBE/stepN"`` (``student/fast/step1320``; ``.../sha256-PREFIX`` for a file without a step), each
with the checkpoint's step and the sha256 of its bytes; an evaluation adds or replaces only its own entry,
so ``--probe fast`` then ``--branch teacher --probe none`` keeps both. The t-SNE picture is
``tsne-BRANCH-stepN.png``. Bad options, an unusable ``--out-dir`` or an unreadable ``eval.json`` stop the tool
before any feature is extracted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import logging
import math
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
    Checkpoint,
    extract_features,
    knn_accuracy,
    linear_probe,
    linear_probe_augmented,
    read_checkpoint,
    tsne_plot,
)
from ressl.io import atomic_write_json, unwritable_reason  # noqa: E402
from ressl.method import ReSSL  # noqa: E402

log = logging.getLogger("eval")

__all__ = ["PROBES", "EVAL_SCHEMA", "result_key", "read_results", "record_result", "load_model", "evaluate",
           "format_table", "main"]

Loader = Iterable[tuple[Tensor, Tensor]]

# Names of the probes in eval.json and the printed table.
PROBES = {"full": "full (paper: frozen backbone, augmented crops each epoch)",
          "fast": "fast (cached center-crop features, standardised)"}

EVAL_SCHEMA = 2  # eval.json: {"schema": 2, "results": {key: record}}; 1 was one flat record, overwritten each time


def result_key(branch: str, probe: str, step: int | None, sha256: str) -> str:
    """The ``eval.json`` key of an evaluation: what produced it (branch, probe, checkpoint step).

    A checkpoint without a recorded step is named by its hash instead, never merged with another file's.
    """
    return f"{branch}/{probe}/" + (f"step{step}" if step is not None else f"sha256-{sha256[:12]}")


def read_results(path: Path) -> dict[str, Any]:
    """The ``eval.json`` at ``path`` as ``{"schema", "results"}`` ({} results when absent).

    A schema-1 file (one flat record from an earlier version) is kept as the entry
    ``BRANCH/PROBE/step-unrecorded``. Anything else is refused rather than overwritten.
    """
    if not path.exists():
        return {"schema": EVAL_SCHEMA, "results": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path} exists but cannot be read as JSON ({e}); it holds earlier results, so it is "
                          "not overwritten: move it away or pass --out-dir") from None
    if isinstance(data, dict) and isinstance(data.get("results"), dict):
        return {"schema": EVAL_SCHEMA, "results": data["results"]}
    if isinstance(data, dict) and "knn_top1" in data:  # schema 1
        probe = next((k for k, v in PROBES.items() if v == data.get("probe")), "none")
        return {"schema": EVAL_SCHEMA, "results": {f"{data.get('branch', 'student')}/{probe}/step-unrecorded": data}}
    raise ConfigError(f"{path} is not an eval.json of tools/eval.py (expected an object with 'results'); "
                      "it is not overwritten: move it away or pass --out-dir")


def record_result(path: Path, key: str, record: dict[str, Any]) -> dict[str, Any]:
    """Add or replace the entry ``key`` of ``eval.json``, keeping every other entry; returns the file's content.

    The file is re-read and rewritten (atomically) under an exclusive lock on its directory, so two
    evaluations finishing at once both keep their entries.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes, also if this process dies
        data = read_results(path)
        data["results"].pop(key, None)
        data["results"][key] = record  # the newest entry last
        atomic_write_json(path, data)
    finally:
        os.close(fd)
    return data


def format_table(result: dict[str, Any]) -> str:
    """The figures of :func:`evaluate` as a small markdown table."""
    knn = "kNN top-1" + (f" (k={result['knn_k']}, T={result['knn_t']:g})" if "knn_k" in result else "")
    rows = [(knn, f"{result['knn_top1']:.2f}")]
    if "linear_top1" in result:
        rows += [(f"linear top-1, {result['probe']}", f"{result['linear_top1']:.2f}"),
                 ("linear top-5", f"{result['linear_top5']:.2f}")]
    if "linear_best_top1" in result:
        rows += [(f"linear top-1, best epoch ({result['linear_best_epoch']})", f"{result['linear_best_top1']:.2f}")]
    return "\n".join(["| metric | % |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def load_model(ckpt: str | os.PathLike | Checkpoint, branch: str = "student") -> tuple[nn.Module, int, Config]:
    """Backbone of a trainer checkpoint (student by default, as the paper evaluates), its width, config."""
    loaded = ckpt if isinstance(ckpt, Checkpoint) else read_checkpoint(ckpt)
    state, cfg = loaded.model, loaded.config
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
    out["knn_k"], out["knn_t"] = knn_k, knn_t
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


def _check_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device expects cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device expects cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {text}: torch sees no CUDA device on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_out_dir(out_dir: Path) -> None:
    """An output directory that exists (or can be made) and is writable; refused before any work."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out-dir {str(out_dir)!r} is a file; expected a directory for eval.json and the "
                          "t-SNE picture")
    why = unwritable_reason(out_dir)
    if why:
        raise ConfigError(f"--out-dir {str(out_dir)!r} cannot be created or written: {why}")


def main(argv: list[str] | None = None, build_eval_loader: Callable[..., Loader] | None = None) -> dict[str, Any]:
    """Command line entry; ``build_eval_loader`` defaults to ``pipelines.eval.build_eval_loader``.

    Returns the record written to ``eval.json`` under its key (``record["key"]``).
    """
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
    p.add_argument("--knn-k", type=int, default=None,
                   help="neighbours, >= 1 (default: the run's knn_k; the value used is printed and saved)")
    p.add_argument("--knn-t", type=float, default=None, help="temperature, > 0 (default: the run's knn_t)")
    p.add_argument("--batch-size", type=int, default=256, help="feature extraction batch")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-tsne", action="store_true")
    p.add_argument("--out-dir", default=None,
                   help="where eval.json and the t-SNE picture go (default: next to --ckpt)")
    args = p.parse_args(argv)
    # --- every option checked before the checkpoint is read or a feature extracted -----------------------
    for key in ("probe_epochs", "probe_batch", "batch_size", "knn_k"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            hint = " (omit it to use the run's knn_k)" if key == "knn_k" else ""
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1{hint}, got {value}")
    for key in ("probe_lr", "knn_t"):
        value = getattr(args, key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--{key.replace('_', '-')} must be a finite number > 0, got {value}")
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")
    device = _check_device(args.device)
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.ckpt).resolve().parent
    _check_out_dir(out_dir)
    eval_json = out_dir / "eval.json"
    read_results(eval_json)  # an unreadable file is refused now, not after the work

    ckpt = read_checkpoint(args.ckpt)
    backbone, feat_dim, cfg = load_model(ckpt, args.branch)
    key = result_key(args.branch, args.probe, ckpt.step, ckpt.sha256)
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
    class_names = train_classes(data)  # the list every split's labels index into
    tsne = out_dir / f"tsne-{args.branch}-{key.rsplit('/', 1)[1]}.png"  # the probe plays no part in it
    log.info("evaluating %s (step %s, sha256 %s), %s branch, as %s", args.ckpt, ckpt.step, ckpt.sha256[:12],
             args.branch, key)
    result = evaluate(
        backbone, feat_dim, train_loader, val_loader,
        knn_k=cfg.knn_k if args.knn_k is None else args.knn_k, knn_t=cfg.knn_t if args.knn_t is None else args.knn_t,
        probe=args.probe, probe_epochs=args.probe_epochs, probe_lr=args.probe_lr, probe_batch=args.probe_batch,
        aug_train_loader=aug, tsne_path=None if args.no_tsne else tsne, class_names=class_names,
    )
    record = {"key": key, "ckpt": str(args.ckpt), "ckpt_sha256": ckpt.sha256, "step": ckpt.step,
              "branch": args.branch, **result, "backbone": cfg.backbone, "data": str(data),
              "train_split": train_split, "val_split": args.val_split,
              "probe_epochs": args.probe_epochs if args.probe != "none" else None,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    record_result(eval_json, key, record)
    print(f"{args.ckpt} (step {ckpt.step}, sha256 {ckpt.sha256[:12]}), {args.branch}:")
    print(format_table(record))
    log.info("wrote %s [%s]", eval_json, key)
    return record


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_tool(main)
