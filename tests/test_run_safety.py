"""tools/train.py under misuse: no result lost, no run reported as success in a wrong state, and every bad
input stopped before the work with its message alone (exit 2).

Covers a run directory another run holds, a finished run re-run, a longer schedule, a resume with keys that
cannot change, a fresh start over an existing run, checkpoints that are not one, run directories that cannot
be written, an interrupted checkpoint's temp file, recipe overrides (recorded, or refused before any work),
data that cannot fill a batch, views that cannot fit, a disk that fills at checkpoint time, the NaN stop (its
message, and the resume command it gives), and a run that ends collapsed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import resource
import shlex
import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch
from trainer_config import small_config

import ressl.io
from ressl.config import ConfigError, RunError, run_tool
from ressl.run import RunLock, RunLockedError
from ressl.schedule import lr_factor
from tools import train

ROOT = Path(__file__).resolve().parents[1]


def small_cfg(data, out, *extra):
    return small_config(data, out, *extra, backbone="resnet18_w32")


def tool(capsys, cfg) -> tuple[int, str]:
    """Run ``train.main(cfg)`` as the command line does (run_tool + exit status); returns (status, stderr)."""
    capsys.readouterr()  # what earlier runs printed
    try:
        status = train.exit_status(run_tool(lambda: train.main(cfg)))
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["loss"]]


# --- a run directory another run holds ------------------------------------------------------------------------
def test_a_second_run_on_a_held_directory_is_refused_naming_the_holder(image_folder, tmp_path):
    (tmp_path / "same").mkdir()
    with RunLock(tmp_path / "same"):
        with pytest.raises(RunLockedError, match=rf"in use by pid {os.getpid()} on {socket.gethostname()}"):
            train.main(small_config(image_folder, tmp_path, "name=same", "max_steps=2"))
    assert not (tmp_path / "same" / "metrics.csv").exists()
    assert not (tmp_path / "same" / ".lock").exists()  # released by the holder


# --- finished runs, longer schedules, changed configs ---------------------------------------------------------
def test_finished_run_is_left_alone_and_a_longer_schedule_continues(image_folder, tmp_path, capsys):
    run = tmp_path / "fin"
    first = train.main(small_config(image_folder, tmp_path, "name=fin", "max_steps=4", "ckpt_every=2"))
    outputs = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    again = train.main(small_config(image_folder, tmp_path, "name=fin", "max_steps=4", "ckpt_every=2"))
    assert "already finished (4 of 4 steps" in capsys.readouterr().out
    assert again["losses"] == first["losses"] and len(first["losses"]) == 4
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == outputs

    longer = train.main(small_config(image_folder, tmp_path, "name=fin", "max_steps=7", "ckpt_every=2"))
    assert longer["steps"] == 7 and len(longer["losses"]) == 3
    r = rows(run)
    assert [int(x["step"]) for x in r] == list(range(1, 8))  # no step twice
    # steps 5..7 run at the new schedule's lr (cosine over 7 steps), re-spread from the resumed step; a row
    # holds the lr of the step it logs (1-based step s ran at the 0-based schedule position s - 1)
    for x in r[4:]:
        assert float(x["lr"]) == pytest.approx(0.2 * 8 / 256 * lr_factor(int(x["step"]) - 1, 0, 7), rel=1e-6)
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 7


def test_resume_refuses_keys_that_cannot_change_and_lists_them(image_folder, tmp_path):
    train.main(small_config(image_folder, tmp_path, "name=chg", "max_steps=2"))
    before = (tmp_path / "chg" / "metrics.csv").read_bytes()
    with pytest.raises(ConfigError) as e:
        train.main(small_config(image_folder, tmp_path, "name=chg", "max_steps=4", "batch_size=16",
                                "recipe.strong.blur_p=0.5", "proj_dim=8"))
    msg = str(e.value)
    for line in ("batch_size: 8 in the checkpoint, 16 now", "proj_dim: 16 in the checkpoint, 8 now",
                 "recipe_overrides: {} in the checkpoint, {'strong.blur_p': 0.5} now"):
        assert line in msg
    assert "max_steps" not in msg  # a longer schedule is allowed
    assert (tmp_path / "chg" / "metrics.csv").read_bytes() == before


# --- a fresh start over an existing run -------------------------------------------------------------------
def test_resume_no_over_a_finished_run_is_refused_and_overwrite_moves_it_aside(image_folder, tmp_path):
    run = tmp_path / "r"
    train.main(small_cfg(image_folder, tmp_path, "name=r", "max_steps=2"))
    (run / "eval.json").write_text('{"knn_top1": 90.0}\n')  # a result of that run
    before = snapshot(run)
    with pytest.raises(ConfigError) as e:
        train.main(small_cfg(image_folder, tmp_path, "name=r", "max_steps=3", "resume=no"))
    msg = str(e.value)
    assert f"run 'r' already has outputs in {run}" in msg and "eval.json" in msg and "last.pt" in msg
    assert "a finished run of 2 steps" in msg and "name=r-2" in msg and "overwrite=true" in msg
    assert snapshot(run) == before  # nothing touched

    s = train.main(small_cfg(image_folder, tmp_path, "name=r", "max_steps=3", "resume=no", "overwrite=true"))
    assert s["steps"] == 3 and not (run / "eval.json").exists()  # no stale result next to the new run
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.replaced-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before  # the old run, whole, beside the new one


# --- checkpoints that are not one ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(image_folder, tmp_path_factory) -> Path:
    """out_dir with run "c": 2 steps, finished (last.pt, metrics.csv, summary.json)."""
    out = tmp_path_factory.mktemp("finished")
    train.main(small_cfg(image_folder, out, "name=c", "max_steps=2"))
    return out


@pytest.mark.parametrize("kind, message", [
    ("truncated", "is not a trainer checkpoint: it is not a torch.save file at all"),
    ("text", "is not a trainer checkpoint: it is not a torch.save file at all"),
    ("backbone", "is not a trainer checkpoint: it is a bare state_dict of"),
    ("partial", "is a trainer checkpoint without ['optimizer', 'step', 'epoch', 'batch', 'rng_cpu']"),
])
def test_resume_from_a_file_that_is_not_a_checkpoint_says_what_it_is(kind, message, finished_run, image_folder,
                                                                      tmp_path, capsys):
    run = tmp_path / "c"
    shutil.copytree(finished_run / "c", run)
    ckpt = run / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    if kind == "truncated":
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        ckpt.write_text("not a checkpoint\n")
    elif kind == "backbone":
        prefix = "student.backbone."
        torch.save({k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}, ckpt)
    else:
        torch.save({"model": state["model"], "config": state["config"]}, ckpt)
    metrics = (run / "metrics.csv").read_bytes()
    status, err = tool(capsys, small_cfg(image_folder, tmp_path, "name=c", "max_steps=4"))
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err and str(ckpt) in err, err
    assert "differ from the checkpoint" not in err and "weights_only" not in err
    assert (run / "metrics.csv").read_bytes() == metrics  # refused before any work


# --- run directories that cannot be written ----------------------------------------------------------------
def test_out_dir_that_is_a_file_or_read_only_is_refused(image_folder, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    status, err = tool(capsys, small_cfg(image_folder, a_file, "name=r", "max_steps=2"))
    assert status == 2 and "cannot create the run directory" in err and "Not a directory" in err, err
    if sys.platform.startswith("linux") and Path("/sys/kernel").is_dir():  # a file system no one may write
        status, err = tool(capsys, small_cfg(image_folder, "/sys/kernel", "name=ressl-test", "max_steps=2"))
        assert status == 2 and "cannot create the run directory /sys/kernel/ressl-test" in err, err
    # a run directory whose lock file cannot be created (here: a directory named like it)
    (tmp_path / "ro" / ".lock").mkdir(parents=True)
    status, err = tool(capsys, small_cfg(image_folder, tmp_path, "name=ro", "max_steps=2"))
    assert status == 2 and f"cannot write in the run directory {tmp_path / 'ro'}" in err, err


def test_interrupted_checkpoint_temp_file_is_removed(image_folder, tmp_path, dead_pid):
    run = tmp_path / "tmpf"
    run.mkdir()
    stale = run / f".last.pt.tmp-{dead_pid}"
    stale.write_bytes(b"\0" * 1024)
    train.main(small_config(image_folder, tmp_path, "name=tmpf", "max_steps=1"))
    assert not stale.exists()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


# --- recipe overrides: recorded with the run, or refused before any work ----------------------------------------
def test_recipe_overrides_reach_the_checkpoint_and_summary(image_folder, tmp_path):
    s = train.main(small_config(image_folder, tmp_path, "name=rec", "max_steps=1", "recipe.strong.blur_p=0.5",
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
        train.main(small_config(image_folder, tmp_path, "name=bad", override))
    assert not (tmp_path / "bad").exists()


# --- data that cannot fill a batch, views that cannot fit ---------------------------------------------------
def test_batch_larger_than_the_data_is_refused(image_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"24 samples are too few for 1 process\(es\) x batch 32"):
        train.main(small_cfg(image_folder, tmp_path, "name=b", "batch_size=32", "queue_size=64"))


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_data_with_no_readable_file_is_refused_before_training(backend, tmp_path):
    import pipelines

    if not pipelines.available_backends()[backend]:
        pytest.skip(f"{backend} is not installed (extra [{backend}])")
    for split, n in (("train", 9), ("val", 2)):
        for c in ("a", "b"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}.jpg").write_text("not an image")
    with pytest.raises(ConfigError) as e:
        train.main(small_cfg(tmp_path / "data", tmp_path, "name=bad", f"backend={backend}", "max_steps=2"))
    assert str(e.value).startswith(f"data='{tmp_path / 'data'}': ")
    assert "18" in str(e.value) and ("none of" in str(e.value) or "0 readable" in str(e.value)), str(e.value)
    assert not (tmp_path / "bad" / "metrics.csv").exists()


def test_views_too_large_for_memory_are_refused_before_the_data(image_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"views too large: recipe.weak.size=100000, recipe.strong.size=32 at 8 "
                                          r"images per process take 960.0 GB"):
        train.main(small_cfg(image_folder, tmp_path, "name=v", "recipe.weak.size=100000"))
    assert not (tmp_path / "v").exists()


# --- a disk that fills at checkpoint time ---------------------------------------------------------------------
def test_file_size_limit_at_checkpoint_names_the_file_and_the_reason(image_folder, tmp_path, capsys):
    """A real short write (RLIMIT_FSIZE; the kernel refuses beyond 2 MB) inside torch.save, which by itself
    reports only "unexpected pos"."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, old_limit[1]))
    try:
        status, err = tool(capsys, small_cfg(image_folder, tmp_path, "name=f", "max_steps=4", "ckpt_every=2"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    ckpt = tmp_path / "f" / "last.pt"
    assert status == 2 and err.endswith(f"\nerror: disk full / could not write {ckpt}: File too large\n"), err
    assert not ckpt.exists() and not [p for p in (tmp_path / "f").iterdir() if ".tmp-" in p.name]


def test_full_disk_at_checkpoint_keeps_the_previous_checkpoint(image_folder, tmp_path, monkeypatch, capsys):
    """ENOSPC from the kernel (/dev/full) on the second save: the first checkpoint stays as it was."""
    train.main(small_cfg(image_folder, tmp_path, "name=d", "max_steps=2"))
    ckpt = tmp_path / "d" / "last.pt"
    before = ckpt.read_bytes()
    real = ressl.io.temp_name

    def full_disk(path: Path) -> Path:
        tmp = real(path)
        if path.name == "last.pt":
            tmp.symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(ressl.io, "temp_name", full_disk)
    status, err = tool(capsys, small_cfg(image_folder, tmp_path, "name=d", "max_steps=4", "ckpt_every=1"))
    assert status == 2 and err.endswith(f"\nerror: disk full / could not write {ckpt}: No space left on device\n"), err
    assert ckpt.read_bytes() == before


# --- the NaN stop as the tool prints it ---------------------------------------------------------------------
def test_nan_stop_is_one_message_and_exit_2(image_folder, tmp_path, monkeypatch, capsys):
    from ressl.method import ReSSL

    real_forward = ReSSL.forward

    def nan_forward(self, *a, **k):
        loss, metrics = real_forward(self, *a, **k)
        return loss * float("nan"), metrics

    monkeypatch.setattr(ReSSL, "forward", nan_forward)
    status, err = tool(capsys, small_cfg(image_folder, tmp_path, "name=nan", "max_steps=4", "log_every=2"))
    assert status == 2 and "\nerror: loss became NaN/inf by step 2" in err and "Traceback" not in err, err
    assert "resume=no" in err and not (tmp_path / "nan" / "last.pt").exists()
    assert issubclass(train.NonFiniteLossError, RunError)


def test_nan_message_gives_a_command_that_resumes_with_a_lower_lr(image_folder, tmp_path, monkeypatch):
    from ressl.method import ReSSL

    real_forward, calls = ReSSL.forward, {"n": 0}

    def nan_after_4(self, *a, **k):
        calls["n"] += 1
        loss, metrics = real_forward(self, *a, **k)
        return (loss * float("nan") if calls["n"] > 4 else loss), metrics

    monkeypatch.setattr(ReSSL, "forward", nan_after_4)
    cfg = small_config(image_folder, tmp_path, "name=nan", "max_steps=8", "ckpt_every=2", "log_every=3")
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
        assert float(x["lr"]) == pytest.approx(0.1 * 8 / 256 * lr_factor(int(x["step"]) - 1, 0, 8), rel=1e-6)

    fresh_cmd = next(line.strip() for line in msg.splitlines() if "resume=no" in line)
    cfg2 = train.parse_args(shlex.split(fresh_cmd)[2:])
    assert cfg2.name == "nan-lr0.1" and cfg2.lr == 0.1 and cfg2.resume == "no"


# --- a run that ends collapsed -------------------------------------------------------------------------------
def test_a_run_that_ends_collapsed_says_so_and_exits_3(image_folder, tmp_path, capsys):
    """An absurd lr collapses the teacher's keys within steps: not a plain "done"."""
    status, _ = tool(capsys, small_cfg(image_folder, tmp_path, "name=lr", "lr=1e6", "max_steps=6", "log_every=10"))
    summary = json.loads((tmp_path / "lr" / "summary.json").read_text())
    assert status == train.EXIT_COLLAPSED == 3
    assert summary["collapsed"] is True and summary["collapse"]["key_std"] < summary["collapse"]["threshold"]
    assert "ended collapsed" in summary["collapse"]["message"] and "lower lr" in summary["collapse"]["message"]


def test_last_line_of_a_collapsed_run_and_of_a_healthy_one(image_folder, tmp_path, capsys):
    s = train.main(small_cfg(image_folder, tmp_path, "name=lr", "lr=1e6", "max_steps=6"))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert s["collapsed"] and last.startswith("COLLAPSED: 6 steps") and "done" not in last, last
    assert 'summary.json has "collapsed": true (exit status 3)' in last
    s = train.main(small_cfg(image_folder, tmp_path, "name=ok", "max_steps=6"))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert not s["collapsed"] and last.startswith("done: 6 steps") and train.exit_status(s) == 0, last
    assert s["collapse"]["key_std"] > s["collapse"]["threshold"]


def test_plateau_at_log_k_is_warned_once_and_flagged_in_the_summary(image_folder, tmp_path, monkeypatch, caplog,
                                                                    capsys):
    """The loop feeds the monitor its logged values: a relation loss pinned at log K with narrow keys (0.2 of
    the spread value 1/sqrt(16), as the relation loss alone shows from a random network on small data) is
    reported once, and named in the last line; the keys are narrow, not collapsed, so the run is "done"."""
    from ressl.method import ReSSL

    real_forward = ReSSL.forward

    def stuck_forward(self, *a, **k):
        loss, metrics = real_forward(self, *a, **k)
        return loss, {**metrics, "loss_rel": torch.tensor(math.log(32)), "key_std": torch.tensor(0.05)}

    monkeypatch.setattr(ReSSL, "forward", stuck_forward)
    with caplog.at_level("WARNING", logger="train"):
        s = train.main(small_cfg(image_folder, tmp_path, "name=p", "max_steps=12"))
    warnings = [r.message for r in caplog.records if r.name == "train" and "collapse:" in r.message]
    assert len(warnings) == 1 and "log K = 3.466" in warnings[0] and "warmup_infonce_epochs=" in warnings[0]
    saved = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert saved["collapse"]["plateau"]["from_step"] == 1 and saved["collapse"]["plateau"]["to_step"] == 12
    assert not s["collapsed"] and train.exit_status(s) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("done: 12 steps") and "sat at log K with collapsed keys from step 1 to 12" in last, last
