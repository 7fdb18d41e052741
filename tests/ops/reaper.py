"""Run a command as a child subreaper, so a daemon it leaves behind is reparented here and its exit seen.

``mount -t fuse.colofs`` starts the mount daemon through the helper, which
exits once the mount answers; the daemon is then orphaned. Run under this
wrapper (``python -m tests.ops.reaper CMD ...``), the orphan becomes this
process's child, so a test learns the daemon's real exit status after
``umount``. Prints one JSON line for the command (``{"rc": N, "out": ...}``),
then one per orphan that exits (``{"pid": P, "status": S}``), and exits once
none is left.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    print(json.dumps({"rc": res.returncode, "out": res.stdout + res.stderr}), flush=True)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        print(json.dumps({"pid": pid, "status": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
