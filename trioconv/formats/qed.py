"""QED (QEMU enhanced disk), read-only.

A QED file is cut into clusters (4 KiB to 64 MiB, a power of two). Everything is
little-endian. The header at offset 0 says::

    magic "QED\\0" | cluster_size | table_size (clusters per table) | header_size
    features | compat_features | autoclear_features | l1_table_offset | image_size
    backing_filename_offset | backing_filename_size

A guest offset is mapped through two tables of ``table_size * cluster_size / 8``
64-bit entries each: the L1 table (in memory while the image is open) points at L2
tables, whose entries point at data clusters. An L2 entry of 0 is *unallocated* (the
backing file shows through, or zeroes), 1 is a *zero cluster*, anything else must be a
cluster-aligned offset inside the file, past the header.

Feature bits: BACKING_FILE (the name is stored in the header cluster), NEED_CHECK (the
image was not closed cleanly - harmless when reading, as qemu also allows), and
BACKING_FORMAT_NO_PROBE (the backing file is raw). Other feature bits are refused.

``block_status`` answers for what a reader sees (unallocated clusters ask the backing
chain); ``layer_status`` answers from this image's tables alone (``convert -B``): DATA
for allocated clusters, ZERO for zero clusters and for unallocated ones with no backing
file or past its end, HOLE for unallocated ones the backing file shows through.
"""

from __future__ import annotations

import collections
import struct
from array import array
from typing import TYPE_CHECKING

import attrs

from .._errors import BackingChainTooLong, ImageError, TrioconvIOError, UnsupportedError
from ..driver import Caps, Driver, Extent, ExtentKind, Limits
from ._base import FormatInfo
from ._common import backing_error, full_backing_name, read_or_zero
from ._common import fill_zero as _fill_zero
from ._common import resolve_name as _resolve
from ._common import same_place as _same_place

if TYPE_CHECKING:
    from .._open import OpenContext

__all__ = [
    "FORMAT",
    "QedDriver",
    "QedFormatError",
    "QedHeader",
    "decode_header",
    "encode_header",
    "open_qed",
    "probe_qed",
]

MAGIC = b"QED\x00"
HEADER = struct.Struct("<4sIIIQQQQQII")
F_BACKING_FILE = 0x01
F_NEED_CHECK = 0x02
F_BACKING_FORMAT_NO_PROBE = 0x04
FEATURE_MASK = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE
MIN_CLUSTER_SIZE = 4 * 1024
MAX_CLUSTER_SIZE = 64 * 1024 * 1024
MIN_TABLE_SIZE = 1
MAX_TABLE_SIZE = 16
#: Largest table (L1 or L2) this reader loads: qemu's defaults make 256 KiB tables.
MAX_TABLE_BYTES = 32 * 1024 * 1024
#: Longest backing file name (qemu keeps it in a 4 KiB buffer with its NUL).
MAX_BACKING_NAME = 4095
#: Bytes of L2 tables kept in memory at most (and never more than 64 tables).
L2_CACHE_BYTES = 16 * 1024 * 1024
L2_CACHE_TABLES = 64
#: Most clusters one ``block_status`` call looks at.
STATUS_CLUSTERS = 65536

UNALLOCATED = 0
ZERO_CLUSTER = 1


class QedFormatError(ValueError):
    """The bytes are not a QED image this reader can trust."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


@attrs.frozen
class QedHeader:
    """The QED header."""

    cluster_size: int
    table_size: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_filename_offset: int = 0
    backing_filename_size: int = 0

    @property
    def table_bytes(self) -> int:
        return self.table_size * self.cluster_size

    @property
    def table_entries(self) -> int:
        return self.table_bytes // 8

    @property
    def l2_span(self) -> int:
        """Guest bytes one L2 table maps."""
        return self.table_entries * self.cluster_size

    @property
    def max_image_size(self) -> int:
        return self.table_entries * self.table_entries * self.cluster_size


def encode_header(h: QedHeader) -> bytes:
    """The header's bytes."""
    return HEADER.pack(
        MAGIC,
        h.cluster_size,
        h.table_size,
        h.header_size,
        h.features,
        h.compat_features,
        h.autoclear_features,
        h.l1_table_offset,
        h.image_size,
        h.backing_filename_offset,
        h.backing_filename_size,
    )


def _power_of_two(value: int) -> bool:
    return value > 0 and not value & (value - 1)


def decode_header(buf: bytes | bytearray | memoryview, file_size: int | None = None) -> QedHeader:
    """Decode and check a QED header as qemu's open does.

    Raises:
        QedFormatError: not QED, or a field out of range.
        UnsupportedError: unknown feature bits.
    """
    if len(buf) < HEADER.size:
        raise QedFormatError(f"the header is truncated ({len(buf)} bytes)", 0)
    magic, cs, ts, hs, feat, compat, auto, l1, size, bo, bsz = HEADER.unpack_from(bytes(buf))
    if magic != MAGIC:
        raise QedFormatError("Image not in QED format", 0)
    h = QedHeader(cs, ts, hs, feat, compat, auto, l1, size, bo, bsz)
    if feat & ~FEATURE_MASK:
        raise UnsupportedError(f"Unsupported QED features: {feat & ~FEATURE_MASK:x}")
    if not (_power_of_two(cs) and MIN_CLUSTER_SIZE <= cs <= MAX_CLUSTER_SIZE):
        raise QedFormatError(f"invalid cluster size {cs} (a power of two, 4 KiB to 64 MiB)", 4)
    if not (_power_of_two(ts) and MIN_TABLE_SIZE <= ts <= MAX_TABLE_SIZE):
        raise QedFormatError(f"invalid table size {ts} (a power of two, 1 to 16 clusters)", 8)
    if size % 512 or size > h.max_image_size:
        raise QedFormatError(
            f"invalid image size {size} (a multiple of 512, at most {h.max_image_size})", 40
        )
    if hs == 0 or hs > 0xFFFFFFFF // cs:
        raise QedFormatError(f"invalid header size {hs} clusters", 12)
    if feat & F_BACKING_FILE:
        if bo + bsz > cs * hs:
            raise QedFormatError(
                f"the backing file name at {bo} ({bsz} bytes) lies outside the header", 56
            )
        if bsz > MAX_BACKING_NAME:
            raise QedFormatError(f"the backing file name is too long ({bsz} bytes)", 60)
    if h.table_bytes > MAX_TABLE_BYTES:
        raise UnsupportedError(
            f"QED tables of {h.table_bytes} bytes are larger than the {MAX_TABLE_BYTES} "
            "bytes this reader loads"
        )
    if file_size is not None and not table_offset_ok(h, l1, file_size):
        if ts == 1:
            raise QedFormatError(
                "QED table offset is invalid: a table size of 1 cluster is refused (as "
                "qemu refuses it)",
                8,
            )
        raise QedFormatError(f"invalid L1 table offset {l1:#x}", 32)
    return h


def sector_length(file_size: int) -> int:
    """The file's length as qemu's block layer measures it: in whole 512-byte sectors,
    rounded up. A file cut short inside its last sector keeps every cluster that
    starts before the cut, and the missing bytes read as zeroes."""
    return -(-file_size // 512) * 512


def cluster_offset_ok(h: QedHeader, offset: int, file_size: int) -> bool:
    """qemu's test of a cluster offset: aligned, past the header, inside the file
    (whose size, in whole sectors, is rounded down to whole clusters)."""
    if offset % h.cluster_size:
        return False
    size = sector_length(file_size)
    limit = size - size % h.cluster_size
    return h.header_size * h.cluster_size <= offset < limit


def table_offset_ok(h: QedHeader, offset: int, file_size: int) -> bool:
    """A table's first and last cluster are valid cluster offsets.

    As in qemu, a table whose last cluster is its first (a table size of one cluster)
    fails the test: qemu takes it for an overflow of the offset, so it opens no QED
    image made with ``table_size=1``, and neither does trioconv.
    """
    last = offset + (h.table_size - 1) * h.cluster_size
    if last <= offset:
        return False
    return cluster_offset_ok(h, offset, file_size) and cluster_offset_ok(h, last, file_size)


def decode_table(raw: bytes | bytearray | memoryview) -> array[int]:
    """A table's entries in host order."""
    table = array("Q")
    table.frombytes(bytes(raw))
    if struct.pack("=H", 1) != struct.pack("<H", 1):  # pragma: no cover - big-endian host
        table.byteswap()
    return table


#: Runs that block status looks at in one go (see :meth:`QedDriver._runs`).
_STATUS_RUNS = 16


class QedDriver(Driver):
    """A QED image opened read-only. Made by :func:`open_qed`."""

    name = "qed"

    def __init__(
        self, child: Driver, header: QedHeader, l1: array[int], backing: Driver | None
    ) -> None:
        self.child = child
        self.header = header
        self.location = child.location
        self.backing = backing
        self._l1 = l1
        self._file_size = child.size
        self._cache: collections.OrderedDict[int, array[int]] = collections.OrderedDict()
        self._cache_max = max(2, min(L2_CACHE_TABLES, L2_CACHE_BYTES // header.table_bytes))
        #: The backing file name as the header stores it (None: no backing file).
        self.backing_name: str | None = None

    @property
    def size(self) -> int:
        return self.header.image_size // 512 * 512  # whole sectors, as QEMU reads it

    def describe(self) -> dict[str, object]:
        """qemu-img info's qed keys: the backing file."""
        out: dict[str, object] = {}
        if self.backing_name is not None:
            out["backing-filename"] = self.backing_name
            full = full_backing_name(self.backing_name, self.backing, self.location)
            if full is not None:
                out["full-backing-filename"] = full
            if self.header.features & F_BACKING_FORMAT_NO_PROBE:
                out["backing-filename-format"] = "raw"
        return out

    @property
    def limits(self) -> Limits:
        return Limits(request_alignment=1, cluster_size=self.header.cluster_size)

    @property
    def caps(self) -> Caps:
        return Caps(block_status=True)

    async def aclose(self) -> None:
        self._cache.clear()

    def _corrupt(self, problem: str, offset: int | None = None) -> TrioconvIOError:
        return TrioconvIOError(f"{self.location}: corrupt qed image: {problem}", offset=offset)

    async def _l2(self, index: int) -> array[int] | None:
        offset = self._l1[index] if index < len(self._l1) else 0
        if offset == 0:
            return None
        if not table_offset_ok(self.header, offset, self._file_size):
            raise self._corrupt(f"L1 entry {index} has the invalid L2 offset {offset:#x}", offset)
        table = self._cache.get(offset)
        if table is not None:
            self._cache.move_to_end(offset)
            return table
        raw = bytearray(self.header.table_bytes)
        await read_or_zero(self.child, offset, memoryview(raw))
        table = decode_table(raw)
        self._cache[offset] = table
        while len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)
        return table

    async def _runs(
        self, offset: int, end: int, *, max_runs: int = 0
    ) -> list[tuple[int, int, int]]:
        """``(offset, length, entry)`` runs over guest ``[offset, end)``: entry is 0
        (unallocated), 1 (zero) or the host offset of ``offset``; host-contiguous
        clusters are merged.

        With ``max_runs``, at most that many runs (the first ones): block
        status asks for a few at a time, as listing a fragmented range to its end for
        every extent would take time quadratic in its runs.
        """
        h = self.header
        cs = h.cluster_size
        out: list[tuple[int, int, int]] = []
        pos = offset
        while pos < end:
            index = pos // h.l2_span
            stop = min(end, (index + 1) * h.l2_span)
            table = await self._l2(index)
            while pos < stop:
                cluster = pos // cs
                n = min(stop, (cluster + 1) * cs) - pos
                entry = table[cluster % h.table_entries] if table is not None else UNALLOCATED
                if entry > ZERO_CLUSTER:
                    if not cluster_offset_ok(h, entry, self._file_size):
                        raise self._corrupt(
                            f"L2 entry for guest offset {cluster * cs:#x} has the invalid "
                            f"cluster offset {entry:#x}",
                            entry,
                        )
                    entry += pos - cluster * cs
                if out:
                    p_off, p_len, p_entry = out[-1]
                    same = (
                        p_entry == entry
                        if p_entry <= ZERO_CLUSTER
                        else entry > ZERO_CLUSTER and p_entry + p_len == entry
                    )
                    if same:
                        out[-1] = (p_off, p_len + n, p_entry)
                        pos += n
                        continue
                    if len(out) == max_runs:
                        return out
                out.append((pos, n, entry))
                pos += n
        return out

    async def preadinto(self, offset: int, buf: memoryview) -> None:
        buf = buf.cast("B") if buf.format != "B" else buf
        if offset < 0 or offset + buf.nbytes > self.size:
            raise TrioconvIOError(
                f"{self.location}: read of {buf.nbytes} bytes at {offset} is outside the "
                f"image ({self.size} bytes)",
                offset=offset,
            )
        for off, n, entry in await self._runs(offset, offset + buf.nbytes):
            view = buf[off - offset : off - offset + n]
            if entry > ZERO_CLUSTER:
                await read_or_zero(self.child, entry, view)
            elif entry == UNALLOCATED and self.backing is not None:
                await read_or_zero(self.backing, off, view)
            else:
                _fill_zero(view)

    async def block_status(self, offset: int, length: int) -> Extent:
        return await self._status(offset, length, layer=False)

    async def layer_status(self, offset: int, length: int) -> Extent:
        """This image's own clusters: DATA (allocated), ZERO (zero clusters, or
        unallocated with no backing image or past its end) or HOLE (unallocated: the
        backing image shows through)."""
        return await self._status(offset, length, layer=True)

    async def _status(self, offset: int, length: int, *, layer: bool) -> Extent:
        cs = self.header.cluster_size
        end = min(self.size, offset + max(length, 1), offset + STATUS_CLUSTERS * cs)
        if end < self.size:
            end = min(self.size, max(end // cs * cs, (offset // cs + 1) * cs))
        kind: ExtentKind | None = None
        stop = offset
        while stop < end:
            # A few runs at a time, until the kind changes.
            for off, n, entry in await self._runs(stop, end, max_runs=_STATUS_RUNS):
                run_end = off + n
                if layer:
                    pieces = self._layer_pieces(off, run_end, entry)
                elif entry > ZERO_CLUSTER:
                    pieces = [(run_end, ExtentKind.DATA)]
                elif entry == ZERO_CLUSTER or self.backing is None:
                    pieces = [(run_end, ExtentKind.ZERO)]
                else:
                    k, k_end = await self._backing_status(off, run_end)
                    pieces = [(k_end, k)]
                for p_end, p_kind in pieces:
                    if kind is None:
                        kind = p_kind
                    elif p_kind is not kind:
                        return Extent(offset, stop - offset, kind)
                    stop = p_end
                if stop < run_end:
                    assert kind is not None
                    return Extent(offset, stop - offset, kind)
        if kind is None:  # (an empty range: not asked by the engine)
            raise self._corrupt(f"no clusters at guest offset {offset:#x}", offset)
        return Extent(offset, stop - offset, kind)

    def _layer_pieces(self, start: int, end: int, entry: int) -> list[tuple[int, ExtentKind]]:
        """``(end, kind)`` pieces that tile the run ``[start, end)``, for this layer."""
        if entry > ZERO_CLUSTER:
            return [(end, ExtentKind.DATA)]
        backing_end = self.backing.size if self.backing is not None else 0
        if entry == ZERO_CLUSTER or start >= backing_end:
            return [(end, ExtentKind.ZERO)]
        if end > backing_end:
            return [(backing_end, ExtentKind.HOLE), (end, ExtentKind.ZERO)]
        return [(end, ExtentKind.HOLE)]

    async def _backing_status(self, start: int, end: int) -> tuple[ExtentKind, int]:
        """Unallocated here: DATA where the backing chain has data, else HOLE."""
        assert self.backing is not None
        if start >= self.backing.size:
            return ExtentKind.HOLE, end
        ext = await self.backing.block_status(start, min(end, self.backing.size) - start)
        if ext.offset != start or ext.length <= 0:
            return ExtentKind.DATA, start + 1
        stop = min(end, start + ext.length)
        if ext.kind is ExtentKind.DATA:
            return ExtentKind.DATA, stop
        if stop >= self.backing.size:
            stop = end  # zeroes to the backing image's end, then past it
        return ExtentKind.HOLE, stop


async def _open_backing(ctx: OpenContext, name: str, fmt: str | None) -> Driver:
    path = _resolve(ctx, name, "backing file")
    if any(_same_place(path, seen) for seen in (*ctx.chain, ctx.location)):
        raise ImageError(f"Backing file '{path}' creates an infinite loop")
    try:
        backing = await ctx.open_backing(path, fmt)
    except BackingChainTooLong:
        raise
    except ImageError as exc:
        raise backing_error(f"Could not open '{ctx.location}'", exc) from None
    if fmt is None and backing.name == "raw":
        raise ImageError(
            f"Could not open '{ctx.location}': backing file '{path}': backing file format "
            "not specified; probing a raw backing file is refused"
        )
    return backing


async def open_qed(transport: Driver, ctx: OpenContext) -> QedDriver:
    """Read the header and L1 table; open the backing image if there is one.

    Raises:
        ImageError: not a valid QED image, or its backing chain cannot be opened.
        UnsupportedError: unknown feature bits, or tables too large.
    """
    where = f"Could not open '{ctx.location}'"
    file_size = transport.size
    try:
        h = decode_header(await transport.pread(0, min(file_size, HEADER.size)), file_size)
        raw_l1 = bytearray(h.table_bytes)
        await read_or_zero(transport, h.l1_table_offset, memoryview(raw_l1))
        name: str | None = None
        if h.features & F_BACKING_FILE:
            raw_name = await transport.pread(h.backing_filename_offset, h.backing_filename_size)
            # qemu reads the name as a C string: it ends at the first NUL, and an empty
            # one names no backing file (the image is opened on its own).
            raw_name = raw_name.split(b"\0", 1)[0]
            try:
                name = raw_name.decode() or None
            except UnicodeDecodeError:
                raise QedFormatError("the backing file name is not UTF-8") from None
    except QedFormatError as exc:
        raise ImageError(f"{where}: {exc}") from None
    except UnsupportedError as exc:
        raise UnsupportedError(f"{where}: {exc}") from None
    except TrioconvIOError as exc:
        raise ImageError(f"{where}: {exc}") from None
    backing = None
    if name is not None and not ctx.no_backing:
        fmt = "raw" if h.features & F_BACKING_FORMAT_NO_PROBE else None
        backing = await _open_backing(ctx, name, fmt)
    driver = QedDriver(transport, h, decode_table(raw_l1), backing)
    driver.location = ctx.location
    driver.backing_name = name
    return driver


def probe_qed(header: bytes, filename: str) -> int:
    """The ``QED\\0`` magic at offset 0."""
    return 100 if header[:4] == MAGIC else 0


FORMAT = FormatInfo("qed", probe_qed, open_qed)
