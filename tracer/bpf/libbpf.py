"""A thin ctypes binding to the system's libbpf.so.1.

Only what the tracer needs: open a CO-RE object, choose which programs load,
load, attach, fill maps, drain a ring buffer, and read BTF. libbpf does the
hard parts (CO-RE relocation, program-type specifics); this module turns its
errno-style failures into `BpfError` with the libbpf log attached, because a
verifier rejection without its log is useless to whoever has to fix it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import structlog

from tracer.libc import libc

log = structlog.get_logger("tracer.libbpf")

_c = ctypes
_vp = _c.c_void_p

#: bpf_map_update_elem flag: only replace a key that exists (include/uapi/linux/bpf.h).
BPF_EXIST = 2


class BpfError(OSError):
    """A libbpf call failed; `details` holds what libbpf printed meanwhile."""

    def __init__(self, what: str, err: int, details: str = "") -> None:
        self.what = what
        self.details = details
        msg = f"{what}: {os.strerror(err) if err > 0 else 'error'}"
        super().__init__(err, msg)

    def __str__(self) -> str:
        tail = f"\n{self.details.rstrip()}" if self.details else ""
        return f"{self.args[1]}{tail}"


# libbpf's print callback receives a C va_list; vsnprintf from libc formats it.
_PRINT_FN = _c.CFUNCTYPE(_c.c_int, _c.c_int, _c.c_char_p, _vp)
_SAMPLE_FN = _c.CFUNCTYPE(_c.c_int, _vp, _vp, _c.c_size_t)

_LIBBPF_WARN, _LIBBPF_INFO, _LIBBPF_DEBUG = 0, 1, 2


def _bind(lib: ctypes.CDLL, name: str, restype: type[ctypes._CData] | None,
          *argtypes: type[ctypes._CData]) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


#: The libbpf to load: the system's, unless the command line was told otherwise
#: (TRACER_LIBBPF, read by tracer.config) before the first BPF call.
LIBRARY = "libbpf.so.1"


def use_library(name: str) -> None:
    """Loads `name` instead of the system's libbpf.so.1; only before the first BPF call."""
    global LIBRARY
    LIBRARY = name


class _Lib:
    """The loaded library with prototypes declared, plus a log capture.

    libbpf prints diagnostics (verifier logs, relocation failures) through a
    global callback; we keep the recent lines per thread so an error raised
    on that thread can carry them.
    """

    def __init__(self) -> None:
        name = LIBRARY
        try:
            self.lib = _c.CDLL(name, use_errno=True)
        except OSError as exc:
            raise BpfError(
                f"cannot load {name} (install Debian's libbpf1 package)", errno.ENOENT
            ) from exc
        self.libc = libc()
        self.libc.vsnprintf.argtypes = [_c.c_char_p, _c.c_size_t, _c.c_char_p, _vp]
        self.libc.vsnprintf.restype = _c.c_int
        self._local = threading.local()
        self._declare()
        self._print_cb = _PRINT_FN(self._on_print)
        self.lib.libbpf_set_print(self._print_cb)

    def _declare(self) -> None:
        lib = self.lib
        _bind(lib, "libbpf_set_print", _vp, _PRINT_FN)
        _bind(lib, "bpf_object__open_file", _vp, _c.c_char_p, _vp)
        _bind(lib, "bpf_object__load", _c.c_int, _vp)
        _bind(lib, "bpf_object__close", None, _vp)
        _bind(lib, "bpf_object__next_program", _vp, _vp, _vp)
        _bind(lib, "bpf_object__find_map_by_name", _vp, _vp, _c.c_char_p)
        _bind(lib, "bpf_object__btf", _vp, _vp)
        _bind(lib, "bpf_program__name", _c.c_char_p, _vp)
        _bind(lib, "bpf_program__section_name", _c.c_char_p, _vp)
        _bind(lib, "bpf_program__set_autoload", _c.c_int, _vp, _c.c_bool)
        _bind(lib, "bpf_program__attach", _vp, _vp)
        _bind(lib, "bpf_program__fd", _c.c_int, _vp)
        _bind(lib, "bpf_obj_get_info_by_fd", _c.c_int, _c.c_int, _vp, _c.POINTER(_c.c_uint32))
        _bind(lib, "bpf_enable_stats", _c.c_int, _c.c_int)
        _bind(lib, "bpf_link__destroy", _c.c_int, _vp)
        _bind(lib, "bpf_map__fd", _c.c_int, _vp)
        _bind(lib, "bpf_map__set_max_entries", _c.c_int, _vp, _c.c_uint32)
        _bind(lib, "bpf_map_update_elem", _c.c_int, _c.c_int, _vp, _vp, _c.c_uint64)
        _bind(lib, "bpf_map_lookup_elem", _c.c_int, _c.c_int, _vp, _vp)
        _bind(lib, "bpf_map_delete_elem", _c.c_int, _c.c_int, _vp)
        _bind(lib, "bpf_map_lookup_batch", _c.c_int, _c.c_int, _vp, _vp, _vp, _vp, _vp, _vp)
        _bind(lib, "bpf_map_lookup_and_delete_batch", _c.c_int, _c.c_int, _vp, _vp, _vp, _vp, _vp, _vp)
        _bind(lib, "bpf_map_delete_batch", _c.c_int, _c.c_int, _vp, _vp, _vp)
        _bind(lib, "ring_buffer__consume", _c.c_int, _vp)
        _bind(lib, "libbpf_num_possible_cpus", _c.c_int)
        _bind(lib, "ring_buffer__new", _vp, _c.c_int, _SAMPLE_FN, _vp, _vp)
        _bind(lib, "ring_buffer__poll", _c.c_int, _vp, _c.c_int)
        _bind(lib, "ring_buffer__free", None, _vp)
        _bind(lib, "btf__load_vmlinux_btf", _vp)
        _bind(lib, "btf__free", None, _vp)
        _bind(lib, "btf__find_by_name_kind", _c.c_int32, _vp, _c.c_char_p, _c.c_uint32)
        _bind(lib, "btf__type_by_id", _vp, _vp, _c.c_uint32)
        _bind(lib, "btf__name_by_offset", _c.c_char_p, _vp, _c.c_uint32)
        _bind(lib, "btf__type_cnt", _c.c_uint32, _vp)

    def _on_print(self, level: int, fmt: bytes, args: int) -> int:
        buf = _c.create_string_buffer(4096)
        self.libc.vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode(errors="replace")
        lines = getattr(self._local, "lines", None)
        if lines is not None:
            lines.append(text)
            del lines[:-400]
        if level == _LIBBPF_WARN:
            log.debug("libbpf", message=text.rstrip())
        return 0

    def capture(self) -> list[str]:
        """Starts keeping libbpf's messages on this thread; returns the list."""
        self._local.lines = []
        return self._local.lines

    def fail(self, what: str, ret: int | None = None) -> BpfError:
        err = -ret if ret is not None and ret < 0 else _c.get_errno() or errno.EINVAL
        lines = getattr(self._local, "lines", None) or []
        return BpfError(what, err, "".join(lines[-60:]))


_lib: _Lib | None = None
_lib_lock = threading.Lock()


def lib() -> _Lib:
    """The process-wide libbpf handle, loaded on first use."""
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _Lib()
        return _lib


def num_possible_cpus() -> int:
    n = lib().lib.libbpf_num_possible_cpus()
    if n <= 0:
        raise lib().fail("libbpf_num_possible_cpus", n)
    return n


#: BPF_ENABLE_STATS type: count run_cnt and run_time_ns (enum bpf_stats_type, include/uapi/linux/bpf.h).
BPF_STATS_RUN_TIME = 0


@functools.cache
def _prog_info_layout() -> tuple[int, int, int]:
    """The running kernel's `struct bpf_prog_info`: its size and the offsets of run_cnt and
    run_time_ns, read from its BTF rather than copied from a header of another version."""
    with Btf.vmlinux() as btf:
        tid = btf.find("bpf_prog_info", BTF_KIND_STRUCT)
        if tid is None:
            raise BpfError("the kernel's BTF has no struct bpf_prog_info", errno.ENOENT)
        offsets = {m.name: m.bit_offset // 8 for m in btf.members(tid)}
        size = btf.type(tid).size_or_type
    if "run_cnt" not in offsets or "run_time_ns" not in offsets:
        raise BpfError("this kernel's struct bpf_prog_info has no run_cnt/run_time_ns", errno.ENOTSUP)
    return size, offsets["run_cnt"], offsets["run_time_ns"]


def program_run_stats(fd: int) -> tuple[int, int]:
    """(run_cnt, run_time_ns) of a loaded program, as the kernel counts them.

    The kernel counts only while `kernel.bpf_stats_enabled` is 1 or some
    process holds an `enable_stats()` descriptor; otherwise the figures stay
    where they were (0 for a program loaded meanwhile).
    """
    size, cnt_at, time_at = _prog_info_layout()
    info = _c.create_string_buffer(size)  # zeroed: no array of the info is asked for
    length = _c.c_uint32(size)
    ret = lib().lib.bpf_obj_get_info_by_fd(fd, info, _c.byref(length))
    if ret:
        raise lib().fail("bpf_obj_get_info_by_fd", ret)
    if length.value < max(cnt_at, time_at) + 8:
        raise BpfError("bpf_obj_get_info_by_fd: short bpf_prog_info", errno.EINVAL)
    return (int.from_bytes(info.raw[cnt_at:cnt_at + 8], sys.byteorder),
            int.from_bytes(info.raw[time_at:time_at + 8], sys.byteorder))


def enable_stats() -> int:
    """A descriptor that keeps the kernel counting every BPF program's runs while it is open
    (BPF_ENABLE_STATS): the alternative to the sysctl kernel.bpf_stats_enabled that ends
    with the process. The caller closes it."""
    fd = lib().lib.bpf_enable_stats(BPF_STATS_RUN_TIME)
    if fd < 0:
        raise lib().fail("bpf_enable_stats", fd)
    return fd


class Link:
    """An attached program; detached when destroyed or garbage collected."""

    def __init__(self, ptr: int, program: str) -> None:
        self._ptr = ptr
        self.program = program

    def destroy(self) -> None:
        if self._ptr:
            lib().lib.bpf_link__destroy(self._ptr)
            self._ptr = 0

    def __del__(self) -> None:
        self.destroy()


@dataclass
class Program:
    _ptr: int
    name: str
    section: str

    def set_autoload(self, on: bool) -> None:
        ret = lib().lib.bpf_program__set_autoload(self._ptr, on)
        if ret:
            raise lib().fail(f"set_autoload {self.name}", ret)

    def attach(self) -> Link:
        L = lib()
        L.capture()
        ptr = L.lib.bpf_program__attach(self._ptr)
        if not ptr:
            raise L.fail(f"attach {self.name} ({self.section})")
        return Link(ptr, self.name)

    @property
    def fd(self) -> int:
        """The loaded program's file descriptor (negative before the object is loaded)."""
        return lib().lib.bpf_program__fd(self._ptr)


@dataclass
class Map:
    _ptr: int
    name: str

    @property
    def fd(self) -> int:
        return lib().lib.bpf_map__fd(self._ptr)

    def set_max_entries(self, n: int) -> None:
        ret = lib().lib.bpf_map__set_max_entries(self._ptr, n)
        if ret:
            raise lib().fail(f"set_max_entries {self.name}", ret)

    def update(self, key: ctypes._CData, value: ctypes._CData) -> None:
        ret = lib().lib.bpf_map_update_elem(self.fd, _c.byref(key), _c.byref(value), 0)
        if ret:
            raise lib().fail(f"update map {self.name}", ret)

    def lookup(self, key: ctypes._CData, value: ctypes._CData) -> bool:
        """Fills `value`; False when the key is absent."""
        ret = lib().lib.bpf_map_lookup_elem(self.fd, _c.byref(key), _c.byref(value))
        if ret == 0:
            return True
        if _c.get_errno() == errno.ENOENT:
            return False
        raise lib().fail(f"lookup map {self.name}", ret)


    def update_existing(self, key: ctypes._CData, value: ctypes._CData) -> bool:
        """Replaces the value of a key that is there (BPF_EXIST); False when it is gone."""
        ret = lib().lib.bpf_map_update_elem(self.fd, _c.byref(key), _c.byref(value), BPF_EXIST)
        if ret == 0:
            return True
        if _c.get_errno() == errno.ENOENT:
            return False
        raise lib().fail(f"update map {self.name}", ret)

    def batches(self, key_size: int, value_size: int, *, delete: bool,
                chunk: int = 4096) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) of a hash map, read (and with `delete`, removed) in batches.

        One system call moves `chunk` entries, where a get-next-key walk takes
        two per entry: a drained map of 65 536 flows costs 16 calls, not
        131 072. A bucket holding more than `chunk` entries makes the kernel
        answer ENOSPC; the chunk then doubles. Values of per-CPU maps are
        `value_size` rounded up to 8, times the possible CPUs.
        """
        L = lib()
        fn = L.lib.bpf_map_lookup_and_delete_batch if delete else L.lib.bpf_map_lookup_batch
        in_batch, out_batch = _c.c_uint64(0), _c.c_uint64(0)
        first = True
        while True:
            keys = _c.create_string_buffer(key_size * chunk)
            values = _c.create_string_buffer(value_size * chunk)
            count = _c.c_uint32(chunk)
            ret = fn(self.fd, None if first else _c.byref(in_batch), _c.byref(out_batch),
                     keys, values, _c.byref(count), None)
            err = _c.get_errno() if ret else 0
            if ret and err not in (errno.ENOENT, errno.ENOSPC):
                raise L.fail(f"batch read of map {self.name}", ret)
            if err == errno.ENOSPC and count.value == 0:
                chunk *= 2
                continue
            raw_keys, raw_values = keys.raw, values.raw
            for i in range(count.value):
                yield (raw_keys[i * key_size:(i + 1) * key_size],
                       raw_values[i * value_size:(i + 1) * value_size])
            if err == errno.ENOENT:
                return
            in_batch.value, first = out_batch.value, False

    def delete_keys(self, keys: list[bytes], key_size: int) -> int:
        """Removes the keys that are there; returns how many went. Missing keys are no error."""
        gone = 0
        for key in keys:
            buf = _c.create_string_buffer(key, key_size)
            if lib().lib.bpf_map_delete_elem(self.fd, buf) == 0:
                gone += 1
            elif _c.get_errno() != errno.ENOENT:
                raise lib().fail(f"remove a key of map {self.name}", -_c.get_errno())
        return gone


class BpfObject:
    """An opened (and later loaded) BPF ELF object."""

    def __init__(self, path: str) -> None:
        L = lib()
        L.capture()
        self.path = path
        self._ptr = L.lib.bpf_object__open_file(path.encode(), None)
        if not self._ptr:
            raise L.fail(f"open BPF object {path}")

    def programs(self) -> Iterator[Program]:
        L = lib().lib
        prog = L.bpf_object__next_program(self._ptr, None)
        while prog:
            yield Program(
                prog,
                L.bpf_program__name(prog).decode(),
                L.bpf_program__section_name(prog).decode(),
            )
            prog = L.bpf_object__next_program(self._ptr, prog)

    def program(self, name: str) -> Program:
        for prog in self.programs():
            if prog.name == name:
                return prog
        raise KeyError(f"no BPF program {name!r} in {self.path}")

    def map(self, name: str) -> Map:
        ptr = lib().lib.bpf_object__find_map_by_name(self._ptr, name.encode())
        if not ptr:
            raise KeyError(f"no BPF map {name!r} in {self.path}")
        return Map(ptr, name)

    def load(self) -> None:
        L = lib()
        L.capture()
        ret = L.lib.bpf_object__load(self._ptr)
        if ret:
            raise L.fail(f"load BPF object {os.path.basename(self.path)}", ret)

    def btf(self) -> Btf:
        ptr = lib().lib.bpf_object__btf(self._ptr)
        if not ptr:
            raise BpfError(f"{self.path} has no BTF", errno.ENOENT)
        return Btf(ptr, owned=False)

    def close(self) -> None:
        if self._ptr:
            lib().lib.bpf_object__close(self._ptr)
            self._ptr = 0

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RingBuffer:
    """Drains a BPF ring buffer map into a Python callback.

    The callback gets a memoryview-free `bytes` copy: the kernel's memory is
    only valid during the callback, and the engine keeps events longer.
    """

    def __init__(self, ringbuf: Map, callback: Callable[[bytes], None]) -> None:
        self._cancelled = False

        def on_sample(_ctx: int, data: int, size: int) -> int:
            # Under a flood one poll can run callbacks for a long time; a
            # negative return makes libbpf stop, so cancel() takes effect
            # between two records instead of after the buffer drains.
            if self._cancelled:
                return -errno.ECANCELED
            try:
                callback(_c.string_at(data, size))
            except Exception:  # an exception must not unwind through C
                log.exception("ring buffer callback failed")
            return 0

        self._cb = _SAMPLE_FN(on_sample)  # keep alive as long as the buffer
        L = lib()
        L.capture()
        self._ptr = L.lib.ring_buffer__new(ringbuf.fd, self._cb, None, None)
        if not self._ptr:
            raise L.fail("ring_buffer__new")

    def poll(self, timeout_ms: int) -> int:
        """Waits for events and runs the callback; returns how many ran."""
        n = lib().lib.ring_buffer__poll(self._ptr, timeout_ms)
        if n < 0 and n not in (-errno.EINTR, -errno.ECANCELED):
            raise lib().fail("ring_buffer__poll", n)
        return max(n, 0)

    def consume(self) -> int:
        """Runs the callback for every record there now, without waiting; returns how many."""
        n = lib().lib.ring_buffer__consume(self._ptr)
        if n < 0 and n not in (-errno.EINTR, -errno.ECANCELED):
            raise lib().fail("ring_buffer__consume", n)
        return max(n, 0)

    def cancel(self) -> None:
        """Makes a running or later poll() return at the next record."""
        self._cancelled = True

    def close(self) -> None:
        if self._ptr:
            lib().lib.ring_buffer__free(self._ptr)
            self._ptr = 0


# ------------------------------------------------------------------ BTF

BTF_KIND_INT = 1
BTF_KIND_PTR = 2
BTF_KIND_ARRAY = 3
BTF_KIND_STRUCT = 4
BTF_KIND_UNION = 5
BTF_KIND_ENUM = 6
BTF_KIND_TYPEDEF = 8
BTF_KIND_VOLATILE = 9
BTF_KIND_CONST = 10
BTF_KIND_RESTRICT = 11
BTF_KIND_FUNC = 12
BTF_KIND_TYPE_TAG = 18
BTF_KIND_ENUM64 = 19


class _BtfType(_c.Structure):
    _fields_ = (("name_off", _c.c_uint32), ("info", _c.c_uint32), ("size_or_type", _c.c_uint32))


class _BtfMember(_c.Structure):
    _fields_ = (("name_off", _c.c_uint32), ("type", _c.c_uint32), ("offset", _c.c_uint32))


class _BtfEnum(_c.Structure):
    _fields_ = (("name_off", _c.c_uint32), ("val", _c.c_int32))


class _BtfEnum64(_c.Structure):
    _fields_ = (("name_off", _c.c_uint32), ("val_lo32", _c.c_uint32), ("val_hi32", _c.c_uint32))


class _BtfArray(_c.Structure):
    _fields_ = (("type", _c.c_uint32), ("index_type", _c.c_uint32), ("nelems", _c.c_uint32))


@dataclass(frozen=True)
class BtfMember:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int


@dataclass(frozen=True)
class BtfTypeInfo:
    kind: int
    name: str
    size_or_type: int
    vlen: int
    kind_flag: bool


class Btf:
    """Read access to BTF type information (kernel or object)."""

    def __init__(self, ptr: int, owned: bool) -> None:
        self._ptr = ptr
        self._owned = owned

    @classmethod
    def vmlinux(cls) -> Btf:
        L = lib()
        L.capture()
        ptr = L.lib.btf__load_vmlinux_btf()
        if not ptr:
            raise L.fail("load kernel BTF (/sys/kernel/btf/vmlinux)")
        return cls(ptr, owned=True)

    def close(self) -> None:
        if self._owned and self._ptr:
            lib().lib.btf__free(self._ptr)
        self._ptr = 0

    def __enter__(self) -> Btf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def find(self, name: str, kind: int) -> int | None:
        tid = lib().lib.btf__find_by_name_kind(self._ptr, name.encode(), kind)
        return tid if tid > 0 else None

    def _raw(self, type_id: int) -> int:
        ptr = lib().lib.btf__type_by_id(self._ptr, type_id)
        if not ptr:
            raise KeyError(f"no BTF type {type_id}")
        return ptr

    def _name(self, off: int) -> str:
        name = lib().lib.btf__name_by_offset(self._ptr, off)
        return name.decode() if name else ""

    def type(self, type_id: int) -> BtfTypeInfo:
        t = _BtfType.from_address(self._raw(type_id))
        return BtfTypeInfo(
            kind=(t.info >> 24) & 0x1F,
            name=self._name(t.name_off),
            size_or_type=t.size_or_type,
            vlen=t.info & 0xFFFF,
            kind_flag=bool(t.info >> 31),
        )

    def enum_members(self, name: str) -> dict[str, int]:
        """Member name -> value of an enum (32- or 64-bit), in declaration order.

        Values are signed when BTF says so (kind_flag, written by clang 15+
        and pahole 1.24+) and unsigned otherwise, as C's own enums are.
        """
        for kind in (BTF_KIND_ENUM, BTF_KIND_ENUM64):
            tid = self.find(name, kind)
            if tid is not None:
                return dict(self._enum_entries(tid, kind))
        raise KeyError(f"no enum {name!r} in BTF")

    def enum_values(self, name: str) -> dict[int, str]:
        """Value -> member name of an enum; of members sharing a value, the last wins."""
        return {value: member for member, value in self.enum_members(name).items()}

    def _enum_entries(self, type_id: int, kind: int) -> Iterator[tuple[str, int]]:
        info = self.type(type_id)
        base = self._raw(type_id) + _c.sizeof(_BtfType)
        for i in range(info.vlen):
            if kind == BTF_KIND_ENUM:
                m = _BtfEnum.from_address(base + i * _c.sizeof(_BtfEnum))
                value = m.val if info.kind_flag else m.val & 0xFFFFFFFF
                yield self._name(m.name_off), value
            else:
                m64 = _BtfEnum64.from_address(base + i * _c.sizeof(_BtfEnum64))
                value = (m64.val_hi32 << 32) | m64.val_lo32
                if info.kind_flag and value >= 1 << 63:
                    value -= 1 << 64
                yield self._name(m64.name_off), value

    def members(self, type_id: int) -> list[BtfMember]:
        info = self.type(type_id)
        if info.kind not in (BTF_KIND_STRUCT, BTF_KIND_UNION):
            raise TypeError(f"BTF type {info.name!r} is not a struct")
        base = self._raw(type_id) + _c.sizeof(_BtfType)
        out = []
        for i in range(info.vlen):
            m = _BtfMember.from_address(base + i * _c.sizeof(_BtfMember))
            if info.kind_flag:
                bit_off, bf = m.offset & 0xFFFFFF, m.offset >> 24
            else:
                bit_off, bf = m.offset, 0
            out.append(BtfMember(self._name(m.name_off), m.type, bit_off, bf))
        return out

    def array(self, type_id: int) -> tuple[int, int]:
        """Element type id and element count of an array type."""
        base = self._raw(type_id) + _c.sizeof(_BtfType)
        a = _BtfArray.from_address(base)
        return a.type, a.nelems

    def resolve(self, type_id: int) -> tuple[int, BtfTypeInfo]:
        """Follows typedefs and qualifiers to the underlying type."""
        info = self.type(type_id)
        while info.kind in (BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST,
                            BTF_KIND_RESTRICT, BTF_KIND_TYPE_TAG):
            type_id = info.size_or_type
            info = self.type(type_id)
        return type_id, info

    def int_signed(self, type_id: int) -> bool:
        """Whether a BTF INT type is signed (the encoding byte of its data)."""
        enc = _c.c_uint32.from_address(self._raw(type_id) + _c.sizeof(_BtfType)).value
        return bool((enc >> 24) & 0x1)
