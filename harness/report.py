"""The bench report as text (the tables, the bottleneck and projection lines) and as a JSON file."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ressl.io import atomic_write_bytes

__all__ = ["format_table", "write_report"]


def _fmt_rate(r: dict[str, Any], key: str = "images_per_s") -> str:
    v = r.get(key)
    if v is None:
        return "-"
    if key == "images_per_s":
        return f"{v:,.1f} ± {r['images_per_s_std']:,.1f}"
    return f"{v:,.1f}"


def format_table(report: dict[str, Any]) -> str:
    """The report as fixed-width text: a machine line, the main table, then the sweep (if any)."""
    m = report["machine"]
    gpu = m["gpu"]["name"] if m.get("gpu") else "no GPU"
    commit = (m["git"]["commit"] or "?")[:10] + (" (dirty)" if m["git"]["dirty"] else "")
    lines = [f"{m['cpu']} ({m['cores_available']}/{m['cores']} cores), {gpu}; torch {m['versions']['torch']}, "
             f"commit {commit}; {report['date']}"]
    header = ("backend", "mode", "model", "batch", "size", "wk", "images/s", "pairs/s", "eff.", "cores", "note")
    table = []
    for r in report["results"]:
        if r.get("sweep"):
            continue
        eff = r.get("loader_efficiency")
        note = r.get("error", "")
        if not note and r.get("data_wait_frac") is not None:
            note = f"data wait {100 * r['data_wait_frac']:.0f}%"
        table.append((r["backend"], r["mode"], r["model"], str(r["batch"]), str(r.get("size", "")),
                      "" if r.get("num_workers") is None else str(r["num_workers"]), _fmt_rate(r),
                      _fmt_rate(r, "pairs_per_s"), "" if eff is None else f"{100 * eff:.0f}%",
                      "" if r.get("cpu_cores_busy") is None else f"{r['cpu_cores_busy']:.1f}", note))
    lines += _columns(header, table)
    sweep = [r for r in report["results"] if r.get("sweep")]
    if sweep:
        lines += ["", "sweep (images/s):"]
        lines += _columns(("backend", "mode", "batch", "workers", "images/s", "note"),
                          [(r["backend"], r["mode"], str(r["batch"]),
                            "" if r.get("num_workers") is None else str(r["num_workers"]), _fmt_rate(r),
                            r.get("error", "")) for r in sweep])
    lines += _stage_lines(report)
    return "\n".join(lines)


def _num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.{digits}g}"


def _stage_lines(report: dict[str, Any]) -> list[str]:
    """The stage table (per backend: each stage, the sum, the loader as measured), then one bottleneck
    line per backend and, with --project-cores, one projection line per backend."""
    stages, verdicts = report.get("stages") or [], report.get("bottlenecks") or []
    if not stages:
        return []
    device = report["args"].get("device", "cpu")
    lines = ["", f"stages (pairs/s as run on `thr` threads; core-s = CPU seconds of every thread and process per "
             f"1,000 pairs; side: host = CPU on any machine, device = {device} here):"]
    table = []
    for v in verdicts:
        b = v["backend"]
        mine = [r for r in stages if r["backend"] == b]
        for r in mine:
            if r.get("error"):
                table.append((b, str(r["size"]), "-", "", "", "", "", r["error"]))
                continue
            std = f" ± {_num(r['pairs_per_s_std'])}" if r.get("pairs_per_s_std") else ""
            note = r.get("note", "") + (f" [fused: {r['fused']}]" if r.get("fused") else "")
            table.append((b, str(r["size"]), r["stage"], r["side"],
                          "-" if r["pairs_per_s"] is None else _num(r["pairs_per_s"]) + std,
                          _num(r["core_s_per_1k_pairs"]), "" if r.get("threads") is None else str(r["threads"]),
                          note))
        measured = [r for r in mine if not r.get("error") and r["stage"] not in ("model", None)]
        if measured:
            table.append((b, str(v["size"]), "= sum", "", "", _num(sum(r["core_s_per_1k_pairs"] for r in measured)),
                          "", "the stages above, without the model"))
        got = v.get("loader_measured")
        if got:
            table.append((b, str(v["size"]), "= loader", "", _num(got["pairs_per_s"]),
                          _num(got["core_s_per_1k_pairs"]), "", "the loader row, all stages as the backend runs them"))
    lines += _columns(("backend", "size", "stage", "side", "pairs/s", "core-s/1k", "thr", "note"), table)
    for v in verdicts:
        lines.append(f"bottleneck {v['backend']} @{v['size']} px: {v['line']}")
    for v in verdicts:
        if v.get("projection"):
            lines.append(f"projection {v['backend']} @{v['size']} px: {v['projection']['line']}")
    return lines


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip(),
            *(fmt.format(*r).rstrip() for r in rows)]



def write_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``report`` as indented JSON, atomically (temp file, fsync, rename); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(report, indent=2, default=str) + "\n").encode())
    return out
