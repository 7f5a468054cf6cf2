"""What the GPU check asks of the machine before it measures: carried wheels, a C compiler, /dev/shm.

A lent GPU machine starts bare and offline, often in a container: packages arrive as carried wheel parts,
Triton (torch.compile's GPU backend) builds its kernel launcher with the system C compiler, and
DataLoader workers hand batches over in ``/dev/shm``, which containers often cap at 64 MiB.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # every command runs from the project root

__all__ = ["LAUNCH", "Outcome", "c_compiler", "find_module", "install_wheelhouse", "loader_workers", "nvidia_smi",
           "run_command"]

# DataLoader's own prefetch per persistent worker (pipelines/torchvision.py)
PREFETCH = 4
# Runs a script with torch's 'file_system' sharing strategy: forked DataLoader workers inherit it, and it
# needs no file descriptor per shared tensor (the default strategy runs out of them under a low ulimit -n).
LAUNCH = ("import runpy, sys, torch.multiprocessing as mp; mp.set_sharing_strategy('file_system'); "
          "sys.argv = sys.argv[1:]; sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0]); "
          "runpy.run_path(sys.argv[0], run_name='__main__')")


def find_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing ("nvidia" for nvidia.dali)
        return False


def nvidia_smi() -> dict[str, str] | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    name, memory, driver = (x.strip() for x in out.stdout.strip().splitlines()[0].split(",")[:3])
    return {"name": name, "memory": memory, "driver": driver}


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def install_wheelhouse(root: Path, site: Path, timeout: float, install: bool = True) -> dict[str, Any]:
    """Reassemble ``root/.device/parts/whl.part*`` (make-wheelhouse.sh) and pip-install it offline into ``site``.

    Distributions this Python already has are left out (the image's own torch, numpy...). ``site`` is put
    first on ``sys.path`` and on ``PYTHONPATH`` (this process and every command it starts). With
    ``install=False`` (the CPU plan: the wheels are for the GPU machine's CPython 3.12) the parts are
    only reassembled and listed.
    """
    parts = sorted((root / ".device" / "parts").glob("whl.part*"))
    if not parts:
        return {"status": "skipped", "reason": "no carried wheel parts in .device/parts/ (make gpu-wheels here, "
                                               "then carry each file of .device/CARRY, one per device call)"}
    unpack = Path(tempfile.mkdtemp(prefix="wheelhouse-"))
    try:
        cat = subprocess.Popen(["cat", *map(str, parts)], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=cat.stdout, mode="r|") as t:
            t.extractall(unpack, filter="data")
        cat.wait()
    except (tarfile.TarError, EOFError) as e:
        names = ", ".join(p.name for p in parts)
        return {"status": "failed", "reason": f"the carried parts ({names}) are not a whole wheelhouse ({e}): "
                                              "a part of .device/CARRY not carried yet?"}
    wheels = sorted(unpack.rglob("*.whl"))
    broken = [w.name for w in wheels if not zipfile.is_zipfile(w)]
    if broken or not wheels:
        shutil.rmtree(unpack, ignore_errors=True)
        return {"status": "failed", "reason": f"the carried parts are not a whole wheelhouse (no wheels, or cut: "
                                              f"{', '.join(broken)}): a part of .device/CARRY not carried yet?"}
    todo = [w for w in wheels if not _installed(w.name.split("-")[0])]
    if not install:
        shutil.rmtree(unpack, ignore_errors=True)
        size = sum(p.stat().st_size for p in parts)
        return {"status": "ok", "summary": f"{len(parts)} part(s), {size / 2**20:.0f} MiB, whole: "
                + ", ".join(re.sub(r"-(py|cp)\d.*$", "", w.name) for w in wheels) + " (not installed: CPU plan)"}
    if todo:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, todo)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout))
        if out.returncode != 0:
            shutil.rmtree(unpack, ignore_errors=True)
            return {"status": "failed", "reason": "pip install of the carried wheels failed: "
                                                  + " ".join(out.stderr.split()[-40:])}
    shutil.rmtree(unpack, ignore_errors=True)
    if site.is_dir():
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
        importlib.invalidate_caches()
    names = [re.sub(r"-(py|cp)\d.*$", "", w.name) for w in todo]
    return {"status": "ok", "site": str(site), "installed": names,
            "summary": f"{len(parts)} part(s), {len(wheels)} wheel(s); installed into {site}: "
                       + (", ".join(names) or "none (all present)")}


def c_compiler() -> dict[str, Any]:
    """The C compiler Triton would take ($CC, cc, gcc, clang), checked by compiling a two-line program."""
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        exe = shutil.which(cand) if cand else None
        if not exe:
            continue
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "t.c"
            src.write_text("int main(void) { return 0; }\n")
            try:
                ok = subprocess.run([exe, str(src), "-o", str(Path(d) / "t")], capture_output=True,
                                    timeout=60).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        if ok:
            version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
            return {"cc": exe, "version": version}
    return {"cc": None, "reason": "no working C compiler ($CC, cc, gcc, clang): Triton builds its kernel "
                                  "launcher with one, so torch.compile on CUDA cannot run"}


def loader_workers(workers: int, batch: int, size: int, views: int, shm: str = "/dev/shm") -> dict[str, Any]:
    """DataLoader workers that fit ``shm``, and the tensor sharing strategy to use.

    Each persistent worker keeps ``PREFETCH`` batches in shared memory; a batch of float32 views is
    ``batch * views * 3 * size**2 * 4`` bytes. Half of the free space is the cap; 0 workers (loading in
    the main process) when not even one worker fits. 'file_system' sharing when ``ulimit -n`` is low.
    """
    per_worker = PREFETCH * batch * views * 3 * size * size * 4
    try:
        st = os.statvfs(shm)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = 0
    fit = int(free * 0.5 // per_worker) if per_worker else workers
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out: dict[str, Any] = {"workers": min(workers, fit), "asked": workers, "shm_free_bytes": free,
                           "bytes_per_worker": per_worker, "sharing": "file_system" if 0 <= soft < 4096 else None}
    if fit < workers:
        out["reason"] = (f"{shm} has {free / 2**30:.2f} GiB free; {workers} workers x {PREFETCH} batches need "
                         f"{workers * per_worker / 2**30:.1f} GiB: {out['workers']} worker(s)")
    if out["sharing"]:
        out["reason"] = (out.get("reason", "") + f"; ulimit -n {soft}: file_system sharing").lstrip("; ")
    return out


@dataclass
class Outcome:
    """What one command did: ``status`` is ok, failed or timeout; the log holds its stdout + stderr."""

    status: str
    seconds: float
    returncode: int | None
    log: Path
    tail: str = ""


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_command(cmd: Sequence[str], *, timeout: float, log: Path, env: dict[str, str] | None = None) -> Outcome:
    """Run ``cmd`` from the project root in its own process group; kill the whole group at ``timeout``.

    The group matters: a bench or training run starts loader worker processes that would otherwise
    outlive a killed parent and take the next step's CPU.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, "timeout"
    seconds = time.perf_counter() - t0
    return Outcome(status, seconds, rc, log, _tail(log.read_text(errors="replace")))
