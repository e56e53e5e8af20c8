"""Hypothesis strategies for any protobuf message, built from its descriptor, drawn as the bytes a client sends.

Drawn as wire bytes rather than built through the Python classes, which refuse some of what a client in another
language (or a broken one) can send: every field any value of its type, both members of a oneof at once (the last
wins), an enum number the proto does not name, repeated fields packed or not, unknown fields, strings with NULs, huge
strings and bytes, and strings that are not UTF-8 at all (a lone surrogate encoded as if it were a character), which
a server must refuse as bad input. `values` narrows what a field draws (keyed by its full name) where the service
under test would otherwise spend its time on a value that says nothing new (a thousand tokens to generate).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

F = FieldDescriptor
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
# Text as a caller means it (NULs, controls and every plane included), or a lot of it.
TEXT = st.text(max_size=24)
HUGE_TEXT = st.builds(lambda c, n: c * n, st.characters(), st.integers(1_000, 100_000))
# Bytes a string field holds that are not UTF-8: a lone surrogate as UTF-8 would spell it, a stray byte, a cut one.
NOT_UTF8 = st.sampled_from([b"\xed\xa0\x80", b"a\xed\xbf\xbfb", b"\xff", b"\xc3", b"ok\x80", b"\xf4\x90\x80\x80"])
BYTES = st.binary(max_size=64)
HUGE_BYTES = st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=4), st.integers(1_000, 100_000))
# One string or bytes field in this many is huge, and one string in this many not UTF-8.
RARE = 25
# The largest message drawn: a quarter of a server's default limit (a larger one is gRPC's own refusal, no handler's).
MAX_BYTES = 4 << 20
# Field numbers no message here uses, sent as unknown fields.
UNKNOWN_FIELDS = st.lists(st.tuples(st.integers(1000, 2000), st.binary(max_size=8)), max_size=2)


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 are sent as their 64-bit two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, data: bytes) -> bytes:
    return tag(number, LENGTH) + varint(len(data)) + data


def _zigzag(value: int, bits: int) -> int:
    return (value << 1) ^ (value >> (bits - 1))


# type -> (wire type, values, encoding of one value)
_SCALARS = {
    F.TYPE_INT32: (VARINT, INT32, varint),
    F.TYPE_INT64: (VARINT, INT64, varint),
    F.TYPE_UINT32: (VARINT, UINT32, varint),
    F.TYPE_UINT64: (VARINT, UINT64, varint),
    F.TYPE_SINT32: (VARINT, INT32, lambda v: varint(_zigzag(v, 32))),
    F.TYPE_SINT64: (VARINT, INT64, lambda v: varint(_zigzag(v, 64))),
    F.TYPE_BOOL: (VARINT, st.booleans(), lambda v: varint(int(v))),
    F.TYPE_ENUM: (VARINT, INT32, varint),  # proto3 enums are open: any number parses
    F.TYPE_FIXED32: (FIXED32, UINT32, lambda v: struct.pack("<I", v)),
    F.TYPE_SFIXED32: (FIXED32, INT32, lambda v: struct.pack("<i", v)),
    F.TYPE_FLOAT: (FIXED32, st.floats(width=32), lambda v: struct.pack("<f", v)),
    F.TYPE_FIXED64: (FIXED64, UINT64, lambda v: struct.pack("<Q", v)),
    F.TYPE_SFIXED64: (FIXED64, INT64, lambda v: struct.pack("<q", v)),
    F.TYPE_DOUBLE: (FIXED64, st.floats(), lambda v: struct.pack("<d", v)),
}


def _rare(draw) -> bool:
    return draw(st.integers(0, RARE - 1)) == RARE // 2  # not an end: hypothesis favours the ends of a range


def _enum_values(field: FieldDescriptor) -> st.SearchStrategy[int]:
    """Mostly the numbers the enum names; sometimes any (an unknown value)."""
    named = st.sampled_from([value.number for value in field.enum_type.values])
    return st.one_of(named, named, named, INT32)


class MessageBytes:
    """Draws the bytes of messages of any type, the types' fields narrowed by `values` and their repeated sizes by
    `sizes` (both keyed by a field's full name, e.g. `internvl.common.v1.SamplingParams.max_new_tokens`)."""

    def __init__(self, values: Mapping[str, st.SearchStrategy] = {}, sizes: Mapping[str, st.SearchStrategy] = {},
                 max_repeated: int = 4, max_depth: int = 4):
        self.values = dict(values)
        self.sizes = dict(sizes)
        self.max_repeated = max_repeated
        self.max_depth = max_depth

    def of(self, descriptor: Descriptor) -> st.SearchStrategy[bytes]:
        """Messages of `descriptor`'s type drawn whole."""
        return st.composite(lambda draw: self._message(draw, descriptor, 0))().filter(lambda m: len(m) <= MAX_BYTES)

    def mutated(self, descriptor: Descriptor, seeds: list[bytes], max_fields: int = 2) -> st.SearchStrategy[bytes]:
        """A valid message of `seeds` with up to `max_fields` fields, anywhere in its tree, drawn anew: each sent after
        it wrapped in its parents, which protobuf merges into the seed (a scalar replaced, a repeated field or map
        one item longer, a message field merged). So the drawn value meets the checks past the first."""
        paths = list(_paths(descriptor, self.max_depth))
        if not paths:  # a message without fields: only its unknown fields can change
            return st.tuples(st.sampled_from(seeds), UNKNOWN_FIELDS).map(
                lambda drawn: drawn[0] + b"".join(length_delimited(n, d) for n, d in drawn[1]))

        @st.composite
        def draw_mutated(draw) -> bytes:
            out = bytearray(draw(st.sampled_from(seeds)))
            for path in draw(st.lists(st.sampled_from(paths), min_size=1, max_size=max_fields)):
                data = self._field(draw, path[-1], len(path))
                for parent in reversed(path[:-1]):
                    data = length_delimited(parent.number, data)
                out += data
            return bytes(out)

        return draw_mutated().filter(lambda m: len(m) <= MAX_BYTES)

    def _message(self, draw, descriptor: Descriptor, depth: int, small: bool = False) -> bytes:
        # Each real oneof gets none or one of its members, now and then two (both on the wire: the last wins).
        chosen: set[str] = set()
        for oneof in descriptor.oneofs:
            members = [f.name for f in oneof.fields]
            if len(members) == 1 and oneof.name == "_" + members[0]:  # proto3 `optional`: a oneof of its own
                if draw(st.booleans()):
                    chosen.update(members)
                continue
            count = draw(st.sampled_from([1] * 8 + [0, 2]))  # mostly one: a request that gets past the first check
            chosen.update(draw(st.lists(st.sampled_from(members), min_size=min(count, len(members)),
                                        max_size=min(count, len(members)), unique=True)))
        out = bytearray()
        for field in descriptor.fields:
            if field.containing_oneof is not None and field.name not in chosen:
                continue
            if not field.is_repeated and field.containing_oneof is None and not draw(st.booleans()):
                continue  # a singular field left at its default, which proto3 does not send
            out += self._field(draw, field, depth, small)
        for number, data in draw(UNKNOWN_FIELDS):
            out += length_delimited(number, data)
        return bytes(out)

    def _field(self, draw, field: FieldDescriptor, depth: int, small: bool = False) -> bytes:
        """The field's bytes; `small`: nothing huge in them (they are sent many times)."""
        if field.is_repeated:
            size = self.sizes.get(field.full_name, st.integers(0, self.max_repeated))
            count = draw(size) if field.type != F.TYPE_MESSAGE or depth < self.max_depth else 0
            if count > self.max_repeated:  # one small item many times: a size past a limit, without drawing each
                items = [self._value(draw, field, depth, small=True)] * count
            else:
                items = [self._value(draw, field, depth, small) for _ in range(count)]
            if field.type in _SCALARS and items and draw(st.booleans()):  # packed, as proto3 sends them
                encode = _SCALARS[field.type][2]
                return length_delimited(field.number, b"".join(encode(v) for v in items))
            return b"".join(self._encoded(field, item) for item in items)
        if field.type == F.TYPE_MESSAGE and depth >= self.max_depth:
            return length_delimited(field.number, b"")
        return self._encoded(field, self._value(draw, field, depth, small))

    def _value(self, draw, field: FieldDescriptor, depth: int, small: bool = False):
        if field.full_name in self.values:
            value = draw(self.values[field.full_name])
        elif field.type == F.TYPE_MESSAGE:
            return self._message(draw, field.message_type, depth + 1, small)
        elif field.type == F.TYPE_STRING:
            if _rare(draw):
                return draw(NOT_UTF8)
            return draw(HUGE_TEXT if _rare(draw) and not small else TEXT).encode()
        elif field.type == F.TYPE_BYTES:
            return draw(HUGE_BYTES if _rare(draw) and not small else BYTES)
        elif field.type == F.TYPE_ENUM:
            return draw(_enum_values(field))
        else:
            return draw(_SCALARS[field.type][1])
        return value.encode() if isinstance(value, str) else value

    def _encoded(self, field: FieldDescriptor, value) -> bytes:
        if field.type in (F.TYPE_MESSAGE, F.TYPE_STRING, F.TYPE_BYTES):
            return length_delimited(field.number, value)
        wire, _, encode = _SCALARS[field.type]
        return tag(field.number, wire) + encode(value)


def _paths(descriptor: Descriptor, depth: int, parents: tuple = ()):
    """Every field of `descriptor` and of its message fields, `depth` levels down, as the path to it."""
    for field in descriptor.fields:
        path = (*parents, field)
        yield path
        if field.type == F.TYPE_MESSAGE and depth > 1 and not field.message_type.GetOptions().map_entry:
            yield from _paths(field.message_type, depth - 1, path)


def mostly(valid: st.SearchStrategy, anything: st.SearchStrategy) -> st.SearchStrategy:
    """Half the time a value a check lets through, so the fuzzing gets past it to what comes next."""
    return st.one_of(valid, anything)


_SAMPLING = "internvl.common.v1.SamplingParams."
# SamplingParams (both the gateway and the LLM service take it): each number in its range half the time, and few new
# tokens, so that requests reach generation and the LLM does not spend the run generating.
SAMPLING_VALUES = {
    _SAMPLING + "max_new_tokens": mostly(st.integers(0, 6), INT32),
    _SAMPLING + "temperature": mostly(st.floats(0, 2, width=32), st.floats(width=32)),
    _SAMPLING + "top_p": mostly(st.floats(0, 1, width=32), st.floats(width=32)),
    _SAMPLING + "top_k": mostly(st.integers(0, 50), INT32),
    _SAMPLING + "repetition_penalty": mostly(st.floats(0, 2, width=32), st.floats(width=32)),
    _SAMPLING + "top_logprobs": mostly(st.integers(0, 20), INT32),
    _SAMPLING + "presence_penalty": mostly(st.floats(-2, 2, width=32), st.floats(width=32)),
    _SAMPLING + "frequency_penalty": mostly(st.floats(-2, 2, width=32), st.floats(width=32)),
    _SAMPLING + "n": mostly(st.integers(0, 3), INT32),
}
