"""GPU readiness: one prepared command that turns a briefly lent GPU machine into this project's figures.

    make gpu-check                                     # = PYTHONPATH=. python tools/gpucheck.py
    PYTHONPATH=. python3 tools/gpucheck.py --out runs/gpucheck --steps env,model,compile --append
    PYTHONPATH=. python tools/gpucheck.py --cpu        # the same plan, tiny sizes, on CPU

Runs from a plain checkout with the machine's own packages (python, torch, torchvision, accelerate,
numba) plus the wheels ``make gpu-wheels`` packed here (DALI, and FFCV built self-contained for
CPython 3.12). The steps, in order, each in its own process group with a timeout cut from
``--budget-s``; a step that fails or runs out of time is recorded and the next runs:

  1 wheels  reassemble the carried .device/parts/whl.partNN, pip-install them offline into --site
  2 env     GPU, driver / CUDA, versions, importable packages, the C compiler, /dev/shm and the
            DataLoader workers that fit it (fewer, or 'file_system' sharing under a low ulimit -n)
  3 tests   the CUDA tests (``pytest -m cuda``): pass / skip / fail per test
  4 model   model-only ReSSL step (ressl.step.TrainStep): RN50 @224 bf16 channels_last batch 256 eager;
            RN18-CIFAR @32 batch 512; peak memory
  5 compile the RN50 row under torch.compile, with a budget of its own that fits a cold inductor
            compile (forward + backward + teacher), after checking for the C compiler Triton needs
  6 loader  loader-only images/s at 224 for every importable backend (H2D bytes/s with pynvml)
  7 e2e     end to end per importable backend, with loader_efficiency (end to end / model only)
  8 train   tools/train.py for 200 bf16 steps on the bench set: loss finite and falling (once the
            queue's random initial keys are replaced), a checkpoint, resumed for 20 more steps

Outputs in ``--out``: ``gpucheck.json`` (the bench JSON contract -- machine, args, results rows -- plus
``steps``, ``tests``, ``train``, ``host``), ``gpucheck.md`` (tables for the README, one throughput unit:
images/s) and ``logs/``. ``--append`` keeps the steps of an earlier call in the same ``--out`` (the plan
below spreads the check over three device calls). Every skipped row says why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from harness.gpuhost import (  # noqa: E402
    LAUNCH,
    Outcome,
    c_compiler,
    install_wheelhouse,
    loader_workers,
    nvidia_smi,
    run_command,
)
from harness.gpuhost import find_module as _find  # noqa: E402
from harness.gpuplan import DEVICE_HELP, OPTIONAL, PLANS, STEPS, VIEWS, Plan, quick  # noqa: E402
from harness.gpureport import (  # noqa: E402
    SCHEMA_VERSION,
    UNIT,
    earlier_report,
    format_markdown,
    junit_rows,
    loss_falling,
    loss_trend,
    train_line,
    write_report,
)

__all__ = ["PLANS", "STEPS", "Plan", "build_parser", "format_markdown", "main", "run_command", "run_plan"]

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

    def host(self) -> dict[str, Any]:
        """The C compiler and the DataLoader workers that fit /dev/shm, checked once per call."""
        if "host" not in self.report or self.report["host"].get("pid") != os.getpid():
            opts = dict(zip(self.plan.loader_args[::2], self.plan.loader_args[1::2]))
            train = self.plan.train
            self.report["host"] = {
                "pid": os.getpid(), "compiler": c_compiler(),
                "bench_workers": loader_workers(self.args.workers, int(opts["--batch"]), int(opts["--size"]), VIEWS),
                "train_workers": loader_workers(self.args.workers, train["batch_size"], _train_size(train), VIEWS)}
        return self.report["host"]


def _train_size(train: dict[str, Any]) -> int:
    from pipelines.spec import get_recipe

    return get_recipe(train["recipe"]).weak.size


def step_wheels(ctx: Context, timeout: float) -> dict[str, Any]:
    """The carried wheelhouse (make gpu-wheels) installed offline; the CPU plan only reassembles it."""
    return install_wheelhouse(ROOT, Path(ctx.args.site), timeout, install=ctx.plan.install_wheels)


def step_env(ctx: Context, timeout: float) -> dict[str, Any]:
    """Machine facts in this process (cheap): the bench's machine_info, nvidia-smi, packages, compiler, shm."""
    optional = {m: _find(m) for m in OPTIONAL}
    result: dict[str, Any] = {"optional": optional, "nvidia_smi": nvidia_smi()}
    import torch

    from harness.machine import machine_info

    result["cuda_available"] = torch.cuda.is_available()
    machine = machine_info(torch.device(ctx.plan.device) if torch.cuda.is_available() else None)
    ctx.report["machine"] = machine
    v = machine["versions"]
    gpu = machine.get("gpu") or {}
    host = ctx.host()
    cc, shm = host["compiler"], host["bench_workers"]
    summary = (f"{gpu.get('name', 'no GPU')}"
               + (f" {gpu['memory_bytes'] / 2**30:.0f} GiB, CUDA {gpu['cuda']}" if gpu else "")
               + (f", driver {result['nvidia_smi']['driver']}" if result["nvidia_smi"] else "")
               + f"; torch {v['torch']}, torchvision {v['torchvision']}, accelerate {v['accelerate']}, "
                 f"numba {v['numba']}, DALI {v['dali'] or 'absent'}, FFCV {v['ffcv'] or 'absent'}"
               + f"; C compiler {cc['version'] if cc['cc'] else 'NONE'}; /dev/shm {shm['shm_free_bytes'] / 2**30:.1f}"
                 f" GiB free, loader workers {shm['workers']} of {shm['asked']}"
               + (f" ({shm['reason']})" if shm.get("reason") else ""))
    missing = [m for m, ok in optional.items() if not ok]
    if missing:
        summary += "; not importable: " + ", ".join(missing)
    return {"status": "ok", "summary": summary, **result}


def step_tests(ctx: Context, timeout: float) -> dict[str, Any]:
    """``pytest -m cuda`` over the suite; a module that cannot be collected here is an error row, not a stop."""
    if not _find("pytest"):
        return {"status": "skipped", "reason": "pytest not importable on this machine"}
    xml = ctx.out / "cuda-tests.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={xml}", *(ctx.plan.cuda_tests or _cuda_test_files())]
    o = run_command(cmd, timeout=timeout, log=ctx.out / "logs" / "tests.log", env=ctx.plan.env)
    if not xml.is_file():
        return {"status": o.status if o.status != "ok" else "failed", "seconds": o.seconds,
                "reason": f"pytest wrote no report (exit {o.returncode})", "log_tail": o.tail}
    tests = junit_rows(xml)
    counts = {k: sum(t["outcome"] == k for t in tests)
              for k in ("passed", "skipped", "failed", "error", "not collected")}
    ctx.report["tests"] = tests
    # pytest exits 1 on a failing test, 5 when nothing was collected (all deselected): both are findings
    status = "timeout" if o.status == "timeout" else ("failed" if counts["failed"] or counts["error"] else "ok")
    return {"status": status, "seconds": o.seconds, "counts": counts,
            "summary": ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no CUDA tests collected"}


def _python(script: Path, sharing: str | None) -> list[str]:
    """The interpreter command for ``script``, under torch's 'file_system' sharing strategy when asked."""
    return [sys.executable, "-c", LAUNCH, str(script)] if sharing else [sys.executable, str(script)]


def _bench(ctx: Context, label: str, step: str, extra: Sequence[str], timeout: float,
           workers: dict[str, Any] | None = None) -> tuple[Outcome, list[dict]]:
    """One tools/bench.py run; its rows (tagged with the step and label) or none when it failed."""
    out = ctx.out / "bench" / f"{label}.json"
    out.unlink(missing_ok=True)
    n = ctx.args.workers if workers is None else workers["workers"]
    cmd = [*_python(TOOLS / "bench.py", (workers or {}).get("sharing")), "--device", ctx.plan.device,
           "--num-images", str(ctx.plan.num_images), "--bench-dir", ctx.bench_dir(), "--workers", str(n),
           *ctx.plan.timing, *extra, "--json", str(out)]
    o = run_command(cmd, timeout=timeout, log=ctx.out / "logs" / f"{label}.log", env=ctx.plan.env)
    if o.status != "ok" or not out.is_file():
        return o, []
    report = json.loads(out.read_text())
    keep = ("args", "config", "recipe", "data", "stages", "bottlenecks")
    ctx.report.setdefault("bench", {})[label] = {k: report.get(k) for k in keep}
    rows = [{**r, "step": step, "label": label} for r in report["results"]]
    for r in rows:
        if "is not installed" in (r.get("error") or ""):
            r["skipped"] = f"{r['backend']} not importable here (see gpucheck --help)"
        if workers and workers.get("reason"):
            r["workers_note"] = workers["reason"]
    ctx.rows.extend(rows)
    return o, rows


def _rows_status(o: Outcome, rows: list[dict]) -> str:
    if o.status != "ok":
        return o.status
    measured = [r for r in rows if r.get("images_per_s") is not None]
    broken = [r for r in rows if r.get("error") and not r.get("skipped")]
    return "failed" if broken or not measured else "ok"


def _skipped_row(step: str, label: str, extra: Sequence[str], why: str) -> dict[str, Any]:
    opts = dict(zip(extra[::2], extra[1::2]))  # the row's --model / --size / --batch / --precision
    return {"step": step, "label": label, "backend": "synthetic", "mode": "model", "model": opts.get("--model"),
            "batch": opts.get("--batch"), "size": opts.get("--size"), "precision": opts.get("--precision"),
            "compile": "--compile" in extra, "images_per_s": None, "skipped": why}


def _model_rows(ctx: Context, step: str, todo: Sequence[tuple[str, Sequence[str]]], timeout: float) -> dict:
    """Model-only rows, one bench process each, the step's time shared evenly in plan order."""
    end = time.perf_counter() + timeout
    parts, notes = [], []
    for i, (label, extra) in enumerate(todo):
        left = end - time.perf_counter()
        if left < 5:
            parts.append({"label": label, "status": "skipped", "reason": "step time used up"})
            ctx.rows.append(_skipped_row(step, label, extra, "step time used up"))
            continue
        o, rows = _bench(ctx, label, step, ("--modes", "model", "--backend", "torchvision", *extra),
                         left / (len(todo) - i))
        status = _rows_status(o, rows)
        part: dict[str, Any] = {"label": label, "status": status, "seconds": round(o.seconds, 1)}
        if status != "ok":
            part["reason"] = (f"timeout after {o.seconds:.0f} s" if status == "timeout" else
                              next((r["error"] for r in rows if r.get("error")), None) or o.tail[-400:])
            if not rows:
                ctx.rows.append(_skipped_row(step, label, extra, f"{status} after {o.seconds:.0f} s"))
        parts.append(part)
        notes += [f"{label} {r['images_per_s']:,.0f} {UNIT}" for r in rows if r.get("images_per_s")]
        notes += [f"{label}: {part['reason'][-200:]}" for _ in (0,) if status != "ok"]
    bad = [p for p in parts if p["status"] in ("failed", "timeout")]
    return {"status": "failed" if bad else "ok", "parts": parts, "summary": "; ".join(notes) or "no rows"}


def step_model(ctx: Context, timeout: float) -> dict[str, Any]:
    """Eager model-only rows."""
    return _model_rows(ctx, "model", ctx.plan.model_rows, timeout)


def step_compile(ctx: Context, timeout: float) -> dict[str, Any]:
    """torch.compile rows with the whole step's budget (a cold compile), after the C compiler check."""
    why = ctx.plan.skip_compile or (ctx.host()["compiler"].get("reason") if ctx.plan.device == "cuda" else None)
    if why:
        ctx.rows.extend(_skipped_row("compile", label, extra, why) for label, extra in ctx.plan.compile_rows)
        return {"status": "skipped", "reason": why}
    return _model_rows(ctx, "compile", ctx.plan.compile_rows, timeout)


def _cuda_test_files() -> list[str]:
    """The test files holding a ``cuda`` mark: collecting only these saves importing the whole suite."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "@pytest.mark.cuda" in p.read_text(errors="replace"))


def _loader_step(ctx: Context, timeout: float, step: str, modes: str) -> dict[str, Any]:
    """One bench process per importable backend (a slow one costs only its own rows), the step's time
    shared evenly; a backend that is not importable gets a skipped row without starting anything.
    torchvision's DataLoader workers are cut to what /dev/shm holds (see the env step)."""
    end = time.perf_counter() + timeout
    from pipelines import BACKENDS, available_backends

    names = list(BACKENDS) if ctx.plan.backends == "all" else ctx.plan.backends.split(",")
    importable = available_backends()
    todo = [b for b in names if importable[b]]
    mode = "loader" if modes == "loader" else "end_to_end"
    notes, statuses, tails = [], [], []
    for b in names:
        if b not in todo:
            why = f"{b} not importable here (see gpucheck --help)"
            ctx.rows.append({"step": step, "label": f"{step}-{b}", "backend": b, "mode": mode,
                             "images_per_s": None, "error": f"backend {b!r} is not installed", "skipped": why})
            notes.append(f"{b}: {why}")
    for i, b in enumerate(todo):
        left = end - time.perf_counter()
        if left < 5:
            statuses.append("timeout")
            notes.append(f"{b}: step time used up")
            continue
        workers = ctx.host()["bench_workers"] if b == "torchvision" else None
        o, rows = _bench(ctx, f"{step}-{b}", step, ("--modes", modes, "--backend", b, *ctx.plan.loader_args),
                         left / (len(todo) - i), workers)
        mine = [r for r in rows if r["mode"] != "model"]
        statuses.append(_rows_status(o, mine))
        if statuses[-1] != "ok":
            tails.append(o.tail)
        for r in mine:
            if r.get("images_per_s") is not None:
                eff = r.get("loader_efficiency")
                notes.append(f"{b} {r['images_per_s']:,.0f} {UNIT}" + (f" ({100 * eff:.0f}%)" if eff else ""))
            else:
                notes.append(f"{b}: {r.get('error')}")
        if not mine:
            notes.append(f"{b}: {o.status}")
    status = "timeout" if "timeout" in statuses else ("failed" if "failed" in statuses else "ok")
    out: dict[str, Any] = {"status": status if todo else "skipped", "summary": "; ".join(notes) or "no rows"}
    if not todo:
        out["reason"] = out["summary"]
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
    workers = ctx.host()["train_workers"]
    cfg = {**ctx.plan.train, "name": "run", "out_dir": str(ctx.out / "train"), "data": data, "resume": "auto",
           "max_steps": max_steps, "knn_every": 0, "num_workers": workers["workers"]}
    return [*_python(TOOLS / "train.py", workers.get("sharing")),
            *(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in cfg.items())]


def step_train(ctx: Context, timeout: float) -> dict[str, Any]:
    """tools/train.py on the bench set: ``train_steps`` steps, checks, then a resume for ``resume_steps`` more."""
    end = time.perf_counter() + timeout
    from harness.benchdata import bench_root

    data = str(bench_root(ctx.plan.num_images, 0, ctx.bench_dir()))
    if not (Path(data) / "manifest.json").is_file():  # steps 3-5 did not run: generate it here
        prep = run_command([sys.executable, "-c", "from harness import benchdata; "
                            f"benchdata.ensure_images({ctx.plan.num_images}, 0, {ctx.bench_dir()!r})"],
                           timeout=max(1.0, end - time.perf_counter()), log=ctx.out / "logs" / "train-data.log",
                           env=ctx.plan.env)
        if prep.status != "ok":
            return {"status": prep.status, "reason": "cannot generate the bench set", "log_tail": prep.tail}
    run_dir = ctx.out / "train" / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: resume=auto must not pick up an older checkpoint
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
    views_per_s = s1.get("images_per_s")  # train.py counts every view it trains on
    info.update(steps=s1["steps"], precision=s1["precision"], backend=s1["backend"], losses=losses,
                images_per_s=views_per_s / VIEWS if views_per_s else None, views_per_s=views_per_s,
                seconds=round(first.seconds, 1), workers=ctx.host()["train_workers"])
    refill = ctx.plan.train["queue_size"] // ctx.plan.train["batch_size"]
    checks = {"finite": bool(losses) and all(math.isfinite(x) for x in losses),
              "falling": loss_falling(run_dir / "metrics.csv", refill),
              "checkpoint": (run_dir / "last.pt").is_file() and s1["steps"] == n1}
    info["falling_after_step"] = refill
    info["trend"] = loss_trend(run_dir / "metrics.csv")
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
    out: dict[str, Any] = {"status": "ok" if ok else "failed", "summary": train_line(info)}
    if second.status != "ok":
        out["log_tail"] = second.tail
    return out


STEP_FUNCS: dict[str, tuple[str, Callable[[Context, float], dict[str, Any]]]] = {
    "wheels": ("Carried wheels", step_wheels),
    "env": ("Environment", step_env),
    "tests": ("CUDA tests (pytest -m cuda)", step_tests),
    "model": ("Model-only ReSSL step", step_model),
    "compile": ("Model-only, torch.compile", step_compile),
    "loader": ("Loader only", step_loader),
    "e2e": ("End to end", step_e2e),
    "train": ("Training run + resume", step_train),
}


def run_plan(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """Run the selected steps of ``plan`` within ``args.budget_s``; returns the report (also written)."""
    t0 = time.perf_counter()
    out = Path(args.out).resolve()  # the steps run from the project root; the caller may not
    out.mkdir(parents=True, exist_ok=True)
    selected = [s for s in STEPS if s in args.step_list]
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "kind": "gpucheck", "unit": UNIT,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "plan": plan.name, "budget_s": args.budget_s, "machine": None,
        "args": {k: v for k, v in vars(args).items()}, "steps": [], "results": [],
    }
    earlier = earlier_report(out, plan, selected) if getattr(args, "append", False) else None
    if earlier:
        report.update({k: v for k, v in earlier.items() if k not in ("date", "args", "budget_s")})
        report["calls"] = earlier.get("calls", 1) + 1
    ctx = Context(args, plan, out, t0 + args.budget_s, report, rows=list(report["results"]))
    done_before = list(report["steps"])
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
        done_before = [s for s in done_before if s["step"] != name]
        report["steps"] = sorted([*done_before, *[s for s in report["steps"] if s["step"] in selected], entry],
                                 key=lambda s: STEPS.index(s["step"]))
        note = entry.get("summary") or entry.get("reason") or ""
        print(f"[gpucheck] {name}: {entry['status']} in {entry['seconds']:.0f} s" + (f" - {note}" if note else ""),
              flush=True)
        report["results"] = sorted(ctx.rows, key=lambda r: STEPS.index(r["step"]) if r.get("step") in STEPS else 0)
        report["wall_s"] = round(report.get("wall_before_s", 0) + time.perf_counter() - t0, 1)
        write_report(out, report)  # after every step: a later kill still leaves what was measured
    report["wall_before_s"] = report.get("wall_s", 0)
    write_report(out, report)
    return report


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpucheck.py", description=__doc__, epilog=DEVICE_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpucheck", help="output directory (default runs/gpucheck)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of this call in seconds (default 540, inside a 10-minute device "
                        "call; 240 with --cpu: about a dozen processes each import torch)")
    p.add_argument("--cpu", action="store_true", help="the same plan on CPU with tiny sizes (CI tests the script)")
    p.add_argument("--quick", action="store_true", help="with --cpu: one model row, torchvision only, 8+2 "
                                                        "training steps, one CUDA test file (about a minute)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {','.join(STEPS)} (default: all)")
    p.add_argument("--append", action="store_true", help="keep the other steps of the report already in --out "
                                                         "(an earlier call of the same plan)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: the cores this process "
                                                             "may use; torchvision's are cut to fit /dev/shm)")
    p.add_argument("--bench-dir", default="data/bench", help="cache of the generated bench set (default data/bench)")
    p.add_argument("--site", default="/tmp/site", help="where the carried wheels are installed (default /tmp/site)")
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
        args.budget_s = 240.0 if args.cpu else 540.0
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.workers is None:  # not harness.machine.cores: importing it imports torch, which this host process
        # imports only after the check below (a missing torch is a message, not a traceback)
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
        plan = quick(plan)
    report = run_plan(args, plan)
    print(format_markdown(report))
    print(f"[gpucheck] wrote {Path(args.out) / 'gpucheck.json'} and gpucheck.md in {report['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
