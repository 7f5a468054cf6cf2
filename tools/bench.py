"""Images per second of ReSSL training: loader-only, model-only and end to end, per data backend.

The command line over ``harness/measure.py``, which holds the timing, the rows and the report.

    make bench                                   # CPU defaults: RN18-CIFAR @32 px, batch 32, about a minute
    python tools/bench.py --backend torchvision,dali --json runs/bench/cpu.json
    python tools/bench.py --model resnet50 --size 224 --batch 256 --precision bf16 --channels-last \
        --json runs/bench/h100-rn50.json         # the GPU headline run
    python tools/bench.py --sweep                # loader workers/threads x batch size: how throughput scales
    python tools/bench.py --profile runs/bench/trace   # torch profiler traces (chrome://tracing, Perfetto)
    python tools/bench.py --modes loader,model --project-cores 16   # stages + a 16-core GPU-machine projection
    python tools/bench.py --config configs/cifar10.yaml batch_size=256   # what that training preset runs

``--config PRESET [key=value ...]`` measures what ``tools/train.py`` would run with that preset: its backbone,
batch, recipe (with its ``recipe.*`` overrides; size = the recipe's weak view), precision, channels_last,
compile, heads, queue, shuffle-BN splits and loader keys; an explicit option (``--model``, ``--batch``,
``--recipe``, ``--size``, ``--precision``, ``--channels-last``, ``--compile``, ``--workers``) still wins. The data is
still ``--data`` or the generated set, never the preset's ``data=``, so the same bytes are read on every machine.

What each mode times, after ``--warmup`` untimed steps, in ``--repeats`` windows of ``--steps`` steps
each, with the device synchronised at both ends of every window (mean +- standard deviation over windows):

  loader      ``next(batch)`` from one backend: decode + the full recipe, batches delivered on the device.
  model       the training step of tools/train.py (``ressl.step.TrainStep``: autocast forward of student
              and teacher, backward, SGD step, zero_grad, EMA + queue push) on synthetic device tensors,
              at a constant EMA momentum and lr: the ceiling a loader must feed.
  end_to_end  the same step fed by the loader; ``loader_efficiency`` = its images/s / model-only images/s.

Units. ``images_per_s`` counts dataset samples (one sample = one weak + n strong views, the unit of the
"images/s" goal); ``pairs_per_s`` counts weak+strong pairs (samples x n strong views); ``views_per_s``
counts every augmented view a loader produced.

Stages (with ``loader`` in ``--modes``, unless ``--no-stages``; :mod:`pipelines.profile`): per backend,
each stage of the loader run apart with the backend's own pieces, one batch per call -- read, decode,
crop, augment, h2d -- plus the model step (the model row), each with its pairs/s as run and its CPU
core-seconds per 1,000 pairs (CPU time of every thread and process while it ran); then one bottleneck
line per backend (CPU-, IO- or device-bound, naming the stage) and, with ``--project-cores N``, a
projection of the CPU-side stages to a GPU machine with N cores (labelled as such: per-core costs
measured here, scaled linearly).

Without ``--data`` the benchmark reads a deterministic generated set, made once under ``data/bench/``
(see ``harness/benchdata.py``), so every run reads the same bytes: above 64 px, ImageNet-size JPEGs with their
.beton and .rec; at ``--size`` <= 64, small raw images (32x32, or the size up to 64) stored as
``make dataset`` stores CIFAR (PNG tree, .rec, raw .beton: FFCV takes its resident path).

JSON (``--json OUT``): ``{"schema", "date", "machine", "args", "config", "recipe", "data", "results"}``.
``machine`` holds cpu, cores, gpu, versions (with the git commit) and git; ``results`` is a list of
rows, each with ``backend`` (torchvision / dali / ffcv / synthetic), ``mode``, ``model``, ``batch``,
``size``, ``num_workers`` and ``images_per_s``, plus the figures of :data:`ROW_FIGURES`:
``images_per_s_{std,min,max,runs}`` (over windows), ``pairs_per_s``, ``views_per_s``, ``step_ms``,
``cpu_cores_busy`` (CPU seconds of this process and its workers per wall second) and ``cpu_util``
(the same / available cores), ``peak_mem_bytes`` (CUDA) or ``peak_rss_bytes`` (CPU, process lifetime),
``h2d_bytes_per_s`` (CUDA with pynvml: host-to-device PCIe traffic), ``data_wait_frac`` (end to end:
share of wall time spent waiting in ``next(batch)``) and ``loader_efficiency`` (end to end). A backend
that is not installed or fails gets rows with ``error`` (why) and ``images_per_s: null``, no figures.
Sweep rows carry ``"sweep": true``. ``stages`` is a list of rows ``{backend, size, batch, stage (read /
decode / crop / augment / h2d / model), side ("host": on the CPU on any machine; "device": where the
batches go), pairs_per_s, pairs_per_s_std, core_s_per_1k_pairs, threads, fused (how the loader fuses it
with other stages, or ""), note}``; a stage with nothing to do has ``pairs_per_s: null`` and 0 core-s
(the note says why: no copy on a CPU device, raw pixels need no decode), a backend whose profile failed
one row ``{backend, size, batch, stage: null, error}``. ``bottlenecks`` holds one entry per backend:
``{backend, size, batch, limit ("CPU" / "IO" / "device"), stage, pairs_per_s (that ceiling),
loader_cpu_pairs_per_s, line, loader_measured: {pairs_per_s, core_s_per_1k_pairs}, projection: {cores,
cpu_stages, core_s_per_1k_pairs, pairs_per_s, line}}`` (``projection`` with ``--project-cores`` only).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, _ROOT)

import pipelines  # noqa: E402
from harness.benchdata import DEFAULT_ROOT  # noqa: E402
from harness.measure import MODES, BenchError, cores, format_table, run, write_report  # noqa: E402
from pipelines.folder import IMAGE_EXTENSIONS  # noqa: E402
from pipelines.spec import RecipeError, resolve_recipe  # noqa: E402
from ressl.config import ConfigError, load_config, run_tool  # noqa: E402
from ressl.step import resolve_precision  # noqa: E402

__all__ = ["build_parser", "data_failure", "main", "resolve_args"]

log = logging.getLogger("bench")


@dataclass(frozen=True)
class _Defaults:
    model: str
    batch: int
    steps: int
    warmup: int
    repeats: int


# CPU: small enough to finish in about a minute on 2 cores. GPU: the RN50 headline run.
_CPU_DEFAULTS = _Defaults(model="resnet18_cifar", batch=32, steps=3, warmup=2, repeats=3)
_GPU_DEFAULTS = _Defaults(model="resnet50", batch=256, steps=40, warmup=15, repeats=3)


# ---------------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The command line; every default that depends on the device is None here and set by resolve_args."""
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="dataset directory (train/ ImageFolder, train.beton, train.rec+idx); "
                                  "default: the generated bench set under --bench-dir")
    p.add_argument("--backend", default="all", help="comma list of torchvision,dali,ffcv, or all (default)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {','.join(MODES)} (default: all)")
    p.add_argument("--model", help="backbone name (default: resnet18_cifar on CPU, resnet50 on GPU)")
    p.add_argument("--size", type=int, help="output side of the weak view in px (default: 32 for *_cifar, else 224)")
    p.add_argument("--recipe", help="augmentation preset, rescaled to --size (default: imagenet224, or the "
                                    "--config preset's)")
    p.add_argument("--config", metavar="PRESET", help="a training preset (configs/*.yaml) to measure; the "
                                                      "key=value arguments after it change it as on tools/train.py")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="changes of the --config preset")
    p.add_argument("--batch", type=int, help="images per step (default: 32 on CPU, 256 on GPU)")
    p.add_argument("--steps", type=int, help="timed steps per repeat (default: 3 on CPU, 40 on GPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: 2 on CPU, 15 on GPU)")
    p.add_argument("--repeats", type=int, help="timed windows; mean +- std over them (default: 3)")
    p.add_argument("--workers", type=int, help="loader processes (torchvision) or threads (DALI, FFCV); "
                                               "default: the cores this process may use")
    p.add_argument("--precision", choices=("auto", "no", "bf16", "fp16"),
                   help="autocast dtype (default auto: bf16 on GPU, no on CPU; or the --config preset's)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the student and teacher encoders")
    p.add_argument("--channels-last", action="store_true", default=None, help="channels_last model and batches")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="torch intra-op threads of the training process "
                                               "(default: torch's own choice)")
    p.add_argument("--json", help="write the report here (atomically)")
    p.add_argument("--profile", metavar="DIR", help="also write a torch profiler trace per measured row into DIR")
    p.add_argument("--no-stages", dest="stages", action="store_false",
                   help="skip the per-stage profile (read/decode/crop/augment/h2d per backend)")
    p.add_argument("--project-cores", type=int, metavar="N",
                   help="add a projection of the CPU-side stages to a GPU machine with N cores (e.g. 16)")
    p.add_argument("--sweep", action="store_true", help="also measure loader-only and model-only rows over "
                                                        "--sweep-workers x --sweep-batch")
    p.add_argument("--sweep-workers", help="comma list (default: 1, 2, 4, ... up to the cores)")
    p.add_argument("--sweep-batch", help="comma list (default: batch/2, batch, 2*batch)")
    p.add_argument("--num-images", type=int, default=2048, help="size of the generated bench set (default 2048)")
    p.add_argument("--bench-dir", default=str(DEFAULT_ROOT), help="cache of generated bench sets")
    p.add_argument("--split", default="train", help="split to read (default train)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _int_list(option: str, text: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"{option} expects a comma list of integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise BenchError(f"{option} expects integers >= {minimum}, got {text!r}")
    return sorted(set(values))


def _has_image(folder: Path) -> bool:
    """Whether an ImageFolder tree holds at least one image (stops at the first one found)."""
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False


def _data_problem(data: Path, split: str, backends: list[str]) -> str | None:
    """Why no requested, installed backend finds ``split`` in ``data`` (None when one does): a few stat calls
    and a walk to the first image, so an empty or wrong directory stops the run before any work."""
    installed = [b for b in backends if pipelines.available_backends().get(b, False)]
    if not installed:
        return None  # every row will say which backend is missing
    folder = (data / split).is_dir() and _has_image(data / split)
    readable = {"torchvision": folder, "ffcv": (data / f"{split}.beton").is_file(),
                "dali": folder or ((data / f"{split}.rec").is_file() and (data / f"{split}.idx").is_file())}
    if any(readable[b] for b in installed):
        return None
    wants = {"torchvision": f"{split}/ (ImageFolder with images)", "ffcv": f"{split}.beton",
             "dali": f"{split}.rec + {split}.idx or {split}/"}
    return (f"--data {str(data)!r} holds nothing the requested backends read for split {split!r}: expected "
            + "; ".join(f"{wants[b]} ({b})" for b in installed) + "; write it with `make dataset`")


def data_failure(report: dict[str, Any]) -> str | None:
    """Why the run measured nothing of the data path, when every loader row failed because the data is
    missing or empty (the loaders' FileNotFoundError); None when any row read data or failed otherwise."""
    rows = [r for r in report["results"] if r["mode"] in ("loader", "end_to_end")]
    if not rows or any(r["images_per_s"] is not None or not str(r.get("error", "")).startswith("FileNotFoundError")
                       for r in rows):
        return None
    why = dict.fromkeys(f"{r['backend']}: {r['error'].removeprefix('FileNotFoundError: ')}" for r in rows)
    return f"no backend read --data {report['data']['root']!r}: " + "; ".join(why)


def _apply_preset(args: argparse.Namespace) -> None:
    """Fill the options left unset from ``--config`` and its overrides (``args._preset``, or None), then
    the preset-free defaults of recipe, precision, channels_last and compile."""
    args._preset, args.recipe_overrides = None, {}
    if args.overrides and not args.config:
        raise BenchError(f"key=value arguments ({' '.join(args.overrides)}) change a --config preset; pass --config")
    if args.config:
        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            raise BenchError(f"--config: {e}") from None
        args._preset = cfg
        if args.recipe is None or args.recipe == cfg.recipe:
            args.recipe, args.recipe_overrides = cfg.recipe, dict(cfg.recipe_overrides)
        preset = {"model": cfg.backbone, "batch": cfg.batch_size, "workers": cfg.num_workers,
                  "precision": cfg.precision, "channels_last": cfg.channels_last, "compile": cfg.compile}
        for name, value in preset.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    args.recipe = args.recipe or "imagenet224"
    args.precision = args.precision or "auto"
    args.channels_last, args.compile = bool(args.channels_last), bool(args.compile)
    try:
        spec = resolve_recipe(args.recipe, args.recipe_overrides)
    except RecipeError as e:
        raise BenchError(f"{'--config' if args.recipe_overrides else '--recipe'}: {e}") from None
    if args.size is None and args._preset is not None:
        args.size = spec.weak.size


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check every option and fill the device-dependent defaults; raise BenchError naming a bad one.

    Runs before any data is generated or any model is built.
    """
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise BenchError(f"--device expects auto, cpu, cuda or cuda:N, got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {args.device} asked for CUDA, but torch sees no CUDA device here")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device expects cpu or cuda, got {args.device!r}")
    _apply_preset(args)
    d = _GPU_DEFAULTS if device.type == "cuda" else _CPU_DEFAULTS
    for name in ("model", "batch", "steps", "warmup", "repeats"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(d, name))
    if args.workers is None:
        args.workers = cores()
    if args.size is None:
        args.size = 32 if args.model.endswith("_cifar") else 224
    args.precision = resolve_precision(args.precision, device)
    for name in ("batch", "steps", "repeats", "size", "num_images"):
        if getattr(args, name) <= 0:
            raise BenchError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.threads is not None and args.threads <= 0:
        raise BenchError(f"--threads must be > 0, got {args.threads}")
    if args.project_cores is not None and args.project_cores <= 0:
        raise BenchError(f"--project-cores must be > 0, got {args.project_cores}")
    for name in ("warmup", "workers"):
        if getattr(args, name) < 0:
            raise BenchError(f"--{name} must be >= 0, got {getattr(args, name)}")

    names = [b.strip() for b in args.backend.split(",") if b.strip()]
    if names == ["all"]:
        names = list(pipelines.BACKENDS)
    bad = [b for b in names if b not in pipelines.BACKENDS]
    if bad or not names:
        raise BenchError(f"--backend expects a comma list of {', '.join(pipelines.BACKENDS)} or 'all', "
                         f"got {args.backend!r}")
    args.backends = list(dict.fromkeys(names))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise BenchError(f"--modes expects a comma list of {', '.join(MODES)}, got {args.modes!r}")
    args.mode_list = [m for m in MODES if m in modes]

    try:
        from ressl.models import check_backbone_name
    except ImportError:
        pass  # the model rows will report why ressl cannot be imported
    else:
        try:
            check_backbone_name(args.model)
        except KeyError as e:
            raise BenchError(f"--model: {e.args[0]}") from None

    if args.data is None and args.split != "train":
        raise BenchError(f"--split {args.split!r} needs --data: the generated bench set has only 'train'")
    if args.data is not None:
        data = Path(args.data)
        if not data.is_dir():
            raise BenchError(f"--data {args.data!r} is not a directory (expected {args.split}/, "
                             f"{args.split}.beton or {args.split}.rec + .idx inside)")
        problem = _data_problem(data, args.split, args.backends) if set(args.mode_list) - {"model"} else None
        if problem is not None:
            raise BenchError(problem)
    args.sweep_workers_list = (_int_list("--sweep-workers", args.sweep_workers, 0) if args.sweep_workers
                               else sorted({min(2**i, cores()) for i in range(cores().bit_length() + 1)}))
    args.sweep_batch_list = (_int_list("--sweep-batch", args.sweep_batch, 1) if args.sweep_batch
                             else sorted({max(1, args.batch // 2), args.batch, 2 * args.batch}))
    if args.json is not None and Path(args.json).is_dir():
        raise BenchError(f"--json {args.json!r} is a directory; expected a file path for the report")
    if args.profile is not None and Path(args.profile).exists() and not Path(args.profile).is_dir():
        raise BenchError(f"--profile {args.profile!r} is a file; expected a directory for the traces")
    return args



def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse, validate, measure, print the table, write the JSON; returns the report (for tests).

    Exits 2 after the table and the JSON when every loader row failed for want of data.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = resolve_args(args)
        report = run(args)
    except BenchError as e:
        parser.error(str(e))
    print(format_table(report))
    if args.json:
        log.info("wrote %s", write_report(report, args.json))
    failure = data_failure(report)
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        raise SystemExit(2)
    return report


if __name__ == "__main__":
    run_tool(main)
