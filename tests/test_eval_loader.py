"""pipelines/eval.py: the evaluation loader finds a split in every layout (.rec, .beton, the tree the manifest
records), says why it cannot, and draws new probe crops each epoch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from data_files import class_tree, png_bytes

import pipelines
from pipelines.eval import EvalDataError, build_eval_loader, eval_problem, find_split
from pipelines.formats.recordio import write_recordio
from pipelines.samples import RecordSamples, TreeSamples
from pipelines.spec import get_recipe

SPEC = get_recipe("cifar32")
needs_ffcv = pytest.mark.skipif(not pipelines.available_backends()["ffcv"], reason="the FFCV backend is not installed")


def test_eval_loader_reads_every_layout_and_says_why_not(tmp_path):
    images = [(png_bytes(i), i % 3) for i in range(9)]
    write_recordio(tmp_path / "val.rec", tmp_path / "val.idx", images)
    rec = find_split(tmp_path, "val")
    assert isinstance(rec, RecordSamples) and rec.labels.tolist() == [i % 3 for i in range(9)]
    ev = build_eval_loader(tmp_path, "val", 16, SPEC.mean, SPEC.std, batch_size=4, num_workers=0)
    x, y = next(iter(ev))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 1, 2, 0]
    with pytest.raises(EvalDataError, match=r"train\.rec \+ \.idx"):
        find_split(tmp_path, "train")
    src = tmp_path / "source"
    class_tree(src / "train", ["p", "q", "r"])
    (tmp_path / "manifest.json").write_text(json.dumps({"classes": ["p", "q"], "source": {"src": str(src)}}))
    assert "'r'" in eval_problem(tmp_path, ["train", "val"])  # a class the manifest does not list
    (tmp_path / "manifest.json").write_text(json.dumps({"classes": ["p", "q", "r"], "source": {"src": str(src)}}))
    assert isinstance(find_split(tmp_path, "train"), TreeSamples)  # the tree recorded in the manifest
    assert eval_problem(tmp_path, ["train", "val"]) is None
    shutil.rmtree(src)
    assert "no split 'train'" in eval_problem(tmp_path, ["train", "val"])


@needs_ffcv
def test_eval_loader_reads_a_beton(tmp_path):
    from pipelines.formats.beton import write_beton

    rng = np.random.default_rng(1)
    write_beton(tmp_path / "val.beton", [(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8), i % 2)
                                         for i in range(6)], mode="raw")
    ev = build_eval_loader(tmp_path, "val", 8, SPEC.mean, SPEC.std, batch_size=6, num_workers=0)
    x, y = next(iter(ev))
    assert x.shape == (6, 3, 8, 8) and y.tolist() == [0, 1, 0, 1, 0, 1]


def test_probe_crops_change_with_set_epoch(tmp_path):
    class_tree(tmp_path / "train", ["a", "b"], per_class=4)
    ev = build_eval_loader(tmp_path, "train", 16, SPEC.mean, SPEC.std, batch_size=8, num_workers=0, train_aug=True)

    def crops(epoch: int) -> dict[int, torch.Tensor]:
        ev.set_epoch(epoch)
        x, _ = next(iter(ev))
        order = next(iter(ev.sampler))
        return {i: img for (i, _), img in zip(order, x)}

    e0, e0_again, e1 = crops(0), crops(0), crops(1)
    assert all(torch.equal(e0[i], e0_again[i]) for i in e0)  # an epoch is reproducible
    assert any(not torch.equal(e0[i], e1[i]) for i in e0)  # and the next one draws new crops
