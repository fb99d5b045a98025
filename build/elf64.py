"""Reading an ELF64 little-endian shared library's section headers, for the in-place patches of build/."""
import struct
from collections import namedtuple

# struct Elf64_Shdr, field by field.
Section = namedtuple("Section", "name type flags addr offset size link info addralign entsize")


def read(path: str):
    """The file's bytes (mutable) and its section headers (Section)."""
    data = bytearray(open(path, "rb").read())
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise SystemExit(f"{path}: not an ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [Section(*struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)) for i in range(shnum)]
    return data, sections


def of_type(sections, sh_type: int):
    """Each section of type sh_type with the file offset of the string table it links to (its names' table)."""
    for section in sections:
        if section.type == sh_type:
            yield section, sections[section.link].offset


def string_at(data: bytearray, start: int) -> bytes:
    """The NUL-terminated string at offset start (of a string table)."""
    return bytes(data[start:data.index(0, start)])
