"""The two kinds of VMDK extent, each a range of the guest disk stored in one file.

:class:`FlatExtent` forwards to its file at a fixed offset. :class:`SparseExtent` maps
grains through its grain directory and grain tables:

* **reading** - a request is cut into grains; unallocated and zeroed grains are cleared,
  host-contiguous grains are read in one request, compressed grains (streamOptimized)
  are fetched together when they lie close in the file and inflated, in a worker thread
  when there is much to inflate;
* **writing** - every grain table is in memory (loaded at open; a new image's tables are
  preallocated, as qemu makes them). A grain is allocated at the end of the file at
  ``pwrite`` entry, before the first ``await``, so concurrent writers never take the
  same grain and in-order writes give a sequential file. A partial write to a new grain
  writes the whole grain - the rest zeroes, or in a delta disk the parent's bytes (copy
  on write) unless the grain was zeroed - and later writers to that grain wait for it.
  Changed tables are written back, to both the GD's and the redundant GD's copies, by
  ``flush``;
* **stream writing** - grains of a compressed extent are deflated (in worker threads,
  in parallel), then given file space in the order their writes began and appended
  behind a grain marker. Partial grains are collected in memory until they are
  complete, or until ``flush``, which writes them zero-padded.
"""

from __future__ import annotations

import collections
import zlib
from array import array
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from ..._errors import TrioconvIOError, UnsupportedError, ZeroesNotSupported
from ...driver import Driver, ExtentKind
from .._common import fill_zero, read_or_zero
from . import _codec as codec
from ._codec import SECTOR, SparseLayout

__all__ = ["FlatExtent", "SparseExtent", "fill_zero"]

#: The largest run of zero bytes written in one request where grains cannot be zeroed.
_ZERO_WRITE = 8 * 1024 * 1024

#: Bytes of grain tables a read-only extent keeps cached.
GT_CACHE_BYTES = 8 * 1024 * 1024
#: Most grain-table bytes a writable extent holds (all of them are in memory).
MAX_WRITABLE_GT_BYTES = 512 * 1024 * 1024
#: Compressed bytes above which inflating moves to a worker thread.
THREAD_INFLATE_BYTES = 256 * 1024
#: Largest read that fetches several neighbouring compressed grains at once.
COMPRESSED_READ_SPAN = 4 * 1024 * 1024
#: Largest grain a compressed extent may have (memory per grain read).
MAX_COMPRESSED_GRAIN = 16 * 1024 * 1024
#: Most grain tables read ahead in one request.
TABLE_READAHEAD = 64
#: Most grains one block status answer looks at.
STATUS_GRAINS = 65536
#: Most bytes of partly written grains a stream extent holds while waiting for the rest.
MAX_PARTIAL_BYTES = 256 * 1024 * 1024


class FlatExtent:
    """Raw bytes at ``file_offset`` of ``file`` (FLAT and VMFS extents)."""

    flat = True
    compressed = False

    def __init__(self, file: Driver, start: int, length: int, file_offset: int, kind: str):
        self.file = file
        self.start = start
        self.length = length
        self.file_offset = file_offset
        self.kind = kind

    @property
    def end(self) -> int:
        return self.start + self.length

    async def read(self, offset: int, view: memoryview) -> None:
        await read_or_zero(self.file, self.file_offset + offset, view)

    async def write(self, offset: int, data: memoryview) -> None:
        await self.file.pwrite(self.file_offset + offset, data)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool, fast: bool) -> None:
        # A flat extent is the disk's bytes, laid out in full: zeroes keep their space
        # (no holes punched, whatever ``may_unmap`` allows), as QEMU's vmdk does.
        await self.file.pwrite_zeroes(self.file_offset + offset, length, fast=fast)

    async def status(self, offset: int, length: int) -> tuple[int, ExtentKind]:
        host = self.file_offset + offset
        if host >= self.file.size:
            return length, ExtentKind.ZERO
        ext = await self.file.block_status(host, min(length, self.file.size - host))
        n = min(length, ext.length) if ext.offset == host and ext.length > 0 else 0
        if n <= 0:
            return min(length, SECTOR), ExtentKind.DATA
        return n, ExtentKind.DATA if ext.kind is ExtentKind.DATA else ExtentKind.ZERO

    async def flush(self) -> None:
        await self.file.flush()

    async def finish(self) -> None:
        pass


@attrs.define(eq=False)
class _Partial:
    """A grain of a stream extent written in pieces, waiting to be complete."""

    buf: bytearray
    covered: list[tuple[int, int]] = attrs.field(factory=list)

    def add(self, inner: int, piece: memoryview) -> None:
        self.buf[inner : inner + piece.nbytes] = piece
        spans = sorted([*self.covered, (inner, inner + piece.nbytes)])
        merged: list[tuple[int, int]] = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        self.covered = merged

    @property
    def full(self) -> bool:
        return self.covered == [(0, len(self.buf))]


def _deflate_records(grains: Sequence[tuple[int, bytes | memoryview]], align: int) -> list[bytes]:
    """Deflate grains into marker records ``(lba_sector, data)``, each padded to ``align``."""
    out = []
    for lba, data in grains:
        record = codec.grain_marker(lba, zlib.compress(data))
        pad = -len(record) % align
        out.append(record + bytes(pad) if pad else record)
    return out


def _inflate_all(streams: list[bytes], grain: int) -> list[bytes | None]:
    """Each stream inflated, or None when it is broken, or holds more than a grain (as
    qemu refuses it: a grain size that is too small must not cut data off silently)."""
    out: list[bytes | None] = []
    for data in streams:
        inflater = zlib.decompressobj()
        try:
            plain = inflater.decompress(data, grain)
        except zlib.error:
            out.append(None)
            continue
        out.append(plain if inflater.eof else None)
    return out


@attrs.frozen
class _Seg:
    """A run of guest bytes inside one extent, mapped to one kind of storage."""

    offset: int  # extent-relative
    length: int
    kind: str  # "data", "zero", "compressed", "hole" (the parent image shows through)
    host: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length


class SparseExtent:
    """A hosted sparse extent (``KDMV``), plain or stream-optimized."""

    flat = False
    kind = "SPARSE"

    def __init__(
        self,
        file: Driver,
        start: int,
        layout: SparseLayout,
        gd: array[int],
        rgd: array[int] | None,
        *,
        writable: bool,
        name: str,
    ) -> None:
        self.file = file
        self.start = start
        self.layout = layout
        self.length = layout.capacity
        self.grain = layout.grain_size
        self.compressed = layout.compressed
        self.gd = gd
        self.rgd = rgd
        self.writable = writable
        self.name = name
        self.file_end = file.size
        #: Reads guest bytes of the parent image (``parentFileNameHint``) into a buffer:
        #: unallocated grains show it. None: they read as zeroes.
        self.read_parent: Callable[[int, memoryview], Awaitable[None]] | None = None
        #: Raises unless the parent is still the image this delta disk was made on;
        #: awaited before a read shows the parent (not before a copy on write, as in
        #: qemu, whose check guards reads only).
        self.check_parent: Callable[[], Awaitable[None]] | None = None
        self._gts: dict[int, array[int]] = {}
        table_bytes = max(layout.gt_bytes, 4)
        self._cache_max = max(4, GT_CACHE_BYTES // table_bytes)
        self._cache: collections.OrderedDict[int, array[int]] = collections.OrderedDict()
        # writing
        self._dirty: set[int] = set()
        self._busy: dict[int, trio.Event] = {}
        self._next_sector = -(-self.file_end // SECTOR)
        if not self.compressed:
            gs = self.grain // SECTOR
            self._next_sector = -(-self._next_sector // gs) * gs
        self._partials: dict[int, _Partial] = {}
        self._claimed: set[int] = set()
        self._last_turn: trio.Event | None = None
        self._record_align = max(SECTOR, file.limits.request_alignment)
        # Grains are appended: a regular file, local or on NFS, grows when written past
        # its end; a block device, an NBD export or an iSCSI LUN does not.
        self._growable = file.name in ("file", "nfs") and not getattr(
            file, "is_block_device", False
        )
        #: How far grain writes reach once they are done (the first new grain's start,
        #: at least), how far those that are done reach, and how many are under way:
        #: a write cancelled before it was done leaves the file short of its grain.
        self._written_end = self._next_sector * SECTOR
        self._done_end = self._written_end
        self._in_flight = 0

    @property
    def end(self) -> int:
        return self.start + self.length

    # -- tables ---------------------------------------------------------------------
    def _corrupt(self, problem: str, offset: int | None = None) -> TrioconvIOError:
        return TrioconvIOError(f"{self.name}: corrupt VMDK extent: {problem}", offset=offset)

    def _gt_offset(self, index: int) -> int:
        sector = self.gd[index]
        host = sector * SECTOR
        if sector and host + self.layout.gt_bytes > self.file_end:
            raise self._corrupt(
                f"grain table {index} at offset {host:#x} lies beyond the end of the file "
                f"({self.file_end} bytes)",
                host,
            )
        return host

    async def load_all_tables(self) -> None:
        """Read every grain table (writable extents keep them all in memory)."""
        gt_bytes = self.layout.gt_bytes
        total = sum(1 for s in self.gd if s) * gt_bytes
        if total > MAX_WRITABLE_GT_BYTES:
            raise UnsupportedError(
                f"{self.name}: writing needs all grain tables in memory ({total} bytes, "
                f"more than {MAX_WRITABLE_GT_BYTES})"
            )
        offsets = [(i, self._gt_offset(i)) for i in range(len(self.gd)) if self.gd[i]]
        pos = 0
        while pos < len(offsets):
            # Tables that follow each other in the file are read in one request.
            run = 1
            while (
                pos + run < len(offsets)
                and offsets[pos + run][1] == offsets[pos][1] + run * gt_bytes
                and run * gt_bytes < 8 * 1024 * 1024
            ):
                run += 1
            raw = await self.file.pread(offsets[pos][1], run * gt_bytes)
            for k in range(run):
                self._gts[offsets[pos + k][0]] = codec.decode_table(
                    raw[k * gt_bytes : (k + 1) * gt_bytes]
                )
            pos += run

    async def _table(self, index: int) -> array[int] | None:
        if self.writable:
            return self._gts.get(index)
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        host = self._gt_offset(index)
        if host == 0:
            return None
        # Read ahead the tables that follow this one in the file (qemu and trioconv
        # write them back to back): one request instead of one per 32 MiB of disk.
        gt_bytes = self.layout.gt_bytes
        run = 1
        limit = min(TABLE_READAHEAD, self._cache_max // 2, len(self.gd) - index)
        while run < limit and self.gd[index + run] * SECTOR == host + run * gt_bytes:
            if index + run in self._cache:
                break
            run += 1
        if run > 1:
            self._gt_offset(index + run - 1)  # the last one must lie inside the file too
        raw = await self.file.pread(host, run * gt_bytes)
        for k in range(run):
            self._cache[index + k] = codec.decode_table(raw[k * gt_bytes : (k + 1) * gt_bytes])
        self._cache.move_to_end(index)
        while len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)
        return self._cache[index]

    @property
    def _unallocated(self) -> str:
        """The kind of a grain never written: the parent's bytes ("hole"), or zeroes."""
        return "hole" if self.read_parent is not None else "zero"

    def _entry_kind(self, entry: int) -> str:
        if entry == 0:
            return self._unallocated
        if entry == codec.GTE_ZEROED and self.layout.zero_grain:
            return "zero"
        return "compressed" if self.compressed else "data"

    async def _segments(self, offset: int, end: int) -> list[_Seg]:
        """Map extent-relative ``[offset, end)`` to merged segments."""
        g = self.grain
        span = self.layout.gt_span
        out: list[_Seg] = []
        pos = offset
        while pos < end:
            index = pos // span
            stop = min(end, (index + 1) * span)
            table = await self._table(index)
            if table is None:
                self._append(out, _Seg(pos, stop - pos, self._unallocated))
                pos = stop
                continue
            while pos < stop:
                slot = (pos // g) % self.layout.gt_entries
                inner = pos % g
                entry = table[slot]
                if entry == 0:
                    # Skip a run of unallocated grains at C speed, not entry by entry.
                    last = (stop - 1) // g % self.layout.gt_entries
                    run = memoryview(table)[slot : last + 1].tobytes()
                    zeros = (len(run) - len(run.lstrip(b"\0"))) // 4
                    n = min(stop - pos, zeros * g - inner)
                    self._append(out, _Seg(pos, n, self._unallocated))
                    pos += n
                    continue
                n = min(g - inner, stop - pos)
                kind = self._entry_kind(entry)
                host = entry * SECTOR + (inner if kind == "data" else 0)
                if kind != "zero" and entry * SECTOR >= self.file_end:
                    raise self._corrupt(
                        f"grain at guest offset {self.start + pos - inner:#x} points to "
                        f"{entry * SECTOR:#x}, beyond the end of the file ({self.file_end} "
                        "bytes)",
                        entry * SECTOR,
                    )
                self._append(out, _Seg(pos, n, kind, host))
                pos += n
        return out

    @staticmethod
    def _append(out: list[_Seg], seg: _Seg) -> None:
        if out:
            last = out[-1]
            if (last.kind == seg.kind and seg.kind in ("zero", "hole")) or (
                last.kind == seg.kind == "data" and last.host + last.length == seg.host
            ):
                out[-1] = _Seg(last.offset, last.length + seg.length, last.kind, last.host)
                return
        out.append(seg)

    # -- reading ----------------------------------------------------------------------
    async def read(self, offset: int, view: memoryview) -> None:
        compressed: list[_Seg] = []
        for seg in await self._segments(offset, offset + view.nbytes):
            part = view[seg.offset - offset : seg.end - offset]
            if seg.kind == "data":
                n = max(0, min(part.nbytes, self.file_end - seg.host))
                if n:
                    await self.file.preadinto(seg.host, part[:n])
                if n < part.nbytes:
                    fill_zero(part[n:])
            elif seg.kind == "compressed":
                compressed.append(seg)
            elif seg.kind == "hole" and self.read_parent is not None:
                if self.check_parent is not None:
                    await self.check_parent()
                await self.read_parent(self.start + seg.offset, part)
            else:
                fill_zero(part)
        if compressed:
            await self._read_compressed(compressed, view, offset)

    async def _read_compressed(self, segs: list[_Seg], view: memoryview, offset: int) -> None:
        g = self.grain
        if g > MAX_COMPRESSED_GRAIN:
            raise UnsupportedError(
                f"{self.name}: compressed grains of {g} bytes are larger than the "
                f"{MAX_COMPRESSED_GRAIN} bytes trioconv reads"
            )
        margin = 2 * g + 12  # qemu reads two grains: marker and stream fit in them
        order = sorted(range(len(segs)), key=lambda i: segs[i].host)
        by_index: dict[int, bytes] = {}
        group: list[int] = []

        async def fetch() -> None:
            start = segs[group[0]].host
            stop = min(self.file_end, segs[group[-1]].host + margin)
            raw = await self.file.pread(start, stop - start)
            for i in group:
                at = segs[i].host - start
                if self.layout.has_marker:
                    _, size = codec.parse_grain_marker(raw[at : at + 12], segs[i].host)
                    if size == 0 or size > 2 * g:
                        raise self._corrupt(
                            f"compressed grain at offset {segs[i].host:#x} claims {size} bytes",
                            segs[i].host,
                        )
                    body = raw[at + 12 : at + 12 + size]
                    if len(body) < size:
                        more = await self.file.pread(segs[i].host + 12, size)
                        body = more
                else:
                    body = raw[at : at + 2 * g]
                by_index[i] = body

        for i in order:
            if group and segs[i].host - segs[group[0]].host > COMPRESSED_READ_SPAN:
                await fetch()
                group = []
            group.append(i)
        await fetch()
        streams = [by_index[i] for i in range(len(segs))]
        if sum(len(s) for s in streams) > THREAD_INFLATE_BYTES:
            plain = await trio.to_thread.run_sync(_inflate_all, streams, g)
        else:
            plain = _inflate_all(streams, g)
        for seg, data in zip(segs, plain, strict=True):
            inner = seg.offset % g
            if data is None or len(data) < inner + seg.length:
                raise self._corrupt(
                    f"compressed grain at offset {seg.host:#x} (guest offset "
                    f"{self.start + seg.offset - inner:#x}) could not be decompressed",
                    seg.host,
                )
            view[seg.offset - offset : seg.end - offset] = data[inner : inner + seg.length]

    # -- block status -----------------------------------------------------------------
    async def status(self, offset: int, length: int) -> tuple[int, ExtentKind]:
        g = self.grain
        end = min(self.length, offset + max(length, 1), offset + STATUS_GRAINS * g)
        kind: ExtentKind | None = None
        stop = offset
        # Map in growing steps and stop at the first change of kind, so walking a mixed
        # image does not map the same grains over and over.
        pos, step = offset, 256 * g
        while pos < end:
            chunk_end = min(end, pos + step)
            step *= 2
            for seg in await self._segments(pos, chunk_end):
                k = {"zero": ExtentKind.ZERO, "hole": ExtentKind.HOLE}.get(
                    seg.kind, ExtentKind.DATA
                )
                if kind is None:
                    kind = k
                elif k is not kind:
                    return stop - offset, kind
                stop = seg.end
            pos = chunk_end
        assert kind is not None
        return stop - offset, kind

    # -- writing ----------------------------------------------------------------------
    def _slot(self, grain: int) -> tuple[array[int], int]:
        index, slot = divmod(grain, self.layout.gt_entries)
        table = self._gts.get(index)
        if table is None:
            raise UnsupportedError(
                f"{self.name}: cannot write at guest offset {self.start + grain * self.grain:#x}"
                ": its grain table is not allocated (trioconv writes only into images whose "
                "grain tables are preallocated, as qemu-img and trioconv create them)"
            )
        return table, slot

    def _allocated(self, entry: int) -> bool:
        return entry != 0 and not (entry == codec.GTE_ZEROED and self.layout.zero_grain)

    def _set_entry(self, grain: int, sector: int) -> None:
        table, slot = self._slot(grain)
        table[slot] = sector
        self._dirty.add(grain // self.layout.gt_entries)

    def _allocate(self, nbytes: int) -> int:
        host = self._next_sector * SECTOR
        if self._next_sector + nbytes // SECTOR > codec.MAX_FILE_SECTORS:
            raise UnsupportedError(f"{self.name}: the extent file would exceed 2 TiB")
        if not self._growable and host + nbytes > self.file.size:
            raise UnsupportedError(
                f"{self.name}: a new grain needs room at offset {host:#x}, past the end of "
                f"the {self.file.name} storage ({self.file.size} bytes), which cannot grow"
            )
        self._next_sector += -(-nbytes // SECTOR)
        self.file_end = max(self.file_end, self._next_sector * SECTOR)
        return host

    async def write(self, offset: int, data: memoryview) -> None:
        if self.compressed:
            await self._write_stream(offset, data)
            return
        g = self.grain
        # Decide everything before the first await: allocation happens in entry order.
        plan: list[tuple[int, memoryview | bytes | bytearray, trio.Event | None, int]] = []
        mine: list[tuple[int, trio.Event]] = []
        # New grains written in part over a parent image: the rest is the parent's.
        cow: list[tuple[bytearray, int, int, memoryview]] = []
        pos = 0
        while pos < data.nbytes:
            rel = offset + pos
            grain, inner = divmod(rel, g)
            n = min(g - inner, data.nbytes - pos)
            table, slot = self._slot(grain)
            piece = data[pos : pos + n]
            if self._allocated(table[slot]):
                host = table[slot] * SECTOR + inner
                plan.append((host, piece, self._busy.get(grain), pos))
            else:
                # Only a grain never written shows the parent; a zeroed one reads as
                # zeroes, and so does what a partial write leaves of it. (Asked before
                # the entry below changes.)
                parent = self.read_parent is not None and table[slot] == 0
                host = self._allocate(g)
                self._set_entry(grain, host // SECTOR)
                if n == g or (
                    not parent and self._growable and (inner | n) % self._record_align == 0
                ):
                    # A new grain of a growable file lies past its old end: what the
                    # piece does not cover reads as zeroes already (a hole; flush
                    # makes the file reach the end of the last grain).
                    plan.append((host + inner, piece, None, pos))
                else:
                    whole = bytearray(g)
                    whole[inner : inner + n] = piece
                    if parent:
                        cow.append((whole, grain, inner, piece))
                    plan.append((host, whole, None, -1))
                event = trio.Event()
                self._busy[grain] = event
                mine.append((grain, event))
            pos += n
        try:
            for whole, grain, inner, piece in cow:
                # Copy on write, as qemu does: the parent's bytes around the new ones.
                assert self.read_parent is not None
                await self.read_parent(self.start + grain * g, memoryview(whole))
                whole[inner : inner + piece.nbytes] = piece
            i = 0
            while i < len(plan):
                host, payload, wait, at = plan[i]
                j = i + 1
                length = len(payload)
                # Merge pieces of ``data`` that are contiguous in the file too.
                while (
                    at >= 0
                    and j < len(plan)
                    and plan[j][2] is None
                    and plan[j][3] == at + length
                    and plan[j][0] == host + length
                ):
                    length += len(plan[j][1])
                    j += 1
                if wait is not None:
                    await wait.wait()
                chunk = data[at : at + length] if at >= 0 else payload
                self._written_end = max(self._written_end, host + len(chunk))
                self._in_flight += 1
                try:
                    await self.file.pwrite(host, chunk)
                finally:
                    self._in_flight -= 1
                self._done_end = max(self._done_end, host + len(chunk))
                i = j
        finally:
            for grain, event in mine:
                event.set()
                if self._busy.get(grain) is event:
                    del self._busy[grain]

    # -- stream (compressed) writing --------------------------------------------------
    def _claim(self, grain: int) -> None:
        table, slot = self._slot(grain)
        if grain in self._claimed or self._allocated(table[slot]):
            raise UnsupportedError(
                f"{self.name}: Could not write to allocated cluster for streamOptimized "
                f"(guest offset {self.start + grain * self.grain:#x})"
            )
        self._claimed.add(grain)

    def _grain_length(self, grain: int) -> int:
        return min(self.grain, self.length - grain * self.grain)

    async def _write_stream(self, offset: int, data: memoryview) -> None:
        g = self.grain
        ready: list[tuple[int, bytes | memoryview]] = []
        pos = 0
        while pos < data.nbytes:
            rel = offset + pos
            grain, inner = divmod(rel, g)
            n = min(g - inner, data.nbytes - pos)
            glen = self._grain_length(grain)
            piece = data[pos : pos + n]
            partial = self._partials.get(grain)
            if partial is None and inner == 0 and n == glen:
                self._claim(grain)
                ready.append((grain, piece))
            else:
                if partial is None:
                    table, slot = self._slot(grain)
                    if grain in self._claimed or self._allocated(table[slot]):
                        self._claim(grain)  # raises
                    if (len(self._partials) + 1) * g > MAX_PARTIAL_BYTES:
                        raise UnsupportedError(
                            f"{self.name}: streamOptimized takes whole grains; more than "
                            f"{MAX_PARTIAL_BYTES} bytes of partly written grains are waiting "
                            "for the rest of their data (write whole grains of "
                            f"{g} bytes)"
                        )
                    partial = self._partials[grain] = _Partial(bytearray(glen))
                partial.add(inner, piece)
                if partial.full:
                    del self._partials[grain]
                    self._claim(grain)
                    ready.append((grain, bytes(partial.buf)))
            pos += n
        if ready:
            await self._emit(ready)

    async def _emit(self, ready: list[tuple[int, bytes | memoryview]]) -> None:
        """Deflate ``ready`` grains, then append them in the order writes began."""
        previous, turn = self._last_turn, trio.Event()
        self._last_turn = turn
        try:
            lbas = [((self.start + grain * self.grain) // SECTOR, d) for grain, d in ready]
            records = await trio.to_thread.run_sync(_deflate_records, lbas, self._record_align)
            if previous is not None:
                await previous.wait()
            await self._append_records([grain for grain, _ in ready], records, turn)
        finally:
            turn.set()

    def prepare(self, offset: int, data: memoryview) -> list[tuple[int, bytes]] | None:
        """Split whole grains of ``data`` for deflating; None when not grain aligned."""
        g = self.grain
        if offset % g:
            return None
        out: list[tuple[int, bytes]] = []
        pos = 0
        while pos < data.nbytes:
            grain = (offset + pos) // g
            glen = self._grain_length(grain)
            if data.nbytes - pos < glen:
                return None
            out.append((grain, bytes(data[pos : pos + glen])))
            pos += glen
        return out

    async def compress(self, grains: list[tuple[int, bytes]]) -> tuple[list[int], list[bytes]]:
        lbas = [((self.start + grain * self.grain) // SECTOR, d) for grain, d in grains]
        records = await trio.to_thread.run_sync(_deflate_records, lbas, self._record_align)
        return [grain for grain, _ in grains], records

    async def write_compressed(self, grains: list[int], records: list[bytes]) -> None:
        for grain in grains:
            self._claim(grain)
        await self._append_records(grains, records, None)

    async def _append_records(
        self, grains: list[int], records: list[bytes], turn: trio.Event | None
    ) -> None:
        host = self._allocate(sum(len(r) for r in records))
        at = host
        for grain, record in zip(grains, records, strict=True):
            self._set_entry(grain, at // SECTOR)
            self._claimed.discard(grain)
            at += len(record)
        if turn is not None:
            turn.set()
        await self.file.pwrite(host, b"".join(records))

    # -- zeroes, flush ----------------------------------------------------------------
    async def write_zeroes(self, offset: int, length: int, may_unmap: bool, fast: bool) -> None:
        g = self.grain
        end = offset + length
        to_zero_grain: list[int] = []
        to_write: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            grain, inner = divmod(pos, g)
            n = min(g - inner, end - pos)
            table, slot = self._slot(grain)
            partial = self._partials.get(grain)
            if partial is not None:
                partial.add(inner, memoryview(bytes(n)))
            elif (
                self._allocated(table[slot])
                or grain in self._claimed
                or (self.read_parent is not None and table[slot] == 0)  # shows the parent
            ):
                if fast and self.read_parent is not None:
                    # A delta disk is never zeroed up front (qemu-img does not either):
                    # its zero runs are written where they are.
                    raise ZeroesNotSupported(f"{self.name}: a delta disk is not pre-zeroed")
                if self.layout.zero_grain and n == self._grain_length(grain):
                    to_zero_grain.append(grain)
                elif self.compressed or fast:
                    raise ZeroesNotSupported(f"{self.name}: cannot zero part of a grain cheaply")
                else:
                    to_write.append((pos, n))
            pos += n
        for grain in to_zero_grain:
            self._set_entry(grain, codec.GTE_ZEROED)
        # Contiguous pieces go in one write (up to a bounded size), so their grains are
        # allocated together, before another writer's.
        merged: list[tuple[int, int]] = []
        for pos, n in to_write:
            if merged and sum(merged[-1]) == pos and merged[-1][1] + n <= _ZERO_WRITE:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((pos, n))
        zeros = memoryview(bytes(max((n for _, n in merged), default=0)))
        for pos, n in merged:
            await self.write(pos, zeros[:n])

    async def finish(self) -> None:
        """Write out partial stream grains (zero-padded): nothing more will come for them."""
        if self._partials:
            ready: list[tuple[int, bytes | memoryview]] = []
            for grain, partial in sorted(self._partials.items()):
                self._claim(grain)
                ready.append((grain, bytes(partial.buf)))
            self._partials.clear()
            await self._emit(ready)

    async def flush(self) -> None:
        if not self.writable:
            return
        await self.finish()
        end = self._next_sector * SECTOR
        # With no write under way, only what was done counts: a grain table entry past
        # the end of the file makes the image unreadable.
        reached = self._written_end if self._in_flight else self._done_end
        if not self.compressed and reached < end:
            # The last grain was written only in part (or its write was cancelled): the
            # file reaches its end, as with a whole grain written.
            start = max(reached, end - SECTOR)
            self._written_end = self._done_end = end
            await self.file.pwrite(start, bytes(end - start))
        if self.compressed and not self._in_flight:
            # A stream ends with an end-of-stream marker, a sector of zeroes (VMDK 5.0:
            # what VMware's importers read up to); the next grain, if any, goes over it.
            await self.file.pwrite(end, bytes(SECTOR))
        dirty = sorted(self._dirty)
        self._dirty.clear()
        gt_bytes = self.layout.gt_bytes
        for directory in (self.gd, self.rgd):
            if directory is None:
                continue
            pos = 0
            while pos < len(dirty):
                run = 1
                base = directory[dirty[pos]] * SECTOR
                while (
                    pos + run < len(dirty)
                    and dirty[pos + run] == dirty[pos] + run
                    and directory[dirty[pos + run]] * SECTOR == base + run * gt_bytes
                ):
                    run += 1
                blob = b"".join(codec.encode_table(self._gts[dirty[pos + k]]) for k in range(run))
                await self.file.pwrite(base, blob)
                pos += run
        await self.file.flush()
