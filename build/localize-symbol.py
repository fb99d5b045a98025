"""Makes a defined symbol of an ELF64 shared library's dynamic symbol table local (STB_LOCAL), in place.

The dynamic loader ignores local symbols when it looks a name up, so the lookup moves on to the library's DT_NEEDED
dependencies, one of which then provides the replacement. Idempotent. Usage: python3 localize-symbol.py LIB SYMBOL
"""
import struct
import sys

SHT_DYNSYM = 11
STB_LOCAL = 0


def localize(path: str, symbol: bytes) -> int:
    data = bytearray(open(path, "rb").read())
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise SystemExit(f"{path}: not an ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found = 0
    for sec in sections:
        if sec[1] != SHT_DYNSYM:
            continue
        strtab_offset = sections[sec[6]][4]
        offset, size, entsize = sec[4], sec[5], sec[9]
        for entry in range(offset, offset + size, entsize):
            name, info, _, shndx = struct.unpack_from("<IBBH", data, entry)
            start = strtab_offset + name
            if shndx == 0 or bytes(data[start:data.index(0, start)]) != symbol:
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
