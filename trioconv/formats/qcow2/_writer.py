"""Writing qcow2: new images (:func:`create_qcow2`) and the writable driver.

Host clusters - data, L2 tables, refcount blocks, a new refcount table - are allocated
as qemu allocates them: the first run of free clusters (refcount 0) from the lowest free
one on, else at the end of the file. A new image has no free clusters below its end, so
it only grows, and a cluster taken at the end reads as zeroes (the file is sparse
there); a recycled cluster (freed by zeroing with ``may_unmap``, by a moved refcount
table, by overwriting a compressed cluster) may hold old bytes, so a partial write into
it gets zeroes around it. A freed cluster is not handed out again while a read or write
that started before it was freed is in flight (its references are dropped once they
end). A cluster zeroed without being freed (zero flag and a host offset, refcount 1) is
written in place when data comes, with zeroes around a partial write, as qemu does.

Metadata lives in memory while the image is written and goes to disk on
:meth:`Qcow2Writer.flush` (and on close):

* the **L1 table** - always in memory (at most 32 MiB, qemu's limit too);
* **L2 tables** - in a small LRU cache bounded in bytes; a full cache writes back its
  least recently used table, so a multi-terabyte image needs only a few MiB;
* the **refcount table** and the **refcount blocks** - in memory once touched (a 64 KiB
  block of 16-bit counts covers 2 GiB of file).

Allocation decisions are made under one :class:`trio.Lock`, which Trio hands out in
the order tasks ask for it. A write takes it on entry, decides where every cluster
goes, updates the tables, releases it and only then sends its data - so concurrent
writers never get the same cluster, and writes started in guest order (the copy
engine's default) lay clusters out in guest order. ``pwrite_zeroes`` does the same for
the zero bytes it must send (parts of clusters; whole clusters in version 2 images,
which have no zero flag), so its clusters come before those of a write that asked later.

Internal snapshots share clusters with the active layer: an L2 table or data cluster
whose L1/L2 entry lacks the COPIED flag and whose refcount is above 1 is never written in
place. As in qemu, a write copies it to a new cluster first (a shared L2 table whole; a
data cluster with its old content around a partial write), points the entry at the copy
with COPIED, and takes the active layer's reference off the old cluster. Zeroing changes
only the active layer's own tables (copied first when shared) and never a shared data
cluster. The snapshot table and the snapshots' L1 tables are left as they are.

A corrupt image is not made worse. Opening one for writing first lists the clusters
of its metadata (header, L1 and L2 tables, refcount table and blocks, snapshot tables)
and refuses it, untouched, if two of them overlap. A write or a free that would reach
one of them - an L2 entry mapping a data cluster onto the L1 table, or missing
refcounts letting a table's cluster be handed out for data - fails before it starts,
like qemu's overlap check; any corruption found while writing stops the writer, and
the tables it had changed in memory are never stored.

On flush, version 3 images first get the *dirty* bit (qemu repairs the refcounts of a
dirty image when it opens it), then refcount blocks, refcount table, L2 tables and L1
are written, the file is flushed, and the header is rewritten clean.

On a transport of fixed size (an NBD export, an iSCSI LUN, a local block device;
``OpenContext.fixed_size``)
the "file" is the whole device: new clusters are taken after the image's last cluster
with a refcount (qemu's image end), an allocation past the device's end fails, and as
the space there may hold old bytes, every new cluster (or subcluster) a write covers
only partly is written whole, the rest zeroes - as around a write into a data file's
cluster. Tables and refcount blocks are always written whole.

Persistent dirty bitmaps (``_bitmaps.py``) are loaded when an image that has consistent
ones is opened for writing. Every write sets its range in the enabled ones; the first
write also marks them *in use* on disk, so an interrupted writer leaves them marked
inconsistent (still listed, their clusters still counted) rather than silently stale. On
flush the bitmaps are written anew at the end of the file (the old data clusters, tables
and directory freed) and the header extension rewritten. :meth:`add_bitmaps` adds
another image's bitmaps the same way (``--bitmaps``).

Compressed clusters (``-c``) are compressed in worker threads by :meth:`compress` (the
encoders are in ``_compress.py``) and packed byte by byte by :meth:`pwrite_compressed`
the way qemu packs them: a stream starts where the previous one ended and may run into
the next cluster when that one is next in the file; every host cluster a stream touches
gets one reference for it.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import itertools
import logging
import os
from array import array
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import attrs
import trio

from ..._errors import (
    ImageError,
    TrioconvError,
    TrioconvIOError,
    UnsupportedError,
    UsageError,
    ZeroesNotSupported,
)
from ...driver import Buffer, Caps, Driver, ExtentKind, Limits
from ...protocols.file import create_file, open_file
from .._common import local_path, same_place
from . import _bitmaps as bm
from . import _codec as codec
from ._codec import COMPRESSED, COPIED, OFFSET_MASK, ZERO_FLAG
from ._compress import compress_clusters, deflate_backend
from ._driver import Qcow2Driver, _inflate_all
from ._driver import open_qcow2 as _open_reader
from ._options import CreateOptions, parse_create_options

if TYPE_CHECKING:
    from ..._open import OpenContext

__all__ = ["CompressedClusters", "Qcow2Writer", "create_qcow2", "open_qcow2_writable"]

log = logging.getLogger("trioconv")

#: Bytes of L2 tables kept in memory at most (and never more than 64 tables, at least 2).
L2_CACHE_BYTES = 4 * 1024 * 1024
L2_CACHE_TABLES = 64
#: Refcount table entries hold a cluster-aligned offset in these bits.
REFTABLE_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
_ZEROS = bytes(1024 * 1024)
#: Seconds a step of a write that has begun to change the image may take at most, even
#: when cancelled: generous for slow storage (a 2 MiB request at 35 KB/s), and what a
#: cancellation waits at worst for a server that stopped answering...
FINISH_TIMEOUT = 60.0
#: ... plus a second for every this many bytes the step sends: a large run of zero bytes
#: (into a version 2 image, which cannot mark clusters as zeroes) on slow storage is slow
#: but alive.
FINISH_BYTES_PER_SECOND = 1024 * 1024
#: Extended L2 subcluster bitmaps: every subcluster allocated / every one reads as zeroes.
ALL_ALLOC = 0xFFFF_FFFF
ALL_ZEROES = 0xFFFF_FFFF << 32


class _GrowingFile(Driver):
    """The transport, with a size that includes the clusters allocated but not yet written.

    The reader clips host reads at its child's size; the writer allocates past the end
    of the file, so it raises :attr:`end` as it goes. A local file reads zeroes past its
    end, which is exactly what a newly allocated, not yet written cluster holds.
    """

    name = "qcow2-file"

    def __init__(self, child: Driver) -> None:
        self.child = child
        self.location = child.location
        self.end = child.size
        #: The end of the file as written: its size when opened, or the end of the
        #: furthest write since.
        self.written = child.size

    @property
    def size(self) -> int:
        return max(self.child.size, self.end)

    @property
    def caps(self) -> Caps:
        return self.child.caps

    async def preadinto(self, offset: int, buf: memoryview) -> None:
        await self.child.preadinto(offset, buf)

    async def pwrite(self, offset: int, data: Buffer) -> None:
        await self.child.pwrite(offset, data)
        self.end = max(self.end, offset + memoryview(data).nbytes)
        self.written = max(self.written, offset + memoryview(data).nbytes)

    async def pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
    ) -> None:
        await self.child.pwrite_zeroes(offset, length, may_unmap=may_unmap, fast=fast)
        self.written = max(self.written, min(offset + length, self.child.size))

    async def discard(self, offset: int, length: int) -> None:
        await self.child.discard(offset, length)

    async def flush(self) -> None:
        await self.child.flush()

    async def aclose(self) -> None:
        pass  # the transport belongs to the opener


def _zero_runs(values: list[int], base: int) -> list[tuple[int, int]]:
    """The runs of zeroes in ``values`` as ``(base + index, length)``."""
    runs: list[tuple[int, int]] = []
    start = -1
    for i, value in enumerate(values):
        if value == 0:
            if start < 0:
                start = i
        elif start >= 0:
            runs.append((base + start, i - start))
            start = -1
    if start >= 0:
        runs.append((base + start, len(values) - start))
    return runs


@attrs.define(eq=False)
class _L2:
    """A cached L2 table: where it lives, its entries, and whether the disk copy is stale."""

    host: int
    table: array[int]
    dirty: bool = False
    raw: bytes | None = None

    def touch(self) -> None:
        self.dirty = True
        self.raw = None

    def encoded(self) -> bytes:
        if self.raw is None:
            self.raw = codec.encode_table(self.table)
        return self.raw


@attrs.frozen
class _Fill:
    """A region (a whole cluster, or with extended L2 one subcluster) whose old content
    must be kept around the bytes a write puts into it.

    ``entry`` is the old L2 entry (a compressed cluster is inflated); with ``copy``,
    its host cluster is shared with a snapshot and the old content is read from there
    (with extended L2, ``bitmap`` is the old subcluster bitmap: subclusters it does
    not allocate read as zeroes, or as the backing image); otherwise the old content is
    the backing image's when ``from_backing``, else zeroes.
    """

    start: int
    length: int
    entry: int
    from_backing: bool
    copy: bool = False
    bitmap: int = 0


@attrs.frozen
class _Run:
    """One host write a guest write turns into.

    ``fill`` is set when the written bytes only partly cover a region that must be
    written whole (see :class:`_Fill`). ``waits`` are the fills of earlier writes into
    the same regions, which must land first.
    """

    guest: int
    length: int
    host: int
    fill: _Fill | None = None
    waits: tuple[trio.Event, ...] = ()
    done: trio.Event | None = None


def _bytes_of(runs: list[_Run]) -> int:
    """Bytes the host writes of ``runs`` send (a fill's region counts whole)."""
    return sum(max(run.length, run.fill.length if run.fill is not None else 0) for run in runs)


@attrs.define(eq=False)
class CompressedClusters:
    """What :meth:`Qcow2Writer.compress` prepares: per cluster, compressed or not, and bytes."""

    offset: int
    clusters: tuple[tuple[bool, bytes], ...]


class Qcow2Writer(Qcow2Driver):
    """A qcow2 image opened for writing. Made by :func:`open_qcow2_writable`.

    Reads, block status and compressed-cluster decoding are the reader's; this class
    serves the reader its L2 tables from the write cache and adds allocation.
    """

    name = "qcow2"

    def __init__(
        self,
        child: _GrowingFile,
        info: codec.ImageInfo,
        l1: array[int],
        reftable: array[int],
        *,
        backing: Driver | None = None,
        data: Driver | None = None,
        fixed_size: bool = False,
    ) -> None:
        super().__init__(child, info, l1, data=data, backing=backing)
        self.file = child
        #: Guest data lives in an external data file, at host offset == guest offset.
        self._external = self._data is not child
        #: ... which must stay a valid raw image of the guest (``data_file_raw``).
        self._raw = self._external and bool(
            info.header.autoclear_features & codec.Autoclear.DATA_FILE_RAW
        )
        h = info.header
        #: Clusters were mapped before any write (``preallocation=metadata`` or more), as
        #: qemu tells: its first L1 entry is set. Their bytes are the file's own, so
        #: the image reads as zeroes only where the file does (see :attr:`caps`).
        self._preallocated = h.l1_size > 0 and bool(l1[0] & OFFSET_MASK)
        self._cs = h.cluster_size
        self._bits = h.cluster_bits
        self._order = h.refcount_order
        self._rpb = (self._cs * 8) >> h.refcount_order  # refcounts per block
        self._refmax = (1 << (1 << h.refcount_order)) - 1
        self._reftable = reftable
        self._refblocks: dict[int, array[int]] = {}
        self._dirty_refblocks: set[int] = set()
        self._reftable_dirty = False
        self._l1_dirty = False
        self._header_dirty = False
        self._dirty_on_disk = False
        self._l2: collections.OrderedDict[int, _L2] = collections.OrderedDict()
        self._l2_max = max(2, min(L2_CACHE_TABLES, L2_CACHE_BYTES // self._cs))
        self._end = -(-child.size // self._cs) * self._cs
        child.end = max(child.end, self._end)
        #: The device's size when the transport cannot grow (see :meth:`_find_end`).
        self._limit: int | None = child.child.size if fixed_size else None
        self._free_byte_offset = 0
        self._data_end = 0  # the end of the last cluster a guest write went to
        #: The lowest host cluster that may have refcount 0 below ``_end`` (qemu's
        #: ``free_cluster_index``): freed clusters are taken again from there.
        self._free_index = 0
        #: Operations (reads and writes) in flight, by the sequence number they started
        #: with, and the next number. A cluster freed while any is in flight keeps its
        #: reference in ``_deferred`` until they are done: one of them may still read or
        #: write its old bytes, so it must not be handed out again before.
        self._ops: set[int] = set()
        self._op_seq = 0
        self._deferred: list[tuple[int, int, int]] = []
        #: Freed clusters are discarded (until the storage says it cannot).
        self._discards = child.caps.trim or child.caps.zeroes
        self._pending: dict[int, trio.Event] = {}
        self._lock = trio.Lock()
        self._failed = False
        self._zstd = h.compression_type == codec.CompressionType.ZSTD
        self._ext = h.extended_l2
        self._sc = self.layout.subcluster_size
        #: Entries per L2 table slot: 2 with extended L2 (entry, subcluster bitmap).
        self._step = 2 if self._ext else 1
        #: Persistent dirty bitmaps kept up to date (loaded when the image had some).
        self._bitmaps: list[bm.Bitmap] = []
        #: Where the bitmap directory is stored now: (offset, size), or None.
        self._bitmap_dir: tuple[int, int] | None = None
        #: The bitmaps changed since they were stored (and the header says so on disk).
        self._bitmaps_changed = False
        #: Host clusters of the image's metadata when it was opened (sorted; see
        #: :func:`_metadata_clusters`), those of them freed since, and the tables made
        #: since (sorted): no guest data may be written over any in use.
        self._meta: array[int] = array("Q")
        self._meta_freed: set[int] = set()
        self._meta_added: list[int] = []

    # -- contract ---------------------------------------------------------------------
    @property
    def limits(self) -> Limits:
        return Limits(request_alignment=1, cluster_size=self._cs)

    async def preadinto(self, offset: int, buf: memoryview) -> None:
        with self._op():  # the clusters it reads stay where they are until it is done
            await super().preadinto(offset, buf)

    @property
    def caps(self) -> Caps:
        return Caps(
            writable=True,
            zeroes=True,
            block_status=True,
            # As qemu's qcow2_has_zero_init: a preallocated image on a device (or a
            # data file) that holds old bytes does not read as zeroes.
            zero_init=self.backing is None
            and (not self._preallocated or self._data.caps.zero_init),
            compress=not self._external,
        )

    def _corrupt(self, problem: str, offset: int | None = None) -> TrioconvIOError:
        """The reader's error for a corrupt image - and the writer stops: the tables in
        memory may be half changed by the operation that found the corruption (a
        refcount dropped below zero partway through a free), so they are not stored;
        the image keeps the tables it had on disk (see :meth:`_check_usable`)."""
        self._failed = True
        return super()._corrupt(problem, offset)

    def _check_range(self, what: str, offset: int, length: int) -> None:
        if self._closed:
            raise TrioconvIOError(f"{self.location}: image is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TrioconvIOError(
                f"{self.location}: {what} of {length} bytes at {offset} is outside the image "
                f"({self.size} bytes)",
                offset=offset,
            )

    def _check_usable(self) -> None:
        """Refuse a write or flush once a write has failed halfway (see ``_finishing``)."""
        if self._failed:
            raise TrioconvIOError(
                f"{self.location}: an earlier write failed halfway, so the image takes no "
                "more writes: its tables are not stored (it keeps those it had on disk)"
            )

    @contextlib.contextmanager
    def _finishing(self, what: str, nbytes: int = 0) -> Iterator[None]:
        """Run a step of a write that must not stop halfway, shielded from cancellation.

        A write allocates clusters (the tables point at them) and then sends their
        bytes. Cancelled between the two, it would leave entries pointing at clusters
        never written, which the next flush would store. So once a write has the lock,
        its steps finish even when it is cancelled - the cancellation takes effect at
        its next checkpoint. Each step may take :data:`FINISH_TIMEOUT` seconds, and one
        more for each :data:`FINISH_BYTES_PER_SECOND` of the ``nbytes`` it sends (a local
        write takes milliseconds; one to a server that stopped answering, forever). A
        step that fails or does not finish in that time leaves the writer failed: it
        takes no more writes, and its tables are not stored (:meth:`_check_usable`).
        """
        limit = FINISH_TIMEOUT + nbytes / FINISH_BYTES_PER_SECOND
        with trio.CancelScope(shield=True, deadline=trio.current_time() + limit) as scope:
            yield
        if scope.cancelled_caught:
            self._failed = True
            raise TrioconvIOError(f"{self.location}: {what} did not finish within {limit:g} s")

    def _set_end(self, end: int, what: str) -> None:
        if self._limit is not None and end > self._limit:
            self._failed = True  # the tables must not point at clusters never written
            device = self.file.child  # its location carries no password
            kind = {"nbd": "NBD export", "iscsi": "iSCSI LUN"}.get(device.name, "device")
            raise TrioconvIOError(
                f"{device.location}: no space left in the {kind} for {what}: the image needs "
                f"{end} bytes, the {kind} has {self._limit}",
                offset=self._end,
            )
        self._end = end
        self.file.end = max(self.file.end, end)

    @property
    def _fixed(self) -> bool:
        """The transport cannot grow, and guest data lives there: new data clusters may
        hold old bytes. (An external data file is a file of the guest's size.)"""
        return self._limit is not None and not self._external

    async def _find_end(self) -> None:
        """Start allocating after the last host cluster with a refcount (qemu's image
        end), not at the end of a fixed-size transport."""
        for ri in range(len(self._reftable) - 1, -1, -1):
            blk = await self._refblock(ri)
            if blk is None:
                continue
            for i in range(len(blk) - 1, -1, -1):
                if blk[i]:
                    self._end = (ri * self._rpb + i + 1) * self._cs
                    return
        raise self._corrupt("no host cluster has a refcount")

    def _whole(self, pos: int, hi: int, start: int, length: int) -> bool:
        """Whether a write of ``[pos, hi)`` covers the region ``[start, start + length)``
        whole - up to the image's end, or on a fixed-size transport all of it."""
        end = start + length
        return pos <= start and hi >= (end if self._fixed else min(end, self.size))

    # -- refcounts --------------------------------------------------------------------
    async def _refblock(self, ri: int) -> array[int] | None:
        """The refcount block of range ``ri``, loaded when needed; None when it has none."""
        blk = self._refblocks.get(ri)
        if blk is not None:
            return blk
        if ri >= len(self._reftable):
            return None
        host = self._reftable[ri] & REFTABLE_OFFSET_MASK
        if not host:
            return None
        if host % self._cs or host + self._cs > self.file.size:
            raise self._corrupt(
                f"invalid refcount block offset {host:#x} in refcount table entry {ri}", host
            )
        raw = await self.file.pread(host, self._cs)
        blk = codec.decode_refblock(raw, self._order)
        self._refblocks[ri] = blk
        return blk

    async def _new_refblock(self, ri: int) -> array[int]:
        """Make the refcount block of range ``ri``: one cluster at the end of the file."""
        if ri >= len(self._reftable):
            await self._grow_reftable(ri)
            # Growing took clusters, which may have made this very block already.
            made = self._refblocks.get(ri)
            if made is not None:
                return made
        host = self._end
        self._set_end(host + self._cs, "a refcount block")
        blk = codec.refcount_array(self._order, self._rpb)
        self._refblocks[ri] = blk
        self._dirty_refblocks.add(ri)
        self._reftable[ri] = host
        self._reftable_dirty = True
        self._claim(host, 1)
        await self._add_refs(host >> self._bits, 1, 1)
        return blk

    async def _grow_reftable(self, ri: int) -> None:
        """Move the refcount table to the end of the file, large enough for ``ri``."""
        entries = max(ri + 1, 2 * len(self._reftable))
        clusters = -(-entries * 8 // self._cs)
        if clusters * self._cs > codec.MAX_REFTABLE_BYTES:
            raise TrioconvIOError(
                f"{self.location}: the refcount table would exceed "
                f"{codec.MAX_REFTABLE_BYTES} bytes (the image file is too large for its "
                "cluster size)"
            )
        h = self.header
        old_host, old_clusters = h.refcount_table_offset, h.refcount_table_clusters
        host = self._end
        self._set_end(host + clusters * self._cs, "a new refcount table")
        self._reftable.extend(array("Q", bytes(clusters * self._cs - len(self._reftable) * 8)))
        self.header = attrs.evolve(h, refcount_table_offset=host, refcount_table_clusters=clusters)
        self._header_dirty = self._reftable_dirty = True
        self._claim(host, clusters)
        await self._add_refs(host >> self._bits, clusters, 1)
        await self._add_refs(old_host >> self._bits, old_clusters, -1)

    async def _add_refs(self, first: int, count: int, delta: int) -> None:
        """Add ``delta`` to the refcounts of ``count`` clusters from cluster ``first``;
        clusters that drop to 0 are discarded (see :meth:`_discard_freed`)."""
        freed: list[tuple[int, int]] = []
        pos, stop = first, first + count
        while pos < stop:
            ri, i = divmod(pos, self._rpb)
            n = min(stop - pos, self._rpb - i)
            blk = await self._refblock(ri)
            if blk is None:
                if delta < 0:
                    raise self._corrupt(f"freeing cluster {pos} that has no refcount block")
                blk = await self._new_refblock(ri)
            if n == 1:
                value = blk[i] + delta
                if not 0 <= value <= self._refmax:
                    raise self._refcount_error(pos, value)
                blk[i] = value
                if not value:
                    self._now_free(pos, 1)
                    freed.append((pos, 1))
            else:
                part = blk[i : i + n]
                if delta > 0 and part.count(0) == n:
                    blk[i : i + n] = array(blk.typecode, [delta]) * n
                else:
                    values = [v + delta for v in part]
                    bad = next((v for v in values if not 0 <= v <= self._refmax), None)
                    if bad is not None:
                        raise self._refcount_error(pos, bad)
                    blk[i : i + n] = array(blk.typecode, values)
                    if delta < 0 and 0 in values:
                        self._now_free(pos + values.index(0), n - values.index(0))
                        freed += _zero_runs(values, pos)
            self._dirty_refblocks.add(ri)
            pos += n
        if freed:
            self._release_meta(freed)
            await self._discard_freed(freed)

    async def _discard_freed(self, runs: list[tuple[int, int]]) -> None:
        """Give host clusters that just dropped to refcount 0 back to the storage.

        As qemu passes the discard of freed data clusters down to the file: when
        ``-n`` reuses an image, its old clusters are freed and become holes again
        instead of keeping the old bytes, unreferenced, in the file. (Only where the
        storage does it cheaply: TRIM/UNMAP, or a hole punched; otherwise the clusters
        stay as they are, free for reuse.) It runs under the lock, before a freed
        cluster can be handed out again.
        """
        if not self._discards:
            return
        end = self.file.child.size
        merged: list[tuple[int, int]] = []
        for first, count in runs:
            if merged and merged[-1][0] + merged[-1][1] == first:
                merged[-1] = (merged[-1][0], merged[-1][1] + count)
            else:
                merged.append((first, count))
        caps = self.file.caps
        for first, count in merged:
            offset = first << self._bits
            length = min(count << self._bits, end - offset)
            if length <= 0:
                continue
            try:
                if caps.trim:
                    await self.file.discard(offset, length)
                else:
                    await self.file.pwrite_zeroes(offset, length, may_unmap=True, fast=True)
            except (UnsupportedError, ZeroesNotSupported):
                self._discards = False
                return

    def _claim(self, host: int, count: int) -> None:
        """Clusters from ``host`` now hold new metadata (an L2 table, a refcount block or
        table): no guest data may go there (see :meth:`_check_not_metadata`)."""
        first = host >> self._bits
        for c in range(first, first + count):
            self._meta_freed.discard(c)
            bisect.insort(self._meta_added, c)

    def _release_meta(self, runs: list[tuple[int, int]]) -> None:
        """Clusters that dropped to refcount 0 hold no metadata any more: they may be
        given out for data again."""
        for first, count in runs:
            stop = first + count
            i = bisect.bisect_left(self._meta, first)
            while i < len(self._meta) and self._meta[i] < stop:
                self._meta_freed.add(self._meta[i])
                i += 1
            i = bisect.bisect_left(self._meta_added, first)
            while i < len(self._meta_added) and self._meta_added[i] < stop:
                del self._meta_added[i]

    def _check_not_metadata(self, host: int, length: int, *, freeing: bool = False) -> None:
        """Refuse a write of guest data over the image's metadata, as qemu's overlap
        check does: an L2 entry of a corrupt image may map a data cluster onto the
        header, an L1, L2 or refcount table, or a refcount block, or refcounts that
        are missing may let a metadata cluster be handed out for data. The write fails
        before it starts, the image gets no new tables (see :meth:`_write_runs`) and the
        metadata stays as it was. Freeing such a data cluster (``freeing``) is refused
        too: it would free - and discard - the metadata under it."""
        if not length:
            return
        doing, verb = ("freeing", "free") if freeing else ("a write to", "overwrite")
        first, last = host >> self._bits, (host + length - 1) >> self._bits
        for seq, freed in ((self._meta, self._meta_freed), (self._meta_added, set())):
            i = bisect.bisect_left(seq, first)
            while i < len(seq) and seq[i] <= last:
                if seq[i] not in freed:
                    at = seq[i] << self._bits
                    raise self._corrupt(
                        f"{doing} the data cluster at host offset {at:#x} would "
                        f"{verb} the image's metadata there",
                        at,
                    )
                i += 1

    def _now_free(self, first: int, count: int) -> None:
        """Clusters from ``first`` (some of the next ``count``) dropped to refcount 0."""
        self._free_index = min(self._free_index, first)
        fbo = self._free_byte_offset >> self._bits
        if self._free_byte_offset and first <= fbo < first + count:
            # Compressed streams must not go on into a cluster that is free again.
            self._free_byte_offset = 0

    async def _unref(self, first: int, count: int) -> None:
        """Drop one reference from ``count`` clusters from cluster ``first`` - now, or
        once the operations in flight are done (see ``_ops``) if that frees any."""
        if self._ops:
            for c in range(first, first + count):
                if await self._refcount(c) <= 1:
                    self._deferred.append((self._op_seq, first, count))
                    return
        await self._add_refs(first, count, -1)

    async def _release_deferred(self) -> None:
        """Drop the references :meth:`_unref` held back that nothing in flight still
        needs (under the lock)."""
        if not self._deferred:
            return
        oldest = min(self._ops, default=self._op_seq)
        held, self._deferred = self._deferred, []
        ready: list[tuple[int, int]] = []
        for seq, first, count in held:
            if oldest < seq:
                self._deferred.append((seq, first, count))
            else:
                ready.append((first, count))
        # Zeroing a large range frees its clusters one by one; released as runs of
        # neighbours, they are discarded in one call per run, not one per cluster.
        # (A cluster held twice - two compressed streams in it - stays two releases.)
        ready.sort()
        runs: list[tuple[int, int]] = []
        for first, count in ready:
            if runs and runs[-1][0] + runs[-1][1] == first:
                runs[-1] = (runs[-1][0], runs[-1][1] + count)
            else:
                runs.append((first, count))
        for first, count in runs:
            await self._add_refs(first, count, -1)

    @contextlib.contextmanager
    def _op(self) -> Iterator[None]:
        """Mark a read or write in flight (see ``_ops``)."""
        seq = self._op_seq
        self._op_seq += 1
        self._ops.add(seq)
        try:
            yield
        finally:
            self._ops.discard(seq)

    def _refcount_error(self, cluster: int, value: int) -> TrioconvIOError:
        if value < 0:
            return self._corrupt(f"refcount of host cluster {cluster} would drop below zero")
        return TrioconvIOError(
            f"{self.location}: refcount of host cluster {cluster} would exceed the "
            f"maximum {self._refmax} of {1 << self._order}-bit refcounts",
            offset=cluster << self._bits,
        )

    async def _refcount(self, cluster: int) -> int:
        """The refcount of host cluster number ``cluster``."""
        ri, i = divmod(cluster, self._rpb)
        blk = await self._refblock(ri)
        return 0 if blk is None else blk[i]

    async def _shared(self, host: int, what: str) -> bool:
        """Whether the host cluster at ``host`` (in use by the active layer, its L1 or
        L2 entry without the COPIED flag) is shared with a snapshot: its refcount is
        above 1. Refcount 0 means the image is corrupt."""
        count = await self._refcount(host >> self._bits)
        if not count:
            raise self._corrupt(f"{what} at {host:#x} in use but its refcount is 0", host)
        return count > 1

    async def _own_l2(self, index: int, t: _L2) -> None:
        """Make the L2 table of L1 entry ``index`` the active layer's own before it changes.

        A table shared with a snapshot (no COPIED flag, refcount above 1) is copied on
        write, as qemu does: the copy goes to a new cluster (the in-memory table simply
        moves there), L1 points at it with COPIED, and the old table loses the active
        layer's reference. The data clusters it maps keep their refcounts - both tables
        now map them. A table with refcount 1 just gets its missing COPIED flag.
        """
        entry = self._l1[index]
        if entry & COPIED:
            return
        if await self._shared(t.host, "L2 table"):
            old = t.host
            t.host = await self._alloc_clusters(1)
            self._claim(t.host, 1)
            await self._unref(old >> self._bits, 1)
            t.dirty = True  # the table's bytes, unchanged, now go to the new cluster
        self._l1[index] = t.host | COPIED
        self._l1_dirty = True

    async def _own_data(self, t: _L2, i: int) -> bool:
        """Whether the active layer may write the data cluster of slot ``i`` of ``t`` (a
        mapped, normal entry) in place: it has COPIED, or refcount 1 (then it gets the
        flag). False: it is shared with a snapshot and must be copied on write."""
        entry = t.table[i]
        if entry & COPIED or self._external:
            return True
        host = entry & OFFSET_MASK
        if await self._shared(host, "data cluster"):
            return False
        t.table[i] = entry | COPIED
        t.touch()
        return True

    async def _alloc_clusters(self, count: int, *, ref: bool = True) -> int:
        """Take ``count`` contiguous clusters; their host offset. For metadata and other
        clusters written whole (see :meth:`_alloc_run`)."""
        return (await self._alloc_run(count, ref=ref))[0]

    async def _alloc_run(self, count: int, *, ref: bool = True) -> tuple[int, bool]:
        """Take ``count`` contiguous clusters, as qemu does: the first run of free ones
        (refcount 0) from the lowest free cluster on, which may reach past the end of
        the file, else at the end. Returns their host offset, and whether they may hold
        old bytes (taken below the end, so the parts of them a write leaves out must be
        written too)."""
        await self._release_deferred()
        bits = self._bits
        first = await self._find_free(count)
        end = self._end >> bits
        if first is None:
            first = end
        if first + count > end:
            self._set_end((first + count) << bits, f"{count} more cluster{'s' * (count > 1)}")
        if self._free_index == first:
            self._free_index = first + count
        if ref:
            await self._add_refs(first, count, 1)
        return first << bits, first < end

    async def _find_free(self, count: int) -> int | None:
        """The first cluster of the first run of ``count`` free clusters that starts
        below the end of the file (the run may go on past it), or None."""
        rpb = self._rpb
        end = self._end >> self._bits
        c = self._free_index
        first_free: int | None = None
        while c < end:
            ri, i = divmod(c, rpb)
            blk = await self._refblock(ri)
            if blk is not None:
                try:
                    c = ri * rpb + blk.index(0, i)
                except ValueError:
                    c = (ri + 1) * rpb
                    continue
                if c >= end:
                    break
            if first_free is None:
                first_free = c
            used = await self._first_used(c, min(c + count, end))
            if used is None:
                if first_free != c:
                    self._free_index = first_free  # shorter runs stay for later
                return c
            c = used + 1
        self._free_index = end if first_free is None else first_free
        return None

    async def _first_used(self, start: int, stop: int) -> int | None:
        """The first cluster in ``[start, stop)`` with a refcount, or None."""
        c = start
        while c < stop:
            ri, i = divmod(c, self._rpb)
            n = min(stop - c, self._rpb - i)
            blk = await self._refblock(ri)
            if blk is not None:
                part = blk[i : i + n]
                if part.count(0) != n:
                    raw = part.tobytes()
                    return c + (len(raw) - len(raw.lstrip(b"\0"))) // part.itemsize
            c += n
        return None

    async def _alloc_bytes(self, size: int) -> int:
        """Host space for a compressed stream of ``size`` bytes (qemu's ``alloc_bytes``)."""
        cs = self._cs
        offset = self._free_byte_offset
        if offset:
            blk = await self._refblock((offset >> self._bits) // self._rpb)
            if blk is not None and blk[(offset >> self._bits) % self._rpb] >= self._refmax:
                offset = 0
        free = cs - offset % cs if offset else 0
        if not offset or free < size:
            new = await self._alloc_clusters(1, ref=False)
            if offset and -(-offset // cs) * cs == new:
                free += cs
            else:
                offset, free = new, cs
        first = offset >> self._bits
        last = (offset + size - 1) >> self._bits
        await self._add_refs(first, last - first + 1, 1)
        self._free_byte_offset = (offset + size) % cs and offset + size
        return offset

    def _mapped(self, entry: int) -> bool:
        """The L2 entry has a host cluster (offset 0 is one in an external data file,
        where the COPIED bit marks it)."""
        return bool(entry & OFFSET_MASK) or (self._external and bool(entry & COPIED))

    async def _alloc_data(self, guest: int) -> tuple[int, bool]:
        """A host cluster for the guest cluster at ``guest``: in an external data file
        the same offset (not refcounted), else a free one (see :meth:`_alloc_run`)."""
        if self._external:
            return guest, True
        return await self._alloc_run(1)

    async def _free_entry(self, entry: int) -> None:
        """Drop the reference an L2 entry holds (normal, preallocated zero, compressed)."""
        if self._external and not entry & COMPRESSED:
            return  # data file clusters have no refcounts
        if entry & COMPRESSED:
            dec = codec.decode_l2_entry(entry, self.layout)
            start = dec.host_offset & ~511
            end = dec.host_offset + dec.compressed_size
            self._check_not_metadata(start, end - start, freeing=True)
            first, last = start >> self._bits, (end - 1) >> self._bits
            await self._unref(first, last - first + 1)
            return
        host = entry & OFFSET_MASK
        if host:
            self._check_not_metadata(host, self._cs, freeing=True)
            await self._unref(host >> self._bits, 1)

    # -- L2 tables --------------------------------------------------------------------
    async def _get_l2(self, index: int, *, create: bool) -> _L2 | None:
        """The L2 table of L1 entry ``index`` (under the lock); made when ``create``."""
        t = self._l2.get(index)
        if t is not None:
            self._l2.move_to_end(index)
            return t
        host = self._l1[index] & OFFSET_MASK
        if not host and not create:
            return None
        await self._make_room()
        if host:
            if host % self._cs or host + self._cs > self.file.size:
                raise self._corrupt(f"invalid L2 table offset {host:#x} in L1 entry {index}")
            raw = await self.file.pread(host, self._cs)
            t = _L2(host, codec.decode_table(raw), raw=raw)
        else:
            host = await self._alloc_clusters(1)
            self._claim(host, 1)
            t = _L2(host, array("Q", bytes(self._cs)), dirty=True)
            self._l1[index] = host | COPIED
            self._l1_dirty = True
        self._l2[index] = t
        return t

    async def _make_room(self) -> None:
        while len(self._l2) >= self._l2_max:
            _, old = self._l2.popitem(last=False)
            if old.dirty:
                await self._mark_dirty_on_disk()
                await self._write_meta(old.host, old.encoded())
                old.dirty = False

    async def _l2_table(self, index: int) -> tuple[array[int], bytes] | None:
        # The reader's hook: serve tables from the write cache.
        t = self._l2.get(index)
        if t is None:
            if not self._l1[index] & OFFSET_MASK:
                return None
            async with self._lock:
                t = await self._get_l2(index, create=False)
            if t is None:
                return None
        return t.table, t.encoded()

    # -- writing data -----------------------------------------------------------------
    async def pwrite(self, offset: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        self._check_range("write", offset, view.nbytes)
        self._check_usable()
        if not view.nbytes:
            return
        if self._bitmaps:
            await self._touch_bitmaps(offset, view.nbytes)
        with self._op():
            async with self._lock:
                self._check_usable()
                with self._finishing("a write"):
                    runs = await self._allocate(offset, view.nbytes)
            with self._finishing("a write", _bytes_of(runs)):
                await self._write_runs(runs, offset, view)

    async def _write_runs(self, runs: list[_Run], offset: int, view: memoryview | None) -> None:
        """Send the bytes of runs :meth:`_allocate` made for a write at ``offset``:
        ``view``'s, or zero bytes when it is None."""
        try:
            for run in runs:
                if not self._external:
                    self._check_not_metadata(run.host, run.length)
                # The end of the last cluster guest data went to (see _end_file).
                end = -(-(run.host + run.length) // self._cs) * self._cs
                self._data_end = max(self._data_end, end)
                for event in run.waits:
                    await event.wait()
                if view is not None:
                    piece = view[run.guest - offset : run.guest - offset + run.length]
                elif run.fill is not None:
                    piece = memoryview(bytes(run.length))
                else:
                    await self._write_zero_bytes(run.host, run.length)
                    continue
                if run.fill is not None:
                    await self._write_filled(run, piece)
                else:
                    await self._data.pwrite(run.host, piece)
        except BaseException:
            # Failed or cancelled: the tables map clusters that may never have been
            # written, so they are not stored on close (the image on disk keeps the
            # tables it had, never ones that point at nothing).
            self._failed = True
            raise
        finally:
            for run in runs:  # never leave a later writer waiting on a fill that failed
                if run.done is not None:
                    run.done.set()

    async def _write_zero_bytes(self, host: int, length: int) -> None:
        pos, end = host, host + length
        while pos < end:
            k = min(len(_ZEROS), end - pos)
            await self._data.pwrite(pos, memoryview(_ZEROS)[:k])
            pos += k

    def _add_run(self, runs: list[_Run], run: _Run) -> None:
        last = runs[-1] if runs else None
        if (
            last is not None
            and last.fill is None
            and run.fill is None
            and not run.waits
            and last.host + last.length == run.host
        ):
            runs[-1] = attrs.evolve(last, length=last.length + run.length)
        else:
            runs.append(run)

    def _new_runs(
        self, runs: list[_Run], pos: int, stop: int, c_start: int, new: int, recycled: bool
    ) -> None:
        """Runs writing guest ``[pos, stop)`` into the contiguous unallocated clusters
        from ``c_start`` that now map to host ``new``: one run, or when those clusters
        may hold old bytes, a first and last cluster the write covers only in part
        written whole with zeroes around it."""
        cs = self._cs
        last = c_start + (stop - 1 - c_start) // cs * cs
        edges = (
            []
            if not recycled
            else [c for c in dict.fromkeys((c_start, last)) if not self._whole(pos, stop, c, cs)]
        )
        at = pos
        for c in [*edges, None]:
            hi = stop if c is None else c
            if at < hi:
                self._add_run(runs, _Run(at, hi - at, new + at - c_start))
            if c is None:
                break
            lo, c_hi = max(at, c), min(stop, c + cs)
            host = new + c - c_start
            waits, done = self._new_fill(host)
            fill = _Fill(c, cs, 0, False)
            self._add_run(runs, _Run(lo, c_hi - lo, host + lo - c, fill, waits, done))
            at = c_hi

    def _new_fill(self, host: int) -> tuple[tuple[trio.Event, ...], trio.Event]:
        """Register a fill of the region at ``host``: (older fills there, its own event)."""
        old = self._pending.get(host)
        done = self._pending[host] = trio.Event()
        return ((old,) if old is not None else ()), done

    async def _allocate(self, offset: int, length: int) -> list[_Run]:
        """Map guest ``[offset, offset + length)`` to host runs, allocating what is missing."""
        cs, bits, span = self._cs, self._bits, self._table_span
        end = offset + length
        runs: list[_Run] = []
        pos = offset
        # No backing file, data file, subclusters or old device bytes: an unallocated
        # cluster needs nothing around a partial write (the file reads as zeroes there).
        plain = not (self._ext or self._external or self._fixed or self.backing is not None)
        while pos < end:
            index = pos // span
            t = await self._get_l2(index, create=True)
            assert t is not None
            await self._own_l2(index, t)
            base = index * span
            stop = min(end, base + span)
            while pos < stop:
                i = (pos - base) >> bits
                c_start = base + (i << bits)
                hi = min(stop, c_start + cs)
                if plain:
                    j = ((stop - 1 - base) >> bits) + 1
                    if j - i > 1 and t.table[i:j].count(0) == j - i:
                        # A stretch of never-written clusters in an image of its own:
                        # contiguous clusters, one table update, one host run (and
                        # zeroes around its ends when the clusters held old bytes).
                        new, recycled = await self._alloc_run(j - i)
                        first = new | COPIED
                        t.table[i:j] = array("Q", range(first, first + ((j - i) << bits), cs))
                        t.touch()
                        self._new_runs(runs, pos, stop, c_start, new, recycled)
                        pos = stop
                        continue
                if self._ext:
                    await self._allocate_ext(runs, t, i, c_start, pos, hi)
                    pos = hi
                    continue
                entry = t.table[i]
                host = entry & OFFSET_MASK
                normal = self._mapped(entry) and not entry & (COMPRESSED | ZERO_FLAG)
                if normal and not await self._own_data(t, i):
                    # Shared with a snapshot: a new cluster, with the old content
                    # around a partial write; the old one loses our reference.
                    whole = self._whole(pos, hi, c_start, cs)
                    new = await self._alloc_clusters(1)
                    await self._free_entry(entry)
                    t.table[i] = new | COPIED
                    t.touch()
                    fill: _Fill | None = None
                    waits: tuple[trio.Event, ...] = ()
                    done: trio.Event | None = None
                    if not whole:
                        fill = _Fill(c_start, cs, entry, False, copy=True)
                        waits, done = self._new_fill(new)
                    run = _Run(pos, hi - pos, new + pos - c_start, fill, waits, done)
                elif normal:
                    pending = self._pending.get(host)
                    run = _Run(
                        pos,
                        hi - pos,
                        host + pos - c_start,
                        waits=(pending,) if pending is not None else (),
                    )
                elif (
                    entry & ZERO_FLAG
                    and host
                    and not self._external
                    and await self._refcount(host >> bits) == 1
                ):
                    # A preallocated zero cluster of our own: written in place, as qemu
                    # does, with zeroes around a partial write (its old bytes are stale).
                    t.table[i] = host | COPIED
                    t.touch()
                    fill = None
                    waits = ()
                    done = None
                    if not self._whole(pos, hi, c_start, cs):
                        fill = _Fill(c_start, cs, entry, False)
                        waits, done = self._new_fill(host)
                    run = _Run(pos, hi - pos, host + pos - c_start, fill, waits, done)
                else:
                    whole = self._whole(pos, hi, c_start, cs)
                    from_backing = self.backing is not None and not entry & ZERO_FLAG
                    # A data file's cluster, or a new one on a fixed-size transport, may
                    # hold old bytes: zeroes go around the write.
                    new, recycled = await self._alloc_data(c_start)
                    old_matters = entry & COMPRESSED or from_backing or self._fixed or recycled
                    if entry & (COMPRESSED | ZERO_FLAG):
                        await self._free_entry(entry)
                    t.table[i] = new | COPIED
                    t.touch()
                    fill = None
                    waits = ()
                    done = None
                    if old_matters and not whole:
                        fill = _Fill(c_start, cs, entry, from_backing)
                        waits, done = self._new_fill(new)
                    run = _Run(pos, hi - pos, new + pos - c_start, fill, waits, done)
                self._add_run(runs, run)
                pos = hi
        return runs

    async def _allocate_ext(
        self, runs: list[_Run], t: _L2, i: int, c_start: int, pos: int, hi: int
    ) -> None:
        """:meth:`_allocate` for one cluster of an image with extended L2 entries.

        As qemu does: a cluster gets a host cluster on its first write; the subclusters
        a write touches become allocated (and stop being zero), and where it covers one
        only partly, the rest of that subcluster is written with what it read as
        before (zeroes, or the backing image's bytes).
        """
        cs, sc = self._cs, self._sc
        entry, bitmap = t.table[2 * i], t.table[2 * i + 1]
        host = entry & OFFSET_MASK
        shared = (
            self._mapped(entry) and not entry & COMPRESSED and not await self._own_data(t, 2 * i)
        )
        if entry & COMPRESSED or shared:
            # A compressed cluster becomes a normal one, all of it allocated; so does
            # one shared with a snapshot, copied with what each subcluster read as.
            whole = self._whole(pos, hi, c_start, cs)
            new = await self._alloc_clusters(1)
            await self._free_entry(entry)
            t.table[2 * i], t.table[2 * i + 1] = new | COPIED, ALL_ALLOC
            t.touch()
            fill: _Fill | None = None
            waits: tuple[trio.Event, ...] = ()
            done: trio.Event | None = None
            if not whole:
                fill = _Fill(c_start, cs, entry, False, copy=shared, bitmap=bitmap)
                waits, done = self._new_fill(new)
            self._add_run(runs, _Run(pos, hi - pos, new + pos - c_start, fill, waits, done))
            return
        fresh = not self._mapped(entry)
        recycled = False
        if fresh:
            host, recycled = await self._alloc_data(c_start)
            t.table[2 * i] = host | COPIED
        first, last = (pos - c_start) // sc, (hi - 1 - c_start) // sc
        alloc, zero = bitmap & ALL_ALLOC, bitmap >> 32
        # Partly written subclusters that are not allocated yet need their old content.
        fills: dict[int, _Fill] = {}
        for s in {first, last}:
            s_start = c_start + s * sc
            if self._whole(pos, hi, s_start, sc) or alloc >> s & 1:
                continue
            from_backing = self.backing is not None and not zero >> s & 1
            if fresh and not from_backing and not recycled and not self._fixed:
                continue  # a new cluster at the end of the image reads as zeroes already
            fills[s] = _Fill(s_start, sc, entry, from_backing)
        mask = ((1 << (last + 1)) - 1) ^ ((1 << first) - 1)
        new_bitmap = (alloc | mask) | ((zero & ~mask) << 32)
        if fresh or new_bitmap != bitmap:
            t.table[2 * i + 1] = new_bitmap
            t.touch()
        s = first
        while s <= last:
            s_start = c_start + s * sc
            lo, s_hi = max(pos, s_start), min(hi, s_start + sc)
            fill = fills.get(s)
            if fill is not None:
                waits, done = self._new_fill(host + s * sc)
                self._add_run(runs, _Run(lo, s_hi - lo, host + lo - c_start, fill, waits, done))
                s += 1
                continue
            # A run of subclusters without fills: one write, after the fills pending there.
            t_end = s
            while t_end + 1 <= last and t_end + 1 not in fills:
                t_end += 1
            r_hi = min(hi, c_start + (t_end + 1) * sc)
            waits = tuple(
                ev
                for k in range(s, t_end + 1)
                if (ev := self._pending.get(host + k * sc)) is not None
            )
            self._add_run(runs, _Run(lo, r_hi - lo, host + lo - c_start, waits=waits))
            s = t_end + 1

    async def _write_filled(self, run: _Run, piece: memoryview) -> None:
        """Write a whole region: its old content with ``piece`` laid over it."""
        fill = run.fill
        assert fill is not None
        cs = self._cs
        n = min(fill.length, self.size - fill.start)
        # On a fixed-size transport the region's host bytes past the image's end are
        # zeroed too: they may hold old bytes.
        buf = bytearray(fill.length if self._fixed else n)
        whole_view = memoryview(buf)
        view = whole_view[:n]
        region_host = run.host - (run.guest - fill.start)
        try:
            if fill.entry & COMPRESSED:
                dec = codec.decode_l2_entry(fill.entry, self.layout)
                raw = await self.file.pread(dec.host_offset, dec.compressed_size)
                (plain,) = _inflate_all([raw], self._zstd, cs)
                if plain is None:
                    raise self._corrupt(
                        f"compressed cluster at guest offset {fill.start:#x} could not be "
                        "decompressed",
                        dec.host_offset,
                    )
                view[:] = plain[:n]
            elif fill.copy:
                await self._read_shared(fill, view)
            elif fill.from_backing:
                await self._read_backing(fill.start, view)
            at = run.guest - fill.start
            view[at : at + run.length] = piece
            await self._data.pwrite(region_host, whole_view)
        finally:
            view.release()
            whole_view.release()
            if run.done is not None:
                run.done.set()
                if self._pending.get(region_host) is run.done:
                    del self._pending[region_host]

    async def _read_shared(self, fill: _Fill, view: memoryview) -> None:
        """The old content of a cluster copied on write: its host cluster's bytes; with
        extended L2, what each subcluster read as (zeroes, the backing image's)."""
        await self._read_host(self._data, fill.entry & OFFSET_MASK, view)
        if not self._ext:
            return
        sc = self._sc
        for s in range(-(-view.nbytes // sc)):
            if fill.bitmap >> s & 1:
                continue
            part = view[s * sc : (s + 1) * sc]
            if self.backing is not None and not fill.bitmap >> (32 + s) & 1:
                await self._read_backing(fill.start + s * sc, part)
            else:
                part[:] = bytes(part.nbytes)

    # -- zeroes -----------------------------------------------------------------------
    async def pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
    ) -> None:
        self._check_range("write zeroes", offset, length)
        self._check_usable()
        if not length:
            return
        if self._bitmaps:
            await self._touch_bitmaps(offset, length)
        with self._op():
            await self._pwrite_zeroes(offset, length, may_unmap=may_unmap, fast=fast)

    async def _pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool, fast: bool
    ) -> None:
        if self._raw:
            # The data file must read as the guest does: zero it there first (qemu too).
            await self._zero_data_file(offset, length, may_unmap=may_unmap, fast=fast)
        # The unit the tables can mark as zeroes: a cluster, or a subcluster.
        cs = self._sc
        end = offset + length
        first = -(-offset // cs) * cs
        last = end if end == self.size else end // cs * cs
        partial: list[tuple[int, int]] = []
        if first > last:  # inside one cluster
            partial.append((offset, length))
            first = last = offset
        else:  # (across one cluster edge with none whole inside: two partial pieces)
            if offset < first:
                partial.append((offset, first - offset))
            if last < end:
                partial.append((last, end - last))
        async with self._lock:
            self._check_usable()
            with self._finishing("a write of zeroes"):
                runs = await self._zero_locked(partial, first, last, may_unmap, fast)
        with self._finishing("a write of zeroes", sum(_bytes_of(a) for _, a in runs)):
            for start, allocated in runs:
                await self._write_runs(allocated, start, None)

    async def _zero_locked(
        self, partial: list[tuple[int, int]], first: int, last: int, may_unmap: bool, fast: bool
    ) -> list[tuple[int, list[_Run]]]:
        """The table work of a write of zeroes, under the lock: whole clusters marked
        zero, and the runs of zero bytes to write for the rest."""
        cs = self._sc  # the unit the tables can mark as zeroes
        writes: list[tuple[int, int]] = []
        whole: list[tuple[int, int]] = []
        runs: list[tuple[int, list[_Run]]] = []
        for start, n in partial:
            if await self._reads_as_zero(start):
                continue
            if await self._rest_reads_zero(start, n):
                c0 = start // cs * cs
                whole.append((c0, min(c0 + cs, self.size)))
            else:
                writes.append((start, n))
        if fast and writes:
            raise ZeroesNotSupported(f"{self.location}: zeroing part of a cluster is not fast")
        if first < last and self._ext:
            writes += await self._zero_subclusters(first, last, may_unmap=may_unmap, fast=fast)
        elif first < last:
            writes += await self._zero_clusters(first, last, may_unmap=may_unmap, fast=fast)
        for c0, c1 in whole:
            writes += await self._zero_clusters(c0, c1, may_unmap=may_unmap, fast=fast)
        # Zero bytes (parts of clusters, version 2 images) get their clusters now, in
        # guest order and in the order the calls came, as pwrite's data does; a later
        # writer must not take the host clusters that come next in the file first.
        for start, n in sorted(writes):
            runs.append((start, await self._allocate(start, n)))
        return runs

    async def _zero_data_file(
        self, offset: int, length: int, *, may_unmap: bool, fast: bool
    ) -> None:
        try:
            await self._data.pwrite_zeroes(offset, length, may_unmap=may_unmap, fast=fast)
        except ZeroesNotSupported:
            if fast:
                raise
            try:
                await self._write_zero_bytes(offset, length)
            except TrioconvError:
                self._failed = True
                raise

    async def _entry(self, guest: int) -> int:
        """The L2 entry of the cluster holding ``guest`` (0 when it has no table)."""
        return (await self._entry_and_bitmap(guest))[0]

    async def _entry_and_bitmap(self, guest: int) -> tuple[int, int]:
        """The L2 entry and subcluster bitmap (0 without extended L2) holding ``guest``."""
        index = guest // self._table_span
        t = await self._get_l2(index, create=False)
        if t is None:
            return 0, 0
        i = ((guest - index * self._table_span) >> self._bits) * self._step
        return t.table[i], (t.table[i + 1] if self._ext else 0)

    async def _reads_as_zero(self, guest: int) -> bool:
        entry, bitmap = await self._entry_and_bitmap(guest)
        if entry & COMPRESSED:
            return False
        if self._ext:
            s = (guest % self._cs) // self._sc
            if bitmap >> (32 + s) & 1:
                return True
            return not bitmap >> s & 1 and self.backing is None
        if entry & ZERO_FLAG and self.header.version >= 3:
            return True
        return not self._mapped(entry) and self.backing is None

    async def _rest_reads_zero(self, start: int, n: int) -> bool:
        """Whether zeroing ``[start, start + n)``, part of one unallocated cluster, may
        make the whole cluster a zero cluster: the rest of it reads as zeroes through the
        backing image (zeroes there, or past its end), so it reads as zeroes either way -
        as qemu's zero write widens to the cluster when the rest reads as zeroes, instead
        of allocating it. Version 3 images without extended L2 entries only."""
        if self._ext or self.header.version < 3 or self.backing is None:
            return False
        entry = await self._entry(start)
        if entry & (COMPRESSED | ZERO_FLAG) or self._mapped(entry):
            return False
        c0 = start // self._cs * self._cs
        c1 = min(c0 + self._cs, self.size)
        return await self._backing_reads_zero(c0, start) and await self._backing_reads_zero(
            start + n, c1
        )

    async def _backing_reads_zero(self, lo: int, hi: int) -> bool:
        """Whether the backing image reads ``[lo, hi)`` as zeroes (past its end it does)."""
        assert self.backing is not None
        pos, stop = lo, min(hi, self.backing.size)
        while pos < stop:
            ext = await self.backing.block_status(pos, stop - pos)
            if ext.kind is not ExtentKind.ZERO or ext.length <= 0:
                return False
            pos += ext.length
        return True

    async def _zero_clusters(
        self, first: int, last: int, *, may_unmap: bool, fast: bool
    ) -> list[tuple[int, int]]:
        """Make whole clusters ``[first, last)`` read as zeroes in the tables.

        Returns the ranges that must be written with zero bytes instead (version 2
        images, where there is no zero flag). With ``fast``, raises
        :class:`ZeroesNotSupported` before changing anything if there would be any.
        """
        v3 = self.header.version >= 3
        no_backing = self.backing is None
        span = self._table_span

        def plan(entry: int) -> int | None:
            """The new entry; None: write zero bytes; -1: leave it."""
            if entry & COMPRESSED:
                return 0 if no_backing else (ZERO_FLAG if v3 else None)
            if not self._mapped(entry):
                if no_backing or entry & ZERO_FLAG:
                    return -1
                return ZERO_FLAG if v3 else None
            if may_unmap and not self._external:  # a data file keeps its mapping
                return 0 if no_backing else (ZERO_FLAG if v3 else None)
            if entry & ZERO_FLAG:
                return -1
            return entry | ZERO_FLAG if v3 else None

        cs = self._cs
        if fast:
            pos = first
            while pos < last:
                index = pos // span
                stop = min(last, (index + 1) * span)
                if self._l1[index] & OFFSET_MASK or not no_backing:
                    for c in range(pos, stop, cs):
                        if plan(await self._entry(c)) is None:
                            raise ZeroesNotSupported(f"{self.location}: zeroing is not fast here")
                pos = stop
        writes: list[tuple[int, int]] = []
        pos = first
        while pos < last:
            index = pos // span
            stop = min(last, (index + 1) * span)
            if not self._l1[index] & OFFSET_MASK and no_backing:
                pos = stop
                continue
            t = await self._get_l2(index, create=True)
            assert t is not None
            for c in range(pos, stop, cs):
                i = (c - index * span) >> self._bits
                entry = t.table[i]
                new = plan(entry)
                if new is None:
                    writes.append((c, min(cs, last - c)))
                elif new != -1 and new != entry:
                    await self._own_l2(index, t)
                    if not new & OFFSET_MASK:
                        await self._free_entry(entry)
                    t.table[i] = new
                    t.touch()
            pos = stop
        merged: list[tuple[int, int]] = []
        for start, n in writes:
            if merged and sum(merged[-1]) == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((start, n))
        return merged

    async def _zero_subclusters(
        self, first: int, last: int, *, may_unmap: bool, fast: bool
    ) -> list[tuple[int, int]]:
        """:meth:`_zero_clusters` with extended L2 entries: ``[first, last)`` is made of
        whole subclusters, marked zero in the bitmaps as qemu marks them.

        A whole cluster gets every zero bit, and loses its host cluster when it was
        compressed or ``may_unmap`` allows it; in part of a cluster, the subclusters get
        their zero bits and lose their allocation bits. Only part of a compressed
        cluster must be written with zero bytes instead (returned). Where there is no L2
        table and no backing image, nothing changes (the range reads as zeroes); where
        there is one, unallocated clusters get their zero bits too, as in qemu.
        """
        cs, sc, span = self._cs, self._sc, self._table_span
        no_backing = self.backing is None
        writes: list[tuple[int, int]] = []
        if fast:
            c = first // cs * cs
            while c < last:
                lo, hi = max(first, c), min(last, c + cs)
                whole = lo == c and (hi == c + cs or hi == self.size)
                if not whole and (await self._entry(c)) & COMPRESSED:
                    raise ZeroesNotSupported(f"{self.location}: zeroing is not fast here")
                c += cs
        pos = first
        while pos < last:
            index = pos // span
            base = index * span
            stop = min(last, base + span)
            if not self._l1[index] & OFFSET_MASK and no_backing:
                pos = stop
                continue
            t = await self._get_l2(index, create=True)
            assert t is not None
            c = pos // cs * cs
            while c < stop:
                lo, hi = max(pos, c), min(stop, c + cs)
                i = 2 * ((c - base) >> self._bits)
                entry, bitmap = t.table[i], t.table[i + 1]
                mapped = self._mapped(entry)
                whole = lo == c and (hi == c + cs or hi == self.size)
                if whole:
                    unmap = bool(entry & COMPRESSED) or (
                        may_unmap and mapped and not self._external
                    )
                    new_entry, new_bitmap = (0 if unmap else entry), ALL_ZEROES
                    if (new_entry, new_bitmap) != (entry, bitmap):
                        await self._own_l2(index, t)
                        if unmap:
                            await self._free_entry(entry)
                        t.table[i], t.table[i + 1] = new_entry, new_bitmap
                        t.touch()
                elif entry & COMPRESSED:
                    writes.append((lo, hi - lo))
                else:
                    a, b = (lo - c) // sc, -(-(hi - c) // sc)
                    mask = ((1 << b) - 1) ^ ((1 << a) - 1)
                    new_bitmap = (bitmap & ~mask & ALL_ALLOC) | (bitmap & ALL_ZEROES) | mask << 32
                    if new_bitmap != bitmap:
                        await self._own_l2(index, t)
                        t.table[i + 1] = new_bitmap
                        t.touch()
                c += cs
            pos = stop
        return writes

    # -- compressed writes ------------------------------------------------------------
    async def compress(self, offset: int, data: memoryview) -> object:
        if self._external:
            raise UnsupportedError(
                f"{self.location}: compressed clusters cannot be written into an image with "
                "an external data file"
            )
        cs = self._cs
        last = (self.size - 1) // cs  # the image's last cluster may be partial
        if offset % cs or (data.nbytes % cs and (offset + data.nbytes - 1) // cs != last):
            raise UnsupportedError(
                f"{self.location}: compressed writes must cover whole clusters of {cs} bytes "
                f"(got {data.nbytes} bytes at {offset})"
            )
        self._check_range("compressed write", offset, data.nbytes)
        # The buffer stays the caller's until this returns: compress it in place, no copy.
        deflate = None if self._zstd else deflate_backend()[1]
        clusters = await trio.to_thread.run_sync(compress_clusters, data, cs, self._zstd, deflate)
        return CompressedClusters(offset, clusters)

    async def pwrite_compressed(self, offset: int, prepared: object) -> None:
        if not isinstance(prepared, CompressedClusters) or prepared.offset != offset:
            raise TypeError("pwrite_compressed takes what compress() returned for this offset")
        self._check_usable()
        if self._bitmaps:
            await self._touch_bitmaps(offset, len(prepared.clusters) * self._cs)
        with self._op():
            await self._pwrite_compressed(offset, prepared)

    async def _pwrite_compressed(self, offset: int, prepared: CompressedClusters) -> None:
        async with self._lock:
            self._check_usable()
            with self._finishing("a compressed write"):
                plan = await self._place_compressed(offset, prepared)
        prepared.clusters = ()  # let the streams go as soon as they are joined
        try:
            with self._finishing("a compressed write", sum(n for _, n, _ in plan)):
                for host, length, pieces in plan:
                    self._check_not_metadata(host, length)
                    data = b"".join(pieces)
                    pieces.clear()
                    await self.file.pwrite(host, data)
                    del data
        except BaseException:
            self._failed = True  # (as in _write_runs)
            raise

    async def _place_compressed(
        self, offset: int, prepared: CompressedClusters
    ) -> list[tuple[int, int, list[bytes]]]:
        """Allocate the host bytes of compressed clusters and point their entries at
        them (under the lock): runs of host-contiguous streams, ``(host offset, total
        length, pieces)``, to be joined and written once."""
        cs, span = self._cs, self._table_span
        plan: list[tuple[int, int, list[bytes]]] = []
        for k, (is_compressed, payload) in enumerate(prepared.clusters):
            guest = offset + k * cs
            index = guest // span
            t = await self._get_l2(index, create=True)
            assert t is not None
            await self._own_l2(index, t)
            i = ((guest - index * span) >> self._bits) * self._step
            if t.table[i] & OFFSET_MASK:
                raise TrioconvIOError(
                    f"{self.location}: cannot write a compressed cluster at guest offset "
                    f"{guest:#x}: the cluster is already allocated",
                    offset=guest,
                )
            if is_compressed:
                host = await self._alloc_bytes(len(payload))
                t.table[i] = codec.compressed_l2_entry(host, len(payload), self._bits)
                if self._ext:
                    t.table[i + 1] = 0  # compressed clusters have no subcluster bits
            else:
                host = await self._alloc_clusters(1)
                t.table[i] = host | COPIED
                if self._ext:
                    t.table[i + 1] = ALL_ALLOC
            t.touch()
            if plan and plan[-1][0] + plan[-1][1] == host:
                start, length, pieces = plan[-1]
                pieces.append(payload)
                plan[-1] = (start, length + len(payload), pieces)
            else:
                plan.append((host, len(payload), [payload]))
        return plan

    # -- metadata to disk ----------------------------------------------------------------
    async def _write_meta(self, host: int, data: bytes) -> None:
        try:
            await self.file.pwrite(host, data)
        except TrioconvError:
            self._failed = True
            raise

    async def _mark_dirty_on_disk(self) -> None:
        """Set the dirty bit in the header on disk before metadata changes (version 3)."""
        if self._dirty_on_disk or self.header.version < 3:
            return
        bits = self._disk_incompatible | codec.Incompatible.DIRTY
        await self._write_meta(72, int(bits).to_bytes(8, "big"))
        self._dirty_on_disk = True

    @property
    def _disk_incompatible(self) -> int:
        return self.header.incompatible_features & ~int(codec.Incompatible.DIRTY)

    @property
    def _metadata_dirty(self) -> bool:
        return bool(
            self._dirty_refblocks
            or self._reftable_dirty
            or self._l1_dirty
            or self._header_dirty
            or self._dirty_on_disk
            or any(t.dirty for t in self._l2.values())
        )

    async def _write_metadata(self) -> None:
        """Refcounts, then L2 and L1 tables, then a clean header (under the lock)."""
        await self._release_deferred()
        if not self._metadata_dirty:
            return
        await self._mark_dirty_on_disk()
        for ri in sorted(self._dirty_refblocks):
            raw = codec.encode_refblock(self._refblocks[ri], self._order)
            await self._write_meta(self._reftable[ri] & REFTABLE_OFFSET_MASK, raw)
        self._dirty_refblocks.clear()
        if self._reftable_dirty:
            await self._write_meta(
                self.header.refcount_table_offset, codec.encode_table(self._reftable)
            )
            self._reftable_dirty = False
        for t in self._l2.values():
            if t.dirty:
                await self._write_meta(t.host, t.encoded())
                t.dirty = False
        if self._l1_dirty and self.header.l1_size:
            table = codec.encode_table(self._l1)
            if self._limit is not None:
                # On a device, whose sectors may hold old bytes, the table is written
                # out to a whole sector, zeroes after it, as qemu writes a new L1 table.
                table += bytes(-len(table) % 512)
            await self._write_meta(self.header.l1_table_offset, table)
        self._l1_dirty = False
        await self.file.flush()
        self.header = attrs.evolve(self.header, incompatible_features=self._disk_incompatible)
        await self._write_meta(0, codec.encode_header(self.header))
        self._header_dirty = self._dirty_on_disk = False

    async def _end_file(self) -> None:
        """End the file where qemu-img ends it (under the lock, all writes done).

        A write that ends inside a new cluster leaves the rest of it unwritten - it
        reads as zeroes past the end of the file anyway - so a last data cluster may
        stop short, before the image end offset ``qemu-img check`` reports; qemu-img
        writes that rest (as zeroes), and the file ends at a cluster boundary. (Its
        metadata it writes as long as it is: a file that ends with a new L1 table ends
        where the table does.) When
        the last cluster is one that compressed streams are packed into, qemu-img
        rounds the file up to a sector instead ("to ease reading with sector based
        I/Os"). A device, an external data file, and extended L2 (whose file ends at
        a subcluster, as :func:`_preallocate` makes it) are left as they are.
        """
        if self._limit is not None or self._external or self._ext:
            return
        size = max(self.file.child.size, self.file.written)
        if self._free_byte_offset and self._free_byte_offset >= self._end - self._cs:
            end = -(-size // 512) * 512
        elif self._data_end == self._end:
            end = self._end
        else:
            return  # it ends with metadata, as qemu-img's does (a new L1 table, say)
        if size < end:
            await self._write_meta(end - 1, b"\0")

    async def flush(self) -> None:
        if self._closed:
            return
        self._check_usable()
        if self._external:
            await self._data.flush()  # data before the metadata that points at it
        async with self._lock:
            await self._store_bitmaps()
            await self._write_metadata()
            await self._end_file()
        await self.file.flush()

    async def aclose(self) -> None:
        if self._closed:
            return
        try:
            if not self._failed:
                with trio.CancelScope(shield=True):
                    async with self._lock:
                        await self._store_bitmaps()
                        await self._write_metadata()
                        await self._end_file()
        except TrioconvError as exc:
            # (A cleanup message: the command line shows it only if nothing else failed.)
            log.warning(
                "%s: could not write qcow2 metadata on close: %s",
                self.location,
                exc,
                extra={"cleanup": True},
            )
        finally:
            self._closed = True
            self._l2.clear()
            self._refblocks.clear()

    # -- persistent bitmaps -----------------------------------------------------------
    @property
    def bitmaps(self) -> list[bm.Bitmap]:
        """The image's persistent dirty bitmaps, as they will be stored."""
        return self._bitmaps

    async def _touch_bitmaps(self, offset: int, length: int) -> None:
        """A write of guest ``[offset, offset + length)``: set it in the enabled
        bitmaps. The first one also marks them in use on disk, so that if the writer
        never gets to store them they read as inconsistent, not as up to date."""
        if not self._bitmaps_changed:
            self._bitmaps_changed = True
            await self._invalidate_bitmaps_on_disk()
        for b in self._bitmaps:
            if b.auto and not b.in_use:
                b.mark(offset, length)

    async def _invalidate_bitmaps_on_disk(self) -> None:
        """Mark the stored bitmaps *in use* on disk before the first write, as qemu
        does when it opens an image to write: a writer that never gets to store them
        (killed) leaves them inconsistent - still listed, their clusters still counted,
        so nothing leaks - rather than silently stale."""
        stored = [b for b in self._bitmaps if b.stored is not None]
        if self._bitmap_dir is None or not stored:
            return
        offset, size = self._bitmap_dir
        try:
            entries = bm.decode_directory(await self.file.pread(offset, size), len(stored))
        except bm.BitmapError as exc:  # pragma: no cover - it was read at open
            raise TrioconvIOError(f"{self.location}: bitmap directory: {exc}") from None
        marked = [attrs.evolve(e, flags=e.flags | bm.IN_USE) for e in entries]
        await self._write_meta(offset, bm.encode_directory(marked))
        await self.file.flush()

    async def add_bitmaps(self, bitmaps: list[bm.Bitmap]) -> None:
        """Add copies of ``bitmaps`` (another image's) to this image's; stored on flush.

        Raises:
            UnsupportedError: a version 2 image, or a bitmap of that name exists here.
        """
        if not bitmaps:
            return
        if self.header.version < 3:
            raise UnsupportedError("Cannot store dirty bitmaps in qcow2 v2 files")
        names = {b.name for b in self._bitmaps}
        for b in bitmaps:
            if b.name in names:
                raise UnsupportedError(f"Bitmap '{b.name}' already exists in the target")
        if not self._bitmaps_changed:
            self._bitmaps_changed = True
            await self._invalidate_bitmaps_on_disk()
        size = self.header.size
        for b in bitmaps:
            bits = bm.bit_count(size, b.granularity_bits)
            data = bytearray(bm.data_size(size, b.granularity_bits))
            n = min(len(data), len(b.data))
            data[:n] = b.data[:n]
            if bits % 8 and data:
                data[-1] &= (1 << bits % 8) - 1
            self._bitmaps.append(
                bm.Bitmap(
                    b.name,
                    b.granularity_bits,
                    b.auto,
                    bits,
                    data,
                    extra_data=b.extra_data,
                    extra_compatible=b.extra_compatible,
                )
            )

    async def _store_bitmaps(self) -> None:
        """Write changed bitmaps anew (under the lock): data clusters, tables and the
        directory at the end of the file, the old ones freed; then the header extension
        and the autoclear bit that makes them count again."""
        if not self._bitmaps_changed:
            return
        cs, bits = self._cs, self._bits
        await self._mark_dirty_on_disk()
        for b in self._bitmaps:
            if b.stored is not None:
                table_offset, table_size, old_hosts = b.stored
                for host in old_hosts:
                    await self._add_refs(host >> bits, 1, -1)
                if table_size:
                    await self._add_refs(table_offset >> bits, -(-table_size * 8 // cs), -1)
                b.stored = None
        if self._bitmap_dir is not None:
            offset, size = self._bitmap_dir
            await self._add_refs(offset >> bits, -(-size // cs), -1)
            self._bitmap_dir = None
        entries: list[bm.DirectoryEntry] = []
        zero = bytes(cs)
        for b in self._bitmaps:
            count = -(-len(b.data) // cs)
            table = array("Q", bytes(8 * count))
            hosts: list[int] = []
            for i in range(count):
                chunk = bytes(b.data[i * cs : (i + 1) * cs]).ljust(cs, b"\0")
                if chunk == zero:
                    continue
                host = await self._alloc_clusters(1)
                await self._write_meta(host, chunk)
                table[i] = host
                hosts.append(host)
            table_offset = 0
            if count:
                raw = codec.encode_table(table)
                table_offset = await self._alloc_clusters(-(-len(raw) // cs))
                await self._write_meta(table_offset, raw.ljust(-(-len(raw) // cs) * cs, b"\0"))
            b.stored = (table_offset, count, tuple(hosts))
            entries.append(
                bm.DirectoryEntry(
                    table_offset,
                    count,
                    b.flags,
                    bm.TYPE_DIRTY_TRACKING,
                    b.granularity_bits,
                    b.name,
                    b.extra_data,
                )
            )
        body: bytes | None = None
        if entries:
            raw = bm.encode_directory(entries)
            clusters = -(-len(raw) // cs)
            offset = await self._alloc_clusters(clusters)
            await self._write_meta(offset, raw.ljust(clusters * cs, b"\0"))
            self._bitmap_dir = (offset, len(raw))
            body = bm.encode_extension(len(entries), len(raw), offset)
        first = await self.file.pread(0, min(cs, self.file.size))
        try:
            header, area = codec.rebuild_extensions(self.header, first, body)
        except codec.Qcow2FormatError as exc:
            raise TrioconvIOError(f"{self.location}: cannot store the bitmaps: {exc}") from None
        await self._write_meta(header.header_length, area)
        flags = header.autoclear_features & ~int(codec.Autoclear.BITMAPS)
        if body is not None:
            flags |= int(codec.Autoclear.BITMAPS)
        self.header = attrs.evolve(header, autoclear_features=flags)
        self._header_dirty = True
        self._bitmaps_changed = False

    # -- creation helpers -------------------------------------------------------------
    async def _init_l1(self) -> None:
        """Give a new image its L1 table (qemu puts it right after the first refblock)."""
        h = self.header
        entries = codec.l1_entries_for(h.size, h.cluster_bits, h.extended_l2)
        if entries * 8 > codec.MAX_L1_BYTES:
            raise UsageError(
                "The image size is too large for file format 'qcow2' (try using a larger "
                "cluster size)"
            )
        if not entries:
            return
        clusters = -(-entries * 8 // self._cs)
        host = await self._alloc_clusters(clusters)
        # On a device, to the end of the sector (see _write_metadata).
        pad = -entries * 8 % 512 if self._limit is not None else 0
        await self.file.pwrite(host, bytes(entries * 8 + pad))
        self._l1.extend(array("Q", bytes(entries * 8)))
        self.header = attrs.evolve(h, l1_size=entries, l1_table_offset=host)
        self._header_dirty = self._l1_dirty = True

    async def _preallocate(self, mode: str) -> None:
        """Give every cluster a host cluster (``metadata``), zeroed on disk for falloc/full."""
        cs, span = self._cs, self._table_span
        runs: list[tuple[int, int]] = []
        for index in range(self.header.l1_size):
            base = index * span
            count = -(-min(span, self.size - base) // cs)
            t = await self._get_l2(index, create=True)
            assert t is not None
            # An external data file maps every guest cluster to the same offset.
            host = base if self._external else await self._alloc_clusters(count)
            first = host | COPIED
            # With extended L2 the subclusters stay unallocated (bitmap 0), as in qemu:
            # they read as zeroes, or as the backing image.
            t.table[: count * self._step : self._step] = array(
                "Q", range(first, first + count * cs, cs)
            )
            t.touch()
            if runs and sum(runs[-1]) == host:
                runs[-1] = (runs[-1][0], runs[-1][1] + count * cs)
            else:
                runs.append((host, count * cs))
        for host, n in runs:
            if self._external:
                n = min(n, self.size - host)  # the data file is as large as the guest
            if mode == "full":
                for pos in range(host, host + n, len(_ZEROS)):
                    await self._data.pwrite(
                        pos, memoryview(_ZEROS)[: min(len(_ZEROS), host + n - pos)]
                    )
            elif mode == "falloc":
                with contextlib.suppress(ZeroesNotSupported):
                    await self._data.pwrite_zeroes(host, n)
        if runs and not self._external:
            # The file reaches the end of the last data cluster, as qemu makes it - with
            # extended L2, the end of the subcluster that holds the image's last byte.
            # (falloc and full: of the last cluster).
            unit = self._sc if mode == "metadata" else cs
            tail = -(-((self.size - 1) % cs + 1) // unit) * unit
            await self.file.pwrite(self._end - cs + tail - 1, b"\0")


async def _open_writer(
    file: _GrowingFile, ctx: OpenContext | None, data: Driver | None = None
) -> Qcow2Writer:
    if ctx is not None:
        reader = await _open_reader(file, ctx, writable_data=True)
    else:
        reader = await _open_bare(file, data)
    h = reader.header
    where = f"Could not open '{reader.location}' for writing"
    if ctx is not None and ctx.snapshot is not None:
        raise UnsupportedError(f"{where}: a snapshot ('{ctx.snapshot}') cannot be written")
    if h.nb_snapshots and h.incompatible_features & codec.Incompatible.DATA_FILE:
        # qemu makes no internal snapshots of such images; their data is not refcounted.
        raise UnsupportedError(
            f"{where}: qcow2 images with internal snapshots and an external data file"
        )
    if h.incompatible_features & codec.Incompatible.CORRUPT:
        raise ImageError(f"{where}: the image is marked corrupt (run 'qemu-img check -r all')")
    if h.incompatible_features & codec.Incompatible.DIRTY:
        # Left dirty by a writer with lazy refcounts that did not close it: recount
        # every reference and rebuild the refcounts first, as qemu does (_repair.py).
        from ._repair import repair_refcounts

        info = await repair_refcounts(reader, where)
        l1 = codec.decode_table(
            await file.pread(info.header.l1_table_offset, info.header.l1_size * 8)
        )
        reader = _reopened(reader, info, l1)
        h = reader.header
    reftable_bytes = h.refcount_table_clusters * h.cluster_size
    if h.refcount_table_offset + reftable_bytes > file.size:
        raise ImageError(
            f"{where}: refcount table at {h.refcount_table_offset:#x} ({reftable_bytes} "
            f"bytes) lies past the end of the file ({file.size} bytes)"
        )
    raw = await file.pread(h.refcount_table_offset, reftable_bytes)
    reftable = codec.decode_table(raw)
    meta = _metadata_clusters(reader, reftable, where)
    fixed_size = ctx is not None and ctx.fixed_size
    writer = Qcow2Writer(
        file,
        reader.info,
        reader._l1,
        reftable,
        backing=reader.backing,
        data=reader._data if reader._data is not file else None,
        fixed_size=fixed_size,
    )
    writer.location = reader.location
    writer._meta = meta
    if fixed_size:
        await writer._find_end()
    keep = int(codec.Autoclear.DATA_FILE_RAW) if writer._external else 0
    if reader.bitmap_entries:
        # Consistent bitmaps: kept, and kept up to date (see _touch_bitmaps).
        writer._bitmaps = await reader.load_bitmaps()
        offset, size, _ = _bitmap_directory_place(reader.info)
        writer._bitmap_dir = (offset, size)
        keep |= int(codec.Autoclear.BITMAPS)
    if h.autoclear_features & ~keep:
        # Writers that do not keep them up to date must clear autoclear bits (bitmaps);
        # the raw data file one is kept up to date here.
        writer.header = attrs.evolve(h, autoclear_features=h.autoclear_features & keep)
        writer._header_dirty = True
    return writer


def _metadata_clusters(reader: Qcow2Driver, reftable: array[int], where: str) -> array[int]:
    """The host clusters of an image's metadata, sorted: the header's cluster, the
    active L1 table and its L2 tables, the refcount table and its blocks, the snapshot
    table's first cluster and the snapshots' L1 tables.

    qemu only notices that two of these overlap (an L1 table on the refcount table,
    say) when a write would land on one - by then the image is half changed. Here an
    image opened for writing is refused first, untouched.

    The list costs 8 bytes a table, as the L1 table itself does. (Data clusters are
    not in it: where each one is, only the L2 tables say, and reading them all would
    make opening a large image slow. A data cluster mapped onto metadata is caught
    when it is written or freed, by :meth:`Qcow2Writer._check_not_metadata`.)

    Raises:
        ImageError: two of these structures share a cluster.
    """
    h = reader.header
    cs, bits = h.cluster_size, h.cluster_bits
    names: list[str] = []
    keys: list[int] = []

    def claim(offset: int, length: int, what: str) -> None:
        kind = len(names)
        names.append(what)
        first, stop = offset >> bits, -(-(offset + length) // cs)
        keys.extend((c << 24) | kind for c in range(first, stop))

    claim(0, cs, "header")
    if h.l1_size:
        claim(h.l1_table_offset, h.l1_size * 8, "active L1 table")
    claim(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
    if h.nb_snapshots:
        claim(h.snapshots_offset, 1, "snapshot table")
    for snap in reader.snapshots:
        if snap.l1_size:
            claim(snap.l1_table_offset, snap.l1_size * 8, f"L1 table of snapshot '{snap.name}'")
    for what, table, mask in (
        ("L2 table", reader._l1, OFFSET_MASK),
        ("refcount block", reftable, REFTABLE_OFFSET_MASK),
    ):
        kind = len(names)
        names.append(what)
        keys.extend((entry & mask) >> bits << 24 | kind for entry in table if entry & mask)
    keys.sort()
    for a, b in itertools.pairwise(keys):
        if a >> 24 == b >> 24:
            raise ImageError(
                f"{where}: corrupt qcow2 image: the {names[a & 0xFFFFFF]} overlaps the "
                f"{names[b & 0xFFFFFF]} at host offset {(a >> 24) << bits:#x}"
            )
    return array("Q", sorted({k >> 24 for k in keys}))


def _reopened(reader: Qcow2Driver, info: codec.ImageInfo, l1: array[int]) -> Qcow2Driver:
    """``reader`` with new metadata (after a repair), sharing its files and backing."""
    fresh = Qcow2Driver(
        reader.child,
        info,
        l1,
        data=reader._data if reader._data is not reader.child else None,
        backing=reader.backing,
    )
    fresh.location = reader.location
    fresh.snapshots = reader.snapshots
    fresh.bitmap_entries = reader.bitmap_entries
    return fresh


def _bitmap_directory_place(info: codec.ImageInfo) -> tuple[int, int, int]:
    """(directory offset, size, count) from the bitmaps extension (already checked)."""
    assert info.bitmaps_extension is not None
    count, size, offset = bm.decode_extension(info.bitmaps_extension)
    return offset, size, count


async def _open_bare(file: _GrowingFile, data: Driver | None = None) -> Qcow2Driver:
    """Open an image we just made (no backing; ``data``: its data file) without an
    OpenContext."""
    cluster = await file.pread(0, min(file.size, 1 << codec.MAX_CLUSTER_BITS))
    try:
        info = codec.parse_image(cluster, file.size)
    except codec.Qcow2FormatError as exc:  # pragma: no cover - we just wrote it
        raise ImageError(f"Could not open '{file.location}': {exc}") from None
    h = info.header
    l1 = codec.decode_table(
        await file.pread(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b""
    )
    return Qcow2Driver(file, info, l1, data=data)


async def open_qcow2_writable(transport: Driver, ctx: OpenContext) -> Qcow2Writer:
    """Open a qcow2 image for writing on top of a writable ``transport``.

    The metadata is written on :meth:`~Qcow2Writer.flush` and when the image is closed
    (the opener's exit stack closes it).

    Raises:
        ImageError: not valid qcow2, or marked dirty or corrupt.
        UnsupportedError: internal snapshots together with an external data file.
    """
    writer = await _open_writer(_GrowingFile(transport), ctx)
    ctx.stack.push_async_callback(writer.aclose)
    return writer


def _first_cluster(opts: CreateOptions, size: int) -> bytes:
    incompat = 0
    if opts.compression_type != codec.CompressionType.ZLIB:
        incompat |= codec.Incompatible.COMPRESSION_TYPE
    if opts.extended_l2:
        incompat |= codec.Incompatible.EXTENDED_L2
    if opts.data_file is not None:
        incompat |= codec.Incompatible.DATA_FILE
    v3 = opts.version >= 3
    header = codec.Header(
        version=opts.version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=opts.cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=0,
        l1_table_offset=0,
        refcount_table_offset=opts.cluster_size,
        refcount_table_clusters=1,
        nb_snapshots=0,
        snapshots_offset=0,
        incompatible_features=int(incompat),
        compatible_features=int(codec.Compatible.LAZY_REFCOUNTS) if opts.lazy_refcounts else 0,
        autoclear_features=int(codec.Autoclear.DATA_FILE_RAW) if opts.data_file_raw else 0,
        refcount_order=opts.refcount_order,
        header_length=112 if v3 else codec.V2_HEADER_LENGTH,
        compression_type=opts.compression_type,
    )
    # qemu's order: backing format, feature names (version 3), the end marker, and the
    # backing file's name right after it, where backing_file_offset points.
    extensions = b""
    if opts.backing_format is not None:
        extensions += codec.encode_extension(
            codec.Extension.BACKING_FORMAT, opts.backing_format.encode("utf-8")
        )
    if opts.data_file is not None:
        extensions += codec.encode_extension(
            codec.Extension.DATA_FILE, opts.data_file.encode("utf-8")
        )
    name = opts.backing_file.encode("utf-8") if opts.backing_file is not None else b""
    fixed = len(codec.encode_header(header))
    # The feature name table is optional; qemu writes it only with clusters above 4 KiB.
    if v3 and opts.cluster_size > 4096:
        extensions += codec.encode_feature_names()
    if fixed + len(extensions) + 8 + len(name) > opts.cluster_size:
        raise UsageError("Backing file name too long for the cluster size")
    if opts.backing_file is None:
        return codec.encode_header(header) + extensions
    header = attrs.evolve(
        header,
        backing_file_offset=fixed + len(extensions) + 8,
        backing_file_size=len(name),
    )
    return codec.encode_header(header) + extensions + bytes(8) + name


def _virtual_size(size: int) -> int:
    """The virtual size rounded up to whole sectors, as qemu rounds it; one qcow2 cannot
    hold is refused."""
    size = -(-size // 512) * 512
    if size >= 1 << 63:
        raise UsageError(f"Image size {size} is too large for qcow2")
    return size


async def check_qcow2_create(location: str, size: int, options: Mapping[str, str]) -> None:
    """What :func:`create_qcow2` would refuse about its options and size, checked before
    anything is written (the registry's ``check_create``).

    Raises:
        UsageError: invalid ``-o`` options or size (qemu-img's messages).
    """
    parse_create_options(options)
    _virtual_size(size)


async def create_qcow2(transport: Driver, size: int, options: Mapping[str, str]) -> None:
    """Write a new, empty qcow2 image of virtual size ``size`` onto an empty transport.

    The virtual size is rounded up to a multiple of 512 bytes, as qemu does. The
    layout is qemu-img's: the header (the backing format extension, in version 3 with
    clusters above 4 KiB the feature name table, then the backing file's name, as
    given) in cluster 0, the refcount table in cluster 1, the first refcount block in
    cluster 2, the L1 table from cluster 3.

    With ``data_file``, the external data file is created (or truncated) with the
    image's virtual size; a relative name is relative to the image's folder, where it
    is looked for when the image is opened. It is removed again if creating fails.

    Raises:
        UsageError: invalid ``-o`` options (qemu-img's messages).
        UnsupportedError: a data file for an image that is not a local file.
        ImageError: the data file cannot be created.
    """
    opts = parse_create_options(options)
    size = _virtual_size(size)
    if opts.data_file is None:
        await _create(transport, size, opts, None)
        return
    path = _data_file_path(transport, opts.data_file)
    created = await create_file(path, size)
    try:
        data = await open_file(path, writable=True)
        try:
            await _create(transport, size, opts, data)
            await data.flush()
        finally:
            await data.aclose()
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise


def qcow2_side_files(path: str, size: int, options: Mapping[str, str]) -> list[str]:
    """The external data file creating a qcow2 image at ``path`` makes, if ``-o
    data_file`` names one (the registry's ``side_files``): the name from the current
    directory, as :func:`create_qcow2` places it."""
    name = parse_create_options(options).data_file
    return [] if name is None else [os.path.abspath(name)]


def _data_file_path(transport: Driver, name: str) -> str:
    """Where a new image's data file goes: ``name`` itself.

    As in qemu, a relative data file name is relative to the current directory, not to
    the image's folder, both when the image is made and when it is opened (unlike a
    backing file's): the name stored is the one given, and it must be given so that it
    names the file from where the image will be used. (An image made in another folder
    with a bare name, ``-o data_file=d.raw``, is opened from the folder it was made
    in.)"""
    location = transport.location
    here = local_path(location) if location else None
    if transport.name != "file" or here is None:
        raise UnsupportedError(
            f"qcow2 images with an external data file can only be created as local files "
            f"('{location}')"
        )
    if same_place(name, here):
        raise UsageError(f"The data file '{name}' cannot be the image itself")
    return name


async def _create(transport: Driver, size: int, opts: CreateOptions, data: Driver | None) -> None:
    cs = opts.cluster_size
    # The header says size 0 until the L1 table exists (a reader refuses anything else).
    first = _first_cluster(opts, 0)
    reftable = array("Q", bytes(cs))
    reftable[0] = 2 * cs
    refblock = codec.refcount_array(opts.refcount_order, (cs * 8) >> opts.refcount_order)
    refblock[0:3] = array(refblock.typecode, [1, 1, 1])
    file = _GrowingFile(transport)
    # The whole cluster, as qemu writes it: on a device (an NBD export, a LUN) the rest
    # would keep old bytes, which a reader takes for header extensions.
    await file.pwrite(0, first.ljust(cs, b"\0"))
    await file.pwrite(cs, codec.encode_table(reftable))
    await file.pwrite(2 * cs, codec.encode_refblock(refblock, opts.refcount_order))
    writer = await _open_writer(file, None, data)
    try:
        writer.header = attrs.evolve(writer.header, size=size)
        await writer._init_l1()
        if opts.preallocation != "off":
            await writer._preallocate(opts.preallocation)
        await writer.flush()
    finally:
        writer._closed = True
