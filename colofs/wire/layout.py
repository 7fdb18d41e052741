"""Declarative message layouts: each field is described once; checks, encoding and decoding follow.

A record is a frozen, slotted dataclass built by :func:`record`, whose every
field is declared with :func:`wire` and a kind from :mod:`~colofs.wire.fields`.
The declaration order is the wire order, and:

* consecutive fixed-width fields are packed by one ``struct.Struct``;
* a variable field (string, blob, list) adds its length or count as the last
  item of that struct, and its content follows right after it;
* an ``Inline`` record is its own fields, with no prefix.

Construction runs each kind's check (type and range), then the record's
``_check`` for rules across fields, so a record that exists is valid; the
decoder builds records through the same constructors.
"""

from __future__ import annotations

import dataclasses
import operator
import struct
from collections.abc import Callable
from typing import Any, ClassVar, Self, dataclass_transform

from colofs.wire.checks import Reader, check_uint
from colofs.wire.codes import MessageType
from colofs.wire.fields import Kind, UInt


def _tuple_getter(names: tuple[str, ...]) -> Callable[[object], tuple]:
    """A function returning the named attributes of an object as a tuple."""
    if len(names) == 1:
        one = operator.attrgetter(names[0])
        return lambda obj: (one(obj),)
    if names:
        return operator.attrgetter(*names)
    return lambda obj: ()


class _Step:
    """One struct of fixed fields, optionally ending in a variable field's prefix and content."""

    __slots__ = ("convert", "get", "label", "st", "var")

    def __init__(self, codes: str, fixed: list[tuple[str, Kind]],
                 var: tuple[str, Kind, str] | None) -> None:
        self.st = struct.Struct("<" + codes) if codes else None
        self.get = _tuple_getter(tuple(name for name, _ in fixed))
        self.convert = tuple((i, k.to_wire) for i, (_, k) in enumerate(fixed) if k.to_wire)
        self.var = var
        items = [name for name, _ in fixed]
        if var is not None and var[1].code:
            items.append(f"{var[2]} length")
        self.label = "/".join(items)


class Layout:
    """The wire layout of one record type, compiled from its fields."""

    def __init__(self, what: str, fields: list[tuple[str, Kind, str]]) -> None:
        self.what = what
        self.fields = fields
        # Plain unsigned ints are checked inline by Record.__post_init__ (most fields are).
        self.uints = tuple((n, k.maximum, lb) for n, k, lb in fields if type(k) is UInt)
        self.others = tuple((n, k, lb) for n, k, lb in fields if type(k) is not UInt)
        self.steps: list[_Step] = []
        codes, fixed = "", []
        for name, kind, label in fields:
            if kind.variable:
                self.steps.append(_Step(codes + kind.code, fixed, (name, kind, label)))
                codes, fixed = "", []
            else:
                codes += kind.code
                fixed.append((name, kind))
        if fixed:
            self.steps.append(_Step(codes, fixed, None))
        self.min_size = sum(kind.min_size for _, kind, _ in fields)

    @property
    def head(self) -> struct.Struct:
        """The struct of the first fixed fields (and prefix), for hand-tuned codecs."""
        st = self.steps[0].st
        assert st is not None
        return st

    def put(self, obj: object, parts: list[Any]) -> None:
        """Append ``obj``'s encoding to ``parts``."""
        for step in self.steps:
            values = step.get(obj)
            if step.convert:
                values = list(values)
                for i, conv in step.convert:
                    values[i] = conv(values[i])
            if step.var is None:
                parts.append(step.st.pack(*values))  # type: ignore[union-attr]
                continue
            name, kind, _ = step.var
            if step.st is None:
                kind.put(getattr(obj, name), parts)
                continue
            slot = len(parts)
            parts.append(b"")
            n = kind.put(getattr(obj, name), parts)
            parts[slot] = step.st.pack(*values, n) if kind.code else step.st.pack(*values)

    def read(self, r: Reader) -> list[Any]:
        """Decode the fields' values, in order, from ``r``."""
        args: list[Any] = []
        for step in self.steps:
            values = r.unpack(step.st, step.label) if step.st is not None else ()
            if step.var is None:
                args.extend(values)
                continue
            _, kind, label = step.var
            if kind.code:
                args.extend(values[:-1])
                args.append(kind.get(r, values[-1], label))
            else:
                args.extend(values)
                args.append(kind.get(r, 0, label))
        return args

    def encoder(self) -> Callable[[Any], bytes]:
        """The ``encode`` method for records of this layout."""
        if len(self.steps) == 1 and self.steps[0].var is None and not self.steps[0].convert:
            pack, get = self.steps[0].st.pack, self.steps[0].get  # type: ignore[union-attr]
            return lambda obj: pack(*get(obj))  # fixed fields only: one struct
        if not self.steps:
            return lambda obj: b""

        def encode(obj: Any) -> bytes:
            parts: list[Any] = []
            self.put(obj, parts)
            return b"".join(parts)

        return encode

    def decoder(self) -> Callable[[Any, Reader], Any]:
        """The ``_decode`` class method body for records of this layout."""
        if len(self.steps) == 1 and self.steps[0].var is None:
            st, label = self.steps[0].st, self.steps[0].label
            return lambda cls, r: cls(*r.unpack(st, label))  # fixed fields only: one struct
        return lambda cls, r: cls(*self.read(r))


def wire(kind: Kind, *, default: Any = dataclasses.MISSING, label: str | None = None) -> Any:
    """Declare a record field of wire kind ``kind``; ``label`` names it in error messages."""
    return dataclasses.field(default=default, metadata={"kind": kind, "label": label})


@dataclass_transform(frozen_default=True, field_specifiers=(wire,))
def record(cls: type | None = None, /, *, repr: bool = True) -> Any:
    """Make ``cls`` a frozen, slotted dataclass and derive its checks and codec from its fields.

    An ``encode`` or ``_decode`` written in the class body is kept (a hand-tuned
    hot path); otherwise both come from the layout.
    """

    def build(c: type) -> type:
        own = set(c.__dict__)
        c = dataclasses.dataclass(frozen=True, slots=True, repr=repr)(c)
        what = c.TYPE.name if isinstance(getattr(c, "TYPE", None), MessageType) else c.__name__
        specs = []
        for f in dataclasses.fields(c):
            if "kind" not in f.metadata:
                raise TypeError(f"{c.__name__}.{f.name} is not declared with wire()")
            specs.append((f.name, f.metadata["kind"], f.metadata["label"] or f.name))
        layout = Layout(what, specs)
        c.LAYOUT = layout  # type: ignore[attr-defined]
        if "encode" not in own:
            c.encode = layout.encoder()  # type: ignore[attr-defined]
        if "_decode" not in own:
            c._decode = classmethod(layout.decoder())  # type: ignore[attr-defined]
        return c

    return build if cls is None else build(cls)


def trusted_builder(cls: type) -> Callable[..., Any]:
    """A constructor for ``cls`` that skips its checks, for hand-tuned decoders only.

    Decoding thousands of small records is dominated by per-object overhead;
    a decoder that has already range-checked the values inline (struct widths,
    lengths within the payload) builds them with this, three times faster than
    the dataclass constructor.
    """
    setters = [cls.__dict__[f.name].__set__ for f in dataclasses.fields(cls)]
    new = object.__new__
    if len(setters) == 2:  # unrolled: this is the whole point
        set_a, set_b = setters

        def build2(a: Any, b: Any) -> Any:
            obj = new(cls)
            set_a(obj, a)
            set_b(obj, b)
            return obj

        return build2
    if len(setters) == 3:
        set_a, set_b, set_c = setters

        def build3(a: Any, b: Any, c: Any) -> Any:
            obj = new(cls)
            set_a(obj, a)
            set_b(obj, b)
            set_c(obj, c)
            return obj

        return build3
    raise TypeError(f"trusted_builder does not unroll {len(setters)} fields of {cls.__name__}")


class Record:
    """Base of the wire records: validation, encoding and decoding come from ``LAYOUT``."""

    __slots__ = ()
    LAYOUT: ClassVar[Layout]

    def __post_init__(self) -> None:
        layout = self.LAYOUT
        for name, maximum, label in layout.uints:
            v = getattr(self, name)
            if type(v) is not int or v < 0 or v > maximum:
                check_uint(label, v, maximum)  # raises, or accepts an int subclass
        for name, kind, label in layout.others:
            value = getattr(self, name)
            checked = kind.check(label, value)
            if checked is not value:
                object.__setattr__(self, name, checked)
        self._check()

    def _check(self) -> None:
        """Rules that span several fields; raise ValueError (or TypeError)."""

    # record() replaces both with functions specialised to the layout.
    def encode(self) -> bytes:
        """Return the wire encoding (for a message: the frame payload, before compression)."""
        raise NotImplementedError(f"{type(self).__name__} is not built by record()")

    @classmethod
    def _decode(cls, r: Reader) -> Self:
        raise NotImplementedError(f"{cls.__name__} is not built by record()")


class Message(Record):
    """Base of all messages: ``TYPE`` is the frame type, ``encode()`` the payload."""

    __slots__ = ()
    TYPE: ClassVar[MessageType]


__all__ = [
    "Layout",
    "Message",
    "Record",
    "record",
    "trusted_builder",
    "wire",
]
