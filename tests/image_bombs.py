"""Decompression bombs for the reward servers' tests: valid PNG/JPEG headers that declare huge images in a few bytes."""
import struct, zlib


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(w=100_000, h=100_000) -> bytes:
    "A valid PNG header declaring w×h RGB pixels (30 GB decoded), with a few bytes of pixel data."
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + png_chunk(b"IEND", b""))


def jpeg_bomb(w=65_000, h=65_000) -> bytes:
    "A JPEG whose baseline frame header (SOF0) declares w×h pixels."
    sof = struct.pack(">BHHB", 8, h, w, 3) + b"".join(bytes([i, 0x11, 0]) for i in (1, 2, 3))
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", 2 + len(sof)) + sof + b"\xff\xd9"
