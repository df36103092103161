"""VDI (VirtualBox) metadata as plain data: the header and the block map (no I/O).

A VDI file starts with a 512-byte little-endian header (a text banner, then the
signature ``0xbeda107f`` at offset 0x40), followed by the *block map* at
``offset_bmap`` and the data blocks from ``offset_data``::

    [ header 512 ][ block map: u32 per block, padded to a sector ][ block ][ block ]...

The virtual disk is cut into blocks of ``block_size`` bytes (1 MiB: the only size qemu
reads). Block map entry ``i`` is the number of the file block holding virtual block
``i`` - its data is at ``offset_data + entry * block_size`` - or ``0xFFFFFFFF``
(never written) or ``0xFFFFFFFE`` (discarded); both read as zeroes. A *dynamic* image
appends blocks as they are written and counts them in ``blocks_allocated``; a *static*
one has every block in place from the start.

:func:`parse_header` applies qemu 7.2's checks and a few of its own that keep a hostile
header from making a reader allocate or read absurd amounts; :class:`VdiFormatError`
names what is wrong and where.
"""

from __future__ import annotations

import enum
import struct
import sys
import uuid
from array import array

import attrs

__all__ = [
    "BLOCK_SIZE",
    "Header",
    "ImageType",
    "MAX_BLOCKS",
    "UNALLOCATED",
    "DISCARDED",
    "VdiFormatError",
    "decode_bmap",
    "encode_bmap",
    "new_header",
    "parse_header",
]

SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x0001_0001
TEXT = b"<<< QEMU VM Virtual Disk Image >>>\n"
HEADER_SIZE = 512
SECTOR = 512
#: The only block size qemu reads and writes.
BLOCK_SIZE = 1024 * 1024
UNALLOCATED = 0xFFFF_FFFF
DISCARDED = 0xFFFF_FFFE
#: qemu's limit on blocks (so that the block map stays under 4 GiB).
MAX_BLOCKS = 0x3FFF_FFFF
MAX_DISK_SIZE = MAX_BLOCKS * BLOCK_SIZE

_HEADER = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16s56s")
assert _HEADER.size == HEADER_SIZE


class VdiFormatError(ValueError):
    """The bytes are not a VDI image this driver can trust.

    Attributes:
        offset: the file offset of the offending field, when there is one.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


class ImageType(enum.IntEnum):
    """The header's image type."""

    DYNAMIC = 1
    STATIC = 2
    UNDO = 3
    DIFF = 4


@attrs.frozen
class Header:
    """The 512-byte VDI header (version 1.1), field by field."""

    text: bytes = TEXT.ljust(64, b"\0")
    signature: int = SIGNATURE
    version: int = VERSION_1_1
    header_size: int = 0x180
    image_type: int = ImageType.DYNAMIC
    image_flags: int = 0
    description: bytes = bytes(256)
    offset_bmap: int = 0x200
    offset_data: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    sector_size: int = SECTOR
    unused1: int = 0
    disk_size: int = 0
    block_size: int = BLOCK_SIZE
    block_extra: int = 0
    blocks_in_image: int = 0
    blocks_allocated: int = 0
    uuid_image: bytes = bytes(16)
    uuid_last_snap: bytes = bytes(16)
    uuid_link: bytes = bytes(16)
    uuid_parent: bytes = bytes(16)
    unused2: bytes = bytes(56)

    def encode(self) -> bytes:
        """The header's 512 bytes."""
        return _HEADER.pack(*attrs.astuple(self, recurse=False))

    @property
    def bmap_bytes(self) -> int:
        """Bytes of the block map on disk (whole sectors)."""
        return -(-self.blocks_in_image * 4 // SECTOR) * SECTOR


def decode_header(raw: bytes) -> Header:
    """Split 512 bytes into header fields without checking them."""
    if len(raw) < HEADER_SIZE:
        raise VdiFormatError(f"VDI header is truncated ({len(raw)} bytes)", 0)
    return Header(*_HEADER.unpack(bytes(raw[:HEADER_SIZE])))


def parse_header(raw: bytes, file_size: int | None = None) -> Header:
    """Decode and check a header, as qemu 7.2 does, plus bounds against ``file_size``.

    An odd ``disk_size`` (VBoxManage makes them) is rounded up to whole sectors.

    Raises:
        VdiFormatError: qemu would refuse it, or it claims more than the file holds.
    """
    h = decode_header(raw)
    if h.signature != SIGNATURE:
        raise VdiFormatError(f"Image not in VDI format (bad signature {h.signature:08x})", 0x40)
    if h.disk_size > MAX_DISK_SIZE:
        raise VdiFormatError(
            f"Unsupported VDI image size (size is {h.disk_size:#x}, max supported is "
            f"{MAX_DISK_SIZE:#x})",
            0x170,
        )
    if h.disk_size % SECTOR:
        h = attrs.evolve(h, disk_size=-(-h.disk_size // SECTOR) * SECTOR)
    if h.version != VERSION_1_1:
        raise VdiFormatError(
            f"unsupported VDI image (version {h.version >> 16}.{h.version & 0xFFFF})", 0x44
        )
    if h.offset_bmap % SECTOR:
        raise VdiFormatError(
            f"unsupported VDI image (unaligned block map offset {h.offset_bmap:#x})", 0x154
        )
    if h.offset_data % SECTOR:
        raise VdiFormatError(
            f"unsupported VDI image (unaligned data offset {h.offset_data:#x})", 0x158
        )
    if h.sector_size != SECTOR:
        raise VdiFormatError(
            f"unsupported VDI image (sector size {h.sector_size} is not {SECTOR})", 0x168
        )
    if h.block_size != BLOCK_SIZE:
        raise VdiFormatError(
            f"unsupported VDI image (block size {h.block_size} is not {BLOCK_SIZE})", 0x178
        )
    if h.disk_size > h.blocks_in_image * h.block_size:
        raise VdiFormatError(
            f"unsupported VDI image (disk size {h.disk_size}, image bitmap has room for "
            f"{h.blocks_in_image * h.block_size})",
            0x170,
        )
    if h.uuid_link != bytes(16):
        raise VdiFormatError("unsupported VDI image (non-NULL link UUID)", 0x1A8)
    if h.uuid_parent != bytes(16):
        raise VdiFormatError("unsupported VDI image (non-NULL parent UUID)", 0x1B8)
    if h.blocks_in_image > MAX_BLOCKS:
        raise VdiFormatError(
            f"unsupported VDI image (too many blocks {h.blocks_in_image}, max is {MAX_BLOCKS})",
            0x180,
        )
    if h.image_type not in (ImageType.DYNAMIC, ImageType.STATIC):
        raise VdiFormatError(f"unsupported VDI image type {h.image_type}", 0x4C)
    if h.offset_bmap < HEADER_SIZE:
        raise VdiFormatError(f"VDI block map at {h.offset_bmap:#x} overlaps the header", 0x154)
    if file_size is not None and h.offset_bmap + h.blocks_in_image * 4 > file_size:
        raise VdiFormatError(
            f"VDI block map at {h.offset_bmap:#x} ({h.blocks_in_image * 4} bytes) goes "
            f"beyond the end of the file ({file_size} bytes)",
            0x154,
        )
    if h.offset_data < h.offset_bmap + h.blocks_in_image * 4:
        raise VdiFormatError(f"VDI data offset {h.offset_data:#x} lies inside the block map", 0x158)
    return h


def new_header(size: int, static: bool) -> Header:
    """The header qemu 7.2 writes for a new image of ``size`` bytes (rounded to sectors)."""
    size = -(-size // SECTOR) * SECTOR
    if size > MAX_DISK_SIZE:
        raise VdiFormatError(
            f"Unsupported VDI image size (size is {size:#x}, max supported is {MAX_DISK_SIZE:#x})"
        )
    blocks = -(-size // BLOCK_SIZE)
    bmap = -(-blocks * 4 // SECTOR) * SECTOR
    if HEADER_SIZE + bmap > 0xFFFF_FFFF:
        # The data offset is a u32: the block map must end below 4 GiB.
        raise VdiFormatError(
            f"Unsupported VDI image size (size is {size:#x}: its block map would not fit "
            "below the 4 GiB data offset limit)"
        )
    return Header(
        image_type=ImageType.STATIC if static else ImageType.DYNAMIC,
        offset_bmap=HEADER_SIZE,
        offset_data=HEADER_SIZE + bmap,
        disk_size=size,
        blocks_in_image=blocks,
        blocks_allocated=blocks if static else 0,
        uuid_image=uuid.uuid4().bytes,
        uuid_last_snap=uuid.uuid4().bytes,
    )


def decode_bmap(raw: bytes) -> array[int]:
    """Little-endian u32 block map entries as an array of host-order ints."""
    table = array("I")
    assert table.itemsize == 4
    table.frombytes(raw[: len(raw) // 4 * 4])
    if sys.byteorder == "big":
        table.byteswap()
    return table


def encode_bmap(table: array[int], start: int = 0, stop: int | None = None) -> bytes:
    """Entries ``[start, stop)`` of ``table`` as little-endian bytes."""
    part = table[start:stop]
    if sys.byteorder == "big":
        part.byteswap()
    return part.tobytes()
