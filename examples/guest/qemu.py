"""Run the test guest under QEMU: one process per guest, its serial console in a file, QMP on a socket.

The guest reports through the serial console only (``COLOFS ...`` lines, see ``init.sh``);
:class:`Guest` parses them. :class:`Qmp` is a minimal synchronous QMP client: ``stop`` returns
once QEMU has paused the vCPUs and drained the guest's in-flight block I/O, which is what makes a
checkpoint taken right after it consistent with the paused VM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from examples.guest.build import GuestImage

T = TypeVar("T")
LINE = re.compile(rb"COLOFS ([^\r\n]*)\r?\n")
KERNEL_ARGS = "console=ttyS0 panic=-1 quiet printk.devkmsg=on mitigations=off"


def poll(pred: Callable[[], T], timeout: float, what: str, pace: float = 0.05) -> T:
    """Wait until ``pred()`` is truthy (bounded by ``timeout``; the pace is not an outcome)."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(pace)


class Qmp:
    """QMP over a unix socket: capabilities negotiated, commands answered in order, events kept."""

    def __init__(self, path: Path, timeout: float = 60) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP connection closed by QEMU")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self.sock.close()


class Guest:
    """One QEMU process running the test guest on one disk file."""

    def __init__(self, image: GuestImage, disk: Path, workdir: Path, name: str, *, mode: str,
                 seed: int, gens: int = 0, then: str | None = None, cache: str = "none",
                 accel: str = "tcg", memory: int = 256, fmt: str = "raw") -> None:
        self.image, self.disk, self.name = image, disk, name
        workdir.mkdir(parents=True, exist_ok=True)
        self.serial = workdir / f"{name}.serial"
        self.qmp_path = workdir / f"{name}.qmp"
        self.stderr_path = workdir / f"{name}.stderr"
        words = [KERNEL_ARGS, f"colofs.mode={mode}", f"colofs.seed={seed}", f"colofs.gens={gens}"]
        if then:
            words.append(f"colofs.then={then}")
        self.argv = [
            "qemu-system-x86_64", "-accel", accel, "-m", str(memory), "-smp", "1",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", " ".join(words),
            "-drive", f"file={disk},format={fmt},if=virtio,cache={cache}",
            "-serial", f"file:{self.serial}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: Qmp | None = None
        self.started = 0.0

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> Guest:
        for p in (self.serial, self.qmp_path):
            p.unlink(missing_ok=True)
        self.started = time.monotonic()
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        return self

    @property
    def qmp(self) -> Qmp:
        if self._qmp is None:
            poll(lambda: self.qmp_path.exists() or self.exited(), 60, f"the QMP socket of {self.name}")
            if self.exited():
                raise RuntimeError(f"QEMU ({self.name}) exited: {self.stderr()}")
            self._qmp = Qmp(self.qmp_path)
        return self._qmp

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def kill9(self) -> None:
        """Kill QEMU as a host crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._drop_qmp()

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        self._drop_qmp()
        return rc

    def close(self) -> None:
        """Ask QEMU to quit, kill it if it does not; idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.qmp.execute("quit")
                self.proc.wait(15)
            except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
                pass
        self.kill9()

    def _drop_qmp(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    # -- what the guest said ------------------------------------------------------------

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""

    def lines(self) -> list[str]:
        try:
            data = self.serial.read_bytes()
        except FileNotFoundError:
            return []
        return [m.group(1).decode(errors="replace") for m in LINE.finditer(data)]

    def gen(self) -> int:
        """The newest generation the guest announced (0 before the first)."""
        gens = [int(m.group(1)) for line in self.lines() if (m := re.fullmatch(r"gen=(\d+)", line))]
        return max(gens, default=0)

    def results(self) -> list[dict[str, str]]:
        """The guest's RESULT lines, each as ``{"status": "ok"|"fail", key: value...}``."""
        out = []
        for line in self.lines():
            if line.startswith("RESULT "):
                status, *pairs = line.split()[1:]
                out.append({"status": status, **dict(p.split("=", 1) for p in pairs if "=" in p)})
        return out

    def result(self, mode: str | None = None) -> dict[str, str] | None:
        """The RESULT of ``mode`` (``verify``, ``churn``; any if None) or a failure, once printed."""
        for r in self.results():
            if r["status"] != "ok" or mode is None or r.get("mode") == mode:
                return r
        return None

    def describe(self) -> str:
        """What to show when something went wrong: the guest's lines and QEMU's stderr."""
        return f"{self.name}: lines={self.lines()[-8:]} exited={self.exited()} stderr={self.stderr()!r}"

    # -- pausing --------------------------------------------------------------------------

    def stop(self) -> None:
        self.qmp.execute("stop")

    def cont(self) -> None:
        self.qmp.execute("cont")
