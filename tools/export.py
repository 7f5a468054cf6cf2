"""Export a trained backbone as a plain torchvision state_dict, for fine-tuning elsewhere.

    python tools/export.py --ckpt runs/imagenet/last.pt --out resnet50_ressl.pth [--branch student|teacher]

The file holds only tensors (``torch.load(path, weights_only=True)`` reads it) and loads into the
matching torchvision model with ``strict=False``, the only missing keys being the classifier's::

    model = torchvision.models.resnet50()
    missing, unexpected = model.load_state_dict(torch.load("resnet50_ressl.pth"), strict=False)
    # missing == ["fc.weight", "fc.bias"], unexpected == []

``*_cifar`` backbones use a 3x3 stride-1 stem and no max-pool: build the torchvision ResNet, set
``conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)`` and ``maxpool = nn.Identity()``, then load.
The export is checked this way before it is written.

``--out`` an existing directory (or a path ending in ``/``) writes ``DIR/NAME-BACKBONE-BRANCH.pth`` there,
NAME being the run's name, as ``cp`` does with a directory. An ``--out`` that is the checkpoint itself
(the same file by any path, symlink or hard link) is refused, as is one whose parent is not a writable
directory: before the checkpoint is read, with one error line, and nothing is left behind.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ressl.config import Config, ConfigError, run_tool  # noqa: E402
from ressl.eval import load_checkpoint  # noqa: E402
from ressl.io import AtomicFile, unwritable_reason  # noqa: E402
from ressl.method import BACKBONE_PREFIX  # noqa: E402
from ressl.models import CLASSIFIER_ATTRS, build_model  # noqa: E402

log = logging.getLogger("export")

__all__ = ["backbone_state_dict", "check_loads", "export_backbone", "resolve_out", "main"]


def backbone_state_dict(model_state: dict[str, torch.Tensor], branch: str = "student") -> dict[str, torch.Tensor]:
    """Backbone tensors of a ReSSL state_dict with the ``student.backbone.`` (or teacher) prefix removed."""
    if branch not in BACKBONE_PREFIX:
        raise ValueError(f"branch must be one of {sorted(BACKBONE_PREFIX)}, got {branch!r}")
    prefix = BACKBONE_PREFIX[branch]
    out = {k[len(prefix):]: v.detach().clone().contiguous() for k, v in model_state.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"no keys start with {prefix!r}: not a ReSSL state_dict?")
    return out


def check_loads(state: dict[str, torch.Tensor], backbone: str) -> list[str]:
    """Load ``state`` into the torchvision model of ``backbone``; return the (classifier) missing keys.

    Raises ValueError if any key is unexpected, mismatched in shape, or missing outside the classifier.
    """
    model = build_model(backbone)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"exported backbone does not fit torchvision model {backbone!r}: {e}") from None
    not_head = [k for k in missing if k.split(".", 1)[0] not in CLASSIFIER_ATTRS]
    if unexpected or not_head:
        raise ValueError(f"exported backbone does not fit {backbone!r}: unexpected keys {unexpected}, "
                         f"missing non-classifier keys {not_head}")
    return list(missing)


def _save_atomic(obj: Any, path: Path) -> None:
    """torch.save to ``path`` through a temporary file that is removed on any failure, the rename included."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    f = AtomicFile(path)
    try:
        f.write(buf.getbuffer())
        f.commit()
    except BaseException:
        f.abort()
        raise


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def resolve_out(ckpt: str | os.PathLike, out: str | os.PathLike, cfg: Config | None = None,
                branch: str = "student") -> Path:
    """The file an export to ``out`` writes; raise ConfigError for an ``out`` that cannot be used.

    With ``cfg`` None (before the checkpoint is read), a directory ``out`` is checked but not named yet.
    """
    ckpt, text = Path(ckpt), os.fspath(out)
    out = Path(out)
    if text.endswith(os.sep) or out.is_dir():
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {text!r} ends in {os.sep!r} but is a file")
        directory = out
        out = directory / f"{cfg.name}-{cfg.backbone}-{branch}.pth" if cfg is not None else None
    else:
        directory = out.parent
    if out is not None and _same_file(out, ckpt):
        raise ConfigError(f"--out {str(out)!r} is the checkpoint --ckpt {str(ckpt)!r} itself; exporting over it "
                          "would destroy the trainer checkpoint: choose another file name")
    why = unwritable_reason(directory)
    if why:
        raise ConfigError(f"--out {text!r}: {why}")
    return out if out is not None else directory


def export_backbone(ckpt: str | os.PathLike, out: str | os.PathLike, branch: str = "student") -> list[str]:
    """Write the checkpoint's backbone to ``out`` (a file, or a directory to name it in; see the module
    docstring); return the classifier keys a loader will find missing."""
    resolve_out(ckpt, out, None, branch)  # checked before the checkpoint is read
    model_state, cfg = load_checkpoint(ckpt)
    path = resolve_out(ckpt, out, cfg, branch)
    state = backbone_state_dict(model_state, branch)
    missing = check_loads(state, cfg.backbone)
    try:
        _save_atomic(state, path)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}; nothing was written") from None
    log.info("wrote %s backbone %r (%d tensors) to %s; classifier keys left to the user: %s",
             branch, cfg.backbone, len(state), path, missing)
    return missing


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="trainer checkpoint (runs/NAME/last.pt)")
    parser.add_argument("--out", required=True, help="output .pth with the torchvision backbone state_dict, or a "
                        "directory to write NAME-BACKBONE-BRANCH.pth into; never the checkpoint itself")
    parser.add_argument("--branch", default="student", choices=sorted(BACKBONE_PREFIX),
                        help="student (what the paper evaluates) or the EMA teacher")
    args = parser.parse_args(argv)
    return export_backbone(args.ckpt, args.out, args.branch)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_tool(main)
