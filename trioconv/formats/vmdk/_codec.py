"""VMDK metadata as plain data: sparse headers, descriptors, grain tables (no I/O).

A VMDK disk is described by a *descriptor*, a small text file that lists the disk's
*extents* in order - each a run of sectors stored in some file::

    # Disk DescriptorFile
    version=1
    CID=5f2b1c3a
    parentCID=ffffffff
    createType="twoGbMaxExtentSparse"

    # Extent description
    RW 4194304 SPARSE "disk-s001.vmdk"
    RW 2097152 FLAT "disk-f002.vmdk" 0

A FLAT extent is raw bytes at a sector offset of its file. A SPARSE extent is a *hosted
sparse extent* file: a 512-byte header (magic ``KDMV``, little-endian) followed by a
two-level table that maps guest *grains* (64 KiB by default) to sectors of the file::

    guest sector --> GD index --> grain table (GT, num_gtes_per_gt entries) --> grain
                     (sector // (granularity * num_gtes_per_gt))

Every table entry is a little-endian ``u32`` sector number: 0 in a GD means "no grain
table"; in a GT, 0 means "unallocated" (zeroes, no backing image here) and, when the
header has the zeroed-grain flag, 1 means "reads as zeroes". A *redundant* GD (``rgd``)
with its own copy of the GTs guards against torn writes.

``monolithicSparse`` is one sparse extent whose descriptor sits inside it (at
``desc_offset``); ``streamOptimized`` is the same with every grain deflated behind a
12-byte *grain marker* (``lba: u64, size: u32``) and packed at sector granularity, so the
file can be written as a stream. Writers that cannot seek back put the GD at the end and
mark the header's ``gd_offset`` as ``GD_AT_END``; the real header is then a *footer*
1536 bytes before the end of the file (footer marker, header sector, end-of-stream
marker).

This module decodes and encodes all of that and refuses - with a :class:`VmdkFormatError`
that names the problem and the offset - whatever would make a reader misbehave or use
unbounded memory. The async driver in ``_driver.py`` does the I/O.
"""

from __future__ import annotations

import re
import struct
import sys
from array import array
from collections.abc import Sequence

import attrs

__all__ = [
    "COMPRESSION_DEFLATE",
    "Descriptor",
    "ExtentLine",
    "FLAG_COMPRESS",
    "FLAG_MARKER",
    "FLAG_NL_DETECT",
    "FLAG_RGD",
    "FLAG_ZERO_GRAIN",
    "GD_AT_END",
    "GTE_ZEROED",
    "MAGIC",
    "SECTOR",
    "SparseHeader",
    "SparseLayout",
    "VmdkFormatError",
    "decode_table",
    "encode_table",
    "format_descriptor",
    "grain_marker",
    "new_sparse_header",
    "parse_descriptor",
    "parse_footer",
    "parse_grain_marker",
    "parse_header",
    "probe",
    "sparse_layout",
]

SECTOR = 512
MAGIC = b"KDMV"
#: VMware's older "COWD" sparse format (ESX 2 vmfsSparse); recognised, not read.
VMDK3_MAGIC = b"COWD"

FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESS = 1 << 16
FLAG_MARKER = 1 << 17
COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
#: A GT entry that reads as zeroes (with the zeroed-grain flag).
GTE_ZEROED = 1
#: Newline-detection bytes every KDMV header carries ("\n \r\n").
CHECK_BYTES = b"\n \r\n"

#: Largest grain qemu accepts: 0x200000 sectors (1 GiB).
MAX_GRAIN_SECTORS = 0x200000
#: Most GD entries qemu accepts (32 Mi).
MAX_GD_ENTRIES = 32 * 1024 * 1024
#: Largest GT qemu accepts, in entries.
MAX_GT_ENTRIES = 512
#: Extents address at most 2**32 sectors of their file (GT entries are u32).
MAX_FILE_SECTORS = 1 << 32
#: Descriptors are read up to this many bytes (qemu's limit, minus its terminator).
MAX_DESCRIPTOR = (1 << 20) - 1

#: magic (big-endian bytes), then the little-endian header fields.
_HEADER = struct.Struct("<4sIIQQQQIQQQc4sH")
_MARKER = struct.Struct("<QI")
_MARKER_TYPE = struct.Struct("<QII")
MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3


class VmdkFormatError(ValueError):
    """The bytes are not VMDK metadata this reader can trust.

    Attributes:
        offset: the file offset of the offending structure, when there is one.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


def probe(header: bytes, filename: str = "") -> int:
    """Score a file's first bytes as qemu does: a sparse magic, or a descriptor.

    A descriptor is recognised by its ``version=1|2|3`` line, which may be preceded only
    by comment lines and blank lines.
    """
    if header[:4] in (MAGIC, VMDK3_MAGIC):
        return 100
    lines = header[:4096].split(b"\n")
    for i, line in enumerate(lines):
        complete = i < len(lines) - 1  # followed by a newline
        if line.startswith(b"#"):
            continue
        if line.startswith(b" "):
            if not complete or _BLANK_RE.fullmatch(line) is None:
                return 0
            continue
        ok = complete and line.rstrip(b"\r") in _VERSION_LINES and len(line) <= 10
        return 100 if ok else 0
    return 0


_BLANK_RE = re.compile(rb" +\r?")
_VERSION_LINES = (b"version=1", b"version=2", b"version=3")


# -- the sparse header ------------------------------------------------------------------


@attrs.frozen
class SparseHeader:
    """The 512-byte header of a hosted sparse extent (``VMDK4Header`` in qemu).

    Sizes and offsets are in 512-byte sectors, as on disk.
    """

    version: int
    flags: int
    capacity: int
    granularity: int
    desc_offset: int
    desc_size: int
    num_gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    grain_offset: int
    compress_algorithm: int = 0
    filler: bytes = b"\0"
    check_bytes: bytes = CHECK_BYTES

    @property
    def compressed(self) -> bool:
        return self.compress_algorithm == COMPRESSION_DEFLATE

    @property
    def has_marker(self) -> bool:
        return bool(self.flags & FLAG_MARKER)

    @property
    def zero_grain(self) -> bool:
        return bool(self.flags & FLAG_ZERO_GRAIN)

    @property
    def has_rgd(self) -> bool:
        return bool(self.flags & FLAG_RGD)

    def encode(self) -> bytes:
        """The header sector: 512 bytes, zero padded."""
        packed = _HEADER.pack(
            MAGIC,
            self.version,
            self.flags,
            self.capacity,
            self.granularity,
            self.desc_offset,
            self.desc_size,
            self.num_gtes_per_gt,
            self.rgd_offset,
            self.gd_offset,
            self.grain_offset,
            self.filler,
            self.check_bytes,
            self.compress_algorithm,
        )
        return packed.ljust(SECTOR, b"\0")


def parse_header(data: bytes, at: int = 0) -> SparseHeader:
    """Decode a KDMV header from its first bytes (``at`` is its file offset, for errors).

    Only the fields are decoded here; :func:`sparse_layout` checks that they make sense.
    """
    if len(data) < _HEADER.size:
        raise VmdkFormatError(
            f"sparse extent header at offset {at:#x} is truncated ({len(data)} bytes)", at
        )
    fields = _HEADER.unpack_from(data)
    if fields[0] != MAGIC:
        raise VmdkFormatError(f"bad sparse extent magic {fields[0]!r} at offset {at:#x}", at)
    return SparseHeader(
        version=fields[1],
        flags=fields[2],
        capacity=fields[3],
        granularity=fields[4],
        desc_offset=fields[5],
        desc_size=fields[6],
        num_gtes_per_gt=fields[7],
        rgd_offset=fields[8],
        gd_offset=fields[9],
        grain_offset=fields[10],
        filler=fields[11],
        check_bytes=fields[12],
        compress_algorithm=fields[13],
    )


def parse_footer(data: bytes, at: int) -> SparseHeader:
    """Decode the 1536-byte stream footer (footer marker, header, end-of-stream marker).

    ``at`` is the file offset of ``data``. Raises :class:`VmdkFormatError` ("Invalid
    footer", as qemu says) when the markers are not where they must be.
    """
    if len(data) < 3 * SECTOR:
        raise VmdkFormatError(f"Invalid footer at offset {at:#x}: file too short", at)
    _, f_size, f_type = _MARKER_TYPE.unpack_from(data, 0)
    e_val, e_size, e_type = _MARKER_TYPE.unpack_from(data, 2 * SECTOR)
    if (
        data[SECTOR : SECTOR + 4] != MAGIC
        or f_size != 0
        or f_type != MARKER_FOOTER
        or (e_val, e_size, e_type) != (0, 0, MARKER_EOS)
    ):
        raise VmdkFormatError(f"Invalid footer at offset {at:#x}", at)
    return parse_header(data[SECTOR : 2 * SECTOR], at + SECTOR)


@attrs.frozen
class SparseLayout:
    """What a validated header means, in bytes.

    Attributes:
        capacity: guest bytes the extent holds.
        grain_size: bytes per grain.
        gt_entries: entries per grain table.
        gd_entries: entries in the grain directory.
        gd_offset / rgd_offset: file offsets of the GD and redundant GD (0: none).
        compressed / has_marker / zero_grain: from the header.
    """

    capacity: int
    grain_size: int
    gt_entries: int
    gd_entries: int
    gd_offset: int
    rgd_offset: int
    grain_offset: int
    compressed: bool
    has_marker: bool
    zero_grain: bool

    @property
    def gt_span(self) -> int:
        """Guest bytes one grain table covers."""
        return self.grain_size * self.gt_entries

    @property
    def gt_bytes(self) -> int:
        return self.gt_entries * 4


def sparse_layout(h: SparseHeader, file_size: int, *, writable: bool = False) -> SparseLayout:
    """Check a header against qemu's rules and the file's size; return its layout.

    The messages are qemu's where qemu has one. Everything that decides how much memory
    a reader will use - the GD size, the grain size - is bounded here, and the GD must
    lie inside the file.
    """
    if h.version > 3:
        raise VmdkFormatError(f"Unsupported VMDK version {h.version}", 4)
    if h.version == 3 and writable and not h.compressed:
        raise VmdkFormatError("VMDK version 3 must be read only", 4)
    if h.compress_algorithm not in (0, COMPRESSION_DEFLATE):
        raise VmdkFormatError(f"Unsupported compression algorithm {h.compress_algorithm}", 77)
    if h.num_gtes_per_gt > MAX_GT_ENTRIES:
        raise VmdkFormatError("L2 table size too big", 44)
    if h.num_gtes_per_gt * h.granularity == 0:
        raise VmdkFormatError("L1 entry size is invalid", 44)
    if h.granularity > MAX_GRAIN_SECTORS:
        raise VmdkFormatError(
            f"Invalid granularity, image may be corrupt (grain of {h.granularity} sectors)", 20
        )
    gt_sectors = h.num_gtes_per_gt * h.granularity
    gd_entries = -(-h.capacity // gt_sectors)
    if gd_entries > MAX_GD_ENTRIES:
        raise VmdkFormatError("L1 size too big", 12)
    if file_size // SECTOR < h.grain_offset:
        raise VmdkFormatError(
            f"File truncated, expecting at least {h.grain_offset * SECTOR} bytes", 60
        )
    gd_bytes = gd_entries * 4
    tables = [("grain directory", h.gd_offset)]
    if h.has_rgd:
        tables.append(("redundant grain directory", h.rgd_offset))
    for name, sector in tables:
        if sector * SECTOR + gd_bytes > file_size:
            raise VmdkFormatError(
                f"{name} at offset {sector * SECTOR:#x} ({gd_bytes} bytes) lies beyond "
                f"the end of the file ({file_size} bytes)",
                sector * SECTOR,
            )
    return SparseLayout(
        capacity=h.capacity * SECTOR,
        grain_size=h.granularity * SECTOR,
        gt_entries=h.num_gtes_per_gt,
        gd_entries=gd_entries,
        gd_offset=h.gd_offset * SECTOR,
        rgd_offset=h.rgd_offset * SECTOR if h.has_rgd else 0,
        grain_offset=h.grain_offset * SECTOR,
        compressed=h.compressed,
        has_marker=h.has_marker,
        zero_grain=h.zero_grain,
    )


def new_sparse_header(
    capacity_bytes: int, *, compress: bool = False, zeroed_grain: bool = False
) -> tuple[SparseHeader, int, int]:
    """The header qemu's ``vmdk_init_extent`` writes for a new sparse extent.

    The GTs are preallocated: redundant GD, its GTs, GD, its GTs, then grains from the
    next 64 KiB boundary. Returns ``(header, gt_count, gd_sectors)``.
    """
    granularity = 128
    gtes = 512
    capacity = capacity_bytes // SECTOR
    grains = -(-capacity // granularity)
    gt_size = -(-gtes * 4 // SECTOR)
    gt_count = -(-grains // gtes)
    gd_sectors = -(-gt_count * 4 // SECTOR)
    desc_offset, desc_size = 1, 20
    rgd_offset = desc_offset + desc_size
    gd_offset = rgd_offset + gd_sectors + gt_size * gt_count
    grain_offset = -(-(gd_offset + gd_sectors + gt_size * gt_count) // granularity) * granularity
    version = 3 if compress else 2 if zeroed_grain else 1
    flags = FLAG_RGD | FLAG_NL_DETECT
    if compress:
        flags |= FLAG_COMPRESS | FLAG_MARKER
    if zeroed_grain:
        flags |= FLAG_ZERO_GRAIN
    header = SparseHeader(
        version=version,
        flags=flags,
        capacity=capacity,
        granularity=granularity,
        desc_offset=desc_offset,
        desc_size=desc_size,
        num_gtes_per_gt=gtes,
        rgd_offset=rgd_offset,
        gd_offset=gd_offset,
        grain_offset=grain_offset,
        compress_algorithm=COMPRESSION_DEFLATE if compress else 0,
    )
    return header, gt_count, gd_sectors


# -- tables and grain markers ---------------------------------------------------------


def decode_table(data: bytes) -> array[int]:
    """Little-endian u32 entries (a GD or a GT) as an array."""
    table = array("I")
    table.frombytes(data[: len(data) // 4 * 4])
    if table.itemsize != 4:  # pragma: no cover - every platform trioconv runs on
        raise RuntimeError("array('I') is not 32 bits here")
    if sys.byteorder == "big":  # pragma: no cover
        table.byteswap()
    return table


def encode_table(table: Sequence[int] | array[int]) -> bytes:
    """The inverse of :func:`decode_table`."""
    out = array("I", table)
    if sys.byteorder == "big":  # pragma: no cover
        out.byteswap()
    return out.tobytes()


def grain_marker(lba_sector: int, payload: bytes) -> bytes:
    """A compressed grain record: marker (``lba``, ``size``) then the deflate stream."""
    return _MARKER.pack(lba_sector, len(payload)) + payload


def parse_grain_marker(data: bytes, at: int) -> tuple[int, int]:
    """``(lba_sector, size)`` of the grain marker at the start of ``data``."""
    if len(data) < _MARKER.size:
        raise VmdkFormatError(f"grain marker at offset {at:#x} is truncated", at)
    lba, size = _MARKER.unpack_from(data)
    return lba, size


# -- the descriptor -------------------------------------------------------------------

#: Extent kinds a descriptor may name, and whether trioconv reads them.
EXTENT_KINDS = ("FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE", "ZERO", "VMFSRDM", "VMFSRAW")
#: createType values qemu accepts in a descriptor file.
DESCRIPTOR_CREATE_TYPES = (
    "monolithicFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
)

# sscanf(p, "%10s %ld %10s \"%511[^\n\r\"]\" %ld") in qemu's vmdk_parse_extents.
_EXTENT_RE = re.compile(
    r"^\s*(?P<access>\S{1,10})\s+(?P<sectors>[+-]?\d+)\s+(?P<kind>\S{1,10})\s+"
    r'"(?P<name>[^\n\r"]{1,511})"(?:\s+(?P<offset>[+-]?\d+))?'
)
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_.]+)\s*=\s*(.*?)\s*$")


@attrs.frozen
class ExtentLine:
    """One ``RW <sectors> <KIND> "<file>" [offset]`` line of a descriptor."""

    access: str
    sectors: int
    kind: str
    filename: str
    offset: int | None = None

    def encode(self) -> str:
        tail = f" {self.offset}" if self.offset is not None else ""
        return f'{self.access} {self.sectors} {self.kind} "{self.filename}"{tail}'


@attrs.frozen
class Descriptor:
    """A parsed descriptor: header keys, extents and the disk database (``ddb.*``)."""

    version: int = 1
    cid: int = 0
    parent_cid: int = 0xFFFFFFFF
    create_type: str = ""
    extents: tuple[ExtentLine, ...] = ()
    ddb: tuple[tuple[str, str], ...] = ()
    parent_hint: str | None = None


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def parse_descriptor(text: str) -> Descriptor:
    """Parse descriptor text the way qemu does, but line by line.

    Extent lines whose access is not ``RW`` are skipped, as qemu skips them; a line that
    looks like an extent but is malformed (a FLAT extent without an offset) is refused
    with qemu's "Invalid extent line". Unknown extent kinds are kept; the driver refuses
    them by name.
    """
    fields: dict[str, str] = {}
    extents: list[ExtentLine] = []
    ddb: list[tuple[str, str]] = []
    for raw in text.split("\n"):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _EXTENT_RE.match(line)
        if m is not None:
            access, kind = m["access"], m["kind"]
            sectors = int(m["sectors"])
            offset = int(m["offset"]) if m["offset"] is not None else None
            if access != "RW":
                continue
            if kind == "FLAT" and (offset is None or offset < 0):
                raise VmdkFormatError(f"Invalid extent line: {line}")
            if kind == "VMFS" and offset is not None:
                raise VmdkFormatError(f"Invalid extent line: {line}")
            if kind not in ("FLAT", "VMFS") and offset is not None:
                raise VmdkFormatError(f"Invalid extent line: {line}")
            if sectors <= 0:
                continue
            extents.append(ExtentLine(access, sectors, kind, m["name"], offset))
            continue
        km = _KEY_RE.match(line)
        if km is None:
            continue
        key, value = km[1], _unquote(km[2])
        if key.startswith("ddb."):
            ddb.append((key, value))
        else:
            fields.setdefault(key, value)

    def hex_field(name: str, default: int) -> int:
        value = fields.get(name)
        if value is None:
            return default
        m = re.match(r"[0-9a-fA-F]+", value)
        if m is None:
            raise VmdkFormatError(f"invalid {name} '{value}' in the VMDK descriptor")
        return int(m.group(0), 16) & 0xFFFFFFFF

    if "createType" not in fields:
        raise VmdkFormatError("invalid VMDK image descriptor (no createType)")
    version_text = fields.get("version", "1")
    version = int(version_text) if version_text.isdigit() else 0
    return Descriptor(
        version=version,
        cid=hex_field("CID", 0),
        parent_cid=hex_field("parentCID", 0xFFFFFFFF),
        create_type=fields["createType"],
        extents=tuple(extents),
        ddb=tuple(ddb),
        parent_hint=fields.get("parentFileNameHint"),
    )


def format_descriptor(desc: Descriptor) -> str:
    """Descriptor text in qemu's layout (``vmdk_co_do_create``'s template)."""
    # (qemu's template puts the hint where the blank line before the extents goes.)
    parent = f'parentFileNameHint="{desc.parent_hint}"' if desc.parent_hint else ""
    lines = "".join(e.encode() + "\n" for e in desc.extents)
    ddb = "".join(f'{k} = "{v}"\n' for k, v in desc.ddb)
    return (
        "# Disk DescriptorFile\n"
        f"version={desc.version}\n"
        f"CID={desc.cid:x}\n"
        f"parentCID={desc.parent_cid:x}\n"
        f'createType="{desc.create_type}"\n'
        f"{parent}"
        "\n"
        "# Extent description\n"
        f"{lines}"
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        f"{ddb}"
    )
