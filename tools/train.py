"""Train ReSSL: one weak view for the EMA teacher, strong view(s) for the student, relation loss.

Launch (configs/*.yaml are flat Config presets; any key can be overridden as key=value):

    # one CPU or one GPU
    python tools/train.py --config configs/demo.yaml
    # one machine, 8 GPUs (bf16 autocast by default on GPU)
    accelerate launch --multi_gpu --num_processes 8 tools/train.py --config configs/imagenet.yaml
    # several nodes (run on each node, NODE_RANK = 0..N-1)
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank $NODE_RANK \
        --main_process_ip $MASTER_ADDR --main_process_port 29500 tools/train.py --config configs/imagenet.yaml
    # two processes on one CPU-only machine (gloo); plain --cpu starts only one process
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tools/train.py --config configs/demo.yaml

Outputs under runs/NAME/: metrics.csv, tb/ (TensorBoard), curves.png, last.pt (resumable checkpoint,
written atomically), summary.json. ``resume=auto`` (the default) continues a killed run from last.pt.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines import build_loader  # noqa: E402
from pipelines.eval import build_eval_loader, eval_problem  # noqa: E402
from pipelines.spec import get_recipe  # noqa: E402
from ressl.config import Config, load_config  # noqa: E402
from ressl.ema import momentum_at  # noqa: E402
from ressl.eval import extract_features, knn_accuracy  # noqa: E402
from ressl.io import atomic_open, atomic_write_json  # noqa: E402
from ressl.method import ReSSL, infonce_weight  # noqa: E402
from ressl.step import TrainStep, build_model, build_optimizer, resolve_precision  # noqa: E402

log = logging.getLogger("train")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf loss; the run stops before saving anything from that state."""


# ---------------------------------------------------------------------------------------------------
# helpers: schedule, checkpoint, kNN monitor, logs
# ---------------------------------------------------------------------------------------------------
def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up from ~0 to 1, then cosine to 0, as a function of the optimiser step."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temp file, fsync, rename): a kill at any moment leaves the old or the new file."""
    with atomic_open(path) as f:
        torch.save(state, f)


_KNN_OFF: set[str] = set()  # reasons already logged: the monitor says why it is off once per run


def knn_monitor(cfg: Config, backbone: torch.nn.Module, device: torch.device) -> float | None:
    """Weighted kNN top-1 (%) of backbone features: train split as memory bank, val split as queries, read
    from any layout ``make dataset`` writes (pipelines.eval). None, said once with the reason, when the
    data has no labelled split to use."""
    bank = "train" if cfg.train_split == "unlabeled" else cfg.train_split
    problem = eval_problem(cfg.data, (bank, "val"))
    if problem is not None:
        if problem not in _KNN_OFF:
            _KNN_OFF.add(problem)
            log.warning("kNN monitor off: %s", problem)
        return None
    spec = get_recipe(cfg.recipe)
    kw = dict(size=spec.weak.size, mean=spec.mean, std=spec.std, batch_size=256,
              num_workers=min(cfg.num_workers, 4), device=device)
    was_training = backbone.training
    backbone.eval()
    train_f, train_y = extract_features(backbone, build_eval_loader(cfg.data, bank, **kw))
    val_f, val_y = extract_features(backbone, build_eval_loader(cfg.data, "val", **kw))
    backbone.train(was_training)
    return knn_accuracy(train_f, train_y, val_f, val_y, k=cfg.knn_k, t=cfg.knn_t)


def plot_curves(csv_path: Path, png_path: Path) -> None:
    """Loss, lr, momentum and kNN accuracy against the step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    keys = [k for k in ("loss", "loss_rel", "loss_nce", "loss_sim", "key_std", "lr", "momentum", "knn_top1",
                        "images_per_s")
            if any(r.get(k) for r in rows)]
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, k in zip(axes.flat, keys):
        pts = [(int(r["step"]), float(r[k])) for r in rows if r.get(k)]
        ax.plot(*zip(*pts), marker="o" if k == "knn_top1" else None, markersize=3)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(png_path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


class RunLog:
    """CSV + TensorBoard rows, written by the main process only."""

    FIELDS = ["step", "epoch", "loss", "loss_rel", "loss_nce", "loss_sim", "key_std", "lr", "momentum",
              "infonce_weight", "images_per_s", "knn_top1"]

    def __init__(self, run_dir: Path, enabled: bool, resume: bool):
        self.enabled = enabled
        self.csv_path = run_dir / "metrics.csv"
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"))
        fresh = not (resume and self.csv_path.exists())
        self.f = open(self.csv_path, "w" if fresh else "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=self.FIELDS, extrasaction="ignore")
        if fresh:
            self.w.writeheader()

    def row(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        self.w.writerow({"step": step, **values})
        self.f.flush()
        for k, v in values.items():
            if k != "epoch" and v is not None:
                self.tb.add_scalar(f"train/{k}" if k != "knn_top1" else "eval/knn_top1", v, step)

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            self.tb.close()


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
def main(cfg: Config) -> dict[str, Any]:
    """Train with ``cfg``; returns the summary that is also written to runs/NAME/summary.json."""
    # --- accelerator + seeds --------------------------------------------------------------------------
    precision = resolve_precision(cfg.precision)  # auto: bf16 on CUDA, float32 on CPU
    # broadcast_buffers=False: DDP must not overwrite the queue and teacher buffers from rank 0 each step
    # (the queue is kept identical by the all-gather in push; BN buffers stay per-process as in the paper).
    accelerator = Accelerator(
        mixed_precision=precision, kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)]
    )
    cfg.check_world(accelerator.num_processes)
    set_seed(cfg.seed)  # same initial weights and queue on every process
    device = accelerator.device
    run_dir = Path(cfg.out_dir) / cfg.name
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        logging.getLogger().setLevel(logging.WARNING)  # one process speaks

    # --- data -----------------------------------------------------------------------------------------
    loader = build_loader(cfg, cfg.backend, split=cfg.train_split, device=device,
                          rank=accelerator.process_index, world_size=accelerator.num_processes)
    steps_per_epoch = len(loader)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    log.info("backend %s, %d batches of %d per process per epoch, %d processes, %d steps, precision %s",
             type(loader).__name__, steps_per_epoch, loader.batch_size, accelerator.num_processes, total_steps,
             precision)

    # --- model ----------------------------------------------------------------------------------------
    model = build_model(cfg, device)  # channels_last and compiled encoders as the config asks

    # --- optimiser + schedule ---------------------------------------------------------------------------
    optimizer = build_optimizer(model, cfg)  # SGD, lr = cfg.lr * batch_size / 256
    # stepped by hand once per optimiser step (accelerate.prepare would step it once per process)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_epochs * steps_per_epoch,
                                                                       total_steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    train_step = TrainStep(model, optimizer, accelerator, scheduler)  # the step tools/bench.py times too
    core: ReSSL = train_step.core

    # --- resume -----------------------------------------------------------------------------------------
    ckpt_path = run_dir / "last.pt"
    resume_from = None
    if cfg.resume == "auto" and ckpt_path.exists():
        resume_from = ckpt_path
    elif cfg.resume not in ("auto", "no"):
        resume_from = Path(cfg.resume)
        if not resume_from.is_file():
            raise FileNotFoundError(f"resume={cfg.resume!r}: no such checkpoint file")
    step, start_epoch, start_batch, history = 0, 0, 0, {"knn": []}
    if resume_from is not None:
        state = torch.load(resume_from, map_location="cpu", weights_only=True)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, start_epoch, start_batch = state["step"], state["epoch"], state["batch"]
        history = state.get("history", history)
        torch.set_rng_state(state["rng_cpu"])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, step, start_epoch, start_batch)

    def checkpoint(epoch: int, batch: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_checkpoint(ckpt_path, {
                "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch, "batch": batch,
                "history": history, "rng_cpu": torch.get_rng_state(), "config": cfg.to_dict(),
            })

    runlog = RunLog(run_dir, accelerator.is_main_process, resume=resume_from is not None)

    def monitor(tag: str) -> float | None:
        acc = None
        if accelerator.is_main_process:
            acc = knn_monitor(cfg, core.eval_backbone(), device)
            if acc is not None:
                log.info("kNN top-1 %s: %.2f%%", tag, acc)
                history["knn"].append((step, acc))
                runlog.row(step, knn_top1=acc)
        accelerator.wait_for_everyone()
        return acc

    if cfg.knn_before and resume_from is None:
        history["knn_before"] = monitor("before training")

    # --- loop -------------------------------------------------------------------------------------------
    losses: list[float] = []
    nonfinite = train_step.nonfinite  # on device, set in place by the step once a loss is NaN/inf
    images_per_step = cfg.batch_size * (1 + len(get_recipe(cfg.recipe).strong))
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, dynamic_ncols=True,
               unit="step")
    t_last, step_last, t_start, step_start = time.perf_counter(), step, time.perf_counter(), step
    model.train()
    epoch = start_epoch
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch, start_batch)
        for batch_idx, batch in enumerate(loader, start=start_batch):
            w_nce = infonce_weight(epoch + batch_idx / steps_per_epoch, cfg.warmup_infonce_epochs,
                                   cfg.infonce_blend_epochs)
            m = momentum_at(step, total_steps, cfg.momentum, cfg.momentum_schedule)
            # autocast forward, backward, SGD + lr step, zero_grad, EMA + enqueue; no host sync
            loss, metrics = train_step(batch.weak, batch.strong, momentum=m, infonce_weight=w_nce)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                # host sync: the only one per log_every steps (loss values + the non-finite flag)
                if nonfinite.item():
                    raise NonFiniteLossError(
                        f"loss became NaN/inf by step {step} (epoch {epoch}, lr {scheduler.get_last_lr()[0]:.4g}); "
                        "stopping without saving. Lower lr, check the data, or use precision=no.")
                now = time.perf_counter()
                ips = images_per_step * (step - step_last) / (now - t_last)
                t_last, step_last = now, step
                vals = {k: v.item() for k, v in metrics.items()}
                losses.append(vals["loss"])
                runlog.row(step, epoch=epoch, lr=scheduler.get_last_lr()[0], momentum=m, infonce_weight=w_nce,
                           images_per_s=ips, **vals)
                bar.set_postfix(loss=f"{vals['loss']:.4f}", m=f"{m:.4f}", lr=f"{scheduler.get_last_lr()[0]:.3g}",
                                img_s=f"{ips:.0f}")
            if step % cfg.ckpt_every == 0 and step < total_steps:
                if nonfinite.item():  # host sync; never save a state that has seen a NaN
                    raise NonFiniteLossError(f"loss became NaN/inf before step {step}; stopping without saving.")
                checkpoint(epoch, batch_idx + 1)
            if step >= total_steps:
                break
        start_batch = 0
        if step >= total_steps:
            break
        if cfg.knn_every and (epoch + 1) % cfg.knn_every == 0:
            monitor(f"after epoch {epoch + 1}")
    bar.close()
    elapsed = time.perf_counter() - t_start

    # --- save -------------------------------------------------------------------------------------------
    if nonfinite.item():
        raise NonFiniteLossError(f"loss became NaN/inf by step {step}; stopping without saving.")
    final_knn = monitor("after training")
    checkpoint(epoch + 1, 0)
    teacher_sum = torch.stack([p.detach().double().sum() for p in core.teacher.parameters()]).sum()
    teacher_sums = accelerator.gather(teacher_sum.reshape(1).to(device)).tolist()
    summary = {
        "name": cfg.name, "steps": step, "epochs": epoch + 1, "num_processes": accelerator.num_processes,
        "precision": precision, "backend": type(loader).__name__, "losses": losses,
        "knn_before": history.get("knn_before"), "knn_after": final_knn,
        "images_per_s": images_per_step * (step - step_start) / elapsed if step > step_start else None,
        "teacher_checksums": teacher_sums, "queue_ptr": int(core.queue.ptr),
        "bad_files": getattr(loader, "bad_files", 0),
    }
    if accelerator.is_main_process:
        runlog.close()
        plot_curves(runlog.csv_path, run_dir / "curves.png")
        atomic_write_json(run_dir / "summary.json", summary)
        kb = "n/a" if summary["knn_before"] is None else f"{summary['knn_before']:.2f}%"
        ka = "n/a" if final_knn is None else f"{final_knn:.2f}%"
        ips = summary["images_per_s"]
        print(f"done: {step} steps, kNN top-1 before {kb} -> after {ka}, "
              f"{'n/a' if ips is None else f'{ips:.0f}'} images/s; logs in {run_dir}")
    accelerator.end_training()
    return summary


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML preset in configs/ (default: the paper's ImageNet run)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of any config key")
    a = p.parse_args(argv)
    return load_config(a.config, a.overrides)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(parse_args())
