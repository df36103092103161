"""qcow2 metadata as plain data: the header, its extensions, L1 and L2 tables (no I/O).

A qcow2 file is cut into *clusters* of ``2**cluster_bits`` bytes. The guest disk is
split the same way, and a two-level table maps each guest cluster to where its bytes
are::

    guest offset --> L1 index --> L2 table (one host cluster) --> L2 entry --> host cluster
                     (offset >> (cluster_bits + l2_bits))         (offset >> cluster_bits)

Everything is big-endian. The header sits at offset 0 (72 bytes in version 2, at least
104 in version 3) and is followed, inside the first cluster, by *header extensions*
(``type: u32, length: u32, data`` padded to 8 bytes, ended by type 0): the backing
file's format, the names of feature bits, an external data file, bitmaps.

An L2 entry says one of four things about its guest cluster:

* **normal** - the data is at a host cluster offset (bits 9-55), cluster aligned;
* **zero** (version 3, bit 0) - reads as zeroes, whether or not a host cluster is kept;
* **compressed** (bit 62) - a deflate (or zstd) stream at an arbitrary host byte offset,
  whose length is stored in 512-byte sectors in the bits above the offset;
* **unallocated** - all zero: the backing file's bytes show through, or zeroes.

With *extended L2 entries* (incompatible bit 4) every entry is followed by a 64-bit
bitmap that splits the cluster into 32 *subclusters*: bit ``i`` says subcluster ``i`` is
allocated, bit ``32 + i`` says it reads as zeroes, neither says it is unallocated.

This module decodes and validates all of that from bytes, and refuses - with a
:class:`Qcow2FormatError` naming the problem and the offset - whatever would make a
reader misbehave: unknown incompatible features, misaligned or absurd tables, sizes that
would exhaust memory. The async driver in ``_driver.py`` does the reads.
"""

from __future__ import annotations

import enum
import struct
import sys
from array import array
from collections.abc import Mapping

import attrs

__all__ = [
    "ClusterKind",
    "CompressionType",
    "Extension",
    "Header",
    "ImageInfo",
    "Incompatible",
    "L2Entry",
    "Layout",
    "MAGIC",
    "MAX_L1_BYTES",
    "Qcow2FormatError",
    "Segment",
    "decode_l2_entry",
    "decode_table",
    "l1_entry_offset",
    "map_l2",
    "merge_segments",
    "append_segment",
    "parse_extensions",
    "parse_header",
    "parse_image",
]

MAGIC = b"QFI\xfb"
#: Bytes of the fixed header in version 2, and the minimum in version 3.
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
#: Bytes to read from offset 0 to decode any header (the rest is extensions).
HEADER_READ = 112
#: Largest active L1 table accepted (qemu's limit too): 4 Mi entries.
MAX_L1_BYTES = 32 * 1024 * 1024
#: Largest refcount table accepted (qemu's limit): 8 MiB.
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
#: Longest backing file name (qemu's limit).
MAX_BACKING_NAME = 1023

#: Bits 9-55 of an L1 or standard L2 entry: a host offset.
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
#: Bit 63: the cluster's refcount is exactly one (unused when reading).
COPIED = 1 << 63
#: Bit 62 of an L2 entry: a compressed cluster.
COMPRESSED = 1 << 62
#: Bit 0 of a standard L2 entry (version 3): the cluster reads as zeroes.
ZERO_FLAG = 1
#: Bits of an L1 entry that must be zero.
L1_RESERVED = 0x7F00_0000_0000_01FF

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_HEADER_V3 = struct.Struct(">QQQII")
_EXT_HEADER = struct.Struct(">II")
#: The full disk encryption extension: the LUKS header's offset and length in the file.
_CRYPTO_EXT = struct.Struct(">QQ")

#: The header's crypt method: 0 none, 1 AES-CBC with the sector number as IV (QEMU's
#: legacy encryption; no header of its own), 2 LUKS (a LUKS header inside the file).
CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2


class Qcow2FormatError(ValueError):
    """The bytes are not a qcow2 image this reader can trust.

    Attributes:
        offset: the file offset of the offending structure, when there is one.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


class Incompatible(enum.IntFlag):
    """Incompatible feature bits: a reader that does not know one must refuse the image."""

    DIRTY = 1 << 0
    CORRUPT = 1 << 1
    DATA_FILE = 1 << 2
    COMPRESSION_TYPE = 1 << 3
    EXTENDED_L2 = 1 << 4


#: Every incompatible bit this reader understands.
KNOWN_INCOMPATIBLE = (
    Incompatible.DIRTY
    | Incompatible.CORRUPT
    | Incompatible.DATA_FILE
    | Incompatible.COMPRESSION_TYPE
    | Incompatible.EXTENDED_L2
)


class Compatible(enum.IntFlag):
    """Compatible feature bits (safe to ignore when reading)."""

    LAZY_REFCOUNTS = 1 << 0


class Autoclear(enum.IntFlag):
    """Autoclear feature bits (cleared by writers that do not know them)."""

    BITMAPS = 1 << 0
    DATA_FILE_RAW = 1 << 1


class CompressionType(enum.IntEnum):
    """How compressed clusters are compressed (header byte 104)."""

    ZLIB = 0
    ZSTD = 1


class Extension(enum.IntEnum):
    """Header extension types this reader knows."""

    END = 0
    BACKING_FORMAT = 0xE2792ACA
    FEATURE_NAMES = 0x6803F857
    BITMAPS = 0x23852875
    FULL_DISK_ENCRYPTION = 0x0537BE77
    DATA_FILE = 0x44415441


@attrs.frozen
class Header:
    """The fixed header at offset 0 (version 2 fields, then version 3 ones).

    Version 2 images have no feature bits, refcount order 4 (16-bit refcounts), a
    72-byte header and zlib compression; :func:`parse_header` fills those in.
    """

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = CompressionType.ZLIB

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        """L2 entries are 128 bits: an entry and a subcluster bitmap."""
        return bool(self.incompatible_features & Incompatible.EXTENDED_L2)

    @property
    def l2_entry_size(self) -> int:
        """Bytes per L2 entry (8, or 16 with extended L2)."""
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table (a table fills one cluster)."""
        return self.cluster_size // self.l2_entry_size

    @property
    def refcount_bits(self) -> int:
        """Width of a reference count."""
        return 1 << self.refcount_order


@attrs.frozen
class ImageInfo:
    """Everything decoded from the first cluster: header plus extensions.

    Attributes:
        header: the fixed header.
        backing_file: the backing file's name as stored (relative to the image's
            folder unless absolute), or None.
        backing_format: the backing file's format from the extension, or None.
        data_file: the external data file's name, or None.
        feature_names: ``(type, bit) -> name`` from the feature name table, where type
            is 0 incompatible, 1 compatible, 2 autoclear.
        has_bitmaps: the image carries persistent dirty bitmaps.
        bitmaps_extension: the bitmaps extension's body as stored, or None.
        unknown_extensions: types of extensions that were skipped.
        crypto_header: where the LUKS header of a LUKS-encrypted image lies, as
            ``(offset, length)`` in the file, from the full disk encryption extension.
    """

    header: Header
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: Mapping[tuple[int, int], str] = attrs.field(factory=dict)
    has_bitmaps: bool = False
    unknown_extensions: tuple[int, ...] = ()
    bitmaps_extension: bytes | None = None
    crypto_header: tuple[int, int] | None = None

    @property
    def layout(self) -> Layout:
        """What decoding an L2 entry needs."""
        h = self.header
        return Layout(
            cluster_bits=h.cluster_bits,
            extended_l2=h.extended_l2,
            version=h.version,
            data_file=bool(h.incompatible_features & Incompatible.DATA_FILE),
        )


def _hex(value: int) -> str:
    return f"{value:#x}"


def parse_header(buf: bytes | bytearray | memoryview) -> Header:
    """Decode and validate the fixed header from the first bytes of the file.

    ``buf`` needs :data:`HEADER_READ` bytes (fewer only if the file is that short).
    Only checks that need nothing but the header are made here; :func:`parse_image`
    adds those that need the file size.
    """
    data = bytes(buf[:HEADER_READ])
    if len(data) < V2_HEADER_LENGTH or data[:4] != MAGIC:
        raise Qcow2FormatError("Image is not in qcow2 format", 0)
    (
        _magic,
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _HEADER_V2.unpack_from(data)
    if version not in (2, 3):
        raise Qcow2FormatError(f"Unsupported qcow2 version {version}", 4)
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise Qcow2FormatError(
            f"Unsupported cluster size: 2^{cluster_bits} (cluster_bits must be "
            f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})",
            20,
        )
    fields: dict[str, int] = {}
    if version == 3:
        if len(data) < V3_HEADER_LENGTH:
            raise Qcow2FormatError("qcow2 header too short", 0)
        incompat, compat, autoclear, refcount_order, header_length = _HEADER_V3.unpack_from(
            data, V2_HEADER_LENGTH
        )
        if header_length < V3_HEADER_LENGTH:
            raise Qcow2FormatError(f"qcow2 header length {header_length} is too short", 100)
        if header_length > 1 << cluster_bits:
            raise Qcow2FormatError(
                f"qcow2 header length {header_length} exceeds the cluster size", 100
            )
        if header_length % 8:
            raise Qcow2FormatError(
                f"qcow2 header length {header_length} is not a multiple of 8", 100
            )
        compression_type = 0
        if header_length > V3_HEADER_LENGTH:
            if len(data) <= V3_HEADER_LENGTH:
                raise Qcow2FormatError("qcow2 header too short", 0)
            compression_type = data[V3_HEADER_LENGTH]
        fields = {
            "incompatible_features": incompat,
            "compatible_features": compat,
            "autoclear_features": autoclear,
            "refcount_order": refcount_order,
            "header_length": header_length,
            "compression_type": compression_type,
        }
    header = Header(
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
        **fields,
    )
    _check_header(header)
    return header


def _check_header(h: Header) -> None:
    cs = h.cluster_size
    if h.refcount_order > 6:
        raise Qcow2FormatError(
            f"Reference count entry width too large: 2^{h.refcount_order} bits "
            "(may not exceed 64 bits)",
            96,
        )
    if h.crypt_method > CRYPT_LUKS:
        raise Qcow2FormatError(f"Unsupported encryption method: {h.crypt_method}", 32)
    if h.compression_type not in (CompressionType.ZLIB, CompressionType.ZSTD):
        raise Qcow2FormatError(f"unknown compression type {h.compression_type}", 104)
    has_type_bit = bool(h.incompatible_features & Incompatible.COMPRESSION_TYPE)
    if h.compression_type != CompressionType.ZLIB and not has_type_bit:
        raise Qcow2FormatError(
            "compression type incompatible feature bit must be set for a compression "
            f"type other than zlib (type {h.compression_type})",
            72,
        )
    if h.extended_l2 and h.cluster_bits < 14:
        raise Qcow2FormatError(
            f"extended L2 entries need clusters of at least 16 KiB (cluster size {cs})", 20
        )
    if h.size >= 1 << 63:
        raise Qcow2FormatError(f"virtual size {h.size} is too large", 24)
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise Qcow2FormatError(
            f"Active L1 table too large: {h.l1_size} entries ({h.l1_size * 8} bytes, "
            f"at most {MAX_L1_BYTES} allowed)",
            36,
        )
    per_l1 = h.l2_entries * cs
    needed = -(-h.size // per_l1)
    if h.l1_size < needed:
        raise Qcow2FormatError(
            f"L1 table is too small: {h.l1_size} entries for a virtual size of {h.size} "
            f"bytes ({needed} needed)",
            36,
        )
    if h.l1_size and h.l1_table_offset % cs:
        raise Qcow2FormatError(
            f"Invalid L1 table offset {_hex(h.l1_table_offset)}: not aligned to the "
            f"cluster size ({cs})",
            40,
        )
    if h.refcount_table_offset % cs:
        raise Qcow2FormatError(
            f"Invalid refcount table offset {_hex(h.refcount_table_offset)}: not aligned "
            f"to the cluster size ({cs})",
            48,
        )
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise Qcow2FormatError(
            f"Reference count table too large: {h.refcount_table_clusters} clusters", 56
        )
    if h.nb_snapshots and h.snapshots_offset % cs:
        raise Qcow2FormatError(
            f"Invalid snapshot table offset {_hex(h.snapshots_offset)}: not aligned to the "
            f"cluster size ({cs})",
            64,
        )
    if h.backing_file_offset and h.backing_file_size > MAX_BACKING_NAME:
        raise Qcow2FormatError(
            f"Backing file name too long: {h.backing_file_size} bytes (at most {MAX_BACKING_NAME})",
            16,
        )


def _text(raw: bytes, what: str, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Qcow2FormatError(f"{what} is not valid UTF-8", offset) from None


def parse_extensions(h: Header, cluster: bytes | bytearray | memoryview) -> ImageInfo:
    """Decode the header extensions and the backing file name from the first cluster.

    ``cluster`` holds the first ``h.cluster_size`` bytes of the file (fewer if the file
    is shorter). Extensions run from the end of the header to type 0, to the backing
    file name, or to the end of the cluster, whichever comes first - as qemu reads them.
    """
    data = bytes(cluster[: h.cluster_size])
    end = h.cluster_size
    if h.backing_file_offset and h.backing_file_offset < end:
        end = h.backing_file_offset
    end = min(end, len(data))
    pos = h.header_length
    backing_format: str | None = None
    data_file: str | None = None
    names: dict[tuple[int, int], str] = {}
    has_bitmaps = False
    bitmaps_body: bytes | None = None
    unknown: list[int] = []
    crypto_header: tuple[int, int] | None = None
    while pos + _EXT_HEADER.size <= end:
        ext_type, length = _EXT_HEADER.unpack_from(data, pos)
        if ext_type == Extension.END:
            break
        body_at = pos + _EXT_HEADER.size
        if length > end - body_at:
            raise Qcow2FormatError(
                f"header extension {_hex(ext_type)} at offset {_hex(pos)} is {length} bytes "
                "long and runs past the end of the header cluster",
                pos,
            )
        body = data[body_at : body_at + length]
        if ext_type == Extension.BACKING_FORMAT:
            # Names are C strings to QEMU: they end at a NUL byte, and empty means none.
            backing_format = _text(body.split(b"\0", 1)[0], "backing format name", body_at)
            backing_format = backing_format or None
        elif ext_type == Extension.FEATURE_NAMES:
            for at in range(0, length - length % 48, 48):
                kind, bit = body[at], body[at + 1]
                names[(kind, bit)] = (
                    body[at + 2 : at + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                )
        elif ext_type == Extension.DATA_FILE:
            data_file = _text(body.split(b"\0", 1)[0], "external data file name", body_at)
        elif ext_type == Extension.BITMAPS:
            has_bitmaps = True
            bitmaps_body = bytes(body)
        elif ext_type == Extension.FULL_DISK_ENCRYPTION:
            crypto_header = _crypto_extension(h, body, pos)
        else:
            unknown.append(ext_type)
        pos = body_at + (length + 7) // 8 * 8
    backing_file: str | None = None
    if h.backing_file_offset:
        start, stop = h.backing_file_offset, h.backing_file_offset + h.backing_file_size
        if stop > h.cluster_size or stop > len(data):
            raise Qcow2FormatError(
                f"backing file name at offset {_hex(start)} ({h.backing_file_size} bytes) "
                "lies outside the header cluster",
                16,
            )
        if h.backing_file_size:
            name = data[start:stop].split(b"\0", 1)[0]
            backing_file = _text(name, "backing file name", start) or None
    return ImageInfo(
        header=h,
        backing_file=backing_file,
        backing_format=backing_format,
        data_file=data_file,
        feature_names=names,
        has_bitmaps=has_bitmaps,
        unknown_extensions=tuple(unknown),
        bitmaps_extension=bitmaps_body,
        crypto_header=crypto_header,
    )


def _crypto_extension(h: Header, body: bytes, pos: int) -> tuple[int, int]:
    """The full disk encryption extension's ``(offset, length)`` of the LUKS header:
    two big-endian 64-bit fields, the offset a whole number of clusters."""
    if h.crypt_method != CRYPT_LUKS:
        raise Qcow2FormatError(
            "the encryption header extension is only allowed with LUKS encryption (crypt "
            f"method {h.crypt_method})",
            pos,
        )
    if len(body) != _CRYPTO_EXT.size:
        raise Qcow2FormatError(
            f"the encryption header extension is {len(body)} bytes long, not {_CRYPTO_EXT.size}",
            pos,
        )
    offset, length = _CRYPTO_EXT.unpack(body)
    if offset % h.cluster_size:
        raise Qcow2FormatError(
            f"the encryption header's offset {_hex(offset)} is not a multiple of the "
            f"cluster size ({h.cluster_size})",
            pos,
        )
    return offset, length


def rebuild_extensions(
    h: Header, cluster: bytes | bytearray | memoryview, bitmaps: bytes | None
) -> tuple[Header, bytes]:
    """The header extensions with the bitmaps one replaced by ``bitmaps`` (a body; None:
    removed), then the end marker and the backing file name.

    Returns the header with ``backing_file_offset`` moved to match, and the bytes that go
    at offset ``h.header_length`` of the file.

    Raises:
        Qcow2FormatError: it would not fit in the first cluster.
    """
    info = parse_extensions(h, cluster)  # validates what is there
    data = bytes(cluster[: h.cluster_size])
    end = min(h.backing_file_offset or h.cluster_size, h.cluster_size, len(data))
    pos = h.header_length
    out = bytearray()
    while pos + _EXT_HEADER.size <= end:
        ext_type, length = _EXT_HEADER.unpack_from(data, pos)
        if ext_type == Extension.END:
            break
        stop = pos + _EXT_HEADER.size + (length + 7) // 8 * 8
        if ext_type != Extension.BITMAPS:
            out += data[pos:stop]
        pos = stop
    if bitmaps is not None:
        out += encode_extension(Extension.BITMAPS, bitmaps)
    out += bytes(_EXT_HEADER.size)  # the end marker
    name = (info.backing_file or "").encode("utf-8")
    offset = h.header_length + len(out) if name else 0
    out += name
    if h.header_length + len(out) > h.cluster_size:
        raise Qcow2FormatError("the header extensions no longer fit in the first cluster", 0)
    return attrs.evolve(h, backing_file_offset=offset, backing_file_size=len(name)), bytes(out)


def parse_image(
    cluster: bytes | bytearray | memoryview, file_size: int, *, encrypted_ok: bool = False
) -> ImageInfo:
    """Decode the first cluster and check it against the file's size.

    An encrypted image (crypt method 1, AES, or 2, LUKS) is refused unless
    ``encrypted_ok``: its metadata is in the clear, so it may be opened to be described
    (``info``), but its guest data cannot be read without a key, which trioconv does
    not take, and its clusters must never be written in the clear.

    Raises:
        Qcow2FormatError: anything a reader cannot trust; the message names the
            problem and, for tables, their offset.
    """
    h = parse_header(cluster)
    if h.crypt_method and not encrypted_ok:
        raise Qcow2FormatError(
            f"encrypted qcow2 images are not supported (crypt method {h.crypt_method})", 32
        )
    info = parse_extensions(h, cluster)
    unknown = h.incompatible_features & ~int(KNOWN_INCOMPATIBLE)
    if unknown:
        bits = [b for b in range(64) if unknown >> b & 1]
        described = ", ".join(
            f"bit {b} ({info.feature_names[(0, b)]})"
            if (0, b) in info.feature_names
            else f"bit {b}"
            for b in bits
        )
        raise Qcow2FormatError(f"Unsupported qcow2 incompatible feature(s): {described}", 72)
    has_data_file = bool(h.incompatible_features & Incompatible.DATA_FILE)
    if has_data_file and info.data_file is None:
        raise Qcow2FormatError(
            "the image uses an external data file but does not name it (no data file "
            "header extension)",
            72,
        )
    if not has_data_file and h.autoclear_features & Autoclear.DATA_FILE_RAW:
        raise Qcow2FormatError("data_file_raw is set but the image has no external data file", 88)
    if not h.refcount_table_clusters:
        # Every cluster, the header's first, has a refcount: qemu opens no such image.
        raise Qcow2FormatError("Image does not contain a reference count table", 56)
    l1_bytes = h.l1_size * 8
    if l1_bytes and h.l1_table_offset + l1_bytes > file_size:
        raise Qcow2FormatError(
            f"L1 table at offset {_hex(h.l1_table_offset)} ({l1_bytes} bytes) extends beyond "
            f"the end of the file ({file_size} bytes)",
            h.l1_table_offset,
        )
    return info


@attrs.frozen
class Layout:
    """What decoding L2 entries needs to know about the image."""

    cluster_bits: int
    extended_l2: bool = False
    version: int = 3
    data_file: bool = False

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table."""
        return self.cluster_size // (16 if self.extended_l2 else 8)

    @property
    def l2_bits(self) -> int:
        """log2 of :attr:`l2_entries`."""
        return self.l2_entries.bit_length() - 1

    @property
    def subcluster_size(self) -> int:
        """Bytes per subcluster (the cluster size without extended L2)."""
        return self.cluster_size // 32 if self.extended_l2 else self.cluster_size

    @property
    def compressed_offset_bits(self) -> int:
        """Bits of a compressed entry that hold the host byte offset: ``62 - (bits - 8)``."""
        return 62 - (self.cluster_bits - 8)


def decode_table(raw: bytes | bytearray | memoryview) -> array[int]:
    """A big-endian table of 64-bit entries as an ``array('Q')`` of native integers."""
    table = array("Q")
    table.frombytes(raw)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def l1_entry_offset(entry: int, cluster_size: int, index: int) -> int:
    """The L2 table offset in an L1 entry (0: no table), checked for alignment."""
    offset = entry & OFFSET_MASK
    if offset % cluster_size:
        raise Qcow2FormatError(
            f"L2 table offset {_hex(offset)} in L1 entry {index} is not aligned to the cluster "
            f"size ({cluster_size})",
            offset,
        )
    return offset


class ClusterKind(enum.Enum):
    """What an L2 entry (or a subcluster of one) says about its guest bytes."""

    UNALLOCATED = "unallocated"
    ZERO = "zero"
    NORMAL = "normal"
    COMPRESSED = "compressed"


@attrs.frozen
class L2Entry:
    """One decoded L2 entry.

    Attributes:
        kind: see :class:`ClusterKind`.
        host_offset: NORMAL: the host cluster; COMPRESSED: the first byte of the stream;
            ZERO: a preallocated host cluster, or 0.
        compressed_size: COMPRESSED: bytes to read (whole 512-byte sectors, less the
            offset into the first one); otherwise 0.
    """

    kind: ClusterKind
    host_offset: int = 0
    compressed_size: int = 0


def decode_l2_entry(entry: int, layout: Layout) -> L2Entry:
    """Decode the 64-bit standard part of an L2 entry (the bitmap is separate).

    With extended L2 the zero flag is not used (the bitmap says which subclusters read
    as zeroes); an entry is then NORMAL when it has a host offset and UNALLOCATED when
    not, and :func:`map_l2` refines it per subcluster.
    """
    if entry & COMPRESSED:
        shift = layout.compressed_offset_bits
        host = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (layout.cluster_bits - 8)) - 1)) + 1
        return L2Entry(ClusterKind.COMPRESSED, host, sectors * 512 - (host & 511))
    host = entry & OFFSET_MASK
    if entry & ZERO_FLAG and not layout.extended_l2:
        if layout.version < 3:
            raise Qcow2FormatError(f"zero cluster entry {_hex(entry)} found in a version 2 image")
        # A preallocated zero cluster's offset must be aligned too (qemu refuses it).
        _check_aligned(entry, host, layout)
        return L2Entry(ClusterKind.ZERO, host)
    if host == 0 and not (layout.data_file and entry & COPIED):
        # Offset 0 is a valid data-file offset; there the COPIED bit tells them apart.
        return L2Entry(ClusterKind.UNALLOCATED)
    _check_aligned(entry, host, layout)
    return L2Entry(ClusterKind.NORMAL, host)


def _check_aligned(entry: int, host: int, layout: Layout) -> None:
    if host % layout.cluster_size:
        raise Qcow2FormatError(
            f"cluster offset {_hex(host)} in L2 entry {_hex(entry)} is not aligned to the "
            f"cluster size ({layout.cluster_size})",
            host,
        )


@attrs.frozen
class Segment:
    """A run of guest bytes that maps one way, as :func:`map_l2` returns them.

    Attributes:
        offset: guest offset of the first byte.
        length: bytes.
        kind: see :class:`ClusterKind`.
        host_offset: NORMAL: host offset of the first byte (contiguous for the whole
            run); COMPRESSED: where the compressed stream starts; otherwise 0.
        compressed_size: COMPRESSED: bytes of the stream.
        cluster_offset: COMPRESSED: guest offset of the start of the cluster (a
            compressed segment is always one cluster, or a part of one).
    """

    offset: int
    length: int
    kind: ClusterKind
    host_offset: int = 0
    compressed_size: int = 0
    cluster_offset: int = 0

    @property
    def end(self) -> int:
        """First guest byte after the segment."""
        return self.offset + self.length


def append_segment(out: list[Segment], seg: Segment) -> None:
    """Add ``seg``, merging it into the previous one when they continue each other."""
    if out:
        last = out[-1]
        if (
            last.kind is seg.kind
            and last.end == seg.offset
            and seg.kind is not ClusterKind.COMPRESSED
            and (
                seg.kind is not ClusterKind.NORMAL
                or last.host_offset + last.length == seg.host_offset
            )
        ):
            out[-1] = attrs.evolve(last, length=last.length + seg.length)
            return
    out.append(seg)


def merge_segments(segments: list[Segment]) -> list[Segment]:
    """Merge runs that continue each other (same kind; NORMAL also host-contiguous)."""
    out: list[Segment] = []
    for seg in segments:
        append_segment(out, seg)
    return out


def _zero_entries(raw: bytes, first: int, stop: int, entry_size: int) -> int:
    """How many entries from ``first`` (below ``stop``) are all-zero bytes; C speed."""
    chunk = raw[first * entry_size : stop * entry_size]
    return (len(chunk) - len(chunk.lstrip(b"\0"))) // entry_size


def map_l2(
    table: array[int] | None,
    raw: bytes,
    layout: Layout,
    table_base: int,
    start: int,
    end: int,
) -> list[Segment]:
    """Map guest ``[start, end)`` through one L2 table into merged segments.

    Args:
        table: the L2 table as integers (:func:`decode_table`), or None when the L1
            entry has no table (everything unallocated).
        raw: the same table as bytes (used to skip runs of empty entries quickly).
        layout: the image's :class:`Layout`.
        table_base: guest offset of the first byte the table maps.
        start, end: the guest range, inside what the table maps.
    """
    if table is None:
        return [Segment(start, end - start, ClusterKind.UNALLOCATED)]
    cs = layout.cluster_size
    bits = layout.cluster_bits
    step = 2 if layout.extended_l2 else 1
    entry_size = 8 * step
    first = (start - table_base) >> bits
    last = (end - 1 - table_base) >> bits
    out: list[Segment] = []
    # A plain data cluster (no flag but COPIED, an aligned host offset) needs no decoding.
    plain_ok = not layout.extended_l2 and not layout.data_file
    special = COMPRESSED | ZERO_FLAG
    i = first
    while i <= last:
        c_start = table_base + (i << bits)
        lo, hi = max(start, c_start), min(end, c_start + cs)
        entry = table[i * step]
        if plain_ok and entry and not entry & special:
            host = entry & OFFSET_MASK
            if host and not host % cs:
                j = i + 1
                while j <= last and table[j] == entry + ((j - i) << bits):
                    j += 1
                stop = min(end, table_base + (j << bits))
                seg = Segment(lo, stop - lo, ClusterKind.NORMAL, host + lo - c_start)
                prev = out[-1] if out else None
                if (
                    prev is not None
                    and prev.kind is ClusterKind.NORMAL
                    and prev.host_offset + prev.length == seg.host_offset
                ):
                    out[-1] = Segment(
                        prev.offset, prev.length + seg.length, prev.kind, prev.host_offset
                    )
                else:
                    out.append(seg)
                i = j
                continue
        if entry == 0 and (not layout.extended_l2 or table[i * step + 1] == 0):
            n = max(1, _zero_entries(raw, i, last + 1, entry_size))
            stop = min(end, table_base + ((i + n) << bits))
            append_segment(out, Segment(lo, stop - lo, ClusterKind.UNALLOCATED))
            i += n
            continue
        try:
            decoded = decode_l2_entry(entry, layout)
        except Qcow2FormatError as exc:
            raise Qcow2FormatError(f"{exc} (guest offset {_hex(c_start)})", exc.offset) from None
        if decoded.kind is ClusterKind.COMPRESSED:
            if layout.extended_l2 and table[i * step + 1]:
                raise Qcow2FormatError(
                    f"compressed cluster at guest offset {_hex(c_start)} has a non-zero "
                    "subcluster bitmap"
                )
            append_segment(
                out,
                Segment(
                    lo,
                    hi - lo,
                    ClusterKind.COMPRESSED,
                    decoded.host_offset,
                    decoded.compressed_size,
                    c_start,
                ),
            )
        elif layout.extended_l2:
            _map_subclusters(out, decoded, table[i * step + 1], layout, c_start, lo, hi)
        elif decoded.kind is ClusterKind.NORMAL:
            # The common case: a run of host-contiguous clusters maps as one segment.
            # Entries that go up by exactly one cluster each keep the same flags.
            j = i + 1
            while j <= last and table[j] == entry + ((j - i) << bits):
                j += 1
            stop = min(end, table_base + (j << bits))
            append_segment(
                out, Segment(lo, stop - lo, decoded.kind, decoded.host_offset + lo - c_start)
            )
            i = j
            continue
        else:
            append_segment(out, Segment(lo, hi - lo, decoded.kind))
        i += 1
    return out


def _map_subclusters(
    out: list[Segment],
    decoded: L2Entry,
    bitmap: int,
    layout: Layout,
    c_start: int,
    lo: int,
    hi: int,
) -> None:
    alloc, zero = bitmap & 0xFFFF_FFFF, bitmap >> 32
    if alloc & zero:
        raise Qcow2FormatError(
            f"subcluster bitmap {_hex(bitmap)} at guest offset {_hex(c_start)} marks "
            "subclusters both allocated and zero"
        )
    if alloc and decoded.kind is not ClusterKind.NORMAL:
        raise Qcow2FormatError(
            f"subcluster bitmap {_hex(bitmap)} at guest offset {_hex(c_start)} marks "
            "subclusters allocated in a cluster without a host offset"
        )
    sc = layout.subcluster_size
    first = (lo - c_start) // sc
    last = (hi - 1 - c_start) // sc
    for s in range(first, last + 1):
        s_lo = max(lo, c_start + s * sc)
        s_hi = min(hi, c_start + (s + 1) * sc)
        if alloc >> s & 1:
            seg = Segment(
                s_lo, s_hi - s_lo, ClusterKind.NORMAL, decoded.host_offset + s_lo - c_start
            )
        elif zero >> s & 1:
            seg = Segment(s_lo, s_hi - s_lo, ClusterKind.ZERO)
        else:
            seg = Segment(s_lo, s_hi - s_lo, ClusterKind.UNALLOCATED)
        append_segment(out, seg)


# -- encoders (writing) ----------------------------------------------------------------

#: The feature name table qemu writes into every version 3 header: ``(type, bit, name)``.
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)


def encode_header(h: Header) -> bytes:
    """The fixed header as bytes: 72 in version 2; in version 3, 104 plus, when the header
    is at least 112 bytes long, the compression type byte and its 7 bytes of padding.

    Fields past byte 112 of a longer header (a future version's) are not produced, so
    rewriting the header with these bytes leaves them alone.
    """
    base = _HEADER_V2.pack(
        MAGIC,
        h.version,
        h.backing_file_offset,
        h.backing_file_size,
        h.cluster_bits,
        h.size,
        h.crypt_method,
        h.l1_size,
        h.l1_table_offset,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        h.nb_snapshots,
        h.snapshots_offset,
    )
    if h.version < 3:
        return base
    v3 = _HEADER_V3.pack(
        h.incompatible_features,
        h.compatible_features,
        h.autoclear_features,
        h.refcount_order,
        h.header_length,
    )
    tail = bytes([h.compression_type]) + bytes(7) if h.header_length >= 112 else b""
    return base + v3 + tail


def encode_extension(ext_type: int, body: bytes) -> bytes:
    """One header extension: type, length, body padded to a multiple of 8 bytes."""
    return _EXT_HEADER.pack(ext_type, len(body)) + body + bytes(-len(body) % 8)


def encode_feature_names(names: tuple[tuple[int, int, str], ...] = FEATURE_NAMES) -> bytes:
    """The feature name table extension (48 bytes per feature)."""
    body = b"".join(
        bytes([kind, bit]) + name.encode("utf-8")[:46].ljust(46, b"\0") for kind, bit, name in names
    )
    return encode_extension(Extension.FEATURE_NAMES, body)


def encode_table(table: array[int]) -> bytes:
    """An ``array('Q')`` of native integers as a big-endian table (inverse of decode)."""
    if sys.byteorder == "little":
        swapped = array("Q", table)
        swapped.byteswap()
        return swapped.tobytes()
    return table.tobytes()


#: array typecodes for whole-byte refcount widths (in memory, one item per cluster).
_REFCOUNT_CODES = {3: "B", 4: "H", 5: "I", 6: "Q"}


def refcount_array(order: int, count: int) -> array[int]:
    """A zeroed in-memory refcount block of ``count`` entries for refcount order ``order``.

    Widths under 8 bits are kept one byte per entry in memory and packed on encoding.
    """
    code = _REFCOUNT_CODES.get(order, "B")
    if array(code).itemsize * 8 < max(8, 1 << order):  # pragma: no cover - odd platforms
        code = "Q"
    return array(code, bytes(count * array(code).itemsize))


def decode_refblock(raw: bytes | bytearray | memoryview, order: int) -> array[int]:
    """A refcount block from disk as an in-memory array (see :func:`refcount_array`).

    Entries narrower than a byte are packed least significant bits first, as qemu does.
    """
    data = bytes(raw)
    if order >= 3:
        out = refcount_array(order, 0)
        if out.itemsize * 8 == 1 << order:
            out.frombytes(data)
            if sys.byteorder == "little" and out.itemsize > 1:
                out.byteswap()
            return out
        # Wider in-memory items than on disk (only on odd platforms).
        width = (1 << order) // 8
        return array(
            "Q", [int.from_bytes(data[i : i + width], "big") for i in range(0, len(data), width)]
        )
    bits = 1 << order
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    planes = []
    for j in range(per_byte):
        table = bytes(((b >> (j * bits)) & mask) for b in range(256))
        planes.append(data.translate(table))
    out = array("B", bytes(len(data) * per_byte))
    for j, plane in enumerate(planes):
        out[j::per_byte] = array("B", plane)
    return out


def encode_refblock(block: array[int], order: int) -> bytes:
    """An in-memory refcount block as bytes on disk (inverse of :func:`decode_refblock`)."""
    if order >= 3:
        width = (1 << order) // 8
        if block.itemsize == width:
            out = array(block.typecode, block)
            if sys.byteorder == "little" and width > 1:
                out.byteswap()
            return out.tobytes()
        return b"".join(v.to_bytes(width, "big") for v in block)  # pragma: no cover
    bits = 1 << order
    per_byte = 8 // bits
    raw = block.tobytes()
    acc = 0
    for j in range(per_byte):
        plane = raw[j::per_byte]
        shifted = plane.translate(bytes(((v << (j * bits)) & 0xFF) for v in range(256)))
        acc |= int.from_bytes(shifted, "big")
    return acc.to_bytes(len(raw) // per_byte, "big")


def compressed_l2_entry(host: int, size: int, cluster_bits: int) -> int:
    """The L2 entry of a compressed cluster whose stream is ``size`` bytes at ``host``.

    The sector count field holds the number of 512-byte sectors the stream touches,
    minus one, as qemu writes it.
    """
    shift = 62 - (cluster_bits - 8)
    sectors = ((host + size - 1) >> 9) - (host >> 9)
    return COMPRESSED | (sectors << shift) | host


def l1_entries_for(size: int, cluster_bits: int, extended_l2: bool = False) -> int:
    """How many L1 entries a virtual size needs (qemu's ``size_to_l1``)."""
    l2_entries = (1 << cluster_bits) // (16 if extended_l2 else 8)
    span = l2_entries << cluster_bits
    return -(-size // span)
