"""The front door: `make train|learn-check|train-graph ARGS=...` on a fresh OUT.

Each of these targets builds its data first with a sub-make; the user's ARGS are overrides for the
training step and must not reach the data step (which rejects them). A stub interpreter records every
command the targets run, so the variable flow is checked exactly; one real `make train` from an empty
OUT checks the same path end to end.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STUB = """#!{python}
import json, os, sys
from pathlib import Path
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args and args[0].endswith("dataset.py"):  # write what the target tests for, so the data step is done
    out = Path(args[args.index("--out") + 1])
    (out / args[1] / "train").mkdir(parents=True, exist_ok=True)
    (out / args[1] / "graph.pt").touch()
"""


def _make(target: str, tmp_path: Path, **variables: str) -> list[list[str]]:
    log = tmp_path / "calls.jsonl"
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable, log=str(log)))
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), target, f"PY={stub}", f"GPU_PY={stub}",
           *(f"{k}={v}" for k, v in variables.items())]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=120)
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("target, data_tool, data_name, tool", [
    ("train", "tools/dataset.py", "demo", "tools/train.py"),
    ("learn-check", "tools/dataset.py", "demo", "tools/learncheck.py"),
    ("train-graph", "tools/graph_dataset.py", "digits-knn", "tools/train_graph.py"),
])
def test_args_reach_the_step_the_user_called_not_the_data_step(tmp_path, target, data_tool, data_name, tool):
    out = tmp_path / "fresh"
    calls = _make(target, tmp_path, OUT=str(out), ARGS="seed=1 name=demo-s1", SRC="/nonexistent", NAME="Cora",
                  FORMATS="rec", MAX_SIDE="7")
    assert [c[0] for c in calls] == [data_tool, tool]
    data_step, step = calls
    assert data_step[1] == data_name
    for leaked in ("seed=1", "name=demo-s1", "/nonexistent", "Cora", "--max-side"):
        assert leaked not in data_step, f"{leaked!r} reached the data step: {shlex.join(data_step)}"
    if data_tool == "tools/dataset.py":  # the demo run reads the .beton: the data step writes every format
        assert data_step[data_step.index("--formats") + 1] == "beton,rec"
    assert data_step[data_step.index("--out") + 1] == str(out)
    # the step reads the data it just wrote, and the user's overrides come last (they win)
    assert step[-3:] == [f"data={out}/{data_name}", "seed=1", "name=demo-s1"]


def test_data_step_skipped_when_present_and_default_out_adds_no_override(tmp_path):
    calls = _make("train", tmp_path, ARGS="seed=2")  # OUT=data (the default), the config's own data path
    tools = [c[0] for c in calls]
    assert tools[-1] == "tools/train.py"
    assert calls[-1][-1] == "seed=2" and not any(a.startswith("data=") for a in calls[-1])


def test_make_help_names_the_variables_of_each_target():
    out = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "help"], check=True,
                         capture_output=True, text=True).stdout
    assert 'make train ARGS="seed=1"' in out
    assert "reads CONFIG OUT ARGS" in out and "reads DATA OUT SRC FORMATS WORKERS" in out


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="needs `make setup` (.venv/)")
def test_real_make_train_with_args_from_an_empty_out(tmp_path):
    out, runs = tmp_path / "data", tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(OMP_NUM_THREADS="1")
    args = f"seed=1 name=demo-s1 out_dir={runs} max_steps=2 knn_before=false knn_every=0 num_workers=1"
    done = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "train", f"OUT={out}", f"ARGS={args}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (out / "demo" / "train.beton").is_file()
    summary = json.loads((runs / "demo-s1" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["config"]["seed"] == 1
    assert summary["config"]["data"] == f"{out}/demo"
