"""tools/train.py end to end on CPU: loss goes down, resume is exact, NaN stops, 2 processes agree, the kNN
monitor says once why it is off."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_files import class_tree
from trainer_config import killed_during_step, small_args, small_config

from pipelines.spec import get_recipe
from ressl.config import load_config
from tools import train

ROOT = Path(__file__).resolve().parents[1]

SMALL = small_args(proj_hidden=64, proj_dim=32, queue_size=64, log_every=None, lr=None)


def small_cfg(data, out, *extra):
    return small_config(data, out, *extra, proj_hidden=64, proj_dim=32, queue_size=64, log_every=None, lr=None)


def csv_losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}


def test_loss_decreases_and_outputs_written(image_folder, tmp_path):
    """The loop optimises: with the instance term on, it falls several-fold and the total loss falls.

    (The relation loss alone sits near log K for dozens of steps on 24 images, since its floor is the
    teacher's entropy; its maths and gradients are checked against float64 references in test_loss.)
    """
    cfg = small_cfg(image_folder, tmp_path, "name=dec", "max_steps=20", "log_every=1", "lr=1.0", "w_sim=1.0",
                    "queue_size=16", "momentum=0.99", "knn_before=true")
    s = train.main(cfg)
    with open(tmp_path / "dec" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["loss"]]
    sim = [float(r["loss_sim"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    assert len(rows) == 20 and all(r["loss_rel"] for r in rows)
    assert sum(sim[-4:]) < 0.5 * sum(sim[1:5]), sim
    assert sum(loss[-4:]) < sum(loss[1:5]), loss
    run = tmp_path / "dec"
    for name in ("metrics.csv", "curves.png", "last.pt", "summary.json"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    assert s["knn_before"] is not None and s["knn_after"] is not None
    assert s["queue_ptr"] == (20 * 8) % 16
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["step"] == 20 and "queue.buffer" in ckpt["model"]


def test_resume_gives_the_same_losses(image_folder, tmp_path):
    common = ["max_steps=8", "log_every=1", "ckpt_every=3", "lr=0.2"]
    train.main(small_cfg(image_folder, tmp_path, "name=full", *common))
    full = csv_losses(tmp_path / "full")

    from ressl.method import ReSSL

    with killed_during_step(ReSSL, 5):  # the last checkpoint is from step 3
        train.main(small_cfg(image_folder, tmp_path, "name=cut", *common))
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["step"] == 3
    train.main(small_cfg(image_folder, tmp_path, "name=cut", *common))  # resume=auto
    resumed = csv_losses(tmp_path / "cut")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step


def test_each_metrics_row_holds_the_lr_momentum_and_infonce_weight_its_step_ran_with(image_folder, tmp_path,
                                                                                      monkeypatch):
    """The optimiser's lr, the EMA momentum and the InfoNCE weight the step really used, row by row (warm-up
    and cosine both visible: 2 warm-up epochs of 3 steps, 9 steps, InfoNCE warm-up 1 epoch + 1 blended)."""
    from ressl.step import TrainStep

    used: list[tuple[float, float, float]] = []
    real_call = TrainStep.__call__

    def recording(self, weak, strong, *, momentum, infonce_weight=0.0, lr=None):
        out = real_call(self, weak, strong, momentum=momentum, infonce_weight=infonce_weight, lr=lr)
        used.append((self.optimizer.param_groups[0]["lr"], momentum, infonce_weight))
        return out

    monkeypatch.setattr(TrainStep, "__call__", recording)
    train.main(small_config(image_folder, tmp_path, "name=cols", "max_steps=9", "warmup_epochs=2",
                            "momentum_schedule=cosine", "warmup_infonce_epochs=1", "infonce_blend_epochs=1"))
    rows = list(csv.DictReader(open(tmp_path / "cols" / "metrics.csv", newline="")))
    logged = [(float(r["lr"]), float(r["momentum"]), float(r["infonce_weight"])) for r in rows if r["loss"]]
    assert len(used) == len(logged) == 9
    for (lr, m, w), (lr_row, m_row, w_row) in zip(used, logged):
        assert lr_row == pytest.approx(lr, rel=1e-6) and m_row == pytest.approx(m) and w_row == pytest.approx(w)
    lrs = [u[0] for u in used]  # 6 warm-up steps up to the peak, which the cosine starts from, then down
    assert lrs[:6] == sorted(set(lrs[:6])) and lrs[5] == lrs[6] and lrs[6:] == sorted(set(lrs[6:]), reverse=True)
    assert used[0][2] == 1.0 and used[-1][2] == 0.0 and used[0][1] < used[-1][1]


def test_nan_loss_stops_with_a_clear_message(image_folder, tmp_path, monkeypatch):
    from ressl.method import ReSSL

    real_forward = ReSSL.forward

    def nan_forward(self, *a, **k):
        loss, metrics = real_forward(self, *a, **k)
        return loss * float("nan"), metrics

    monkeypatch.setattr(ReSSL, "forward", nan_forward)
    with pytest.raises(train.NonFiniteLossError, match="NaN/inf"):
        train.main(small_cfg(image_folder, tmp_path, "name=nan", "max_steps=4", "log_every=2", "ckpt_every=2"))
    assert not (tmp_path / "nan" / "last.pt").exists()


def test_missing_data_fails_before_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.main(small_cfg(tmp_path / "missing", tmp_path, "name=m"))


def test_knn_monitor_says_once_why_it_is_off(tmp_path, caplog):
    class_tree(tmp_path / "train", ["a", "b"])  # no val split in any layout
    cfg = load_config(None, [f"data={tmp_path}", "recipe=cifar32", "batch_size=4", "queue_size=8"])
    train._KNN_OFF.clear()
    with caplog.at_level(logging.WARNING):
        got = [train.knn_monitor(cfg, get_recipe("cifar32"), torch.nn.Identity(), torch.device("cpu"))
               for _ in range(3)]
    assert got == [None, None, None]
    assert caplog.text.count("kNN monitor off") == 1 and "no split 'val'" in caplog.text


def _accelerate_two_cpu(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29517", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_queue_and_teachers(image_folder, tmp_path):
    """Two gloo processes: the queue holds both processes' keys, the teachers stay identical, and the
    cross-process shuffle-BN (same seeded permutation on both, counted for resume) un-shuffles correctly."""
    r = _accelerate_two_cpu([str(ROOT / "tests" / "dist_worker.py"), str(tmp_path / "dist.json")], ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads((tmp_path / "dist.json").read_text())
    assert out["num_processes"] == 2
    assert out["queue_has_both"] and out["teachers_equal"]
    assert out["same_permutation"] and out["shuffled_keys_match_reference"] and out["shuffle_changes_bn_groups"]
    assert out["shuffle_calls"] == 1

    args = [str(ROOT / "tools" / "train.py"), *[f"data={image_folder}", f"out_dir={tmp_path}", *SMALL,
                                                "name=two", "max_steps=3", "log_every=1"]]
    r = _accelerate_two_cpu(args, ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["num_processes"] == 2
    assert s["teacher_checksums"][0] == s["teacher_checksums"][1]
    assert s["queue_ptr"] == 3 * 8 % 64


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_short_run_through_fast_backends(backend, image_folder, tmp_path):
    """The same loop fed by FFCV (.beton) and DALI (CPU pipeline over the ImageFolder tree)."""
    import shutil

    import numpy as np
    from PIL import Image

    import pipelines

    if not pipelines.available_backends()[backend]:
        pytest.skip(f"{backend} is not installed (extra [{backend}])")
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    if backend == "ffcv":
        from pipelines.folder import ImageFolderFiles
        from pipelines.formats.beton import write_beton

        files = ImageFolderFiles(data / "train").samples
        samples = [(np.asarray(Image.open(p).convert("RGB")), label) for p, label in files]
        write_beton(data / "train.beton", samples, mode="raw")
    s = train.main(small_cfg(data, tmp_path, f"name={backend}", f"backend={backend}", "max_steps=4", "log_every=1"))
    assert s["steps"] == 4 and len(s["losses"]) == 4 and all(np.isfinite(s["losses"]))
    # FFCV's raw 40x36 images are held on the device (pipelines.resident)
    assert s["backend"] == {"ffcv": "ResidentLoader", "dali": "DaliLoader"}[backend]
    assert s["knn_after"] is not None
