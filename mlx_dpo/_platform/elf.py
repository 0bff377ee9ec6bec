"""Rename a shared library's SONAME in a copy of it (64-bit little-endian ELF only).

Why: the OpenBLAS of the ``cmeel-openblas`` wheel needs ``libgfortran.so.5``,
which a fresh Linux machine lacks, while the ``mlx[cpu]`` wheel already ships a
libgfortran, but renamed (``libgfortran-<hash>.so.5.0.0``, SONAME included).
The dynamic linker satisfies a dependency with an already loaded library only
when the names match, so a copy of MLX's libgfortran whose SONAME reads
``libgfortran.so.5`` lets that OpenBLAS load without root and without
``LD_LIBRARY_PATH``. The new name is written over the old one in the dynamic
string table, so it must not be longer; nothing else in the file moves.
"""

from __future__ import annotations

import os
import struct

_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_STRTAB, _DT_SONAME = 0, 5, 14


def _soname_offset(data: bytes) -> tuple[int, int]:
    """File offset and length of the SONAME string."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    segments = [struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize) for i in range(phnum)]
    dynamic = [s for s in segments if s[0] == _PT_DYNAMIC]
    if not dynamic:
        raise ValueError("no dynamic section")
    _, _, dyn_off, _, _, dyn_size = dynamic[0]
    tags = {}
    for pos in range(dyn_off, dyn_off + dyn_size, 16):
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == _DT_NULL:
            break
        tags.setdefault(tag, value)
    if _DT_SONAME not in tags or _DT_STRTAB not in tags:
        raise ValueError("no SONAME")
    strtab = tags[_DT_STRTAB]  # a virtual address: map it to a file offset
    for kind, _, offset, vaddr, _, filesz in segments:
        if kind == _PT_LOAD and vaddr <= strtab < vaddr + filesz:
            start = strtab - vaddr + offset + tags[_DT_SONAME]
            return start, data.index(b"\0", start) - start
    raise ValueError("string table outside the loaded segments")


def soname(path: str) -> str:
    """The SONAME recorded in a shared library."""
    with open(path, "rb") as f:
        data = f.read()
    start, length = _soname_offset(data)
    return data[start : start + length].decode()


def with_soname(data: bytes, new: str) -> bytes:
    """The bytes of a shared library whose SONAME is changed to ``new``, nothing else."""
    data = bytearray(data)
    start, length = _soname_offset(data)
    name = new.encode()
    if len(name) > length:
        raise ValueError(f"new SONAME {new!r} is longer than the old one")
    data[start : start + length] = name.ljust(length, b"\0")
    return bytes(data)


def copy_with_soname(src: str, dst: str, new: str) -> None:
    """Write a copy of ``src`` to ``dst`` (atomically) whose SONAME is ``new``."""
    with open(src, "rb") as f:
        data = with_soname(f.read(), new)
    tmp = f"{dst}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, dst)
