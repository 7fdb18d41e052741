"""What the guest's disk must hold at each generation, computed on the host from the seed alone.

The guest (``init.sh``) writes generation ``g`` as five files in slot ``g % 5`` and a manifest of
generations ``g-3 .. g``; the content of every file is a function of (seed, gen, file). The guest
reports the SHA-256 of the manifest it verified; the host compares it with :func:`manifest_digest`,
so an image that is consistently old (or from another seed) fails, not only a damaged one.
"""

from __future__ import annotations

import hashlib

SIZES = (700, 3000, 40000, 250000, 1000000)
"""Bytes of the five files of a generation (sub-block, a few blocks, larger runs)."""
KEPT = 4
"""Generations a manifest lists: the newest and the three before it."""


def content(seed: int, gen: int, index: int) -> bytes:
    """The bytes of file ``index`` of generation ``gen``: ``yes LINE | head -c SIZE``."""
    line = f"colofs seed={seed} gen={gen} file={index}\n".encode()
    size = SIZES[index]
    return (line * (size // len(line) + 1))[:size]


def manifest(seed: int, gen: int) -> bytes:
    """The guest's ``/MANIFEST`` after generation ``gen`` (``sha256sum`` lines after a header)."""
    lines = [f"colofs-manifest seed={seed} gen={gen}\n"]
    for g in range(max(1, gen - KEPT + 1), gen + 1):
        for i in range(len(SIZES)):
            digest = hashlib.sha256(content(seed, g, i)).hexdigest()
            lines.append(f"{digest}  data/s{g % 5}/g{g}-f{i}\n")
    return "".join(lines).encode()


def manifest_digest(seed: int, gen: int) -> str:
    return hashlib.sha256(manifest(seed, gen)).hexdigest()
