"""Which names VMs, disks and snapshots may have.

Names become directory names in the store and file names on the mount, and
``@`` separates a disk from its snapshots, so the alphabet is narrow.
"""

from __future__ import annotations

import re

from colofs.core.errors import InvalidName

MAX_NAME = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{kind} name is empty")
    if len(name.encode()) > MAX_NAME:
        raise InvalidName(f"{kind} name {name[:80]!r} is longer than {MAX_NAME} bytes")
    if not _NAME.fullmatch(name):
        raise InvalidName(
            f"{kind} name {name!r} may use only letters, digits, '.', '_' and '-', "
            "and must start with a letter or digit"
        )
    return name
