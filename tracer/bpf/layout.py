"""Python views of the structs and constants in bpf/tracer.h, built from the object's BTF.

The C header is the single definition of `struct drop_event`,
`struct filter_cfg` and of every constant they use. Instead of repeating
the layout in Python, we read it from the BTF that clang stores in the
compiled object and build ctypes structures from it, then check that ctypes
agrees on every offset and on the size. The constants are enums in the
header, and BTF has each enum's members by name, so Python reads their
values the same way (`Constants`) and keeps no copy. A change to the header
therefore needs no edit here unless a field or constant Python reads is
renamed, and then loading fails by name.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import Any, ClassVar, cast

from tracer.bpf.libbpf import (
    BTF_KIND_ARRAY,
    BTF_KIND_ENUM,
    BTF_KIND_INT,
    BTF_KIND_STRUCT,
    Btf,
)

#: The enums of bpf/tracer.h that Python reads (tracer.bpf.c's
#: `struct tracer_btf_enums` makes clang emit each one into the object).
TRACER_ENUMS = (
    "tracer_limits",
    "tracer_frag_flags",
    "tracer_ct_info",
    "nf_source",
    "nf_backend",
    "filter_flags",
    "filter_reason",
    "drop_counter",
    "tracer_record",
    "tracer_counted",
    "flow_seen_flags",
    "tracer_flow_hook",
    "tracer_related",
    "tracer_match",
)

#: The structs of bpf/tracer.h that Python reads or writes.
TRACER_STRUCTS = ("drop_event", "filter_cfg", "nf_info", "flow_key", "flow_count", "flow_seen")

_UNSIGNED = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}
_SIGNED = {1: ctypes.c_int8, 2: ctypes.c_int16, 4: ctypes.c_int32, 8: ctypes.c_int64}


class LayoutError(RuntimeError):
    """The BPF object's struct layout or constants cannot be represented or do not match."""


@dataclass(frozen=True, eq=False)
class Constants:
    """The enums of bpf/tracer.h as one compiled object's BTF has them.

    Compared and hashed by identity: there is one per object file.
    """

    enums: Mapping[str, Mapping[str, int]]

    def members(self, enum: str) -> Mapping[str, int]:
        """Member name -> value, in declaration order."""
        try:
            return self.enums[enum]
        except KeyError:
            raise LayoutError(f"enum {enum} is not among the BPF object's constants") from None

    def value(self, enum: str, member: str) -> int:
        """One member's value; LayoutError naming both when the header has no such member."""
        try:
            return self.members(enum)[member]
        except KeyError:
            raise LayoutError(f"enum {enum} has no member {member} in the BPF object's BTF "
                              "(bpf/tracer.h)") from None


class BtfStruct(ctypes.Structure):
    """Base of the ctypes structs built from an object's BTF.

    Each struct class carries the constants of the same object, so code that
    gets a record (or a struct to fill) also gets the numbers that go with
    its layout, and never those of another build.
    """

    constants: ClassVar[Constants]


def enum_from_btf(btf: Btf, name: str) -> dict[str, int]:
    """Member name -> value of C `enum name` in `btf`."""
    try:
        return btf.enum_members(name)
    except KeyError:
        raise LayoutError(f"enum {name} not found in the BPF object's BTF (bpf/tracer.h; "
                          "tracer.bpf.c's struct tracer_btf_enums must name it)") from None


def _ctype(btf: Btf, type_id: int, base: type[BtfStruct],
           cache_: dict[int, type[ctypes._CData]]) -> type[ctypes._CData]:
    type_id, info = btf.resolve(type_id)
    if type_id in cache_:
        return cache_[type_id]
    ct: type[ctypes._CData]
    if info.kind == BTF_KIND_INT:
        table = _SIGNED if btf.int_signed(type_id) else _UNSIGNED
        # char arrays hold C strings; c_char keeps them as bytes in Python.
        ct = ctypes.c_char if info.name == "char" else table[info.size_or_type]
    elif info.kind == BTF_KIND_ENUM:
        ct = _UNSIGNED[info.size_or_type]
    elif info.kind == BTF_KIND_ARRAY:
        elem, n = btf.array(type_id)
        # An array type is the element type times n; typeshed has that only
        # on each concrete kind's metaclass, not on the common base.
        ct = cast("Any", _ctype(btf, elem, base, cache_)) * n
    elif info.kind == BTF_KIND_STRUCT:
        ct = _struct(btf, type_id, info.name, base, cache_)
    else:
        raise LayoutError(f"unsupported BTF kind {info.kind} for {info.name!r}")
    cache_[type_id] = ct
    return ct


def _struct(btf: Btf, type_id: int, name: str, base: type[BtfStruct],
            cache_: dict[int, type[ctypes._CData]]) -> type[BtfStruct]:
    members = btf.members(type_id)
    fields = []
    for m in members:
        if m.bitfield_size:
            raise LayoutError(f"{name}.{m.name}: bitfields are not used in tracer.h")
        fields.append((m.name, _ctype(btf, m.type_id, base, cache_)))
    cls = type(name, (base,), {"_fields_": fields})
    size = btf.type(type_id).size_or_type
    for m in members:
        got = getattr(cls, m.name).offset * 8
        if got != m.bit_offset:
            raise LayoutError(f"{name}.{m.name}: BTF offset {m.bit_offset // 8}, ctypes {got // 8}")
    if ctypes.sizeof(cls) != size:
        raise LayoutError(f"{name}: BTF size {size}, ctypes {ctypes.sizeof(cls)}")
    return cls


def struct_from_btf(btf: Btf, name: str, constants: Constants | None = None) -> type[BtfStruct]:
    """A ctypes Structure laid out exactly like C `struct name` in `btf`.

    The class and each struct nested in it carry `constants` (an empty set
    when not given: for a struct read on its own, without the object's enums).
    """
    tid = btf.find(name, BTF_KIND_STRUCT)
    if tid is None:
        raise LayoutError(f"struct {name} not found in the BPF object's BTF")
    base = type(f"{name}_base", (BtfStruct,), {"constants": constants or Constants({})})
    return _struct(btf, tid, name, base, {})


def constants_from_btf(btf: Btf, names: tuple[str, ...] = TRACER_ENUMS) -> Constants:
    """The values of the enums `names` in `btf`."""
    return Constants(MappingProxyType({n: MappingProxyType(enum_from_btf(btf, n)) for n in names}))


@cache
def object_structs(obj_path: str) -> dict[str, type[BtfStruct]]:
    """The shared structs of a compiled tracer object, by C name, with its constants."""
    from tracer.bpf.libbpf import BpfObject

    with BpfObject(obj_path) as obj:
        btf = obj.btf()
        constants = constants_from_btf(btf)
        return {n: struct_from_btf(btf, n, constants) for n in TRACER_STRUCTS}


def object_constants(obj_path: str) -> Constants:
    """The constants of a compiled tracer object (those its structs carry)."""
    return object_structs(obj_path)["drop_event"].constants
