"""pipelines/folder.py: class listing (labels taken from train/ or the manifest, hidden folders left out) and the
one RGB loader (16-bit images scaled to 8 bits)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_files import class_tree, loader_cfg

import pipelines
from pipelines.eval import build_eval_loader, eval_problem
from pipelines.folder import ImageFolderFiles
from pipelines.spec import get_recipe
from pipelines.torchvision import build_torchvision_loader

SPEC = get_recipe("cifar32")


def test_val_lacking_a_class_keeps_the_train_labels(tmp_path):
    class_tree(tmp_path / "train", ["a", "b", "c"])
    class_tree(tmp_path / "val", ["a", "c"])  # no "b": its own folder list would relabel c as 1
    ev = build_eval_loader(tmp_path, "val", 16, SPEC.mean, SPEC.std, batch_size=6, num_workers=0)
    labels = torch.cat([y for _, y in ev]).tolist()
    assert labels == [0, 0, 0, 2, 2, 2]
    loader = build_torchvision_loader(loader_cfg(tmp_path), SPEC, split="val", device=torch.device("cpu"), rank=0,
                                      world_size=1)
    got = set(torch.cat([b.label for b in loader]).tolist())
    assert 2 in got and got <= {0, 2}  # 4 of the 6 images (one batch): at least one of class c


def test_val_class_unknown_to_train_is_an_error_naming_it(tmp_path):
    class_tree(tmp_path / "train", ["a", "b"])
    class_tree(tmp_path / "val", ["a", "zebra"])
    with pytest.raises(ValueError, match="zebra"):
        build_eval_loader(tmp_path, "val", 16, SPEC.mean, SPEC.std, batch_size=2, num_workers=0)
    assert "zebra" in eval_problem(tmp_path, ["train", "val"])


def test_manifest_classes_win_over_folders(tmp_path):
    class_tree(tmp_path / "train", ["b", "c"])  # the converter kept 3 classes; train/ lost "a"
    (tmp_path / "manifest.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    files = ImageFolderFiles(tmp_path / "train", pipelines.folder.train_classes(tmp_path))
    assert sorted({label for _, label in files.samples}) == [1, 2]
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "train" / ".hidden").mkdir()
    assert pipelines.folder.class_dirs(tmp_path / "train") == ["b", "c"]  # hidden folders are not classes


def test_the_one_rgb_loader_scales_16_bit_images_for_training_too(tmp_path):
    """A linked source tree is read by the loaders through pipelines.folder: same scaling as the converter."""
    from PIL import Image

    from pipelines.folder import load_rgb, to_rgb

    ramp = (np.arange(8 * 16, dtype=np.uint32).reshape(8, 16) * 500).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    got = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert got.dtype == np.uint8 and got.shape == (8, 16, 3)
    np.testing.assert_array_equal(got[..., 1], np.round(ramp / 257.0).astype(np.uint8))
    floats = Image.fromarray(np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4), mode="F")
    assert np.asarray(to_rgb(floats))[..., 0].tolist()[0][0] == 0 and np.asarray(to_rgb(floats)).max() == 255
