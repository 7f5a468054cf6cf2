"""tools/bench.py: the JSON contract, error rows for missing or failing backends, argument checks and
the cached bench data set. Tiny CPU runs: RN18-CIFAR at 16 px, batch 4, a few steps."""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import pipelines
from harness import benchdata as _benchdata
from harness import measure as _measure
from tools import bench

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--model", "resnet18_cifar", "--size", "16", "--batch", "4", "--steps", "1", "--warmup", "1",
        "--repeats", "2", "--workers", "0", "--num-images", "20", "--device", "cpu"]
QUICK = [*TINY, "--no-stages"]  # runs that test something other than the stage profile


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: tiny convolutions gain nothing from two, and on a shared 2-core machine
    OpenMP threads waiting for each other cost seconds. Restored for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One generated bench set (20 JPEGs) shared by the module's runs."""
    return tmp_path_factory.mktemp("bench_cache")


@pytest.fixture(scope="module")
def report(cache, tmp_path_factory) -> dict:
    """A full tiny run (loader, model, end to end) on the torchvision backend, read back from its JSON."""
    out = tmp_path_factory.mktemp("bench_out") / "sub" / "report.json"
    returned = bench.main([*TINY, "--backend", "torchvision", "--bench-dir", str(cache), "--json", str(out),
                           "--project-cores", "16"])
    written = json.loads(out.read_text())
    assert written["results"] == json.loads(json.dumps(returned["results"]))
    return written


def _row(report: dict, backend: str, mode: str) -> dict:
    rows = [r for r in report["results"] if r["backend"] == backend and r["mode"] == mode and not r.get("sweep")]
    assert len(rows) == 1, f"expected one {backend}/{mode} row, got {rows}"
    return rows[0]


def test_machine_versions_and_data(report):
    m = report["machine"]
    assert isinstance(m["cpu"], str) and m["cpu"]
    assert m["cores"] >= 1 and 1 <= m["cores_available"] <= m["cores"]
    assert m["gpu"] is None if not torch.cuda.is_available() else m["gpu"]["name"]
    assert m["versions"]["torch"] == torch.__version__
    assert m["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    commit = m["git"]["commit"]
    assert commit is None or (len(commit) == 40 and int(commit, 16) >= 0)
    assert m["versions"]["ressl_commit"] == (None if commit is None else commit + "+dirty" * m["git"]["dirty"])
    assert report["args"]["batch"] == 4 and report["args"]["size"] == 16
    assert report["config"]["backbone"] == "resnet18_cifar" and report["config"]["queue_size"] % 4 == 0
    d = report["data"]  # at 16 px: the small raw set, 32x32 as CIFAR is stored
    assert d["generated"] and d["kind"] == "raw" and d["num_images"] == 20 and d["side"] == 32
    assert len(d["sha256"]) == 64 and d["bytes"] == 20 * 32 * 32 * 3
    assert [v["size"] for v in report["recipe"]["views"]] == [16, 16]


def test_above_64_px_the_bench_reads_imagenet_size_jpegs(cache):
    rep = bench.main([*QUICK, "--size", "72", "--backend", "torchvision", "--modes", "loader", "--no-stages",
                      "--bench-dir", str(cache)])
    d = rep["data"]
    assert d["kind"] == "jpeg" and d["num_images"] == 20 and d["bytes"] > 20 * 20_000
    assert Path(d["root"]) == _benchdata.bench_root(20, 0, cache)
    assert _row(rep, "torchvision", "loader")["images_per_s"] > 0 and rep["stages"] == []


@pytest.mark.parametrize("backend, mode", [("synthetic", "model"), ("torchvision", "loader"),
                                           ("torchvision", "end_to_end")])
def test_rows_have_contract_fields_and_sane_values(report, backend, mode):
    r = _row(report, backend, mode)
    assert "error" not in r, r.get("error")
    assert (r["model"], r["batch"], r["size"], r["device"], r["precision"]) == ("resnet18_cifar", 4, 16, "cpu", "no")
    ips = r["images_per_s"]
    assert math.isfinite(ips) and 0 < ips < 1e6
    runs = r["images_per_s_runs"]
    assert len(runs) == 2 and r["images_per_s_min"] <= ips <= r["images_per_s_max"]
    assert r["images_per_s_min"] == min(runs) and r["images_per_s_max"] == max(runs)
    assert r["images_per_s_std"] == pytest.approx(abs(runs[0] - runs[1]) / math.sqrt(2))
    assert r["pairs_per_s"] == pytest.approx(ips)  # one strong view: one pair per sample
    assert r["views_per_s"] == pytest.approx(2 * ips)
    # step time and rate describe the same windows: batch / mean step time is the harmonic-mean rate
    assert 4 / (r["step_ms"] / 1000) == pytest.approx(len(runs) / sum(1 / x for x in runs), rel=1e-6)
    assert r["cpu_cores_busy"] > 0 and r["cpu_util"] == pytest.approx(r["cpu_cores_busy"] / _measure.cores())
    assert r["peak_rss_bytes"] > 50 * 2**20
    assert (r["num_workers"] is None) == (backend == "synthetic")


def test_end_to_end_efficiency_is_the_ratio_to_model_only(report):
    e2e, model = _row(report, "torchvision", "end_to_end"), _row(report, "synthetic", "model")
    assert e2e["loader_efficiency"] == pytest.approx(e2e["images_per_s"] / model["images_per_s"])
    assert 0.05 < e2e["loader_efficiency"] < 5  # same model and batch; CPU noise allowed, not nonsense
    assert 0 <= e2e["data_wait_frac"] < 1
    assert "loader_efficiency" not in _row(report, "torchvision", "loader")


@pytest.mark.parametrize("backends, modes", [("all", "loader"), ("dali,ffcv", "end_to_end")])
def test_missing_backends_get_error_rows(cache, monkeypatch, capsys, backends, modes):
    monkeypatch.setattr(pipelines, "available_backends", lambda: {"torchvision": True, "dali": False, "ffcv": False})
    rep = bench.main([*QUICK, "--backend", backends, "--modes", modes, "--bench-dir", str(cache)])
    table = capsys.readouterr().out
    for backend in ("dali", "ffcv"):
        r = _row(rep, backend, modes)
        assert "not installed" in r["error"] and backend in r["error"]
        assert r["images_per_s"] is None
        assert not set(_measure.ROW_FIGURES[1:]) & set(r), "an error row must carry no figures"
        assert (r["model"], r["batch"]) == ("resnet18_cifar", 4)
        assert f"backend '{backend}' is not installed" in table
    if backends == "all":  # the installed backend is still measured
        assert _row(rep, "torchvision", "loader")["images_per_s"] > 0
    else:  # end to end needs the model-only ceiling, which is measured all the same
        assert _row(rep, "synthetic", "model")["images_per_s"] > 0


def test_failing_backend_is_reported_and_the_run_goes_on(cache, monkeypatch):
    real = pipelines.build_loader

    def flaky(cfg, backend="auto", **kw):
        if backend == "torchvision":
            raise RuntimeError("decoder exploded on purpose")
        return real(cfg, backend, **kw)

    monkeypatch.setattr(pipelines, "build_loader", flaky)
    rep = bench.main([*QUICK, "--backend", "torchvision", "--modes", "loader,model", "--bench-dir", str(cache)])
    assert _row(rep, "torchvision", "loader")["error"] == "RuntimeError: decoder exploded on purpose"
    assert _row(rep, "synthetic", "model")["images_per_s"] > 0


def test_a_backend_changing_torch_threads_is_undone(cache, monkeypatch):
    import pipelines.torchvision as tv

    real = tv.build_torchvision_loader

    def meddling(*a, **kw):
        torch.set_num_threads(3)  # what `import ffcv` does (to 1): pipelines.build_loader undoes it
        return real(*a, **kw)

    monkeypatch.setattr(tv, "build_torchvision_loader", meddling)
    rep = bench.main([*QUICK, "--backend", "torchvision", "--modes", "loader", "--bench-dir", str(cache)])
    assert _row(rep, "torchvision", "loader")["images_per_s"] > 0
    assert torch.get_num_threads() == 1 == rep["args"]["threads"]


def test_unavailable_model_step_is_an_error_row(cache, monkeypatch):
    def broken(self, cfg, accelerator):
        raise ImportError("no ressl.method here")

    monkeypatch.setattr(_measure.ModelStep, "__init__", broken)
    rep = bench.main([*QUICK, "--backend", "torchvision", "--bench-dir", str(cache)])
    for backend, mode in (("synthetic", "model"), ("torchvision", "end_to_end")):
        r = _row(rep, backend, mode)
        assert r["images_per_s"] is None and "no ressl.method here" in r["error"]
    assert _row(rep, "torchvision", "loader")["images_per_s"] > 0


def test_sweep_rows_cover_workers_and_batches(cache, capsys):
    rep = bench.main([*QUICK, "--backend", "torchvision", "--modes", "loader", "--sweep", "--sweep-workers", "0",
                      "--sweep-batch", "2,4", "--bench-dir", str(cache)])
    sweep = [r for r in rep["results"] if r.get("sweep")]
    assert sorted((r["mode"], r["batch"], r["num_workers"]) for r in sweep) == [("loader", 2, 0), ("loader", 4, 0)]
    assert all(r["images_per_s"] > 0 for r in sweep)
    assert "sweep (images/s):" in capsys.readouterr().out


def test_profile_writes_a_chrome_trace(cache, tmp_path):
    rep = bench.main([*QUICK, "--modes", "model", "--backend", "torchvision", "--profile", str(tmp_path / "trace"),
                      "--bench-dir", str(cache)])
    trace = Path(_row(rep, "synthetic", "model")["trace"])
    assert trace.parent == tmp_path / "trace"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("conv" in e.get("name", "") for e in events)
    assert "Self CPU" in trace.with_name(trace.name + ".txt").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch must be > 0"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--backend", "torchvision,mxnet"], "--backend expects a comma list"),
    (["--modes", "loader,training"], "--modes expects"),
    (["--model", "resnet_nope"], "unknown backbone 'resnet_nope'"),
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["--data", "/definitely/not/here"], "--data '/definitely/not/here' is not a directory"),
    (["--sweep-batch", "4,x"], "--sweep-batch expects a comma list of integers"),
    (["--device", "tpu"], "--device"),
    (["--project-cores", "0"], "--project-cores must be > 0"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench.main([*QUICK, "--bench-dir", str(tmp_path / "cache"), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists(), "nothing may be generated for a bad command line"


PRESET_RUN = ["--steps", "1", "--warmup", "1", "--repeats", "1", "--num-images", "20", "--device", "cpu",
              "--no-stages", "--backend", "torchvision"]


def test_a_training_preset_is_measured_as_the_trainer_would_run_it(cache):
    """--config: the preset's backbone, heads, queue, recipe with its overrides (16-px views), batch and
    loader keys; its key=value changes apply; an explicit option still wins over the preset."""
    from ressl.config import load_config

    want = load_config("configs/demo.yaml", ["batch_size=16", "queue_size=64"])
    report = bench.main([*PRESET_RUN, "--modes", "model", "--workers", "0", "--bench-dir", str(cache),
                         "--config", "configs/demo.yaml", "batch_size=16", "queue_size=64"])
    cfg = report["config"]
    for key in ("backbone", "batch_size", "queue_size", "proj_hidden", "proj_dim", "shuffle_bn_splits", "recipe",
                "recipe_overrides", "momentum", "tau_s", "tau_t", "warmup_infonce_epochs"):
        assert cfg[key] == getattr(want, key), key
    assert cfg["num_workers"] == 0 and report["args"]["size"] == 16 and report["args"]["batch"] == 16
    assert [v["size"] for v in report["recipe"]["views"]] == [16, 16]
    (row,) = report["results"]
    assert row["model"] == "resnet18_w32" and row["batch"] == 16 and row["images_per_s"] > 0
    # an explicit option wins; another --recipe drops the preset's recipe.* changes (they were for cifar32)
    other = bench.main([*PRESET_RUN, "--modes", "model", "--workers", "0", "--bench-dir", str(cache),
                        "--config", "configs/demo.yaml", "--batch", "8", "--recipe", "imagenet224", "--size", "16"])
    assert other["config"]["batch_size"] == 8 and other["config"]["queue_size"] == 128
    assert other["config"]["recipe"] == "imagenet224" and other["config"]["recipe_overrides"] == {}


@pytest.mark.parametrize("argv, message", [
    (["batch_size=16"], "key=value arguments (batch_size=16) change a --config preset; pass --config"),
    (["--config", "configs/demo.yaml", "not_a_key=1"], "--config: "),
    (["--config", "configs/nope.yaml"], "configs/nope.yaml"),
    (["--config", "configs/demo.yaml", "recipe.weak.nope=1"], "--config: recipe.weak.nope=1: view 'weak' has no field"),
])
def test_a_bad_preset_or_change_fails_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench.main([*QUICK, "--bench-dir", str(tmp_path / "cache"), *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err, err
    assert not (tmp_path / "cache").exists()


def test_cuda_device_without_cuda_is_refused(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    with pytest.raises(SystemExit):
        bench.main([*QUICK, "--device", "cuda", "--bench-dir", str(tmp_path)])
    assert "no CUDA device" in capsys.readouterr().err


def test_summarize():
    assert _measure.summarize([2.0]) == {"mean": 2.0, "std": 0.0, "min": 2.0, "max": 2.0}
    s = _measure.summarize([1.0, 2.0, 3.0, 6.0])
    assert (s["mean"], s["min"], s["max"]) == (3.0, 1.0, 6.0) and s["std"] == pytest.approx(math.sqrt(14 / 3))
    with pytest.raises(ValueError):
        _measure.summarize([])


def test_jpegs_are_deterministic_imagenet_sized_and_not_trivial():
    a, b = _benchdata.make_jpeg(3, seed=0), _benchdata.make_jpeg(3, seed=0)
    assert a == b
    assert a != _benchdata.make_jpeg(4, seed=0) and a != _benchdata.make_jpeg(3, seed=1)
    sizes = []
    for i in range(6):
        data = _benchdata.make_jpeg(i)
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            sizes.append(img.size)
        assert len(data) > 30_000  # noise + texture: a flat field would be ~5 KB
    assert all(240 <= min(s) and max(s) <= 600 for s in sizes)
    assert len(set(sizes)) > 1


def test_bench_set_is_cached_and_regenerated_when_stale(tmp_path):
    root = _benchdata.ensure_images(12, seed=5, base=tmp_path, workers=1)
    assert root == tmp_path / "n12-s5"
    files = sorted((root / "train").rglob("*.jpg"))
    assert len(files) == 12 and len({f.parent.name for f in files}) == 10
    assert files[0].read_bytes() == _benchdata.make_jpeg(int(files[0].stem), seed=5)
    manifest = json.loads((root / "manifest.json").read_text())
    by_index = sorted(files, key=lambda f: int(f.stem))
    digest = hashlib.sha256("".join(hashlib.sha256(f.read_bytes()).hexdigest() for f in by_index).encode())
    assert manifest["sha256"] == digest.hexdigest()
    stamp = files[0].stat().st_mtime_ns
    assert _benchdata.ensure_images(12, seed=5, base=tmp_path, workers=1) == root
    assert files[0].stat().st_mtime_ns == stamp, "a complete cached set must not be rewritten"
    (root / "manifest.json").write_text(json.dumps({**manifest, "generator_version": -1}))
    _benchdata.ensure_images(12, seed=5, base=tmp_path, workers=1)
    assert json.loads((root / "manifest.json").read_text()) == manifest
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "no staging leftovers"


def test_recordio_holds_the_same_jpeg_bytes(tmp_path):
    from pipelines.formats.recordio import read_recordio

    root = _benchdata.ensure_images(10, seed=1, base=tmp_path, workers=1)
    rec = _benchdata.ensure_format(root, "rec")
    records = list(read_recordio(rec, root / "train.idx"))
    files = sorted((root / "train").rglob("*.jpg"))
    assert [p for p, _ in records] == [f.read_bytes() for f in files]
    assert [int(label) for _, label in records] == list(range(10))
    with pytest.raises(ValueError, match="unknown bench format 'tfrecord'"):
        _benchdata.ensure_format(root, "tfrecord")


@pytest.mark.parametrize("backend", [b for b in ("dali", "ffcv") if pipelines.available_backends()[b]])
def test_installed_fast_backends_measure(cache, backend):
    rep = bench.main([*TINY, "--backend", backend, "--modes", "loader", "--workers", "2", "--bench-dir", str(cache),
                      "--project-cores", "16"])
    r = _row(rep, backend, "loader")
    assert "error" not in r, r.get("error")
    assert r["images_per_s"] > 0 and r["pairs_per_s"] == pytest.approx(r["images_per_s"])
    stages = {s["stage"]: s for s in rep["stages"]}
    assert set(stages) == {"read", "decode", "crop", "augment", "h2d"}, rep["stages"]
    assert all(s["core_s_per_1k_pairs"] >= 0 for s in stages.values())
    assert stages["read"]["side"] == "host" and stages["read"]["pairs_per_s"] > 0
    assert stages["augment"]["side"] == "device" and stages["augment"]["pairs_per_s"] > 0
    projection = rep["bottlenecks"][0]["projection"]
    if backend == "ffcv":  # the small raw set: the resident path, whose CPU side is the index and draws
        assert stages["decode"]["pairs_per_s"] is None and "nothing to decode" in stages["decode"]["note"]
        assert stages["crop"]["side"] == "device" and projection["cpu_stages"] == ["read"]
    else:  # DALI: one pipeline, every op of it on the device of a GPU machine
        assert "one DALI pipeline" in stages["decode"]["fused"] and projection["cpu_stages"] == ["read"]
    assert projection["pairs_per_s"] == pytest.approx(16_000 / stages["read"]["core_s_per_1k_pairs"])
    # FFCV sets torch's threads at import (1), in Loader() and in every iter() (num_workers = 2)
    assert torch.get_num_threads() == 1 == rep["args"]["threads"]


@pytest.mark.cuda
def test_cuda_rows_report_device_memory(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: peak device memory and synchronised timing are CUDA-only")
    rep = bench.main([*QUICK, "--device", "cuda", "--backend", "torchvision", "--precision", "bf16",
                      "--channels-last", "--bench-dir", str(tmp_path)])
    for mode in ("model", "end_to_end"):
        r = next(r for r in rep["results"] if r["mode"] == mode)
        assert r["peak_mem_bytes"] > 0 and r["images_per_s"] > 0


@pytest.mark.parametrize("layout", ["empty", "empty class folder", "beton for another split"])
def test_data_directory_without_data_fails_before_any_work(tmp_path, capsys, layout):
    data = tmp_path / "data"
    data.mkdir()
    if layout == "empty class folder":
        (data / "train" / "a").mkdir(parents=True)
    elif layout == "beton for another split":
        (data / "val.beton").write_bytes(b"x")
    with pytest.raises(SystemExit) as exc:
        bench.main([*QUICK, "--data", str(data), "--bench-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert f"--data '{data}' holds nothing the requested backends read for split 'train'" in err
    assert "train/ (ImageFolder with images) (torchvision)" in err and "make dataset" in err
    assert not (tmp_path / "cache").exists()
    # only the model step reads no data: that run is allowed
    rep = bench.main([*QUICK, "--data", str(data), "--modes", "model", "--bench-dir", str(tmp_path / "cache")])
    assert _row(rep, "synthetic", "model")["images_per_s"] > 0


def test_every_loader_row_failing_for_want_of_data_exits_2_after_the_report(tmp_path, cache, capsys, monkeypatch):
    def no_data(cfg, backend="auto", **kw):
        raise FileNotFoundError(f"image folder '{cfg.data}/train' has no images")

    monkeypatch.setattr(pipelines, "build_loader", no_data)
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit) as exc:
        bench.main([*QUICK, "--backend", "torchvision", "--modes", "loader", "--bench-dir", str(cache),
                    "--json", str(out)])
    captured = capsys.readouterr()
    assert exc.value.code == 2
    assert captured.err.strip().splitlines()[-1].startswith("error: no backend read --data ")
    assert "torchvision: image folder" in captured.err and "has no images" in captured.out  # the table too
    assert json.loads(out.read_text())["results"][0]["error"].startswith("FileNotFoundError")
