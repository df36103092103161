"""VHD (Virtual PC, qemu's ``vpc``) metadata as plain data: footer, dynamic header, BAT.

A VHD file ends with a 512-byte *footer* (big-endian, cookie ``conectix``) that says
what kind of disk it is and how big::

    fixed:    [ data: the whole virtual disk, raw ............ ][ footer ]
    dynamic:  [ footer copy ][ dynamic header, 1 KiB ][ BAT ][ block ]...[ block ][ footer ]

A *dynamic* disk is cut into blocks (2 MiB by default). The *dynamic header* (cookie
``cxsparse``) says where the *block allocation table* is and how many entries it has;
each BAT entry (a big-endian u32) is the sector number where the block lives in the
file, or ``0xFFFFFFFF`` when the block is absent and reads as zeroes. A present block
starts with a *sector bitmap* - one bit per 512-byte sector, most significant bit
first, rounded up to whole sectors - and then ``block_size`` bytes of data. A clear bit
means the sector holds nothing and reads as zeroes.

Both the footer and the dynamic header carry a checksum: the one's complement of the
sum of all their bytes, the checksum field counted as zero.

How big the virtual disk is depends on who made it. Virtual PC and QEMU (creator app
``vpc ``/``qemu``) use the CHS geometry in the footer - cylinders x heads x sectors -
which is why ``qemu-img create -f vpc`` rounds sizes *up* to a geometry it can
express. Hyper-V, disk2vhd, XenServer and QEMU with ``force_size=on`` (creator
``qem2``) use the footer's byte size. :func:`virtual_size` applies qemu 7.2's rules and
:func:`create_geometry` reproduces qemu's rounding when creating.

Nothing here does I/O; :class:`VpcFormatError` names what is wrong and where.
"""

from __future__ import annotations

import enum
import struct
import sys
import uuid
from array import array

import attrs

__all__ = [
    "BAT_UNUSED",
    "absent_mask",
    "DynamicHeader",
    "DiskType",
    "Footer",
    "VpcFormatError",
    "bitmap_size",
    "checksum",
    "create_geometry",
    "decode_bat",
    "encode_bat",
    "geometry",
    "parse_dynamic_header",
    "parse_footer",
    "sector_runs",
    "set_sector_bits",
    "virtual_size",
]

FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FOOTER_SIZE = 512
DYNAMIC_HEADER_SIZE = 1024
SECTOR = 512
#: A BAT entry for an absent block.
BAT_UNUSED = 0xFFFF_FFFF
#: Block size qemu (and Virtual PC) use for new dynamic disks.
DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024
#: Largest CHS geometry: 65535 cylinders, 16 heads, 255 sectors per track.
MAX_CHS = (65535, 16, 255)
VHD_MAX_GEOMETRY = 65535 * 16 * 255
#: Largest virtual disk qemu accepts: 2040 GiB, in sectors.
VHD_MAX_SECTORS = 0xFF00_0000
#: Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC, the VHD epoch.
TIMESTAMP_BASE = 946_684_800
#: Creator apps whose images are sized by ``current_size`` rather than by CHS.
SIZE_BY_BYTES_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\x00")

_FOOTER = struct.Struct(">8sIIQI4sHH4sQQHBBII16sB427s")
_DYN = struct.Struct(">8sQQIIII16sII512s192s256s")
assert _FOOTER.size == FOOTER_SIZE and _DYN.size == DYNAMIC_HEADER_SIZE


class VpcFormatError(ValueError):
    """The bytes are not a VHD image this driver can trust.

    Attributes:
        offset: the file offset of the offending structure, when there is one.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


class DiskType(enum.IntEnum):
    """The footer's disk type."""

    FIXED = 2
    DYNAMIC = 3
    DIFFERENCING = 4


def checksum(data: bytes, field: int) -> int:
    """One's complement of the byte sum of ``data``, the u32 at ``field`` counted as zero."""
    total = sum(data) - sum(data[field : field + 4])
    return ~total & 0xFFFF_FFFF


@attrs.frozen
class Footer:
    """The 512-byte hard disk footer. ``encode`` fills in the checksum."""

    cookie: bytes = FOOTER_COOKIE
    features: int = 2
    version: int = 0x0001_0000
    data_offset: int = 0xFFFF_FFFF_FFFF_FFFF
    timestamp: int = 0
    creator_app: bytes = b"qemu"
    creator_version_major: int = 5
    creator_version_minor: int = 3
    creator_os: bytes = b"Wi2k"
    original_size: int = 0
    current_size: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors_per_track: int = 0
    disk_type: int = DiskType.DYNAMIC
    checksum: int = 0
    uuid: bytes = bytes(16)
    saved_state: int = 0
    reserved: bytes = bytes(427)

    _CHECKSUM_AT = 64

    def encode(self) -> bytes:
        """The footer's bytes, with a correct checksum."""
        raw = _FOOTER.pack(*attrs.astuple(self, recurse=False))
        value = checksum(raw, self._CHECKSUM_AT)
        return raw[: self._CHECKSUM_AT] + value.to_bytes(4, "big") + raw[self._CHECKSUM_AT + 4 :]


def parse_footer(raw: bytes, offset: int = 0) -> Footer:
    """Decode and verify a footer read at file offset ``offset``.

    Raises:
        VpcFormatError: wrong cookie or checksum.
    """
    if len(raw) < FOOTER_SIZE:
        raise VpcFormatError(f"VHD footer at {offset} is truncated", offset)
    raw = bytes(raw[:FOOTER_SIZE])
    footer = Footer(*_FOOTER.unpack(raw))
    if footer.cookie != FOOTER_COOKIE:
        raise VpcFormatError(f"no VHD footer (cookie 'conectix') at offset {offset}", offset)
    expect = checksum(raw, Footer._CHECKSUM_AT)
    if footer.checksum != expect:
        raise VpcFormatError(
            f"incorrect VHD footer checksum at offset {offset} "
            f"(stored {footer.checksum:#010x}, computed {expect:#010x})",
            offset,
        )
    return footer


@attrs.frozen
class DynamicHeader:
    """The 1 KiB dynamic disk header. ``encode`` fills in the checksum."""

    cookie: bytes = HEADER_COOKIE
    data_offset: int = 0xFFFF_FFFF_FFFF_FFFF
    table_offset: int = 3 * SECTOR
    version: int = 0x0001_0000
    max_table_entries: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    checksum: int = 0
    parent_uuid: bytes = bytes(16)
    parent_timestamp: int = 0
    reserved: int = 0
    parent_name: bytes = bytes(512)
    parent_locators: bytes = bytes(192)
    reserved2: bytes = bytes(256)

    _CHECKSUM_AT = 36

    def encode(self) -> bytes:
        """The header's bytes, with a correct checksum."""
        raw = _DYN.pack(*attrs.astuple(self, recurse=False))
        value = checksum(raw, self._CHECKSUM_AT)
        return raw[: self._CHECKSUM_AT] + value.to_bytes(4, "big") + raw[self._CHECKSUM_AT + 4 :]


def parse_dynamic_header(raw: bytes, offset: int) -> DynamicHeader:
    """Decode and verify the dynamic header read at ``offset``.

    Checks the cookie, the checksum and the block size (a power of two from 512 bytes).

    Raises:
        VpcFormatError: it cannot be trusted.
    """
    if len(raw) < DYNAMIC_HEADER_SIZE:
        raise VpcFormatError(f"VHD dynamic header at {offset} is truncated", offset)
    raw = bytes(raw[:DYNAMIC_HEADER_SIZE])
    header = DynamicHeader(*_DYN.unpack(raw))
    if header.cookie != HEADER_COOKIE:
        raise VpcFormatError(
            f"invalid VHD dynamic header magic at offset {offset} (expected 'cxsparse')", offset
        )
    expect = checksum(raw, DynamicHeader._CHECKSUM_AT)
    if header.checksum != expect:
        raise VpcFormatError(
            f"incorrect VHD dynamic header checksum at offset {offset} "
            f"(stored {header.checksum:#010x}, computed {expect:#010x})",
            offset,
        )
    bs = header.block_size
    if bs < SECTOR or bs & (bs - 1):
        raise VpcFormatError(f"invalid VHD block size {bs} at offset {offset + 28}", offset + 28)
    return header


def bitmap_size(block_size: int) -> int:
    """Bytes of the sector bitmap in front of each block: one bit a sector, whole sectors."""
    return -(-(block_size // (8 * SECTOR)) // SECTOR) * SECTOR


def virtual_size(footer: Footer) -> int:
    """The virtual disk size in bytes, by qemu 7.2's rules (CHS or ``current_size``)."""
    sectors = footer.cylinders * footer.heads * footer.sectors_per_track
    if footer.creator_app in SIZE_BY_BYTES_CREATORS or sectors == VHD_MAX_GEOMETRY:
        sectors = footer.current_size // SECTOR
    return sectors * SECTOR


def geometry(total_sectors: int) -> tuple[int, int, int]:
    """CHS for ``total_sectors``, rounding down: the VHD specification's algorithm."""
    total_sectors = min(total_sectors, VHD_MAX_GEOMETRY)
    if total_sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total_sectors // spt
    else:
        spt = 17
        cth = total_sectors // spt
        heads = max(4, -(-cth // 1024))
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total_sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total_sectors // spt
    return cth // heads, heads, spt


def create_geometry(size: int, force_size: bool) -> tuple[tuple[int, int, int], int]:
    """The geometry and byte size qemu 7.2 gives a new image of ``size`` bytes.

    Without ``force_size`` the size grows to the smallest geometry that holds it (so a
    conversion never truncates); when even the largest geometry is too small, or with
    ``force_size``, the geometry is the maximum and the byte size is kept.

    Raises:
        VpcFormatError: the size is over 2040 GiB.
    """
    size = -(-size // SECTOR) * SECTOR
    if force_size:
        chs = MAX_CHS
    else:
        total = min(VHD_MAX_GEOMETRY, size // SECTOR)
        chs, i = (0, 0, 0), 0
        while total > chs[0] * chs[1] * chs[2]:
            chs = geometry(total + i)
            i += 1
    product = chs[0] * chs[1] * chs[2]
    if product == VHD_MAX_GEOMETRY:
        if size // SECTOR > VHD_MAX_SECTORS:
            raise VpcFormatError("Disk size is too large, max size is 2040 GiB")
        return chs, size
    return chs, product * SECTOR


def new_footer(size: int, chs: tuple[int, int, int], disk_type: DiskType, force: bool) -> Footer:
    """A footer for a new image, as qemu writes it (random UUID, current time)."""
    import time

    return Footer(
        data_offset=SECTOR if disk_type is DiskType.DYNAMIC else 0xFFFF_FFFF_FFFF_FFFF,
        timestamp=(int(time.time()) - TIMESTAMP_BASE) & 0xFFFF_FFFF,
        creator_app=b"qem2" if force else b"qemu",
        original_size=size,
        current_size=size,
        cylinders=chs[0],
        heads=chs[1],
        sectors_per_track=chs[2],
        disk_type=disk_type,
        uuid=uuid.uuid4().bytes,
    )


def decode_bat(raw: bytes) -> array[int]:
    """Big-endian u32 BAT entries as an array of host-order ints."""
    table = array("I")
    assert table.itemsize == 4
    table.frombytes(raw[: len(raw) // 4 * 4])
    if sys.byteorder == "little":
        table.byteswap()
    return table


_FF_TO_ONE = bytes(255) + b"\x01"


def absent_mask(table: array[int]) -> bytes:
    """One byte per BAT entry: 1 where it is :data:`BAT_UNUSED`, 0 elsewhere.

    Done with C-level operations, not a loop over entries: an entry is unused exactly
    when its four bytes are all 0xFF, so each of the four byte lanes (every fourth byte)
    is translated to 1/0 and the lanes are ANDed together as big integers.
    """
    raw = table.tobytes()
    n = len(table)
    acc = -1
    for lane in range(4):
        acc &= int.from_bytes(raw[lane::4].translate(_FF_TO_ONE), "big")
    return acc.to_bytes(n, "big") if n else b""


def encode_bat(table: array[int], start: int = 0, stop: int | None = None) -> bytes:
    """Entries ``[start, stop)`` of ``table`` as big-endian bytes."""
    part = table[start:stop]
    if sys.byteorder == "little":
        part.byteswap()
    return part.tobytes()


def sector_runs(bitmap: bytes, first: int, last: int) -> list[tuple[int, int, bool]]:
    """Runs ``(first_sector, end_sector, present)`` of the bitmap over ``[first, last)``.

    The bitmap is read as one big-endian integer, so sector ``i`` is bit
    ``8 * len(bitmap) - 1 - i``, and runs are found with integer bit operations.
    """
    nbits = len(bitmap) * 8
    if last <= first:
        return []
    width = last - first
    word = (int.from_bytes(bitmap, "big") >> (nbits - last)) & ((1 << width) - 1)
    runs: list[tuple[int, int, bool]] = []
    pos = first
    while width:
        mask = (1 << width) - 1
        if (word >> (width - 1)) & 1:
            run = width - ((~word) & mask).bit_length()
            present = True
        else:
            run = width - word.bit_length()
            present = False
        runs.append((pos, pos + run, present))
        pos += run
        width -= run
        word &= (1 << width) - 1
    return runs


def first_sector_run(bitmap: bytes, first: int, last: int) -> tuple[int, int, bool]:
    """The first of :func:`sector_runs` over ``[first, last)`` (which must not be empty),
    in a few integer operations however many runs follow."""
    nbits = len(bitmap) * 8
    width = last - first
    word = (int.from_bytes(bitmap, "big") >> (nbits - last)) & ((1 << width) - 1)
    if (word >> (width - 1)) & 1:
        return first, first + width - ((~word) & ((1 << width) - 1)).bit_length(), True
    return first, first + width - word.bit_length(), False


def set_sector_bits(bitmap: bytes, first: int, last: int) -> bytes:
    """``bitmap`` with the bits of sectors ``[first, last)`` set."""
    nbits = len(bitmap) * 8
    mask = ((1 << (last - first)) - 1) << (nbits - last)
    return (int.from_bytes(bitmap, "big") | mask).to_bytes(len(bitmap), "big")
