"""Which shared libraries a compiled library loads (its ELF ``DT_NEEDED`` entries), and whether it
uses the process's shared C++ runtime: read at every import by ``_loader`` and by
:mod:`dfmu_ext.buildcheck` (which says why a static libstdc++ breaks error messages)."""
from __future__ import annotations

import os
import struct

__all__ = ["CXX_RUNTIME", "needed_libraries", "linkage_problems"]

CXX_RUNTIME = "libstdc++.so.6"

_SHT_DYNAMIC = 6
_DT_NEEDED = 1


def needed_libraries(path: str) -> list[str]:
    """The ``DT_NEEDED`` entries of a 64-bit little-endian ELF shared library (what ``readelf -d``
    lists as NEEDED), read from its section headers: ``.dynamic`` and the string table it links to.
    Reads only those parts of the file (cheap enough for every import).

    Raises ValueError for a file that is not such a library.
    """
    with open(path, "rb") as f:
        def read(offset: int, size: int) -> bytes:
            f.seek(offset)
            chunk = f.read(size)
            if len(chunk) != size:
                raise ValueError(f"{path} is truncated (not a complete ELF file)")
            return chunk

        header = f.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
        shoff, = struct.unpack_from("<Q", header, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", header, 0x3A)
        table = read(shoff, shentsize * shnum)
        # (sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, sh_addralign, sh_entsize)
        sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(shnum)]
        dynamic = [sec for sec in sections if sec[1] == _SHT_DYNAMIC]
        if not dynamic:
            raise ValueError(f"{path} has no dynamic section (not a shared library)")
        _, _, _, _, offset, size, link, _, _, _ = dynamic[0]
        entries = read(offset, size)
        strtab = read(sections[link][4], sections[link][5])
    names = []
    for pos in range(0, size - 15, 16):
        tag, value = struct.unpack_from("<qQ", entries, pos)
        if tag == 0:  # DT_NULL ends the table
            break
        if tag == _DT_NEEDED:
            names.append(strtab[value:strtab.index(b"\0", value)].decode())
    return names


def linkage_problems(path: str) -> list[str]:
    """Why the library at ``path`` cannot report errors safely (empty when it can)."""
    needed = needed_libraries(path)
    if CXX_RUNTIME in needed:
        return []
    return [f"{os.path.basename(path)} does not load the shared C++ runtime ({CXX_RUNTIME}; it needs "
            f"{', '.join(needed) or 'nothing'}): it carries its own static copy of libstdc++, so messages "
            "formatted with torch's values are cut short or crash the process. Rebuild with a compiler "
            "that links libstdc++ dynamically (no -static-libstdc++; e.g. CXX=g++ of the major version "
            "torch was built with, see dfmu_ext.build_info()['torch_compiler'])."]
