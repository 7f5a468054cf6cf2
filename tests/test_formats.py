"""Writers, readers and Numba kernels of pipelines/formats: exact layouts and round trips (CPU)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from data_files import read_beton, sha256

from pipelines.formats import kernels
from pipelines.formats.recordio import (
    MAGIC,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    check_index,
    read_index,
    read_record,
    read_recordio,
    write_recordio,
)


@pytest.fixture(params=[True, False], ids=["jit", "python"])
def jit(request):
    """Run a test with the kernels compiled and again with their pure-Python bodies."""
    before = kernels.jit_enabled()
    kernels.set_jit_enabled(request.param)
    yield request.param
    kernels.set_jit_enabled(before)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _smooth_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Low-frequency colour images (JPEG-friendly, unlike noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        a, b, c = rng.uniform(0.5, 3.0, 3)
        out[i, ..., 0] = 127 + 120 * np.sin(a * 3 * xx + i)
        out[i, ..., 1] = 127 + 120 * np.cos(b * 3 * yy - i)
        out[i, ..., 2] = 127 + 120 * np.sin(c * 2 * (xx + yy))
    return out


# ------------------------------------------------------------------------------------------------
# kernels


def test_planar_and_colmajor_kernels_match_numpy(jit):
    rng = np.random.default_rng(1)
    n, h, w = 3, 5, 7
    rows = rng.integers(0, 256, (n, 3 * h * w), dtype=np.uint8)
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    kernels.planar_to_hwc(rows, h, w, out)
    np.testing.assert_array_equal(out, rows.reshape(n, 3, h, w).transpose(0, 2, 3, 1))
    kernels.colmajor_to_hwc(rows, h, w, out)
    np.testing.assert_array_equal(out, rows.reshape(n, 3, w, h).transpose(0, 3, 2, 1))


def test_record_framing_layout(jit):
    payloads = [b"\xff\xd8abc", b"", b"0123456789abcdef"]
    lengths = np.array([len(p) for p in payloads], dtype=np.int64)
    offsets = kernels.record_offsets(lengths, 100)
    # 8-byte frame + 24-byte header + payload, padded to 4: 5 -> 40, 0 -> 32, 16 -> 48
    np.testing.assert_array_equal(offsets, [100, 140, 172, 220])
    payload = np.frombuffer(b"".join(payloads), dtype=np.uint8)
    poffs = np.array([0, 5, 5, 21], dtype=np.int64)
    labels = np.array([3.0, -1.0, 7.5], dtype=np.float32)
    ids = np.array([10, 11, (1 << 40) + 5], dtype=np.int64)
    out = np.full(int(offsets[-1] - offsets[0]), 0xAA, dtype=np.uint8)
    kernels.pack_records(payload, poffs, labels.view(np.uint32), ids, offsets, out)
    buf = out.tobytes()
    for i, p in enumerate(payloads):
        pos = int(offsets[i] - offsets[0])
        magic, lrec = struct.unpack_from("<II", buf, pos)
        flag, label, rid, id2 = struct.unpack_from("<IfQQ", buf, pos + 8)
        assert magic == 0xCED7230A and lrec >> 29 == 0 and lrec == 24 + len(p)
        assert (flag, label, rid, id2) == (0, labels[i], ids[i], 0)
        assert buf[pos + 32 : pos + 32 + len(p)] == p
        pad_end = int(offsets[i + 1] - offsets[0])
        assert set(buf[pos + 32 + len(p) : pad_end]) <= {0}


def test_resize_plan(jit):
    plan = kernels.resize_plan(np.array([500, 100, 375, 3000]), np.array([375, 50, 500, 1]), 256)
    np.testing.assert_array_equal(plan, [[256, 192], [100, 50], [192, 256], [256, 1]])
    keep = kernels.resize_plan(np.array([500]), np.array([375]), 0)
    np.testing.assert_array_equal(keep, [[500, 375]])


# ------------------------------------------------------------------------------------------------
# RecordIO


def test_recordio_round_trip(tmp_path, jit):
    rng = np.random.default_rng(2)
    magic = struct.pack("<I", 0xCED7230A)
    payloads = [bytes(rng.integers(0, 256, int(k), dtype=np.uint8)) for k in rng.integers(0, 300, 40)]
    payloads[3] = magic * 5  # the magic word inside a payload must not confuse the reader
    payloads[4] = b""
    labels = [int(v) for v in rng.integers(-1, 1000, 40)]
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    assert write_recordio(rec, idx, zip(payloads, labels), chunk_size=7) == 40
    assert list(read_recordio(rec, idx)) == list(zip(payloads, labels))
    assert list(read_recordio(rec)) == list(zip(payloads, labels))  # scanning, no index
    lines = idx.read_text().splitlines()
    assert lines[0] == "0\t0" and len(lines) == 40 and all(ln.split("\t")[0] == str(i) for i, ln in enumerate(lines))
    reader = RecordIOReader(rec, idx)
    assert [r.id for r in reader] == list(range(40))
    assert reader[-1].payload == payloads[-1]
    assert not list(tmp_path.glob(".*tmp*"))


def test_recordio_reader_rejects_bad_files(tmp_path):
    rec, idx = tmp_path / "b.rec", tmp_path / "b.idx"
    write_recordio(rec, idx, [(b"abcd", 1), (b"efgh", 2)])
    data = bytearray(rec.read_bytes())
    data[36:40] = b"\0\0\0\0"  # second record's magic (first is 8 + 24 + 4 bytes)
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match="bad magic .* at byte 36"):
        RecordIOReader(rec, idx)[1]
    idx.write_text("0\t0\n1\tforty\n")
    with pytest.raises(RecordIOError, match=r"b.idx:2"):
        RecordIOReader(rec, idx)
    with pytest.raises(FileNotFoundError, match="missing.rec"):
        RecordIOReader(tmp_path / "missing.rec")


def test_index_helpers_shared_with_the_loaders(tmp_path):
    """read_index / check_index / read_record: the one .idx parser and record parser (DALI uses them)."""
    rec, idx = tmp_path / "e.rec", tmp_path / "e.idx"
    with RecordIOWriter(rec, idx) as w:
        w.write_many([b"abcd", b"efghij"], [1, 2], ids=[70, 3])
    offsets = read_index(idx)
    np.testing.assert_array_equal(offsets, [0, 36])
    check_index(rec, offsets)
    data = np.memmap(rec, dtype=np.uint8, mode="r")
    first, second = read_record(data, 0), read_record(data, int(offsets[1]))
    assert (first.payload, first.label, first.id) == (b"abcd", 1.0, 70)
    assert (second.payload, second.id) == (b"efghij", 3)
    assert struct.unpack_from("<I", rec.read_bytes(), 36)[0] == MAGIC
    assert idx.read_text() == "0\t0\n1\t36\n"  # keys are record numbers whatever the ids
    with pytest.raises(RecordIOError, match="do not start a record"):
        check_index(rec, np.array([0, 8]))
    with pytest.raises(RecordIOError, match="points at byte 4000"):
        check_index(rec, np.array([0, 4000]))
    with pytest.raises(RecordIOError, match="bad magic .* at byte 4"):
        read_record(data, 4, "e.rec record 9")
    (tmp_path / "blank.idx").write_text("\n\n")
    with pytest.raises(RecordIOError, match="is empty"):
        read_index(tmp_path / "blank.idx")
    (tmp_path / "x.idx").write_text("a\t0\n")
    with pytest.raises(RecordIOError, match=r"x.idx:1: expected"):
        read_index(tmp_path / "x.idx")
    with pytest.raises(FileNotFoundError, match="nope.idx"):
        read_index(tmp_path / "nope.idx")


def test_recordio_module_imports_no_numba():
    """The loaders import recordio for the index and magic; Numba stays a writer-only import."""
    import subprocess
    import sys

    code = "import sys, pipelines.formats.recordio as r; r.read_index; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_recordio_failure_leaves_no_file(tmp_path):
    rec, idx = tmp_path / "c.rec", tmp_path / "c.idx"
    write_recordio(rec, idx, [(b"old", 0)])

    def items():
        yield b"x" * 10, 1
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_recordio(rec, idx, items(), chunk_size=1)
    assert list(read_recordio(rec, idx)) == [(b"old", 0)]  # previous files untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.idx", "c.rec"]
    with pytest.raises(ValueError, match="2 payloads but 1 labels"):
        with RecordIOWriter(tmp_path / "d.rec", tmp_path / "d.idx") as w:
            w.write_many([b"a", b"b"], [1])
    assert not (tmp_path / "d.rec").exists()


def test_dali_reads_our_recordio(tmp_path):
    dali = pytest.importorskip("nvidia.dali", reason="DALI is not installed (the [dali] extra)")
    from nvidia.dali import fn, pipeline_def, types

    images = _smooth_images(6, 20, 28, seed=3)
    payloads = [_png(im) if i % 2 == 0 else _jpeg(im) for i, im in enumerate(images)]
    labels = [5, 0, 9, 1, 3, 2]
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    write_recordio(rec, idx, zip(payloads, labels), chunk_size=4)

    @pipeline_def(batch_size=6, num_threads=1, device_id=None, seed=0)
    def reader_pipe():
        data, label = fn.readers.mxnet(path=[str(rec)], index_path=[str(idx)], random_shuffle=False, name="r")
        return fn.decoders.image(data, device="cpu", output_type=types.RGB), label

    pipe = reader_pipe()
    pipe.build()
    assert pipe.epoch_size("r") == 6
    out_images, out_labels = pipe.run()
    np.testing.assert_array_equal(np.asarray(out_labels.as_tensor()).ravel(), labels)
    for i, im in enumerate(images):
        got = np.asarray(out_images[i])
        assert got.shape == im.shape
        if i % 2 == 0:  # PNG: lossless
            np.testing.assert_array_equal(got, im)
        else:
            assert np.abs(got.astype(int) - im).mean() < 4
    assert dali.__version__


# ------------------------------------------------------------------------------------------------
# FFCV .beton


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def test_beton_raw_and_jpg_round_trip(tmp_path):
    pytest.importorskip("ffcv", reason="FFCV is not installed (the [ffcv] extra)")
    from pipelines.formats.beton import write_beton

    rng = np.random.default_rng(4)
    noise = rng.integers(0, 256, (10, 12, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, 10)
    raw = tmp_path / "raw.beton"
    assert write_beton(raw, [(noise[i], int(labels[i])) for i in range(10)], mode="raw") == 10
    got, got_labels = read_beton(raw, 10)
    np.testing.assert_array_equal(got, noise)
    np.testing.assert_array_equal(got_labels, labels)

    smooth = _smooth_images(8, 48, 64, seed=5)
    jpg = tmp_path / "jpg.beton"
    write_beton(jpg, [(im, i) for i, im in enumerate(smooth)], mode="jpg", quality=90, num_workers=2)
    got, got_labels = read_beton(jpg, 8)
    np.testing.assert_array_equal(got_labels, np.arange(8))
    assert got.shape == smooth.shape
    assert min(_psnr(g, s) for g, s in zip(got, smooth)) > 30
    assert not list(tmp_path.glob(".*tmp*"))


def test_beton_failing_sample_raises_and_writes_nothing(tmp_path):
    pytest.importorskip("ffcv", reason="FFCV is not installed (the [ffcv] extra)")
    from pipelines.formats.beton import BetonError, write_beton

    class Broken:
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            if i == 2:
                raise OSError("disk read error")
            return np.zeros((4, 4, 3), np.uint8), i

    with pytest.raises(BetonError, match="sample 2 failed"):
        write_beton(tmp_path / "x.beton", Broken())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BetonError, match="empty"):
        write_beton(tmp_path / "y.beton", [])
    with pytest.raises(ValueError, match="beton mode"):
        write_beton(tmp_path / "z.beton", [(np.zeros((2, 2, 3), np.uint8), 0)], mode="png")


def test_write_beton_is_byte_identical_across_workers_in_every_mode(tmp_path):
    pytest.importorskip("ffcv", reason="FFCV is not installed (the [ffcv] extra)")
    from pipelines.formats.beton import write_beton

    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 256, (int(rng.integers(8, 40)), int(rng.integers(8, 40)), 3), dtype=np.uint8),
                i % 7) for i in range(60)]
    for mode in ("raw", "proportion"):
        shas = set()
        for workers in (1, 3):
            path = tmp_path / f"{mode}{workers}.beton"
            write_beton(path, samples, mode=mode, num_workers=workers, chunk_size=4)
            shas.add(sha256(path))
        assert len(shas) == 1, mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proportion1.beton", "proportion3.beton",
                                                         "raw1.beton", "raw3.beton"]


def test_one_synthetic_jpeg_generator(tmp_path):
    """The conversion benchmark's tree and the loader benchmark's cache hold the very same bytes."""
    import importlib.util
    import sys
    from pathlib import Path

    from pipelines.formats import synthetic

    root = synthetic.make_jpeg_tree(tmp_path / "tree", 3, classes=2, seed=4)
    files = sorted(root.rglob("*.jpg"))
    assert [f.relative_to(root).as_posix() for f in files] == ["c000/000000.jpg", "c000/000002.jpg",
                                                               "c001/000001.jpg"]
    assert files[1].read_bytes() == synthetic.make_jpeg(2, seed=4) != synthetic.make_jpeg(2, seed=5)
    assert _decode(files[0].read_bytes()).shape[2] == 3
    path = Path(__file__).resolve().parents[1] / "harness" / "benchdata.py"
    spec = importlib.util.spec_from_file_location("benchdata_probe", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("benchdata_probe", module)
    spec.loader.exec_module(module)
    assert module.make_jpeg is synthetic.make_jpeg and module.GENERATOR_VERSION == synthetic.GENERATOR_VERSION


def test_beton_writer_writes_what_ffcvs_dataset_writer_writes(tmp_path):
    """Our streaming writer (FFCV's own field encoders, our page layout) against FFCV's DatasetWriter with
    one worker, byte for byte, in every mode; and a raw image over one page is downscaled to fit."""
    pytest.importorskip("ffcv", reason="FFCV is not installed (the [ffcv] extra)")
    from ffcv.writer import DatasetWriter

    from pipelines.formats.beton import beton_fields, write_beton

    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 256, (int(rng.integers(8, 40)), int(rng.integers(8, 40)), 3), dtype=np.uint8),
                i % 7) for i in range(40)]

    class Seeded:  # what write_beton seeds before each encode (proportion mode's coin)
        def __len__(self) -> int:
            return len(samples)

        def __getitem__(self, i: int):
            np.random.seed([3, i])
            return samples[i]

    for mode in ("raw", "jpg", "proportion"):
        ours, theirs = tmp_path / f"ours-{mode}.beton", tmp_path / f"ffcv-{mode}.beton"
        write_beton(ours, samples, mode=mode, num_workers=2, chunk_size=3, seed=3)
        DatasetWriter(str(theirs), beton_fields(mode), num_workers=1).from_indexed_dataset(Seeded(), chunksize=100)
        assert ours.read_bytes() == theirs.read_bytes(), mode
    big = tmp_path / "big.beton"
    write_beton(big, [(np.full((1800, 2400, 3), 7, np.uint8), 1), (samples[0][0], 2)], mode="raw")
    got, _ = _read_beton_sizes(big)
    assert got[0][0] * got[0][1] * 3 <= 1 << 23 and got[1] == samples[0][0].shape[:2]


def _read_beton_sizes(path) -> tuple[list[tuple[int, int]], np.ndarray]:
    from pipelines.samples import BetonSamples

    b = BetonSamples(path)
    return list(zip(b.meta["height"].tolist(), b.meta["width"].tolist())), b.labels


def test_conversion_bench_times_ours_against_ffcvs_own_writer():
    pytest.importorskip("ffcv", reason="FFCV is not installed (the [ffcv] extra)")
    from pipelines.formats.bench import bench_convert

    rates = bench_convert(6, (1,), 1, only=("beton jpg (scan", "FFCV DatasetWriter"))
    assert sorted(rates) == ["FFCV DatasetWriter (its write_datasets.py way, no scan), workers=1",
                             "beton jpg (scan + FFCV re-encode, one decode), workers=1"]
    assert all(r > 0 for r in rates.values())
