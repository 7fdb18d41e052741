"""Talking to a mounted colofs through its ``user.colofs.*`` extended attributes.

Every command but mount and umount is one ``setxattr``, ``getxattr`` or
``removexattr`` on a path of the mount. A failed call carries only an errno;
the daemon keeps the message for the calling process, which reads it back
from ``user.colofs.last_error``.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from colofs.core.imagesource import ACCEPTED, accepted, kind_of

PREFIX = "user.colofs."


class CtlError(Exception):
    """A failure to report as one line on stderr (exit status 1)."""


@dataclass
class Target:
    """A path on a colofs mount and what the daemon says it is."""

    path: str
    status: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.status.get("kind"))


def _not_found(path: str) -> CtlError:
    """Explain a missing path in colofs terms when its parent is on a mount."""
    parent, name = os.path.split(os.path.abspath(path.rstrip("/")) or "/")
    try:
        st = json.loads(os.getxattr(parent, PREFIX + "status"))
    except (OSError, ValueError):
        return CtlError(f"{path}: no such file or directory")
    if st.get("kind") == "root":
        return CtlError(f"no VM {name!r} in the colofs mount at {parent}")
    if st.get("kind") == "vm":
        disk = name[:-4] if name.endswith(".raw") else name
        disk, sep, snap = disk.partition("@")
        if sep:
            return CtlError(f"no snapshot or clone {snap!r} of disk {disk!r} in VM {st.get('vm')!r} "
                            f"(mount {st.get('mountpoint')})")
        return CtlError(f"no disk {disk!r} in VM {st.get('vm')!r} (mount {st.get('mountpoint')})")
    return CtlError(f"{path}: no such file or directory")


def resolve(path: str) -> Target:
    """The colofs node at ``path``; a clear error if there is none."""
    try:
        raw = os.getxattr(path, PREFIX + "status")
    except FileNotFoundError:
        raise _not_found(path) from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise CtlError(
                f"{path}: stale colofs mount (its daemon is gone): run 'mountctl umount' on it, "
                "or mount the store again (that detaches it and recovers the store)"
            ) from None
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise CtlError(f"{path} is not on a colofs mount") from None
        raise CtlError(f"{path}: {e.strerror}") from None
    try:
        status = json.loads(raw)
    except ValueError:
        raise CtlError(f"{path}: the daemon answered a status that is not JSON") from None
    if not isinstance(status, dict) or "kind" not in status:
        raise CtlError(f"{path} is not on a colofs mount")
    return Target(os.path.abspath(path), status)


def expect(target: Target, kind: str, hint: str) -> Target:
    if target.kind != kind:
        what = {"root": "the root of a colofs mount", "vm": "a VM directory", "disk": "a disk file",
                "pending": "a pending file", "snapshot": "a snapshot file",
                "clone": "a clone file"}.get(target.kind, target.kind)
        raise CtlError(f"{target.path} is {what}; {hint}")
    return target


def _last_error(path: str) -> str:
    try:
        return os.getxattr(path, PREFIX + "last_error").decode(errors="replace").strip()
    except OSError:
        return ""


def _last_result(path: str) -> dict[str, Any]:
    try:
        return json.loads(os.getxattr(path, PREFIX + "last_result"))
    except (OSError, ValueError):
        return {}


def command(path: str, name: str, value: bytes | str) -> dict[str, Any]:
    """Run a control command; returns the daemon's JSON outcome or raises :class:`CtlError`."""
    data = value.encode() if isinstance(value, str) else value
    try:
        os.setxattr(path, PREFIX + name, data)
    except OSError as e:
        raise CtlError(_last_error(path) or f"{path}: {name} failed: {e.strerror}") from None
    return _last_result(path)


def wait_served(root: str, vm: str) -> None:
    """Return once ``vm`` is served, so its files open at once after this command.

    With a worker per VM a new VM's directory is mounted by its worker just
    after the command that made it returns; reading the directory's status
    waits for that mount (one process answers at once). A failure here is
    not the command's: the status says it later.
    """
    try:
        os.getxattr(os.path.join(root, vm), PREFIX + "status")
    except OSError:
        pass


def remove(path: str, name: str) -> dict[str, Any]:
    """Remove a control attribute (deletes a snapshot); returns the outcome or raises :class:`CtlError`."""
    try:
        os.removexattr(path, PREFIX + name)
    except OSError as e:
        raise CtlError(_last_error(path) or f"{path}: removing {name} failed: {e.strerror}") from None
    # The file is gone now; the outcome is kept per process, readable anywhere on the mount.
    return _last_result(os.path.dirname(path))


def query(path: str, name: str) -> Any:
    """The JSON value of a readable attribute."""
    try:
        raw = os.getxattr(path, PREFIX + name)
    except OSError as e:
        raise CtlError(f"{path}: reading {name} failed: {e.strerror}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise CtlError(f"{path}: the daemon answered {name} that is not JSON") from None


def check_image(path: str) -> None:
    """Refuse, before the daemon is asked, an import source that is missing or of a kind it cannot take.

    Only ``stat``: nothing is opened here (a FIFO would block the open).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CtlError(f"{path}: no such image file") from None
    except OSError as e:
        raise CtlError(f"{path}: {e.strerror}") from None
    if not accepted(st.st_mode):
        raise CtlError(f"{path} is {kind_of(st.st_mode)}, not an image: import takes a raw image, {ACCEPTED}")


# -- lists read in pages, and the status gathered VM by VM -------------------------------------


def paged(path: str, name: str, first: dict[str, Any] | None = None) -> list[Any]:
    """Every item of a list attribute served in pages (``NAME.0``, ``NAME.1``, ...)."""
    page = first if first is not None else query(path, f"{name}.0")
    items = list(page.get(name) or [])
    for n in range(1, int(page.get("pages", 1))):
        try:
            items += query(path, f"{name}.{n}").get(name) or []
        except CtlError:  # the list shrank meanwhile: what is left was on the pages read
            break
    return items


def vm_names(root: Target) -> list[str]:
    """The VMs of a mount: the names in the root's status, then its further pages."""
    st = root.status
    first = {"vms": st.get("vms") or [], "pages": st.get("vm_pages", 1)}
    return sorted(set(paged(root.path, "vms", first)))


def snapshots(path: str) -> list[dict[str, Any]]:
    """The snapshots and clones of a VM directory or disk file, however many."""
    return paged(path, "snapshots")


READ_TRIES = 3
"""How often a VM's status is read while the root still lists it (its worker may be coming back)."""


def still_listed(root: str, name: str) -> bool:
    """Whether the root lists ``name`` now (True when the root cannot say: the read's error then stands)."""
    try:
        return name in vm_names(resolve(root))
    except CtlError:
        return True


def _read_vm(path: str) -> dict[str, Any]:
    st = dict(resolve(path).status)
    st.pop("kind", None)
    st.pop("mountpoint", None)
    disks = st.get("disks") or {}
    for d in disks.values():
        d.setdefault("snapshots", [])
    if any(d.get("snapshot_count") for d in disks.values()):
        for snap in snapshots(path):
            d = disks.get(snap.get("disk"))
            if d is not None:
                d.setdefault("snapshots", []).append(snap)
    return st


def vm_detail(root: str, name: str) -> dict[str, Any] | None:
    """One VM's status as its directory tells it, its disks' snapshots listed; None if it is gone.

    A VM can leave between the root's listing and this read (a secondary's
    VM named by a primary that never proved the key is forgotten when its
    worker ends), and the kernel may still hold its directory for a moment
    after: whether it is gone is the root's word, asked again after a failed
    read, not the directory's. A VM the root still lists is read again (its
    worker may have been replaced meanwhile), at most :data:`READ_TRIES`
    times; then the read's error is raised.
    """
    path = os.path.join(root, name)
    tries = 0
    while True:
        try:
            return _read_vm(path)
        except CtlError:
            tries += 1
            if not still_listed(root, name):
                return None
            if tries >= READ_TRIES:
                raise


VM_STATUS_TIMEOUT = 10.0
"""How long ``mountctl status`` waits for one VM's answer: a VM whose worker is hung never answers."""
STATUS_READERS = 8


def not_answering(name: str, timeout: float) -> dict[str, Any]:
    """What a VM's status says when its directory did not answer (its process is hung, say)."""
    return {"vm": name, "worker": {"state": "not answering"}, "role": "unknown", "phase": "not-answering",
            "epoch": None, "last_checkpoint": None, "last_applied": None, "disks": {}, "pending": [],
            "peer": {"state": f"unknown: its directory did not answer within {timeout:.0f} s"}}


def unreadable(name: str, error: CtlError) -> dict[str, Any]:
    """What a VM's status says when the root lists it but its directory's status cannot be read."""
    return {"vm": name, "worker": {"state": "unreadable"}, "role": "unknown", "phase": "unreadable",
            "epoch": None, "last_checkpoint": None, "last_applied": None, "disks": {}, "pending": [],
            "peer": {"state": f"unknown: {error}"}}


def gather_status(root: Target, timeout: float = VM_STATUS_TIMEOUT) -> dict[str, Any]:
    """The root's status with every VM's detail, asked VM by VM (no one value holds them all).

    The VMs are asked in parallel, each for at most ``timeout`` seconds: with a
    process per VM one hung process must not hang the status of all. A read
    that does not answer stays blocked in a daemon thread, which the exit ends.
    A VM that left meanwhile is left out; one the root still lists but whose
    status cannot be read is shown as ``unreadable`` with the error, so one
    VM never fails the status of all.
    """
    out = dict(root.status)
    names = vm_names(root)
    answers: queue.Queue[tuple[str, dict[str, Any] | None | CtlError]] = queue.Queue()
    todo: queue.Queue[str] = queue.Queue()
    for name in names:
        todo.put(name)

    def reader() -> None:
        while True:
            try:
                name = todo.get_nowait()
            except queue.Empty:
                return
            try:
                answers.put((name, vm_detail(root.path, name)))
            except CtlError as e:
                answers.put((name, e))

    for _ in range(min(STATUS_READERS, len(names))):
        threading.Thread(target=reader, daemon=True, name="status").start()
    got: dict[str, dict[str, Any] | None | CtlError] = {}
    deadline = time.monotonic() + timeout  # each VM gets its turn: the deadline moves with every answer
    while len(got) < len(names):
        try:
            name, detail = answers.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        got[name] = detail
        deadline = time.monotonic() + timeout
    vms = {}
    for name in names:
        detail = got.get(name, not_answering(name, timeout))
        if isinstance(detail, CtlError):
            detail = unreadable(name, detail)
        if detail is not None:
            vms[name] = detail
    out["vms"] = vms
    return out
