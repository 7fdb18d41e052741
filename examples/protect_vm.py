"""Protect a real VM with colofs, Remus style: the hypervisor pauses the VM for each checkpoint.

Every INTERVAL seconds the protector pauses the guest (QMP ``stop``, which also drains its in-flight
disk I/O), checkpoints the VM on the primary's colofs mount (returns once the secondary confirmed),
and resumes it (QMP ``cont``); it prints each pause. The disk image of every confirmed checkpoint is
then consistent with a paused VM. On loss of the primary, the secondary fails over and boots the
same guest from its own file: it must find the file system clean and every file of the last
confirmed checkpoint with its exact content.

The guest is built from Debian packages (``examples/guest/build.py``, cached per machine): it
formats ext4 on its virtio disk and keeps writing generations of files whose content is a
function of ``--seed``; it announces each generation on its serial console once it is synced.

Three ways to run it (as root, with the repository's venv python):

  protect_vm.py demo        (the default) everything on this machine: a pair on 127.0.0.1 with a
                            generated key, the guest on the primary, --checkpoints checkpoints,
                            then kill -9 of the primary daemon and QEMU, failover, the guest
                            booted from the secondary's file and verified; prints the result.
  protect_vm.py secondary   on the backup host: mount with --listen (unless mounted), wait for the
                            primary, then for its loss; fail over, boot and verify the guest.
  protect_vm.py primary     on the production host: mount with --peer (unless mounted), create
                            the disk, boot the guest, checkpoint every --interval seconds.

Across two hosts (the same key file on both, 0600):

  backup$  protect_vm.py secondary --store /srv/colofs --mnt /mnt/colofs --listen 0.0.0.0:7788 --key-file /etc/colofs.key --seed 42
  prod$    protect_vm.py primary   --store /srv/colofs --mnt /mnt/colofs --peer backup:7788   --key-file /etc/colofs.key --seed 42 --interval 1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from examples.guest.build import GuestImage, build  # noqa: E402
from examples.guest.manifest import manifest_digest  # noqa: E402
from examples.guest.qemu import Guest, poll  # noqa: E402
from mountctl.client import CtlError, command  # noqa: E402
from mountctl.pair import MOUNTCTL, Pair, PairError  # noqa: E402

BOOT = 300.0
"""Bounds a guest's boot (TCG on a busy machine can take a minute)."""


def say(msg: str) -> None:
    print(f"[protect] {msg}", flush=True)


def mountctl(*args: str, timeout: float = 120) -> str:
    res = subprocess.run([*MOUNTCTL, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                         cwd=REPO, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"mountctl {' '.join(map(str, args))}: {(res.stderr or res.stdout).strip()}")
    return res.stdout.strip()


def vm_status(mnt: Path, vm: str) -> dict[str, Any]:
    """The VM directory's status (role, peer, sequence numbers); empty while the VM is not there."""
    try:
        return json.loads(os.getxattr(Path(mnt) / vm, "user.colofs.status"))
    except FileNotFoundError:
        return {}


def ensure_mounted(args: argparse.Namespace, role: str) -> None:
    """Mount the store unless the mountpoint already serves one."""
    if os.path.ismount(args.mnt):
        return
    if not args.store:
        raise SystemExit(f"{args.mnt} is not mounted: give --store (and --{'peer' if role == 'primary' else 'listen'})")
    link = ["--peer", args.peer] if role == "primary" else ["--listen", args.listen]
    key = ["--key-file", str(args.key_file)] if args.key_file else []
    os.makedirs(args.mnt, exist_ok=True)
    say(mountctl("mount", "--role", role, "--store", args.store, *link, *key, args.mnt))


# -- the primary side ----------------------------------------------------------------------------

class Protector:
    """Checkpoints one guest on a replicating primary: stop, checkpoint, cont; every pause measured."""

    def __init__(self, guest: Guest, vmdir: Path, timeout: float) -> None:
        self.guest, self.vmdir, self.timeout = guest, vmdir, timeout
        self.pauses: list[float] = []
        self.confirmed_gen = -1
        """The generation the guest had announced at the last confirmed checkpoint."""

    def checkpoint(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self.guest.stop()
        t1 = time.monotonic()
        try:
            gen = self.guest.gen()  # printed synchronously: everything announced before the stop
            out = command(str(self.vmdir), "checkpoint", json.dumps({"timeout": self.timeout}))
        finally:
            t2 = time.monotonic()
            self.guest.cont()
            t3 = time.monotonic()
        self.pauses.append(t3 - t0)
        self.confirmed_gen = gen
        say(f"checkpoint seq {out.get('seq')}: guest paused {1000 * (t3 - t0):6.1f} ms "
            f"(stop {1000 * (t1 - t0):.1f}, checkpoint {1000 * (t2 - t1):.1f}, cont {1000 * (t3 - t2):.1f}); "
            f"guest at generation {gen}")
        return out

    def run(self, interval: float, count: int) -> None:
        """``count`` checkpoints (0: until the guest or QEMU ends), one every ``interval`` seconds."""
        tick = time.monotonic()
        n = 0
        while count == 0 or n < count:
            tick += interval
            time.sleep(max(0.0, tick - time.monotonic()))  # the protector's pace
            if self.guest.exited():
                raise RuntimeError(f"QEMU ended: {self.guest.describe()}")
            self.checkpoint()
            n += 1

    def summary(self) -> str:
        ms = sorted(1000 * p for p in self.pauses)
        return (f"{len(ms)} checkpoints, pause median {statistics.median(ms):.1f} ms, "
                f"worst {ms[-1]:.1f} ms") if ms else "no checkpoint"


def start_primary_guest(img: GuestImage, disk: Path, work: Path, seed: int, args: argparse.Namespace) -> Guest:
    guest = Guest(img, disk, work, "primary-vm", mode="format", seed=seed, cache=args.cache,
                  accel=args.accel).start()
    say(f"guest booting on {disk} (QMP {guest.qmp_path}, console {guest.serial})")
    poll(lambda: guest.gen() >= 1 or guest.result() or guest.exited(), BOOT, "the guest's first generation")
    if guest.gen() < 1:
        raise RuntimeError(f"the guest did not start writing: {guest.describe()}")
    say(f"guest formatted ext4 and is writing (generation {guest.gen()}, "
        f"{time.monotonic() - guest.started:.1f} s after start)")
    return guest


def cmd_primary(args: argparse.Namespace) -> int:
    ensure_mounted(args, "primary")
    disk = Path(args.mnt) / args.vm / f"{args.disk}.raw"
    if not disk.exists():
        say(mountctl("create", args.mnt, f"{args.vm}/{args.disk}", "--size", args.size))
    guest = start_primary_guest(build(), disk, Path(args.workdir or tempfile.mkdtemp(prefix="protect-")),
                                args.seed, args)
    prot = Protector(guest, disk.parent, args.timeout)
    try:
        prot.run(args.interval, args.checkpoints)
    except KeyboardInterrupt:
        pass
    finally:
        say(prot.summary())
        guest.close()
    return 0


# -- the secondary side --------------------------------------------------------------------------

def await_loss(mnt: Path, vm: str, grace: float, *, wait_connect: bool = True) -> float:
    """Wait for the primary to connect (unless it was seen), then until it has been gone for ``grace``
    seconds; returns when it went (monotonic)."""
    if wait_connect:
        poll(lambda: vm_status(mnt, vm).get("peer", {}).get("connected"), 24 * 3600,
             f"the primary of {vm}", 0.2)
        say(f"{vm}: the primary is connected; watching it")
    gone = None
    while True:
        connected = vm_status(mnt, vm).get("peer", {}).get("connected")
        now = time.monotonic()
        if connected:
            gone = None
        elif gone is None:
            gone = now
        elif now - gone >= grace:
            return gone
        time.sleep(0.05)  # the watcher's pace


def take_over(img: GuestImage, mnt: Path, vm: str, disk_name: str, work: Path, seed: int,
              args: argparse.Namespace, churn_to: int) -> tuple[Guest, dict[str, str], float]:
    """Fail over, boot the guest from this host's file, verify it; the guest then churns on."""
    t0 = time.monotonic()
    mountctl("failover", mnt / vm)
    t_failover = time.monotonic() - t0
    say(f"{vm}: failed over in {t_failover:.2f} s; booting the guest from {mnt / vm / disk_name}.raw")
    guest = Guest(img, mnt / vm / f"{disk_name}.raw", work, "taken-over-vm", mode="verify", seed=seed,
                  then="churn", gens=churn_to, cache=args.cache, accel=args.accel).start()
    poll(lambda: "up" in guest.lines() or guest.exited(), BOOT, "the taken-over guest to boot")
    say(f"guest up (kernel booted, disk found) {time.monotonic() - t0:.1f} s after the failover began")
    res = poll(lambda: guest.result("verify") or (guest.exited() and {"status": "QEMU exited"}), BOOT,
               "the taken-over guest's verification")
    if res["status"] != "ok":
        raise RuntimeError(f"the taken-over guest did not verify: {res} {guest.describe()}")
    gen = int(res["gen"])
    if res["manifest"] != manifest_digest(seed, gen):
        raise RuntimeError(f"the disk holds generation {gen} but not its exact files: {res}")
    say(f"guest booted from the failed-over file: e2fsck clean, generation {gen} exact "
        f"(manifest {res['manifest'][:16]}...), {time.monotonic() - t0:.1f} s after the failover began")
    return guest, res, t_failover


def cmd_secondary(args: argparse.Namespace) -> int:
    ensure_mounted(args, "secondary")
    mnt = Path(args.mnt)
    img = build()
    gone = await_loss(mnt, args.vm, args.grace)
    say(f"{args.vm}: the primary is lost ({time.monotonic() - gone:.1f} s ago); taking over")
    guest, res, _ = take_over(img, mnt, args.vm, args.disk, Path(args.workdir or tempfile.mkdtemp(prefix="protect-")),
                              args.seed, args, churn_to=0)
    say(f"the guest runs on as the new primary (generation {res['gen']} verified); Ctrl-C stops it")
    try:
        poll(lambda: guest.exited(), 10 ** 9, "the guest to end", 1.0)
    except KeyboardInterrupt:
        guest.close()
    return 0


# -- everything on one machine ---------------------------------------------------------------------

class LoopbackPair(Pair):
    """The harness's pair (mountctl.pair) under a fresh directory in /var/tmp, plus the guests running on it;
    ``close`` kills the guests, unmounts (detaching a dead daemon's mount) and removes the directory
    unless kept."""

    def __init__(self, prefix: str) -> None:
        super().__init__(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
        self.base = self.work
        self.sec, self.pri = self.secondary.mnt, self.primary.mnt
        self.guests: list[Guest] = []

    def start_with(self, size: str) -> None:
        self.start()
        say(f"pair mounted: secondary {self.sec} (127.0.0.1:{self.port}), primary {self.pri}")
        self.primary.create("vm1", size, "disk0")  # type: ignore[arg-type]  # mountctl parses "64M"
        self.wait_disk("vm1", "disk0", timeout=60)

    def kill_primary_daemon(self) -> None:
        self.primary.kill()

    def close(self, keep: bool) -> None:
        for g in self.guests:
            g.close()
        self.cleanup()
        if keep:
            say(f"kept {self.base}")
        else:
            subprocess.run(["rm", "-rf", str(self.base)], check=False)


def cmd_demo(args: argparse.Namespace) -> int:
    img = build()
    pair = LoopbackPair("colofs-protect-")
    sec, pri = pair.sec, pair.pri
    ok = False
    try:
        pair.start_with(args.size)
        guest = start_primary_guest(img, pri / "vm1" / "disk0.raw", pair.base / "guests", args.seed, args)
        pair.guests.append(guest)
        prot = Protector(guest, pri / "vm1", args.timeout)
        prot.run(args.interval, args.checkpoints)
        say(prot.summary())
        lo = prot.confirmed_gen
        # Let the guest run past the last checkpoint, and the secondary receive those writes:
        # the failover must discard them.
        poll(lambda: guest.gen() >= lo + 2, BOOT, "two generations past the last checkpoint")
        target = vm_status(pri, "vm1")["last_applied"]
        poll(lambda: vm_status(sec, "vm1").get("last_applied", -1) >= target, 60, "the secondary to catch up")
        say(f"guest at generation {guest.gen()}, last confirmed checkpoint at {lo}: "
            "kill -9 of the primary daemon and QEMU")
        t_kill = time.monotonic()
        pair.kill_primary_daemon()
        guest.kill9()
        gone = await_loss(sec, "vm1", args.grace, wait_connect=False)
        say(f"loss of the primary seen {gone - t_kill:.2f} s after the kill")
        new, res, t_failover = take_over(img, sec, "vm1", "disk0", pair.base / "guests", args.seed, args,
                                         churn_to=lo + 4)
        pair.guests.append(new)
        gen = int(res["gen"])
        if not lo <= gen <= lo + 1:
            raise RuntimeError(f"the failed-over disk holds generation {gen}, the last confirmed checkpoint {lo}")
        t_booted = time.monotonic() - t_kill
        churn = poll(lambda: new.result("churn") or (new.exited() and {"status": "QEMU exited"}), BOOT,
                     "the new primary's guest to write on")
        if churn["status"] != "ok" or churn.get("manifest") != manifest_digest(args.seed, lo + 4):
            raise RuntimeError(f"the new primary's guest failed to write on: {churn} {new.describe()}")
        say(f"RESULT ok: {prot.summary()}; after the kill: failover {t_failover:.2f} s, guest booted "
            f"and verified {t_booted:.1f} s; generation {gen} of the last confirmed checkpoint exact, "
            f"e2fsck clean; the guest wrote on to generation {lo + 4} as the new primary")
        ok = True
    except (RuntimeError, TimeoutError, CtlError, PairError) as e:
        say(f"RESULT failed: {e}")
    except KeyboardInterrupt:
        say("interrupted")
    finally:
        pair.close(args.keep)
    return 0 if ok else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: guests killed, mounts released


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", metavar="{demo,primary,secondary}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=int, default=42, help="content seed of the guest's files (both hosts alike)")
        p.add_argument("--accel", default="tcg", help="QEMU accelerator, e.g. tcg or kvm:tcg (default %(default)s)")
        p.add_argument("--cache", default="none", help="QEMU -drive cache mode (default %(default)s)")
        p.add_argument("--size", default="64M", help="disk size when it is created (default %(default)s)")
        p.add_argument("--interval", type=float, default=1.0, help="seconds between checkpoints (default %(default)s)")
        p.add_argument("--checkpoints", type=int, default=10,
                       help="checkpoints before the demo kills the primary (primary: 0 = forever; default %(default)s)")
        p.add_argument("--timeout", type=float, default=30, help="seconds a checkpoint may wait for the secondary")
        p.add_argument("--grace", type=float, default=1.0,
                       help="seconds the primary must stay disconnected before the secondary takes over")
        p.add_argument("--workdir", help="where the guests' consoles and QMP sockets go (default: a temp dir)")

    def host(p: argparse.ArgumentParser) -> None:
        p.add_argument("--mnt", required=True, help="the colofs mountpoint")
        p.add_argument("--store", help="store directory: mount it unless --mnt is mounted")
        p.add_argument("--key-file", type=Path, help="shared key of the pair (0600)")
        p.add_argument("--vm", default="vm1")
        p.add_argument("--disk", default="disk0")

    d = sub.add_parser("demo", help="the whole cycle on loopback (default)")
    common(d)
    d.add_argument("--keep", action="store_true", help="keep the stores and consoles under /var/tmp")
    p = sub.add_parser("primary", help="run and protect the guest on this (production) host")
    common(p)
    host(p)
    p.add_argument("--peer", help="HOST:PORT of the secondary (when mounting)")
    s = sub.add_parser("secondary", help="stand by on this (backup) host; take over on loss of the primary")
    common(s)
    host(s)
    s.add_argument("--listen", help="HOST:PORT to wait for the primary on (when mounting)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("demo", "primary", "secondary", "-h", "--help"):
        argv.insert(0, "demo")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("protect_vm.py needs root (FUSE mounts, QEMU on them)")
    return {"demo": cmd_demo, "primary": cmd_primary, "secondary": cmd_secondary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
