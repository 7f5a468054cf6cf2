"""tools/export.py on a bad --out: never over the checkpoint, a directory names the file, nothing left behind."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from ressl.config import Config, ConfigError, run_tool
from ressl.method import ReSSL

ROOT = Path(__file__).resolve().parents[1]


def _export():
    spec = importlib.util.spec_from_file_location("ressl_tools_export", ROOT / "tools" / "export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """runs/x/last.pt of a tiny resnet18_cifar model, as the trainer writes it."""
    cfg = Config(name="x", backbone="resnet18_cifar", proj_hidden=32, proj_dim=16, pred_hidden=16, queue_size=32,
                 batch_size=16, recipe="cifar32").validate()
    torch.manual_seed(0)
    model = ReSSL.from_config(cfg)
    d = tmp_path / "runs" / "x"
    d.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "optimizer": {}, "step": 3, "epoch": 0},
               d / "last.pt")
    return d


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("how", ["same path", "other spelling", "symlink", "hard link"])
def test_out_that_is_the_checkpoint_is_refused_and_the_checkpoint_kept(run_dir, how):
    ckpt = run_dir / "last.pt"
    before = ckpt.read_bytes()
    out = {"same path": ckpt, "other spelling": run_dir / ".." / "x" / "last.pt",
           "symlink": run_dir / "link.pt", "hard link": run_dir / "hard.pt"}[how]
    if how == "symlink":
        out.symlink_to(ckpt)
    elif how == "hard link":
        os.link(ckpt, out)
    listing = _listing(run_dir)
    with pytest.raises(ConfigError, match="is the checkpoint --ckpt .* itself"):
        _export().main(["--ckpt", str(ckpt), "--out", str(out)])
    assert ckpt.read_bytes() == before and _listing(run_dir) == listing


def test_out_a_directory_writes_a_named_file_inside(run_dir, tmp_path):
    exports = tmp_path / "exports"
    exports.mkdir()
    _export().main(["--ckpt", str(run_dir / "last.pt"), "--out", str(exports), "--branch", "teacher"])
    assert _listing(exports) == ["x-resnet18_cifar-teacher.pth"]
    state = torch.load(exports / "x-resnet18_cifar-teacher.pth", weights_only=True)
    assert "conv1.weight" in state and not any(k.startswith("teacher.") for k in state)
    assert _listing(tmp_path) == sorted(["exports", "exports/x-resnet18_cifar-teacher.pth", "runs", "runs/x",
                                         "runs/x/last.pt"])  # no temp file anywhere
    # a trailing slash names a directory that does not exist yet
    _export().main(["--ckpt", str(run_dir / "last.pt"), "--out", str(tmp_path / "new") + os.sep])
    assert _listing(tmp_path / "new") == ["x-resnet18_cifar-student.pth"]
    # the run directory itself: the default name is not last.pt, so the checkpoint stays
    _export().main(["--ckpt", str(run_dir / "last.pt"), "--out", str(run_dir)])
    assert _listing(run_dir) == ["last.pt", "x-resnet18_cifar-student.pth"]


def test_unwritable_outs_fail_before_reading_and_leave_nothing(run_dir, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for out, message in ((blocker / "b.pth", "is a file, not a directory"),
                         (str(blocker) + os.sep, "ends in '/' but is a file")):
        with pytest.raises(ConfigError, match=message):
            _export().main(["--ckpt", str(tmp_path / "missing.pt"), "--out", str(out)])  # refused before the read
    assert _listing(tmp_path) == sorted(["afile", "runs", "runs/x", "runs/x/last.pt"])


def test_command_line_prints_one_error_line_and_exits_2(run_dir, capsys):
    ckpt = run_dir / "last.pt"
    with pytest.raises(SystemExit) as exc:  # what `python tools/export.py ...` runs
        run_tool(lambda: _export().main(["--ckpt", str(ckpt), "--out", str(ckpt)]))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: --out ") and len(err.splitlines()) == 1
    assert torch.load(ckpt, weights_only=True)["step"] == 3
