"""tools/gpu_wheels.py: the carried FFCV wheel is self-contained and the slimmed wheels still install.

The wheel tests need what ``make gpu-wheels`` builds (and, for the loader, ``make gpu-wheels ARGS=--check``,
which installs the GPU image's packages for CPython 3.12 into build/gpu-wheels/device-site); without them
they skip, saying which command makes them. The slimming test runs everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ressl.config import ConfigError
from tools import gpu_wheels

ROOT = Path(__file__).resolve().parents[1]

WORK = ROOT / "build" / "gpu-wheels"


def _ffcv_wheel() -> Path:
    found = sorted((WORK / "wheels").glob("ffcv-*-cp312-*.whl"))
    if not found:
        pytest.skip(f"no FFCV wheel in {WORK / 'wheels'}: `make gpu-wheels` builds it")
    return found[-1]


def _python312() -> str:
    try:
        return gpu_wheels.find_python312()
    except ConfigError as e:
        pytest.skip(str(e))


def test_slim_wheel_keeps_one_abi_compresses_with_lzma_and_installs(tmp_path):
    src = tmp_path / "src" / "demo-1.0-py3-none-any.whl"
    src.parent.mkdir()
    files = {"demo/__init__.py": b"X = 1\n", "demo/_impl.cpython-312-x86_64-linux-gnu.so": b"\x00" * 64,
             "demo/_impl.cpython-311-x86_64-linux-gnu.so": b"\x01" * 64,
             "demo/_impl.cpython-313t-x86_64-linux-gnu.so": b"\x02" * 64,
             "demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
             "demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(src, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("demo-1.0.dist-info/RECORD", "".join(f"{n},,\n" for n in files) + "demo-1.0.dist-info/RECORD,,\n")
    (tmp_path / "out").mkdir()
    slim = gpu_wheels.slim_wheel(src, tmp_path / "out")
    with zipfile.ZipFile(slim) as z:
        names = set(z.namelist())
        record = z.read("demo-1.0.dist-info/RECORD").decode().split()
        methods = {i.filename: i.compress_type for i in z.infolist()}
    assert "demo/_impl.cpython-312-x86_64-linux-gnu.so" in names and "demo/__init__.py" in names
    assert not any("cpython-311" in n or "cpython-313t" in n for n in names)
    assert {r.split(",")[0] for r in record} == names
    assert all(r.split(",")[1].startswith("sha256=") for r in record if not r.endswith("RECORD,,"))
    assert methods["demo/_impl.cpython-312-x86_64-linux-gnu.so"] == zipfile.ZIP_LZMA
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                          str(site), str(slim)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (site / "demo" / "_impl.cpython-312-x86_64-linux-gnu.so").read_bytes() == b"\x00" * 64


def test_ffcv_wheel_loads_every_library_from_inside_itself(tmp_path):
    wheel = _ffcv_wheel()
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path)
    libs = {p.name.split("-")[0] for p in (tmp_path / "ffcv.libs").iterdir()}
    assert {"libturbojpeg", "libopencv_core", "libopencv_imgproc"} <= libs
    ext = next((tmp_path / "ffcv").glob("_libffcv*.so"))
    out = subprocess.run(["ldd", str(ext)], capture_output=True, text=True, check=True).stdout
    assert "not found" not in out, out
    for line in out.splitlines():  # every library besides glibc / libstdc++ / libgcc_s comes from the wheel
        name = line.split()[0]
        if "=>" in line and name not in gpu_wheels.BASE_LIBS:
            assert str(tmp_path) in line.split("=>")[1], line
    assert gpu_wheels.external_libs(tmp_path) == {}


LOADER = r"""
import sys
from types import SimpleNamespace
import numpy as np
import torch
import ffcv
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter
from pipelines import build_loader

class Images:
    def __len__(self):
        return 8
    def __getitem__(self, i):
        return np.full((24, 32, 3), 20 * i, np.uint8), i

DatasetWriter("train.beton", {"image": RGBImageField(write_mode="jpg"), "label": IntField()},
              num_workers=1).from_indexed_dataset(Images())
cfg = SimpleNamespace(data=".", recipe="cifar32", batch_size=4, num_workers=1, seed=0, channels_last=False)
batch = next(iter(build_loader(cfg, "ffcv")))
maps = open("/proc/self/maps").read()
libs = sorted({l.split()[-1] for l in maps.splitlines()
               if l.split()[-1].rsplit("/", 1)[-1].startswith(("libturbojpeg", "libopencv_"))})
print("FFCV", ffcv.__file__, tuple(batch.weak.shape), batch.label.tolist(), *libs, sep="\n")
"""


def test_ffcv_loader_runs_from_the_wheel_in_a_fresh_312_venv(tmp_path):
    wheel = _ffcv_wheel()
    py = _python312()
    site = WORK / "device-site"
    if not (site / "torch").is_dir():
        pytest.skip(f"{site} lacks the GPU image's packages for 3.12: `make gpu-wheels ARGS=--check` installs them")
    venv = tmp_path / "venv"
    subprocess.run([py, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    str(wheel)], check=True, timeout=120)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{site}:{ROOT}", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    out = subprocess.run([str(venv / "bin" / "python"), "-c", LOADER], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout[out.stdout.index("FFCV\n"):].splitlines()
    assert lines[1].startswith(str(venv)) and lines[2] == "(4, 3, 32, 32)", lines
    labels = eval(lines[3])  # a list of ints printed by the child
    assert len(set(labels)) == 4 and set(labels) <= set(range(8)), labels
    loaded = lines[4:]
    assert any("turbojpeg" in p for p in loaded) and any("opencv_imgproc" in p for p in loaded), loaded
    assert all(p.startswith(str(venv)) and "/ffcv.libs/" in p for p in loaded), loaded


DEVICE_INSTALL = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from harness import gpuhost as _gpuhost
res = _gpuhost.install_wheelhouse(Path(sys.argv[1]), Path(sys.argv[2]), 600)
import ffcv, nvidia.dali as dali
from nvidia.dali import fn, pipeline_def
import numpy as np

@pipeline_def(batch_size=2, num_threads=1, device_id=None)
def pipe():
    return fn.external_source(source=lambda: [np.full((4, 4, 3), 7, np.uint8)] * 2, batch=True) * 2

p = pipe()
p.build()
out = p.run()[0]
print("RESULT", json.dumps({**res, "dali": dali.__version__, "ffcv": ffcv.__file__, "dali_file": dali.__file__,
                           "value": int(np.asarray(out[0])[0, 0, 0])}))
"""


def test_carried_parts_install_on_312_as_on_the_device_and_dali_runs(tmp_path):
    """gpucheck's wheels step with the real parts, on CPython 3.12 over the image's stand-in packages:
    the LZMA-slimmed DALI installs with pip and runs a CPU pipeline, FFCV imports from the same site."""
    py = _python312()
    site = WORK / "device-site"
    if not sorted((ROOT / ".device" / "parts").glob("whl.part*")):
        pytest.skip("no .device/parts: `make gpu-wheels` packs them")
    if not (site / "torch").is_dir():
        pytest.skip(f"{site} lacks the GPU image's packages for 3.12: `make gpu-wheels ARGS=--check` installs them")
    venv = tmp_path / "venv"
    subprocess.run([py, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(venv / "bin" / "python"), "-c", DEVICE_INSTALL, str(ROOT), str(tmp_path / "site")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert res["status"] == "ok" and any(n.startswith("nvidia_dali_cuda130") for n in res["installed"]), res
    assert not any(n.startswith("numpy") for n in res["installed"])  # the image's own numpy stays
    assert res["dali"] == "2.4.0" and res["value"] == 14
    assert res["ffcv"].startswith(str(tmp_path / "site")) and res["dali_file"].startswith(str(tmp_path / "site"))
