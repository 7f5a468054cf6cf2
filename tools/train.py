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
written atomically), summary.json. A run holds runs/NAME/.lock while it trains: a second run with the
same name is refused, naming the holder.

``resume=auto`` (the default) continues from runs/NAME/last.pt; ``resume=PATH`` from another checkpoint;
``resume=no`` starts over, and is refused where runs/NAME already holds outputs unless ``overwrite=true``
also says to move them to a dated sibling runs/NAME.replaced-YYYYmmdd-HHMMSS/ first. On resume the
checkpoint's config is compared with the current one: lr, weight decay, schedule length (``epochs`` /
``max_steps`` / ``warmup_epochs``), logging, checkpoint and kNN cadence, paths and speed options may
change and take effect; batch, model, queue, method, seed and recipe (overrides included) may not, and
the run is refused with the list of differences. The lr is a pure function of the step and the current
schedule: with a longer schedule, training continues at the lr the new schedule has at the resumed step
(the cosine is re-spread over the new total, as if the run had been planned that long). A finished run
re-run with the same command says so and exits without touching its outputs.

A collapse monitor reads the logged ``loss_rel`` and ``key_std``: it warns once when the relation loss
sits at log K with nearly identical teacher keys for a stretch of the run, and a run that ends with
collapsed keys says so in its last line and in summary.json. Exit status: 0 trained (or already
finished); 2 stopped with a message alone (a bad config, data or path, a NaN/inf loss, a full disk);
3 trained to the end but collapsed (outputs written); 1 anything else (a bug: with a traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import broadcast_object_list, set_seed
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines import build_loader  # noqa: E402
from pipelines.eval import build_eval_loader, eval_problem  # noqa: E402
from pipelines.spec import RecipeError, RecipeSpec, resolve_recipe  # noqa: E402
from ressl.config import Config, ConfigError, RunError, load_config, resume_changes, run_tool  # noqa: E402
from ressl.eval import extract_features, knn_accuracy, load_checkpoint  # noqa: E402
from ressl.io import atomic_write_json, remove_stale_temps  # noqa: E402
from ressl.method import ReSSL  # noqa: E402
from ressl.monitor import CollapseMonitor  # noqa: E402
from ressl.run import (  # noqa: E402
    NonFiniteLossError,
    RunLock,
    RunLog,
    load_optimizer_state,
    move_run_aside,
    plot_curves,
    run_outputs,
    save_checkpoint,
)
from ressl.schedule import Schedule  # noqa: E402
from ressl.step import TrainStep, build_model, build_optimizer, resolve_precision  # noqa: E402

log = logging.getLogger("train")

# metrics.csv columns drawn in curves.png, in panel order
CURVES = ("loss", "loss_rel", "loss_nce", "loss_sim", "key_std", "lr", "momentum", "knn_top1", "images_per_s")
# what a checkpoint must hold to be resumed (every checkpoint this tool writes has all of it)
RESUME_KEYS = ("model", "optimizer", "step", "epoch", "batch", "rng_cpu", "config")
# exit status of a run that trained to the end with collapsed embeddings (0 trained, 2 stopped with a message)
EXIT_COLLAPSED = 3


# ---------------------------------------------------------------------------------------------------
# kNN monitor
# ---------------------------------------------------------------------------------------------------
_KNN_OFF: set[str] = set()  # reasons already logged: the monitor says why it is off once per run


def knn_monitor(cfg: Config, spec: RecipeSpec, backbone: torch.nn.Module, device: torch.device) -> float | None:
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
    kw = dict(size=spec.weak.size, mean=spec.mean, std=spec.std, batch_size=256,
              num_workers=min(cfg.num_workers, 4), device=device)
    was_training = backbone.training
    backbone.eval()
    train_f, train_y = extract_features(backbone, build_eval_loader(cfg.data, bank, **kw))
    val_f, val_y = extract_features(backbone, build_eval_loader(cfg.data, "val", **kw))
    backbone.train(was_training)
    return knn_accuracy(train_f, train_y, val_f, val_y, k=cfg.knn_k, t=cfg.knn_t)


# ---------------------------------------------------------------------------------------------------
# helpers: recipe, run directory, resume, NaN advice
# ---------------------------------------------------------------------------------------------------
def resolve_spec(cfg: Config) -> RecipeSpec:
    """The run's recipe (preset + ``recipe.*`` overrides), looked up once; a bad one is a ConfigError."""
    try:
        return resolve_recipe(cfg.recipe, cfg.recipe_overrides)
    except RecipeError as e:
        raise ConfigError(str(e)) from None


def check_view_memory(cfg: Config, spec: RecipeSpec, device: torch.device, num_processes: int) -> None:
    """Refuse views whose input batch alone would take over 1/8 of the device's memory: a typo such as
    ``recipe.weak.size=100000`` (120 GB per float32 view) otherwise decodes and resizes for hours, or
    until memory runs out, before the first step could fail. Real recipes are far below the bound
    (ImageNet at 224 px: 1.2 MB per image and view)."""
    import psutil

    per_process = cfg.batch_size // num_processes
    need = per_process * sum(3 * v.size**2 * 4 for v in spec.views)  # float32 views of one batch
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else psutil.virtual_memory().total)
    if need > total / 8:
        sizes = ", ".join(f"recipe.{v.name}.size={v.size}" for v in spec.views)
        raise ConfigError(f"views too large: {sizes} at {per_process} images per process take {need / 1e9:.1f} GB "
                          f"as float32 input alone, over 1/8 of the {total / 1e9:.1f} GB of {device.type} memory "
                          "(the networks' activations need many times more); lower the view sizes (the paper's "
                          "largest view is 224 px)")


def prepare_run_dir(cfg: Config, run_dir: Path, is_main: bool) -> list[str]:
    """Check that ``run_dir`` can be used, create it (main process); returns the earlier outputs that a
    fresh start with ``overwrite=true`` moves aside. A fresh start over outputs without it is refused."""
    earlier = run_outputs(run_dir) if cfg.resume == "no" and run_dir.is_dir() else []
    if earlier and not cfg.overwrite:
        summary = run_dir / "summary.json"
        finished = ""
        if summary.is_file():
            with contextlib.suppress(ValueError, OSError):
                finished = f"; a finished run of {json.loads(summary.read_text()).get('steps')} steps"
        raise ConfigError(
            f"run {cfg.name!r} already has outputs in {run_dir} ({', '.join(earlier)}{finished}): resume=no would "
            f"replace some and leave the others stale. Start fresh under another name (name={cfg.name}-2), or add "
            f"overwrite=true to move the old outputs to {run_dir}.replaced-<date>/ first, or drop resume=no to "
            "continue the run")
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"out_dir={cfg.out_dir!r}, name={cfg.name!r}: cannot create the run directory "
                              f"{run_dir}: {e.strerror or e}") from None
    return earlier


def find_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint this run resumes from, or None for a fresh start."""
    if cfg.resume == "no":
        return None
    if cfg.resume == "auto":
        path = run_dir / "last.pt"
        return path if path.exists() else None
    path = Path(cfg.resume)
    if not path.is_file():
        raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint file (use auto, no, or a last.pt path)")
    return path


def read_resume_state(path: Path) -> dict[str, Any]:
    """The checkpoint to resume from, read with ``weights_only=True``. A file that is not one is a
    ConfigError that says what it is, in the words of ``ressl.eval.load_checkpoint`` (tools/eval.py's
    reader), which is asked only when the file fails here."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - the reader below re-reads the file and says what it is
        load_checkpoint(path)
        raise
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        names = ", ".join(repr(k) for k in list(state)[:3])
        raise ConfigError(f"{path} is not a trainer checkpoint: it is a bare state_dict of {len(state)} tensors "
                          f"({names}, ...), weights only (as tools/export.py or torchvision write them), without "
                          "the optimiser, step and config a run resumes from; start this run with resume=no")
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        load_checkpoint(path)  # not a trainer checkpoint at all: its message says what the file holds
        raise ConfigError(f"{path} is a trainer checkpoint without {missing}, which resuming needs")
    return state


def check_resume_config(state: dict[str, Any], cfg: Config, path: Path) -> None:
    """Refuse a resume whose config differs in a key that cannot change; log the changes that apply."""
    applied, refused = resume_changes(state.get("config", {}), cfg)
    if refused:
        lines = "\n  ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in refused.items())
        raise ConfigError(f"cannot resume {path}: these keys differ from the checkpoint's config and cannot change "
                          f"mid-run:\n  {lines}\nPut them back, or start a new run (another name=, or resume=no).")
    for k, (old, new) in applied.items():
        log.info("resume: %s changed %r -> %r (applied)", k, old, new)


def command_for(cfg: Config, num_processes: int, **changes: Any) -> str:
    """A shell command that runs ``cfg`` with ``changes`` (every key spelled out: no config file needed)."""
    args = [a for a in cfg.to_overrides() if a.split("=", 1)[0] not in changes]
    args += [f"{k}={v}" for k, v in changes.items()]
    tool = os.path.relpath(Path(__file__).resolve())
    launch = ["python", tool] if num_processes == 1 else ["accelerate", "launch", "--num_processes",
                                                          str(num_processes), tool]
    return shlex.join(launch + args)


def nan_message(cfg: Config, step: int, epoch: int, lr_now: float, ckpt: Path, num_processes: int) -> str:
    """Why the run stopped, and commands that work: resume the last good checkpoint with half the lr, or
    start over under a new name."""
    lr = cfg.lr / 2
    head = (f"loss became NaN/inf by step {step} (epoch {epoch}, lr {lr_now:.4g}); stopping without saving. "
            f"Check the data, or use precision=no if this was a reduced-precision run, or lower the lr:\n")
    fresh = command_for(cfg, num_processes, lr=lr, name=f"{cfg.name}-lr{lr:g}", resume="no")
    if ckpt.exists():
        good = torch.load(ckpt, map_location="cpu", weights_only=True)["step"]
        return (head + f"  resume the last good checkpoint ({ckpt}, step {good}) with half the lr:\n    "
                + command_for(cfg, num_processes, lr=lr, resume=str(ckpt)) + f"\n  or start over:\n    {fresh}")
    return head + f"  no checkpoint was written yet; start over with half the lr:\n    {fresh}"


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
def main(cfg: Config) -> dict[str, Any]:
    """Train with ``cfg``; returns the summary that is also written to runs/NAME/summary.json."""
    spec = resolve_spec(cfg)  # before any work: an unknown view or a bad value fails here
    if cfg.recipe_overrides:
        changes = ", ".join(f"recipe.{k}={v!r}" for k, v in cfg.recipe_overrides.items())
        log.info("recipe %s with %s", cfg.recipe, changes)
    # --- accelerator + seeds --------------------------------------------------------------------------
    precision = resolve_precision(cfg.precision)  # auto: bf16 on CUDA, float32 on CPU
    # broadcast_buffers=False: DDP must not overwrite the queue and teacher buffers from rank 0 each step
    # (the queue is kept identical by the all-gather in push; BN buffers stay per-process as in the paper).
    accelerator = Accelerator(
        mixed_precision=precision, kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)]
    )
    cfg.check_world(accelerator.num_processes)
    check_view_memory(cfg, spec, accelerator.device, accelerator.num_processes)
    run_dir = Path(cfg.out_dir) / cfg.name
    earlier = prepare_run_dir(cfg, run_dir, accelerator.is_main_process)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one process speaks
    # the main process holds the run directory until the end (released on any exit, dropped by the
    # kernel if the process is killed)
    with RunLock(run_dir) if accelerator.is_main_process else contextlib.nullcontext():
        if earlier and accelerator.is_main_process:  # resume=no overwrite=true, under the lock
            log.warning("overwrite=true: moved the earlier outputs of %s to %s", run_dir, move_run_aside(run_dir))
        accelerator.wait_for_everyone()
        return _train(cfg, spec, accelerator, precision, run_dir)


def _train(cfg: Config, spec: RecipeSpec, accelerator: Accelerator, precision: str, run_dir: Path) -> dict[str, Any]:
    set_seed(cfg.seed)  # same initial weights and queue on every process
    device = accelerator.device
    if accelerator.is_main_process:
        for p in remove_stale_temps(run_dir):  # e.g. the temp file of a checkpoint save that was killed
            log.info("removed %s, left by an interrupted run", p)

    # --- resume: read and check the checkpoint before any work -------------------------------------------
    ckpt_path = run_dir / "last.pt"
    resume_from = find_checkpoint(cfg, run_dir)
    state: dict[str, Any] = {}
    if resume_from is not None:
        state = read_resume_state(resume_from)
        check_resume_config(state, cfg, resume_from)

    # --- data -----------------------------------------------------------------------------------------
    try:
        loader = build_loader(cfg, cfg.backend, split=cfg.train_split, device=device,
                              rank=accelerator.process_index, world_size=accelerator.num_processes, spec=spec)
    except ValueError as e:  # the data does not fit the config (too few readable samples for the batch, ...)
        raise ConfigError(f"data={cfg.data!r}: {e}") from None
    steps_per_epoch = len(loader)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    if state and state["step"] >= total_steps:  # finished: say so, leave every output as it is
        summary_path = run_dir / "summary.json"
        done = (json.loads(summary_path.read_text()) if summary_path.is_file()
                else {"name": cfg.name, "steps": state["step"]})
        if accelerator.is_main_process:
            print(f"run {cfg.name!r} is already finished ({state['step']} of {total_steps} steps; {run_dir}). "
                  "Raise epochs= or max_steps= to train longer, or start over under another name= (or with "
                  "resume=no overwrite=true, which moves this run aside).")
        accelerator.end_training()
        return done
    log.info("backend %s, %d batches of %d per process per epoch, %d processes, %d steps, precision %s",
             type(loader).__name__, steps_per_epoch, loader.batch_size, accelerator.num_processes, total_steps,
             precision)

    # --- model ----------------------------------------------------------------------------------------
    model = build_model(cfg, device)  # channels_last and compiled encoders as the config asks

    # --- optimiser + schedule ---------------------------------------------------------------------------
    optimizer = build_optimizer(model, cfg)  # SGD, peak lr = cfg.lr * batch_size / 256
    schedule = Schedule.from_config(cfg, steps_per_epoch, total_steps)  # lr, EMA momentum, InfoNCE weight
    model, optimizer = accelerator.prepare(model, optimizer)
    train_step = TrainStep(model, optimizer, accelerator)  # the step tools/bench.py times too
    core: ReSSL = train_step.core

    step, start_epoch, start_batch, history = 0, 0, 0, {"knn": []}
    if state:
        core.load_state_dict(state["model"])
        # momentum buffers from the checkpoint; lr, weight decay and the schedule from the current config
        load_optimizer_state(optimizer, state["optimizer"])
        step, start_epoch, start_batch = state["step"], state["epoch"], state["batch"]
        history = state.get("history", history)
        torch.set_rng_state(state["rng_cpu"])
        log.info("resumed from %s at step %d (epoch %d, batch %d), lr %.4g", resume_from, step, start_epoch,
                 start_batch, schedule.lr(step))

    def checkpoint(epoch: int, batch: int) -> None:
        if batch >= steps_per_epoch:  # the epoch is complete: resume at the start of the next one
            epoch, batch = epoch + 1, 0
        accelerator.wait_for_everyone()
        history["collapse"] = collapse.state_dict()
        if accelerator.is_main_process:
            try:
                save_checkpoint(ckpt_path, {
                    "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "epoch": epoch, "batch": batch,
                    "history": history, "rng_cpu": torch.get_rng_state(), "config": cfg.to_dict(),
                    "log_rows": runlog.rows,
                })
            except RunError:  # e.g. a full disk: the message goes on its own line, after the progress bar's
                bar.close()
                raise

    runlog = RunLog(run_dir, accelerator.is_main_process, resume_step=step if state else None,
                    keep_rows=state.get("log_rows"))
    collapse = CollapseMonitor(cfg.queue_size, cfg.proj_dim, total_steps, cfg.log_every, cfg.warmup_infonce_epochs)
    collapse.load_state_dict(history.get("collapse"))

    def monitor(tag: str) -> float | None:
        acc = None
        if accelerator.is_main_process:
            acc = knn_monitor(cfg, spec, core.eval_backbone(), device)
            if acc is not None:
                log.info("kNN top-1 %s: %.2f%%", tag, acc)
                history["knn"].append((step, acc))
                runlog.row(step, knn_top1=acc)
        accelerator.wait_for_everyone()
        return acc

    def nonfinite_error() -> NonFiniteLossError:
        bar.close()  # the message goes on its own line, after the progress bar's
        return NonFiniteLossError(nan_message(cfg, step, epoch, schedule.lr(step), ckpt_path,
                                              accelerator.num_processes))

    if cfg.knn_before and not state:
        history["knn_before"] = monitor("before training")

    # --- loop -------------------------------------------------------------------------------------------
    losses: list[float] = []
    nonfinite = train_step.nonfinite  # on device, set in place by the step once a loss is NaN/inf
    images_per_step = cfg.batch_size * (1 + len(spec.strong))
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, dynamic_ncols=True,
               unit="step")
    t_last, step_last, t_start, step_start = time.perf_counter(), step, time.perf_counter(), step
    model.train()
    epoch, position = start_epoch, (start_epoch, start_batch)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch, start_batch)
        for batch_idx, batch in enumerate(loader, start=start_batch):
            w_nce = schedule.infonce(epoch, batch_idx)
            m = schedule.ema_momentum(step)
            # autocast forward, backward, SGD step, zero_grad, EMA + enqueue; no host sync
            loss, metrics = train_step(batch.weak, batch.strong, lr=schedule.lr(step), momentum=m,
                                       infonce_weight=w_nce)
            step += 1
            position = (epoch, batch_idx + 1)
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                # host sync: the only one per log_every steps (loss values + the non-finite flag)
                if nonfinite.item():
                    raise nonfinite_error()
                now = time.perf_counter()
                ips = images_per_step * (step - step_last) / (now - t_last)
                t_last, step_last = now, step
                vals = {k: v.item() for k, v in metrics.items()}
                losses.append(vals["loss"])
                runlog.row(step, epoch=epoch, lr=schedule.lr(step), momentum=m, infonce_weight=w_nce,
                           images_per_s=ips, **vals)
                warning = collapse.observe(step, vals["loss_rel"], vals["key_std"], w_nce,
                                           relation_trained=cfg.w_rel > 0)
                if warning and accelerator.is_main_process:
                    log.warning(warning)
                bar.set_postfix(loss=f"{vals['loss']:.4f}", m=f"{m:.4f}", lr=f"{schedule.lr(step):.3g}",
                                img_s=f"{ips:.0f}")
            if step % cfg.ckpt_every == 0 and step < total_steps:
                if nonfinite.item():  # host sync; never save a state that has seen a NaN
                    raise nonfinite_error()
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
        raise nonfinite_error()
    final_knn = monitor("after training")
    checkpoint(*position)  # where a longer schedule would continue
    teacher_sum = torch.stack([p.detach().double().sum() for p in core.teacher.parameters()]).sum()
    teacher_sums = accelerator.gather(teacher_sum.reshape(1).to(device)).tolist()
    verdict = [collapse.verdict()]
    broadcast_object_list(verdict)  # every process ends with the main process's verdict (and exit status)
    summary = {
        "name": cfg.name, "steps": step, "epochs": epoch + 1, "num_processes": accelerator.num_processes,
        "precision": precision, "backend": type(loader).__name__, "losses": losses,
        "knn_before": history.get("knn_before"), "knn_after": final_knn,
        "images_per_s": images_per_step * (step - step_start) / elapsed if step > step_start else None,
        "teacher_checksums": teacher_sums, "queue_ptr": int(core.queue.ptr),
        "bad_files": getattr(loader, "bad_files", 0),
        "collapsed": verdict[0]["collapsed"], "collapse": verdict[0],
        "recipe": cfg.recipe, "recipe_overrides": cfg.recipe_overrides, "config": cfg.to_dict(),
    }
    if accelerator.is_main_process:
        runlog.close()
        plot_curves(runlog.csv_path, run_dir / "curves.png", CURVES)
        atomic_write_json(run_dir / "summary.json", summary)
        kb = "n/a" if summary["knn_before"] is None else f"{summary['knn_before']:.2f}%"
        ka = "n/a" if final_knn is None else f"{final_knn:.2f}%"
        ips = summary["images_per_s"]
        figures = (f"{step} steps, kNN top-1 before {kb} -> after {ka}, "
                   f"{'n/a' if ips is None else f'{ips:.0f}'} images/s; logs in {run_dir}")
        if summary["collapsed"]:
            print(f"COLLAPSED: {figures}. {verdict[0]['message']}; summary.json has \"collapsed\": true "
                  f"(exit status {EXIT_COLLAPSED})")
        else:
            plateau = verdict[0]["plateau"]
            note = "" if plateau is None else (
                f" (the relation loss sat at log K with collapsed keys from step {plateau['from_step']} to "
                f"{plateau['to_step']}: see the warning and summary.json's \"collapse\")")
            print(f"done: {figures}{note}")
    accelerator.end_training()
    return summary


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML preset in configs/ (default: the paper's ImageNet run)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of any config key")
    a = p.parse_args(argv)
    return load_config(a.config, a.overrides)


def exit_status(summary: dict[str, Any]) -> int:
    """0 for a run that trained (or was already finished), EXIT_COLLAPSED for one that ended collapsed."""
    return EXIT_COLLAPSED if summary.get("collapsed") else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(exit_status(run_tool(lambda: main(parse_args()))))
