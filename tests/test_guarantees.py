"""The README's "Guarantees", tested as stated: a real SIGKILL of `tools/train.py` mid-run, then the same command.

Other guarantees (lock, finished runs, refused resume changes, bad files per backend, atomic conversion) are
tested with the module they concern (test_run, test_run_safety, test_samples, test_convert, ...); this one
needs a real process to kill, so it lives apart.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_config import small_args

ROOT = Path(__file__).resolve().parents[1]
ARGS = small_args(proj_hidden=64, proj_dim=32, queue_size=64, knn_k=None, knn_before="false", max_steps=24,
                  ckpt_every=4)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cmd(data: Path, out: Path, name: str, backend: str = "torchvision") -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "train.py"), f"data={data}", f"out_dir={out}", f"name={name}",
            f"backend={backend}", *ARGS]


def _data_for(backend: str, image_folder: Path, tmp_path: Path) -> Path:
    """The image folder, plus for FFCV its train split as a raw .beton (the demo's layout)."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed (the [dali] extra)")
    if backend != "ffcv":
        return image_folder
    pytest.importorskip("ffcv", reason="FFCV is not installed (the [ffcv] extra)")
    from pipelines.formats.beton import write_beton
    from pipelines.samples import TreeSamples

    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    tree = TreeSamples(data / "train", sorted(p.name for p in (data / "train").iterdir()))
    write_beton(data / "train.beton", [(np.asarray(tree.image(i)), int(tree.labels[i])) for i in range(len(tree))],
                mode="raw")
    return data


def _rows(run_dir: Path) -> list[tuple[int, float]]:
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r["loss"]]


@pytest.mark.parametrize("backend", ["torchvision", "dali", "ffcv"])
def test_sigkill_mid_training_then_the_same_command_gives_the_same_losses(image_folder, tmp_path, backend):
    data = _data_for(backend, image_folder, tmp_path)
    subprocess.run(_cmd(data, tmp_path, "full", backend), env=ENV, check=True, capture_output=True, timeout=600)
    full = dict(_rows(tmp_path / "full"))

    run_dir = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(data, tmp_path, "cut", backend), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:  # kill once a mid-run checkpoint exists
            rows = _rows(run_dir) if (run_dir / "metrics.csv").exists() else []
            if (run_dir / "last.pt").exists() and rows and rows[-1][0] >= 9:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: make it longer"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["step"]
    assert 4 <= killed_at < 24

    done = subprocess.run(_cmd(data, tmp_path, "cut", backend), env=ENV, check=True, capture_output=True,
                          text=True, timeout=600)
    assert "taking over the lock" in done.stderr  # the killed holder's lock is taken over, with a message
    rows = _rows(run_dir)
    steps = [s for s, _ in rows]
    assert steps == list(range(1, 25)), "metrics.csv must hold every step exactly once after the resume"
    for step, loss in rows:
        assert loss == full[step], (step, loss, full[step])  # bit-identical, not merely close
    assert not list(run_dir.glob(".*tmp-*")), "a temp file of the killed process was left behind"
    assert not (run_dir / ".lock").exists(), "a finished run releases its directory"
