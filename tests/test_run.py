"""ressl/run.py: the trainers' shared scaffolding (command line, run directory and its lock, resume lookup, RNG
state)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from ressl.config import ConfigError
from ressl.run import RunLock, RunLockedError, find_checkpoint, open_run, parse_cli, restore_rng, rng_state

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class _Cfg:
    out_dir: str
    name: str = "r"
    resume: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}


def test_cli_passes_the_preset_and_the_overrides_to_the_loader():
    seen = parse_cli("doc", lambda path, over: (path, over), "preset", ["--config", "c.yaml", "a=1", "b=x"])
    assert seen == ("c.yaml", ["a=1", "b=x"])
    assert parse_cli("doc", lambda path, over: (path, over), "preset", []) == (None, [])


def test_resume_lookup(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    assert find_checkpoint(_Cfg(str(tmp_path)), run) is None  # auto, nothing saved yet
    (run / "last.pt").write_bytes(b"x")
    assert find_checkpoint(_Cfg(str(tmp_path)), run) == run / "last.pt"
    assert find_checkpoint(_Cfg(str(tmp_path), resume="no"), run) is None
    assert find_checkpoint(_Cfg(str(tmp_path), resume=str(run / "last.pt")), run) == run / "last.pt"
    with pytest.raises(ConfigError, match="resume='nope.pt': no such checkpoint file"):
        find_checkpoint(_Cfg(str(tmp_path), resume="nope.pt"), run)


def test_open_run_locks_and_a_fresh_start_over_outputs_follows_overwrite(tmp_path):
    with open_run(_Cfg(str(tmp_path)), overwrite=False) as run:
        assert run == tmp_path / "r" and (run / ".lock").is_file()
        (run / "metrics.csv").write_text("step\n")
    assert not (run / ".lock").exists()
    fresh = _Cfg(str(tmp_path), resume="no")
    with pytest.raises(ConfigError, match=r"already has outputs .*metrics\.csv.*overwrite=true"):
        with open_run(fresh, overwrite=False):
            pass
    with open_run(fresh, overwrite=None):  # a trainer without the key writes over them in place
        assert (run / "metrics.csv").is_file()
    with open_run(fresh, overwrite=True):
        assert not (run / "metrics.csv").exists()
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("r.replaced-")]
    assert len(moved) == 1 and (moved[0] / "metrics.csv").read_text() == "step\n"


def test_rng_state_round_trip_repeats_the_draws():
    torch.manual_seed(3)
    state = rng_state()
    assert set(state) == ({"rng_cpu", "rng_cuda"} if torch.cuda.is_available() else {"rng_cpu"})
    a = torch.rand(4), (torch.rand(4, device="cuda") if torch.cuda.is_available() else None)
    torch.rand(100)
    restore_rng(state)
    b = torch.rand(4), (torch.rand(4, device="cuda") if torch.cuda.is_available() else None)
    assert torch.equal(a[0], b[0]) and (a[1] is None or torch.equal(a[1].cpu(), b[1].cpu()))


def test_stale_temp_files_are_removed_when_the_run_opens(tmp_path):
    run = Path(tmp_path) / "r"
    run.mkdir()
    (run / f".last.pt.tmp-{2**22 + 7}").write_bytes(b"")
    with open_run(_Cfg(str(tmp_path)), overwrite=False):
        assert [p.name for p in run.iterdir()] == [".lock"]


# --- the run directory lock -------------------------------------------------------------------------------------
def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog, dead_pid):
    pid = dead_pid
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
