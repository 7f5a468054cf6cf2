"""tools/dataset.py and the conversion engine: sources in their real layouts, bad files, resume, kills."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.formats.convert import ConvertError, ConvertOptions, convert, inspect_image, record_order
from pipelines.formats.recordio import RecordIOReader, read_recordio
from pipelines.formats.sources import SourceError, build_source, demo_source
from tools import dataset as dataset_tool

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "dataset.py"
QUIET = dict(progress=False)


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _save(path: Path, image: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **kw) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image)
    if mode:
        img = img.convert(mode)
    img.save(path, format=fmt, **kw)
    return path


def _images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _tar_gz(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return archive


# ------------------------------------------------------------------------------------------------
# demo


def test_demo_source_is_stratified_real_digits():
    src = demo_source()
    train, val = src.split("train"), src.split("val")
    assert src.classes == [str(i) for i in range(10)] and sorted(src.classes) == src.classes
    assert len(train) + len(val) == 1797
    assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images[..., 0], train.images[..., 2])  # grey in all channels
    counts_val = np.bincount(val.labels, minlength=10)
    counts_all = counts_val + np.bincount(train.labels, minlength=10)
    assert np.all(np.abs(counts_val - 0.2 * counts_all) <= 1)
    assert not set(train.names) & set(val.names)
    again = demo_source().split("val")
    np.testing.assert_array_equal(again.images, val.images)
    assert train.images.max() > 200 and train.images.min() == 0


def _tool_main():
    """tools/dataset.py's main(), in process."""
    return dataset_tool.main


def test_demo_cli_writes_tree_rec_and_manifest(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert _tool_main()(["demo", "--out", str(tmp_path), "--formats", "rec", "--no-progress"]) == 0
    out = tmp_path / "demo"
    manifest = json.loads((out / "manifest.json").read_text())
    n_train = manifest["splits"]["train"]["count"]
    assert n_train + manifest["splits"]["val"]["count"] == 1797
    assert sorted(p.name for p in (out / "train").iterdir()) == [str(i) for i in range(10)]
    assert sum(1 for _ in (out / "val").rglob("*.png")) == manifest["splits"]["val"]["count"]
    records = list(RecordIOReader(out / "train.rec", out / "train.idx"))
    assert len(records) == n_train
    np.testing.assert_array_equal([r.id for r in records], record_order(0, "train", n_train))  # seeded shuffle
    names = demo_source().split("train").names
    for r in records[:3]:  # the id leads back to the source sample
        tree_file = out / "train" / str(int(r.label)) / f"{names[r.id]}.png"
        np.testing.assert_array_equal(_decode(r.payload), _decode(tree_file.read_bytes()))
    assert manifest["order"]["seed"] == 0
    entry = manifest["outputs"]["train.rec"]["files"]["train.rec"]
    assert entry["bytes"] == (out / "train.rec").stat().st_size and len(entry["sha256"]) == 64
    assert "demo/val: 359 images, 0 converted, 0 skipped" in caplog.text


# ------------------------------------------------------------------------------------------------
# CIFAR / STL archives in their real layouts


def _make_cifar10(root: Path, per_batch: int = 3) -> tuple[Path, np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    images = _images(6 * per_batch, 32, 32, seed=7)
    labels = np.arange(6 * per_batch) % 10
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # planar R, G, B; row-major
    for b, member in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        with open(folder / member, "wb") as f:
            pickle.dump({b"data": rows[sl], b"labels": labels[sl].tolist(), b"batch_label": b"x"}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_vis": 3072}, f)
    return _tar_gz(folder, root / "cifar-10-python.tar.gz"), images, labels


def test_cifar10_archive_to_tree_rec_and_beton(tmp_path):
    archive, images, labels = _make_cifar10(tmp_path / "src")
    source = build_source("cifar10", archive)
    assert source.classes[0] == "airplane" and len(source.classes) == 10
    manifest = convert(source, tmp_path / "out", ConvertOptions(formats=("rec", "beton"), **QUIET))
    out = tmp_path / "out" / "cifar10"
    records = list(RecordIOReader(out / "train.rec", out / "train.idx"))
    assert [r.id for r in records] == record_order(0, "train", 15).tolist()
    assert [int(r.label) for r in records] == labels[[r.id for r in records]].tolist()  # labels unchanged
    for r in records:
        np.testing.assert_array_equal(_decode(r.payload), images[r.id])  # PNG payloads: lossless
    val_files = sorted((out / "val").rglob("*.png"))
    assert len(val_files) == 3 and {p.parent.name for p in val_files} == {"dog", "frog", "horse"}
    assert manifest["outputs"]["val.beton"]["params"]["mode"] == "raw"
    assert (out / "val.beton").stat().st_size > 0
    assert manifest["splits"]["train"]["per_class"]["airplane"] == 2
    # the extracted folder gives the same images
    extracted = build_source("cifar10", tmp_path / "src" / "cifar-10-batches-py").split("val")
    np.testing.assert_array_equal(extracted.images, images[15:])


def test_cifar100_layout(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images = _images(4, 32, 32, seed=8)
    rows = images.transpose(0, 3, 1, 2).reshape(4, -1)
    names = [f"class{i:02d}" for i in range(100)]
    for member, sl in (("train", slice(0, 3)), ("test", slice(3, 4))):
        with open(folder / member, "wb") as f:
            pickle.dump({b"data": rows[sl], b"fine_labels": [99, 0, 42][sl] or [7], b"coarse_labels": [0]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": []}, f)
    source = build_source("cifar100", tmp_path)
    train = source.split("train")
    np.testing.assert_array_equal(train.images, images[:3])
    np.testing.assert_array_equal(train.labels, [99, 0, 42])
    assert source.split("val").labels.tolist() == [7]


def _make_stl(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    data = {"train": _images(4, 96, 96, 9), "test": _images(3, 96, 96, 10), "unlabeled": _images(5, 96, 96, 11)}
    for split, imgs in data.items():
        (folder / f"{split}_X.bin").write_bytes(imgs.transpose(0, 3, 2, 1).tobytes())  # per channel, column-major
    (folder / "train_y.bin").write_bytes(bytes([1, 10, 2, 3]))
    (folder / "test_y.bin").write_bytes(bytes([4, 4, 5]))
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return _tar_gz(folder, root / "stl10_binary.tar.gz"), data


def test_stl10_archive_with_unlabeled(tmp_path):
    archive, data = _make_stl(tmp_path / "src")
    source = build_source("stl10", archive)
    assert source.splits == ["train", "val", "unlabeled"]
    train = source.split("train")
    np.testing.assert_array_equal(train.images, data["train"])
    assert train.labels.tolist() == [0, 9, 1, 2]
    np.testing.assert_array_equal(source.split("val").images, data["test"])
    manifest = convert(source, tmp_path / "out", ConvertOptions(formats=("rec",), **QUIET))
    out = tmp_path / "out" / "stl10"
    unl = list(read_recordio(out / "unlabeled.rec", out / "unlabeled.idx"))
    assert [lab for _, lab in unl] == [-1] * 5
    np.testing.assert_array_equal(_decode(unl[4][0]), data["unlabeled"][4])
    assert len(list((out / "unlabeled" / "_unlabeled").glob("*.png"))) == 5
    assert manifest["splits"]["unlabeled"]["per_class"] == {"_unlabeled": 5}


# ------------------------------------------------------------------------------------------------
# image files: bad inputs, ImageNet, Tiny-ImageNet


def _bad_tree(root: Path) -> dict[str, str]:
    """An ImageFolder tree with one file of every bad kind; returns file name -> expected action."""
    good = _images(1, 24, 32, seed=12)[0]
    _save(root / "cat" / "good.jpg", good, quality=95)
    _save(root / "cat" / "cmyk.jpg", good, mode="CMYK")
    _save(root / "dog" / "grey.jpg", good, mode="L")
    _save(root / "dog" / "png_named.jpg", good, fmt="PNG")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image\n")
    (root / "dog" / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    whole = (root / "cat" / "good.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return {"good.jpg": "ok", "cmyk.jpg": "converted", "grey.jpg": "converted", "png_named.jpg": "converted",
            "empty.jpg": "skipped", "notes.txt": "skipped", "noise.jpg": "skipped", "truncated.jpg": "skipped"}


def test_inspect_image_classifies_every_bad_kind(tmp_path):
    expected = _bad_tree(tmp_path)
    reasons = {}
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file():
            ins = inspect_image(str(path))
            assert ins.status == expected[path.name], (path.name, ins)
            reasons[path.name] = ins.reason
            if ins.status != "skipped":
                assert _decode(ins.payload).shape == (24, 32, 3)
                assert ins.payload[:2] == b"\xff\xd8"  # always JPEG in the record
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert "CMYK" in reasons["cmyk.jpg"] and "L colour mode" in reasons["grey.jpg"]
    assert "PNG data in a '.jpg' file" in reasons["png_named.jpg"]
    assert "truncated" in reasons["truncated.jpg"] and "not an image" in reasons["notes.txt"]
    assert inspect_image(str(tmp_path / "cat" / "good.jpg")).payload == (tmp_path / "cat" / "good.jpg").read_bytes()
    small = inspect_image(str(tmp_path / "cat" / "good.jpg"), max_side=16)
    assert _decode(small.payload).shape == (12, 16, 3)


def test_folder_with_bad_files_converts_and_lists_them(tmp_path):
    expected = _bad_tree(tmp_path / "src")
    source = build_source("folder", tmp_path / "src")
    assert source.classes == ["cat", "dog"] and source.folder_splits == {"train": str(tmp_path / "src")}
    manifest = convert(source, tmp_path / "out", ConvertOptions(formats=("rec", "beton", "folder"), workers=2,
                                                                **QUIET))
    out = tmp_path / "out" / "folder"
    bad = {Path(b["file"]).name: b for b in manifest["bad_files"]}
    assert {k for k, v in expected.items() if v != "ok"} == set(bad)
    assert all((b["action"] == "skipped") == (expected[k] == "skipped") for k, b in bad.items())
    info = manifest["splits"]["train"]
    assert (info["count"], info["converted"], info["skipped"]) == (4, 3, 4)
    records = list(read_recordio(out / "train.rec", out / "train.idx"))
    assert sorted(lab for _, lab in records) == [0, 0, 1, 1]
    assert all(_decode(p).shape == (24, 32, 3) for p, _ in records)
    assert manifest["outputs"]["train.beton"]["count"] == 4
    assert (out / "train").is_symlink() and (out / "train" / "cat" / "good.jpg").is_file()


def test_imagenet_flat_val_and_imagenet100_class_list(tmp_path):
    src = tmp_path / "imagenet"
    wnids = ["n01440764", "n01443537", "n01484850"]
    img = _images(1, 40, 50, seed=13)[0]
    for w in wnids:
        for k in range(2):
            _save(src / "train" / w / f"{w}_{k}.JPEG", img)
    truth = ["ImageId,PredictionString"]
    for k, w in enumerate(["n01484850", "n01440764", "n01484850", "n01443537"]):
        _save(src / "val" / f"ILSVRC2012_val_{k + 1:08d}.JPEG", img)
        truth.append(f"ILSVRC2012_val_{k + 1:08d},{w} 1 2 3 4")
    (src / "LOC_val_solution.csv").write_text("\n".join(truth) + "\n")
    source = build_source("imagenet", src)
    assert source.classes == wnids and list(source.folder_splits) == ["train"]
    assert source.split("val").labels.tolist() == [2, 0, 2, 1]
    (tmp_path / "classes.txt").write_text("n01484850\nn01440764\n")
    sub = build_source("imagenet100", src, classes_file=str(tmp_path / "classes.txt"))
    assert sub.classes == ["n01440764", "n01484850"] and sub.folder_splits == {}
    assert sub.split("val").labels.tolist() == [1, 0, 1]
    assert sub.split("train").labels.tolist() == [0, 0, 1, 1]
    manifest = convert(sub, tmp_path / "out", ConvertOptions(formats=("rec",), **QUIET))
    tree = tmp_path / "out" / "imagenet100"
    assert sorted(p.name for p in (tree / "val").iterdir()) == ["n01440764", "n01484850"]
    assert manifest["splits"]["val"]["count"] == 3
    (tmp_path / "bad.txt").write_text("n99999999\n")
    with pytest.raises(SourceError, match="n99999999"):
        build_source("imagenet100", src, classes_file=str(tmp_path / "bad.txt"))


def test_tiny_imagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    img = _images(1, 64, 64, seed=14)[0]
    for w in wnids:
        for k in range(2):
            _save(root / "train" / w / "images" / f"{w}_{k}.JPEG", img)
    ann = []
    for k, w in enumerate(["n02", "n01", "n01"]):
        _save(root / "val" / "images" / f"val_{k}.JPEG", img)
        ann.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    source = build_source("tiny-imagenet", tmp_path)
    assert source.classes == ["n01", "n02"]
    assert source.split("val").labels.tolist() == [1, 0, 0]
    convert(source, tmp_path / "out", ConvertOptions(formats=("rec",), **QUIET))
    out = tmp_path / "out" / "tiny-imagenet"
    assert sorted(p.relative_to(out / "val").as_posix() for p in (out / "val").rglob("*.JPEG")) == [
        "n01/val_1.JPEG", "n01/val_2.JPEG", "n02/val_0.JPEG"]
    first = next(r for r in RecordIOReader(out / "train.rec", out / "train.idx") if r.id == 0)
    assert first.payload == (root / "train" / "n01" / "images" / "n01_0.JPEG").read_bytes()  # passed through


# ------------------------------------------------------------------------------------------------
# resume, force, errors, kills


def test_rerun_skips_finished_outputs_and_force_rebuilds(tmp_path):
    _bad_tree(tmp_path / "src")
    source = build_source("folder", tmp_path / "src")
    convert(source, tmp_path / "out", ConvertOptions(formats=("rec",), **QUIET))
    rec = tmp_path / "out" / "folder" / "train.rec"
    first = rec.stat().st_mtime_ns
    time.sleep(0.01)
    convert(source, tmp_path / "out", ConvertOptions(formats=("rec",), **QUIET))
    assert rec.stat().st_mtime_ns == first
    convert(source, tmp_path / "out", ConvertOptions(formats=("rec",), quality=50, **QUIET))
    second = rec.stat().st_mtime_ns
    assert second != first  # parameters changed: rebuilt
    convert(source, tmp_path / "out", ConvertOptions(formats=("rec",), quality=50, force=True, **QUIET))
    assert rec.stat().st_mtime_ns != second
    rec.write_bytes(b"damaged")  # size no longer matches the manifest: rebuilt
    convert(source, tmp_path / "out", ConvertOptions(formats=("rec",), quality=50, **QUIET))
    assert len(list(read_recordio(rec, rec.with_suffix(".idx")))) == 4


def test_clear_errors_before_work(tmp_path):
    with pytest.raises(SourceError, match="unknown dataset 'mnist'"):
        build_source("mnist")
    with pytest.raises(SourceError, match="cifar-10-python.tar.gz"):
        build_source("cifar10", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no class folders"):
        build_source("folder", tmp_path / "empty")
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(SourceError, match="no files in any class folder"):
        build_source("folder", tmp_path / "empty")
    with pytest.raises(SourceError, match="--src is required"):
        build_source("tiny-imagenet")
    with pytest.raises(ConvertError, match="formats must be"):
        ConvertOptions(formats=("tfrecord",))
    with pytest.raises(ConvertError, match="quality"):
        ConvertOptions(quality=0)
    (tmp_path / "allbad" / "cat").mkdir(parents=True)
    (tmp_path / "allbad" / "cat" / "a.jpg").write_bytes(b"")
    with pytest.raises(ConvertError, match=r"none of the 1 files in \S*allbad/cat could be read as an image"):
        convert(build_source("folder", tmp_path / "allbad"), tmp_path / "out", ConvertOptions(**QUIET))
    assert not list((tmp_path / "out" / "folder").glob("train*"))
    rc = subprocess.run([sys.executable, str(TOOL), "cifar10", "--src", str(tmp_path / "nowhere"), "--out",
                         str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert rc.returncode == 2 and "cifar-10-python.tar.gz" in rc.stderr


def test_sigkill_mid_conversion_leaves_no_output_and_rerun_completes(tmp_path):
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    _save(src / "0.jpg", _images(1, 8, 8, seed=15)[0])
    data = (src / "0.jpg").read_bytes()
    for k in range(1, 3000):
        (src / f"{k}.jpg").write_bytes(data)
    out = tmp_path / "out"
    cmd = [sys.executable, str(TOOL), "folder", "--src", str(tmp_path / "src"), "--out", str(out), "--formats",
           "rec", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((out / "folder").glob(".train.rec.tmp-*")) and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("the conversion finished before it could be killed")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (out / "folder" / "train.rec").exists() and not (out / "folder" / "train.idx").exists()
    assert list((out / "folder").glob(".train.rec.tmp-*"))  # the killed run's temporary
    rc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rc.returncode == 0, rc.stderr
    assert "left by an interrupted run" in rc.stderr
    assert sorted(p.name for p in (out / "folder").iterdir()) == ["manifest.json", "train.idx", "train.rec"]
    assert len(list(read_recordio(out / "folder" / "train.rec", out / "folder" / "train.idx"))) == 3000
    assert os.path.getsize(out / "folder" / "train.rec") > 3000 * len(data)


def test_beton_is_skipped_with_a_warning_without_ffcv(tmp_path, monkeypatch, caplog):
    import importlib.util as iu

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "ffcv" else real(name, *a))
    _bad_tree(tmp_path / "src")
    manifest = convert(build_source("folder", tmp_path / "src"), tmp_path / "out",
                       ConvertOptions(formats=("beton", "rec"), **QUIET))
    assert "FFCV is not installed" in caplog.text
    assert set(manifest["outputs"]) == {"train.rec"}
    assert not (tmp_path / "out" / "folder" / "train.beton").exists()


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args, "--no-progress"], capture_output=True, text=True,
                          timeout=120)


def _tool_module():
    return dataset_tool


def test_junk_cifar_archive_is_one_error_line_naming_the_file(tmp_path, caplog):
    """Before: a junk cifar-10-python.tar.gz (or junk members inside a real tar) gave a tarfile/pickle traceback."""
    junk = tmp_path / "junk" / "cifar-10-python.tar.gz"
    junk.parent.mkdir()
    junk.write_bytes(np.random.default_rng(0).bytes(4000))
    rc = _run_tool("cifar10", "--src", str(junk.parent), "--out", str(tmp_path / "out"))
    assert rc.returncode == 2 and "Traceback" not in rc.stderr
    assert f"{junk}: cannot read the archive (not a tar archive, compressed or plain)" in rc.stderr
    members = tmp_path / "members" / "cifar-10-batches-py"
    members.mkdir(parents=True)
    for m in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (members / m).write_bytes(b"not a pickle\n" * 20)
    archive = _tar_gz(members, tmp_path / "members" / "cifar-10-python.tar.gz")
    with caplog.at_level(logging.ERROR):
        assert _tool_module().main(["cifar10", "--src", str(archive), "--out", str(tmp_path / "out")]) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"{archive}: batches.meta: not a CIFAR batch (a Python pickle of a dict): UnpicklingError: invalid load "
        "key, 'n'.; the archive is damaged or not the official one"]


def test_verify_checks_every_output_against_the_manifest(tmp_path, caplog):
    """`--verify` hashes every output; a .rec of the same size and count from another --seed fails it."""
    tool = _tool_module()
    src = tmp_path / "src"
    for k in range(6):
        _save(src / f"c{k % 2}" / f"{k}.png", _images(1, 10, 10, seed=k)[0], "PNG")
    for name, seed in (("a", "0"), ("b", "1")):
        assert tool.main(["folder", "--src", str(src), "--out", str(tmp_path / name), "--formats", "rec",
                          "--seed", seed, "--no-progress"]) == 0
    with caplog.at_level(logging.INFO):
        assert tool.main(["folder", "--out", str(tmp_path / "a"), "--verify"]) == 0
    assert "train.rec: matches the manifest (6 samples)" in caplog.text
    caplog.clear()
    (tmp_path / "a" / "folder" / "train.rec").write_bytes((tmp_path / "b" / "folder" / "train.rec").read_bytes())
    with caplog.at_level(logging.INFO):
        assert tool.main(["folder", "--out", str(tmp_path / "a"), "--verify"]) == 2
    assert "train.rec: SHA-256 differs from the manifest's" in caplog.text and "1 of 1 outputs" in caplog.text
    assert tool.main(["folder", "--out", str(tmp_path / "nowhere"), "--verify"]) == 2
    assert "no manifest listing outputs" in caplog.text


def test_workers_default_to_every_core_this_process_may_use(tmp_path, caplog):
    """Before: `make dataset` used one process by default (FFCV's own writer uses every core)."""
    tool = _tool_module()
    cores = len(os.sched_getaffinity(0))
    assert ConvertOptions().workers == cores and tool.parse_args(["demo"]).workers is None
    for k in range(4):
        _save(tmp_path / "src" / f"c{k % 2}" / f"{k}.png", _images(1, 8, 8, seed=k)[0], "PNG")
    with caplog.at_level(logging.INFO):
        assert tool.main(["folder", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--formats",
                          "rec", "--no-progress"]) == 0
    assert f"img/s, {cores} workers)" in caplog.text
