"""VHDX metadata as plain data: headers, region table, metadata, BAT and log (no I/O).

A VHDX file (Microsoft's VHDX 1.0 specification) begins with a 1 MiB *header section*
of five 64 KiB parts, everything little-endian::

    0        64K        128K       192K            256K            320K ... 1M
    | file id | header 1 | header 2 | region table 1 | region table 2 | reserved

* The **file identifier** is ``"vhdxfile"`` and an optional UTF-16 creator string.
* Two **headers** (signature ``"head"``) each carry a sequence number; the valid one with
  the higher number is current. A header names the *log* (offset, length and a GUID that
  is zero when the log is empty) and is protected by a CRC-32C over its 4 KiB.
* The **region table** (``"regi"``, CRC-32C over 64 KiB) locates the two required
  regions by GUID: the *BAT* and the *metadata region*.
* The **metadata region** starts with a table (``"metadata"``) of items, also by GUID:
  file parameters (block size, "leave blocks allocated" = fixed, "has parent" =
  differencing), virtual disk size, logical and physical sector size, page 83 data.
* The **BAT** (block allocation table) has one 64-bit entry per *payload block* of the
  virtual disk: a 3-bit state and a file offset in MiB. After every ``chunk_ratio``
  payload entries comes one *sector bitmap* entry (used only by differencing images),
  where ``chunk_ratio = 2**23 * logical_sector_size / block_size``. So payload block
  ``b`` is BAT entry ``b + b // chunk_ratio``.

Payload block states: NOT_PRESENT (0), UNDEFINED (1), ZERO (2), UNMAPPED (3, and 5 in
pre-1.0 files) all read as zeroes; FULLY_PRESENT (6) is data at the offset;
PARTIALLY_PRESENT (7) defers to a parent image through the sector bitmap.

The **log** is a circular buffer of 4 KiB sectors holding metadata updates that were
not yet applied. A non-zero log GUID in the current header with a valid sequence of
entries means the file is *dirty*: those entries must be replayed before the metadata
can be trusted. :func:`decode_log_entry` checks one entry and :func:`active_sequence`
finds the entries to replay.

This module encodes and decodes all of this from bytes and refuses, with a
:class:`VhdxFormatError` naming the problem and offset, whatever would make a reader
misbehave.
"""

from __future__ import annotations

import enum
import struct
import uuid
from array import array

import attrs

__all__ = [
    "BAT_GUID",
    "BlockState",
    "FileParameters",
    "Header",
    "Metadata",
    "MetadataEntry",
    "RegionEntry",
    "VhdxFormatError",
    "bat_index",
    "chunk_ratio",
    "crc32c",
    "decode_bat",
    "decode_header",
    "decode_metadata_table",
    "decode_region_table",
    "encode_bat_entry",
    "encode_header",
    "encode_metadata",
    "encode_region_table",
    "total_bat_entries",
]

KiB = 1024
MiB = 1024 * 1024

FILE_SIGNATURE = b"vhdxfile"
HEADER_SIGNATURE = b"head"
REGION_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"
LOG_SIGNATURE = b"loge"

HEADER_BLOCK = 64 * KiB
HEADER1_OFFSET = 64 * KiB
HEADER2_OFFSET = 128 * KiB
REGION1_OFFSET = 192 * KiB
REGION2_OFFSET = 256 * KiB
HEADER_SECTION_END = 1 * MiB
#: The header checksum covers the first 4 KiB of its 64 KiB block.
HEADER_SIZE = 4 * KiB
REGION_TABLE_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB
MAX_REGION_ENTRIES = 2047
MAX_METADATA_ENTRIES = 2047
LOG_SECTOR = 4 * KiB

BLOCK_SIZE_MIN = 1 * MiB
BLOCK_SIZE_MAX = 256 * MiB
MAX_SECTORS_PER_BLOCK = 1 << 23
MAX_IMAGE_SIZE = 64 * 1024 * 1024 * MiB  # 64 TiB
DEFAULT_LOG_SIZE = 1 * MiB
BAT_OFFSET_MASK = 0xFFFF_FFFF_FFF0_0000
BAT_STATE_MASK = 7


def _msguid(text: str) -> bytes:
    """A GUID as VHDX stores it: the first three fields little-endian (Microsoft order)."""
    return uuid.UUID(text).bytes_le


BAT_GUID = _msguid("2dc27766-f623-4200-9d64-115e9bfd4a08")
METADATA_GUID = _msguid("8b7ca206-4790-4b9a-b8fe-575f050f886e")
FILE_PARAMETERS_GUID = _msguid("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
VIRTUAL_DISK_SIZE_GUID = _msguid("2fa54224-cd1b-4876-b211-5dbed83bf4b8")
PAGE83_GUID = _msguid("beca12ab-b2e6-4523-93ef-c309e000c746")
LOGICAL_SECTOR_GUID = _msguid("8141bf1d-a96f-4709-ba47-f233a8faab5f")
PHYSICAL_SECTOR_GUID = _msguid("cda348c7-445d-4471-9cc9-e9885251c556")
PARENT_LOCATOR_GUID = _msguid("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
ZERO_GUID = bytes(16)

#: Region and metadata entry flag: a reader must understand the entry to open the file.
REQUIRED = 1
META_IS_VIRTUAL_DISK = 2
META_IS_REQUIRED = 4
PARAM_LEAVE_BLOCKS_ALLOCATED = 1
PARAM_HAS_PARENT = 2


class VhdxFormatError(ValueError):
    """The bytes are not a VHDX image this reader can trust.

    Attributes:
        offset: the file offset of the offending structure, when there is one.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


class BlockState(enum.IntEnum):
    """The state of a payload BAT entry (its low three bits)."""

    NOT_PRESENT = 0
    UNDEFINED = 1
    ZERO = 2
    UNMAPPED = 3
    UNMAPPED_V095 = 5
    FULLY_PRESENT = 6
    PARTIALLY_PRESENT = 7


#: States that read as zeroes without a parent.
ZERO_STATES = frozenset(
    {
        BlockState.NOT_PRESENT,
        BlockState.UNDEFINED,
        BlockState.ZERO,
        BlockState.UNMAPPED,
        BlockState.UNMAPPED_V095,
    }
)


# -- CRC-32C ---------------------------------------------------------------------------


def _crc_tables() -> tuple[array[int], ...]:
    """Slicing-by-8 tables for the reflected Castagnoli polynomial 0x82F63B78."""
    t0 = array("L", [0] * 256)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        t0[i] = c
    tables = [t0]
    for _ in range(7):
        prev = tables[-1]
        tables.append(array("L", [(prev[i] >> 8) ^ t0[prev[i] & 0xFF] for i in range(256)]))
    return tuple(tables)


_T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7 = _crc_tables()
_QWORDS = struct.Struct("<II")


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) of ``data``, continuing from ``crc`` (0 to start).

    Table-driven, eight bytes per step. VHDX checksums only small structures (4 KiB
    headers, the 64 KiB region table, log entries), for which this is fast enough.
    """
    view = memoryview(data).cast("B")
    crc ^= 0xFFFFFFFF
    n8 = len(view) - len(view) % 8
    t0, t1, t2, t3, t4, t5, t6, t7 = _T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7
    for lo, hi in _QWORDS.iter_unpack(view[:n8]):
        x = crc ^ lo
        crc = (
            t7[x & 0xFF]
            ^ t6[(x >> 8) & 0xFF]
            ^ t5[(x >> 16) & 0xFF]
            ^ t4[x >> 24]
            ^ t3[hi & 0xFF]
            ^ t2[(hi >> 8) & 0xFF]
            ^ t1[(hi >> 16) & 0xFF]
            ^ t0[hi >> 24]
        )
    for byte in view[n8:]:
        crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def checksum_with_zeroed_field(buf: bytes | bytearray | memoryview, at: int = 4) -> int:
    """The CRC-32C of ``buf`` with its 4-byte checksum field at ``at`` taken as zero."""
    raw = bytes(buf)
    return crc32c(raw[:at] + bytes(4) + raw[at + 4 :])


def _seal(buf: bytearray, at: int = 4) -> bytearray:
    """Write the CRC-32C of ``buf`` into its checksum field."""
    buf[at : at + 4] = bytes(4)
    struct.pack_into("<I", buf, at, crc32c(buf))
    return buf


# -- headers ---------------------------------------------------------------------------

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")


@attrs.frozen
class Header:
    """One of the two VHDX headers (the first 80 bytes of its 4 KiB)."""

    sequence_number: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes = ZERO_GUID
    log_version: int = 0
    version: int = 1
    log_length: int = DEFAULT_LOG_SIZE
    log_offset: int = HEADER_SECTION_END


def encode_header(h: Header) -> bytes:
    """The 4 KiB a header occupies, with its checksum."""
    buf = bytearray(HEADER_SIZE)
    _HEADER.pack_into(
        buf,
        0,
        HEADER_SIGNATURE,
        0,
        h.sequence_number,
        h.file_write_guid,
        h.data_write_guid,
        h.log_guid,
        h.log_version,
        h.version,
        h.log_length,
        h.log_offset,
    )
    return bytes(_seal(buf))


def decode_header(buf: bytes | bytearray | memoryview) -> Header | None:
    """Decode a header's 4 KiB; None when it is not a valid header (bad checksum,
    signature or version) - the other copy may still be good."""
    if len(buf) < HEADER_SIZE:
        return None
    raw = bytes(buf[:HEADER_SIZE])
    (sig, crc, seq, fwg, dwg, lg, log_version, version, log_length, log_offset) = (
        _HEADER.unpack_from(raw)
    )
    if sig != HEADER_SIGNATURE or version != 1:
        return None
    if checksum_with_zeroed_field(raw) != crc:
        return None
    return Header(seq, fwg, dwg, lg, log_version, version, log_length, log_offset)


def current_header(h1: Header | None, h2: Header | None) -> tuple[int, Header]:
    """Choose the current header as qemu does: the valid one with the higher sequence
    number; identical copies are fine, equal numbers with different contents are not.

    Returns ``(index, header)`` with index 0 or 1.
    """
    if h1 is None and h2 is None:
        raise VhdxFormatError("No valid VHDX header found (bad signatures or checksums)")
    if h2 is None:
        assert h1 is not None
        return 0, h1
    if h1 is None:
        return 1, h2
    if h1.sequence_number > h2.sequence_number:
        return 0, h1
    if h2.sequence_number > h1.sequence_number:
        return 1, h2
    if h1 == h2:
        return 0, h1
    raise VhdxFormatError(
        f"No valid VHDX header found: both headers have sequence number "
        f"{h1.sequence_number} but differ",
        HEADER1_OFFSET,
    )


# -- region table ----------------------------------------------------------------------

_REGION_HEADER = struct.Struct("<4sIII")
_REGION_ENTRY = struct.Struct("<16sQII")


@attrs.frozen
class RegionEntry:
    """A region table entry: a GUID, where the region is and how long."""

    guid: bytes
    file_offset: int
    length: int
    required: bool = False

    @property
    def end(self) -> int:
        return self.file_offset + self.length


def encode_region_table(entries: list[RegionEntry]) -> bytes:
    """The 64 KiB region table, with its checksum."""
    if len(entries) > MAX_REGION_ENTRIES:
        raise ValueError("too many region table entries")
    buf = bytearray(REGION_TABLE_SIZE)
    _REGION_HEADER.pack_into(buf, 0, REGION_SIGNATURE, 0, len(entries), 0)
    for i, e in enumerate(entries):
        _REGION_ENTRY.pack_into(
            buf, 16 + 32 * i, e.guid, e.file_offset, e.length, REQUIRED if e.required else 0
        )
    return bytes(_seal(buf))


def decode_region_table(
    buf: bytes | bytearray | memoryview, offset: int = REGION1_OFFSET
) -> list[RegionEntry]:
    """Decode and check the 64 KiB region table (``offset`` is for messages)."""
    raw = bytes(buf[:REGION_TABLE_SIZE])
    if len(raw) < REGION_TABLE_SIZE:
        raise VhdxFormatError(f"region table at {offset:#x} is truncated", offset)
    sig, crc, count, _ = _REGION_HEADER.unpack_from(raw)
    if sig != REGION_SIGNATURE:
        raise VhdxFormatError(f"region table at {offset:#x} has no 'regi' signature", offset)
    if checksum_with_zeroed_field(raw) != crc:
        raise VhdxFormatError(f"region table at {offset:#x} has a bad checksum", offset)
    if count > MAX_REGION_ENTRIES:
        raise VhdxFormatError(
            f"region table at {offset:#x} claims {count} entries (at most {MAX_REGION_ENTRIES})",
            offset,
        )
    out = []
    for i in range(count):
        guid, file_offset, length, bits = _REGION_ENTRY.unpack_from(raw, 16 + 32 * i)
        out.append(RegionEntry(guid, file_offset, length, bool(bits & REQUIRED)))
    return out


# -- metadata --------------------------------------------------------------------------

_META_HEADER = struct.Struct("<8sHH20x")
_META_ENTRY = struct.Struct("<16sIII4x")


@attrs.frozen
class MetadataEntry:
    """A metadata table entry: an item's GUID, offset (from the region's start), length."""

    guid: bytes
    offset: int
    length: int
    flags: int = 0


@attrs.frozen
class FileParameters:
    """The file parameters item."""

    block_size: int
    leave_blocks_allocated: bool = False
    has_parent: bool = False


@attrs.frozen
class Metadata:
    """The metadata items a reader needs."""

    params: FileParameters
    virtual_size: int
    logical_sector_size: int = 512
    physical_sector_size: int = 512
    page83: bytes = ZERO_GUID


def decode_metadata_table(
    buf: bytes | bytearray | memoryview, offset: int
) -> dict[bytes, MetadataEntry]:
    """Decode the metadata table (the region's first 64 KiB), keyed by item GUID.

    Raises:
        VhdxFormatError: bad signature, too many or duplicate entries, an item outside
            the region, or a required item this reader does not know.
    """
    raw = bytes(buf[:METADATA_TABLE_SIZE])
    if len(raw) < 32:
        raise VhdxFormatError(f"metadata table at {offset:#x} is truncated", offset)
    sig, _, count = _META_HEADER.unpack_from(raw)
    if sig != METADATA_SIGNATURE:
        raise VhdxFormatError(f"metadata table at {offset:#x} has no 'metadata' signature", offset)
    if count > MAX_METADATA_ENTRIES or 32 + 32 * count > len(raw):
        raise VhdxFormatError(
            f"metadata table at {offset:#x} claims {count} entries (at most "
            f"{MAX_METADATA_ENTRIES})",
            offset,
        )
    known = {
        FILE_PARAMETERS_GUID,
        VIRTUAL_DISK_SIZE_GUID,
        PAGE83_GUID,
        LOGICAL_SECTOR_GUID,
        PHYSICAL_SECTOR_GUID,
        PARENT_LOCATOR_GUID,
    }
    out: dict[bytes, MetadataEntry] = {}
    for i in range(count):
        guid, item_offset, length, flags = _META_ENTRY.unpack_from(raw, 32 + 32 * i)
        if guid in known:
            if guid in out:
                raise VhdxFormatError(
                    f"metadata table at {offset:#x} lists item {uuid.UUID(bytes_le=guid)} twice",
                    offset,
                )
            out[guid] = MetadataEntry(guid, item_offset, length, flags)
        elif flags & META_IS_REQUIRED:
            raise VhdxFormatError(
                f"metadata table at {offset:#x} has a required item this reader does not "
                f"know: {uuid.UUID(bytes_le=guid)}",
                offset,
            )
    missing = known - {PARENT_LOCATOR_GUID} - set(out)
    if missing:
        names = ", ".join(str(uuid.UUID(bytes_le=g)) for g in sorted(missing))
        raise VhdxFormatError(
            f"metadata table at {offset:#x} lacks required items: {names}", offset
        )
    return out


def item_span(entries: dict[bytes, MetadataEntry], region: RegionEntry) -> tuple[int, int]:
    """The byte range, relative to the region's start, that holds the required items."""
    lo = min(e.offset for g, e in entries.items() if g != PARENT_LOCATOR_GUID)
    hi = max(e.offset + e.length for g, e in entries.items() if g != PARENT_LOCATOR_GUID)
    return lo, hi


def decode_metadata_items(
    entries: dict[bytes, MetadataEntry], items: bytes, base: int, region: RegionEntry
) -> Metadata:
    """Decode the required items from ``items``, the region's bytes from ``base`` on.

    Raises:
        VhdxFormatError: an item is too short or lies outside the region, or a value is
            out of range (block size, sector size, virtual size).
    """

    def item(guid: bytes, size: int, what: str) -> bytes:
        e = entries[guid]
        if e.length < size or e.offset + size > region.length or e.offset < base:
            raise VhdxFormatError(
                f"metadata item '{what}' at {region.file_offset + e.offset:#x} "
                f"(length {e.length}) is invalid",
                region.file_offset + e.offset,
            )
        at = e.offset - base
        if at + size > len(items):
            raise VhdxFormatError(
                f"metadata item '{what}' lies beyond the end of the file",
                region.file_offset + e.offset,
            )
        return items[at : at + size]

    block_size, bits = struct.unpack("<II", item(FILE_PARAMETERS_GUID, 8, "file parameters"))
    (virtual_size,) = struct.unpack("<Q", item(VIRTUAL_DISK_SIZE_GUID, 8, "virtual disk size"))
    (logical,) = struct.unpack("<I", item(LOGICAL_SECTOR_GUID, 4, "logical sector size"))
    (physical,) = struct.unpack("<I", item(PHYSICAL_SECTOR_GUID, 4, "physical sector size"))
    page83 = item(PAGE83_GUID, 16, "page 83 data")
    params = FileParameters(
        block_size, bool(bits & PARAM_LEAVE_BLOCKS_ALLOCATED), bool(bits & PARAM_HAS_PARENT)
    )
    meta = Metadata(params, virtual_size, logical, physical, page83)
    check_metadata(meta, region.file_offset)
    return meta


def check_metadata(meta: Metadata, offset: int) -> None:
    """Refuse values qemu refuses (and that would make the arithmetic absurd)."""
    bs = meta.params.block_size
    if bs < BLOCK_SIZE_MIN or bs > BLOCK_SIZE_MAX or bs & (bs - 1):
        raise VhdxFormatError(
            f"invalid block size {bs} (must be a power of two from 1 MiB to 256 MiB)", offset
        )
    if meta.logical_sector_size not in (512, 4096):
        raise VhdxFormatError(
            f"invalid logical sector size {meta.logical_sector_size} (512 or 4096)", offset
        )
    if meta.physical_sector_size not in (512, 4096):
        raise VhdxFormatError(
            f"invalid physical sector size {meta.physical_sector_size} (512 or 4096)", offset
        )
    if meta.virtual_size > MAX_IMAGE_SIZE or meta.virtual_size % meta.logical_sector_size:
        raise VhdxFormatError(
            f"invalid virtual disk size {meta.virtual_size} (a multiple of the logical "
            f"sector size, at most 64 TiB)",
            offset,
        )


def encode_metadata(meta: Metadata) -> tuple[bytes, bytes]:
    """The metadata table (64 KiB) and the items that follow it at +64 KiB, as qemu
    lays them out: file parameters, virtual size, page 83, logical, physical sector."""
    p = meta.params
    bits = (PARAM_LEAVE_BLOCKS_ALLOCATED if p.leave_blocks_allocated else 0) | (
        PARAM_HAS_PARENT if p.has_parent else 0
    )
    disk = META_IS_REQUIRED | META_IS_VIRTUAL_DISK
    items = [
        (FILE_PARAMETERS_GUID, struct.pack("<II", p.block_size, bits), META_IS_REQUIRED),
        (VIRTUAL_DISK_SIZE_GUID, struct.pack("<Q", meta.virtual_size), disk),
        (PAGE83_GUID, meta.page83, disk),
        (LOGICAL_SECTOR_GUID, struct.pack("<I", meta.logical_sector_size), disk),
        (PHYSICAL_SECTOR_GUID, struct.pack("<I", meta.physical_sector_size), disk),
    ]
    table = bytearray(METADATA_TABLE_SIZE)
    _META_HEADER.pack_into(table, 0, METADATA_SIGNATURE, 0, len(items))
    offset = METADATA_TABLE_SIZE
    data = bytearray()
    for i, (guid, value, flags) in enumerate(items):
        _META_ENTRY.pack_into(table, 32 + 32 * i, guid, offset, len(value), flags)
        offset += len(value)
        data += value
    return bytes(table), bytes(data)


# -- BAT -------------------------------------------------------------------------------


def chunk_ratio(block_size: int, logical_sector_size: int) -> int:
    """Payload blocks per sector bitmap block."""
    return MAX_SECTORS_PER_BLOCK * logical_sector_size // block_size


def total_bat_entries(virtual_size: int, block_size: int, ratio: int) -> int:
    """BAT entries of a non-differencing image: payload entries and the sector bitmap
    entries interleaved between them (none after the last payload entry)."""
    blocks = -(-virtual_size // block_size)
    if blocks == 0:
        return 0
    return blocks + (blocks - 1) // ratio


def bat_index(block: int, ratio: int) -> int:
    """The BAT entry of payload block ``block``."""
    return block + block // ratio


def decode_bat(raw: bytes | bytearray | memoryview) -> array[int]:
    """The BAT as an array of 64-bit entries in host order."""
    table = array("Q")
    table.frombytes(bytes(raw[: len(raw) - len(raw) % 8]))
    if struct.pack("=H", 1) != struct.pack("<H", 1):  # pragma: no cover - big-endian host
        table.byteswap()
    return table


def encode_bat(table: array[int]) -> bytes:
    """The on-disk bytes of BAT entries."""
    if struct.pack("=H", 1) != struct.pack("<H", 1):  # pragma: no cover - big-endian host
        swapped = array("Q", table)
        swapped.byteswap()
        return swapped.tobytes()
    return table.tobytes()


def encode_bat_entry(state: int, file_offset: int) -> int:
    """A BAT entry: ``file_offset`` (a multiple of 1 MiB) and a state."""
    if file_offset % MiB or file_offset >> 64:
        raise ValueError(f"BAT file offset {file_offset} is not a multiple of 1 MiB")
    return file_offset | (state & BAT_STATE_MASK)


def entry_state(entry: int) -> int:
    return entry & BAT_STATE_MASK


def entry_offset(entry: int) -> int:
    return entry & BAT_OFFSET_MASK


# -- log -------------------------------------------------------------------------------

_LOG_ENTRY = struct.Struct("<4sIIIQII16sQQ")


@attrs.frozen
class LogEntryHeader:
    """The 64-byte header at the start of a log entry."""

    checksum: int
    entry_length: int
    tail: int
    sequence_number: int
    descriptor_count: int
    log_guid: bytes
    flushed_file_offset: int
    last_file_offset: int


def decode_log_entry_header(buf: bytes | bytearray | memoryview) -> LogEntryHeader | None:
    """The log entry header at the start of ``buf``; None when there is none."""
    if len(buf) < 64:
        return None
    sig, crc, length, tail, seq, count, _, guid, flushed, last = _LOG_ENTRY.unpack_from(buf)
    if sig != LOG_SIGNATURE:
        return None
    return LogEntryHeader(crc, length, tail, seq, count, guid, flushed, last)


def log_entry_plausible(h: LogEntryHeader, log_guid: bytes, log_length: int) -> bool:
    """The checks qemu makes on a log entry header before reading the entry."""
    return (
        h.entry_length <= log_length
        and h.entry_length % LOG_SECTOR == 0
        and h.entry_length > 0
        and h.sequence_number != 0
        and h.log_guid == log_guid
        and h.descriptor_count * 32 <= h.entry_length
    )


def check_header_log(h: Header, file_size: int) -> bool:
    """Validate the log fields of the current header; True when a log may be present."""
    if h.log_offset < MiB or h.log_offset % MiB:
        raise VhdxFormatError(f"invalid log offset {h.log_offset:#x} in the VHDX header")
    if h.log_version != 0:
        raise VhdxFormatError(f"unsupported VHDX log version {h.log_version}")
    if h.log_guid == ZERO_GUID or h.log_length == 0:
        return False
    if h.log_length % MiB:
        raise VhdxFormatError(f"invalid log length {h.log_length} in the VHDX header")
    return True


# -- log replay ------------------------------------------------------------------------
#
# A log entry is a run of 4 KiB sectors: first the *descriptor sectors* - the 64-byte
# entry header, then ``descriptor_count`` 32-byte descriptors - then one *data sector*
# for each data descriptor. A data descriptor ("desc") says which 4 KiB of the file to
# overwrite; its data sector ("data") carries bytes 8..4091 of the update between two
# halves of the sequence number, and the descriptor keeps the 8 leading and 4 trailing
# bytes. A zero descriptor ("zero") says a 4 KiB-aligned range becomes zeroes. Every
# descriptor and data sector repeats the entry's sequence number, and a CRC-32C covers
# the whole entry, so torn or misdirected writes are caught.
#
# Entries written one after another form a *sequence*: each entry's number is one more
# than the previous one's, and the newest entry (the head) names in ``tail`` the oldest
# entry whose updates may not have reached the file yet. The newest complete sequence is
# the *active* one; replaying it means applying its descriptors in order.

_ZERO_DESC = struct.Struct("<4sIQQQ")
_DATA_DESC = struct.Struct("<4s4s8sQQ")
_DATA_SECTOR = struct.Struct("<4sI")


@attrs.frozen
class LogWrite:
    """One update from the log: ``data`` at ``offset``, or ``length`` zero bytes."""

    offset: int
    length: int
    data: bytes | None = None


@attrs.frozen
class LogEntry:
    """A valid log entry: its header and its updates, in order."""

    header: LogEntryHeader
    writes: tuple[LogWrite, ...]


def decode_log_entry(
    raw: bytes | bytearray | memoryview, log_guid: bytes, log_length: int, offset: int
) -> LogEntry:
    """Check and decode one whole log entry (``raw`` is ``entry_length`` bytes).

    Raises:
        VhdxFormatError: the entry is not valid; the message says why (``offset``, the
            entry's place in the file, is for messages).
    """
    raw = bytes(raw)
    h = decode_log_entry_header(raw)
    if h is None or not log_entry_plausible(h, log_guid, log_length) or len(raw) < h.entry_length:
        raise VhdxFormatError(f"no valid log entry header at {offset:#x}", offset)
    if checksum_with_zeroed_field(raw[: h.entry_length]) != h.checksum:
        raise VhdxFormatError(f"log entry at {offset:#x} has a bad checksum", offset)
    seq = h.sequence_number
    desc_sectors = -(-(64 + 32 * h.descriptor_count) // LOG_SECTOR)
    data_at = desc_sectors * LOG_SECTOR
    writes: list[LogWrite] = []
    for i in range(h.descriptor_count):
        at = 64 + 32 * i
        sig = raw[at : at + 4]
        if sig == b"zero":
            _, _, length, file_offset, dseq = _ZERO_DESC.unpack_from(raw, at)
            if dseq != seq or length % LOG_SECTOR or file_offset % LOG_SECTOR:
                raise VhdxFormatError(f"log entry at {offset:#x}: bad zero descriptor {i}", offset)
            writes.append(LogWrite(file_offset, length))
        elif sig == b"desc":
            _, trailing, leading, file_offset, dseq = _DATA_DESC.unpack_from(raw, at)
            sector = raw[data_at : data_at + LOG_SECTOR]
            if dseq != seq or file_offset % LOG_SECTOR or len(sector) < LOG_SECTOR:
                raise VhdxFormatError(f"log entry at {offset:#x}: bad data descriptor {i}", offset)
            dsig, high = _DATA_SECTOR.unpack_from(sector)
            (low,) = struct.unpack_from("<I", sector, LOG_SECTOR - 4)
            if dsig != b"data" or (high << 32 | low) != seq:
                raise VhdxFormatError(
                    f"log entry at {offset:#x}: data sector {len(writes)} does not match", offset
                )
            writes.append(LogWrite(file_offset, LOG_SECTOR, leading + sector[8:-4] + trailing))
            data_at += LOG_SECTOR
        else:
            raise VhdxFormatError(f"log entry at {offset:#x}: unknown descriptor {i}", offset)
    if data_at > h.entry_length:
        raise VhdxFormatError(f"log entry at {offset:#x} is shorter than its data", offset)
    return LogEntry(h, tuple(writes))


def encode_log_entry(
    log_guid: bytes,
    sequence: int,
    tail: int,
    writes: list[LogWrite],
    flushed_file_offset: int,
    last_file_offset: int,
) -> bytes:
    """A log entry with the given updates (data writes must be 4 KiB), checksummed."""
    desc_sectors = -(-(64 + 32 * len(writes)) // LOG_SECTOR)
    datas = [w for w in writes if w.data is not None]
    buf = bytearray((desc_sectors + len(datas)) * LOG_SECTOR)
    _LOG_ENTRY.pack_into(
        buf, 0, LOG_SIGNATURE, 0, len(buf), tail, sequence, len(writes), 0, log_guid,
        flushed_file_offset, last_file_offset,
    )  # fmt: skip
    data_at = desc_sectors * LOG_SECTOR
    for i, w in enumerate(writes):
        at = 64 + 32 * i
        if w.data is None:
            _ZERO_DESC.pack_into(buf, at, b"zero", 0, w.length, w.offset, sequence)
            continue
        d = w.data
        assert len(d) == LOG_SECTOR
        _DATA_DESC.pack_into(buf, at, b"desc", d[-4:], d[:8], w.offset, sequence)
        head = b"data" + struct.pack("<I", sequence >> 32)
        buf[data_at : data_at + LOG_SECTOR - 4] = head + d[8:-4]
        struct.pack_into("<I", buf, data_at + LOG_SECTOR - 4, sequence & 0xFFFF_FFFF)
        data_at += LOG_SECTOR
    return bytes(_seal(buf))


def active_sequence(
    entries: dict[int, LogEntry], invalid: dict[int, str], log_length: int
) -> list[LogEntry]:
    """The entries to replay, oldest first; empty when the log holds no sequence.

    ``entries`` maps log offsets to the valid entries found there, ``invalid`` maps
    offsets to why a plausible entry header there did not make a valid entry. A chain
    is entries each followed, right after it (circularly), by the one numbered one
    higher; it is a sequence when its head's ``tail`` lies in it. The sequence with the
    highest head number is active.

    Raises:
        VhdxFormatError: the newest chain's head names a tail that is not a valid entry
            of it: an entry the log still needs is damaged.
    """
    nxt: dict[int, int] = {}
    for pos, e in entries.items():
        p = (pos + e.header.entry_length) % log_length
        following = entries.get(p)
        if following is not None and following.header.sequence_number == (
            e.header.sequence_number + 1
        ):
            nxt[pos] = p
    starts = set(entries) - set(nxt.values())
    best: list[int] = []
    broken: tuple[int, int] | None = None  # (head sequence number, tail offset)
    for start in starts:
        chain = [start]
        while chain[-1] in nxt and len(chain) <= len(entries):
            chain.append(nxt[chain[-1]])
        head = entries[chain[-1]].header
        if head.tail not in chain:
            if broken is None or head.sequence_number > broken[0]:
                broken = (head.sequence_number, head.tail)
            continue
        chain = chain[chain.index(head.tail) :]
        if not best or head.sequence_number > entries[best[-1]].header.sequence_number:
            best = chain
    best_seq = entries[best[-1]].header.sequence_number if best else 0
    if broken is not None and broken[0] > best_seq:
        why = invalid.get(broken[1], "not a valid entry of its sequence")
        raise VhdxFormatError(
            f"the newest log entry (sequence {broken[0]}) needs the entry at log offset "
            f"{broken[1]:#x}, which is damaged: {why}",
            broken[1],
        )
    return [entries[p] for p in best]
