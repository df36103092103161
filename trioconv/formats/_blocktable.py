"""A driver for images cut into equal blocks that are stored whole, or not at all.

VHD (dynamic and fixed) and VDI share one shape: the virtual disk is split into blocks
of ``block_size`` bytes; a table says, for each block, where its data starts in the
file, or that it is absent and reads as zeroes. New blocks are appended to the file.
:class:`BlockTableDriver` implements the driver contract once over that shape; a format
subclass supplies the table (:meth:`~BlockTableDriver._lookup`), how to allocate
(:meth:`~BlockTableDriver._allocate`) and how to write its metadata back
(:meth:`~BlockTableDriver._write_metadata`).

Writes from many tasks at once
    A block is allocated *synchronously*, at the entry of :meth:`pwrite`, before its
    first ``await``: two writers never get the same block, and writes that start in
    order get blocks in order, so a converted image is laid out sequentially. The new
    block's data area is past the old end of the file, so whatever the writer does not
    cover reads as zeroes (a hole). Only if the area still holds old bytes (a file with
    trailing garbage) does the allocating task zero the rest of the block first; other
    writers to that block wait for it.

Block status and reads, a run at a time
    ``block_status`` answers for a run of blocks at once: absent blocks with no I/O,
    and whole blocks that lie back to back in the file (each ``block_size +
    _block_gap`` after the previous one) with one question to the layer below, mapped
    back to guest bytes. Per-block metadata a format needs first (VHD sector bitmaps) is
    loaded in bulk by :meth:`~BlockTableDriver._prefetch`; edges of a block that share a
    file page with such metadata, and were found to be zero when it was read, are ZERO
    (:meth:`~BlockTableDriver._zero_zone`) rather than a few bytes of "data" to copy. A
    read that spans several pieces of the file is one ``preadinto_many``; a write that
    spans blocks lying back to back in the file is one write.

Metadata
    Tables are updated in memory and written back by :meth:`flush` (only the sectors
    that changed), so the image is consistent after ``flush``, which the copy engine
    calls at the end of a conversion.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator

import trio

from .._errors import TrioconvIOError, UnsupportedError, ZeroesNotSupported
from ..driver import Buffer, Caps, Driver, Extent, ExtentKind, Limits
from ._common import ZEROS as _ZEROS
from ._common import check_range, fill_zero

__all__ = ["BlockTableDriver", "fill_zero"]

#: Most blocks one ``block_status`` call looks at.
STATUS_BLOCKS = 4096
#: How much of the file the layer below is asked to map at least (a length hint).
CHILD_STATUS_HINT = 1024 * 1024 * 1024


class BlockTableDriver(Driver):
    """The driver contract over a block table. Subclasses fill in the format."""

    def __init__(
        self,
        child: Driver,
        *,
        size: int,
        block_size: int,
        writable: bool,
        zero_init: bool,
    ) -> None:
        self.child = child
        self.location = child.location
        self._size = size // 512 * 512  # whole sectors, as QEMU reads it
        self.block_size = block_size
        self._writable = writable
        self._zero_init = zero_init
        #: File size when opened: bytes below may hold old data, bytes above are ours.
        self._old_end = child.size
        #: Highest file offset written through this driver (or the old end).
        self._written_end = child.size
        #: Blocks being prepared by the task that allocated them.
        self._preparing: dict[int, trio.Event] = {}
        self._closed = False
        self._meta_lock = trio.Lock()
        self._dirty = False
        #: Every block has its place in the file from the start (a static VDI): zeroing
        #: keeps it allocated, as QEMU's zero writes do, instead of punching holes into
        #: the preallocation the image was made with.
        self.preallocated = False

    # -- what a format supplies -----------------------------------------------------------
    @abc.abstractmethod
    def _lookup(self, index: int) -> int:
        """File offset of block ``index``'s data, or -1 when it is absent."""

    def _allocate(self, index: int) -> tuple[int, list[tuple[int, bytes]]]:
        """Allocate block ``index`` *synchronously*; its data offset and the metadata
        writes (offset, bytes) that must land before its data is used."""
        raise UnsupportedError(f"{self.location}: {self.name} image cannot allocate blocks")

    async def _write_metadata(self) -> None:
        """Write changed tables and headers back (called under the metadata lock)."""

    async def _present_runs(self, index: int, start: int, end: int) -> list[tuple[int, int, bool]]:
        """Which bytes ``[start, end)`` of allocated block ``index`` hold data (VHD
        sector bitmaps say some do not)."""
        return [(start, end, True)]

    async def _first_present_run(self, index: int, start: int, end: int) -> tuple[int, int, bool]:
        """The first of :meth:`_present_runs` (what block status needs), found without
        listing the others."""
        return (await self._present_runs(index, start, end))[0]

    #: Bytes between one block's data and the next block's data when the format stores
    #: consecutive blocks back to back (VHD: the next block's sector bitmap).
    _block_gap = 0

    async def _prefetch(self, first: int, stop: int) -> None:
        """Load, in bulk, whatever per-block metadata blocks ``[first, stop)`` need
        (VHD: their sector bitmaps), so that :meth:`_all_present` can answer."""

    def _all_present(self, index: int) -> bool:
        """True when every byte of allocated block ``index`` is present - known without
        I/O. False sends the block through :meth:`_present_runs`."""
        return True

    def _direct(self, index: int) -> bool:
        """True when data for allocated block ``index`` is written as it is (no per-block
        work in :meth:`_write_piece`), so pieces of neighbouring blocks may share a write."""
        return True

    def _zero_zone(self, index: int, start: int) -> int:
        """How many bytes from byte ``start`` of allocated block ``index`` are known to
        read as zeroes without I/O (VHD: the block's edges that share a file page with
        a sector bitmap, read with it); 0 when nothing is known."""
        return 0

    async def _write_piece(self, index: int, host: int, start: int, data: memoryview) -> None:
        """Write ``data`` at byte ``start`` of allocated block ``index`` (file offset
        ``host`` of the block's data)."""
        await self._child_write(host + start, data)

    # -- contract -----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

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

    async def aclose(self) -> None:
        # The transport belongs to the opener's exit stack; only metadata goes out here.
        self._closed = True
        if self._dirty and self._writable:
            with trio.CancelScope(shield=True):
                async with self._meta_lock:
                    await self._write_metadata()
            self._dirty = False

    async def flush(self) -> None:
        if self._writable:
            async with self._meta_lock:
                await self._write_metadata()
                self._dirty = False
        await self.child.flush()

    # -- helpers ------------------------------------------------------------------------
    def _pieces(self, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
        """``(block index, start, end)`` in-block ranges covering guest ``[offset, end)``."""
        bs = self.block_size
        while offset < end:
            index, start = divmod(offset, bs)
            n = min(bs - start, end - offset)
            yield index, start, start + n
            offset += n

    def _check_range(self, offset: int, length: int, what: str) -> None:
        check_range(self.location, self._size, what, offset, length)

    def _check_writable(self) -> None:
        if not self._writable:
            raise UnsupportedError(f"{self.location}: image is opened read-only")

    async def _child_write(self, offset: int, data: Buffer) -> None:
        n = memoryview(data).nbytes
        self._written_end = max(self._written_end, offset + n)
        await self.child.pwrite(offset, data)

    async def _child_zero(self, offset: int, n: int) -> None:
        """Write zero bytes (not a hole request) at ``offset``."""
        pos = offset
        while pos < offset + n:
            k = min(len(_ZEROS), offset + n - pos)
            await self._child_write(pos, memoryview(_ZEROS)[:k])
            pos += k

    async def _wait_ready(self, index: int) -> None:
        event = self._preparing.get(index)
        if event is not None:
            await event.wait()

    # -- reading ------------------------------------------------------------------------
    async def preadinto(self, offset: int, buf: memoryview) -> None:
        buf = buf.cast("B") if buf.format != "B" else buf
        self._check_range(offset, buf.nbytes, "read")
        bs = self.block_size
        await self._prefetch(offset // bs, -(-(offset + buf.nbytes) // bs))
        # Segments (buffer offset, length, file offset or -1), merged when contiguous.
        segs: list[list[int]] = []

        def add(pos: int, n: int, host: int) -> None:
            if segs:
                last = segs[-1]
                if last[0] + last[1] == pos and (
                    (host < 0 and last[2] < 0) or (host >= 0 and last[2] + last[1] == host)
                ):
                    last[1] += n
                    return
            segs.append([pos, n, host])

        pos = 0
        for index, start, end in self._pieces(offset, offset + buf.nbytes):
            host = self._lookup(index)
            if host < 0:
                add(pos, end - start, -1)
            else:
                await self._wait_ready(index)
                if self._all_present(index):
                    add(pos, end - start, host + start)
                else:
                    for s, e, present in await self._present_runs(index, start, end):
                        add(pos + s - start, e - s, host + s if present else -1)
            pos += end - start
        reads: list[tuple[int, memoryview]] = []
        for at, n, host in segs:
            view = buf[at : at + n]
            if host < 0:
                fill_zero(view)
            else:
                reads.append((host, view))
        if len(reads) == 1:
            await self.child.preadinto(*reads[0])
        elif reads:
            # Pieces of several blocks (or around absent sectors): one batch below.
            await self.child.preadinto_many(reads)

    # -- block status -------------------------------------------------------------------
    async def block_status(self, offset: int, length: int) -> Extent:
        """One extent, found a run of blocks at a time.

        A run of absent blocks is ZERO without any I/O. A run of whole allocated blocks
        that lie back to back in the file (each ``block_size + _block_gap`` after the
        previous one) is one question to the layer below - which parts are holes - and
        its answer is mapped back to guest bytes. Only a block with absent sectors is
        looked at on its own.
        """
        if self._closed:  # (the tables in memory would still answer)
            raise TrioconvIOError(f"{self.location}: image is closed")
        self._check_range(offset, 1, "block status")
        end = min(self._size, offset + max(length, 1))
        bs = self.block_size
        index, start = divmod(offset, bs)
        stop = min(-(-end // bs), index + STATUS_BLOCKS)
        host = self._lookup(index)
        if host < 0:
            i = index + 1
            while i < stop and self._lookup(i) < 0:
                i += 1
            return Extent(offset, min(end, i * bs) - offset, ExtentKind.ZERO)
        await self._prefetch(index, stop)
        if not self._all_present(index):
            kind, n = await self._allocated_status(index, host, start, min(bs, end - index * bs))
            return Extent(offset, n, kind)
        if zone := self._zero_zone(index, start):
            # Bytes the layer below calls data only because metadata shares their page.
            return Extent(offset, min(zone, end - offset), ExtentKind.ZERO)
        stride = bs + self._block_gap
        last = index
        while (
            last + 1 < stop
            and self._lookup(last + 1) == host + (last + 1 - index) * stride
            and self._all_present(last + 1)
        ):
            last += 1
        n = min(end, (last + 1) * bs) - offset
        first = host + start
        if not self.child.caps.block_status or first >= self._old_end:
            return Extent(offset, n, ExtentKind.DATA)
        # Guest bytes [start, start + n) of the run lie at host + _to_host(...) in the file.
        rel_end = start + n
        k = (rel_end - 1) // bs
        host_end = host + k * stride + rel_end - k * bs
        # The length is a hint: asking for much more than the run lets the layer below
        # map the rest of the file in one go and answer the next runs from that map.
        hint = max(host_end, first + CHILD_STATUS_HINT)
        ext = await self.child.block_status(first, min(hint, self._old_end) - first)
        # The answer ends somewhere in a block's data or in the gap after it.
        k, r = divmod(start + ext.length, stride)
        got = min(n, k * bs + min(r, bs) - start)
        kind = ExtentKind.DATA if ext.kind is ExtentKind.DATA else ExtentKind.ZERO
        return Extent(offset, max(1, got), kind)

    async def _allocated_status(
        self, index: int, host: int, start: int, stop: int
    ) -> tuple[ExtentKind, int]:
        """What ``[start, stop)`` of allocated block ``index`` holds; a prefix length."""
        s, e, present = await self._first_present_run(index, start, stop)
        if not present:
            return ExtentKind.ZERO, e - s
        first = host + s
        if not self.child.caps.block_status or first >= self._old_end:
            return ExtentKind.DATA, e - s
        ext = await self.child.block_status(first, min(host + e, self._old_end) - first)
        n = max(1, min(ext.length, e - s))
        return (ExtentKind.DATA if ext.kind is ExtentKind.DATA else ExtentKind.ZERO), n

    # -- writing ------------------------------------------------------------------------
    async def pwrite(self, offset: int, data: Buffer) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        self._check_range(offset, view.nbytes, "write")
        # Everything up to the first await is synchronous: allocation happens in the
        # order writes start.
        plan: list[tuple[int, int, int, memoryview]] = []
        pos_of: list[int] = []  # where each piece starts in ``view``
        mine: list[tuple[int, int, int, int, list[tuple[int, bytes]], trio.Event]] = []
        pos = 0
        for index, start, end in self._pieces(offset, offset + view.nbytes):
            host = self._lookup(index)
            if host < 0:
                host, prelude = self._allocate(index)
                self._dirty = True
                event = trio.Event()
                self._preparing[index] = event
                mine.append((index, host, start, end, prelude, event))
            plan.append((index, host, start, view[pos : pos + end - start]))
            pos_of.append(pos)
            pos += end - start
        try:
            for _index, host, start, end, prelude, _event in mine:
                await self._prepare(host, start, end, prelude)
        finally:
            for index, *_rest, event in mine:
                event.set()
                self._preparing.pop(index, None)
        i = 0
        while i < len(plan):
            index, host, start, piece = plan[i]
            await self._wait_ready(index)
            if not self._direct(index):
                await self._write_piece(index, host, start, piece)
                i += 1
                continue
            # Pieces of blocks that follow each other in the file (appended in order)
            # go out as one write: they are contiguous in ``view`` too.
            at = host + start + piece.nbytes
            j = i + 1
            while j < len(plan) and plan[j][1] + plan[j][2] == at and self._direct(plan[j][0]):
                await self._wait_ready(plan[j][0])
                at += plan[j][3].nbytes
                j += 1
            if j == i + 1:
                await self._write_piece(index, host, start, piece)
            else:
                first = pos_of[i]
                await self._child_write(host + start, view[first : first + at - host - start])
            i = j

    async def _prepare(
        self, host: int, start: int, end: int, prelude: list[tuple[int, bytes]]
    ) -> None:
        """Make a newly allocated block usable: its metadata, and zeroes over old bytes."""
        if prelude:
            async with self._meta_lock:
                for at, raw in prelude:
                    await self._child_write(at, raw)
        if host < self._old_end:
            # The block lands on bytes the file already had: clear what we do not write.
            stop = min(self.block_size, self._old_end - host)
            if start > 0:
                await self._child_zero(host, min(start, stop))
            if end < stop:
                await self._child_zero(host + end, stop - end)

    async def pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
    ) -> None:
        self._check_writable()
        self._check_range(offset, length, "write zeroes")
        # Absent blocks already read as zeroes; only allocated ones need work.
        for index, start, end in self._pieces(offset, offset + length):
            host = self._lookup(index)
            if host < 0:
                continue
            await self._wait_ready(index)
            await self._zero_piece(index, host, start, end, may_unmap=may_unmap, fast=fast)

    async def _zero_piece(
        self, index: int, host: int, start: int, end: int, *, may_unmap: bool, fast: bool
    ) -> None:
        runs = await self._present_runs(index, start, end)
        for s, e, present in runs:
            if not present:
                continue
            if host + s >= self._written_end:
                continue  # past the end of the file: a hole already
            try:
                await self.child.pwrite_zeroes(
                    host + s, e - s, may_unmap=may_unmap and not self.preallocated, fast=fast
                )
            except ZeroesNotSupported:
                if fast:
                    raise
                await self._child_zero(host + s, e - s)
