"""The values of control requests: parsing them, and refusing a request that is wrong as sent.

A ``setxattr`` carries its arguments as bytes (a name, a number, or a JSON
object). A value that cannot be used raises :class:`Refused` with the errno
to answer and the message ``last_error`` will show.
"""

from __future__ import annotations

import errno
import json
from typing import Any


class Refused(Exception):
    """A control request that is wrong as sent; ``code`` is the errno to answer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_json(value: bytes, op: str) -> dict[str, Any]:
    try:
        obj = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        raise Refused(errno.EINVAL, f"{op}: the value is not JSON") from None
    if not isinstance(obj, dict):
        raise Refused(errno.EINVAL, f"{op}: the value must be a JSON object")
    return obj


def int_field(obj: dict[str, Any], key: str, op: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if value is None:
        raise Refused(errno.EINVAL, f"{op}: {key!r} is missing")
    if not isinstance(value, int) or isinstance(value, bool):
        raise Refused(errno.EINVAL, f"{op}: {key!r} must be an integer")
    return value


def str_field(obj: dict[str, Any], key: str, op: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise Refused(errno.EINVAL, f"{op}: {key!r} must be a non-empty string")
    return value


def seconds_field(obj: dict[str, Any], key: str, op: str, limit: float) -> float | None:
    """An optional positive number of seconds, at most ``limit``."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= limit:
        raise Refused(errno.EINVAL, f"{op}: {key!r} must be a number of seconds from 0 to {limit:g}")
    return float(value)
