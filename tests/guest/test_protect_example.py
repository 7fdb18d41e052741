"""``examples/protect_vm.py`` documents itself (the full run boots two guests: see the README)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "protect_vm.py"


def test_protect_vm_help_documents_the_three_modes_and_the_two_host_command_lines() -> None:
    out = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    for word in ("demo", "primary", "secondary", "stop", "cont", "--peer", "--listen", "--key-file"):
        assert word in out, word
    sub = subprocess.run([sys.executable, str(EXAMPLE), "primary", "--help"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    for opt in ("--interval", "--mnt", "--store", "--peer", "--key-file", "--seed", "--accel"):
        assert opt in sub, opt
