"""Tiny ELF header reader for checking what a compiled file really is."""

import struct

EM_X86_64, EM_AARCH64, EM_CUDA = 62, 183, 190


def machine(path) -> int:
    head = open(path, "rb").read(64)
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return struct.unpack_from("<H", head, 18)[0]


def cuda_sm(path) -> int:
    """SM version a cubin was compiled for (bits 8-15 of e_flags, CUDA >= 12 layout)."""
    head = open(path, "rb").read(64)
    assert machine(path) == EM_CUDA
    return (struct.unpack_from("<I", head, 48)[0] >> 8) & 0xFF
