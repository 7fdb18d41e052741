"""Human-readable status, in the spirit of ``drbdadm status``: one line per thing, indented."""

from __future__ import annotations

import time
from typing import Any

from mountctl.units import human_bytes, human_seconds


def _last_op(op: dict[str, Any] | None) -> str | None:
    if not op:
        return None
    ago = max(0.0, time.time() - float(op.get("at", time.time())))
    what = op.get("op", "?")
    if "seq" in op:
        what += f" seq:{op['seq']}"
    return f"last:{what} took:{human_seconds(float(op.get('seconds', 0)))} ago:{human_seconds(ago)}"


def render_disk(name: str, d: dict[str, Any], indent: str = "  ") -> list[str]:
    line = (
        f"{indent}disk:{name} size:{human_bytes(int(d['size']))} block:{d['block_size']} "
        f"hidden:{human_bytes(int(d['hidden_bytes']))} active:{human_bytes(int(d['active_bytes']))}"
    )
    if d.get("io_errors"):
        line += f" io-errors:{d['io_errors']}"
    lines = [line]
    for snap in d.get("snapshots") or []:
        lines.append(f"{indent}  {render_snapshot(snap)}")
    return lines


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def render_snapshot(s: dict[str, Any]) -> str:
    """One snapshot or clone: ``snapshot:NAME created:... seq:N used:X``."""
    line = f"{s['kind']}:{s['name']}"
    if s.get("base"):
        line += f" of:{s['base']}"
    line += f" created:{_when(float(s['created']))} seq:{s['seq']} used:{human_bytes(int(s['bytes']))}"
    if s.get("file"):
        line += f" file:{s['file']}"
    if s.get("open_handles"):
        line += f" open:{s['open_handles']}"
    return line


def render_vm(vm: dict[str, Any]) -> list[str]:
    lines = [f"{vm['vm']} role:{vm['role']} phase:{vm['phase']} epoch:{vm['epoch']}"]
    rec = vm.get("recovery") or {}
    state = f"  checkpoint:{vm['last_checkpoint']} applied:{vm['last_applied']}"
    if rec.get("action") not in (None, "clean", "none"):
        state += f" recovery:{rec['action']}({rec.get('blocks', 0)} blocks)"
    last = _last_op(vm.get("last_op"))
    if last:
        state += f" {last}"
    lines.append(state)
    for name, d in sorted((vm.get("disks") or {}).items()):
        lines += render_disk(name, d)
    for p in vm.get("pending") or []:
        lines.append(f"  pending:{p} (no size yet)")
    lines.append(f"  peer:{vm.get('peer', 'not configured')}")
    return lines


def render_root(st: dict[str, Any], only_vm: str | None = None) -> list[str]:
    lines: list[str] = []
    if only_vm is None:
        lines.append(
            f"colofs {st['mountpoint']} store:{st['store']} pid:{st['pid']} default-role:{st['default_role']}"
        )
        rep = st.get("replication") or {}
        rep_line = f"  replication:{rep.get('state', '?')}"
        for key in ("listen", "peer"):
            if rep.get(key):
                rep_line += f" {key}:{rep[key]}"
        lines.append(rep_line)
        if not st.get("vms"):
            lines.append("  no VMs yet (mkdir MOUNTPOINT/VM, or mountctl create)")
    for name, vm in sorted((st.get("vms") or {}).items()):
        if only_vm is not None and name != only_vm:
            continue
        lines += render_vm(vm)
    return lines
