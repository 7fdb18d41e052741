"""Field kinds of the message layouts: how each field is checked and laid out on the wire.

A record field is declared once, with :func:`~colofs.wire.layout.wire` and
one of these kinds: ``U8``/``U16``/``U32``/``U64``, ``BLOCK_SIZE``,
``FixedBytes(n)``, ``Text()``, ``Blob()``, ``Inline(Record)`` or
``ListOf(item, count)``.  Fixed-width kinds have a struct code; a variable
kind has the struct code of its length or count prefix (none for ``Inline``)
and writes and reads its content itself.  All integers are little-endian.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any

from colofs.wire.checks import Reader, check_bytes, check_name, check_str, check_uint, truncate_utf8
from colofs.wire.codes import MAX_STR_LEN, U16_MAX, U32_MAX, U64_MAX
from colofs.wire.errors import MalformedMessage

# --------------------------------------------------------------------------- field kinds


class Kind:
    """How one field is checked and laid out.

    ``code`` is the struct code of a fixed-width value, or of a variable
    field's length/count prefix ("" for none); ``min_size`` is the fewest
    bytes the field (prefix included) can take on the wire.
    """

    code: str = ""
    variable: bool = False
    min_size: int = 0
    to_wire: Callable[[Any], Any] | None = None  # conversion struct needs before packing

    def check(self, name: str, value: Any) -> Any:
        """Raise TypeError/ValueError for a bad value; return the value to store."""
        return value

    def put(self, value: Any, parts: list[Any]) -> int:
        """Append a variable field's content to ``parts``; return its length/count prefix."""
        raise NotImplementedError

    def get(self, r: Reader, n: int, name: str) -> Any:
        """Read a variable field's content, given its prefix ``n``."""
        raise NotImplementedError


class UInt(Kind):
    """An unsigned integer of a struct code's width."""

    def __init__(self, code: str, maximum: int) -> None:
        self.code = code
        self.maximum = maximum
        self.min_size = struct.calcsize("<" + code)

    def check(self, name: str, value: Any) -> Any:
        check_uint(name, value, self.maximum)
        return value


class _BlockSize(UInt):
    def check(self, name: str, value: Any) -> Any:
        check_uint(name, value, self.maximum)
        if value == 0 or value & (value - 1):
            raise ValueError(f"{name} = {value} is not a non-zero power of two")
        return value


U8 = UInt("B", 0xFF)
U16 = UInt("H", U16_MAX)
U32 = UInt("I", U32_MAX)
U64 = UInt("Q", U64_MAX)
BLOCK_SIZE = _BlockSize("I", U32_MAX)
"""A u32 that is a non-zero power of two."""


class FixedBytes(Kind):
    """Exactly ``length`` raw bytes, no prefix."""

    to_wire = bytes

    def __init__(self, length: int) -> None:
        self.length = length
        self.code = f"{length}s"
        self.min_size = length

    def check(self, name: str, value: Any) -> Any:
        check_bytes(name, value, self.length)
        return value


class Text(Kind):
    """UTF-8 of at most 255 bytes after a u16 length.

    ``name=True``: 1..255 bytes and usable as a file name on the peer (no
    ``/``, ``.``, ``..`` or control characters).  ``truncate=True``: any str,
    cut on a character boundary when encoded (for human-readable reports).
    """

    code = "H"
    variable = True

    def __init__(self, *, name: bool = False, truncate: bool = False) -> None:
        self.name = name
        self.truncate = truncate
        self.min_size = 2 + (1 if name else 0)

    def check(self, name: str, value: Any) -> Any:
        if self.truncate:
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, not {type(value).__name__}")
        elif self.name:
            check_name(name, value)
        else:
            check_str(name, value)
        return value

    def put(self, value: Any, parts: list[Any]) -> int:
        raw = truncate_utf8(value) if self.truncate else value.encode("utf-8")
        parts.append(raw)
        return len(raw)

    def get(self, r: Reader, n: int, name: str) -> Any:
        if n > MAX_STR_LEN:
            raise MalformedMessage(f"{r.what} {name} is {n} bytes long, at most {MAX_STR_LEN} allowed")
        try:
            return r.take(n, name).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedMessage(f"{r.what} {name} is not valid UTF-8: {exc}") from None


class Blob(Kind):
    """Bulk bytes after a u32 length; decoded as one copy out of the payload."""

    code = "I"
    variable = True
    min_size = 4

    def check(self, name: str, value: Any) -> Any:
        check_bytes(name, value)
        if len(value) > U32_MAX:
            raise ValueError(f"{name} of {len(value)} bytes exceeds {U32_MAX}")
        return value

    def put(self, value: Any, parts: list[Any]) -> int:
        parts.append(value)
        return len(value)

    def get(self, r: Reader, n: int, name: str) -> Any:
        return r.take(n, name)


class Inline(Kind):
    """Another record's fields in place, with no prefix (``cls`` is built by ``record``)."""

    variable = True

    def __init__(self, cls: type[Any]) -> None:
        self.cls = cls
        self.min_size = cls.LAYOUT.min_size

    def check(self, name: str, value: Any) -> Any:
        if not isinstance(value, self.cls):
            raise TypeError(f"{name} must be a {self.cls.__name__}, not {type(value).__name__}")
        return value

    def put(self, value: Any, parts: list[Any]) -> int:
        value.LAYOUT.put(value, parts)
        return 0

    def get(self, r: Reader, n: int, name: str) -> Any:
        return self.cls._decode(r)


class ListOf(Kind):
    """A tuple of records or of unsigned ints, after a count of width ``count``.

    Any iterable is accepted on construction and frozen into a tuple.
    """

    variable = True

    def __init__(self, item: type[Any] | UInt, count: UInt) -> None:
        self.item = item
        self.count = count
        self.code = count.code
        self.min_size = count.min_size
        self.item_size = item.min_size if isinstance(item, UInt) else item.LAYOUT.min_size

    def check(self, name: str, value: Any) -> Any:
        if not isinstance(value, tuple):
            if not isinstance(value, Iterable) or isinstance(value, str | bytes):
                raise TypeError(f"{name} must be a sequence")
            value = tuple(value)
        n = len(value)
        if n > self.count.maximum:
            raise ValueError(f"{n} {name}, at most {self.count.maximum} allowed")
        item = self.item
        if isinstance(item, UInt):
            if n:
                if not all(type(v) is int for v in value):
                    raise TypeError(f"{name} must be ints")
                if min(value) < 0 or max(value) > item.maximum:
                    raise ValueError(f"one of the {name} is outside 0..{item.maximum}")
        else:
            for v in value:
                if not isinstance(v, item):
                    raise TypeError(f"{name} items must be {item.__name__}, not {type(v).__name__}")
        return value

    def put(self, value: Any, parts: list[Any]) -> int:
        item = self.item
        if isinstance(item, UInt):
            parts.append(struct.pack(f"<{len(value)}{item.code}", *value))
        else:
            for v in value:
                v.LAYOUT.put(v, parts)
        return len(value)

    def get(self, r: Reader, n: int, name: str) -> Any:
        r.count(name, n, self.item_size)
        item = self.item
        if isinstance(item, UInt):
            values = struct.unpack_from(f"<{n}{item.code}", r.buf, r.pos)
            r.pos += n * self.item_size
            return values
        decode = item._decode
        return tuple(decode(r) for _ in range(n))


__all__ = [
    "BLOCK_SIZE",
    "U8",
    "U16",
    "U32",
    "U64",
    "Blob",
    "FixedBytes",
    "Inline",
    "Kind",
    "ListOf",
    "Text",
    "UInt",
]
