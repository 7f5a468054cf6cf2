"""tools/gpucheck.py: the prepared GPU check, tested through its CPU plan and its step machinery."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpucheck  # noqa: E402


def test_help_says_how_to_carry_dali_and_that_its_rows_skip_otherwise(capsys):
    with pytest.raises(SystemExit) as exc:
        gpucheck.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("make-wheelhouse.sh", "install-wheelhouse.sh", ".device/parts/whl.part00", "one per device call",
                   "DALI rows are skipped", "--budget-s", "--cpu", "pytest -m cuda"):
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


def test_the_gpu_plan_is_the_issues_run():
    plan = gpucheck.PLANS["gpu"]
    labels = dict(plan.model_rows)
    assert labels["rn50-224-eager"][:6] == ("--model", "resnet50", "--size", "224", "--batch", "256")
    assert "--compile" in labels["rn50-224-compile"] and "--channels-last" in labels["rn50-224-eager"]
    assert labels["rn18cifar-32"][:6] == ("--model", "resnet18_cifar", "--size", "32", "--batch", "512")
    assert plan.train["precision"] == "bf16" and (plan.train_steps, plan.resume_steps) == (200, 20)
    assert sum(plan.shares.values()) <= 480 and set(plan.shares) == set(gpucheck.STEPS)


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
    assert (out / "train" / "run" / "last.pt").is_file() and (out / "logs" / "train-resume.log").is_file()
    written = json.loads((out / "gpucheck.json").read_text())
    assert written["schema"] == 1 and written["kind"] == "gpucheck" and written["plan"] == "cpu-quick"
    assert {"machine", "args", "results", "steps"} <= set(written)
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
           "name=bare", "recipe=cifar32", "backbone=resnet18", "proj_hidden=32", "proj_dim=16", "queue_size=16",
           "batch_size=8", "num_workers=0", "channels_last=false", "knn_every=0", "max_steps=3", "log_every=1"]
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
    assert gpucheck._falling(path, after_step=30) is want
