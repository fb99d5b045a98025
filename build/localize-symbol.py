"""Makes a defined symbol of an ELF64 shared library's dynamic symbol table local (STB_LOCAL), in place.

The dynamic loader ignores local symbols when it looks a name up, so the lookup moves on to the library's DT_NEEDED
dependencies, one of which then provides the replacement. Idempotent. Usage: python3 localize-symbol.py LIB SYMBOL
"""
import struct
import sys

import elf64

SHT_DYNSYM = 11
STB_LOCAL = 0


def localize(path: str, symbol: bytes) -> int:
    data, sections = elf64.read(path)
    found = 0
    for sec, strtab_offset in elf64.of_type(sections, SHT_DYNSYM):
        for entry in range(sec.offset, sec.offset + sec.size, sec.entsize):
            name, info, _, shndx = struct.unpack_from("<IBBH", data, entry)
            if shndx == 0 or elf64.string_at(data, strtab_offset + name) != symbol:
                continue   # another name, or an undefined reference
            data[entry + 4] = (STB_LOCAL << 4) | (info & 0xF)
            found += 1
    if found == 0:
        raise SystemExit(f"{path}: defines no dynamic symbol {symbol.decode()}")
    with open(path, "r+b") as f:
        f.write(data)
    return found


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: localize-symbol.py LIB SYMBOL")
    localize(sys.argv[1], sys.argv[2].encode())
