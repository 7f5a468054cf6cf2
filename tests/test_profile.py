"""The per-stage profile (pipelines.profile) and the bench's stage rows, bottleneck and projection lines,
and the small raw bench set stored as `make dataset` stores CIFAR. Tiny CPU runs."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import benchdata as _benchdata
from pipelines.profile import bottleneck, cpu_seconds, project, time_stage
from pipelines.samples import BetonSamples, RecordSamples, TreeSamples
from tools import bench

ROOT = Path(__file__).resolve().parents[1]

CPU = torch.device("cpu")


def _stage(stage: str, side: str, rate: float | None, core_s: float, threads: int | None = 1) -> dict:
    return {"stage": stage, "side": side, "pairs_per_s": rate, "core_s_per_1k_pairs": core_s, "threads": threads}


def test_time_stage_counts_cpu_time_not_waiting():
    def sleeper(k: int) -> None:
        time.sleep(0.02)

    rates, core_s = time_stage(sleeper, pairs_per_call=10, warmup=1, steps=3, repeats=2, device=CPU,
                               min_window_s=0.05)
    assert len(rates) == 2 and all(200 < r < 520 for r in rates)  # 10 pairs per >= 20 ms
    assert core_s < 0.5  # 2 ms of CPU per pair would be 2 core-s per 1k: sleeping costs (almost) none

    def burner(k: int) -> None:
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.02:
            pass

    rates, core_s = time_stage(burner, pairs_per_call=10, warmup=1, steps=3, repeats=2, device=CPU, min_window_s=0.05)
    assert 1.6 < core_s < 2.6  # 20 ms of CPU per 10 pairs = 2 core-s per 1,000 pairs


def test_cpu_seconds_includes_other_threads():
    from concurrent.futures import ThreadPoolExecutor

    def burn(_: int) -> None:
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.1:
            pass

    before = cpu_seconds()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(burn, range(2)))
    assert cpu_seconds() - before >= 0.19


def test_bottleneck_names_the_largest_cpu_stage_and_the_loader_alone():
    stages = [_stage("read", "host", 9000, 0.1), _stage("decode", "host", 600, 1.5), _stage("crop", "host", 500, 1.0),
              _stage("augment", "device", 300, 2.4), _stage("h2d", "device", None, 0.0, None)]
    v = bottleneck(stages, cores=2, device_type="cpu")  # no GPU: every stage runs on the 2 cores
    assert (v["limit"], v["stage"]) == ("CPU", "augment")
    assert v["pairs_per_s"] == pytest.approx(2000 / 5.0) == v["loader_cpu_pairs_per_s"]
    assert "augment takes 48% of the 5 core-s" in v["line"]
    with_model = bottleneck([*stages, _stage("model", "device", 40, 45.0, 2)], cores=2, device_type="cpu")
    assert (with_model["limit"], with_model["stage"]) == ("CPU", "model")
    assert with_model["pairs_per_s"] == pytest.approx(2000 / 50.0)
    assert with_model["loader_cpu_pairs_per_s"] == pytest.approx(400.0)
    assert "the model step shares them" in with_model["line"] and "loader's stages alone: augment" in with_model["line"]


def test_bottleneck_on_a_gpu_is_device_or_io_bound_when_those_are_slower():
    host = [_stage("read", "host", 5000, 0.05, 4), _stage("decode", "host", 800, 2.0, 4)]
    device = [_stage("augment", "device", 4000, 0.01), _stage("model", "device", 2000, 0.02)]
    v = bottleneck(host + device, cores=16, device_type="cuda")  # CPU: 16,000 / 2.05 = 7,805 pairs/s
    assert (v["limit"], v["stage"]) == ("device", "model")
    assert v["pairs_per_s"] == pytest.approx(1 / (1 / 4000 + 1 / 2000))
    slow_read = [_stage("read", "host", 300, 0.05, 4), host[1]]  # 4 threads, 1.5% busy: waiting on storage
    v = bottleneck(slow_read + device, cores=16, device_type="cuda")
    assert (v["limit"], v["stage"], v["pairs_per_s"]) == ("IO", "read", 300)
    assert bottleneck([_stage("h2d", "device", None, 0.0)], 2, "cpu")["limit"] is None


def test_projection_scales_only_the_host_stages():
    stages = [_stage("read", "host", 9000, 0.1), _stage("decode", "host", 600, 1.5), _stage("crop", "host", 500, 0.4),
              _stage("augment", "device", 300, 2.4), _stage("model", "device", 40, 45.0)]
    p = project(stages, cores=16)
    assert p["cpu_stages"] == ["read", "decode", "crop"] and p["core_s_per_1k_pairs"] == pytest.approx(2.0)
    assert p["pairs_per_s"] == pytest.approx(8000.0)
    assert p["line"].startswith("PROJECTION, not measured") and "on the device there: augment" in p["line"]
    assert project([_stage("augment", "device", 300, 2.4)], 16)["pairs_per_s"] is None


def test_small_bench_set_is_stored_as_make_dataset_stores_cifar(tmp_path):
    a = _benchdata.small_images(12, 32, seed=3)
    assert a.shape == (12, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, _benchdata.small_images(12, 32, seed=3))
    assert not np.array_equal(a, _benchdata.small_images(12, 32, seed=4))
    assert 20 < a.std() < 90 and np.abs(np.diff(a.astype(int), axis=1)).mean() > 5  # texture and noise
    root = _benchdata.ensure_small(12, seed=3, side=32, base=tmp_path)
    assert root == tmp_path / "raw32-n12-s3"
    tree = TreeSamples(root / "train")
    assert len(tree) == 12 and {Path(p).suffix for p in tree.paths} == {".png"}
    assert tree.image(0).size == (32, 32)
    assert len(RecordSamples(root / "train.rec", root / "train.idx")) == 12
    source = json.loads((root / "manifest.json").read_text())["source"]
    assert source["sha256"] and source["side"] == 32 and source["num_images"] == 12
    pixels = {tuple(np.asarray(tree.image(i)).ravel()[:64]) for i in range(12)}
    assert pixels == {tuple(x.ravel()[:64]) for x in a}  # the generated pixels, losslessly
    stamp = (root / "train.rec").stat().st_mtime_ns
    assert _benchdata.ensure_small(12, seed=3, side=32, base=tmp_path) == root
    assert (root / "train.rec").stat().st_mtime_ns == stamp, "a finished set must not be rewritten"
    if importlib.util.find_spec("ffcv") is not None:  # without FFCV the converter writes no .beton
        beton = BetonSamples(root / "train.beton")
        assert len(beton) == 12 and not any(beton.is_jpeg(i) for i in range(12))
    with pytest.raises(ValueError, match="side must be in 1..64"):
        _benchdata.ensure_small(12, side=96, base=tmp_path)


def test_bench_reports_stages_bottleneck_and_projection(tmp_path, capsys):
    out = tmp_path / "r.json"
    rep = bench.main(["--model", "resnet18_cifar", "--size", "16", "--batch", "4", "--steps", "1", "--warmup", "1",
                      "--repeats", "2", "--workers", "0", "--num-images", "20", "--device", "cpu", "--backend",
                      "torchvision", "--bench-dir", str(tmp_path / "cache"), "--json", str(out),
                      "--project-cores", "16"])
    text = capsys.readouterr().out
    assert json.loads(out.read_text())["stages"] == json.loads(json.dumps(rep["stages"]))
    stages = {s["stage"]: s for s in rep["stages"]}
    assert list(stages) == ["read", "decode", "crop", "augment", "h2d", "model"]
    for name in ("read", "decode", "crop", "augment"):
        s = stages[name]
        assert s["side"] == "host" and s["pairs_per_s"] > 0 and s["core_s_per_1k_pairs"] > 0, s
        assert (s["backend"], s["size"], s["batch"]) == ("torchvision", 16, 4)
    assert stages["h2d"]["pairs_per_s"] is None and stages["h2d"]["core_s_per_1k_pairs"] == 0
    assert "the device is the CPU" in stages["h2d"]["note"]
    model = next(r for r in rep["results"] if r["mode"] == "model")
    assert stages["model"]["pairs_per_s"] == model["pairs_per_s"]
    (v,) = rep["bottlenecks"]
    assert v["limit"] in ("CPU", "IO") and v["stage"] in stages and v["line"]
    loader = next(r for r in rep["results"] if r["mode"] == "loader")
    assert v["loader_measured"]["pairs_per_s"] == loader["pairs_per_s"]
    host = sum(stages[n]["core_s_per_1k_pairs"] for n in ("read", "decode", "crop", "augment"))
    assert v["projection"]["pairs_per_s"] == pytest.approx(16_000 / host)
    assert f"bottleneck torchvision @16 px: {v['line']}" in text
    assert "projection torchvision @16 px: PROJECTION, not measured" in text
    for name in stages:
        assert f"torchvision  16    {name}" in text
