"""tools/gpucheck.py: the prepared GPU check, tested through its CPU plan and its step machinery."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from trainer_config import small_args

from harness import gpuhost as _gpuhost
from harness import gpureport
from tools import gpucheck

ROOT = Path(__file__).resolve().parents[1]


def test_help_says_how_to_carry_the_wheels_and_that_their_rows_skip_otherwise(capsys):
    with pytest.raises(SystemExit) as exc:
        gpucheck.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("make gpu-wheels", "FFCV 1.0.2 for CPython 3.12", ".device/parts/whl.part00", "one per device call",
                   "not importable here", "--budget-s", "--cpu", "--append", "pytest -m cuda", "C compiler",
                   "/dev/shm"):
        assert needle in text, needle


@pytest.mark.parametrize("argv, message", [
    (["--cpu", "--steps", "env,bogus"], "--steps expects a comma list"),
    (["--quick"], "use it with --cpu"),
    (["--cpu", "--budget-s", "0"], "--budget-s must be > 0"),
])
def test_bad_options_fail_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        gpucheck.main([*argv, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gpu_plan_without_cuda_points_to_the_cpu_plan(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU plan would run")
    with pytest.raises(SystemExit):
        gpucheck.main(["--out", str(tmp_path / "out")])
    assert "run with --cpu" in capsys.readouterr().err


def test_a_machine_without_torch_gets_a_message_not_a_traceback(tmp_path):
    """The host process imports torch only when it checks for it: with torch unimportable, one message, exit 2."""
    code = ("import runpy, sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch':\n"
            "            raise ImportError('no torch on this machine')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            f"sys.argv = ['gpucheck.py', '--out', {str(tmp_path / 'out')!r}]\n"
            f"runpy.run_path({str(ROOT / 'tools' / 'gpucheck.py')!r}, run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "torch is not importable (no torch on this machine)" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_the_gpu_plan_is_the_issues_run():
    plan = gpucheck.PLANS["gpu"]
    labels = {**dict(plan.model_rows), **dict(plan.compile_rows)}
    assert labels["rn50-224-eager"][:6] == ("--model", "resnet50", "--size", "224", "--batch", "256")
    assert "--compile" in labels["rn50-224-compile"] and "--channels-last" in labels["rn50-224-eager"]
    assert not any("--compile" in extra for _, extra in plan.model_rows)
    assert labels["rn18cifar-32"][:6] == ("--model", "resnet18_cifar", "--size", "32", "--batch", "512")
    assert plan.train["precision"] == "bf16" and (plan.train_steps, plan.resume_steps) == (200, 20)
    assert set(plan.shares) == set(gpucheck.STEPS) and plan.shares["compile"] >= 200  # a cold inductor compile


def test_the_device_calls_cover_every_step_each_within_its_budget_and_a_call():
    """The help's plan: one start plus two calls (one carry part each), every step in one of them, the
    steps' shares inside the call's --budget-s, the budget inside a 10-minute device call."""
    calls = re.findall(r'call (\d), part(\d\d):.*--steps (\S+) .*--budget-s (\d+)', gpucheck.DEVICE_HELP)
    assert [c[:2] for c in calls] == [("1", "00"), ("2", "01"), ("3", "02")]
    shares = gpucheck.PLANS["gpu"].shares
    covered = set()
    for _, _, steps, budget in calls:
        names = steps.split(",")
        covered |= set(names)
        assert sum(shares[n] for n in names) <= int(budget) <= 540, (steps, budget)
    assert covered == set(gpucheck.STEPS)
    # 15 minutes of device time: the machine's start (up to ~2 min) and three transfers leave ~750 s of commands
    assert sum(int(c[3]) for c in calls) <= 750
    assert "--append" not in gpucheck.DEVICE_HELP.split("call 1")[1].split("\n")[0]


def test_loader_workers_fit_dev_shm_and_low_fd_limits_switch_sharing(monkeypatch):
    free = {"bytes": 64 * 2**20}  # a container's default /dev/shm
    monkeypatch.setattr(_gpuhost.os, "statvfs", lambda p: SimpleNamespace(f_bavail=free["bytes"] // 4096,
                                                                          f_frsize=4096))
    monkeypatch.setattr(_gpuhost.resource, "getrlimit", lambda r: (1 << 20, 1 << 20))
    tiny = _gpuhost.loader_workers(16, batch=256, size=224, views=2)
    assert tiny["workers"] == 0 and "16 workers" in tiny["reason"] and tiny["sharing"] is None
    per = 4 * 256 * 2 * 3 * 224 * 224 * 4
    free["bytes"] = 2 * 5 * per + 1  # half of the free space holds five workers' prefetched batches
    five = _gpuhost.loader_workers(16, batch=256, size=224, views=2)
    assert five["workers"] == 5 and five["bytes_per_worker"] == per
    free["bytes"] = 1 << 45
    assert "reason" not in _gpuhost.loader_workers(16, batch=256, size=224, views=2)
    monkeypatch.setattr(_gpuhost.resource, "getrlimit", lambda r: (1024, 4096))
    low = _gpuhost.loader_workers(16, batch=256, size=224, views=2)
    assert low["workers"] == 16 and low["sharing"] == "file_system" and "ulimit -n 1024" in low["reason"]


def test_compile_row_is_skipped_with_the_reason_when_no_c_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATH", str(tmp_path))
    found = _gpuhost.c_compiler()
    assert found["cc"] is None and "Triton" in found["reason"]
    monkeypatch.setattr(gpucheck, "c_compiler", lambda: found)
    args = gpucheck.build_parser().parse_args(["--out", str(tmp_path)])
    args.workers = 2
    ctx = gpucheck.Context(args, gpucheck.PLANS["gpu"], tmp_path, time.perf_counter() + 60, {})
    out = gpucheck.step_compile(ctx, 60)
    assert out["status"] == "skipped" and "no working C compiler" in out["reason"]
    assert [r["label"] for r in ctx.rows] == ["rn50-224-compile"] and "Triton" in ctx.rows[0]["skipped"]


def test_c_compiler_found_here_compiles():
    if not shutil.which("cc") and not shutil.which("gcc"):
        pytest.skip("no C compiler on this machine")
    found = _gpuhost.c_compiler()
    assert found["cc"] and found["version"]


def _wheel(path: Path, name: str) -> None:
    files = {f"{name}/__init__.py": b"VALUE = 42\n",
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(path, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
        record = f"{name}-1.0.dist-info/RECORD"
        z.writestr(record, "".join(f"{n},,\n" for n in [*files, record]))


def test_carried_parts_are_reassembled_and_installed_offline(tmp_path, monkeypatch):
    """The layout make-wheelhouse.sh writes: a tar of wheels/, split into parts; a missing part is named."""
    (tmp_path / "wheels").mkdir()
    _wheel(tmp_path / "wheels" / "gpucheckdemo-1.0-py3-none-any.whl", "gpucheckdemo")
    (tmp_path / "wheels" / "padding.bin").write_bytes(os.urandom(30000))  # so that the tar splits in parts
    blob = subprocess.run(["tar", "-C", str(tmp_path), "-cf", "-", "wheels"], capture_output=True, check=True).stdout
    parts = tmp_path / "root" / ".device" / "parts"
    parts.mkdir(parents=True)
    for i in range(0, len(blob), 20000):
        (parts / f"whl.part{i // 20000:02d}").write_bytes(blob[i:i + 20000])
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    last = sorted(parts.iterdir())[1]  # a part from the middle, not carried
    kept = last.read_bytes()
    last.unlink()
    cut = _gpuhost.install_wheelhouse(tmp_path / "root", tmp_path / "site", 60)
    assert cut["status"] == "failed" and "not a whole wheelhouse" in cut["reason"]
    last.write_bytes(kept)
    listed = _gpuhost.install_wheelhouse(tmp_path / "root", tmp_path / "site", 60, install=False)
    assert listed["status"] == "ok" and "gpucheckdemo" in listed["summary"] and not (tmp_path / "site").exists()
    done = _gpuhost.install_wheelhouse(tmp_path / "root", tmp_path / "site", 120)
    assert done["status"] == "ok" and done["installed"] == ["gpucheckdemo-1.0"], done
    assert (tmp_path / "site" / "gpucheckdemo" / "__init__.py").is_file()
    assert sys.path[0] == str(tmp_path / "site") and os.environ["PYTHONPATH"].startswith(str(tmp_path / "site"))
    out = subprocess.run([sys.executable, "-c", "import gpucheckdemo; print(gpucheckdemo.VALUE)"],
                         capture_output=True, text=True, env=os.environ.copy())
    assert out.stdout.strip() == "42", out.stderr
    assert _gpuhost.install_wheelhouse(tmp_path / "empty", tmp_path / "site", 60)["status"] == "skipped"


def test_append_keeps_the_steps_of_an_earlier_call(tmp_path, monkeypatch):
    def env(ctx, timeout):
        return {"status": "ok", "summary": "first call"}

    def model(ctx, timeout):
        ctx.rows.append({"step": "model", "backend": "synthetic", "mode": "model", "images_per_s": 7.0})
        return {"status": "ok", "summary": "second call"}

    monkeypatch.setitem(gpucheck.STEP_FUNCS, "env", ("Environment", env))
    monkeypatch.setitem(gpucheck.STEP_FUNCS, "model", ("Model", model))
    for steps, append in ((["env", "model"], False), (["model"], True)):
        args = gpucheck.build_parser().parse_args(["--cpu", "--out", str(tmp_path)] + (["--append"] if append else []))
        args.step_list, args.budget_s = steps, 30.0
        rep = gpucheck.run_plan(args, gpucheck.PLANS["cpu"])
    assert [s["step"] for s in rep["steps"]] == ["env", "model"] and rep["calls"] == 2
    assert [r["images_per_s"] for r in rep["results"]] == [7.0]  # the re-run step's rows replace its old ones
    md = (tmp_path / "gpucheck.md").read_text()
    assert "first call" in md and "second call" in md and "| images/s |" in md and "pairs/s" not in md


def test_timeout_kills_the_whole_process_group(tmp_path):
    child = "import time; time.sleep(120)"
    parent = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
              "print(p.pid, flush=True); time.sleep(120)")
    t0 = time.perf_counter()
    o = gpucheck.run_command([sys.executable, "-c", parent], timeout=3, log=tmp_path / "log.txt")
    assert o.status == "timeout" and o.returncode is None and time.perf_counter() - t0 < 20
    pid = int(o.tail.splitlines()[-1])
    time.sleep(0.5)
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return  # gone
    assert "zombie" in state or "(dead)" in state, "the grandchild outlived the timeout"


def test_failing_step_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    def broken(ctx, timeout):
        raise RuntimeError("nvidia-smi exploded")

    def fine(ctx, timeout):
        ctx.rows.append({"step": "model", "backend": "synthetic", "mode": "model", "images_per_s": 10.0})
        return {"status": "ok", "summary": "fine"}

    monkeypatch.setitem(gpucheck.STEP_FUNCS, "env", ("Environment", broken))
    monkeypatch.setitem(gpucheck.STEP_FUNCS, "model", ("Model", fine))
    args = gpucheck.build_parser().parse_args(["--cpu", "--out", str(tmp_path)])
    args.step_list, args.budget_s = ["env", "model"], 60.0
    rep = gpucheck.run_plan(args, gpucheck.PLANS["cpu"])
    assert [(s["step"], s["status"]) for s in rep["steps"]] == [("env", "failed"), ("model", "ok")]
    assert rep["steps"][0]["reason"] == "RuntimeError: nvidia-smi exploded"
    on_disk = json.loads((tmp_path / "gpucheck.json").read_text())
    assert on_disk["steps"] == rep["steps"] and on_disk["results"][0]["images_per_s"] == 10.0
    md = (tmp_path / "gpucheck.md").read_text()
    assert "| Environment | failed |" in md and "nvidia-smi exploded" in md and "| model | synthetic | model |" in md


def test_a_spent_budget_skips_the_remaining_steps(tmp_path, monkeypatch):
    def slow(ctx, timeout):
        time.sleep(2.5)
        return {"status": "ok"}

    monkeypatch.setitem(gpucheck.STEP_FUNCS, "env", ("Environment", slow))
    args = gpucheck.build_parser().parse_args(["--cpu", "--out", str(tmp_path)])
    args.step_list, args.budget_s = ["env", "tests"], 4.0
    rep = gpucheck.run_plan(args, gpucheck.PLANS["cpu"])
    assert rep["steps"][0]["status"] == "ok" and rep["steps"][0]["timeout_s"] <= 4.0
    assert rep["steps"][1]["status"] == "skipped" and "budget of 4 s used up" in rep["steps"][1]["reason"]


def test_cpu_quick_plan_runs_every_step(tmp_path):
    """The script itself on CPU: every step runs in its subprocess and lands in the JSON and Markdown."""
    out = tmp_path / "out"
    t0 = time.perf_counter()
    rep = gpucheck.main(["--cpu", "--quick", "--out", str(out), "--bench-dir", str(tmp_path / "bench"),
                         "--workers", "1", "--steps", "env,tests,model,e2e,train", "--budget-s", "170"])
    wall = time.perf_counter() - t0
    steps = {s["step"]: s for s in rep["steps"]}
    assert list(steps) == ["env", "tests", "model", "e2e", "train"]
    assert rep["wall_s"] <= 175 and wall < 200
    assert steps["env"]["status"] == "ok" and rep["machine"]["versions"]["torch"] == torch.__version__
    assert steps["env"]["optional"]["pytest"] is True
    # the CUDA tests are selected by the marker and skip here, each with its reason
    assert steps["tests"]["status"] == "ok", steps["tests"]
    assert rep["tests"] and all(t["outcome"] == "skipped" and t["message"] for t in rep["tests"])
    assert steps["model"]["status"] == "ok", steps["model"]
    model = [r for r in rep["results"] if r["step"] == "model"]
    assert len(model) == 1 and model[0]["images_per_s"] > 0 and model[0]["model"] == "resnet18_cifar"
    assert steps["e2e"]["status"] == "ok", steps["e2e"]
    e2e = next(r for r in rep["results"] if r["step"] == "e2e" and r["mode"] == "end_to_end")
    assert e2e["backend"] == "torchvision" and 0 < e2e["loader_efficiency"] < 5
    train = rep["train"]
    checks = train["checks"]
    assert checks["finite"] and checks["checkpoint"] and checks["resumed"] and checks["resumed_finite"], train
    assert isinstance(checks["falling"], bool) and train["steps"] == 8 and train["resume_to"] == 10
    assert steps["train"]["status"] == ("ok" if checks["falling"] else "failed")
    assert steps["train"]["summary"].startswith("8 steps, precision no, TorchvisionLoader: loss "), steps["train"]
    assert (out / "train" / "run" / "last.pt").is_file() and (out / "logs" / "train-resume.log").is_file()
    written = json.loads((out / "gpucheck.json").read_text())
    assert written["schema"] == 2 and written["unit"] == "images/s" and written["kind"] == "gpucheck"
    assert written["plan"] == "cpu-quick"
    assert {"machine", "args", "results", "steps"} <= set(written)
    assert written["bench"] and all({"config", "stages", "bottlenecks"} <= set(b) for b in written["bench"].values())
    md = (out / "gpucheck.md").read_text()
    assert md.startswith("gpucheck (cpu-quick plan)") and "| End to end | ok |" in md and "Training run:" in md


def test_runs_from_any_directory_without_pythonpath(tmp_path):
    """Isolated mode (no PYTHONPATH, no script directory on sys.path), from another working directory:
    the script finds the checkout itself and hands it to its subprocesses."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-I", str(ROOT / "tools" / "gpucheck.py"), "--cpu", "--steps", "env",
                          "--out", str(tmp_path / "o")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rep = json.loads((tmp_path / "o" / "gpucheck.json").read_text())
    assert rep["steps"][0]["status"] == "ok", rep["steps"][0]


def test_training_runs_where_tensorboard_and_matplotlib_are_missing(tmp_path, image_folder):
    """The GPU machine's image has neither: tools/train.py must still train, checkpoint and log the CSV."""
    shadow = tmp_path / "shadow"
    for name in ("tensorboard", "matplotlib"):
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} is absent on purpose')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), f"data={image_folder}", f"out_dir={tmp_path}",
           "name=bare", *small_args(queue_size=16, warmup_epochs=None, knn_k=None, momentum=None, lr=None,
                                    max_steps=3)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tensorboard is not installed" in out.stderr and "matplotlib is not installed" in out.stderr
    run = tmp_path / "bare"
    assert (run / "last.pt").is_file() and not (run / "tb").exists() and not (run / "curves.png").exists()
    rows = list(csv.DictReader(open(run / "metrics.csv", newline="")))
    assert [int(r["step"]) for r in rows if r["loss"]] == [1, 2, 3] and rows[-1]["knn_top1"]


@pytest.mark.parametrize("losses, want", [
    ([5.0, 7.0, 9.0, 8.5, 8.0, 7.5, 7.0], True),  # rises while the queue refills (steps <= 30), then falls
    ([5.0, 7.0, 9.0, 8.0, 8.5, 9.0, 9.5], False),  # still rising after the refill
    ([5.0, 7.0, 9.0, 8.0], False),  # one point after the refill: no trend to read
])
def test_loss_falling_is_read_after_the_queue_refill(tmp_path, losses, want):
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss,knn_top1\n" + "".join(f"{10 * (i + 1)},{x},\n" for i, x in enumerate(losses))
                    + "70,,12.5\n")
    assert gpureport.loss_falling(path, after_step=30) is want


def test_the_markdown_names_what_bounds_each_loader():
    """The loader runs' stage profiles (bench ``bottlenecks``) are kept per bench run and tabled."""
    line = "torchvision: CPU-bound at decode (1,234 pairs/s on 16 cores)"
    report = {"plan": "gpu", "date": "2026-12-07T00:00:00+00:00", "budget_s": 600, "wall_s": 10, "steps": [],
              "bench": {"loader-torchvision": {"stages": [], "bottlenecks": [
                  {"backend": "torchvision", "limit": "CPU", "stage": "decode", "pairs_per_s": 1234.0, "line": line}]},
                        "model-rn50": {"stages": None, "bottlenecks": None}}}
    md = gpureport.format_markdown(report)
    assert "| bench run | backend | bound by | stage | ceiling pairs/s | note |" in md
    assert f"| loader-torchvision | torchvision | CPU | decode | 1,234 | {line} |" in md
    del report["bench"]["loader-torchvision"]
    assert "bound by" not in gpureport.format_markdown(report)
