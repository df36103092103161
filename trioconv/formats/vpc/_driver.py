"""The VHD driver: fixed and dynamic disks, read and write, over a child driver.

Opening finds the footer (at offset 0 for dynamic disks, which keep a copy there; at the
end of the file otherwise), verifies it, and for a dynamic disk reads the dynamic header
and the whole BAT, which stays in memory: it must lie inside the file and is refused
beyond :data:`MAX_BAT_BYTES`, whatever the header claims.

Reads of a present block honour its sector bitmap (sectors whose bit is clear read as
zeroes); the bitmaps are read when first needed, and a block whose bitmap is all ones -
everything qemu and this driver write - is remembered with one byte. New blocks are
appended where the footer was, with a bitmap of all ones (as qemu does); :meth:`flush`
writes the changed BAT sectors and the footer at the new end of the file.
"""

from __future__ import annotations

import collections
from array import array
from typing import TYPE_CHECKING

import trio

from ..._errors import ImageError, TrioconvIOError, UnsupportedError
from ...driver import Driver, Limits
from .._blocktable import BlockTableDriver
from . import _codec as codec

if TYPE_CHECKING:
    from ..._open import OpenContext

__all__ = ["DynamicVpcDriver", "FixedVpcDriver", "MAX_BAT_BYTES", "open_vpc"]

#: Largest BAT accepted: 128 MiB, 32 Mi blocks (qemu's own images need at most 4 MiB).
MAX_BAT_BYTES = 128 * 1024 * 1024
#: Bytes of partial sector bitmaps kept in memory at most.
BITMAP_CACHE_BYTES = 8 * 1024 * 1024
#: Block-size stride of a fixed disk (it has no blocks; this only bounds requests).
FIXED_STRIDE = 2 * 1024 * 1024
#: Bytes of sector bitmaps (with the rest of their file pages) read in one batch when
#: blocks are first looked at.
BITMAP_BATCH_BYTES = 2 * 1024 * 1024
#: The file-page size assumed for zero zones: a bitmap is read with the rest of the
#: page(s) it lies in, whose data bytes the file reports as allocated with it.
ZONE_PAGE = 4096
#: Smallest block size with zero zones (a page then holds parts of at most two blocks).
ZONE_MIN_BLOCK = 64 * 1024

#: What is known of a block's sector bitmap (one byte a block).
_UNKNOWN, _FULL, _PARTIAL, _ABSENT = 0, 1, 2, 3
_ONE_TO_ABSENT = bytes([0, _ABSENT]) + bytes(254)


class FixedVpcDriver(BlockTableDriver):
    """A fixed VHD: the virtual disk is the start of the file, the footer follows."""

    name = "vpc"

    def __init__(self, child: Driver, footer: codec.Footer, size: int, writable: bool) -> None:
        super().__init__(
            child,
            size=size,
            block_size=FIXED_STRIDE,
            writable=writable,
            zero_init=child.caps.zero_init,
        )
        self.footer = footer

    @property
    def limits(self) -> Limits:
        return self.child.limits

    def _lookup(self, index: int) -> int:
        return index * FIXED_STRIDE

    async def _zero_piece(
        self, index: int, host: int, start: int, end: int, *, may_unmap: bool, fast: bool
    ) -> None:
        await self.child.pwrite_zeroes(host + start, end - start, fast=fast)

    async def pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
    ) -> None:
        # A fixed VHD is preallocated: zeroes keep the space (no holes punched, whatever
        # ``may_unmap`` allows), as QEMU's zero writes do.
        self._check_writable()
        self._check_range(offset, length, "write zeroes")
        await self.child.pwrite_zeroes(offset, length, fast=fast)


class DynamicVpcDriver(BlockTableDriver):
    """A dynamic VHD: blocks found through the BAT, each behind its sector bitmap."""

    name = "vpc"

    def __init__(
        self,
        child: Driver,
        footer: codec.Footer,
        header: codec.DynamicHeader,
        bat: array[int],
        size: int,
        writable: bool,
    ) -> None:
        super().__init__(
            child, size=size, block_size=header.block_size, writable=writable, zero_init=True
        )
        self.footer = footer
        self.header = header
        self._bat = bat
        self._bitmap_size = codec.bitmap_size(header.block_size)
        self._sectors = header.block_size // codec.SECTOR
        # Absent blocks are marked so that the unknown ones are found with ``find``.
        self._bitmap_state = bytearray(codec.absent_mask(bat).translate(_ONE_TO_ABSENT))
        if not self._bitmap_size:
            # Blocks under 4 KiB: qemu's bitmap size rounds down to nothing, and the
            # data starts where the bitmap would. Every sector of a block is present.
            self._bitmap_state = self._bitmap_state.replace(bytes([_UNKNOWN]), bytes([_FULL]))
        self._bitmaps: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._bitmap_cache_max = max(4, BITMAP_CACHE_BYTES // max(1, self._bitmap_size))
        # Zero zones, for an image opened read-only: per block, the sectors at the start
        # (low 4 bits) and at the end (high 4 bits) of its data that share a file page
        # with a bitmap and were zero when the bitmap was read.
        self._zones = bytearray(len(bat)) if self._zones_on(writable) else None
        per_block = max(1, self._bitmap_size + (ZONE_PAGE if self._zones is not None else 0))
        self._bitmap_batch = max(1, BITMAP_BATCH_BYTES // per_block)
        #: Bumped whenever a bitmap on disk changes: a read that raced it is discarded.
        self._bitmap_gen = 0
        self._prefetch_lock = trio.Lock()
        # Consecutive blocks are stored [bitmap][data][bitmap][data]...
        self._block_gap = self._bitmap_size
        self._footer_raw = footer.encode()
        # Where the next block goes: past the BAT and past every block.
        bat_end = header.table_offset + len(bat) * 4
        free = -(-bat_end // codec.SECTOR) * codec.SECTOR
        span = self._bitmap_size + header.block_size
        for entry in set(bat):
            if entry != codec.BAT_UNUSED:
                free = max(free, entry * codec.SECTOR + span)
        self._free = free
        self._footer_at = -1 if writable else free
        self._dirty_sectors: set[int] = set()

    # -- table ---------------------------------------------------------------------------
    def _lookup(self, index: int) -> int:
        entry = self._bat[index]
        if entry == codec.BAT_UNUSED:
            return -1
        return entry * codec.SECTOR + self._bitmap_size

    def _allocate(self, index: int) -> tuple[int, list[tuple[int, bytes]]]:
        at = self._free
        if at // codec.SECTOR >= codec.BAT_UNUSED:
            raise TrioconvIOError(f"{self.location}: VHD image file is full", offset=at)
        self._free = at + self._bitmap_size + self.block_size
        self._bat[index] = at // codec.SECTOR
        self._dirty_sectors.add(index * 4 // codec.SECTOR)
        self._bitmap_state[index] = _FULL
        return at + self._bitmap_size, [(at, b"\xff" * self._bitmap_size)]

    async def _write_metadata(self) -> None:
        table_offset = self.header.table_offset
        per_sector = codec.SECTOR // 4
        sectors = sorted(self._dirty_sectors)
        self._dirty_sectors.clear()
        i = 0
        while i < len(sectors):
            j = i
            while j + 1 < len(sectors) and sectors[j + 1] == sectors[j] + 1:
                j += 1
            first, stop = sectors[i] * per_sector, (sectors[j] + 1) * per_sector
            raw = codec.encode_bat(self._bat, first, stop)
            await self._child_write(table_offset + first * 4, raw)
            i = j + 1
        if self._footer_at != self._free:
            await self._child_write(self._free, self._footer_raw)
            self._footer_at = self._free

    # -- sector bitmaps ------------------------------------------------------------------
    def _zones_on(self, writable: bool) -> bool:
        return not writable and self.block_size >= ZONE_MIN_BLOCK and self.child.caps.block_status

    def _zero_zone(self, index: int, start: int) -> int:
        zones = self._zones
        if zones is None or not (z := zones[index]):
            return 0
        head = (z & 15) * codec.SECTOR
        if start < head:
            return head - start
        tail = self.block_size - (z >> 4) * codec.SECTOR
        return self.block_size - start if start >= tail else 0

    def _note_zones(self, wanted: list[int], pages: list[tuple[int, memoryview]]) -> None:
        """Record the zero zones that the pages read around ``wanted`` bitmaps show.

        The page of block ``i``'s bitmap holds, after the bitmap, the start of ``i``'s
        data and, before it, the end of the data of the block stored just in front (when
        that block is in this batch too).
        """
        zones = self._zones
        assert zones is not None
        s, size, bs = codec.SECTOR, self._bitmap_size, self.block_size
        ends = {self._bat[i] * s + size + bs: i for i in wanted}
        for i, (page_at, page) in zip(wanted, pages, strict=True):
            at = self._bat[i] * s
            head = page[at - page_at + size :]
            z = _zero_sectors(head, leading=True)
            before = ends.get(at)
            if before is not None:
                t = _zero_sectors(page[: at - page_at], leading=False)
                zones[before] = (zones[before] & 15) | (t << 4)
            zones[i] = (zones[i] & 0xF0) | z

    def _all_present(self, index: int) -> bool:
        return self._bitmap_state[index] == _FULL

    def _remember(self, index: int, raw: bytes) -> bytes | None:
        """Record what bitmap ``raw`` of block ``index`` says; None when it is all ones."""
        used = raw[: -(-self._sectors // 8)]
        if used.count(0xFF) == len(used):
            self._bitmap_state[index] = _FULL
            return None
        self._bitmap_state[index] = _PARTIAL
        self._bitmaps[index] = raw
        while len(self._bitmaps) > self._bitmap_cache_max:
            self._bitmaps.popitem(last=False)
        return raw

    async def _prefetch(self, first: int, stop: int) -> None:
        """Read the unknown bitmaps of blocks from ``first`` on in one batch.

        When some block in ``[first, stop)`` has a bitmap not yet looked at, the bitmaps
        of up to :data:`BITMAP_BATCH_BYTES` worth of allocated blocks from ``first`` on
        are read with one ``preadinto_many``: the planner walks the image in order, so
        the next blocks are needed next.
        """
        state, bat = self._bitmap_state, self._bat
        if state.find(_UNKNOWN, first, stop) < 0:
            return
        async with self._prefetch_lock:
            size, limit = self._bitmap_size, self.child.size
            wanted: list[int] = []
            i = state.find(_UNKNOWN, first)
            while i >= 0 and len(wanted) < self._bitmap_batch:
                if bat[i] * codec.SECTOR + size <= limit:
                    wanted.append(i)
                else:
                    self._remember(i, bytes(size))  # cut off by the end of the file
                i = state.find(_UNKNOWN, i + 1)
            if not wanted:
                return
            # Each bitmap alone, or with the rest of its file page(s) for zero zones.
            spans: list[tuple[int, int, int]] = []  # (read at, bitmap at, read length)
            for i in wanted:
                at = bat[i] * codec.SECTOR
                if self._zones is None:
                    spans.append((at, at, size))
                else:
                    first = at - at % ZONE_PAGE
                    stop = min(limit, -(-(at + size) // ZONE_PAGE) * ZONE_PAGE)
                    spans.append((first, at, stop - first))
            buf = bytearray(sum(n for _, _, n in spans))
            view = memoryview(buf)
            gen = self._bitmap_gen
            try:
                reads: list[tuple[int, memoryview]] = []
                pos = 0
                for first, _, n in spans:
                    reads.append((first, view[pos : pos + n]))
                    pos += n
                await self.child.preadinto_many(reads)
                if gen != self._bitmap_gen:
                    return  # a bitmap changed meanwhile: look again when needed
                for i, (first, at, _n), (_first, page) in zip(wanted, spans, reads, strict=True):
                    if state[i] == _UNKNOWN:
                        self._remember(i, bytes(page[at - first : at - first + size]))
                if self._zones is not None:
                    self._note_zones(wanted, reads)
            finally:
                for _, page in reads:
                    page.release()
                view.release()

    async def _bitmap(self, index: int) -> bytes | None:
        """The bitmap of allocated block ``index``; None when all its sectors are present."""
        while True:
            state = self._bitmap_state[index]
            if state == _FULL:
                return None
            cached = self._bitmaps.get(index)
            if cached is not None:
                self._bitmaps.move_to_end(index)
                return cached
            at = self._bat[index] * codec.SECTOR
            gen = self._bitmap_gen
            raw = await self.child.pread(at, self._bitmap_size) if at < self.child.size else b""
            if gen == self._bitmap_gen:
                return self._remember(index, raw.ljust(self._bitmap_size, b"\0"))

    async def _present_runs(self, index: int, start: int, end: int) -> list[tuple[int, int, bool]]:
        bitmap = await self._bitmap(index)
        if bitmap is None:
            return [(start, end, True)]
        s = codec.SECTOR
        runs = codec.sector_runs(bitmap, start // s, -(-end // s))
        return [(max(start, a * s), min(end, b * s), present) for a, b, present in runs]

    async def _first_present_run(self, index: int, start: int, end: int) -> tuple[int, int, bool]:
        # One run per call: a bitmap of alternating bits has thousands of runs, and
        # block status walks them one extent at a time.
        bitmap = await self._bitmap(index)
        if bitmap is None:
            return (start, end, True)
        s = codec.SECTOR
        a, b, present = codec.first_sector_run(bitmap, start // s, -(-end // s))
        return (max(start, a * s), min(end, b * s), present)

    def _direct(self, index: int) -> bool:
        return self._bitmap_state[index] == _FULL

    async def _write_piece(self, index: int, host: int, start: int, data: memoryview) -> None:
        if await self._bitmap(index) is None:
            await self._child_write(host + start, data)
            return
        # Some sectors are absent: they read as zeroes but may hold stale bytes. Write
        # whole sectors (the absent parts of edge sectors as zeroes), then set the bits.
        s = codec.SECTOR
        end = start + data.nbytes
        first, last = start // s * s, min(self.block_size, -(-end // s) * s)
        async with self._meta_lock:
            buf = bytearray(last - first)
            await self.preadinto_block(index, host, first, last, memoryview(buf))
            buf[start - first : end - first] = data
            await self._child_write(host + first, buf)
            bitmap = await self._bitmap(index)
            if bitmap is not None:
                new = codec.set_sector_bits(bitmap, first // s, last // s)
                await self._child_write(self._bat[index] * s, new)
                self._bitmap_gen += 1
                self._bitmaps.pop(index, None)
                self._bitmap_state[index] = _UNKNOWN

    async def preadinto_block(
        self, index: int, host: int, start: int, end: int, view: memoryview
    ) -> None:
        """Read bytes ``[start, end)`` of allocated block ``index`` as a guest sees them."""
        for s, e, present in await self._present_runs(index, start, end):
            part = view[s - start : e - start]
            if present:
                await self.child.preadinto(host + s, part)
            else:
                part[:] = bytes(e - s)


def _zero_sectors(data: memoryview, *, leading: bool) -> int:
    """Whole zero sectors at the start (``leading``) or the end of ``data``, at most 15."""
    s = codec.SECTOR
    n = min(15, data.nbytes // s)
    count = 0
    while count < n:
        at = count * s if leading else data.nbytes - (count + 1) * s
        if data[at : at + s] != _ZERO_SECTOR:
            break
        count += 1
    return count


_ZERO_SECTOR = bytes(codec.SECTOR)


def _error(location: str, exc: codec.VpcFormatError) -> ImageError:
    """One line naming the image, the problem, and the offset (unless the problem
    already says it)."""
    problem = str(exc)
    where = ""
    if exc.offset is not None and str(exc.offset) not in problem:
        where = f" (offset {exc.offset})"
    return ImageError(f"Could not open '{location}': invalid VHD image: {problem}{where}")


async def open_vpc(transport: Driver, ctx: OpenContext) -> Driver:
    """Open a VHD image (fixed or dynamic) on ``transport``.

    Raises:
        ImageError: not a valid VHD image, or one with absurd or hostile metadata.
        UnsupportedError: a differencing disk.
    """
    loc = ctx.location
    file_size = transport.size
    writable = transport.caps.writable
    if file_size < codec.FOOTER_SIZE:
        raise ImageError(f"Could not open '{loc}': file too small for a VHD image")
    head = await transport.pread(0, codec.FOOTER_SIZE)
    try:
        if head[:8] == codec.FOOTER_COOKIE:
            footer = codec.parse_footer(head, 0)
        else:
            tail_at = file_size - codec.FOOTER_SIZE
            footer = codec.parse_footer(await transport.pread(tail_at, codec.FOOTER_SIZE), tail_at)
            if footer.disk_type != codec.DiskType.FIXED:
                raise codec.VpcFormatError(
                    f"footer at the end says disk type {footer.disk_type}, but only fixed "
                    "disks have no footer copy at offset 0",
                    tail_at,
                )
    except codec.VpcFormatError as exc:
        raise _error(loc, exc) from None
    size = codec.virtual_size(footer)
    if size // codec.SECTOR > codec.VHD_MAX_SECTORS:
        raise ImageError(
            f"Could not open '{loc}': VHD virtual size {size} is over the 2040 GiB maximum"
        )
    if footer.disk_type == codec.DiskType.FIXED:
        if writable and size > file_size - codec.FOOTER_SIZE:
            raise ImageError(
                f"Could not open '{loc}': fixed VHD of {size} bytes in a file of {file_size}"
            )
        return FixedVpcDriver(transport, footer, size, writable)
    if footer.disk_type == codec.DiskType.DIFFERENCING:
        raise UnsupportedError(
            f"Could not open '{loc}': differencing VHD images (with a parent) are not supported"
        )
    if footer.disk_type != codec.DiskType.DYNAMIC:
        raise ImageError(f"Could not open '{loc}': unknown VHD disk type {footer.disk_type}")
    return await _open_dynamic(transport, loc, footer, size, writable)


async def _open_dynamic(
    transport: Driver, loc: str, footer: codec.Footer, size: int, writable: bool
) -> Driver:
    file_size = transport.size
    at = footer.data_offset
    if at + codec.DYNAMIC_HEADER_SIZE > file_size:
        raise ImageError(
            f"Could not open '{loc}': VHD dynamic header offset {at} is beyond the end of "
            f"the file ({file_size} bytes)"
        )
    try:
        header = codec.parse_dynamic_header(
            await transport.pread(at, codec.DYNAMIC_HEADER_SIZE), at
        )
    except codec.VpcFormatError as exc:
        raise _error(loc, exc) from None
    bs, entries = header.block_size, header.max_table_entries
    if -(-size // bs) > 0xFFFF_FFFF:
        raise ImageError(f"Could not open '{loc}': VHD image has too many blocks")
    if entries * bs < size:
        raise ImageError(
            f"Could not open '{loc}': VHD block table of {entries} entries of {bs} bytes is "
            f"too small for a disk of {size} bytes"
        )
    bat_bytes = entries * 4
    if bat_bytes > MAX_BAT_BYTES:
        raise ImageError(
            f"Could not open '{loc}': VHD block table of {bat_bytes} bytes is over the "
            f"{MAX_BAT_BYTES}-byte limit"
        )
    if header.table_offset + bat_bytes > file_size:
        raise ImageError(
            f"Could not open '{loc}': VHD block table at offset {header.table_offset} "
            f"({bat_bytes} bytes) goes beyond the end of the file ({file_size} bytes)"
        )
    bat = array("I")
    chunk = 4 * 1024 * 1024
    for pos in range(0, bat_bytes, chunk):
        n = min(chunk, bat_bytes - pos)
        bat.extend(codec.decode_bat(await transport.pread(header.table_offset + pos, n)))
    driver = DynamicVpcDriver(transport, footer, header, bat, size, writable)
    if driver._free > file_size:
        raise ImageError(
            f"Could not open '{loc}': a VHD block lies beyond the end of the file "
            f"({driver._free} > {file_size} bytes): the image has been truncated"
        )
    return driver
