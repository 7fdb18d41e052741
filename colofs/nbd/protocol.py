"""The NBD wire format: constants, and packing and parsing of every message colofs exchanges.

Only what the server needs: the fixed newstyle handshake (options and their
replies), the 28-byte compact request header, simple replies and structured
reply chunks. No I/O here, so the server and the test client share it and it
is tested without sockets.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# -- handshake -------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR | 1
REP_ERR_POLICY = _REP_ERR | 2
REP_ERR_INVALID = _REP_ERR | 3
REP_ERR_TLS_REQD = _REP_ERR | 5
REP_ERR_UNKNOWN = _REP_ERR | 6
REP_ERR_TOO_BIG = _REP_ERR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_CAN_MULTI_CONN = 1 << 8

# -- transmission ----------------------------------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1

# errors carried in replies (the protocol's own numbers, equal to Linux's)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

META_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

MAX_OPTION_LEN = 64 << 10  # longer option data is refused unread (no option needs more)
MAX_NAME_LEN = 4096
MAX_PAYLOAD = 32 << 20  # the largest READ or WRITE served, advertised as the maximum block size

GREETING = struct.Struct(">QQH")
OPTION_HEADER = struct.Struct(">QII")  # magic, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed (nothing more can be trusted on it)."""


@dataclass(frozen=True, slots=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def parse_request(buf: bytes | bytearray | memoryview, pos: int = 0) -> Request:
    magic, flags, typ, cookie, offset, length = REQUEST.unpack_from(buf, pos)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, typ, cookie, offset, length)


def read_requests(buf: bytes | bytearray | memoryview, limit: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of the read requests among the complete headers in ``buf``, at most ``limit``.

    Write payloads are skipped; the scan stops at a wrong magic. Nothing is
    checked or answered: a look ahead, the requests themselves are parsed
    and checked when they are served.
    """
    size = REQUEST.size
    unpack = REQUEST.unpack_from
    end = len(buf)
    pos = 0
    reads: list[tuple[int, int]] = []
    while end - pos >= size and len(reads) < limit:
        magic, _, typ, _, offset, length = unpack(buf, pos)
        if magic != REQUEST_MAGIC:
            break
        pos += size
        if typ == CMD_WRITE:
            pos += length
        elif typ == CMD_READ:
            reads.append((offset, length))
    return reads


def pack_request(typ: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, typ, cookie, offset, length)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, reply, len(data)) + data


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie: int, typ: int, payload_len: int, *, done: bool = True) -> bytes:
    """A structured reply chunk's header; its ``payload_len`` bytes follow."""
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, typ, cookie, payload_len)


def error_chunk(cookie: int, error: int, message: str) -> bytes:
    msg = message.encode()[:1024]
    body = _U32.pack(error) + _U16.pack(len(msg)) + msg
    return chunk(cookie, REPLY_TYPE_ERROR, len(body)) + body


def block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    body = bytearray(_U32.pack(context_id))
    for length, flags in extents:
        body += struct.pack(">II", length, flags)
    return chunk(cookie, REPLY_TYPE_BLOCK_STATUS, len(body)) + bytes(body)


def info_export(size: int, flags: int) -> bytes:
    return _U16.pack(INFO_EXPORT) + _U64.pack(size) + _U16.pack(flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return _U16.pack(INFO_BLOCK_SIZE) + struct.pack(">III", minimum, preferred, maximum)


def info_name(name: str) -> bytes:
    return _U16.pack(INFO_NAME) + name.encode()


def info_description(text: str) -> bytes:
    return _U16.pack(INFO_DESCRIPTION) + text.encode()


def server_entry(name: str, description: str = "") -> bytes:
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + description.encode()


def meta_context(context_id: int, name: str) -> bytes:
    return _U32.pack(context_id) + name.encode()


class Reader:
    """Bounds-checked parsing of option data: a short or malformed field is a :class:`ValueError`."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("option data is shorter than its fields say")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return int(_U16.unpack(self._take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def string(self, length: int) -> str:
        if length > MAX_NAME_LEN:
            raise ValueError(f"a name of {length} bytes is too long")
        try:
            return self._take(length).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("a name is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ValueError("option data is longer than its fields say")


def parse_go(data: bytes) -> tuple[str, list[int]]:
    """``NBD_OPT_GO``/``INFO`` data: the export name and the information types asked for."""
    r = Reader(data)
    name = r.string(r.u32())
    infos = [r.u16() for _ in range(r.u16())]
    r.end()
    return name, infos


def pack_go(name: str, infos: tuple[int, ...] | list[int] = ()) -> bytes:
    """``NBD_OPT_GO``/``INFO`` data (what :func:`parse_go` reads)."""
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + _U16.pack(len(infos)) + b"".join(_U16.pack(i) for i in infos)


def parse_meta_context(data: bytes) -> tuple[str, list[str]]:
    """``NBD_OPT_SET/LIST_META_CONTEXT`` data: the export name and the queries."""
    r = Reader(data)
    name = r.string(r.u32())
    count = r.u32()
    if count > 256:
        raise ValueError(f"{count} meta context queries")
    queries = [r.string(r.u32()) for _ in range(count)]
    r.end()
    return name, queries
