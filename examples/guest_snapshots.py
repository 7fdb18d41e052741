"""Snapshots of a running, protected VM: a fleecing backup booted, and a clone booted beside the VM.

On one machine (as root, with the repository's venv python): a colofs pair on 127.0.0.1, the test
guest (``examples/guest``) writing on the primary and checkpointed every second by the Remus-style
protector (``protect_vm.py``). Then, while it keeps running:

  1. fleecing: on the secondary, a snapshot of the last checkpoint (no I/O on the primary's host),
     copied with ``qemu-img convert -O qcow2`` while the guest writes on and the pair checkpoints
     again; the copy is booted and must hold exactly that checkpoint's files, e2fsck clean;
  2. a writable clone of the primary's disk, taken with the guest paused for an instant, booted as
     a second guest that verifies the files and writes on, while the first guest keeps running.

Prints what each step found; exits 1 if a check fails. Everything is unmounted and removed at the
end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

from protect_vm import (
    BOOT,
    LoopbackPair,
    Protector,
    _interrupt,
    mountctl,
    say,
    start_primary_guest,
)

from examples.guest.build import build
from examples.guest.manifest import manifest_digest
from examples.guest.qemu import Guest, poll


def boot_and_verify(guest: Guest, lo: int, seed: int, mode: str = "verify") -> int:
    """The guest's verified generation: lo or lo + 1 (announced or not when the image was taken)."""
    res = poll(lambda: guest.result(mode) or (guest.exited() and {"status": "QEMU exited"}), BOOT,
               f"{guest.name} to verify")
    if res["status"] != "ok":
        raise RuntimeError(f"{guest.name} did not verify: {res} {guest.describe()}")
    gen = int(res["gen"])
    if not lo <= gen <= lo + 1 or res["manifest"] != manifest_digest(seed, gen):
        raise RuntimeError(f"{guest.name} holds generation {gen} ({res['manifest'][:16]}), expected {lo}")
    return gen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--cache", default="none")
    ap.add_argument("--size", default="64M")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    img = build()
    pair = LoopbackPair("colofs-snapshots-")
    ok = False
    try:
        pair.start(args.size)
        guest = start_primary_guest(img, pair.pri / "vm1" / "disk0.raw", pair.base / "guests", args.seed, args)
        pair.guests.append(guest)
        prot = Protector(guest, pair.pri / "vm1", 30)
        prot.run(1.0, 3)

        # 1. fleecing backup on the secondary
        lo = prot.confirmed_gen
        say(mountctl("snapshot", pair.sec / "vm1" / "disk0", "backup"))
        poll(lambda: guest.gen() >= lo + 3, BOOT, "the guest to write on")
        prot.checkpoint()
        backup = pair.base / "backup.qcow2"
        t0 = time.monotonic()
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(pair.sec / "vm1" / "disk0@backup.raw"),
                        str(backup)], check=True, timeout=BOOT)
        say(f"qemu-img convert of the snapshot: {time.monotonic() - t0:.1f} s, while the guest wrote on "
            f"(now at generation {guest.gen()})")
        say(mountctl("snapshot", "--delete", pair.sec / "vm1" / "disk0", "backup"))
        bvm = Guest(img, backup, pair.base / "guests", "backup-vm", mode="verify", seed=args.seed,
                    fmt="qcow2", accel=args.accel).start()
        pair.guests.append(bvm)
        gen = boot_and_verify(bvm, lo, args.seed)
        say(f"the backup boots: e2fsck clean, generation {gen} of the checkpoint it was taken at, exact")

        # 2. a writable clone booted beside the running guest
        guest.stop()
        try:
            at = guest.gen()
            say(mountctl("clone", pair.pri / "vm1" / "disk0", "try"))
        finally:
            guest.cont()
        cvm = Guest(img, pair.pri / "vm1" / "disk0@try.raw", pair.base / "guests", "clone-vm", mode="verify",
                    seed=args.seed, then="churn", gens=at + 3, cache=args.cache, accel=args.accel).start()
        pair.guests.append(cvm)
        gen = boot_and_verify(cvm, at, args.seed)
        boot_and_verify(cvm, at + 2, args.seed, "churn")  # wrote on to at + 3
        prot.checkpoint()
        say(f"the clone boots beside the running guest: generation {gen} exact, then wrote on to {at + 3}; "
            f"the protected guest kept running meanwhile (generation {guest.gen()}) and was checkpointed again")
        say("RESULT ok")
        ok = True
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as e:
        say(f"RESULT failed: {e}")
    except KeyboardInterrupt:
        say("interrupted")
    finally:
        pair.close(args.keep)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
