"""ressl/runlog.py and the end of a run (ressl.run.finish_run): metrics.csv rows, the prefix a resume keeps,
and a disk that fills while the record is written (a message naming the file, never a raw OSError)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from trainer_config import small_config

import ressl.io
from ressl.config import RunError, run_tool
from ressl.runlog import RunLog
from tools import train


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_keeps_the_rows_the_checkpoint_counted_and_appends_after_them(tmp_path):
    log = RunLog(tmp_path, True, fields=("step", "loss"))
    for step in (1, 2, 3, 4):
        log.row(step, loss=float(step))
    log.close()
    again = RunLog(tmp_path, True, resume_step=2, keep_rows=2, fields=("step", "loss"))
    assert again.rows == 2
    again.row(3, loss=30.0)
    again.close()
    assert [(r["step"], r["loss"]) for r in _rows(tmp_path / "metrics.csv")] == [("1", "1.0"), ("2", "2.0"),
                                                                                  ("3", "30.0")]


def test_a_full_disk_at_a_metrics_row_names_the_file_and_how_to_continue(tmp_path):
    """ENOSPC from the kernel (/dev/full behind the open record), raised at the row that could not be written."""
    log = RunLog(tmp_path, True, fields=("step", "loss"))
    log.row(1, loss=1.0)
    log.f.close()
    log.csv_path.unlink()
    log.csv_path.symlink_to("/dev/full")
    log.f = open(log.csv_path, "a", newline="")
    log.w = csv.DictWriter(log.f, fieldnames=log.fields)
    with pytest.raises(RunError) as e:
        log.row(2, loss=2.0)
    assert str(e.value) == (f"disk full / could not write {log.csv_path}: No space left on device; once there is "
                            "space, the same command continues from the last checkpoint")


@pytest.mark.parametrize("name", ["summary.json", "curves.png"])
def test_a_full_disk_at_the_end_names_the_file_and_keeps_the_trained_model(name, image_folder, tmp_path,
                                                                           monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    real = ressl.io.temp_name

    def full_disk(path: Path) -> Path:
        tmp = real(path)
        if path.name == name:
            tmp.symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(ressl.io, "temp_name", full_disk)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_tool(lambda: train.main(small_config(image_folder, tmp_path, "name=e", "max_steps=2")))
    run_dir = tmp_path / "e"
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.endswith(
        f"\nerror: disk full / could not write {run_dir / name}: No space left on device; the trained model is "
        f"saved in {run_dir / 'last.pt'}\n"), err
    assert not (run_dir / name).exists() and not [p for p in run_dir.iterdir() if ".tmp-" in p.name]
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert state["step"] == 2
