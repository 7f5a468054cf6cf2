"""The measurements behind tools/bench.py: rows, the stage profile and the report.

``tools/bench.py`` is the command line over :func:`run`; ``tools/gpucheck.py`` reads its JSON. What is
timed (loader-only, model-only, end to end, the stages), the units and the JSON contract are described
in ``tools/bench.py``'s docstring. The model step is :class:`ressl.step.TrainStep`, the step that
``tools/train.py`` takes, built by the same ``build_ressl`` / ``build_optimizer``. Machine facts live in
``harness/machine.py``, timed windows in ``harness/timing.py``, text and JSON output in ``harness/report.py``, the stage
timers in :mod:`pipelines.profile`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import math
import resource
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import pipelines
from harness.benchdata import SMALL_SIDE, ensure_format, ensure_images, ensure_small
from harness.machine import cores, machine_info
from harness.report import format_table, write_report
from harness.timing import Timing, measure, summarize, trace
from pipelines.formats import RAW_MAX_SIDE
from pipelines.profile import bottleneck, profile_backend, project
from pipelines.spec import RecipeSpec, resolve_recipe
from ressl.config import Config, ConfigError
from ressl.step import TrainStep, build_optimizer, build_ressl

__all__ = [
    "MODES",
    "ROW_FIGURES",
    "SCHEMA_VERSION",
    "SYNTHETIC",
    "BenchError",
    "ModelStep",
    "cores",
    "format_table",
    "fresh_accelerator",
    "machine_info",
    "run",
    "summarize",
    "write_report",
]

log = logging.getLogger("bench")

MODES = ("loader", "model", "end_to_end")
SYNTHETIC = "synthetic"  # backend name of model-only rows
SCHEMA_VERSION = 2  # 2: stages, bottlenecks, projection; small raw bench set at <= 64 px
# Figures a measured row may carry (error rows carry none of them; images_per_s is null there).
ROW_FIGURES = ("images_per_s", "images_per_s_std", "images_per_s_min", "images_per_s_max", "images_per_s_runs",
               "pairs_per_s", "views_per_s", "step_ms", "cpu_cores_busy", "cpu_util", "peak_mem_bytes",
               "peak_rss_bytes", "h2d_bytes_per_s", "data_wait_frac", "loader_efficiency")

# Heads, queue and EMA momentum of the small-data presets (configs/cifar10.yaml) for the *_cifar
# backbones; every other backbone keeps the Config defaults, which are the ImageNet run.
_SMALL_DATA = {"proj_hidden": 2048, "proj_dim": 128, "queue_size": 4096, "momentum": 0.99}


class BenchError(ValueError):
    """A command-line value that cannot work; the message names the option and what was expected."""


# ---------------------------------------------------------------------------------------------------
# the training step, loaders and runners
# ---------------------------------------------------------------------------------------------------
def fresh_accelerator(precision: str, device: torch.device) -> Accelerator:
    """An Accelerator for one bench run on ``device``.

    Accelerate keeps one state per process and refuses another precision (or keeps the first device)
    for a later Accelerator; a bench may run in a process that trained before (the tests), so the state
    is cleared first, as accelerate's own test suite does between cases, and :func:`run` clears it again
    when it ends.
    """
    AcceleratorState._reset_state(reset_partial_state=True)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # Accelerate places a single process on the current CUDA device
    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    if accelerator.device.type != device.type:
        raise RuntimeError(f"Accelerate chose {accelerator.device}, the bench asked for {device}")
    return accelerator


class ModelStep:
    """The training step of tools/train.py (:class:`ressl.step.TrainStep`) at the config's constant EMA
    momentum and no InfoNCE warm-up: model, optimiser and step built exactly as training builds them.

    Args:
        cfg: the run's Config (backbone, heads, queue, lr, weight decay, momentum, channels_last, compile).
        accelerator: the bench run's Accelerator (precision, device, fp16 loss scaling).
    """

    def __init__(self, cfg: Config, accelerator: Accelerator):
        model = build_ressl(cfg, accelerator.device)
        optimizer = build_optimizer(model, cfg)
        model, optimizer = accelerator.prepare(model, optimizer)
        self.step, self.momentum = TrainStep(model, optimizer, accelerator), cfg.momentum

    def __call__(self, weak: torch.Tensor, strong: list[torch.Tensor]) -> None:
        self.step(weak, strong, momentum=self.momentum)


def _endless(loader: pipelines.Loader) -> Iterator[pipelines.Batch]:
    """Batches across epochs, re-shuffled each epoch as in training (epoch starts are timed too)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        count = 0
        batches = iter(loader)
        try:
            for batch in batches:
                count += 1
                yield batch
        finally:  # leaving mid-epoch: let the backend stop its producer threads now, not at exit
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        if count == 0:
            raise RuntimeError("the loader yielded no batch: the dataset is smaller than one batch")
        epoch += 1


def _join_producers(before: set[threading.Thread], timeout: float = 10.0) -> None:
    """Wait for producer threads a loader started (Thread subclasses with their own ``run``, such as
    FFCV's EpochIterator) to stop after their iterator was closed.

    One may still be inside a batch; left running, it would steal CPU from the next row's timing, and
    a daemon thread still in Numba code when the interpreter exits aborts the process. Plain worker
    threads of thread pools (``Thread(target=...)``) idle on a queue and are not waited for.
    """
    deadline = time.monotonic() + timeout
    for t in set(threading.enumerate()) - before:
        if type(t).run is not threading.Thread.run:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("loader thread %s still running %.0f s after its iterator was closed", t.name, timeout)


def _check_batch(batch: pipelines.Batch, spec: RecipeSpec, batch_size: int, backend: str) -> None:
    """Fail loudly when a backend hands back something other than the spec asks for."""
    want = [(batch_size, 3, v.size, v.size) for v in spec.views]
    got = [tuple(batch.weak.shape), *(tuple(s.shape) for s in batch.strong)]
    if got != want:
        raise RuntimeError(f"backend {backend!r} returned views of shapes {got}, expected {want}")


class _LoaderRunner:
    """``step()`` takes one batch from the loader (and, with ``train``, trains on it)."""

    def __init__(self, loader: pipelines.Loader, train: ModelStep | None = None):
        self.batches = _endless(loader)
        self.train = train
        self.wait_s = 0.0

    def step(self) -> int:
        t0 = time.perf_counter()
        batch = next(self.batches)
        self.wait_s += time.perf_counter() - t0
        if self.train is not None:
            self.train(batch.weak, batch.strong)
        return int(batch.weak.shape[0])

    def close(self) -> None:
        self.batches.close()


class _SyntheticRunner:
    """``step()`` trains on fixed random device tensors shaped like the recipe's views."""

    def __init__(self, train: ModelStep, spec: RecipeSpec, batch: int, device: torch.device, channels_last: bool):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        g = torch.Generator(device="cpu").manual_seed(0)
        views = [torch.randn(batch, 3, v.size, v.size, generator=g).to(device, memory_format=fmt)
                 for v in spec.views]
        self.weak, self.strong, self.train, self.batch = views[0], views[1:], train, batch

    def step(self) -> int:
        self.train(self.weak, self.strong)
        return self.batch


# ---------------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------------
def _row_base(args: argparse.Namespace, backend: str, mode: str, batch: int, workers: int | None) -> dict[str, Any]:
    return {"backend": backend, "mode": mode, "model": args.model, "batch": batch, "size": args.size,
            "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
            "device": args.device, "num_workers": workers}


def _figures(t: Timing, n_strong: int, device: torch.device) -> dict[str, Any]:
    rates = [n / s for n, s in zip(t.samples, t.seconds, strict=True)]
    st = summarize(rates)
    out: dict[str, Any] = {
        "images_per_s": st["mean"], "images_per_s_std": st["std"], "images_per_s_min": st["min"],
        "images_per_s_max": st["max"], "images_per_s_runs": rates,
        "pairs_per_s": st["mean"] * n_strong, "views_per_s": st["mean"] * (1 + n_strong),
        "step_ms": 1000.0 * sum(t.seconds) / (t.steps * len(t.seconds)),
        "cpu_cores_busy": t.cpu_seconds / t.wall_seconds,
        "cpu_util": t.cpu_seconds / t.wall_seconds / cores(),
    }
    if device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    else:  # the process's lifetime high-water mark: Linux reports KiB, macOS bytes
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_bytes"] = rss if sys.platform == "darwin" else rss * 1024
    if t.h2d_bytes_per_s is not None:
        out["h2d_bytes_per_s"] = t.h2d_bytes_per_s
    return out


def _error_row(base: dict[str, Any], error: str) -> dict[str, Any]:
    return {**base, "images_per_s": None, "error": error}


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _config(args: argparse.Namespace, data: str, batch: int, workers: int) -> Config:
    """The run's Config: the ``--config`` preset's keys (``args._preset``) or, without one, small-data
    heads for *_cifar backbones; then the measured options; the queue rounded up to whole batches."""
    preset = getattr(args, "_preset", None)
    values: dict[str, Any] = {} if preset is None else preset.to_dict()
    if preset is None and args.model.endswith("_cifar"):
        values.update(_SMALL_DATA)
    values.update({
        "data": data, "train_split": args.split, "recipe": args.recipe, "backbone": args.model,
        "batch_size": batch, "num_workers": workers, "seed": args.seed, "channels_last": args.channels_last,
        "precision": args.precision, "compile": args.compile,
        "recipe_overrides": dict(getattr(args, "recipe_overrides", {})),
    })
    queue = values.get("queue_size", Config.queue_size)
    values["queue_size"] = math.ceil(queue / batch) * batch
    return Config(**values).validate()


class _Bench:
    """Holds what rows share: arguments, device, recipe, data root and the cached train steps."""

    def __init__(self, args: argparse.Namespace, data: str, data_errors: dict[str, str]):
        self.args, self.data, self.data_errors = args, data, data_errors
        self.device = torch.device(args.device)
        base = resolve_recipe(args.recipe, getattr(args, "recipe_overrides", {}))
        self.spec = base if base.weak.size == args.size else base.with_size(args.size)
        self.n_strong = len(self.spec.strong)
        self.steps: dict[int, ModelStep | str] = {}  # batch -> step, or why it cannot be built
        self._accelerator: Accelerator | None = None

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _trace_path(self, mode: str, backend: str, batch: int, workers: int | None) -> Path:
        w = "" if workers is None else f"-w{workers}"
        return Path(self.args.profile) / f"{mode}-{backend}-{self.args.model}-b{batch}{w}.json"

    def train_step(self, batch: int) -> ModelStep | str:
        """The training step for ``batch`` (built once), or the reason it cannot be built."""
        if batch not in self.steps:
            torch.manual_seed(self.args.seed)
            try:
                if self._accelerator is None:
                    self._accelerator = fresh_accelerator(self.args.precision, self.device)
                self.steps[batch] = ModelStep(_config(self.args, self.data, batch, self.args.workers),
                                              self._accelerator)
            except (ImportError, AttributeError, ConfigError, RuntimeError, ValueError, TypeError) as e:
                log.warning("model %s at batch %d unavailable: %s", self.args.model, batch, e)
                self.steps[batch] = f"model step unavailable: {_short(e)}"
        return self.steps[batch]

    def model_row(self, batch: int) -> dict[str, Any]:
        base = _row_base(self.args, SYNTHETIC, "model", batch, None)
        train = self.train_step(batch)
        if isinstance(train, str):
            return _error_row(base, train)
        try:
            runner = _SyntheticRunner(train, self.spec, batch, self.device, self.args.channels_last)
            self._reset_peak()
            t = measure(runner.step, warmup=self.args.warmup, steps=self.args.steps, repeats=self.args.repeats,
                         device=self.device)
            row = {**base, **_figures(t, self.n_strong, self.device)}
            if self.args.profile:
                path = self._trace_path("model", SYNTHETIC, batch, None)
                trace(runner.step, steps=min(self.args.steps, 5), device=self.device, path=path)
                row["trace"] = str(path)
            return row
        except Exception as e:  # e.g. torch.compile without a C++ compiler, out of memory: report, go on
            log.warning("model-only %s batch %d failed: %s", self.args.model, batch, e, exc_info=self.args.verbose)
            self.steps[batch] = f"model step failed: {_short(e)}"
            return _error_row(base, self.steps[batch])

    def _unavailable(self, backend: str) -> str | None:
        if not pipelines.available_backends().get(backend, False):
            return f"backend {backend!r} is not installed (pip install -e '.[{backend}]')"
        return self.data_errors.get(backend)

    def loader_row(self, backend: str, mode: str, batch: int, workers: int) -> dict[str, Any]:
        """A loader-only or end-to-end row for one backend; failures become an error row."""
        base = _row_base(self.args, backend, mode, batch, workers)
        why = self._unavailable(backend)
        if why is not None:
            return _error_row(base, why)
        train = None
        if mode == "end_to_end":
            train = self.train_step(batch)
            if isinstance(train, str):
                return _error_row(base, train)
        runner = None
        threads_before = set(threading.enumerate())
        try:
            cfg = _config(self.args, self.data, batch, workers)
            loader = pipelines.build_loader(cfg, backend, split=self.args.split, device=self.device,
                                            spec=self.spec)
            runner = _LoaderRunner(loader, train)
            first = next(runner.batches)
            _check_batch(first, self.spec, batch, backend)
            del first
            self._reset_peak()
            t = measure(runner.step, warmup=self.args.warmup, steps=self.args.steps, repeats=self.args.repeats,
                         device=self.device, waited=lambda: runner.wait_s)
            row = {**base, **_figures(t, self.n_strong, self.device)}
            if mode == "end_to_end":
                row["data_wait_frac"] = t.wait_seconds / t.wall_seconds
            if self.args.profile:
                path = self._trace_path(mode, backend, batch, workers)
                trace(runner.step, steps=min(self.args.steps, 5), device=self.device, path=path)
                row["trace"] = str(path)
            return row
        except Exception as e:  # any backend failure is reported in its row; the other rows still run
            log.warning("%s %s failed: %s", backend, mode, e, exc_info=self.args.verbose)
            return _error_row(base, _short(e))
        finally:
            if runner is not None:
                runner.close()
            gc.collect()
            _join_producers(threads_before)


    def stage_rows(self, backend: str, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The stage profile of ``backend`` (:mod:`pipelines.profile`) plus the measured model step, and its
        bottleneck line (with the ``--project-cores`` projection); a failure becomes one error row."""
        args, n_strong = self.args, self.n_strong
        base = {"backend": backend, "size": args.size, "batch": args.batch}
        why = self._unavailable(backend)
        if why is None:
            threads_before = set(threading.enumerate())
            try:
                costs = profile_backend(backend, _config(args, self.data, args.batch, args.workers), self.spec,
                                        split=args.split, device=self.device, warmup=max(1, args.warmup),
                                        steps=args.steps, repeats=args.repeats)
            except Exception as e:  # a backend's profile failing is reported in its rows; the others still run
                log.warning("%s stage profile failed: %s", backend, e, exc_info=args.verbose)
                why = f"stage profile failed: {_short(e)}"
            finally:
                gc.collect()
                _join_producers(threads_before)
        if why is not None:
            return [{**base, "stage": None, "error": why}], {**base, "limit": None, "line": why}
        stages = [{**base, **c.row()} for c in costs]
        model = next((r for r in rows if r["mode"] == "model" and r["batch"] == args.batch
                      and r["images_per_s"] is not None), None)
        if model is not None:
            stages.append({**base, "stage": "model", "side": "device", "pairs_per_s": model["pairs_per_s"],
                           "pairs_per_s_std": model["images_per_s_std"] * n_strong,
                           "core_s_per_1k_pairs": 1000.0 * model["cpu_cores_busy"] / model["pairs_per_s"],
                           "threads": args.threads, "fused": "",
                           "note": f"TrainStep {args.model} on {self.device.type} (the model row)"})
        verdict = {**base, **bottleneck(stages, cores(), self.device.type)}
        loader = next((r for r in rows if r["backend"] == backend and r["mode"] == "loader"
                       and r["images_per_s"] is not None), None)
        if loader is not None:
            verdict["loader_measured"] = {"pairs_per_s": loader["pairs_per_s"], "core_s_per_1k_pairs":
                                          1000.0 * loader["cpu_cores_busy"] / loader["pairs_per_s"]}
        if args.project_cores:
            verdict["projection"] = project(stages, args.project_cores)
        return stages, verdict


def _prepare_data(args: argparse.Namespace) -> tuple[str, dict[str, Any], dict[str, str]]:
    """Data root, its description for the JSON, and per-backend reasons it cannot be read.

    Without ``--data``: at ``--size`` <= 64 a small raw set stored as ``make dataset`` stores CIFAR (what a
    32-px user has), else ImageNet-size JPEGs.
    """
    errors: dict[str, str] = {}
    if args.data is not None:
        return args.data, {"root": args.data, "generated": False}, errors
    if args.size <= RAW_MAX_SIDE:
        side = max(SMALL_SIDE, args.size)
        try:
            root = ensure_small(args.num_images, args.seed, side, args.bench_dir, workers=args.workers or 1)
        except Exception as e:  # the converter failing costs every backend its rows, not the run
            log.warning("cannot write the small bench set: %s", e)
            why = f"cannot write the small bench set: {_short(e)}"
            return str(Path(args.bench_dir) / f"raw{side}"), {"root": None, "generated": True, "error": why}, \
                dict.fromkeys(pipelines.BACKENDS, why)
        source = json.loads((root / "manifest.json").read_text())["source"]
        return str(root), {"root": str(root), "generated": True, "kind": "raw", **source}, errors
    root = ensure_images(args.num_images, args.seed, args.bench_dir)
    have = pipelines.available_backends()
    need = {"ffcv": "beton", "dali": "rec"}
    for backend in args.backends:
        fmt = need.get(backend)
        if fmt is None or not have.get(backend, False):
            continue
        try:
            ensure_format(root, fmt, workers=args.workers or 1)
        except Exception as e:  # the converter failing costs that backend its rows, not the run
            log.warning("cannot write the bench set as .%s: %s", fmt, e)
            errors[backend] = f"cannot write train.{fmt}: {_short(e)}"
    manifest = json.loads((root / "manifest.json").read_text())
    return str(root), {"root": str(root), "generated": True, "kind": "jpeg", **manifest}, errors


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every requested row and return the report (see the module docstring for its shape)."""
    try:
        return _run(args)
    finally:  # the run's Accelerator state must not become the next Accelerator's in this process
        AcceleratorState._reset_state(reset_partial_state=True)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
    }
    data, report["data"], data_errors = _prepare_data(args)
    bench = _Bench(args, data, data_errors)
    try:
        report["config"] = _config(args, data, args.batch, args.workers).to_dict()
    except ConfigError as e:
        raise BenchError(str(e)) from None
    report["recipe"] = {"views": [{"name": v.name, "size": v.size} for v in bench.spec.views]}
    rows: list[dict[str, Any]] = []
    modes = args.mode_list
    if "model" in modes or "end_to_end" in modes:
        log.info("model-only: %s batch %d", args.model, args.batch)
        rows.append(bench.model_row(args.batch))
    for backend in args.backends:
        for mode in ("loader", "end_to_end"):
            if mode in modes:
                log.info("%s: %s batch %d, %d workers", mode, backend, args.batch, args.workers)
                rows.append(bench.loader_row(backend, mode, args.batch, args.workers))
    stages: list[dict[str, Any]] = []
    verdicts: list[dict[str, Any]] = []
    if args.stages and "loader" in modes:  # a loader analysis: end-to-end-only runs skip it
        for backend in args.backends:
            log.info("stage profile: %s batch %d", backend, args.batch)
            got, verdict = bench.stage_rows(backend, rows)
            stages += got
            verdicts.append(verdict)
    if args.sweep:
        for batch in args.sweep_batch_list:
            if "model" in modes or "end_to_end" in modes:
                rows.append({**bench.model_row(batch), "sweep": True})
            for backend in args.backends:
                for workers in args.sweep_workers_list:
                    log.info("sweep: %s batch %d, %d workers", backend, batch, workers)
                    rows.append({**bench.loader_row(backend, "loader", batch, workers), "sweep": True})
    model_rate = {r["batch"]: r["images_per_s"] for r in rows if r["mode"] == "model"}
    for r in rows:
        if r["mode"] == "end_to_end" and r["images_per_s"] is not None:
            ceiling = model_rate.get(r["batch"])
            r["loader_efficiency"] = r["images_per_s"] / ceiling if ceiling else None
    report["results"] = rows
    report["stages"], report["bottlenecks"] = stages, verdicts
    return report


