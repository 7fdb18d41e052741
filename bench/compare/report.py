"""Results: per-row, per-system samples; the terminal table and the JSON file.

A cell is ``ok`` (samples, median with min and max), ``failed`` (the reason,
and whatever samples were taken before the failure) or ``skipped`` (the
reason). Ratios are colofs over the other system's median, in the row's own
unit, so for ms and MiB rows lower is better; ``better`` in the JSON says which.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from typing import Any

from bench.compare.proc import first_line
from bench.compare.workloads import FLOOR_BOUND, LABELS, SYSTEMS, Row

SCHEMA = "colofs-bench-compare/2"


@dataclass
class Cell:
    samples: list[float] = field(default_factory=list)
    iops: list[float] = field(default_factory=list)
    status: str = "ok"
    reason: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def add(self, value: float, iops: float | None = None, **detail: Any) -> None:
        self.samples.append(value)
        if iops is not None:
            self.iops.append(iops)
        for k, v in detail.items():
            self.detail.setdefault(k, []).append(v)

    def fail(self, reason: str) -> None:
        if self.status != "failed":  # the first failure is the cause; later ones follow from it
            self.status, self.reason = "failed", reason

    def skip(self, reason: str) -> None:
        self.status, self.reason = "skipped", reason

    @property
    def usable(self) -> bool:
        return self.status == "ok" and bool(self.samples)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.usable else None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.reason:
            out["reason"] = self.reason
        if self.samples:
            out.update(median=statistics.median(self.samples), min=min(self.samples), max=max(self.samples),
                       samples=self.samples)
        if self.iops:
            out.update(iops_median=statistics.median(self.iops), iops_min=min(self.iops),
                       iops_max=max(self.iops))
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass
class RowResult:
    row: Row
    cells: dict[str, Cell]

    def ratio(self, other: str, mine: str = "colofs") -> float | None:
        """How many times better ``mine`` is than ``other``: above 1.0 ``mine`` wins, whichever way the unit points.

        Throughput rows divide ``mine`` by the other system; time and memory
        rows divide the other system by ``mine``.
        """
        a, b = self.cells.get(mine), self.cells.get(other)
        if a is None or b is None or a.median is None or b.median is None or min(a.median, b.median) <= 0:
            return None
        return a.median / b.median if self.row.higher_is_better else b.median / a.median

    @property
    def floor_bound(self) -> bool | None:
        """Whether colofs over FUSE is held down by pyfuse3's loop here; None where the row has no floor cell.

        Bound: colofs is as good as the floor, within a factor ``FLOOR_BOUND``
        either way, and the floor itself stays below QEMU, so a Python handler
        on pyfuse3's loop cannot reach QEMU. Well above the floor (colofs's
        own threads for large requests) is not bound.
        """
        vs_floor, floor_vs_qemu = self.ratio("floor"), self.ratio("qemu", "floor")
        if vs_floor is None or not self.row.higher_is_better:  # memory: the floor is a reference, no bound
            return None
        near = FLOOR_BOUND <= vs_floor <= 1 / FLOOR_BOUND
        return near and floor_vs_qemu is not None and floor_vs_qemu < 1.0

    def as_json(self) -> dict[str, Any]:
        r = self.row
        return {
            "id": r.id, "group": r.group, "title": r.title, "unit": r.unit,
            "better": "higher" if r.higher_is_better else "lower",
            "systems": {name: cell.as_json() for name, cell in self.cells.items()},
            "ratios": {"vs_qemu": _round(self.ratio("qemu")), "vs_raw": _round(self.ratio("raw")),
                       "nbd_vs_qemu": _round(self.ratio("qemu", "nbd")), "vs_floor": _round(self.ratio("floor")),
                       "floor_vs_qemu": _round(self.ratio("qemu", "floor"))},
            "floor_bound": self.floor_bound,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _fmt_value(v: float, unit: str) -> str:
    if unit == "ms":
        return f"{v:.1f}" if v < 100 else f"{v:.0f}"
    if unit == "MiB":
        return f"{v:.1f}"
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def fmt_cell(cell: Cell | None, row: Row) -> str:
    if cell is None:
        return "n/a"
    if cell.status != "ok" or not cell.samples:
        return "skipped" if cell.status == "skipped" else "FAILED"
    med, lo, hi = statistics.median(cell.samples), min(cell.samples), max(cell.samples)
    text = _fmt_value(med, row.unit)
    if len(cell.samples) > 1:
        text += f" [{_fmt_value(lo, row.unit)}-{_fmt_value(hi, row.unit)}]"
    if cell.iops:
        text += f" ({statistics.median(cell.iops) / 1000:.1f}k)"
    return text


def columns(results: list[RowResult]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The systems shown (those some row measures, colofs, QEMU and raw always) and the ratio columns.

    A ratio column is (heading, mine, other); the NBD column's ratio to QEMU
    appears only when some row has an NBD cell.
    """
    present = {name for res in results for name in res.cells}
    systems = [s for s in SYSTEMS if s in present or s in ("colofs", "qemu", "raw")]
    ratios = [("vs QEMU", "colofs", "qemu")]
    if "nbd" in present:
        ratios.append(("NBD vs QEMU", "nbd", "qemu"))
    if "floor" in present:
        ratios.append(("vs floor", "colofs", "floor"))
    ratios.append(("vs raw", "colofs", "raw"))
    return systems, ratios


def render(results: list[RowResult], header: str) -> str:
    """The Markdown table for the terminal, then one line per failed or skipped cell with its reason."""
    systems, ratio_cols = columns(results)
    heads = [LABELS[s] for s in systems] + [h for h, _, _ in ratio_cols]
    lines = [header, "", f"| row | unit | {' | '.join(heads)} |", "|---|---|" + "---|" * len(heads)]
    notes = []
    for res in results:
        r = res.row
        cells = [fmt_cell(res.cells.get(s), r) for s in systems]
        ratios = [f"{x:.2f}" if x is not None else "-" for x in (res.ratio(o, m) for _, m, o in ratio_cols)]
        if res.floor_bound:
            i = next(i for i, (_, _, o) in enumerate(ratio_cols) if o == "floor")
            ratios[i] += " bound"
        lines.append(f"| {r.title} | {r.unit} | {' | '.join(cells)} | {' | '.join(ratios)} |")
        for name, cell in res.cells.items():
            if cell.status != "ok":
                notes.append(f"- {r.id} / {LABELS[name]}: {cell.status}: {cell.reason}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def machine_info(workdir: str, qemu_bin: str | None = None) -> dict[str, Any]:
    """What the numbers depend on, recorded beside them (``qemu``: the qemu-storage-daemon compared with)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    mem_kib = 0
    try:
        with open("/proc/meminfo") as f:
            mem_kib = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        pass
    fs = first_line(["stat", "-f", "-c", "%T", workdir])
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(__file__), check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        rev = ""
    try:
        import pyfuse3

        pyfuse3_version = str(getattr(pyfuse3, "__version__", "unknown"))
    except ImportError:
        pyfuse3_version = "not installed"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "os": first_line(["sh", "-c", ". /etc/os-release && echo \"$PRETTY_NAME\""]),
        "python": platform.python_version(),
        "qemu": first_line([os.path.join(qemu_bin, "qemu-storage-daemon") if qemu_bin else "qemu-storage-daemon",
                            "--version"]),
        "fio": first_line(["fio", "--version"]),
        "nbdcopy": first_line(["nbdcopy", "--version"]),
        "fuse": first_line(["fusermount3", "--version"]),
        "pyfuse3": pyfuse3_version,
        "colofs_git": rev,
        "workdir_fs": fs,
    }


def write_json(path: str, results: list[RowResult], machine: dict[str, Any], settings: dict[str, Any],
               notes: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"schema": SCHEMA, "machine": machine, "settings": settings, "notes": notes,
           "ratio_meaning": "vs_qemu / vs_raw: how many times better colofs is (above 1.0 colofs wins; "
                            "throughput colofs/other, time and memory other/colofs)",
           "rows": [r.as_json() for r in results]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
