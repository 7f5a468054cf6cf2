"""Runs and interfaces under misuse and faults (issue rows "Runs and resume" and "Interfaces").

Each test reproduces one way a run used to go wrong silently: two runs in one directory, a finished
run re-run, a longer schedule, a resume with a changed config, the NaN advice, duplicated metrics rows,
a leftover temp file, a ConfigError traceback.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_config import small_config

from ressl.config import ConfigError
from ressl.run import RunLock, RunLockedError
from ressl.schedule import lr_factor
from tools import train

ROOT = Path(__file__).resolve().parents[1]


def small_cfg(data, out, *extra):
    return small_config(data, out, *extra)


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["loss"]]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --- run directory lock ---------------------------------------------------------------------------------
def test_a_second_run_on_a_held_directory_is_refused_naming_the_holder(image_folder, tmp_path):
    (tmp_path / "same").mkdir()
    with RunLock(tmp_path / "same"):
        with pytest.raises(RunLockedError, match=rf"in use by pid {os.getpid()} on {socket.gethostname()}"):
            train.main(small_cfg(image_folder, tmp_path, "name=same", "max_steps=2"))
    assert not (tmp_path / "same" / "metrics.csv").exists()
    assert not (tmp_path / "same" / ".lock").exists()  # released by the holder


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    pid = dead_pid()
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 1.0, "argv": ["x"]}))
    with caplog.at_level("WARNING"), RunLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert any(f"pid {pid}" in r.message and "gone" in r.message for r in caplog.records)
    assert not lock.exists()


def test_lock_of_another_host_is_refused(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere-host", "argv": ["train.py"]}))
    with pytest.raises(RunLockedError, match=r"pid 1 on elsewhere-host.*another host.*delete"):
        RunLock(tmp_path).acquire()


def test_lock_held_by_another_live_process_is_refused(tmp_path):
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from ressl.run import RunLock; "
            "l = RunLock(sys.argv[2]); l.acquire(); print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"in use by pid {p.pid} "):
            RunLock(tmp_path).acquire()
    finally:
        p.kill()
        p.wait()
    with RunLock(tmp_path):  # killed holder: the kernel dropped its flock, the file is taken over
        pass


# --- finished runs, longer schedules, changed configs ---------------------------------------------------------
def test_finished_run_is_left_alone_and_a_longer_schedule_continues(image_folder, tmp_path, capsys):
    run = tmp_path / "fin"
    first = train.main(small_cfg(image_folder, tmp_path, "name=fin", "max_steps=4", "ckpt_every=2"))
    outputs = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    again = train.main(small_cfg(image_folder, tmp_path, "name=fin", "max_steps=4", "ckpt_every=2"))
    assert "already finished (4 of 4 steps" in capsys.readouterr().out
    assert again["losses"] == first["losses"] and len(first["losses"]) == 4
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == outputs

    longer = train.main(small_cfg(image_folder, tmp_path, "name=fin", "max_steps=7", "ckpt_every=2"))
    assert longer["steps"] == 7 and len(longer["losses"]) == 3
    r = rows(run)
    assert [int(x["step"]) for x in r] == list(range(1, 8))  # no step twice
    # steps 5..7 run at the new schedule's lr (cosine over 7 steps), re-spread from the resumed step
    for x in r[4:]:
        assert float(x["lr"]) == pytest.approx(0.2 * 8 / 256 * lr_factor(int(x["step"]), 0, 7), rel=1e-6)
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 7


def test_resume_refuses_keys_that_cannot_change_and_lists_them(image_folder, tmp_path):
    train.main(small_cfg(image_folder, tmp_path, "name=chg", "max_steps=2"))
    before = (tmp_path / "chg" / "metrics.csv").read_bytes()
    with pytest.raises(ConfigError) as e:
        train.main(small_cfg(image_folder, tmp_path, "name=chg", "max_steps=4", "batch_size=16",
                             "recipe.strong.blur_p=0.5", "proj_dim=8"))
    msg = str(e.value)
    for line in ("batch_size: 8 in the checkpoint, 16 now", "proj_dim: 16 in the checkpoint, 8 now",
                 "recipe_overrides: {} in the checkpoint, {'strong.blur_p': 0.5} now"):
        assert line in msg
    assert "max_steps" not in msg  # a longer schedule is allowed
    assert (tmp_path / "chg" / "metrics.csv").read_bytes() == before


def test_nan_message_gives_a_command_that_resumes_with_a_lower_lr(image_folder, tmp_path, monkeypatch):
    from ressl.method import ReSSL

    real_forward, calls = ReSSL.forward, {"n": 0}

    def nan_after_4(self, *a, **k):
        calls["n"] += 1
        loss, metrics = real_forward(self, *a, **k)
        return (loss * float("nan") if calls["n"] > 4 else loss), metrics

    monkeypatch.setattr(ReSSL, "forward", nan_after_4)
    cfg = small_cfg(image_folder, tmp_path, "name=nan", "max_steps=8", "ckpt_every=2", "log_every=3")
    with pytest.raises(train.NonFiniteLossError) as e:
        train.main(cfg)
    monkeypatch.setattr(ReSSL, "forward", real_forward)
    msg = str(e.value)
    assert "by step 6" in msg and "stopping without saving" in msg and "step 4" in msg  # the good checkpoint
    resume_cmd = next(line.strip() for line in msg.splitlines() if "resume=" in line and "resume=no" not in line)
    argv = shlex.split(resume_cmd)
    assert argv[:2] == ["python", os.path.relpath(ROOT / "tools" / "train.py")]
    summary = train.main(train.parse_args(argv[2:]))  # exactly what the user would run
    assert summary["steps"] == 8
    r = rows(tmp_path / "nan")
    assert [int(x["step"]) for x in r] == [3, 6, 8]  # the row before the checkpoint (step 4) kept, none twice
    for x in r[1:]:  # the halved lr really applies after the resume
        assert float(x["lr"]) == pytest.approx(0.1 * 8 / 256 * lr_factor(int(x["step"]), 0, 8), rel=1e-6)

    fresh_cmd = next(line.strip() for line in msg.splitlines() if "resume=no" in line)
    cfg2 = train.parse_args(shlex.split(fresh_cmd)[2:])
    assert cfg2.name == "nan-lr0.1" and cfg2.lr == 0.1 and cfg2.resume == "no"


def test_interrupted_checkpoint_temp_file_is_removed(image_folder, tmp_path):
    run = tmp_path / "tmpf"
    run.mkdir()
    stale = run / f".last.pt.tmp-{dead_pid()}"
    stale.write_bytes(b"\0" * 1024)
    train.main(small_cfg(image_folder, tmp_path, "name=tmpf", "max_steps=1"))
    assert not stale.exists()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


# --- interfaces -----------------------------------------------------------------------------------------------
def test_recipe_overrides_reach_the_checkpoint_and_summary(image_folder, tmp_path):
    s = train.main(small_cfg(image_folder, tmp_path, "name=rec", "max_steps=1", "recipe.strong.blur_p=0.5",
                             "recipe.weak.scale=[0.5,1.0]"))
    want = {"strong.blur_p": 0.5, "weak.scale": [0.5, 1.0]}
    assert s["recipe_overrides"] == want
    assert json.loads((tmp_path / "rec" / "summary.json").read_text())["config"]["recipe_overrides"] == want
    assert torch.load(tmp_path / "rec" / "last.pt", weights_only=True)["config"]["recipe_overrides"] == want


@pytest.mark.parametrize("override, message", [
    ("recipe.strong.blur_p=1.5", "recipe.strong.blur_p=1.5: ViewSpec 'strong': blur_p is a probability"),
    ("recipe.nope.size=8", "has no view 'nope'"),
    ("recipe=nope", "unknown recipe 'nope'"),
])
def test_bad_recipe_fails_before_any_work(override, message, image_folder, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        train.main(small_cfg(image_folder, tmp_path, "name=bad", override))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("argv, message", [
    (["tools/train.py", "lr=two"], "error: override: key 'lr' expects float"),
    (["tools/train.py", "recipe.strong.blur_p=2"], "error: recipe.strong.blur_p=2: ViewSpec 'strong'"),
    (["tools/eval.py", "--ckpt", "{bogus}", "--data", "."], "error: "),
    (["tools/export.py", "--ckpt", "{bogus}", "--out", "x.pth"], "error: "),
    (["tools/eval.py", "--ckpt", "{notes}", "--data", "."], "is not a trainer checkpoint: it is not a torch.save"),
    (["tools/eval.py", "--ckpt", "{missing}"], "error: checkpoint '{missing}' does not exist"),
    (["tools/export.py", "--ckpt", "{missing}", "--out", "x.pth"], "error: checkpoint '{missing}' does not exist"),
    (["tools/train.py", "--config", "configs/demo.yaml", "data={missing}", "out_dir={tmp}"],
     "error: dataset directory '{missing}' does not exist"),
])
def test_config_errors_print_the_message_alone_and_exit_2(argv, message, tmp_path):
    bogus = tmp_path / "bogus.pt"
    torch.save({"model": {}, "config": {"bogus_key": 1}}, bogus)
    (tmp_path / "notes.pt").write_text("a text file named like a checkpoint")
    names = {"{bogus}": str(bogus), "{notes}": str(tmp_path / "notes.pt"), "{missing}": str(tmp_path / "missing"),
             "{tmp}": str(tmp_path)}
    for k, v in names.items():
        argv = [a.replace(k, v) for a in argv]
        message = message.replace(k, v)
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and message in r.stderr, r.stderr[-2000:]
    if ("eval" in argv[0] or "export" in argv[0]) and str(bogus) in argv:
        assert "bogus_key" in r.stderr
    assert "weights_only" not in r.stderr
