"""The VHDX driver: reading dynamic and fixed images, writing new ones.

Opening reads the header section (file identifier, both headers, the region table),
replays the log if the image is dirty, reads the metadata items and loads the BAT (one
64-bit entry per payload block; refused beyond :data:`MAX_BAT_BYTES`).

A dirty log (a log GUID in the current header and a valid sequence of entries) is
replayed as the specification says: the active sequence is found, and its updates are
written into the file and the log GUID cleared when the image is writable (as qemu
does), or, for a read-only image, laid over the file in memory (:class:`_ReplayedFile`,
at most :data:`MAX_REPLAY_BYTES` of log), so that a source is never modified. A log
entry that the active sequence needs but that is damaged is refused by name.

A read maps guest bytes through the BAT block by block: FULLY_PRESENT blocks are read
from their file offset (neighbouring blocks that are contiguous in the file in one
request), every other non-differencing state reads as zeroes. ``block_status`` answers
for a run of blocks at once: ZERO for blocks that read as zeroes, and for FULLY_PRESENT
blocks stored back to back what the file below says (holes read as zeroes);
PARTIALLY_PRESENT blocks belong to differencing images, which are refused.

Writing follows qemu: a block that is not FULLY_PRESENT gets a new 1 MiB-aligned place
at the end of the file when it is first written. The place is chosen synchronously when
``pwrite`` is entered, so concurrent writers never share a block and in-order writes
give a sequential file. The new place lies beyond everything written so far and reads
as zeroes until written. BAT entries are kept in memory and the changed 4 KiB pages are
written by ``flush``, together with the file's tail, so that after ``flush`` the image is
complete and consistent (what ``qemu-img check`` accepts). The log is never used: the
image is new and nobody else has it open.
"""

from __future__ import annotations

import os
import uuid
from array import array
from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs
import trio

from ..._errors import ImageError, TrioconvIOError, UnsupportedError, UsageError, ZeroesNotSupported
from ..._qemuopts import parse_bool
from ..._sizes import parse_size
from ...driver import Buffer, Caps, Driver, Extent, ExtentKind, Limits
from .._common import ZEROS as _ZEROS
from .._common import check_range
from .._common import fill_zero as _fill_zero
from . import _codec as codec
from ._codec import BlockState, MiB, VhdxFormatError

if TYPE_CHECKING:
    from ..._open import OpenContext

__all__ = ["VHDX_CREATE_OPTIONS", "VhdxDriver", "create_vhdx", "open_vhdx"]

#: Largest BAT loaded into memory (an 8 MiB-block 64 TiB disk needs 64 MiB).
MAX_BAT_BYTES = 128 * MiB
#: Most blocks one ``block_status`` call looks at.
STATUS_BLOCKS = 65536
#: Log bytes read at once while looking for entries to replay.
LOG_READ_CHUNK = 1 * MiB
#: Most bytes of valid log entries kept in memory for a replay.
MAX_REPLAY_BYTES = 64 * MiB

VHDX_CREATE_OPTIONS: dict[str, str] = {
    "size": "Virtual disk size; max of 64TB.",
    "log_size": "Log size; min 1MB.",
    "block_size": "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.",
    "subformat": "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'.",
    "block_state_zero": (
        "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set "
        "to 'off' when using 'qemu-img convert' with subformat=dynamic."
    ),
}


class VhdxDriver(Driver):
    """An open VHDX image. Made by :func:`open_vhdx`."""

    name = "vhdx"

    def __init__(
        self,
        child: Driver,
        *,
        header: codec.Header,
        meta: codec.Metadata,
        bat: array[int],
        bat_region: codec.RegionEntry,
        reserved: list[tuple[int, int]],
        writable: bool,
    ) -> None:
        self.child = child
        self.location = child.location
        self.header = header
        self.meta = meta
        self.block_size = meta.params.block_size
        self.chunk_ratio = codec.chunk_ratio(self.block_size, meta.logical_sector_size)
        self._bat = bat
        self._bat_region = bat_region
        self._reserved = reserved  # (start, end) of the header section, log, regions
        self._writable = writable
        # Where the next new block goes, and how far the file has been written.
        self._next_alloc = -(-child.size // MiB) * MiB
        self._file_end = child.size
        #: How far writes that completed reached: short of ``_file_end`` when a write was
        #: cancelled before it was done (then closing pads the file up to the last block).
        self._done_end = child.size
        self._closed = False
        self._allocated_end = child.size  # the file's length once every write is done
        self._dirty_pages: set[int] = set()
        self._flush_lock = trio.Lock()
        first_state = codec.entry_state(bat[0]) if len(bat) else BlockState.NOT_PRESENT
        self._zero_init = first_state != BlockState.FULLY_PRESENT or child.caps.zero_init

    # -- contract ---------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.meta.virtual_size

    @property
    def limits(self) -> Limits:
        return Limits(request_alignment=1, cluster_size=self.block_size)

    @property
    def caps(self) -> Caps:
        return Caps(
            writable=self._writable,
            zeroes=self._writable,
            block_status=True,
            zero_init=self._zero_init,
        )

    @property
    def subformat(self) -> str:
        """``"fixed"`` or ``"dynamic"``, from the file parameters."""
        return "fixed" if self.meta.params.leave_blocks_allocated else "dynamic"

    # -- mapping ----------------------------------------------------------------------
    def _corrupt(self, problem: str, offset: int | None = None) -> TrioconvIOError:
        return TrioconvIOError(f"{self.location}: corrupt vhdx image: {problem}", offset=offset)

    def _check_range(self, offset: int, length: int) -> None:
        check_range(self.location, self.size, "request", offset, length)

    def _host_block(self, block: int) -> int | None:
        """The file offset of payload block ``block``; None when it reads as zeroes."""
        index = codec.bat_index(block, self.chunk_ratio)
        entry = self._bat[index]
        state = codec.entry_state(entry)
        if state == BlockState.FULLY_PRESENT:
            host = codec.entry_offset(entry)
            length = min(self.block_size, self.size - block * self.block_size)
            # The file's length in whole sectors, as qemu measures it: a file cut short
            # inside its last sector keeps its last block (the lost bytes read as zeroes).
            file_size = -(-self._allocated_end // 512) * 512
            if host + length > file_size:
                raise self._corrupt(
                    f"BAT entry {index} (block {block}) points at {host:#x}, beyond the end "
                    f"of the file ({file_size} bytes); the image has probably been truncated",
                    host,
                )
            for start, end in self._reserved:
                if host < end and host + self.block_size > start:
                    raise self._corrupt(
                        f"BAT entry {index} (block {block}) points at {host:#x}, inside the "
                        f"metadata at {start:#x}..{end:#x}",
                        host,
                    )
            return host
        if state in codec.ZERO_STATES:
            return None
        if state == BlockState.PARTIALLY_PRESENT:
            raise UnsupportedError(
                f"{self.location}: block {block} is partially present (a differencing "
                "image); differencing VHDX images are not supported"
            )
        raise self._corrupt(f"BAT entry {index} has the unknown state {state}", None)

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int | None]]:
        """Split ``[offset, offset + length)`` into ``(offset, length, host)`` pieces,
        one per block, host-contiguous neighbours merged; host None reads as zeroes."""
        out: list[tuple[int, int, int | None]] = []
        bs = self.block_size
        pos = offset
        end = offset + length
        while pos < end:
            block = pos // bs
            n = min(end, (block + 1) * bs) - pos
            base = self._host_block(block)
            host = None if base is None else base + pos - block * bs
            if out:
                p_off, p_len, p_host = out[-1]
                if (host is None and p_host is None) or (
                    host is not None and p_host is not None and p_host + p_len == host
                ):
                    out[-1] = (p_off, p_len + n, p_host)
                    pos += n
                    continue
            out.append((pos, n, host))
            pos += n
        return out

    # -- reading ----------------------------------------------------------------------
    async def preadinto(self, offset: int, buf: memoryview) -> None:
        buf = buf.cast("B") if buf.format != "B" else buf
        self._check_range(offset, buf.nbytes)
        reads: list[tuple[int, memoryview]] = []
        # Only a file opened read-only can end inside a block; one being written ends
        # where its writes reach.
        file_end = max(self.child.size, self._file_end, self._allocated_end)
        for off, n, host in self._pieces(offset, buf.nbytes):
            view = buf[off - offset : off - offset + n]
            if host is None:
                _fill_zero(view)
                continue
            inside = max(0, min(n, file_end - host))
            if inside < n:  # the tail of a file cut inside its last sector
                _fill_zero(view[inside:])
                view = view[:inside]
            if inside:
                reads.append((host, view))
        if len(reads) == 1:
            await self.child.preadinto(*reads[0])
        elif reads:
            await self.child.preadinto_many(reads)

    async def block_status(self, offset: int, length: int) -> Extent:
        """One extent: a run of blocks that read as zeroes (no I/O), or a run of present
        blocks that lie back to back in the file, of which the layer below says which
        part is data and which a hole (as qemu asks the file under a vhdx image)."""
        if self._closed:  # (the BAT in memory would still answer)
            raise TrioconvIOError(f"{self.location}: image is closed")
        self._check_range(offset, 1)
        bs = self.block_size
        end = min(self.size, offset + max(length, 1), offset + STATUS_BLOCKS * bs)
        block = offset // bs
        stop = -(-end // bs)
        base = self._host_block(block)
        if base is None:
            b = block + 1
            while b < stop and self._host_block(b) is None:
                b += 1
            return Extent(offset, min(end, b * bs) - offset, ExtentKind.ZERO)
        b = block + 1
        while b < stop and self._host_block(b) == base + (b - block) * bs:
            b += 1
        n = min(end, b * bs) - offset
        first = base + offset - block * bs
        child = self.child
        if not child.caps.block_status or first >= child.size:
            return Extent(offset, n, ExtentKind.DATA)
        ext = await child.block_status(first, min(first + n, child.size) - first)
        kind = ExtentKind.DATA if ext.kind is ExtentKind.DATA else ExtentKind.ZERO
        return Extent(offset, max(1, min(n, ext.length)), kind)

    # -- writing ----------------------------------------------------------------------
    def _check_writable(self) -> None:
        if not self._writable:
            raise UnsupportedError(f"{self.location}: opened read-only")

    def _allocate(self, block: int) -> int:
        """Give payload block ``block`` a new place at the end of the file (no I/O)."""
        index = codec.bat_index(block, self.chunk_ratio)
        host = self._next_alloc
        self._next_alloc += self.block_size
        self._allocated_end = max(self._allocated_end, self._next_alloc)
        self._bat[index] = codec.encode_bat_entry(BlockState.FULLY_PRESENT, host)
        self._dirty_pages.add(index * 8 // codec.LOG_SECTOR)
        return host

    async def pwrite(self, offset: int, data: Buffer) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        self._check_range(offset, view.nbytes)
        # Every allocation decision happens here, before the first await.
        bs = self.block_size
        writes: list[tuple[int, int, int]] = []  # (host, start in view, length)
        pos = offset
        end = offset + view.nbytes
        while pos < end:
            block = pos // bs
            n = min(end, (block + 1) * bs) - pos
            base = self._host_block(block)
            if base is None:
                base = self._allocate(block)
            host = base + pos - block * bs
            if writes and writes[-1][0] + writes[-1][2] == host:
                h, s, ln = writes[-1]
                writes[-1] = (h, s, ln + n)
            else:
                writes.append((host, pos - offset, n))
            self._file_end = max(self._file_end, host + n)
            pos += n
        for host, start, n in writes:
            await self.child.pwrite(host, view[start : start + n])
            self._done_end = max(self._done_end, host + n)

    async def pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
    ) -> None:
        self._check_writable()
        self._check_range(offset, length)
        # Blocks that are not present already read as zeroes; allocated ones would need
        # zeroes written, which the caller does better (nothing is changed here then).
        if any(host is not None for _, _, host in self._pieces(offset, length)):
            raise ZeroesNotSupported(f"{self.location}: zeroing allocated vhdx blocks")

    async def flush(self) -> None:
        if not self._writable:
            return
        await self._store(self._file_end)

    async def _store(self, reached: int) -> None:
        """Write the BAT pages that changed, once the file reaches the end of the last
        block allocated (``reached``: how far the file is known to reach)."""
        async with self._flush_lock:
            # The file must reach the end of the last block allocated: a BAT entry past
            # the end of the file makes the image unreadable. (Only a block allocated
            # here: a fixed image's file ends where its last block's payload does.)
            if reached < self._allocated_end:
                tail = self._allocated_end
                await self.child.pwrite(tail - 512, _ZEROS[:512])
                self._file_end = max(self._file_end, tail)
                self._done_end = max(self._done_end, tail)
            pages = sorted(self._dirty_pages)
            self._dirty_pages.clear()
            per_page = codec.LOG_SECTOR // 8
            i = 0
            while i < len(pages):
                j = i
                while j + 1 < len(pages) and pages[j + 1] == pages[j] + 1:
                    j += 1
                first, last = pages[i], pages[j]
                entries = self._bat[first * per_page : (last + 1) * per_page]
                await self.child.pwrite(
                    self._bat_region.file_offset + first * codec.LOG_SECTOR,
                    codec.encode_bat(entries),
                )
                i = j + 1
            await self.child.flush()

    async def aclose(self) -> None:
        # No write is in flight any more: only what completed counts (a cancelled write
        # may have allocated the last block and never reached it).
        if self._writable and (self._dirty_pages or self._done_end < self._allocated_end):
            await self._store(self._done_end)
        self._writable = False
        self._closed = True


# -- opening ---------------------------------------------------------------------------


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


class _ReplayedFile(Driver):
    """A read-only view of a file with the log's updates laid over it, in memory.

    A dirty image opened read-only must not be changed, so the replayed 4 KiB sectors
    and zeroed ranges (at most :data:`MAX_REPLAY_BYTES` of log) are kept here and patched
    into every read that touches them, last update winning. Beyond the end of the file,
    up to the size the log asks for, the file reads as zeroes.
    """

    name = "vhdx-log"

    def __init__(self, child: Driver, writes: list[codec.LogWrite], size: int) -> None:
        self.child = child
        self.location = child.location
        self._writes = writes
        self._size = size
        self._lo = min((w.offset for w in writes), default=0)
        self._hi = max((w.offset + w.length for w in writes), default=0)

    @property
    def size(self) -> int:
        return self._size

    @property
    def limits(self) -> Limits:
        return self.child.limits

    @property
    def caps(self) -> Caps:
        return attrs.evolve(self.child.caps, writable=False, zeroes=False, copy_range=False)

    async def preadinto(self, offset: int, buf: memoryview) -> None:
        buf = buf.cast("B") if buf.format != "B" else buf
        end = offset + buf.nbytes
        inside = max(0, min(end, self.child.size) - offset)
        if inside:
            await self.child.preadinto(offset, buf[:inside])
        if inside < buf.nbytes:
            _fill_zero(buf[inside:])
        if end <= self._lo or offset >= self._hi:
            return
        for w in self._writes:
            lo, hi = max(offset, w.offset), min(end, w.offset + w.length)
            if lo >= hi:
                continue
            if w.data is None:
                _fill_zero(buf[lo - offset : hi - offset])
            else:
                buf[lo - offset : hi - offset] = w.data[lo - w.offset : hi - w.offset]

    async def block_status(self, offset: int, length: int) -> Extent:
        end = min(self._size, offset + max(length, 1))
        if offset < self._hi and end > self._lo:
            if offset >= self._lo:
                return Extent(offset, min(end, self._hi) - offset, ExtentKind.DATA)
            end = self._lo
        if offset >= self.child.size:
            return Extent(offset, end - offset, ExtentKind.ZERO)
        ext = await self.child.block_status(offset, min(end, self.child.size) - offset)
        return Extent(offset, max(1, min(ext.length, end - offset)), ext.kind)

    async def aclose(self) -> None:
        """The file belongs to whoever opened it."""


async def _read_log(transport: Driver, header: codec.Header) -> list[codec.LogEntry]:
    """The active log sequence, oldest entry first (empty when nothing is to replay).

    The log is scanned 4 KiB sector by sector (in :data:`LOG_READ_CHUNK` reads); every
    plausible entry header with this log's GUID is read whole and checked.
    """
    start, length = header.log_offset, header.log_length
    if start + length > transport.size:
        raise VhdxFormatError(
            f"the log at {start:#x} ({length} bytes) lies beyond the end of the file "
            f"({transport.size} bytes)",
            start,
        )

    async def read_circular(at: int, n: int) -> bytes:
        first = min(n, length - at)
        data = await transport.pread(start + at, first)
        if first < n:
            data += await transport.pread(start, n - first)
        return data

    entries: dict[int, codec.LogEntry] = {}
    invalid: dict[int, str] = {}
    kept = 0
    for chunk_at in range(0, length, LOG_READ_CHUNK):
        chunk = await transport.pread(start + chunk_at, min(LOG_READ_CHUNK, length - chunk_at))
        for sector in range(0, len(chunk), codec.LOG_SECTOR):
            h = codec.decode_log_entry_header(chunk[sector : sector + 64])
            if h is None or not codec.log_entry_plausible(h, header.log_guid, length):
                continue
            at = chunk_at + sector
            if kept + h.entry_length > MAX_REPLAY_BYTES:
                raise VhdxFormatError(
                    f"the log holds more than the {MAX_REPLAY_BYTES} bytes of entries "
                    "trioconv replays",
                    start + at,
                )
            raw = await read_circular(at, h.entry_length)
            try:
                entries[at] = codec.decode_log_entry(raw, header.log_guid, length, start + at)
                kept += h.entry_length
            except VhdxFormatError as exc:
                invalid[at] = str(exc)
    return codec.active_sequence(entries, invalid, length)


async def _replay_log(
    transport: Driver, header: codec.Header, header_index: int
) -> tuple[Driver, codec.Header]:
    """Replay a dirty log: into the file when it is writable (then the log GUID is
    cleared, as qemu does), else into an in-memory view. Returns the transport to read
    through and the current header."""
    sequence = await _read_log(transport, header)
    if not sequence:
        return transport, header  # a GUID but no valid sequence: nothing to replay (qemu)
    head = sequence[-1].header
    file_size = transport.size
    if file_size < head.flushed_file_offset:
        raise VhdxFormatError(
            f"the file ({file_size} bytes) is shorter than the {head.flushed_file_offset} "
            "bytes its log says it had: the image has been truncated"
        )
    writes = [w for e in sequence for w in e.writes]
    size = max(file_size, head.last_file_offset)
    for w in writes:
        if w.offset < codec.HEADER_SECTION_END or w.offset + w.length > size:
            raise VhdxFormatError(
                f"a log entry writes {w.length} bytes at {w.offset:#x}, outside the file's "
                f"structures (1 MiB .. {size:#x})",
                w.offset,
            )
    if not transport.caps.writable:
        return _ReplayedFile(transport, writes, size), header
    for w in writes:
        if w.data is not None:
            await transport.pwrite(w.offset, w.data)
            continue
        try:
            await transport.pwrite_zeroes(w.offset, w.length)
        except ZeroesNotSupported:
            for pos in range(w.offset, w.offset + w.length, len(_ZEROS)):
                n = min(len(_ZEROS), w.offset + w.length - pos)
                await transport.pwrite(pos, memoryview(_ZEROS)[:n])
    if transport.size < size:
        await transport.pwrite(size - 512, _ZEROS[:512])
    await transport.flush()
    # Both headers, the inactive one first, each with a higher sequence number.
    clean = header
    for i in (1 - header_index, header_index):
        clean = attrs.evolve(
            header, log_guid=codec.ZERO_GUID, sequence_number=clean.sequence_number + 1
        )
        at = (codec.HEADER1_OFFSET, codec.HEADER2_OFFSET)[i]
        await transport.pwrite(at, codec.encode_header(clean))
        await transport.flush()
    return transport, clean


async def open_vhdx(transport: Driver, ctx: OpenContext) -> VhdxDriver:
    """Read the header section, metadata and BAT of a VHDX image.

    Raises:
        ImageError: not a valid VHDX image, a dirty log, a differencing image, or a
            structure this reader refuses.
    """
    where = f"Could not open '{ctx.location}'"
    try:
        return await _open(transport, ctx)
    except VhdxFormatError as exc:
        raise ImageError(f"{where}: {exc}") from None
    except TrioconvIOError as exc:
        raise ImageError(f"{where}: {exc}") from None


async def _open(transport: Driver, ctx: OpenContext) -> VhdxDriver:
    file_size = transport.size
    if file_size < codec.HEADER_SECTION_END:
        raise VhdxFormatError(
            f"the file is {file_size} bytes, shorter than the 1 MiB VHDX header section"
        )
    section = await transport.pread(0, codec.REGION2_OFFSET)
    if section[:8] != codec.FILE_SIGNATURE:
        raise VhdxFormatError("no 'vhdxfile' signature at offset 0", 0)
    h1 = codec.decode_header(section[codec.HEADER1_OFFSET : codec.HEADER1_OFFSET + 4096])
    h2 = codec.decode_header(section[codec.HEADER2_OFFSET : codec.HEADER2_OFFSET + 4096])
    header_index, header = codec.current_header(h1, h2)

    if codec.check_header_log(header, file_size):
        transport, header = await _replay_log(transport, header, header_index)
        file_size = transport.size
        # The log may have updated the region table too.
        section = await transport.pread(0, codec.REGION2_OFFSET)

    regions = codec.decode_region_table(section[codec.REGION1_OFFSET :], codec.REGION1_OFFSET)
    reserved: list[tuple[int, int]] = [(0, codec.HEADER_SECTION_END)]
    if header.log_length:
        reserved.append((header.log_offset, header.log_offset + header.log_length))
    bat_rt: codec.RegionEntry | None = None
    meta_rt: codec.RegionEntry | None = None
    for r in regions:
        span = (r.file_offset, r.end)
        if any(_overlaps(span, other) for other in reserved):
            raise VhdxFormatError(
                f"region {uuid.UUID(bytes_le=r.guid)} at {r.file_offset:#x} ({r.length} "
                "bytes) overlaps another region or the header section",
                codec.REGION1_OFFSET,
            )
        reserved.append(span)
        if r.guid == codec.BAT_GUID:
            if bat_rt is not None:
                raise VhdxFormatError("the region table lists the BAT twice")
            bat_rt = r
        elif r.guid == codec.METADATA_GUID:
            if meta_rt is not None:
                raise VhdxFormatError("the region table lists the metadata region twice")
            meta_rt = r
        elif r.required:
            raise UnsupportedError(
                f"Could not open '{ctx.location}': required region "
                f"{uuid.UUID(bytes_le=r.guid)} is not supported"
            )
    if bat_rt is None or meta_rt is None:
        raise VhdxFormatError("the region table lacks the BAT or the metadata region")
    for what, r in (("metadata region", meta_rt), ("BAT region", bat_rt)):
        if r.file_offset >= file_size:
            raise VhdxFormatError(
                f"the {what} at {r.file_offset:#x} lies beyond the end of the file "
                f"({file_size} bytes)",
                r.file_offset,
            )

    table_len = min(codec.METADATA_TABLE_SIZE, meta_rt.length, file_size - meta_rt.file_offset)
    table = await transport.pread(meta_rt.file_offset, table_len)
    entries = codec.decode_metadata_table(table, meta_rt.file_offset)
    lo, hi = codec.item_span(entries, meta_rt)
    if hi - lo > 1 * MiB or meta_rt.file_offset + lo >= file_size:
        raise VhdxFormatError(
            f"metadata items at {meta_rt.file_offset + lo:#x} span {hi - lo} bytes or lie "
            "beyond the end of the file",
            meta_rt.file_offset + lo,
        )
    items = await transport.pread(
        meta_rt.file_offset + lo, min(hi, file_size - meta_rt.file_offset) - lo
    )
    meta = codec.decode_metadata_items(entries, items, lo, meta_rt)
    if meta.params.has_parent:
        raise UnsupportedError(
            f"Could not open '{ctx.location}': differencing VHDX images (with a parent) "
            "are not supported"
        )

    ratio = codec.chunk_ratio(meta.params.block_size, meta.logical_sector_size)
    count = codec.total_bat_entries(meta.virtual_size, meta.params.block_size, ratio)
    if count * 8 > bat_rt.length:
        raise VhdxFormatError(
            f"the BAT region ({bat_rt.length} bytes) is too small for {count} entries",
            bat_rt.file_offset,
        )
    if count * 8 > MAX_BAT_BYTES:
        raise UnsupportedError(
            f"Could not open '{ctx.location}': its BAT of {count * 8} bytes is larger than "
            f"the {MAX_BAT_BYTES} bytes trioconv keeps in memory"
        )
    if bat_rt.file_offset + count * 8 > file_size:
        raise VhdxFormatError(
            f"the BAT at {bat_rt.file_offset:#x} ({count * 8} bytes) lies beyond the end of "
            f"the file ({file_size} bytes)",
            bat_rt.file_offset,
        )
    bat = codec.decode_bat(await transport.pread(bat_rt.file_offset, count * 8) if count else b"")
    driver = VhdxDriver(
        transport,
        header=header,
        meta=meta,
        bat=bat,
        bat_region=bat_rt,
        reserved=reserved,
        writable=transport.caps.writable,
    )
    driver.location = ctx.location
    return driver


# -- creating --------------------------------------------------------------------------


def default_block_size(size: int) -> int:
    """The block size qemu picks when none is given: bigger for bigger disks."""
    if size > 32 * 1024 * 1024 * MiB:
        return 64 * MiB
    if size > 100 * 1024 * MiB:
        return 32 * MiB
    if size > 1024 * MiB:
        return 16 * MiB
    return 8 * MiB


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def plan_options(size: int, options: Mapping[str, str]) -> dict[str, int | bool | str]:
    """Check and complete ``-o`` options as ``qemu-img create -f vhdx`` does.

    Returns the virtual size (rounded up to 512 bytes), block size, log size,
    subformat and whether unallocated blocks get the ZERO state.
    """
    size = _round_up(size, 512)
    if size > codec.MAX_IMAGE_SIZE:
        raise UsageError("Image size too large; max of 64TB")
    log_size = codec.DEFAULT_LOG_SIZE
    if "log_size" in options:
        log_size = _round_up(parse_size(options["log_size"], what="log size"), MiB)
        if log_size > 0xFFFFFFFF:
            raise UsageError("Log size must be smaller than 4 GB")
    if log_size < MiB:
        raise UsageError("Log size must be a multiple of 1 MB")
    block_size = 0
    if "block_size" in options:
        block_size = _round_up(parse_size(options["block_size"], what="block size"), MiB)
        block_size = min(block_size, codec.BLOCK_SIZE_MAX)
    if block_size == 0:
        block_size = default_block_size(size)
    if block_size & (block_size - 1):
        raise UsageError("Block size must be a power of two")
    subformat = options.get("subformat", "dynamic")
    if subformat not in ("dynamic", "fixed"):
        raise UsageError(f"Parameter 'subformat' does not accept value '{subformat}'")
    zero_blocks = parse_bool("block_state_zero", options.get("block_state_zero", "on"))
    return {
        "size": size,
        "block_size": block_size,
        "log_size": log_size,
        "subformat": subformat,
        "block_state_zero": zero_blocks,
    }


def layout_image(
    size: int, block_size: int, log_size: int, fixed: bool, zero_blocks: bool
) -> tuple[codec.RegionEntry, codec.RegionEntry, int, array[int] | None]:
    """qemu's layout of a new image: BAT region, metadata region, the file length after
    creation, and the initial BAT (None when it is all zero and need not be written)."""
    ratio = codec.chunk_ratio(block_size, 512)
    blocks = -(-size // block_size)
    count = codec.total_bat_entries(size, block_size, ratio)
    if blocks == 0:
        # qemu counts in 32-bit arithmetic: the sector bitmap entries of no payload
        # block, (0 - 1) >> chunk_ratio_bits, wrap around to 2**32 // ratio - 1. It sizes
        # an empty image's BAT region so, and refuses to open one whose region is
        # smaller: the region gets that length (its entries stay zero, and unread).
        count = 0xFFFFFFFF // ratio
    bat_offset = _round_up(codec.HEADER_SECTION_END + log_size, MiB)
    bat_length = _round_up(count * 8, MiB)
    bat_rt = codec.RegionEntry(codec.BAT_GUID, bat_offset, bat_length)
    meta_rt = codec.RegionEntry(codec.METADATA_GUID, _round_up(bat_offset + bat_length, MiB), MiB)
    data_offset = bat_offset + bat_length + 5 * MiB
    file_length = data_offset + size if fixed else data_offset
    if blocks == 0 or (not fixed and not zero_blocks):
        return bat_rt, meta_rt, file_length, None
    bat = array("Q", bytes(bat_length))
    for block in range(blocks):
        if zero_blocks:
            entry = codec.encode_bat_entry(BlockState.ZERO, 0)
        else:
            host = _round_up(data_offset + block * block_size, MiB)
            entry = codec.encode_bat_entry(BlockState.FULLY_PRESENT, host)
        bat[codec.bat_index(block, ratio)] = entry
    return bat_rt, meta_rt, file_length, bat


def _creator() -> bytes:
    from ... import __version__

    return f"trioconv v{__version__}".encode("utf-16-le")


async def check_vhdx_create(location: str, size: int, options: Mapping[str, str]) -> None:
    """What :func:`create_vhdx` would refuse, checked before anything is written (the
    registry's ``check_create``)."""
    plan_options(size, options)


async def create_vhdx(transport: Driver, size: int, options: Mapping[str, str]) -> None:
    """Write an empty VHDX image of ``size`` bytes, laid out as ``qemu-img create`` does.

    Raises:
        UsageError: an option is out of range.
    """
    plan = plan_options(size, options)
    vsize = int(plan["size"])
    block_size = int(plan["block_size"])
    log_size = int(plan["log_size"])
    fixed = plan["subformat"] == "fixed"
    bat_rt, meta_rt, file_length, bat = layout_image(
        vsize, block_size, log_size, fixed, bool(plan["block_state_zero"])
    )
    seq = int.from_bytes(os.urandom(4), "little")
    header = codec.Header(
        sequence_number=seq,
        file_write_guid=uuid.uuid4().bytes_le,
        data_write_guid=uuid.uuid4().bytes_le,
        log_length=log_size,
        log_offset=codec.HEADER_SECTION_END,
    )
    meta = codec.Metadata(
        codec.FileParameters(block_size, leave_blocks_allocated=fixed),
        vsize,
        512,
        512,
        uuid.uuid4().bytes_le,
    )
    table, items = codec.encode_metadata(meta)
    region = codec.encode_region_table([bat_rt, meta_rt])

    await transport.pwrite(0, codec.FILE_SIGNATURE + _creator())
    await transport.pwrite(codec.HEADER1_OFFSET, codec.encode_header(header))
    second = attrs.evolve(header, sequence_number=seq + 1)
    await transport.pwrite(codec.HEADER2_OFFSET, codec.encode_header(second))
    await transport.pwrite(codec.REGION1_OFFSET, region)
    await transport.pwrite(codec.REGION2_OFFSET, region)
    if bat is not None:
        await transport.pwrite(bat_rt.file_offset, codec.encode_bat(bat))
    await transport.pwrite(meta_rt.file_offset, table)
    await transport.pwrite(meta_rt.file_offset + codec.METADATA_TABLE_SIZE, items)
    # The file ends where qemu truncates it to: after the BAT, metadata and 4 MiB spare
    # (dynamic), or after the space of the whole disk too (fixed).
    await transport.pwrite(file_length - 512, _ZEROS[:512])
