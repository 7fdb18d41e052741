"""What every benchmark asks of the machine: run a tool, drop the page cache, read a daemon's CPU time.

Sizes on the command line are parsed by :func:`mountctl.units.parse_size`
(the operator's own syntax), and mounts, ports and key files come from
:mod:`mountctl.pair`; this module holds the rest the benchmarks share.

The scripts in ``bench/`` run as ``python bench/NAME.py``; each puts the
repository on ``sys.path`` first so that ``bench.host`` imports the same way
from a script, from ``python -m bench.compare`` and from the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20
GiB = 1 << 30


class StepError(Exception):
    """A step of a benchmark failed; the message says what and why (a table row shows it as the reason)."""


def _tail(text: str, lines: int = 4) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def run(argv: Sequence[str], *, timeout: float, check: bool = True, cwd: str | os.PathLike[str] | None = REPO,
        stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; StepError (with its output's tail) on failure or timeout.

    Every external command has a timeout, so one stuck tool fails its step
    instead of hanging the whole run.
    """
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False,
                             cwd=cwd, stdin=stdin)
    except subprocess.TimeoutExpired:
        raise StepError(f"{os.path.basename(argv[0])} timed out after {timeout:.0f} s") from None
    except OSError as e:
        raise StepError(f"{argv[0]}: {e.strerror}") from None
    if check and res.returncode != 0:
        detail = _tail(res.stderr) or _tail(res.stdout)
        raise StepError(f"{os.path.basename(argv[0])} {argv[1] if len(argv) > 1 else ''} exited "
                        f"{res.returncode}: {detail}")
    return res


def sh(*cmd: str, timeout: float = 900) -> str:
    """A command's output, for the scripts: a failure ends the script with the command's complaint."""
    try:
        return run(cmd, timeout=timeout).stdout
    except StepError as e:
        raise SystemExit(str(e)) from None


def drop_caches() -> None:
    """``sync; echo 3 > drop_caches``: every measurement starts without page-cache help."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (its threads included), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def require_root(*tools: str) -> None:
    """End the script unless it runs as root with ``tools`` installed (dropping caches and FUSE need root)."""
    if os.geteuid() != 0:
        raise SystemExit("run as root: it drops page caches and mounts FUSE")
    for tool in tools:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing")


def fio_job(stdout: str) -> dict:
    """The first job of fio's ``--output-format=json`` (engines may print lines before the JSON)."""
    start = stdout.find("{")
    if start < 0:
        raise StepError(f"fio printed no JSON: {stdout.strip()[:200]}")
    try:
        job = json.loads(stdout[start:])["jobs"][0]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise StepError(f"fio JSON not understood: {e}") from None
    if job.get("error"):
        raise StepError(f"fio job error {job['error']}")
    return job
