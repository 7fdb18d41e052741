"""Build the colofs test guest: a Debian kernel and a busybox initramfs, from Debian packages only.

``apt-get download`` fetches the kernel that ``linux-image-amd64`` depends on, ``busybox-static``,
``e2fsck-static`` and ``e2fsprogs`` (for ``mke2fs``, whose shared libraries come from this host,
found with ``ldd``: the host is the same Debian). The initramfs holds busybox, ``mke2fs``,
``e2fsck.static``, the virtio and ext4 modules uncompressed in load order (read from each module's
``depends=``), and ``init.sh`` as ``/init``. No root file system image, no network in the guest.

The result is cached per machine (``$COLOFS_GUEST_CACHE``, default ``~/.cache/colofs-guest``) under
a key of ``init.sh`` and this builder's version: the first build downloads ~72 MB and takes a few
seconds, later calls return at once. Concurrent builders serialise on a lock file; checkouts with
different ``init.sh`` keep their own builds side by side (one unused for a week is removed).

    python -m examples.guest.build [--cache DIR]     # prints the kernel and initramfs paths
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_VERSION = "1"
PACKAGES = ("busybox-static", "e2fsck-static", "e2fsprogs")
MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
"""What the guest needs; their dependencies are found and loaded first."""
STALE_SECONDS = 7 * 86400
"""A build of another ``init.sh`` (another checkout) unused this long is removed."""
KERNEL_PARTS = ("boot/vmlinuz-*", "lib/modules/*/kernel/drivers/virtio/*",
                "lib/modules/*/kernel/drivers/block/*", "lib/modules/*/kernel/fs/*",
                "lib/modules/*/kernel/lib/*", "lib/modules/*/kernel/crypto/*")


class GuestUnavailable(RuntimeError):
    """The guest cannot be built here (no apt, no mirror, a package missing): a reason to skip."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    info: dict


def default_cache() -> Path:
    env = os.environ.get("COLOFS_GUEST_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "colofs-guest"


def _key() -> str:
    h = hashlib.sha256(BUILD_VERSION.encode())
    h.update((HERE / "init.sh").read_bytes())
    return h.hexdigest()[:16]


def build(cache: Path | None = None) -> GuestImage:
    """The cached guest, built first if this machine has none for the current ``init.sh``."""
    cache = cache or default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / _key()
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "info.json").exists():
            with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
                _build_into(cache, Path(tmp))
                shutil.rmtree(out, ignore_errors=True)
                os.rename(Path(tmp) / "out", out)
        os.utime(out / "info.json")  # in use: another checkout's build is removed only when stale
        for other in cache.glob("*/info.json"):
            if other.parent != out and time.time() - other.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(other.parent, ignore_errors=True)
    info = json.loads((out / "info.json").read_text())
    return GuestImage(out / "vmlinuz", out / "initrd.cpio", info)


def _run(*cmd: str, cwd: Path | None = None) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except FileNotFoundError as e:
        raise GuestUnavailable(f"{cmd[0]} is not installed") from e
    if res.returncode != 0:
        raise GuestUnavailable(f"{' '.join(cmd)} failed: {(res.stderr or res.stdout).strip()[-500:]}")
    return res.stdout


def _kernel_package() -> str:
    deps = _run("apt-cache", "depends", "linux-image-amd64")
    for m in re.finditer(r"Depends: (linux-image-\S+)", deps):
        return m.group(1)
    raise GuestUnavailable("apt-cache names no kernel package for linux-image-amd64")


def _download(cache: Path) -> dict[str, Path]:
    """The .deb of each package, downloaded once into ``cache/debs``."""
    debs = cache / "debs"
    debs.mkdir(exist_ok=True)
    names = (_kernel_package(), *PACKAGES)
    found = {n: next(iter(sorted(debs.glob(f"{n}_*.deb"))), None) for n in names}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        _run("apt-get", "download", *missing, cwd=debs)
        found = {n: next(iter(sorted(debs.glob(f"{n}_*.deb"))), None) for n in names}
    if any(p is None for p in found.values()):
        raise GuestUnavailable(f"apt-get download left no .deb for {sorted(n for n, p in found.items() if p is None)}")
    return {n: p for n, p in found.items() if p is not None}


def _extract_kernel(deb: Path, into: Path) -> None:
    into.mkdir()
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        subprocess.run(["tar", "-x", "-C", str(into), "--wildcards", *(f"./{p}" for p in KERNEL_PARTS)],
                       stdin=tar.stdout, check=True, capture_output=True, timeout=600)
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait(60)


def _module_index(root: Path) -> dict[str, Path]:
    idx = {}
    for p in root.glob("lib/modules/*/kernel/**/*.ko*"):
        idx[p.name.split(".ko")[0].replace("-", "_")] = p
    return idx


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def _load_order(idx: dict[str, Path]) -> list[str]:
    """MODULES and everything they depend on, each after its dependencies."""
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in chain:
            raise GuestUnavailable(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in idx:
            raise GuestUnavailable(f"the kernel package has no module {name} (needed by {chain})")
        m = re.search(rb"\x00depends=([^\x00]*)\x00", b"\x00" + _module_bytes(idx[name]))
        for dep in (m.group(1).decode().split(",") if m else []):
            if dep:
                visit(dep.replace("-", "_"), (*chain, name))
        order.append(name)

    for name in MODULES:
        visit(name, ())
    return order


def _libraries(binary: Path) -> list[Path]:
    """The host's shared libraries ``binary`` loads (the host is the same Debian release)."""
    libs = []
    for line in _run("ldd", str(binary)).splitlines():
        if "not found" in line:
            raise GuestUnavailable(f"{binary.name} needs a library this host lacks: {line.strip()}")
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def _build_into(cache: Path, tmp: Path) -> None:
    debs = _download(cache)
    kpkg = _kernel_package()
    kroot = tmp / "kernel"
    _extract_kernel(debs[kpkg], kroot)
    tools = tmp / "tools"
    for name in PACKAGES:
        _run("dpkg-deb", "-x", str(debs[name]), str(tools))
    vmlinuz = next(iter(sorted((kroot / "boot").glob("vmlinuz-*"))), None)
    if vmlinuz is None:
        raise GuestUnavailable(f"{debs[kpkg].name} holds no /boot/vmlinuz-*")
    idx = _module_index(kroot)
    order = _load_order(idx)

    cpio = _Cpio()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "mnt", "etc", "modules", "lib", "lib64",
              "lib/x86_64-linux-gnu"):
        cpio.dir(d)
    cpio.node("dev/console", 0o020600, 5, 1)
    cpio.file("init", (HERE / "init.sh").read_bytes(), 0o755)
    cpio.file("bin/busybox", (tools / "bin/busybox").read_bytes(), 0o755)
    cpio.file("sbin/e2fsck.static", (tools / "sbin/e2fsck.static").read_bytes(), 0o755)
    cpio.file("sbin/mke2fs", (tools / "sbin/mke2fs").read_bytes(), 0o755)
    cpio.file("etc/mke2fs.conf", (tools / "etc/mke2fs.conf").read_bytes(), 0o644)
    for lib in _libraries(tools / "sbin/mke2fs"):
        dest = "lib64/" + lib.name if lib.name.startswith("ld-linux") else "lib/x86_64-linux-gnu/" + lib.name
        cpio.file(dest, lib.read_bytes(), 0o755)
    for name in order:
        cpio.file(f"modules/{name}.ko", _module_bytes(idx[name]), 0o644)
    cpio.file("modules/order", ("\n".join(order) + "\n").encode(), 0o644)

    out = tmp / "out"
    out.mkdir()
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    (out / "initrd.cpio").write_bytes(cpio.finish())
    info = {"kernel_package": debs[kpkg].name, "kernel": vmlinuz.name, "modules": order,
            "packages": sorted(p.name for p in debs.values()), "key": _key()}
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")


class _Cpio:
    """An uncompressed "newc" archive, the format the kernel unpacks as its initramfs."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        self._ino += 1
        head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\x00"
        self._parts.append(head + b"\x00" * (-len(head) % 4))
        self._parts.append(data + b"\x00" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def node(self, name: str, mode: int, major: int, minor: int) -> None:
        self._entry(name, mode, rdev=(major, minor))

    def file(self, name: str, data: bytes, perm: int) -> None:
        self._entry(name, 0o100000 | perm, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None, help="cache directory (default %(default)s)")
    args = ap.parse_args()
    img = build(args.cache)
    print(json.dumps({"kernel": str(img.kernel), "initrd": str(img.initrd), **img.info}, indent=1))


if __name__ == "__main__":
    main()
