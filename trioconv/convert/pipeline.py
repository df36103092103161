"""The copy engine: one nursery, a planner, ``-m`` copy tasks and a sequencer.

The shape, top to bottom::

    planner --jobs--> [memory channel] --> copy task x m --tickets--> sequencer
       |                                       |   ^                      |
    block status                      CapacityLimiter (buffers)      releases writes
    of the sources                     read, find zeroes, write      in job order

1. The **planner** walks the sources' block status lazily (one extent at a time, never
   a whole-image pass first), feeds the runs to a :class:`Chunker`, and sends numbered
   jobs - data at most one buffer long, or a zero run - into an unbuffered memory
   channel. Zero runs on a target that already reads as zero are counted as done and
   never sent. With a backing file for the target (``-B``) the planner asks only the
   sources' top layer (:meth:`~trioconv.Driver.layer_status`): what it does not hold
   is left alone for the backing file to show, and its zeroes are written.
2. **Copy tasks** each take a :class:`trio.CapacityLimiter` token *before* receiving a
   job, so at most ``-m`` buffers are ever in flight and memory stays flat whatever the
   image size. A task reads the job into a page-aligned buffer from a fixed pool, splits
   it into data and zero pieces (``-S``), waits for its turn and writes.
3. The **sequencer** (in-order mode, the default) hands out turns in job order. A turn
   ends as soon as the task has *started* its first write, so writes begin in order -
   sequential allocation on the target - yet many are in flight at once. With ``-W``
   there is no sequencer and tasks write as soon as their data is ready.
4. The first failure cancels the nursery; :func:`run_pipeline` turns the exception
   group into one :class:`~trioconv.ConvertError` whose cause is the group.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import functools
import logging
import math
import mmap

import attrs
import trio

from .._errors import (
    ConvertError,
    TrioconvError,
    TrioconvIOError,
    UnsupportedError,
    ZeroesNotSupported,
)
from ..driver import Driver, Extent, ExtentKind
from ..formats.raw import RawDriver
from ..protocols._net import together
from ..protocols.file import FileDriver
from .options import ConvertOptions
from .progress import Progress

__all__ = ["Chunker", "Job", "RunJoiner", "RunKind", "SourceMap", "find_zero_runs", "run_pipeline"]

log = logging.getLogger("trioconv")

#: Largest write-zeroes request the planner sends.
MAX_ZERO_JOB = 256 * 1024 * 1024
#: Data job size with -c (compression needs no large requests, and saves memory).
COMPRESS_JOB = 512 * 1024
#: How much block status the planner asks for at once (a hint to the driver).
STATUS_WINDOW = 1024 * 1024 * 1024


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def _round_down(value: int, align: int) -> int:
    return value - value % align


class RunKind(enum.IntEnum):
    """What the planner does with a run of the source (equal to the old ``is_zero`` bool)."""

    #: Read it and write it.
    DATA = 0
    #: Make it read as zeroes on the target.
    ZERO = 1
    #: Leave it alone: the target's backing file shows through (``-B``).
    BACKING = 2


@attrs.frozen
class Job:
    """One unit of work: ``[offset, offset + length)`` of the target."""

    index: int
    offset: int
    length: int
    zero: bool


class Chunker:
    """Turn a stream of contiguous runs into aligned, bounded jobs (pure, no I/O).

    Runs arrive in order as ``(offset, length, kind)``, ``kind`` a :class:`RunKind` or a
    bool (True: zero). Zero and backing runs shrink to their ``align``-aligned interior
    - the unaligned edges become data - so no job ever straddles an alignment block;
    data is cut at multiples of ``max_data`` so each data job fits one buffer and lines
    up with the target's clusters.

    Returns tuples ``(offset, length, kind)``; ``kind`` compares equal to the bool
    ``is_zero`` for data and zero runs.
    """

    def __init__(self, total: int, *, align: int, max_data: int, max_zero: int = MAX_ZERO_JOB):
        if max_data % align:
            raise ValueError("max_data must be a multiple of align")
        self.total = total
        self.align = align
        self.max_data = max_data
        self.max_zero = max_zero
        self._cur = 0  # jobs emitted up to here
        self._known = 0  # runs received up to here

    def feed(
        self, offset: int, length: int, zero: bool | RunKind
    ) -> list[tuple[int, int, RunKind]]:
        """Add the next run; return the jobs it completes."""
        if offset != self._known or length <= 0:
            raise ValueError(f"runs must be contiguous and non-empty (got {offset}+{length})")
        kind = RunKind(int(zero))
        end = offset + length
        out: list[tuple[int, int, RunKind]] = []
        if kind is not RunKind.DATA:
            zs = _round_up(offset, self.align)
            ze = end if end == self.total else _round_down(end, self.align)
            if ze > zs:
                out += self._data_until(zs)
                if kind is RunKind.BACKING:
                    out.append((zs, ze - zs, kind))
                else:
                    for z in range(zs, ze, self.max_zero):
                        out.append((z, min(self.max_zero, ze - z), kind))
                self._cur = ze
        self._known = end
        while (boundary := _round_down(self._cur, self.max_data) + self.max_data) <= self._known:
            out.append((self._cur, boundary - self._cur, RunKind.DATA))
            self._cur = boundary
        return out

    def finish(self) -> list[tuple[int, int, RunKind]]:
        """Return the jobs still pending after the last run."""
        return self._data_until(self._known)

    def _data_until(self, stop: int) -> list[tuple[int, int, RunKind]]:
        out = []
        while self._cur < stop:
            boundary = min(stop, _round_down(self._cur, self.max_data) + self.max_data)
            out.append((self._cur, boundary - self._cur, RunKind.DATA))
            self._cur = boundary
        return out


class RunJoiner:
    """Join adjacent zero runs (and adjacent backing runs) of one source (pure, no I/O).

    A driver may answer a range in several pieces - a status window, a table's edge,
    a bitmap's - where qemu-img sees one extent. Cut in two, a zero range can cost a
    partial-cluster zero write at the cut (on a target with a backing file, one that
    copies the cluster up and leaves it allocated) and, when the cut is unaligned,
    bytes of data at its edges. So a zero or backing run is held back until a run of
    another kind shows where it ends; a very long one is let go at an ``align``-ed
    offset, so that a huge sparse image is not walked to its end before its zeroes
    are written.
    """

    def __init__(self, align: int, limit: int = MAX_ZERO_JOB):
        self.align = align
        self.limit = limit
        self._held: tuple[int, int, RunKind] | None = None

    def feed(self, offset: int, length: int, kind: RunKind) -> list[tuple[int, int, RunKind]]:
        """Add the next run (contiguous with the last); return the runs now complete."""
        out: list[tuple[int, int, RunKind]] = []
        if self._held is not None:
            start, n, held = self._held
            if kind is held and kind is not RunKind.DATA:
                return self._hold(start, n + length, kind)
            out.append(self._held)
            self._held = None
        if kind is RunKind.DATA:
            out.append((offset, length, kind))
            return out
        return out + self._hold(offset, length, kind)

    def _hold(self, start: int, length: int, kind: RunKind) -> list[tuple[int, int, RunKind]]:
        self._held = (start, length, kind)
        if length < self.limit:
            return []
        cut = _round_down(start + length, self.align) - start
        if cut <= 0:
            return []
        self._held = (start + cut, length - cut, kind) if length > cut else None
        return [(start, cut, kind)]

    def finish(self) -> list[tuple[int, int, RunKind]]:
        """The run still held back, if any."""
        out = [self._held] if self._held is not None else []
        self._held = None
        return out


class SourceMap:
    """Several sources laid end to end, as one address space (``qemu-img convert a b c``)."""

    def __init__(self, sources: list[Driver]) -> None:
        self.sources = sources
        self.bases: list[int] = []
        base = 0
        for src in sources:
            self.bases.append(base)
            base += src.size
        self.total = base

    def pieces(self, offset: int, length: int) -> list[tuple[Driver, int, int, int]]:
        """Split a target range into ``(source, source_offset, length, target_offset)``."""
        out = []
        i = bisect.bisect_right(self.bases, offset) - 1
        end = offset + length
        while offset < end:
            src, base = self.sources[i], self.bases[i]
            n = min(end, base + src.size) - offset
            if n > 0:
                out.append((src, offset - base, n, offset))
                offset += n
            i += 1
        return out


#: Zeroes to compare against (a slice of it is compared at a time; it stays in cache).
_ZERO_CHUNK = bytes(256 * 1024)


def _all_zero(view: memoryview, start: int, stop: int) -> bool:
    """True when ``view[start:stop]`` is all zero bytes (``memcmp`` speed, no copy)."""
    chunk = _ZERO_CHUNK
    step = len(chunk)
    while stop - start > step:
        if not chunk.startswith(view[start : start + step]):
            return False
        start += step
    return chunk.startswith(view[start:stop])


def _next_candidate(marks: bytes, block: int, width: int) -> int:
    """The first block from ``block`` on whose ``width`` bytes in ``marks`` are zero, or -1."""
    zero = bytes(width)
    pos = block * width
    while (hit := marks.find(zero, pos)) >= 0:
        if hit % width == 0:
            return hit // width
        pos = hit - hit % width + width  # a run of zeroes across two blocks' marks
    return -1


def find_zero_runs(
    buf: mmap.mmap | bytes | bytearray,
    length: int,
    base: int,
    granularity: int,
    min_run: int = 0,
) -> list[tuple[int, int, bool]]:
    """Split ``buf[:length]`` into ``(offset, length, is_zero)`` runs, offsets absolute.

    A run is zero only if it covers whole ``granularity``-sized blocks, aligned to the
    absolute offset ``base``, that are entirely zero, and - inside the buffer - is at
    least ``min_run`` bytes long: qemu-img's ``-S``, whose blocks are the largest power
    of two in the sparse size and whose zero runs must be as long as the size itself
    (``-S 1536`` skips 2 KiB of zeroes aligned to 1 KiB, not 1 KiB alone). The buffer's
    edges are the exception, as in qemu-img: a partial block at either end that holds
    only zeroes is zero too (the zeroes between the last block boundary and the end of a
    data extent that does not end on one, say), a zero run that starts or ends the
    buffer is zero whatever its length, and a buffer of zeroes is one zero run.

    Every step is C-level: the first 8 bytes of every block are gathered with one strided
    copy (4 KiB for a 2 MiB buffer, one cache line touched per block), so a block of data
    that does not start with 8 zero bytes costs nothing more; only the remaining
    candidates are compared with zeroes, a whole run of candidates at once (``memcmp``, no
    copy), block by block only when that run turns out not to be all zero. (The old
    search for ``granularity`` zero bytes with ``find`` read every byte of data and took
    about four times as long.)
    """
    g = granularity
    if length <= 0:
        return []
    with memoryview(buf) as whole:
        # A job that is zero from end to end is one zero run whatever its edges, as
        # qemu-img counts a chunk shorter than ``-S`` that holds only zeroes. (Data
        # fails this at its first non-zero byte, so it costs nothing there.)
        if _all_zero(whole, 0, length):
            return [(base, length, True)]
    first = -base % g  # the first whole block starts here in buf
    if first >= length:
        return [(base, length, False)]  # inside one block, and not all zero
    nblocks = (length - first) // g
    end = first + nblocks * g  # the last whole block ends here
    # Zero ranges of buf, in order: the partial block at either edge, whole blocks.
    zero_ranges: list[tuple[int, int]] = []
    with memoryview(buf) as view:
        if first and _all_zero(view, 0, first):
            zero_ranges.append((0, first))
        if nblocks:
            _zero_blocks(view, first, nblocks, g, zero_ranges)
        if end < length and _all_zero(view, end, length):
            zero_ranges.append((end, length))
    if min_run > g:
        zero_ranges = _long_enough(zero_ranges, length, min_run)
    runs: list[tuple[int, int, bool]] = []
    data_start = 0  # start of the data run not yet emitted
    for zstart, zend in zero_ranges:
        if zstart > data_start:
            runs.append((base + data_start, zstart - data_start, False))
        if runs and runs[-1][2] and runs[-1][0] + runs[-1][1] == base + zstart:
            runs[-1] = (runs[-1][0], zend - zstart + runs[-1][1], True)
        else:
            runs.append((base + zstart, zend - zstart, True))
        data_start = zend
    if data_start < length:
        runs.append((base + data_start, length - data_start, False))
    return runs


def _long_enough(
    zero_ranges: list[tuple[int, int]], length: int, min_run: int
) -> list[tuple[int, int]]:
    """The ranges of ``zero_ranges`` (sorted, in a buffer of ``length`` bytes) that are
    worth leaving unwritten: adjacent ranges joined, those at least ``min_run`` bytes
    long, and those touching either end of the buffer (qemu-img skips a zero run that
    starts or ends its chunk whatever its length)."""
    joined: list[tuple[int, int]] = []
    for start, end in zero_ranges:
        if joined and joined[-1][1] == start:
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    return [(s, e) for s, e in joined if e - s >= min_run or s == 0 or e == length]


def _zero_blocks(
    view: memoryview, first: int, nblocks: int, g: int, out: list[tuple[int, int]]
) -> None:
    """Append to ``out`` the ranges of ``view`` made of whole all-zero blocks: ``nblocks``
    blocks of ``g`` bytes from ``first`` on, adjacent zero blocks as one range."""
    end = first + nblocks * g
    if g % 8 == 0:
        # The first 8 bytes of every block: one cache line touched per block.
        marks = view[first:end].cast("Q")[:: g // 8].tobytes()
        width = 8
    else:
        heads = view[first:end:g].tobytes()
        tails = view[first + g - 1 : end : g].tobytes()
        marks = (int.from_bytes(heads, "little") | int.from_bytes(tails, "little")).to_bytes(
            nblocks, "little"
        )
        width = 1
    # marks holds ``width`` bytes per block; all zero: the block may be zero.
    i = _next_candidate(marks, 0, width)
    while i >= 0:
        rest = marks[i * width :]
        j = i + (len(rest) - len(rest.lstrip(b"\0"))) // width  # candidates [i, j)
        if _all_zero(view, first + i * g, first + j * g):
            zeros = [(i, j)]
        else:
            zeros = []
            for k in range(i, j):
                if _all_zero(view, first + k * g, first + (k + 1) * g):
                    if zeros and zeros[-1][1] == k:
                        zeros[-1] = (zeros[-1][0], k + 1)
                    else:
                        zeros.append((k, k + 1))
        for zs, ze in zeros:
            out.append((first + zs * g, first + ze * g))
        i = _next_candidate(marks, j, width) if j < nblocks else -1


@attrs.define(eq=False)
class _Ticket:
    index: int
    release: trio.Event = attrs.field(factory=trio.Event)
    started: trio.Event = attrs.field(factory=trio.Event)


class _RateLimiter:
    """Spread writes so that on average at most ``rate`` bytes per second start."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._next = -math.inf

    async def wait(self, nbytes: int) -> None:
        start = max(trio.current_time(), self._next)
        self._next = start + nbytes / self.rate
        await trio.sleep_until(start)


def _file_of(driver: Driver) -> FileDriver | None:
    while isinstance(driver, RawDriver):
        if driver.offset:
            return None  # a window: the file's offsets are not the image's
        driver = driver.child
    return driver if isinstance(driver, FileDriver) else None


class _Engine:
    def __init__(
        self,
        sources: SourceMap,
        target: Driver,
        opts: ConvertOptions,
        progress: Progress,
        *,
        zero_init: bool,
        backing: bool = False,
        backing_end: int | None = None,
    ) -> None:
        self.sources = sources
        self.target = target
        self.opts = opts
        self.progress = progress
        # With a backing file the target does not read as zeroes where nothing is
        # written: zeroes must be written (except past the backing file's end).
        self.backing = backing
        self.backing_end = backing_end if backing else None
        self.zero_init = zero_init and not backing
        self.compress = opts.compress
        if self.compress and not target.caps.compress:
            raise UnsupportedError("Compression not supported for this file format")
        cluster = target.limits.cluster_size if self.compress else 0
        # The sources' alignments (O_DIRECT's, say) line reads up only when every source
        # starts on their grid in the target. Otherwise a source's aligned blocks fall
        # across the target's, reads are bounced anyway, and shrinking its zero runs to
        # the target's grid would write as data zeroes qemu-img leaves unallocated.
        source_align = max([s.limits.request_alignment for s in sources.sources] + [1])
        if any(base % source_align for base in sources.bases):
            source_align = 1
        align = max(target.limits.request_alignment, 512, cluster, source_align)
        self.align = align
        self.buffer_size = _round_up(max(opts.buffer_size, target.limits.opt_transfer), align)
        if self.compress:
            # Each task holds its buffer and its compressed result until its turn comes:
            # smaller jobs keep that memory small without costing parallelism.
            self.buffer_size = _round_up(min(self.buffer_size, COMPRESS_JOB), align)
        # qemu-img's -S: zero runs aligned to the largest power of two in the sparse size
        # (or the alignment, if larger) and at least the sparse size long.
        sparse = opts.sparse_size
        self.granularity = _round_up(1 << (sparse.bit_length() - 1), align) if sparse else 0
        self.min_run = sparse
        if self.compress and opts.sparse_size:
            self.granularity = align  # whole zero clusters stay unallocated
            self.min_run = 0
        self.limiter = trio.CapacityLimiter(opts.parallel)
        self.pool = [mmap.mmap(-1, self.buffer_size) for _ in range(opts.parallel)]
        self.zero_buffer = bytes(min(self.buffer_size, 4 * 1024 * 1024))
        self.rate = _RateLimiter(opts.rate_limit) if opts.rate_limit else None
        target_file = _file_of(target)
        self.offload = opts.copy_range and target_file is not None and target_file.caps.copy_range
        self.salvaged: list[tuple[int, int]] = []
        self.prezeroed = False

    # -- planner -----------------------------------------------------------------------
    async def plan(self, send: trio.MemorySendChannel[Job]) -> None:
        async with send:
            # Zero runs become jobs only when they must be written: on a zero-initialised
            # target they are skipped whole, however long (no million-job walk).
            max_zero = MAX_ZERO_JOB if not self.zero_init else max(self.sources.total, 1)
            chunker = Chunker(
                self.sources.total, align=self.align, max_data=self.buffer_size, max_zero=max_zero
            )
            index = 0
            for base, src in zip(self.sources.bases, self.sources.sources, strict=True):
                joiner = RunJoiner(self.align)
                pos = 0
                while pos < src.size:
                    length, kind = await self._status(src, base, pos)
                    joined = joiner.feed(base + pos, length, kind)
                    if pos + length >= src.size:
                        joined += joiner.finish()
                    for run in joined:
                        for offset, n, k in chunker.feed(*run):
                            index = await self._send_job(send, index, offset, n, k)
                    pos += length
            for offset, n, k in chunker.finish():
                index = await self._send_job(send, index, offset, n, k)

    async def _status(
        self, src: Driver, base: int, pos: int, *, salvage: bool = True
    ) -> tuple[int, RunKind]:
        """The next run of ``src`` from ``pos``: its length and what to do with it.

        With a backing file for the target (``-B``) only the source's top layer is
        asked, as qemu-img does: what it does not hold is left to the backing file,
        and its zero ranges are written as zeroes - except past the end of the
        target's backing file, where an untouched range reads as zeroes anyway.
        """
        left = src.size - pos
        if self.opts.sparse_size == 0 and not self.backing:
            return left, RunKind.DATA
        window = min(left, STATUS_WINDOW)
        ext = await self._query_status(src, pos, window, salvage=salvage)
        if ext.offset != pos or ext.length <= 0:
            raise TrioconvIOError(f"{src.location}: invalid block status at byte {pos}", offset=pos)
        length = min(ext.length, left)
        if ext.kind is ExtentKind.DATA:
            return length, RunKind.DATA
        if not self.backing:
            return length, RunKind.ZERO
        if ext.kind is ExtentKind.HOLE:
            return length, RunKind.BACKING
        # ZERO in the top layer: split at the end of the target's backing file.
        end = self.backing_end
        if end is not None:
            if base + pos >= end:
                return length, RunKind.BACKING
            length = min(length, end - base - pos)
        # -S 0: a fully allocated target; the zeroes are read and written as data.
        return length, RunKind.ZERO if self.opts.sparse_size else RunKind.DATA

    async def _query_status(
        self, src: Driver, pos: int, window: int, *, salvage: bool = True
    ) -> Extent:
        """``src``'s status (its top layer's with ``-B``) from ``pos``.

        With ``--salvage``, a range whose status cannot be read (a corrupt table entry, a
        failing server) is narrowed down a quarter at a time, as qemu-img narrows it,
        to one cluster (or sector), which is then copied as data with a warning: its
        read fails in turn and it becomes zeroes, and the rest of the image is copied.
        """
        unit = max(512, src.limits.cluster_size or 0, src.limits.request_alignment)
        while True:
            try:
                if self.backing:
                    return await src.layer_status(pos, window)
                return await src.block_status(pos, window)
            except TrioconvIOError as exc:
                if not (self.opts.salvage and salvage):
                    raise
                if window <= unit:
                    log.warning("error while reading block status at offset %d: %s", pos, exc)
                    return Extent(pos, window, ExtentKind.DATA)
                window = max(unit, -(-window // 4 // unit) * unit)

    async def measure(self, scope: trio.CancelScope) -> None:
        """Learn how much data the sources hold (:attr:`Progress.data_total`), beside
        the copy, for a percentage of the data as qemu-img's ``-p`` shows it.

        qemu-img walks the sources' block status once before copying to count it; here
        the walk runs alongside the planner's, which only looks a window ahead, so the
        copy starts at once. ``scope`` is cancelled when the copy is over: a walk still
        going (a remote source, one round trip per extent) does not hold it up. A
        source whose status cannot be read leaves the amount unknown, and the planner
        meets the same error (or salvages around it) and tells.
        """
        total: int | None = None
        self.progress._measure()
        try:
            with scope:
                total = await self._count_data()
        finally:
            self.progress._measured(total)

    async def _count_data(self) -> int | None:
        """The bytes of the data jobs the planner makes: the same runs, cut and rounded
        by a :class:`Chunker` of the same shape, so that the jobs' lengths, counted as
        they finish, add up to exactly this."""
        total = 0
        chunker = Chunker(self.sources.total, align=self.align, max_data=self.buffer_size)
        for base, src in zip(self.sources.bases, self.sources.sources, strict=True):
            joiner = RunJoiner(self.align)
            pos = 0
            while pos < src.size:
                try:
                    length, kind = await self._status(src, base, pos, salvage=False)
                except TrioconvError:
                    return None
                joined = joiner.feed(base + pos, length, kind)
                if pos + length >= src.size:
                    joined += joiner.finish()
                for run in joined:
                    for _, n, k in chunker.feed(*run):
                        total += n if k is RunKind.DATA else 0
                pos += length
                # A driver answering from its cache does not yield: without this the
                # walk would hold the event loop for as long as it takes.
                await trio.lowlevel.checkpoint()
        return total + sum(n for _, n, k in chunker.finish() if k is RunKind.DATA)

    async def _send_job(
        self, send: trio.MemorySendChannel[Job], index: int, offset: int, n: int, kind: RunKind
    ) -> int:
        if kind is RunKind.BACKING:
            self.progress._advance(skipped=n)  # the target's backing file shows through
            return index
        if kind is RunKind.ZERO and self.zero_init:
            self._already_zero(n)
            return index
        await send.send(Job(index, offset, n, kind is RunKind.ZERO))
        return index + 1

    # -- sequencer ---------------------------------------------------------------------
    async def sequencer(self, tickets: trio.MemoryReceiveChannel[_Ticket]) -> None:
        async with tickets:
            pending: dict[int, _Ticket] = {}
            next_index = 0
            async for ticket in tickets:
                pending[ticket.index] = ticket
                while next_index in pending:
                    turn = pending.pop(next_index)
                    turn.release.set()
                    await turn.started.wait()
                    next_index += 1

    async def _turn(
        self, job: Job, tickets: trio.MemorySendChannel[_Ticket] | None, *, hold: bool = False
    ) -> _Ticket | None:
        """Wait until this job may start writing (in-order mode); return just before it does.

        The next job's turn comes once this one has *started* writing: at once, or with
        ``hold`` when the caller sets the returned ticket's ``started`` itself, just
        before its last write (a job split into several writes by ``-S`` keeps them all
        ahead of the next job's, so a format allocates them in guest order as qemu-img
        does).
        """
        if tickets is None:
            return None
        ticket = _Ticket(job.index)
        tickets.send_nowait(ticket)
        await ticket.release.wait()
        if not hold:
            ticket.started.set()  # the caller's write starts before this task next yields
        return ticket

    # -- copy tasks --------------------------------------------------------------------
    async def copy_task(
        self,
        jobs: trio.MemoryReceiveChannel[Job],
        tickets: trio.MemorySendChannel[_Ticket] | None,
    ) -> None:
        async with jobs:
            try:
                while True:
                    async with self.limiter:
                        try:
                            job = await jobs.receive()
                        except trio.EndOfChannel:
                            return
                        if job.zero:
                            await self._turn(job, tickets)
                            await self._write_zeroes(job.offset, job.length)
                            self.progress._advance(zeroed=job.length)
                        else:
                            await self._copy(job, tickets)
            finally:
                if tickets is not None:
                    tickets.close()

    async def _copy(self, job: Job, tickets: trio.MemorySendChannel[_Ticket] | None) -> None:
        buf = self.pool.pop()
        view = memoryview(buf)[: job.length]
        try:
            if self.offload and await self._offload(job, view, tickets):
                self.progress._advance(written=job.length, data=job.length)
                return
            await self._read(job, view)
            if self.granularity:
                runs = find_zero_runs(buf, job.length, job.offset, self.granularity, self.min_run)
            else:
                runs = [(job.offset, job.length, False)]
            prepared: dict[int, object] = {}
            if self.compress:
                # The CPU work happens here, before the turn, in parallel across tasks.
                for offset, n, zero in runs:
                    if not zero:
                        piece = view[offset - job.offset : offset - job.offset + n]
                        prepared[offset] = await self.target.compress(offset, piece)
            if self.rate is not None:
                await self.rate.wait(sum(n for _, n, z in runs if not z))
            # A format that allocates (clusters, grains, blocks) gets all of a split job's
            # pieces ahead of the next job's, for qemu-img's layout; a raw target lets
            # the next job start as soon as this one's first write has.
            hold = len(runs) > 1 and self.target.limits.cluster_size > 0
            ticket = await self._turn(job, tickets, hold=hold)
            last = len(runs) - 1
            for i, (offset, n, zero) in enumerate(runs):
                if ticket is not None and i == last:
                    ticket.started.set()
                piece = view[offset - job.offset : offset - job.offset + n]
                if not zero and self.compress:
                    await self.target.pwrite_compressed(offset, prepared.pop(offset))
                    self.progress._advance(written=n)
                elif not zero:
                    await self.target.pwrite(offset, piece)
                    self.progress._advance(written=n)
                elif self.zero_init:
                    self._already_zero(n)
                else:
                    await self._write_zeroes(offset, n)
                    self.progress._advance(zeroed=n)
            self.progress._advance(data=job.length)
        finally:
            view.release()
            self.pool.append(buf)

    def _already_zero(self, n: int) -> None:
        # Zeroed up front by prezero() counts as zeroed; a zero-initialised target, skipped.
        if self.prezeroed:
            self.progress._advance(zeroed=n)
        else:
            self.progress._advance(skipped=n)

    async def _offload(
        self, job: Job, view: memoryview, tickets: trio.MemorySendChannel[_Ticket] | None
    ) -> bool:
        """Copy the job in the kernel; False when some piece cannot be offloaded.

        When the kernel refuses part-way, offloading is switched off for the rest of the
        conversion and this job is finished by reading into ``view`` and writing.
        """
        target = _file_of(self.target)
        pieces = self.sources.pieces(job.offset, job.length)
        files = [_file_of(src) for src, *_ in pieces]
        if target is None or any(f is None or not f.caps.copy_range for f in files):
            return False
        for f, (_, soff, n, _) in zip(files, pieces, strict=True):
            if f is not None and soff + n > f.size:
                return False  # the zeroes that round a raw file up to a sector are not in it
        if self.rate is not None:
            await self.rate.wait(job.length)
        await self._turn(job, tickets)
        try:
            for f, (_, soff, n, toff) in zip(files, pieces, strict=True):
                assert f is not None
                await target.copy_range(f, soff, toff, n)
        except UnsupportedError as exc:
            log.debug("copy offload disabled: %s", exc)
            self.offload = False
            await self._read(job, view)
            await self.target.pwrite(job.offset, view)
        return True

    async def _read(self, job: Job, view: memoryview) -> None:
        for src, soff, n, toff in self.sources.pieces(job.offset, job.length):
            part = view[toff - job.offset : toff - job.offset + n]
            try:
                await src.preadinto(soff, part)
            except TrioconvIOError:
                if not self.opts.salvage:
                    raise
                await self._salvage(src, soff, part)

    async def _salvage(self, src: Driver, offset: int, part: memoryview) -> None:
        """Read what can be read; unreadable units become zeroes, with a warning."""
        unit = max(512, src.limits.request_alignment)
        pos = 0
        while pos < part.nbytes:
            n = min(unit - (offset + pos) % unit, part.nbytes - pos)
            sub = part[pos : pos + n]
            try:
                await src.preadinto(offset + pos, sub)
            except TrioconvIOError as exc:
                sub[:] = bytes(n)
                log.warning("%s (salvaged as zeroes)", exc)
                if self.salvaged and sum(self.salvaged[-1]) == offset + pos:
                    start, length = self.salvaged[-1]
                    self.salvaged[-1] = (start, length + n)
                else:
                    self.salvaged.append((offset + pos, n))
            pos += n

    async def _write_zeroes(self, offset: int, length: int) -> None:
        try:
            await self.target.pwrite_zeroes(offset, length, may_unmap=True)
            return
        except ZeroesNotSupported:
            pass
        zeros = memoryview(self.zero_buffer)
        pos = offset
        while pos < offset + length:
            n = min(len(zeros), offset + length - pos)
            await self.target.pwrite(pos, zeros[:n])
            pos += n

    # -- the whole ---------------------------------------------------------------------
    async def prezero(self) -> None:
        """Zero the whole target range at once if the target can do it cheaply.

        For a target that is not zero-initialised, a few fast requests (punched holes,
        NBD ``WRITE_ZEROES`` with ``FAST_ZERO``, iSCSI WRITE SAME with UNMAP) replace a
        write-zeroes request per zero run, and zero runs are then simply skipped.
        qemu-img did this until QEMU 5.1 (7.2 zeroes run by run): it saves a round trip
        per zero run, at the price of the target deallocating blocks that are written
        again next (see the design notes for the measured trade-off).
        """
        if (
            self.zero_init
            or self.backing
            or self.opts.sparse_size == 0
            or not self.target.caps.zeroes
        ):
            return
        total = self.sources.total
        calls = [
            functools.partial(
                self.target.pwrite_zeroes,
                start,
                min(MAX_ZERO_JOB, total - start),
                may_unmap=True,
                fast=True,
            )
            for start in range(0, total, MAX_ZERO_JOB)
        ]
        try:
            # The first request decides: a target that cannot zero fast refuses it and
            # nothing has changed. The rest go ``-m`` at a time, since over a network
            # each is a round trip (a 1 TiB LUN takes 4096 of them).
            if calls:
                await calls[0]()
            await together(calls[1:], limit=self.opts.parallel)
        except ZeroesNotSupported:
            return
        self.zero_init = self.prezeroed = True

    async def run(self) -> None:
        await self.prezero()
        jobs_send, jobs_recv = trio.open_memory_channel[Job](0)
        tickets_send, tickets_recv = trio.open_memory_channel[_Ticket](math.inf)
        in_order = not self.opts.oob_writes
        measuring = trio.CancelScope()
        async with trio.open_nursery() as outer:
            if self.progress._wants_data:
                outer.start_soon(self.measure, measuring)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.plan, jobs_send)
                if in_order:
                    nursery.start_soon(self.sequencer, tickets_recv)
                else:
                    tickets_recv.close()
                async with jobs_recv, tickets_send:
                    for _ in range(self.opts.parallel):
                        nursery.start_soon(
                            self.copy_task,
                            jobs_recv.clone(),
                            tickets_send.clone() if in_order else None,
                        )
            measuring.cancel()

    def close(self) -> None:
        # A traceback may still hold a view of a buffer; then the GC frees it later.
        for buf in self.pool:
            with contextlib.suppress(BufferError):
                buf.close()


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def lone_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What a group that is not a failure stands for, as one exception: its first
    ``Cancelled`` when it holds only cancellations, its ``KeyboardInterrupt`` (or other
    exception that is not an ``Exception``) when that is all it holds besides them;
    else the group itself."""
    leaves = _leaves(group)
    others = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if not others and leaves:
        return leaves[0]
    if len(others) == 1 and not isinstance(others[0], Exception):
        return others[0]
    return group


def convert_error_from_group(group: BaseExceptionGroup[BaseException]) -> ConvertError | None:
    """One :class:`ConvertError` for what a failed nursery raised.

    Returns None when the group holds only cancellations (the caller's cancel scope
    must see them) or a ``KeyboardInterrupt``/``SystemExit``; then re-raise the group.
    """
    real = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
    if not real or any(not isinstance(e, Exception) for e in real):
        return None
    first = next((e for e in real if isinstance(e, TrioconvError)), real[0])
    if isinstance(first, TrioconvError):
        return ConvertError(str(first))
    return ConvertError(f"internal error: {type(first).__name__}: {first}")


async def run_pipeline(
    sources: list[Driver],
    target: Driver,
    opts: ConvertOptions,
    progress: Progress,
    *,
    zero_init: bool,
    backing: bool = False,
    backing_end: int | None = None,
) -> list[tuple[int, int]]:
    """Copy the concatenated ``sources`` onto ``target``; return the salvaged ranges.

    Args:
        zero_init: the target reads as zeroes where nothing is written.
        backing: the target has a backing file (``-B``): ranges the source's top layer
            does not hold are left alone, zero ranges are written as zeroes.
        backing_end: the size of the target's backing file, when known (a new
            target): past it, the source's zero ranges are left alone too.

    Raises:
        ConvertError: the first failure, with the whole exception group as its cause.
    """
    smap = SourceMap(sources)
    engine = _Engine(
        smap,
        target,
        opts,
        progress,
        zero_init=zero_init,
        backing=backing,
        backing_end=backing_end,
    )
    progress._start(smap.total)
    try:
        await engine.run()
    except BaseExceptionGroup as group:
        error = convert_error_from_group(group)
        if error is None:
            raise
        raise error from group
    except ConvertError:
        raise
    except TrioconvError as exc:
        # Zeroing the whole target up front (prezero) runs before the copy tasks, out
        # of their nursery: its failure is a failed conversion all the same.
        raise ConvertError(str(exc)) from exc
    finally:
        engine.close()
    return engine.salvaged
