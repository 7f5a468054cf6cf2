"""GPU readiness: one prepared command that turns a briefly lent GPU machine into this project's figures.

    make gpu-check                                     # = PYTHONPATH=. python tools/gpucheck.py
    PYTHONPATH=. python3 tools/gpucheck.py --out $OUT --budget-s 480
    PYTHONPATH=. python tools/gpucheck.py --cpu        # the same plan, tiny sizes, on CPU (<= 3 min)

Runs from a plain checkout with the machine's own packages (python, torch, torchvision, accelerate,
numba); nothing needs installing. The steps, in order, each in its own process group with a
timeout cut from ``--budget-s``; a step that fails or runs out of time is recorded and the next runs:

  1 env     GPU name, memory, driver / CUDA, versions of torch, torchvision, accelerate, numba, DALI,
            FFCV (if importable), which optional packages exist, the git commit
  2 tests   the CUDA tests (``pytest -m cuda``): pass / skip / fail per test
  3 model   model-only ReSSL step (ressl.step.TrainStep, the step training takes): RN50 @224 bf16
            channels_last batch 256, eager and torch.compile; RN18-CIFAR @32 batch 512; peak memory
  4 loader  loader-only pairs/s at 224 on the generated bench set for every importable backend, with
            host-to-device bytes/s where NVML (pynvml) gives it
  5 e2e     end to end per importable backend, with loader_efficiency (end to end / model only)
  6 train   tools/train.py for 200 steps under bf16 on the bench set: loss finite and falling (once
            the queue's random initial keys are replaced), a checkpoint written, resumed for 20 more steps

Outputs in ``--out``: ``gpucheck.json`` (the bench JSON contract -- machine, args, results rows -- plus
``steps``, ``tests`` and ``train``), ``gpucheck.md`` (tables to paste into the README) and ``logs/``
(each step's output). Every skipped row says why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"

__all__ = ["PLANS", "STEPS", "Plan", "build_parser", "format_markdown", "main", "run_command", "run_plan"]

SCHEMA_VERSION = 1
STEPS = ("env", "tests", "model", "loader", "e2e", "train")
# Packages the bare GPU machine may lack; each is imported lazily by the code that needs it.
OPTIONAL = ("nvidia.dali", "ffcv", "pynvml", "pytest", "tensorboard", "matplotlib", "sklearn", "yaml", "tqdm",
            "psutil", "numba", "PIL")

DALI_HELP = """\
DALI on a GPU machine without network (it is not on the device image; DALI rows are skipped otherwise,
each with the reason "backend 'dali' is not installed"):
  1. here, from the project root:  ../shared/device/make-wheelhouse.sh
     (pip-downloads nvidia-dali-cuda130 and its dependencies for Python 3.12 into .device/parts/whl.partNN,
     60 MiB each, and lists them in .device/CARRY; .device/ is git-ignored)
  2. carry the parts one per device call, naming the file itself (carry: [".device/parts/whl.part00"],
     then part01, ...): a carried path replaces what is there, and parts carried earlier stay while the
     machine is warm
  3. on the device:  bash ../shared/device/install-wheelhouse.sh   (or shared/device/install-wheelhouse.sh)
     then, in the same warm session:  make gpu-check
pytest is carried the same way when the image lacks it (make-wheelhouse.sh nvidia-dali-cuda130 pytest);
without it the CUDA-tests step is skipped with that reason. FFCV builds from source against libturbojpeg
and OpenCV and is not carried: its rows are skipped there. A test module that cannot be imported there
(a package missing) is listed as "not collected", not as a failure.
"""


@dataclass(frozen=True)
class Plan:
    """Sizes of one plan. ``gpu`` is the issue's run; ``cpu`` the same steps, tiny, for CI."""

    name: str
    device: str
    shares: dict[str, float]  # seconds each step is planned to take; unused time passes to later steps
    num_images: int
    # (label, bench arguments) per model-only row
    model_rows: tuple[tuple[str, tuple[str, ...]], ...]
    loader_args: tuple[str, ...]  # bench arguments of the loader-only and end-to-end rows
    timing: tuple[str, ...]  # --warmup / --steps / --repeats of every bench call
    train: dict[str, Any]  # config overrides of the training run
    train_steps: int
    resume_steps: int
    backends: str = "all"
    cuda_tests: tuple[str, ...] | None = None  # test files to collect; None = every file with a cuda mark
    skip_compile: str | None = None  # why the torch.compile row is skipped in this plan, if it is
    env: dict[str, str] = field(default_factory=dict)  # environment of every command


_GPU_TRAIN = {"backend": "torchvision", "recipe": "stl96", "backbone": "resnet18", "proj_hidden": 2048,
              "proj_dim": 128, "queue_size": 4096, "batch_size": 128, "lr": 0.3, "w_sim": 1.0, "momentum": 0.99,
              "warmup_epochs": 1, "precision": "bf16", "channels_last": True, "log_every": 10, "ckpt_every": 100}
_CPU_TRAIN = {"backend": "torchvision", "recipe": "cifar32", "backbone": "resnet18", "proj_hidden": 64,
              "proj_dim": 32, "queue_size": 16, "batch_size": 8, "lr": 1.0, "w_sim": 1.0, "momentum": 0.99,
              "warmup_epochs": 0, "precision": "no", "channels_last": False, "log_every": 2, "ckpt_every": 10}

PLANS: dict[str, Plan] = {
    "gpu": Plan(
        name="gpu", device="cuda", num_images=2048,
        shares={"env": 15, "tests": 60, "model": 150, "loader": 60, "e2e": 70, "train": 120},
        model_rows=(
            ("rn50-224-eager", ("--model", "resnet50", "--size", "224", "--batch", "256", "--precision", "bf16",
                                "--channels-last")),
            ("rn50-224-compile", ("--model", "resnet50", "--size", "224", "--batch", "256", "--precision", "bf16",
                                  "--channels-last", "--compile")),
            ("rn18cifar-32", ("--model", "resnet18_cifar", "--size", "32", "--batch", "512", "--precision", "bf16",
                              "--channels-last")),
        ),
        loader_args=("--model", "resnet50", "--size", "224", "--batch", "256", "--precision", "bf16",
                     "--channels-last"),
        timing=("--warmup", "5", "--steps", "15", "--repeats", "3"),
        train=_GPU_TRAIN, train_steps=200, resume_steps=20,
    ),
    "cpu": Plan(
        name="cpu", device="cpu", num_images=64,
        shares={"env": 5, "tests": 35, "model": 35, "loader": 55, "e2e": 60, "train": 50},
        model_rows=(
            ("rn50-16", ("--model", "resnet50", "--size", "16", "--batch", "4", "--precision", "no")),
            ("rn50-16-compile", ("--model", "resnet50", "--size", "16", "--batch", "4", "--precision", "no",
                                 "--compile")),
            ("rn18cifar-16", ("--model", "resnet18_cifar", "--size", "16", "--batch", "4", "--precision", "no")),
        ),
        loader_args=("--model", "resnet18_cifar", "--size", "16", "--batch", "4", "--precision", "no"),
        timing=("--warmup", "1", "--steps", "1", "--repeats", "2"),
        train=_CPU_TRAIN, train_steps=8, resume_steps=2,
        skip_compile="torch.compile rows run in the GPU plan only (inductor compiles for minutes on 2 CPU cores)",
        # one intra-op thread: on a shared 2-core machine, waiting OpenMP threads made tiny steps ~10x slower
        env={"OMP_NUM_THREADS": "1"},
    ),
}


def _quick(plan: Plan) -> Plan:
    """The CPU plan cut to what tests the script in about a minute: one model row, torchvision only."""
    return Plan(**{**plan.__dict__, "name": "cpu-quick", "model_rows": plan.model_rows[-1:],
                   "backends": "torchvision", "cuda_tests": ("tests/test_gpu_augment.py",),
                   "shares": {k: v * 0.6 for k, v in plan.shares.items()}})


# ---------------------------------------------------------------------------------------------------
# running one command under a timeout
# ---------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one command did: ``status`` is ok, failed or timeout; the log holds its stdout + stderr."""

    status: str
    seconds: float
    returncode: int | None
    log: Path
    tail: str = ""


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_command(cmd: Sequence[str], *, timeout: float, log: Path, env: dict[str, str] | None = None) -> Outcome:
    """Run ``cmd`` from the project root in its own process group; kill the whole group at ``timeout``.

    The group matters: a bench or training run starts loader worker processes that would otherwise
    outlive a killed parent and take the next step's CPU.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, "timeout"
    seconds = time.perf_counter() - t0
    return Outcome(status, seconds, rc, log, _tail(log.read_text(errors="replace")))


# ---------------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------------
@dataclass
class Context:
    """What the steps share: options, the plan, where outputs go and what they found so far."""

    args: argparse.Namespace
    plan: Plan
    out: Path
    deadline: float
    report: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def bench_dir(self) -> str:
        return str(Path(self.args.bench_dir).resolve())


def _find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing ("nvidia" for nvidia.dali)
        return False


def _nvidia_smi() -> dict[str, str] | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    name, memory, driver = (x.strip() for x in out.stdout.strip().splitlines()[0].split(",")[:3])
    return {"name": name, "memory": memory, "driver": driver}


def step_env(ctx: Context, timeout: float) -> dict[str, Any]:
    """Machine facts in this process (cheap): the bench's machine_info plus nvidia-smi and optional packages."""
    optional = {m: _find(m) for m in OPTIONAL}
    result: dict[str, Any] = {"optional": optional, "nvidia_smi": _nvidia_smi()}
    sys.path[:0] = [p for p in (str(ROOT), str(TOOLS)) if p not in sys.path]
    import torch
    from _measure import machine_info

    result["cuda_available"] = torch.cuda.is_available()
    machine = machine_info(torch.device(ctx.plan.device) if torch.cuda.is_available() else None)
    ctx.report["machine"] = machine
    v = machine["versions"]
    gpu = machine.get("gpu") or {}
    summary = (f"{gpu.get('name', 'no GPU')}"
               + (f" {gpu['memory_bytes'] / 2**30:.0f} GiB, CUDA {gpu['cuda']}" if gpu else "")
               + (f", driver {result['nvidia_smi']['driver']}" if result["nvidia_smi"] else "")
               + f"; torch {v['torch']}, torchvision {v['torchvision']}, accelerate {v['accelerate']}, "
                 f"numba {v['numba']}, DALI {v['dali'] or 'absent'}, FFCV {v['ffcv'] or 'absent'}")
    missing = [m for m, ok in optional.items() if not ok]
    if missing:
        summary += "; not importable: " + ", ".join(missing)
    return {"status": "ok", "summary": summary, **result}


def _junit_rows(path: Path) -> list[dict[str, str]]:
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                if child.get("message") == "collection failure":  # a module this machine cannot import
                    outcome = "not collected"
                message = (child.get("message") or "").strip().splitlines()[0:1]
                message = message[0][:200] if message else ""
                break
        name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        rows.append({"test": name, "outcome": outcome, "message": message})
    return rows


def _cuda_test_files() -> list[str]:
    """The test files holding a ``cuda`` mark: collecting only these saves importing the whole suite."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "@pytest.mark.cuda" in p.read_text(errors="replace"))


def step_tests(ctx: Context, timeout: float) -> dict[str, Any]:
    """``pytest -m cuda`` over the suite; a module that cannot be collected here is an error row, not a stop."""
    if not _find("pytest"):
        return {"status": "skipped", "reason": "pytest not importable on this machine"}
    xml = ctx.out / "cuda-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={xml}", *(ctx.plan.cuda_tests or _cuda_test_files())]
    o = run_command(cmd, timeout=timeout, log=ctx.out / "logs" / "tests.log", env=ctx.plan.env)
    if not xml.is_file():
        return {"status": o.status if o.status != "ok" else "failed", "seconds": o.seconds,
                "reason": f"pytest wrote no report (exit {o.returncode})", "log_tail": o.tail}
    tests = _junit_rows(xml)
    counts = {k: sum(t["outcome"] == k for t in tests)
              for k in ("passed", "skipped", "failed", "error", "not collected")}
    ctx.report["tests"] = tests
    # pytest exits 1 on a failing test, 5 when nothing was collected (all deselected): both are findings
    status = "timeout" if o.status == "timeout" else ("failed" if counts["failed"] or counts["error"] else "ok")
    return {"status": status, "seconds": o.seconds, "counts": counts,
            "summary": ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no CUDA tests collected"}


def _bench(ctx: Context, label: str, step: str, extra: Sequence[str], timeout: float) -> tuple[Outcome, list[dict]]:
    """One tools/bench.py run; its rows (tagged with the step and label) or none when it failed."""
    out = ctx.out / "bench" / f"{label}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(TOOLS / "bench.py"), "--device", ctx.plan.device, "--num-images",
           str(ctx.plan.num_images), "--bench-dir", ctx.bench_dir(), "--workers", str(ctx.args.workers),
           *ctx.plan.timing, *extra, "--json", str(out)]
    o = run_command(cmd, timeout=timeout, log=ctx.out / "logs" / f"{label}.log", env=ctx.plan.env)
    if o.status != "ok" or not out.is_file():
        return o, []
    report = json.loads(out.read_text())
    ctx.report.setdefault("bench", {})[label] = {k: report.get(k) for k in ("args", "config", "recipe", "data")}
    rows = [{**r, "step": step, "label": label} for r in report["results"]]
    for r in rows:
        err = r.get("error") or ""
        if "is not installed" in err:
            r["skipped"] = f"{r['backend']} not importable here" + (" (see gpucheck --help)" if r["backend"] ==
                                                                     "dali" else "")
    ctx.rows.extend(rows)
    return o, rows


def _rows_status(o: Outcome, rows: list[dict]) -> str:
    if o.status != "ok":
        return o.status
    measured = [r for r in rows if r.get("images_per_s") is not None]
    broken = [r for r in rows if r.get("error") and not r.get("skipped")]
    return "failed" if broken or not measured else "ok"


def step_model(ctx: Context, timeout: float) -> dict[str, Any]:
    """Model-only rows, one bench process each, the step's time shared among them in plan order."""
    end = time.perf_counter() + timeout
    parts, notes = [], []
    for label, extra in ctx.plan.model_rows:
        if "--compile" in extra and ctx.plan.skip_compile:
            parts.append({"label": label, "status": "skipped", "reason": ctx.plan.skip_compile})
            opts = dict(zip(extra[::2], extra[1::2]))  # the row's --model / --size / --batch / --precision
            ctx.rows.append({"step": "model", "label": label, "backend": "synthetic", "mode": "model",
                             "model": opts.get("--model"), "batch": opts.get("--batch"), "size": opts.get("--size"),
                             "precision": opts.get("--precision"), "compile": True, "images_per_s": None,
                             "skipped": ctx.plan.skip_compile})
    todo = [(label, extra) for label, extra in ctx.plan.model_rows
            if not ("--compile" in extra and ctx.plan.skip_compile)]
    for i, (label, extra) in enumerate(todo):
        left = end - time.perf_counter()
        if left < 5:
            parts.append({"label": label, "status": "skipped", "reason": "step time used up"})
            continue
        # an even share of what is left, or all of it for the last row; compile gets what the others leave
        share = left if i == len(todo) - 1 else left / (len(todo) - i) * (1.6 if "--compile" in extra else 1.0)
        o, rows = _bench(ctx, label, "model", ("--modes", "model", "--backend", "torchvision", *extra),
                         min(left, share))
        status = _rows_status(o, rows)
        part: dict[str, Any] = {"label": label, "status": status, "seconds": round(o.seconds, 1)}
        if status != "ok":
            part["reason"] = next((r["error"] for r in rows if r.get("error")), None) or o.tail[-400:]
        parts.append(part)
        notes += [f"{label} {r['images_per_s']:,.0f} img/s" for r in rows if r.get("images_per_s")]
    bad = [p for p in parts if p["status"] in ("failed", "timeout")]
    return {"status": "failed" if bad else "ok", "parts": parts, "summary": "; ".join(notes) or "no rows"}


_IMPORT = {"torchvision": "torchvision", "dali": "nvidia.dali", "ffcv": "ffcv"}


def _loader_step(ctx: Context, timeout: float, step: str, modes: str) -> dict[str, Any]:
    """One bench process per importable backend (a slow one costs only its own rows), the step's time
    shared evenly; a backend that is not importable gets a skipped row without starting anything."""
    end = time.perf_counter() + timeout
    names = list(_IMPORT) if ctx.plan.backends == "all" else ctx.plan.backends.split(",")
    todo = [b for b in names if _find(_IMPORT[b])]
    mode = "loader" if modes == "loader" else "end_to_end"
    notes, statuses, tails = [], [], []
    for b in names:
        if b not in todo:
            why = f"{b} not importable here" + (" (see gpucheck --help)" if b == "dali" else "")
            ctx.rows.append({"step": step, "label": f"{step}-{b}", "backend": b, "mode": mode,
                             "images_per_s": None, "error": f"backend {b!r} is not installed", "skipped": why})
            notes.append(f"{b}: {why}")
    for i, b in enumerate(todo):
        left = end - time.perf_counter()
        if left < 5:
            statuses.append("timeout")
            notes.append(f"{b}: step time used up")
            continue
        o, rows = _bench(ctx, f"{step}-{b}", step, ("--modes", modes, "--backend", b, *ctx.plan.loader_args),
                         left / (len(todo) - i))
        mine = [r for r in rows if r["mode"] != "model"]
        statuses.append(_rows_status(o, mine))
        if statuses[-1] != "ok":
            tails.append(o.tail)
        for r in mine:
            if r.get("images_per_s") is not None:
                eff = r.get("loader_efficiency")
                notes.append(f"{b} {r['pairs_per_s']:,.0f} pairs/s" + (f" ({100 * eff:.0f}%)" if eff else ""))
            else:
                notes.append(f"{b}: {r.get('error')}")
        if not mine:
            notes.append(f"{b}: {o.status}")
    status = "timeout" if "timeout" in statuses else ("failed" if "failed" in statuses else "ok")
    out: dict[str, Any] = {"status": status if todo else "skipped", "summary": "; ".join(notes) or "no rows"}
    if tails:
        out["log_tail"] = "\n---\n".join(tails)
    return out


def step_loader(ctx: Context, timeout: float) -> dict[str, Any]:
    """Loader-only rows for every backend (not importable ones become skipped rows)."""
    return _loader_step(ctx, timeout, "loader", "loader")


def step_e2e(ctx: Context, timeout: float) -> dict[str, Any]:
    """End-to-end rows for every backend, with the model-only ceiling of the same run."""
    return _loader_step(ctx, timeout, "e2e", "end_to_end")


def _train_cmd(ctx: Context, data: str, max_steps: int) -> list[str]:
    cfg = {**ctx.plan.train, "name": "run", "out_dir": str(ctx.out / "train"), "data": data, "resume": "auto",
           "max_steps": max_steps, "knn_every": 0, "num_workers": ctx.args.workers}
    return [sys.executable, str(TOOLS / "train.py"), *(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                                        for k, v in cfg.items())]


def _falling(csv_path: Path, after_step: int) -> bool:
    """Whether the logged loss falls once the queue has been refilled: the mean of the last few logged
    values below that of the first few logged after ``after_step``.

    The first queue_size / batch steps replace the queue's random initial keys with real ones, and the
    relation loss's targets change meaning with them (it rises there); the check starts after that.
    """
    import csv

    with open(csv_path, newline="") as f:
        pts = [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss") and int(r["step"]) > after_step]
    k = min(3, len(pts) // 2)
    return k > 0 and sum(pts[-k:]) / k < sum(pts[:k]) / k


def _trend(csv_path: Path) -> dict[str, tuple[float, float]]:
    """First and last logged value of each loss column of a run's metrics.csv (the total and its terms)."""
    import csv

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for k in ("loss", "loss_rel", "loss_nce", "loss_sim"):
        vals = [float(r[k]) for r in rows if r.get(k)]
        if vals and any(vals):
            out[k] = (vals[0], vals[-1])
    return out


def step_train(ctx: Context, timeout: float) -> dict[str, Any]:
    """tools/train.py on the bench set: ``train_steps`` steps, checks, then a resume for ``resume_steps`` more."""
    end = time.perf_counter() + timeout
    sys.path[:0] = [p for p in (str(ROOT), str(TOOLS)) if p not in sys.path]
    from _benchdata import bench_root

    data = str(bench_root(ctx.plan.num_images, 0, ctx.bench_dir()))
    if not (Path(data) / "manifest.json").is_file():  # steps 3-5 did not run: generate it here
        prep = run_command([sys.executable, "-c", "import sys; sys.path.insert(0, 'tools'); import _benchdata; "
                            f"_benchdata.ensure_images({ctx.plan.num_images}, 0, {ctx.bench_dir()!r})"],
                           timeout=max(1.0, end - time.perf_counter()), log=ctx.out / "logs" / "train-data.log",
                           env=ctx.plan.env)
        if prep.status != "ok":
            return {"status": prep.status, "reason": "cannot generate the bench set", "log_tail": prep.tail}
    run_dir = ctx.out / "train" / "run"
    if run_dir.exists():  # a fresh run every time: resume=auto must not pick up an older check's checkpoint
        for p in sorted(run_dir.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    n1, n2 = ctx.plan.train_steps, ctx.plan.train_steps + ctx.plan.resume_steps
    first = run_command(_train_cmd(ctx, data, n1), timeout=(end - time.perf_counter()) * 0.85,
                        log=ctx.out / "logs" / "train.log", env=ctx.plan.env)
    info: dict[str, Any] = {"config": {**ctx.plan.train, "max_steps": n1}, "resume_to": n2}
    ctx.report["train"] = info
    if first.status != "ok":
        return {"status": first.status, "reason": f"tools/train.py ({n1} steps) {first.status}",
                "log_tail": first.tail}
    s1 = json.loads((run_dir / "summary.json").read_text())
    losses = [float(x) for x in s1["losses"]]
    info.update(steps=s1["steps"], precision=s1["precision"], backend=s1["backend"], losses=losses,
                images_per_s=s1.get("images_per_s"), seconds=round(first.seconds, 1))
    refill = ctx.plan.train["queue_size"] // ctx.plan.train["batch_size"]
    checks = {"finite": bool(losses) and all(math.isfinite(x) for x in losses),
              "falling": _falling(run_dir / "metrics.csv", refill),
              "checkpoint": (run_dir / "last.pt").is_file() and s1["steps"] == n1}
    info["falling_after_step"] = refill
    info["trend"] = _trend(run_dir / "metrics.csv")
    second = run_command(_train_cmd(ctx, data, n2), timeout=max(1.0, end - time.perf_counter()),
                         log=ctx.out / "logs" / "train-resume.log", env=ctx.plan.env)
    if second.status == "ok":
        s2 = json.loads((run_dir / "summary.json").read_text())
        resumed_log = (ctx.out / "logs" / "train-resume.log").read_text(errors="replace")
        checks["resumed"] = s2["steps"] == n2 and f"at step {n1}" in resumed_log
        checks["resumed_finite"] = all(math.isfinite(float(x)) for x in s2["losses"])
        info.update(resume_losses=s2["losses"], resume_seconds=round(second.seconds, 1))
    else:
        checks["resumed"] = False
        info["resume_error"] = second.tail
    info["checks"] = checks
    ok = all(checks.values())
    summary = (f"{n1} steps, precision {s1['precision']}, {s1['backend']}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
               if losses else f"{n1} steps, no loss logged")
    summary += "".join(f" ({k} {a:.3f} -> {b:.3f})" for k, (a, b) in info["trend"].items() if k != "loss")
    summary += f", {s1['images_per_s']:,.0f} img/s" if s1.get("images_per_s") else ""
    summary += "; " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items())
    out: dict[str, Any] = {"status": "ok" if ok else "failed", "summary": summary}
    if second.status != "ok":
        out["log_tail"] = second.tail
    return out


STEP_FUNCS: dict[str, tuple[str, Callable[[Context, float], dict[str, Any]]]] = {
    "env": ("Environment", step_env),
    "tests": ("CUDA tests (pytest -m cuda)", step_tests),
    "model": ("Model-only ReSSL step", step_model),
    "loader": ("Loader only", step_loader),
    "e2e": ("End to end", step_e2e),
    "train": ("Training run + resume", step_train),
}


def run_plan(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """Run the selected steps of ``plan`` within ``args.budget_s``; returns the report (also written)."""
    t0 = time.perf_counter()
    out = Path(args.out).resolve()  # the steps run from the project root; the caller may not
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "kind": "gpucheck",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "plan": plan.name, "budget_s": args.budget_s, "machine": None,
        "args": {k: v for k, v in vars(args).items()}, "steps": [], "results": [],
    }
    ctx = Context(args, plan, out, t0 + args.budget_s, report)
    selected = [s for s in STEPS if s in args.step_list]
    for i, name in enumerate(selected):
        title, fn = STEP_FUNCS[name]
        later = sum(plan.shares[s] for s in selected[i + 1:])
        left = ctx.left()
        timeout = min(left, max(plan.shares[name], left - later))
        entry: dict[str, Any] = {"step": name, "title": title, "timeout_s": round(timeout, 1)}
        if timeout < 3:
            entry.update(status="skipped", reason=f"budget of {args.budget_s:.0f} s used up", seconds=0.0)
        else:
            s0 = time.perf_counter()
            try:
                entry.update(fn(ctx, timeout))
            except Exception as e:  # a broken step is a finding; the next step still runs
                entry.update(status="failed", reason=f"{type(e).__name__}: {e}")
            entry["seconds"] = round(time.perf_counter() - s0, 1)
        report["steps"].append(entry)
        note = entry.get("summary") or entry.get("reason") or ""
        print(f"[gpucheck] {name}: {entry['status']} in {entry['seconds']:.0f} s" + (f" - {note}" if note else ""),
              flush=True)
        report["results"] = ctx.rows
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        _write(out, report)  # after every step: a later kill still leaves what was measured
    return report


def _write(out: Path, report: dict[str, Any]) -> None:
    """gpucheck.json and gpucheck.md, each written atomically (temp file in the same directory, rename)."""
    for name, text in (("gpucheck.json", json.dumps(report, indent=2, default=str) + "\n"),
                       ("gpucheck.md", format_markdown(report))):
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


# ---------------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------------
def _num(v: float | None, fmt: str = ",.0f") -> str:
    return "-" if v is None else format(v, fmt)


def format_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a heading with machine and date, the steps, the throughput rows, tests, training."""
    m = report.get("machine") or {}
    gpu = (m.get("gpu") or {}).get("name") or "no GPU"
    torch_v = (m.get("versions") or {}).get("torch", "?")
    commit = ((m.get("git") or {}).get("commit") or "?")[:10]
    lines = [f"gpucheck ({report['plan']} plan): {gpu}, torch {torch_v}, commit {commit}, {report['date'][:10]}, "
             f"{report.get('wall_s', 0):.0f} s of a {report['budget_s']:.0f} s budget", "",
             "| step | status | s | result |", "|---|---|---|---|"]
    for s in report["steps"]:
        text = (s.get("summary") or s.get("reason") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {s['title']} | {s['status']} | {s.get('seconds', 0):.0f} | {text} |")
    rows = report.get("results") or []
    if rows:
        lines += ["", "| step | backend | mode | model | batch | size | precision | compile | images/s | pairs/s "
                      "| loader eff. | peak GPU mem | note |", "|" + "---|" * 13]
        for r in rows:
            eff = r.get("loader_efficiency")
            mem = r.get("peak_mem_bytes")
            note = r.get("skipped") or r.get("error") or ""
            if not note and r.get("h2d_bytes_per_s") is not None:
                note = f"H2D {r['h2d_bytes_per_s'] / 1e9:.2f} GB/s"
            elif not note and r.get("device") == "cuda" and r["mode"] != "model":
                note = "H2D: no NVML (pynvml not importable)"
            ips = r.get("images_per_s")
            rate = "-" if ips is None else f"{ips:,.0f} ± {r.get('images_per_s_std') or 0:,.0f}"
            lines.append(f"| {r['step']} | {r['backend']} | {r['mode']} | {r.get('model', '')} | {r.get('batch', '')} "
                         f"| {r.get('size', '')} | {r.get('precision', '')} | {'yes' if r.get('compile') else 'no'} "
                         f"| {rate} | {_num(r.get('pairs_per_s'))} | {'-' if eff is None else f'{100 * eff:.0f}%'} "
                         f"| {'-' if mem is None else f'{mem / 2**30:.1f} GiB'} | {note.replace('|', '/')} |")
    tests = report.get("tests") or []
    if tests:
        lines += ["", "| CUDA test | outcome | note |", "|---|---|---|"]
        lines += [f"| {t['test']} | {t['outcome']} | {t['message'].replace('|', '/')} |" for t in tests]
    tr = report.get("train") or {}
    if tr.get("losses"):
        lines += ["", f"Training run: {tr['config']['backbone']} {tr['config']['recipe']} batch "
                      f"{tr['config']['batch_size']} {tr.get('precision')}, {tr.get('steps')} steps in "
                      f"{tr.get('seconds')} s ({_num(tr.get('images_per_s'))} img/s), loss "
                      + " ".join(f"{x:.3f}" for x in tr["losses"])
                      + f"; resumed to {tr['resume_to']}: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                                                        for k, v in tr.get("checks", {}).items())]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpucheck.py", description=__doc__, epilog=DALI_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpucheck", help="output directory (default runs/gpucheck)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the whole check in seconds (default 480; 240 with --cpu: "
                        "about a dozen processes each import torch, 13 s apiece on a loaded 2-core machine)")
    p.add_argument("--cpu", action="store_true", help="the same plan on CPU with tiny sizes (CI tests the script)")
    p.add_argument("--quick", action="store_true", help="with --cpu: one model row, torchvision only, 8+2 "
                                                        "training steps, one CUDA test file (about a minute)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {','.join(STEPS)} (default: all)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: the cores this process "
                                                             "may use)")
    p.add_argument("--bench-dir", default="data/bench", help="cache of the generated bench set (default data/bench)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse, check the options before any work, run the plan; returns the report (for tests)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.step_list = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in args.step_list if s not in STEPS]
    if bad or not args.step_list:
        parser.error(f"--steps expects a comma list of {','.join(STEPS)}, got {args.steps!r}")
    if args.quick and not args.cpu:
        parser.error("--quick shortens the CPU plan; use it with --cpu")
    if args.budget_s is None:
        args.budget_s = 240.0 if args.cpu else 480.0
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.workers is None:
        args.workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out!r} is a file; expected a directory")
    if not args.cpu:
        try:
            import torch
        except ImportError as e:
            parser.error(f"torch is not importable ({e}); gpucheck needs the machine's torch")
        if not torch.cuda.is_available():
            parser.error("torch sees no CUDA device here; run with --cpu for the CPU plan")
    plan = PLANS["cpu" if args.cpu else "gpu"]
    if args.quick:
        plan = _quick(plan)
    report = run_plan(args, plan)
    print(format_markdown(report))
    print(f"[gpucheck] wrote {Path(args.out) / 'gpucheck.json'} and gpucheck.md in {report['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
