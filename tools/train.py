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
from ressl.config import Config, ConfigError, load_config, resume_changes, run_tool  # noqa: E402
from ressl.eval import extract_features, knn_accuracy  # noqa: E402
from ressl.method import ReSSL  # noqa: E402
from ressl.monitor import CollapseMonitor  # noqa: E402
from ressl.run import (  # noqa: E402
    NonFiniteLossError,
    check_resume_config,
    find_checkpoint,
    finish_run,
    load_optimizer_state,
    open_run,
    parse_cli,
    read_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from ressl.runlog import RunLog  # noqa: E402
from ressl.schedule import Schedule  # noqa: E402
from ressl.step import TrainStep, build_optimizer, build_ressl, resolve_precision  # noqa: E402

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
# checks before any work, NaN advice
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


def knn_row(cfg: Config, spec: RecipeSpec, core: ReSSL, accelerator: Accelerator, runlog: RunLog,
            history: dict[str, Any], step: int, tag: str) -> float | None:
    """Run the kNN monitor on the main process, log it (message, metrics.csv row, ``history["knn"]``),
    then wait for every process; returns the accuracy (None elsewhere, or when the monitor is off)."""
    acc = None
    if accelerator.is_main_process:
        acc = knn_monitor(cfg, spec, core.eval_backbone(), accelerator.device)
        if acc is not None:
            log.info("kNN top-1 %s: %.2f%%", tag, acc)
            history["knn"].append((step, acc))
            runlog.row(step, knn_top1=acc)
    accelerator.wait_for_everyone()
    return acc


def save_run(accelerator: Accelerator, path: Path, cfg: Config, core: ReSSL, optimizer: torch.optim.Optimizer,
             step: int, position: tuple[int, int], history: dict[str, Any], log_rows: int) -> None:
    """Write ``last.pt`` once every process has arrived (main process): the model, the optimiser, where the
    loader continues (``position`` = epoch, batches done in it), the RNG state and the config."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        epoch, batch = position
        save_checkpoint(path, {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                               "epoch": epoch, "batch": batch, "history": history, **rng_state(),
                               "config": cfg.to_dict(), "log_rows": log_rows})


def finished_run(cfg: Config, state: dict[str, Any], total_steps: int, run_dir: Path, is_main: bool
                 ) -> dict[str, Any]:
    """A run re-run after its last step: say so, leave every output as it is, return its summary."""
    summary_path = run_dir / "summary.json"
    done = (json.loads(summary_path.read_text()) if summary_path.is_file()
            else {"name": cfg.name, "steps": state["step"]})
    if is_main:
        print(f"run {cfg.name!r} is already finished ({state['step']} of {total_steps} steps; {run_dir}). "
              "Raise epochs= or max_steps= to train longer, or start over under another name= (or with "
              "resume=no overwrite=true, which moves this run aside).")
    return done


def last_line(summary: dict[str, Any], run_dir: Path) -> str:
    """The run's one-line result: figures, and whether it collapsed or sat at a plateau."""
    kb = "n/a" if summary["knn_before"] is None else f"{summary['knn_before']:.2f}%"
    ka = "n/a" if summary["knn_after"] is None else f"{summary['knn_after']:.2f}%"
    ips = summary["images_per_s"]
    figures = (f"{summary['steps']} steps, kNN top-1 before {kb} -> after {ka}, "
               f"{'n/a' if ips is None else f'{ips:.0f}'} images/s; logs in {run_dir}")
    verdict = summary["collapse"]
    if summary["collapsed"]:
        return (f"COLLAPSED: {figures}. {verdict['message']}; summary.json has \"collapsed\": true "
                f"(exit status {EXIT_COLLAPSED})")
    plateau = verdict["plateau"]
    note = "" if plateau is None else (
        f" (the relation loss sat at log K with collapsed keys from step {plateau['from_step']} to "
        f"{plateau['to_step']}: see the warning and summary.json's \"collapse\")")
    return f"done: {figures}{note}"


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
def main(cfg: Config) -> dict[str, Any]:
    """Train with ``cfg``; returns the summary that is also written to runs/NAME/summary.json."""
    spec = resolve_spec(cfg)  # before any work: an unknown view or a bad value fails here
    if cfg.recipe_overrides:
        changes = ", ".join(f"recipe.{k}={v!r}" for k, v in cfg.recipe_overrides.items())
        log.info("recipe %s with %s", cfg.recipe, changes)
    # --- accelerator ------------------------------------------------------------------------------------
    precision = resolve_precision(cfg.precision)  # auto: bf16 on CUDA, float32 on CPU
    # broadcast_buffers=False: DDP must not overwrite the queue and teacher buffers from rank 0 each step
    # (the queue is kept identical by the all-gather in push; BN buffers stay per-process as in the paper).
    accelerator = Accelerator(
        mixed_precision=precision, kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)]
    )
    cfg.check_world(accelerator.num_processes)
    check_view_memory(cfg, spec, accelerator.device, accelerator.num_processes)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one process speaks
    # runs/NAME: prepared, locked by the main process until the end, earlier outputs moved aside if asked
    with open_run(cfg, overwrite=cfg.overwrite, is_main=accelerator.is_main_process,
                  barrier=accelerator.wait_for_everyone) as run_dir:
        return train(cfg, spec, accelerator, precision, run_dir)


def train(cfg: Config, spec: RecipeSpec, accelerator: Accelerator, precision: str, run_dir: Path) -> dict[str, Any]:
    """The run itself, top to bottom: seeds, resume check, data, model, optimiser, loop, save."""
    set_seed(cfg.seed)  # same initial weights and queue on every process
    device, is_main, nproc = accelerator.device, accelerator.is_main_process, accelerator.num_processes

    # --- resume: read and check the checkpoint before any work -------------------------------------------
    ckpt_path = run_dir / "last.pt"
    resume_from = find_checkpoint(cfg, run_dir)
    state: dict[str, Any] = {}
    if resume_from is not None:
        state = read_checkpoint(resume_from, RESUME_KEYS)
        check_resume_config(resume_changes(state.get("config", {}), cfg), resume_from)

    # --- data -----------------------------------------------------------------------------------------
    try:
        loader = build_loader(cfg, cfg.backend, split=cfg.train_split, device=device,
                              rank=accelerator.process_index, world_size=nproc, spec=spec)
    except ValueError as e:  # the data does not fit the config (too few readable samples for the batch, ...)
        raise ConfigError(f"data={cfg.data!r}: {e}") from None
    steps_per_epoch = len(loader)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    if state and state["step"] >= total_steps:
        done = finished_run(cfg, state, total_steps, run_dir, is_main)
        accelerator.end_training()
        return done
    log.info("backend %s, %d batches of %d per process per epoch, %d processes, %d steps, precision %s",
             type(loader).__name__, steps_per_epoch, loader.batch_size, nproc, total_steps, precision)

    # --- model ----------------------------------------------------------------------------------------
    model = build_ressl(cfg, device)  # channels_last and compiled encoders as the config asks

    # --- optimiser + schedule ---------------------------------------------------------------------------
    optimizer = build_optimizer(model, cfg)  # SGD, peak lr = cfg.lr * batch_size / 256
    schedule = Schedule.from_config(cfg, steps_per_epoch, total_steps)  # lr, EMA momentum, InfoNCE weight
    model, optimizer = accelerator.prepare(model, optimizer)
    train_step = TrainStep(model, optimizer, accelerator)  # the step tools/bench.py times too
    core: ReSSL = train_step.core

    step, epoch, start_batch, history = 0, 0, 0, {"knn": []}
    if state:
        core.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])  # momentum buffers; lr and decay from the config
        step, epoch, start_batch = state["step"], state["epoch"], state["batch"]
        history = state.get("history", history)
        restore_rng(state)
        log.info("resumed from %s at step %d (epoch %d, batch %d), lr %.4g", resume_from, step, epoch,
                 start_batch, schedule.lr(step))
    runlog = RunLog(run_dir, is_main, resume_step=step if state else None, keep_rows=state.get("log_rows"))
    collapse = CollapseMonitor(cfg.queue_size, cfg.proj_dim, total_steps, cfg.log_every, cfg.warmup_infonce_epochs)
    collapse.load_state_dict(history.get("collapse"))
    if cfg.knn_before and not state:
        history["knn_before"] = knn_row(cfg, spec, core, accelerator, runlog, history, step, "before training")

    # --- loop -------------------------------------------------------------------------------------------
    losses: list[float] = []
    images_per_step = cfg.batch_size * (1 + len(spec.strong))
    bar = tqdm(total=total_steps, initial=step, disable=not is_main, dynamic_ncols=True, unit="step")
    t_start = t_last = time.perf_counter()
    step_start = step_last = step
    start_epoch, position = epoch, (epoch, start_batch)  # position: where a resumed run continues
    model.train()
    try:  # the bar closes first on any exit, so a message goes on its own line
        for epoch in range(start_epoch, epochs):
            loader.set_epoch(epoch, start_batch)
            for batch_idx, batch in enumerate(loader, start=start_batch):
                lr, m, w_nce = schedule.lr(step), schedule.ema_momentum(step), schedule.infonce(epoch, batch_idx)
                # autocast forward, backward, SGD step, zero_grad, EMA + enqueue (ressl/step.py); no host sync
                loss, metrics = train_step(batch.weak, batch.strong, lr=lr, momentum=m, infonce_weight=w_nce)
                step += 1
                position = (epoch, batch_idx + 1) if batch_idx + 1 < steps_per_epoch else (epoch + 1, 0)
                bar.update(1)
                if step % cfg.log_every == 0 or step == total_steps:
                    # host sync: the only one per log_every steps (loss values + the non-finite flag)
                    if train_step.nonfinite.item():
                        raise NonFiniteLossError(nan_message(cfg, step, epoch, lr, ckpt_path, nproc))
                    now = time.perf_counter()
                    ips = images_per_step * (step - step_last) / (now - t_last)
                    t_last, step_last = now, step
                    vals = {k: v.item() for k, v in metrics.items()}
                    losses.append(vals["loss"])
                    # lr, momentum and InfoNCE weight of the step just taken, beside its losses
                    runlog.row(step, epoch=epoch, lr=lr, momentum=m, infonce_weight=w_nce, images_per_s=ips, **vals)
                    warning = collapse.observe(step, vals["loss_rel"], vals["key_std"], w_nce,
                                               relation_trained=cfg.w_rel > 0)
                    if warning and is_main:
                        log.warning(warning)
                    bar.set_postfix(loss=f"{vals['loss']:.4f}", m=f"{m:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}")
                if step % cfg.ckpt_every == 0 and step < total_steps:
                    if train_step.nonfinite.item():  # host sync; never save a state that has seen a NaN
                        raise NonFiniteLossError(nan_message(cfg, step, epoch, lr, ckpt_path, nproc))
                    history["collapse"] = collapse.state_dict()
                    save_run(accelerator, ckpt_path, cfg, core, optimizer, step, position, history, runlog.rows)
                if step >= total_steps:
                    break
            start_batch = 0
            if step >= total_steps:
                break
            if cfg.knn_every and (epoch + 1) % cfg.knn_every == 0:
                knn_row(cfg, spec, core, accelerator, runlog, history, step, f"after epoch {epoch + 1}")
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_start

    # --- save -------------------------------------------------------------------------------------------
    if train_step.nonfinite.item():
        raise NonFiniteLossError(nan_message(cfg, step, epoch, schedule.lr(max(step - 1, 0)), ckpt_path, nproc))
    final_knn = knn_row(cfg, spec, core, accelerator, runlog, history, step, "after training")
    history["collapse"] = collapse.state_dict()
    save_run(accelerator, ckpt_path, cfg, core, optimizer, step, position, history, runlog.rows)
    teacher_sum = torch.stack([p.detach().double().sum() for p in core.teacher.parameters()]).sum()
    teacher_sums = accelerator.gather(teacher_sum.reshape(1).to(device)).tolist()
    verdict = [collapse.verdict()]
    broadcast_object_list(verdict)  # every process ends with the main process's verdict (and exit status)
    summary = {
        "name": cfg.name, "steps": step, "epochs": epoch + 1, "num_processes": nproc,
        "precision": precision, "backend": type(loader).__name__, "losses": losses,
        "knn_before": history.get("knn_before"), "knn_after": final_knn,
        "images_per_s": images_per_step * (step - step_start) / elapsed if step > step_start else None,
        "teacher_checksums": teacher_sums, "queue_ptr": int(core.queue.ptr),
        "bad_files": getattr(loader, "bad_files", 0),
        "collapsed": verdict[0]["collapsed"], "collapse": verdict[0],
        "recipe": cfg.recipe, "recipe_overrides": cfg.recipe_overrides, "config": cfg.to_dict(),
    }
    if is_main:
        finish_run(run_dir, runlog, summary, CURVES)
        print(last_line(summary, run_dir))
    accelerator.end_training()
    return summary


def parse_args(argv: list[str] | None = None) -> Config:
    return parse_cli(__doc__, load_config, "YAML preset in configs/ (default: the paper's ImageNet run)", argv)


def exit_status(summary: dict[str, Any]) -> int:
    """0 for a run that trained (or was already finished), EXIT_COLLAPSED for one that ended collapsed."""
    return EXIT_COLLAPSED if summary.get("collapsed") else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(exit_status(run_tool(lambda: main(parse_args()))))
