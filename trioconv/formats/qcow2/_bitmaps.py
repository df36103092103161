"""Persistent dirty bitmaps in qcow2: the bitmaps extension, directory and tables.

A bitmap records which parts of the disk were written while it was *enabled*; backup
tools read it to copy only what changed since the last backup. Bit ``n`` covers guest
bytes ``[n * granularity, (n + 1) * granularity)``; bit 0 of byte 0 comes first.

On disk (``docs/interop/qcow2.txt``, "Bitmaps"):

* a header extension (type ``0x23852875``, 24 bytes) gives the number of bitmaps and the
  offset and size of the **bitmap directory**; it counts only while the *autoclear*
  feature bit 0 is set - a program that writes the image without keeping the bitmaps
  up to date clears that bit, and the bitmaps are then inconsistent;
* the directory holds one variable-length entry per bitmap: its table's offset and
  size, flags (``in_use``: not saved correctly; ``auto``: enabled), type (1: dirty
  tracking), granularity, name and optional extra data, padded to 8 bytes;
* a bitmap's **table** has one 64-bit entry per cluster of bitmap data: the host
  offset of that cluster, or 0 with bit 0 saying the cluster reads as all zeros (0) or
  all ones (1).

This module only turns bytes into values and back (no I/O); the qcow2 reader and
writer read and write the clusters. :class:`Bitmap` is a bitmap held in memory.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import attrs

__all__ = [
    "AUTO",
    "EXTRA_DATA_COMPATIBLE",
    "IN_USE",
    "Bitmap",
    "BitmapError",
    "bit_count",
    "DirectoryEntry",
    "data_size",
    "decode_directory",
    "decode_extension",
    "decode_table_entry",
    "encode_directory",
    "encode_extension",
    "table_size",
]

IN_USE = 1 << 0
AUTO = 1 << 1
EXTRA_DATA_COMPATIBLE = 1 << 2
_KNOWN_FLAGS = IN_USE | AUTO | EXTRA_DATA_COMPATIBLE
#: The only bitmap type defined: dirty tracking.
TYPE_DIRTY_TRACKING = 1
#: qemu's limits, which keep a hostile header from costing memory.
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME_SIZE = 1023
MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 64 * 1024 * 1024
MAX_TABLE_SIZE = 0x8000000  # entries
#: Bitmap data held in memory for all bitmaps of one image together.
MAX_DATA_BYTES = 512 * 1024 * 1024

_EXT = struct.Struct(">IIQQ")
_ENTRY = struct.Struct(">QIIBBHI")
_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
_ENTRY_RESERVED = 0xFF00_0000_0000_01FE


class BitmapError(ValueError):
    """Bitmap metadata that cannot be trusted; the message names the problem."""


def decode_extension(body: bytes) -> tuple[int, int, int]:
    """The extension's ``(nb_bitmaps, directory_size, directory_offset)``."""
    if len(body) < _EXT.size:
        raise BitmapError(f"bitmaps header extension is {len(body)} bytes, not {_EXT.size}")
    count, reserved, size, offset = _EXT.unpack_from(body)
    if reserved:
        raise BitmapError("bitmaps header extension: reserved field is not zero")
    if not 1 <= count <= MAX_BITMAPS:
        raise BitmapError(f"bitmaps header extension: {count} bitmaps (1 to {MAX_BITMAPS})")
    if not 0 < size <= MAX_DIRECTORY_SIZE:
        raise BitmapError(f"bitmap directory of {size} bytes (at most {MAX_DIRECTORY_SIZE})")
    return count, size, offset


def encode_extension(count: int, directory_size: int, directory_offset: int) -> bytes:
    """The extension's 24-byte body."""
    return _EXT.pack(count, 0, directory_size, directory_offset)


def data_size(image_size: int, granularity_bits: int) -> int:
    """Bytes of bitmap data for an image of ``image_size`` bytes."""
    return -(-bit_count(image_size, granularity_bits) // 8)


def bit_count(image_size: int, granularity_bits: int) -> int:
    """Bits in a bitmap of an image of ``image_size`` bytes."""
    return -(-image_size // (1 << granularity_bits))


def table_size(image_size: int, granularity_bits: int, cluster_size: int) -> int:
    """Entries in a bitmap table: one per cluster of bitmap data."""
    return -(-data_size(image_size, granularity_bits) // cluster_size)


@attrs.frozen
class DirectoryEntry:
    """One bitmap directory entry, as stored."""

    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra_data: bytes = b""


def decode_directory(raw: bytes, count: int) -> list[DirectoryEntry]:
    """Decode ``count`` directory entries from ``raw`` (the whole directory).

    As QEMU reads it: the padding after an entry is not looked at, and a name that
    is not UTF-8 keeps its bytes (as surrogate escapes, written back unchanged).

    Raises:
        BitmapError: an entry runs past the directory, has reserved flags, a bad name
            length, or a name used twice.
    """
    entries: list[DirectoryEntry] = []
    names: set[str] = set()
    pos = 0
    for i in range(count):
        if pos + _ENTRY.size > len(raw):
            raise BitmapError(f"bitmap directory entry {i} runs past the directory's end")
        offset, size, flags, kind, gbits, name_size, extra_size = _ENTRY.unpack_from(raw, pos)
        if flags & ~_KNOWN_FLAGS:
            raise BitmapError(f"bitmap directory entry {i} has reserved flags {flags:#x}")
        if not 1 <= name_size <= MAX_NAME_SIZE:
            raise BitmapError(f"bitmap directory entry {i} has a name of {name_size} bytes")
        if extra_size > MAX_DIRECTORY_SIZE:
            raise BitmapError(f"bitmap directory entry {i}: {extra_size} bytes of extra data")
        start = pos + _ENTRY.size
        end = start + extra_size + name_size
        padded = end + (-end % 8)
        if padded > len(raw):
            raise BitmapError(f"bitmap directory entry {i} runs past the directory's end")
        name = raw[start + extra_size : end].decode("utf-8", "surrogateescape")
        if name in names:
            raise BitmapError(f"bitmap name '{name}' is used twice")
        names.add(name)
        extra = bytes(raw[start : start + extra_size])
        entries.append(DirectoryEntry(offset, size, flags, kind, gbits, name, extra))
        pos = padded
    return entries


def encode_directory(entries: Sequence[DirectoryEntry]) -> bytes:
    """The directory's bytes, each entry padded to 8 bytes."""
    out = bytearray()
    for e in entries:
        name = e.name.encode("utf-8", "surrogateescape")
        out += _ENTRY.pack(
            e.table_offset,
            e.table_size,
            e.flags,
            e.type,
            e.granularity_bits,
            len(name),
            len(e.extra_data),
        )
        out += e.extra_data + name
        out += bytes(-len(out) % 8)
    return bytes(out)


def decode_table_entry(entry: int, cluster_size: int) -> tuple[int, bool]:
    """``(host_offset, all_ones)``: offset 0 means the cluster is not stored.

    Raises:
        BitmapError: reserved bits set, or an offset not aligned to a cluster.
    """
    if entry & _ENTRY_RESERVED:
        raise BitmapError(f"bitmap table entry {entry:#x} has reserved bits set")
    host = entry & _OFFSET_MASK
    if host and entry & 1:
        raise BitmapError(f"bitmap table entry {entry:#x} has bit 0 set with an offset")
    if host % cluster_size:
        raise BitmapError(f"bitmap data cluster offset {host:#x} is not cluster aligned")
    return host, bool(entry & 1) and not host


@attrs.define(eq=False)
class Bitmap:
    """A persistent dirty bitmap held in memory.

    Attributes:
        name: unique within the image.
        granularity_bits: each bit covers ``1 << granularity_bits`` guest bytes.
        auto: enabled: writes to the image must set its bits.
        bits: how many bits it has (the image's size over the granularity, rounded up).
        in_use: it was not saved correctly and may be inconsistent (kept as it is).
        data: the bits, :func:`data_size` bytes; unused bits of the last byte are 0.
        extra_data: type-specific extra data (kept as it is).
        stored: where it is on disk now - ``(table_offset, table_size, data clusters)``
            - or None for a bitmap not stored yet.
    """

    name: str
    granularity_bits: int
    auto: bool
    bits: int
    data: bytearray
    in_use: bool = False
    extra_data: bytes = b""
    extra_compatible: bool = False
    stored: tuple[int, int, tuple[int, ...]] | None = None

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def flags(self) -> int:
        return (
            (IN_USE if self.in_use else 0)
            | (AUTO if self.auto else 0)
            | (EXTRA_DATA_COMPATIBLE if self.extra_compatible else 0)
        )

    def describe(self) -> dict[str, object]:
        """qemu-img info's keys for one bitmap."""
        flags = (["in-use"] if self.in_use else []) + (["auto"] if self.auto else [])
        return {"flags": flags, "name": self.name, "granularity": self.granularity}

    def mark(self, offset: int, length: int) -> None:
        """Set the bits of every granule that ``[offset, offset + length)`` touches."""
        if length <= 0:
            return
        first = offset >> self.granularity_bits
        last = (offset + length - 1) >> self.granularity_bits
        last = min(last, self.bits - 1)
        if first > last:
            return
        lo, hi = first >> 3, last >> 3
        if lo == hi:
            self.data[lo] |= (0xFF << (first & 7)) & (0xFF >> (7 - (last & 7)))
            return
        self.data[lo] |= (0xFF << (first & 7)) & 0xFF
        if hi > lo + 1:
            self.data[lo + 1 : hi] = b"\xff" * (hi - lo - 1)
        self.data[hi] |= 0xFF >> (7 - (last & 7))
