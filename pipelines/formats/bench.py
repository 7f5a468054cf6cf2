"""Measure conversion speed and the Numba kernels against plain Python / NumPy (figures for the README).

    python -m pipelines.formats.bench                      # both parts, 200 generated JPEGs
    python -m pipelines.formats.bench --part kernels
    python -m pipelines.formats.bench --part convert --images 200 --workers 1 2
    python -m pipelines.formats.bench --part convert --workers 2 --cases "beton jpg (,rec+beton,FFCV"

``convert`` writes ``--images`` photo-like JPEGs of about 500x375 (ImageNet's typical size; the
loader benchmark's generator, :mod:`.synthetic`) into a temporary ImageFolder tree and times each
output format through :func:`~.convert.convert` (the same code ``make dataset`` runs), after one
warm-up conversion so imports and Numba compilation are not counted. Each of our rows includes the
validity scan (every image decoded once, for the scan and the encode alike). The row ``FFCV
DatasetWriter`` is the baseline: FFCV's own writer as its ``write_datasets.py`` example drives it
(torchvision's ``ImageFolder`` over the same files, ``RGBImageField(write_mode="jpg")``, quality 90),
with the same number of processes; it checks nothing and drops no bad file. ``kernels`` times each kernel
compiled, as its pure-Python body (the JIT switch off), and, where one exists, as the NumPy
expression a person would write instead. Every figure is the median of ``--repeats`` runs (the
conversion rows interleaved, repeat by repeat); results are logged and written as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import platform
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import kernels
from .recordio import IR_HEADER_SIZE, MAGIC
from .synthetic import make_jpeg_tree

__all__ = ["bench_convert", "bench_kernels"]

log = logging.getLogger("pipelines.formats.bench")


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_kernels(repeats: int = 5, seed: int = 0) -> dict[str, dict[str, float]]:
    """Items per second of each kernel: ``numba``, ``python`` (JIT off) and ``numpy``/``struct`` baselines."""
    rng = np.random.default_rng(seed)
    results: dict[str, dict[str, float]] = {}

    def rate(n: int, fn: Callable[[], Any], reps: int = repeats) -> float:
        fn()  # compile / warm caches
        return n / _median_time(fn, reps)

    for name, kernel, side, n, n_py, numpy_fn in (
        ("planar_to_hwc (CIFAR 32 px)", kernels.planar_to_hwc, 32, 10000, 20,
         lambda r: r.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)),
        ("colmajor_to_hwc (STL-10 96 px)", kernels.colmajor_to_hwc, 96, 1000, 3,
         lambda r: r.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)),
    ):
        rows = rng.integers(0, 256, (n, 3 * side * side), dtype=np.uint8)
        out = np.empty((n, side, side, 3), dtype=np.uint8)
        results[name] = {
            "numba": rate(n, lambda k=kernel, r=rows, o=out, s=side: k.jit(r, s, s, o)),
            "python": rate(n_py, lambda k=kernel, r=rows[:n_py], o=out[:n_py], s=side: k.py_func(r, s, s, o),
                           max(1, repeats // 2)),
            "numpy": rate(n, lambda f=numpy_fn, r=rows: np.ascontiguousarray(f(r))),
        }

    for name, lo, hi, n in (("record framing (ImageNet JPEG ~110 KB)", 60_000, 160_000, 256),
                            ("record framing (CIFAR PNG ~2.5 KB)", 2_000, 3_000, 10_000)):
        payloads = [rng.integers(0, 256, int(k), dtype=np.uint8).tobytes() for k in rng.integers(lo, hi, n)]
        results[name] = _bench_framing(payloads, repeats)
    w, h = rng.integers(100, 2000, 100_000), rng.integers(100, 2000, 100_000)
    results["resize_plan"] = {
        "numba": rate(w.size, lambda: kernels.resize_plan.jit(w, h, 256)),
        "python": rate(5000, lambda: kernels.resize_plan.py_func(w[:5000], h[:5000], 256), max(1, repeats // 2)),
    }
    for name, r in results.items():
        base = ", ".join(f"{k} {v:,.0f}/s ({r['numba'] / v:,.1f}x)" for k, v in r.items() if k != "numba")
        log.info("%-42s numba %12s/s | %s", name, f"{r['numba']:,.0f}", base)
    return results


def _frame_with(payloads: list[bytes], pack: Callable[..., None], offsets_fn: Callable[..., np.ndarray]) -> np.ndarray:
    """What RecordIOWriter does per chunk: join, offsets, one framed buffer."""
    n = len(payloads)
    lengths = np.array([len(p) for p in payloads], dtype=np.int64)
    poffs = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=poffs[1:])
    payload = np.frombuffer(b"".join(payloads), dtype=np.uint8)
    offsets = offsets_fn(lengths, 0)
    out = np.empty(int(offsets[-1]), dtype=np.uint8)
    pack(payload, poffs, np.zeros(n, dtype=np.uint32), np.arange(n, dtype=np.int64), offsets, out)
    return out


def _frame_with_struct(payloads: list[bytes]) -> bytes:
    """The plain-Python way: struct-packed headers and padding joined with the payloads."""
    parts = []
    for i, p in enumerate(payloads):
        size = len(p) + IR_HEADER_SIZE
        parts += [struct.pack("<IIIfQQ", MAGIC, size, 0, 0.0, i, 0), p, b"\0" * (-size % 4)]
    return b"".join(parts)


def _bench_framing(payloads: list[bytes], repeats: int) -> dict[str, float]:
    n = len(payloads)
    jit = (kernels.pack_records.jit, kernels.record_offsets.jit)
    py = (kernels.pack_records.py_func, kernels.record_offsets.py_func)
    if _frame_with(payloads, *jit).tobytes() != _frame_with_struct(payloads):
        raise AssertionError("the Numba framing and the struct framing disagree")
    return {
        "numba": n / _median_time(lambda: _frame_with(payloads, *jit), repeats),
        "python": n / _median_time(lambda: _frame_with(payloads, *py), max(1, repeats // 2)),
        "struct": n / _median_time(lambda: _frame_with_struct(payloads), repeats),
    }


def bench_convert(n: int = 200, workers: tuple[int, ...] = (1,), repeats: int = 3, only: tuple[str, ...] = (),
                  ) -> dict[str, float]:
    """Images per second of each output format, and of FFCV's own writer, on ``n`` generated ImageNet-size
    JPEGs; ``only``: keep the rows whose name contains one of these substrings."""
    from .convert import ConvertOptions, convert
    from .sources import build_source

    cases = {
        "rec (JPEG pass-through)": dict(formats=("rec",)),
        "rec --max-side 256 (resize + re-encode)": dict(formats=("rec",), max_side=256),
        "beton jpg (scan + FFCV re-encode, one decode)": dict(formats=("beton",)),
        "rec+beton jpg (make dataset's default formats)": dict(formats=("rec", "beton")),
        "beton jpg --max-side 256": dict(formats=("beton",), max_side=256),
        "beton raw": dict(formats=("beton",), beton_mode="raw"),
        "tree (copy of a flat split, hard links)": dict(formats=("folder",)),
    }
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = make_jpeg_tree(Path(tmp) / "src", n)
        source = build_source("folder", src)
        source.folder_splits.clear()  # time a real tree copy, not a symlink
        convert(source, Path(tmp) / "out", ConvertOptions(formats=("rec", "beton"), progress=False))  # warm-up
        for nw in workers:
            runs = {name: functools.partial(convert, source, Path(tmp) / "out",
                                            ConvertOptions(workers=nw, force=True, progress=False, **kw))
                    for name, kw in cases.items()}
            runs["FFCV DatasetWriter (its write_datasets.py way, no scan)"] = \
                lambda w=nw: _ffcv_dataset_writer(src, Path(tmp) / "ffcv.beton", w)
            runs = {name: run for name, run in runs.items() if not only or any(o in name for o in only)}
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(repeats):  # rows interleaved, so a shared machine's load swings hit them alike
                for name, run in runs.items():
                    times[name].append(_median_time(run, 1))
            for name, ts in times.items():
                key = f"{name}, workers={nw}"
                results[key] = n / statistics.median(ts)
                log.info("%-58s %7.1f img/s", key, results[key])
    return results


def _ffcv_dataset_writer(src: Path, out: Path, workers: int) -> None:
    """FFCV's own writer over an ImageFolder of ``src`` (the baseline row; see module doc)."""
    import contextlib
    import io

    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    writer = DatasetWriter(str(out), {"image": RGBImageField(write_mode="jpg", jpeg_quality=90),
                                      "label": IntField()}, num_workers=workers)
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        writer.from_indexed_dataset(ImageFolder(str(src)), chunksize=100)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", "kernels", "convert"], default="all")
    p.add_argument("--images", type=int, default=200, help="generated JPEGs for the conversion part")
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="worker counts to time")
    p.add_argument("--cases", default="",
                   help="comma-separated substrings: time only the conversion rows whose name contains one")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write the figures here as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pipelines.formats.convert").setLevel(logging.WARNING)
    report: dict[str, Any] = {"machine": platform.platform(), "processor": platform.processor(),
                              "python": platform.python_version(), "args": vars(args)}
    if args.part in ("all", "kernels"):
        report["kernels"] = bench_kernels(args.repeats)
    if args.part in ("all", "convert"):
        only = tuple(c.strip() for c in args.cases.split(",") if c.strip())
        report["convert_img_per_s"] = bench_convert(args.images, tuple(args.workers), args.repeats, only)
    if args.json:
        from ressl.io import atomic_write_json

        atomic_write_json(args.json, report)


if __name__ == "__main__":
    main()
