"""Marks a symbol-version requirement of an ELF64 shared library as weak (VER_FLG_WEAK), in place.

The dynamic loader then accepts the library although no loaded object defines that version.
Usage: python3 weaken-verneed.py LIB VERSION_NAME
"""
import struct
import sys

import elf64

SHT_GNU_VERNEED = 0x6FFFFFFE
VER_FLG_WEAK = 0x2


def weaken(path: str, version: bytes) -> int:
    data, sections = elf64.read(path)
    changed = 0
    for sec, strtab_offset in elf64.of_type(sections, SHT_GNU_VERNEED):
        entry = sec.offset
        while True:
            _, count, _, aux_offset, next_entry = struct.unpack_from("<HHIII", data, entry)
            aux = entry + aux_offset
            for _ in range(count):
                _, flags, _, name, next_aux = struct.unpack_from("<IHHII", data, aux)
                if elf64.string_at(data, strtab_offset + name) == version and not flags & VER_FLG_WEAK:
                    struct.pack_into("<H", data, aux + 4, flags | VER_FLG_WEAK)
                    changed += 1
                if next_aux == 0:
                    break
                aux += next_aux
            if next_entry == 0:
                break
            entry += next_entry
    open(path, "wb").write(data)
    return changed


if __name__ == "__main__":
    weaken(sys.argv[1], sys.argv[2].encode())
