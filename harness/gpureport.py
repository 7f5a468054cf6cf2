"""The GPU check's report: pytest's JUnit rows, the training run's loss, the Markdown tables, the atomic
write of both files.

Throughput has one unit in every table, **images/s**: stored images (dataset samples) per second, each
turned into one weak + n strong views (the bench's ``images_per_s``; training's logged rate counts
views and is divided by 1 + n here).
"""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from ressl.io import atomic_write_bytes

from .gpuplan import Plan

__all__ = ["SCHEMA_VERSION", "UNIT", "UNIT_NOTE", "earlier_report", "format_markdown", "junit_rows", "loss_falling",
           "loss_trend", "write_report"]

SCHEMA_VERSION = 2  # of gpucheck.json; --append keeps an earlier report only of the same version

UNIT = "images/s"
UNIT_NOTE = ("images/s = stored images (samples) per second; each gives one weak + n strong views "
             "(n = 1 in the bench and training recipes here), so views/s = (1 + n) x images/s")


def junit_rows(path: Path) -> list[dict[str, str]]:
    """One row per test case of a JUnit XML file: passed / skipped / failed / error / not collected."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                if child.get("message") == "collection failure":  # a module this machine cannot import
                    outcome = "not collected"
                first = (child.get("message") or "").strip().splitlines()[0:1]
                message = first[0][:200] if first else ""
                break
        name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        rows.append({"test": name, "outcome": outcome, "message": message})
    return rows


def loss_falling(csv_path: Path, after_step: int) -> bool:
    """Whether the logged loss falls once the queue has been refilled: the mean of the last few logged
    values below that of the first few logged after ``after_step``.

    The first queue_size / batch steps replace the queue's random initial keys with real ones, and the
    relation loss's targets change meaning with them (it rises there); the check starts after that.
    """
    with open(csv_path, newline="") as f:
        pts = [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss") and int(r["step"]) > after_step]
    k = min(3, len(pts) // 2)
    return k > 0 and sum(pts[-k:]) / k < sum(pts[:k]) / k


def loss_trend(csv_path: Path) -> dict[str, tuple[float, float]]:
    """First and last logged value of each loss column of a run's metrics.csv (the total and its terms)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for k in ("loss", "loss_rel", "loss_nce", "loss_sim"):
        vals = [float(r[k]) for r in rows if r.get(k)]
        if vals and any(vals):
            out[k] = (vals[0], vals[-1])
    return out


def train_line(info: dict[str, Any]) -> str:
    """The training step's one-line result: steps, precision, backend, loss and trend, images/s, checks."""
    losses, n = info["losses"], info["config"]["max_steps"]
    line = (f"{n} steps, precision {info['precision']}, {info['backend']}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
            if losses else f"{n} steps, no loss logged")
    line += "".join(f" ({k} {a:.3f} -> {b:.3f})" for k, (a, b) in info["trend"].items() if k != "loss")
    line += f", {info['images_per_s']:,.0f} {UNIT}" if info["images_per_s"] else ""
    return line + "; " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in info["checks"].items())


def earlier_report(out: Path, plan: Plan, selected: list[str]) -> dict[str, Any] | None:
    """The report of an earlier call in ``out`` (same plan), without the steps this call runs again."""
    try:
        old = json.loads((out / "gpucheck.json").read_text())
    except (OSError, ValueError):
        return None
    if old.get("kind") != "gpucheck" or old.get("plan") != plan.name or old.get("schema") != SCHEMA_VERSION:
        return None
    old["steps"] = [s for s in old["steps"] if s["step"] not in selected]
    old["results"] = [r for r in old.get("results", []) if r.get("step") not in selected]
    for name, key in (("tests", "tests"), ("train", "train")):
        if name in selected:
            old.pop(key, None)
    return old


def _num(v: float | None, fmt: str = ",.0f") -> str:
    return "-" if v is None else format(v, fmt)


def _cell(text: Any) -> str:
    return str(text or "").replace("|", "/").replace("\n", " ")


def _row_note(r: dict[str, Any]) -> str:
    note = r.get("skipped") or r.get("error") or ""
    if not note and r.get("h2d_bytes_per_s") is not None:
        note = f"H2D {r['h2d_bytes_per_s'] / 1e9:.2f} GB/s"
    elif not note and r.get("device") == "cuda" and r["mode"] != "model":
        note = "H2D: no NVML (pynvml not importable)"
    return note


def format_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a heading with machine and date, the steps, the throughput rows, tests, training."""
    m = report.get("machine") or {}
    gpu = (m.get("gpu") or {}).get("name") or "no GPU"
    torch_v = (m.get("versions") or {}).get("torch", "?")
    commit = ((m.get("git") or {}).get("commit") or "?")[:10]
    lines = [f"gpucheck ({report['plan']} plan): {gpu}, torch {torch_v}, commit {commit}, {report['date'][:10]}, "
             f"{report.get('wall_s', 0):.0f} s of a {report['budget_s']:.0f} s budget", "",
             "| step | status | s | result |", "|---|---|---|---|"]
    for s in report["steps"]:
        lines.append(f"| {s['title']} | {s['status']} | {s.get('seconds', 0):.0f} "
                     f"| {_cell(s.get('summary') or s.get('reason'))} |")
    rows = report.get("results") or []
    if rows:
        lines += ["", f"| step | backend | mode | model | batch | size | precision | compile | workers | {UNIT} "
                      "| loader eff. | peak GPU mem | note |", "|" + "---|" * 13]
        for r in rows:
            eff, mem, ips = r.get("loader_efficiency"), r.get("peak_mem_bytes"), r.get("images_per_s")
            workers = "-" if r.get("num_workers") is None else r["num_workers"]
            rate = "-" if ips is None else f"{ips:,.0f} ± {r.get('images_per_s_std') or 0:,.0f}"
            lines.append(f"| {r['step']} | {r['backend']} | {r['mode']} | {r.get('model', '')} | {r.get('batch', '')} "
                         f"| {r.get('size', '')} | {r.get('precision', '')} | {'yes' if r.get('compile') else 'no'} "
                         f"| {workers} | {rate} | {'-' if eff is None else f'{100 * eff:.0f}%'} "
                         f"| {'-' if mem is None else f'{mem / 2**30:.1f} GiB'} | {_cell(_row_note(r))} |")
        lines += ["", UNIT_NOTE + "."]
    limits = [(label, b) for label, run in (report.get("bench") or {}).items() for b in run.get("bottlenecks") or []]
    if limits:  # the loader runs' stage profiles: which stage bounds each backend on this machine
        lines += ["", "| bench run | backend | bound by | stage | ceiling pairs/s | note |", "|---" * 6 + "|"]
        lines += [f"| {label} | {b['backend']} | {b.get('limit', '')} | {b.get('stage', '')} "
                  f"| {_num(b.get('pairs_per_s'))} | {_cell(b.get('line', ''))} |" for label, b in limits]
    tests = report.get("tests") or []
    if tests:
        lines += ["", "| CUDA test | outcome | note |", "|---|---|---|"]
        lines += [f"| {t['test']} | {t['outcome']} | {_cell(t['message'])} |" for t in tests]
    tr = report.get("train") or {}
    if tr.get("losses"):
        cfg = tr["config"]
        lines += ["", f"Training run: {cfg['backbone']} {cfg['recipe']} batch {cfg['batch_size']} "
                      f"{tr.get('precision')}, {tr.get('steps')} steps in {tr.get('seconds')} s "
                      f"({_num(tr.get('images_per_s'))} {UNIT}), loss " + " ".join(f"{x:.3f}" for x in tr["losses"])
                      + f"; resumed to {tr['resume_to']}: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                                                        for k, v in tr.get("checks", {}).items())]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> None:
    """gpucheck.json and gpucheck.md, each written atomically (temp file, fsync, rename)."""
    atomic_write_bytes(out / "gpucheck.json", (json.dumps(report, indent=2, default=str) + "\n").encode())
    atomic_write_bytes(out / "gpucheck.md", format_markdown(report).encode())
