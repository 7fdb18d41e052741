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
    dmg = vm.get("damage")
    if dmg:  # quarantined: nothing of it is served until it is repaired
        where = f" at offset {dmg['offset']}" if dmg.get("offset") is not None else ""
        lines.append(f"  DAMAGED: {dmg.get('file')}{where}: {dmg.get('reason')}")
        lines.append(f"  repair (on the secondary): mountctl repair MOUNTPOINT/{vm['vm']}")
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
    lines.append(render_peer(vm.get("peer")))
    ver = vm.get("verify")
    if ver:
        lines.append(render_verify(ver))
    return lines


def render_verify(v: dict[str, Any]) -> str:
    """A VM's running or last online verify: ``verify:running 42.0% eta:12s differing:0``."""
    line = f"  verify:{v.get('state')}"
    if v.get("state") == "running":
        line += f" {v.get('phase')} {v.get('percent')}%"
        if v.get("eta_s") is not None:
            line += f" eta:{human_seconds(float(v['eta_s']))}"
    line += (f" compared:{v.get('blocks_compared')}/{v.get('blocks_total')} differing:{v.get('blocks_differing')}"
             f" unverified:{v.get('blocks_unverified')} took:{human_seconds(float(v.get('duration_s', 0)))}")
    res = v.get("resync")
    if res and res.get("repaired") is not None:
        line += f" repaired:{res['repaired']}"
    if v.get("error"):
        line += f" error:{v['error']}"
    return line


def render_peer(peer: dict[str, Any] | str | None) -> str:
    """A VM's replication: ``peer:connected mode:async acked:120 backlog:0B lz4:0.41``, and why if not."""
    if not isinstance(peer, dict):
        return f"  peer:{peer or 'not configured'}"
    state = str(peer.get("state", "?"))
    line = f"  peer:{state}"
    if peer.get("peer_node"):
        line += f" node:{peer['peer_node']}"
    if peer.get("mode"):
        line += f" mode:{peer['mode']}"
    resync = peer.get("resync") or {}
    if state == "resyncing" and resync.get("active"):
        line += (f" progress:{resync.get('percent', 0)}% ({resync.get('blocks_checked', 0)}/"
                 f"{resync.get('blocks_total', 0)} blocks, {human_bytes(int(resync.get('bytes_sent', 0)))} sent"
                 f"{', full' if resync.get('full') else ''})")
    if peer.get("acked_seq") is not None:
        line += f" acked:{peer['acked_seq']}"
    if peer.get("receipts") and peer.get("received_seq") is not None:
        line += f" received:{peer['received_seq']}"  # what sync writes wait for; acked: applied, durable
    if peer.get("backlog_writes") is not None:
        backlog = peer.get("backlog_bytes")
        line += f" backlog:{peer['backlog_writes']} writes"
        if backlog is not None:
            line += f"/{human_bytes(int(backlog))}"
    if peer.get("degraded"):
        line += " DEGRADED"
    if peer.get("lz4_ratio") is not None:
        line += f" lz4:{peer['lz4_ratio']:.3f}"
    if peer.get("reason") and state != "connected":
        line += f" reason:{peer['reason']}"
    return line


def render_replication(rep: dict[str, Any]) -> str:
    """The mount's replication: ``replication:running role:primary peer:HOST:PORT vms:2 connected:2``."""
    line = f"  replication:{rep.get('state', '?')}"
    for key in ("role", "listen", "port", "peer"):
        if rep.get(key):
            line += f" {key}:{rep[key]}"
    if rep.get("state") == "running":
        line += "" if rep.get("authenticated") else " unauthenticated(loopback)"
        keys = (("vms", "connected", "connecting", "resyncing", "refused") if rep.get("role") == "primary"
                else ("connections", "sessions", "refused"))
        line += "".join(f" {k}:{rep.get(k, 0)}" for k in keys)
        why = {k: n for k, n in (rep.get("refused_by_reason") or {}).items() if n}
        if why:  # refused:12(source_limit:10,handshake_timeout:2)
            line += "(" + ",".join(f"{k}:{n}" for k, n in sorted(why.items())) + ")"
        if rep.get("pending"):  # connections still in their handshake
            line += f" pending:{rep['pending']}"
        if rep.get("last_refusal"):
            line += f" last-refusal:{rep['last_refusal']}"
    return line


def render_root(st: dict[str, Any], only_vm: str | None = None) -> list[str]:
    lines: list[str] = []
    if only_vm is None:
        lines.append(
            f"colofs {st['mountpoint']} store:{st['store']} pid:{st['pid']} default-role:{st['default_role']}"
        )
        lines.append(render_replication(st.get("replication") or {}))
        if not st.get("vms"):
            lines.append("  no VMs yet (mkdir MOUNTPOINT/VM, or mountctl create)")
    for name, vm in sorted((st.get("vms") or {}).items()):
        if only_vm is not None and name != only_vm:
            continue
        lines += render_vm(vm)
    return lines
