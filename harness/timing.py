"""Timed windows of the bench rows: warm-up, device-synchronised windows, CPU time, PCIe traffic, traces.

Measured as airbench and DALI's ``--prof`` do: untimed warm-up steps, then ``repeats`` windows of
``steps`` calls with the device synchronised at both ends; mean +- spread over windows.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.profile import cpu_seconds, sync
from ressl.io import atomic_write_bytes

__all__ = ["Timing", "measure", "summarize", "trace"]

log = logging.getLogger("bench")


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    if not values:
        raise ValueError("summarize needs at least one value")
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}



class PcieSampler:
    """Mean host-to-device PCIe bytes/s from NVML while the ``with`` block runs (CUDA + pynvml only).

    NVML's RX counter is what the GPU receives; it is sampled every 50 ms in a thread.
    """

    def __init__(self, device: torch.device):
        self.value: float | None = None
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception as e:  # pynvml missing or NVML unusable: the figure is left out
            log.debug("no NVML PCIe counters (%s); h2d_bytes_per_s left out", e)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            kb = self._nvml.nvmlDeviceGetPcieThroughput(self._handle, self._nvml.NVML_PCIE_UTIL_RX_BYTES)
            self._samples.append(kb * 1024.0)

    def __enter__(self) -> PcieSampler:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._stop.set()
            self._thread.join()
            self.value = statistics.fmean(self._samples) if self._samples else None


@dataclass
class Timing:
    seconds: list[float]  # per window
    samples: list[int]  # per window
    steps: int
    cpu_seconds: float
    wall_seconds: float
    wait_seconds: float
    h2d_bytes_per_s: float | None


def measure(step: Callable[[], int], *, warmup: int, steps: int, repeats: int, device: torch.device,
             waited: Callable[[], float] = lambda: 0.0) -> Timing:
    """Run ``step`` (which returns the samples it processed) ``warmup`` times, then time ``repeats``
    windows of ``steps`` calls, synchronising the device at both ends of each window."""
    for _ in range(warmup):
        step()
    sync(device)
    seconds, samples = [], []
    wait0, cpu0, wall0 = waited(), cpu_seconds(), time.perf_counter()
    with PcieSampler(device) as pcie:
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            n = sum(step() for _ in range(steps))
            sync(device)
            seconds.append(time.perf_counter() - t0)
            samples.append(n)
    return Timing(seconds, samples, steps, cpu_seconds() - cpu0, time.perf_counter() - wall0, waited() - wait0,
                   pcie.value)


def trace(step: Callable[[], int], *, steps: int, device: torch.device, path: Path) -> None:
    """One warm step then ``steps`` profiled ones; chrome trace to ``path``, op table to ``path``.txt."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    path.parent.mkdir(parents=True, exist_ok=True)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"

    def save(prof: torch.profiler.profile) -> None:  # called once the active steps are recorded
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            prof.export_chrome_trace(str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        atomic_write_bytes(path.with_name(path.name + ".txt"), table.encode())

    schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=save) as prof:
        for _ in range(steps + 1):
            step()
            sync(device)  # the last active step's kernels belong inside the trace
            prof.step()
    if not path.is_file():
        raise RuntimeError(f"the profiler recorded no trace for {path.name}")

