"""Machine facts next to every benchmark figure: CPU, cores, GPU, library versions and the git commit."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import psutil
import torch

from pipelines.formats.options import all_cores as cores  # the cores this process may run on

__all__ = ["cores", "machine_info"]

_ROOT = Path(__file__).resolve().parent.parent


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _dali_version() -> str | None:
    """DALI's distribution name carries the CUDA flavour (nvidia-dali-cuda130, ...)."""
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            return f"{name}=={dist.version}"
    return None


def _git(*cmd: str) -> str | None:
    try:
        out = subprocess.run(["git", *cmd], cwd=_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Machine, device, library versions and git commit: what a figure needs to be compared."""
    gpu = None
    if torch.cuda.is_available():
        index = device.index if device is not None and device.type == "cuda" and device.index is not None else 0
        props = torch.cuda.get_device_properties(index)
        gpu = {"name": props.name, "count": torch.cuda.device_count(), "memory_bytes": props.total_memory,
               "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version()}
    status = _git("status", "--porcelain", "--untracked-files=no")
    commit = _git("rev-parse", "HEAD")
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "cores_available": cores(),
        "memory_bytes": psutil.virtual_memory().total,
        "gpu": gpu,
        "platform": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": _version("torchvision"),
            "numpy": _version("numpy"),
            "pillow": _version("pillow"),
            "accelerate": _version("accelerate"),
            "numba": _version("numba"),
            "dali": _dali_version(),
            "ffcv": _version("ffcv"),
            "ressl": _version("ressl"),
            "ressl_commit": None if commit is None else commit + ("+dirty" if status else ""),
        },
        "git": {"commit": commit, "dirty": None if status is None else bool(status),
                "branch": _git("rev-parse", "--abbrev-ref", "HEAD")},
    }

