"""Python views of the structs in bpf/tracer.h, built from the object's BTF.

The C header is the single definition of `struct drop_event` and
`struct filter_cfg`. Instead of repeating the layout in Python, we read it
from the BTF that clang stores in the compiled object and build ctypes
structures from it, then check that ctypes agrees on every offset and on
the size. A change to the header therefore needs no edit here unless a
field the decoder reads is renamed, and then the decoder fails by name.
"""

from __future__ import annotations

import ctypes
from functools import cache

from tracer.bpf.libbpf import (
    BTF_KIND_ARRAY,
    BTF_KIND_ENUM,
    BTF_KIND_INT,
    BTF_KIND_STRUCT,
    Btf,
)

_UNSIGNED = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}
_SIGNED = {1: ctypes.c_int8, 2: ctypes.c_int16, 4: ctypes.c_int32, 8: ctypes.c_int64}


class LayoutError(RuntimeError):
    """The BPF object's struct layout cannot be represented or does not match."""


def _ctype(btf: Btf, type_id: int, cache_: dict[int, type]) -> type:
    type_id, info = btf.resolve(type_id)
    if type_id in cache_:
        return cache_[type_id]
    if info.kind == BTF_KIND_INT:
        table = _SIGNED if btf.int_signed(type_id) else _UNSIGNED
        ct = table[info.size_or_type]
        # char arrays hold C strings; c_char keeps them as bytes in Python.
        if info.name == "char":
            ct = ctypes.c_char
    elif info.kind == BTF_KIND_ENUM:
        ct = _UNSIGNED[info.size_or_type]
    elif info.kind == BTF_KIND_ARRAY:
        elem, n = btf.array(type_id)
        ct = _ctype(btf, elem, cache_) * n
    elif info.kind == BTF_KIND_STRUCT:
        ct = _struct(btf, type_id, info.name, cache_)
    else:
        raise LayoutError(f"unsupported BTF kind {info.kind} for {info.name!r}")
    cache_[type_id] = ct
    return ct


def _struct(btf: Btf, type_id: int, name: str, cache_: dict[int, type]) -> type:
    members = btf.members(type_id)
    fields = []
    for m in members:
        if m.bitfield_size:
            raise LayoutError(f"{name}.{m.name}: bitfields are not used in tracer.h")
        fields.append((m.name, _ctype(btf, m.type_id, cache_)))
    cls = type(name, (ctypes.Structure,), {"_fields_": fields})
    size = btf.type(type_id).size_or_type
    for m in members:
        got = getattr(cls, m.name).offset * 8
        if got != m.bit_offset:
            raise LayoutError(f"{name}.{m.name}: BTF offset {m.bit_offset // 8}, ctypes {got // 8}")
    if ctypes.sizeof(cls) != size:
        raise LayoutError(f"{name}: BTF size {size}, ctypes {ctypes.sizeof(cls)}")
    return cls


def struct_from_btf(btf: Btf, name: str) -> type[ctypes.Structure]:
    """A ctypes Structure laid out exactly like C `struct name` in `btf`."""
    tid = btf.find(name, BTF_KIND_STRUCT)
    if tid is None:
        raise LayoutError(f"struct {name} not found in the BPF object's BTF")
    return _ctype(btf, tid, {})


@cache
def object_structs(obj_path: str) -> dict[str, type[ctypes.Structure]]:
    """The shared structs of a compiled tracer object, by C name."""
    from tracer.bpf.libbpf import BpfObject

    with BpfObject(obj_path) as obj:
        btf = obj.btf()
        return {n: struct_from_btf(btf, n) for n in ("drop_event", "filter_cfg", "nf_info")}
