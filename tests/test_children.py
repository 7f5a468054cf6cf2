"""pipelines/formats/children.py: the converters' worker processes die with a SIGKILLed parent (the .beton
writer's and the encode pass's), taking no temporary file or shared memory with them, and a worker that
dies ends ``ordered_map`` with an error naming its item instead of a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from data_files import save_image

ROOT = Path(__file__).resolve().parents[1]
needs_ffcv = pytest.mark.skipif(__import__("importlib").util.find_spec("ffcv") is None,
                                reason="FFCV is not installed (the [ffcv] extra)")

_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, {root!r})
    from pipelines.formats.beton import write_beton

    class Slow:
        def __len__(self):
            return 300

        def __getitem__(self, i):
            time.sleep(0.07)
            return np.zeros((8, 8, 3), np.uint8), i

    write_beton({out!r}, Slow(), mode="raw", num_workers=2, chunk_size=5)
""")


def _cmdline(proc) -> list[str] | None:
    """A child's command line; None for one that exited (or is a zombie) while the children were listed:
    short-lived helpers such as ldconfig come and go during start-up."""
    import psutil

    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


@needs_ffcv
def test_killed_writer_leaves_no_child_and_no_shared_memory(tmp_path):
    """Before: an FFCV writer child could outlive a SIGKILLed parent, holding the temp file and /dev/shm."""
    import psutil

    script = tmp_path / "slow.py"
    script.write_text(_SLOW_WRITER.format(root=str(ROOT), out=str(tmp_path / "x.beton")))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail("the writer finished before it could be killed")
            # forked workers share the parent's command line (not the resource tracker, not ldconfig)
            children = [c for c in parent.children() if _cmdline(c) == parent.cmdline()]
            if len(children) >= 2 and list(tmp_path.glob(".x.beton.*tmp-*")):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the writer's workers never started")
        time.sleep(0.5)  # let them pick up work
        segments = {m.path for m in parent.memory_maps() if m.path.startswith("/dev/shm/")}
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"writer workers outlived their parent: {[c.pid for c in alive]}"
        deadline = time.monotonic() + 10
        while any(os.path.exists(s) for s in segments) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [s for s in segments if os.path.exists(s)]
    finally:
        for c in children:
            if c.is_running():
                c.kill()
    # the re-run's converter removes the killed run's temporary
    from ressl.io import remove_stale_temps

    assert remove_stale_temps(tmp_path) and not list(tmp_path.glob(".x.beton*"))


def test_killed_conversion_leaves_no_encode_worker(tmp_path):
    """The encode pass's worker pool dies with a SIGKILLed `make dataset` too (WORKERS=2)."""
    import psutil

    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    save_image(src / "0.png", np.zeros((8, 8, 3), np.uint8))
    data = (src / "0.png").read_bytes()
    for k in range(1, 4000):
        (src / f"{k}.png").write_bytes(data)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "dataset.py"), "folder", "--src", str(tmp_path / "src"), "--out",
           str(out), "--formats", "rec", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            workers = [c for c in parent.children() if _cmdline(c) == parent.cmdline()]
            if len(workers) >= 2 and list((out / "folder").glob(".train.rec.tmp-*")):
                break
            time.sleep(0.01)
        else:
            pytest.fail("the conversion finished (or never started its workers) before it could be killed")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        _, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive, f"encode workers outlived their parent: {[c.pid for c in alive]}"
    finally:
        for c in workers:
            if c.is_running():
                c.kill()


def _die_on(fatal: int, i: int) -> int:
    if i == fatal:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer or a crashing decoder would
    time.sleep(0.01)
    return i * i


def test_a_dead_worker_ends_the_map_naming_its_item():
    """multiprocessing.Pool.imap waits forever for a SIGKILLed worker's result; ordered_map raises."""
    from pipelines.formats.children import WorkerDiedError, ordered_map

    assert list(ordered_map(_die_on, [1, 2, 3, 4], 2, state=7, chunk_size=1)) == [1, 4, 9, 16]
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"while working on file-7; nothing was written"):
        list(ordered_map(_die_on, list(range(40)), 2, state=7, chunk_size=2, describe=lambda i: f"file-{i}"))
    assert time.monotonic() - t0 < 30
