"""tools/learncheck.py: every variant trains through train.main and is evaluated, over seeds (mean ± sd),
with the plateau of relation-only runs read from metrics.csv; bad arguments stop before any work."""

from __future__ import annotations

import csv
import json
import math
import shlex
import statistics
from pathlib import Path

import pytest
from trainer_config import small_args

from ressl.config import ConfigError, run_tool
from tools import learncheck

ROOT = Path(__file__).resolve().parents[1]

TINY = small_args(pred_hidden=16, queue_size=16, knn_before="false", max_steps=2, warmup_infonce_epochs=1,
                  infonce_blend_epochs=0, momentum=None, lr=None)


def test_variant_overrides():
    assert learncheck.variant_overrides("moco-v2", 7)[:2] == ["epochs=7", "warmup_infonce_epochs=7"]
    assert "w_sim=1" in learncheck.variant_overrides("instance-term", 3)
    assert learncheck.variant_overrides("random-init", 3) == learncheck.variant_overrides("as-configured", 3) \
        == ["epochs=3"]
    # ressl-3x: the relation-only keys at three times the epochs, and the step cap when there is one
    assert learncheck.variant_overrides("ressl-3x", 30) == ["epochs=90", *learncheck.variant_overrides("ressl", 30)[1:]]
    assert learncheck.variant_overrides("ressl-3x", 1, max_steps=2)[:2] == ["epochs=3", "max_steps=6"]
    with pytest.raises(ConfigError, match="unknown variant 'byol'"):
        learncheck.variant_overrides("byol", 3)


def _metrics(path: Path, rows: list[tuple[int, float | None, float | None]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss_rel", "key_std", "knn_top1"])
        for step, loss, std in rows:
            w.writerow([step, "" if loss is None else loss, "" if std is None else std, ""])
    return path


def test_plateau_entered_then_left_read_from_metrics_csv(tmp_path):
    log_k, low = math.log(128), 0.5 / math.sqrt(128)  # 4.852, 0.0442
    # starts below log K (not yet collapsed: not the plateau), sits on it, then the loss falls
    rows = [(1, 4.0, 0.01), (2, log_k * 1.005, 0.01), (3, log_k * 0.995, 0.02), (4, None, None),
            (5, log_k * 0.985, 0.02), (6, log_k, 0.01)]
    p = learncheck.plateau(_metrics(tmp_path / "a.csv", rows), queue_size=128, dim=128)
    assert p["log_k"] == pytest.approx(log_k) and p["key_std_threshold"] == pytest.approx(low)
    assert (p["entered"], p["left"], p["left_by"], p["last_step"]) == (2, 5, "loss_rel", 6)
    by_std = learncheck.plateau(_metrics(tmp_path / "b.csv", [(10, log_k, 0.01), (20, log_k, 0.05)]), 128, 128)
    assert (by_std["entered"], by_std["left"], by_std["left_by"]) == (10, 20, "key_std")
    stuck = learncheck.plateau(_metrics(tmp_path / "c.csv", [(1, log_k, 0.01), (2, log_k * 1.003, 0.02)]), 128, 128)
    assert (stuck["entered"], stuck["left"]) == (1, None)
    spread = learncheck.plateau(_metrics(tmp_path / "d.csv", [(1, log_k, 0.08), (2, 3.0, 0.09)]), 128, 128)
    assert spread["entered"] is None and spread["left"] is None
    assert learncheck._plateau_cell(p) == "step 5 (loss_rel)" and learncheck._plateau_cell(spread) == "never on it"
    assert learncheck._plateau_cell(stuck) == "no (on it from step 1 to 2)"


def test_summarize_is_the_sample_sd():
    s = learncheck.summarize([90.0, 92.0, 97.0])
    assert s["mean"] == pytest.approx(93.0) and s["n"] == 3 and s["values"] == [90.0, 92.0, 97.0]
    assert s["sd"] == pytest.approx(math.sqrt((9 + 1 + 16) / 2))  # n - 1 in the denominator
    assert learncheck.summarize([95.0])["sd"] is None and learncheck.summarize([None, None]) is None


def _fake_train(trained: list[str]):
    """train.main stand-in: a real checkpoint of the untrained model and a metrics.csv whose relation loss
    leaves log K at step 30 for seed 0, never for seed 1, and is never on the plateau for seed 2."""
    def main(cfg):
        trained.append(cfg.name)
        run_dir = Path(cfg.out_dir) / cfg.name
        learncheck._random_init_checkpoint(cfg, run_dir / "last.pt")
        log_k = math.log(cfg.queue_size)
        curve = {0: [(10, log_k, 0.01), (20, log_k, 0.01), (30, 0.9 * log_k, 0.01)],
                 1: [(10, log_k, 0.01), (20, log_k, 0.01), (30, log_k, 0.01)],
                 2: [(10, 0.5 * log_k, 0.2), (20, 0.5 * log_k, 0.2), (30, 0.5 * log_k, 0.2)]}[cfg.seed % 3]
        _metrics(run_dir / "metrics.csv", curve)
        return {"knn_after": 50.0 + cfg.seed, "steps": 30, "losses": [curve[-1][1]]}
    return main


def test_seeds_give_mean_sd_per_row_every_run_in_json_and_reuse_per_variant_and_seed(image_folder, tmp_path,
                                                                                     monkeypatch):
    trained: list[str] = []
    monkeypatch.setattr(learncheck.train, "main", _fake_train(trained))
    out = tmp_path / "lc"
    argv = ["--config", "", "--epochs", "1", "--out-dir", str(out), "--probe-epochs", "2", "--variants", "ressl",
            f"data={image_folder}", *TINY]
    report = learncheck.main([*argv, "--seeds", "0,1,2"])
    assert trained == ["ressl-s0", "ressl-s1", "ressl-s2"]
    saved = json.loads((out / "learncheck.json").read_text())
    assert saved == json.loads(json.dumps(report)) and saved["seeds"] == [0, 1, 2]
    for row in saved["rows"]:
        runs = row["runs"]
        assert [r["seed"] for r in runs] == [0, 1, 2] and all(r["train_s"] > 0 for r in runs)
        assert [r["knn_monitor"] for r in runs] == [50.0, 51.0, 52.0]
        for metric in ("knn_top1", "linear_top1"):
            values = [r[metric] for r in runs]
            assert row[metric] == {"mean": statistics.fmean(values), "sd": statistics.stdev(values), "n": 3,
                                   "values": values}
    (ressl,) = saved["rows"]
    assert [r["plateau"]["left"] for r in ressl["runs"]] == [30, None, None]
    assert [r["plateau"]["entered"] for r in ressl["runs"]] == [10, 10, None]
    assert ressl["plateau"] == {"left": 1, "n": 3, "steps": [30, None, None]}
    table = (out / "learncheck.md").read_text()
    first = table.splitlines()[0]
    assert first.startswith("Regenerate: `python tools/learncheck.py ") and "n=3 seeds" in table
    command = shlex.split(first.split("`")[1])[2:]
    assert command[command.index("--seeds") + 1] == "0,1,2" and command[-len(TINY):] == TINY
    k = ressl["knn_top1"]
    assert f"| ressl | relation loss only (NeurIPS 2021) | 1 | {k['mean']:.2f} ± {k['sd']:.2f} |" in table
    assert "| step 30 (loss_rel) / no (on it from step 10 to 30) / never on it |" in table
    # --reuse per (variant, seed): a fourth seed trains only its own runs; the others are read back
    trained.clear()
    again = learncheck.main([*argv, "--seeds", "0,1,2,3", "--reuse"])
    assert trained == ["ressl-s3"]
    assert [r["reused"] for r in again["rows"][0]["runs"]] == [True, True, True, False]
    assert [r["knn_top1"] for r in again["rows"][0]["runs"][:3]] == ressl["knn_top1"]["values"]


def test_every_variant_trains_for_real(image_folder, tmp_path):
    out = tmp_path / "lc"
    argv = ["--config", "", "--epochs", "1", "--out-dir", str(out), "--probe-epochs", "2", f"data={image_folder}",
            *TINY]
    saved = json.loads(json.dumps(learncheck.main(argv)))
    rows = {r["variant"]: r for r in saved["rows"]}
    assert list(rows) == list(learncheck.VARIANTS) and saved["seeds"] == [0]
    for name, r in rows.items():
        (run,) = r["runs"]
        assert 0.0 <= run["knn_top1"] <= 100.0 and 0.0 <= run["linear_top1"] <= 100.0, name
        assert r["knn_top1"]["n"] == 1 and r["knn_top1"]["sd"] is None
        assert run["probe"].startswith("fast")
        assert (run["steps"] is None) == (name == "random-init") == (run["train_s"] is None)
        assert (run["plateau"] is not None) == (name in ("ressl", "ressl-3x")), name
    assert rows["ressl"]["runs"][0]["steps"] == 2 and rows["ressl-3x"]["runs"][0]["steps"] == 6
    assert rows["ressl-3x"]["epochs"] == 3 and rows["instance-term"]["runs"][0]["final_loss"] is not None
    assert rows["ressl-3x"]["runs"][0]["plateau"]["last_step"] == 6  # read from the run's own metrics.csv
    assert set(saved["ressl_ge_moco_v2"]) == {"knn_top1", "linear_top1"}
    table = (out / "learncheck.md").read_text()
    assert table.count("\n| ") == 1 + len(rows) and "ReSSL >= MoCo v2 at this budget" in table
    assert "one seed (n=1)" in table
    # run again without --reuse: trained afresh, the earlier run's outputs moved aside by the trainer, not refused
    again = learncheck.main([*argv[:-len(TINY) - 1], "--variants", "ressl", f"data={image_folder}", *TINY])
    assert again["rows"][0]["runs"][0]["steps"] == 2 and not again["rows"][0]["runs"][0]["reused"]
    assert [p.name.split(".")[0] for p in out.glob("ressl-s0.replaced-*")] == ["ressl-s0"]


@pytest.mark.parametrize("argv, message", [
    (["--variants", "ressl,foo"], "--variants: unknown 'foo'; known: random-init, "),
    (["--variants", ","], "--variants: unknown empty list"),
    (["--variants", "ressl,ressl"], "names a variant twice"),
    (["--seeds", "0,x"], "--seeds expects a comma list of integers"),
    (["--seeds", "1,1"], "--seeds expects distinct integers >= 0"),
    (["--seeds", "0,1", "seed=3"], "seed= in the overrides and --seeds"),
    (["--num-seeds", "0"], "--num-seeds (make SEEDS=) must be >= 1"),
    (["--epochs", "0"], "--epochs and --probe-epochs must be > 0"),
    (["not_a_key=1"], "not_a_key"),
])
def test_bad_arguments_exit_2_with_one_line_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(learncheck.train, "main", lambda cfg: pytest.fail("trained despite a bad argument"))
    out = tmp_path / "lc"
    with pytest.raises(SystemExit) as exc:
        run_tool(lambda: learncheck.main(["--config", "configs/demo.yaml", "--out-dir", str(out), *argv]))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_make_learn_check_seeds_maps_to_num_seeds(tmp_path):
    from test_makefile import _make

    calls = _make("learn-check", tmp_path, OUT=str(tmp_path / "fresh"), SEEDS="3", ARGS="--epochs 4")
    step = calls[-1]
    assert step[0] == "tools/learncheck.py" and step[step.index("--num-seeds") + 1] == "3"
    assert step[-2:] == ["--epochs", "4"]  # ARGS last; learncheck parses options after overrides too
    (tmp_path / "b").mkdir()
    assert "--num-seeds" not in _make("learn-check", tmp_path / "b", OUT=str(tmp_path / "fresh"))[-1]
