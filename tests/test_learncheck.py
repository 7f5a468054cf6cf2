"""tools/learncheck.py at a tiny budget: every variant trains through train.main and is evaluated."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import learncheck  # noqa: E402

TINY = ["recipe=cifar32", "backbone=resnet18", "proj_hidden=32", "proj_dim=16", "pred_hidden=16", "queue_size=16",
        "batch_size=8", "num_workers=0", "channels_last=false", "warmup_epochs=0", "knn_every=0", "knn_k=5",
        "log_every=1", "max_steps=2", "warmup_infonce_epochs=1", "infonce_blend_epochs=0"]


def test_variant_overrides():
    assert learncheck.variant_overrides("moco-v2", 7)[:2] == ["warmup_infonce_epochs=7", "infonce_blend_epochs=0"]
    assert "w_sim=1" in learncheck.variant_overrides("seed-004", 3)
    assert learncheck.variant_overrides("random-init", 3) == learncheck.variant_overrides("as-configured", 3) == []
    with pytest.raises(KeyError, match="unknown variant 'byol'"):
        learncheck.variant_overrides("byol", 3)


def test_learncheck_writes_table_and_json(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "lc"
    report = learncheck.main(["--config", "", "--epochs", "1", "--out-dir", str(out), "--probe-epochs", "2",
                              f"data={image_folder}", *TINY])
    saved = json.loads((out / "learncheck.json").read_text())
    assert saved == json.loads(json.dumps(report))
    rows = {r["variant"]: r for r in saved["rows"]}
    assert list(rows) == list(learncheck.VARIANTS)
    for name, r in rows.items():
        assert 0.0 <= r["knn_top1"] <= 100.0 and 0.0 <= r["linear_top1"] <= 100.0, name
        assert r["probe"].startswith("fast")
        assert (r["steps"] is None) == (name == "random-init")
    assert rows["ressl"]["steps"] == 2 and rows["seed-004"]["final_loss"] is not None
    assert rows["as-configured"]["steps"] == 2  # trained, unlike random-init, with the config's own keys
    assert set(saved["ressl_ge_moco_v2"]) == {"knn_top1", "linear_top1"}
    table = (out / "learncheck.md").read_text()
    assert table.count("\n| ") == 1 + len(rows) and "ReSSL >= MoCo v2 at this budget" in table
    # --reuse: finished runs with the same config are evaluated, not trained again
    monkeypatch.setattr(learncheck.train, "main", lambda cfg: pytest.fail(f"retrained {cfg.name}"))
    again = learncheck.main(["--config", "", "--epochs", "1", "--out-dir", str(out), "--probe-epochs", "2", "--reuse",
                             f"data={image_folder}", *TINY])
    assert [r["knn_top1"] for r in again["rows"]] == [r["knn_top1"] for r in saved["rows"]]
    assert [r["steps"] for r in again["rows"]] == [r["steps"] for r in saved["rows"]]
    with pytest.raises(KeyError, match="unknown variant"):
        learncheck.main(["--variants", "ressl,nope", "--out-dir", str(tmp_path / "x")])
