"""The primitives of the message codec: field checks and a bounds-checked payload reader.

Checks raise ``TypeError``/``ValueError`` on construction; the reader raises
:class:`~colofs.wire.errors.MalformedMessage` for every shortfall, so nothing a
peer sends can make the decoder fail any other way.
"""

from __future__ import annotations

import struct

from colofs.wire.codes import MAX_STR_LEN, U64_MAX
from colofs.wire.errors import MalformedMessage

# --------------------------------------------------------------------------- checks


def check_uint(name: str, value: object, maximum: int) -> None:
    """Refuse anything but an int in ``0..maximum``."""
    # bool is an int subclass, but a True sequence number is always a bug.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise ValueError(f"{name} = {value} is outside 0..{maximum}")


def check_bytes(name: str, value: object, length: int | None = None) -> None:
    """Refuse anything but a flat byte buffer (of exactly ``length`` bytes if given)."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    if isinstance(value, memoryview) and not (
        value.itemsize == 1 and value.ndim == 1 and value.c_contiguous
    ):
        # len() of such a view counts items, not bytes: the length prefix would lie.
        raise TypeError(f"{name} must be a flat byte view, not format {value.format!r}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} is {len(value)} bytes, expected exactly {length}")


def check_str(name: str, value: object) -> bytes:
    """Validate a wire string and return its UTF-8 encoding."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    raw = value.encode("utf-8")  # lone surrogates raise UnicodeEncodeError (a ValueError)
    if len(raw) > MAX_STR_LEN:
        raise ValueError(f"{name} is {len(raw)} bytes of UTF-8, at most {MAX_STR_LEN} allowed")
    return raw


def check_name(name: str, value: object) -> bytes:
    """Validate an identifier that may end up as a file name on the peer."""
    raw = check_str(name, value)
    text = str(value)
    if not raw:
        raise ValueError(f"{name} must not be empty")
    if text in (".", "..") or "/" in text:
        raise ValueError(f"{name} {text!r} is not a valid name (no '/', '.' or '..')")
    for ch in text:
        if ord(ch) < 0x20 or ch == "\x7f":
            raise ValueError(f"{name} {text!r} contains control character {ord(ch):#04x}")
    return raw


def check_span(first_block: int, count: int) -> None:
    """Refuse a block range that would run past block 2**64 - 1."""
    if first_block + count > U64_MAX + 1:
        raise ValueError(f"{count} blocks from block {first_block} overflow u64")


def truncate_utf8(text: str, limit: int = MAX_STR_LEN) -> bytes:
    """Encode ``text`` as UTF-8 cut to at most ``limit`` bytes on a character boundary.

    Unencodable characters (lone surrogates from ``surrogateescape`` file names)
    become ``?`` so that reporting an error can never itself fail.
    """
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw
    cut = limit
    while cut > 0 and raw[cut] & 0xC0 == 0x80:  # raw[cut] continues a character
        cut -= 1
    return raw[:cut]


# --------------------------------------------------------------------------- decoding cursor


class Reader:
    """A bounds-checked cursor over a payload; every shortfall is a MalformedMessage."""

    __slots__ = ("buf", "end", "pos", "what")

    def __init__(self, buf: memoryview, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.what = what

    def need(self, n: int, item: str) -> None:
        left = self.end - self.pos
        if left < n:
            raise MalformedMessage(
                f"{self.what} payload truncated: {item} needs {n} bytes at offset "
                f"{self.pos}, only {left} left"
            )

    def unpack(self, st: struct.Struct, item: str) -> tuple:
        self.need(st.size, item)
        values = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return values

    def take(self, n: int, item: str) -> bytes:
        """The next ``n`` bytes, copied once out of the payload."""
        self.need(n, item)
        data = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return data

    def count(self, item: str, n: int, min_item_size: int) -> None:
        """Refuse a count that cannot possibly fit in what is left (before looping)."""
        left = self.end - self.pos
        if n * min_item_size > left:
            raise MalformedMessage(
                f"{self.what} claims {n} {item}, which needs at least {n * min_item_size} "
                f"bytes, but only {left} are left"
            )

    def finish(self) -> None:
        if self.pos != self.end:
            raise MalformedMessage(
                f"{self.what} payload has {self.end - self.pos} trailing bytes after "
                f"the {self.pos} bytes of the message"
            )


__all__ = [
    "Reader",
    "check_bytes",
    "check_name",
    "check_span",
    "check_str",
    "check_uint",
    "truncate_utf8",
]
