"""Replication settings: limits of the engine, the per-VM write mode, the key rule.

The mode decides when a primary write completes (docs/design.md invariant 6):

* ``async`` (the default, COLO): once it is on the primary disk. The
  secondary catches up behind; a checkpoint waits for it.
* ``sync`` (DRBD protocol B): once the secondary has the write: received,
  checked and queued in order to be applied (its RECEIPT), or applied (its
  ACK) from a secondary that sends no receipts; durable there at the next
  checkpoint, which waits for that. While the secondary is not connected (or is being
  resynchronised) sync writes complete locally instead of failing or
  hanging, and the VM is reported ``degraded`` until the stream is back.

The mode is kept in ``VM_DIR/repl.json`` so that it survives restarts on
either host (after a failover the new primary keeps the VM's mode).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from dataclasses import dataclass

import trio

from colofs.core.fileio import atomic_write
from colofs.core.vm import VM
from colofs.repl.errors import ReplConfigError
from colofs.repl.tls import TlsConfig
from colofs.wire.frames import DEFAULT_MAX_RAW_LEN, DEFAULT_MAX_WIRE_LEN

log = logging.getLogger(__name__)

ASYNC = "async"
SYNC = "sync"
MODES = (ASYNC, SYNC)
MODE_FILE = "repl.json"


@dataclass(frozen=True)
class ReplConfig:
    """Limits and timings of the engine; the defaults suit a LAN between two hosts."""

    batch_max_bytes: int = 1 << 20
    """A batch carries whatever is queued, up to this many bytes of write data.

    A batch is held three times on the primary while it goes out (the writes,
    the joined payload, its lz4 output) and decoded whole on the secondary.
    At 4 MiB the primary's VM worker held 17.5 MiB of Python-allocated memory
    for it at its peak of a 1 MiB fill, at 1 MiB 5.5 MiB
    (``bench/forward_core.py --trace``); the secondary's group commit still
    merges queued batches up to ``apply_merge_bytes``, so its groups and
    syncs stay as they were. CPU per MiB of a 1 MiB fill, alternated under
    load: primary 3.3 against 3.7 ms, secondary 4.2 against 4.1 ms (medians
    of 4, ranges overlapping)."""
    batch_delay: float = 0.001
    """While batches are in flight, a small batch waits this long for company."""
    window: int = 16
    """Batches sent and not yet acknowledged; the sender waits beyond that."""
    max_inflight_bytes: int = 64 << 20
    """While streaming, writers wait when this much written data is unacknowledged."""
    max_backlog_bytes: int = 128 << 20
    """Retained writes beyond this are dropped; catching up is then a dirty-block resync.

    It is what bounds the primary's memory: the retained writes are most of
    it (at 256 MiB the daemon peaked at ~330 MiB during a 1 GiB ingest).
    Acknowledged writes past it are dropped first, and only they: writers
    wait (``max_inflight_bytes``, at most half of this) before unacknowledged
    writes could reach it, so a stream never breaks over it."""
    max_retained_total_bytes: int = 128 << 20
    """All VMs of one primary together retain at most this (see ``RetainedBudget``): the host's bound.

    With it at 256 MiB the primary daemon peaked at 326 MiB in ``make bench``
    (four VMs written between checkpoints); only a secondary crash after this
    much was written since the last checkpoint costs more (a dirty-block
    resync instead of a resend)."""
    max_write_bytes: int = 32 << 20
    """A single write larger than this is not streamed but resynchronised as dirty blocks."""
    resync_chunk_bytes: int = 4 << 20
    """Blocks compared per RESYNC_QUERY, and most data per RESYNC_DATA frame."""
    resync_window: int = 8
    """RESYNC_QUERY frames outstanding at once."""
    reconnect_min: float = 0.05
    reconnect_max: float = 5.0
    connect_timeout: float = 5.0
    handshake_timeout: float = 10.0
    ping_interval: float = 1.0
    peer_timeout: float = 10.0
    """No frame from the peer for this long drops the connection (then reconnect)."""
    checkpoint_timeout: float = 30.0
    dirty_save_interval: float = 2.0
    """How often the dirty bitmap is made durable while it is what catching up relies on."""
    scan_interval: float = 0.5
    """How often the primary looks for VMs and disks created since it started."""
    apply_merge_bytes: int = 4 << 20
    """The secondary applies queued batches together (one group commit) up to this size.

    It is a ceiling that a steady stream does not reach with the defaults:
    ``receive_bytes`` (4 MiB) counts the group being applied as well as the
    batches queued behind it, so while one group is applied the next can
    gather only what is left of those 4 MiB, and applied groups come out at
    about 2 MiB each. A group's decoded writes and its copy-before-write buffer (the old
    blocks of base it saves into hidden) are held at once, so this bounds
    the secondary's memory per group. At 16 MiB a busy secondary peaked at
    95-121 MiB RSS in ``bench/secondary_memory.py``; at 4 MiB (with
    ``receive_bytes`` at 8) at 65-85, and neither the rate nor the core's
    CPU per MiB moved beyond the machine's noise (``bench/ingest_core.py
    --group``); the cost is more ``fdatasync`` of hidden (one per 4 MiB
    instead of one per 10-14 MiB under load)."""
    receive_queue: int = 64
    """Decoded frames a secondary session holds before it stops reading the socket."""
    receive_bytes: int = 4 << 20
    """Write data a secondary session holds decoded (queued or being applied) before it stops reading.

    The frame count alone would let ``receive_queue`` batches pile up. The
    group being applied counts too, so this is shared by that group and the
    batches queued behind it (what the next group merges): with both at
    4 MiB, groups under a steady stream are about 2 MiB, not
    ``apply_merge_bytes``; TCP holds the rest back. At 8 MiB
    the secondary peaked 2-7 MiB higher in ``bench/secondary_memory.py``
    (56.0-62.9 against 53.5-58.7 MiB) with the same CPU per MiB."""
    max_disks_per_vm: int = 256
    max_sessions: int = 256
    """Authenticated connections a secondary serves at once; more are refused after the handshake."""
    max_unauthenticated: int = 64
    """Connections still in their handshake, all addresses together (see ``colofs.repl.admission``)."""
    max_unauthenticated_per_source: int = 8
    """Connections still in their handshake from one address; more are closed at accept, unread."""
    max_write_rate: int = 10_000_000
    """Writes per second no primary exceeds: how far past what ATTACH announced a RESYNC_DONE may reach."""
    max_wire_len: int = DEFAULT_MAX_WIRE_LEN
    max_raw_len: int = DEFAULT_MAX_RAW_LEN
    receipts: bool = True
    """A primary asks for RECEIPTs (its sync writes complete on them); False: sync waits for the ACK
    of the durable apply, as with a secondary that does not know receipts."""
    tls: TlsConfig | None = None
    """TLS under the frames, with certificates verified both ways (``colofs.repl.tls``); None: plain TCP."""

    def __post_init__(self) -> None:
        for name in ("batch_max_bytes", "window", "max_inflight_bytes", "max_backlog_bytes", "max_retained_total_bytes",
                     "resync_chunk_bytes", "resync_window", "receive_queue", "receive_bytes", "max_sessions",
                     "max_unauthenticated", "max_unauthenticated_per_source", "max_write_rate"):
            if getattr(self, name) <= 0:
                raise ReplConfigError(f"replication setting {name} must be positive")
        if self.batch_max_bytes + (1 << 20) > self.max_raw_len:
            raise ReplConfigError("batch_max_bytes must leave room for headers below max_raw_len")
        if self.max_write_bytes + 64 > self.max_raw_len:
            raise ReplConfigError("max_write_bytes must fit in one frame (max_raw_len)")

    @property
    def effective_inflight(self) -> int:
        """Unacknowledged bytes writers may run ahead; below the backlog bound so streaming never overflows it."""
        return max(1, min(self.max_inflight_bytes, self.max_backlog_bytes // 2))


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ReplConfigError(f"replication mode must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def load_mode(vm: VM) -> str:
    """The VM's persisted mode; ``async`` if none was set (or the file is unreadable, with a warning)."""
    path = os.path.join(vm.path, MODE_FILE)
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read())
        return check_mode(raw["mode"])
    except FileNotFoundError:
        return ASYNC
    except (ValueError, KeyError, TypeError, ReplConfigError) as e:
        log.warning("VM %s: ignoring unreadable %s (%s); mode is %s", vm.name, path, e, ASYNC)
        return ASYNC


async def save_mode(vm: VM, mode: str) -> None:
    """Persist the VM's mode atomically (temp file, fsync, rename)."""
    check_mode(mode)
    body = json.dumps({"format": 1, "mode": mode}, sort_keys=True).encode() + b"\n"
    await trio.to_thread.run_sync(atomic_write, os.path.join(vm.path, MODE_FILE), body)


def _is_loopback_literal(host: str) -> bool | None:
    if host in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return None


async def require_key_or_loopback(host: str, key: bytes | None, what: str) -> None:
    """Without a shared key, only loopback endpoints are allowed (nothing would authenticate the peer).

    ``what`` names the option in the error ("--listen", "--peer"). A host
    name is resolved and every address it has must be loopback.
    """
    if key is not None:
        return
    verdict = _is_loopback_literal(host)
    if verdict is None:
        try:
            infos = await trio.socket.getaddrinfo(host, None)
        except OSError as e:
            raise ReplConfigError(f"{what} {host}: cannot resolve ({e})") from None
        verdict = bool(infos) and all(
            ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos
        )
    if not verdict:
        raise ReplConfigError(
            f"{what} {host}: refusing to replicate over a non-loopback address without a shared key; "
            f"give --key-file (the same key file on both hosts)"
        )
