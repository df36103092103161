"""Repairing the refcounts of a dirty qcow2 image, as qemu does before it writes one.

With ``lazy_refcounts=on`` QEMU writes refcount updates to disk only now and then and
marks the image *dirty* meanwhile. After a crash the counts on disk may be too high (a
leak: space lost) or too low (a cluster in use that looks free: the next allocation
there would overwrite data). So when QEMU opens a dirty image for writing, it first
counts every reference again and rebuilds the refcount structures; trioconv does the
same before writing into one (``convert -n``):

1. **Count** the references to every cluster of the file: the header cluster, the
   active L1 table, each L2 table and the data clusters its entries map (a compressed
   stream counts each cluster its sectors touch; data in an external data file counts
   nothing), the snapshot table and each snapshot's L1 table, L2 tables and data, and
   the persistent bitmaps' directory, tables and data clusters. The old refcount table
   and blocks are not counted: they are replaced, and become free.
2. **Write** a new refcount table and blocks right after the last cluster in use,
   covering every cluster including themselves, before anything points at them.
3. **Fix the COPIED flags** of the active L1 and L2 entries: set exactly where the count
   is 1 (the only writer may change the cluster in place), cleared elsewhere.
4. **Point the header** at the new table and clear the dirty bit, in one header write,
   after a flush - a crash before it leaves the image dirty, to be repaired again.

Memory is one counter per cluster of the file, as in qemu.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

import attrs

from ..._errors import ImageError
from . import _bitmaps as bm
from . import _codec as codec
from . import _snapshot as snapshots
from ._codec import COMPRESSED, COPIED, OFFSET_MASK

if TYPE_CHECKING:
    from ...driver import Driver
    from ._driver import Qcow2Driver

__all__ = ["repair_refcounts"]


#: The most memory the counters may take (one per cluster of the file).
MAX_COUNTS_BYTES = 1 << 30


class _Counts:
    """One reference counter per cluster of the file."""

    def __init__(self, file_size: int, cluster_bits: int, refcount_order: int, where: str) -> None:
        self.bits = cluster_bits
        self.order = refcount_order
        self.n = -(-file_size // (1 << cluster_bits))
        self.max = (1 << (1 << refcount_order)) - 1
        self.where = where
        width = codec.refcount_array(refcount_order, 1).itemsize
        if self.n > 0x7FFF_FFFF or self.n * width > MAX_COUNTS_BYTES:
            # qemu refuses more than INT_MAX clusters; a (sparse) file this large with
            # small clusters would take more memory than a repair may.
            raise ImageError(
                f"{where}: Could not repair dirty image: File too large ({file_size} bytes "
                f"in {self.n} clusters)"
            )
        self.counts = codec.refcount_array(refcount_order, self.n)

    def add(self, offset: int, length: int, what: str) -> None:
        """One more reference to every cluster of ``[offset, offset + length)``."""
        if length <= 0:
            return
        first, last = offset >> self.bits, (offset + length - 1) >> self.bits
        if last >= self.n:
            raise ImageError(
                f"{self.where}: {what} at {offset:#x} lies beyond the end of the file; "
                "the refcounts cannot be repaired (run 'qemu-img check -r all')"
            )
        for c in range(first, last + 1):
            value = self.counts[c] + 1
            if value > self.max:
                raise ImageError(
                    f"{self.where}: cluster {c << self.bits:#x} has more references than "
                    f"{self.max}, the most its refcount can hold"
                )
            self.counts[c] = value

    def of(self, offset: int) -> int:
        c = offset >> self.bits
        return self.counts[c] if c < self.n else 0


async def repair_refcounts(reader: Qcow2Driver, where: str) -> codec.ImageInfo:
    """Recount and rebuild the refcounts of the dirty image ``reader`` has open.

    Returns the image's new :class:`~codec.ImageInfo` (a new refcount table, the dirty
    bit cleared); the L1 table on disk may have new COPIED flags (read it again).

    Raises:
        ImageError: metadata points past the end of the file, or a cluster has more
            references than its refcount width can hold.
    """
    file = reader.child
    info = reader.info
    h = info.header
    cs = h.cluster_size
    counts = _Counts(file.size, h.cluster_bits, h.refcount_order, where)
    external = reader._data is not file

    counts.add(0, cs, "the header")
    counts.add(h.l1_table_offset, h.l1_size * 8, "the L1 table")
    active: dict[int, array[int]] = {}  # L2 offset -> table, of the active layer
    await _count_l1(reader, counts, reader._l1, active, external)
    if h.nb_snapshots:
        raw = await file.pread(
            h.snapshots_offset,
            min(snapshots.table_bytes_bound(h.nb_snapshots), file.size - h.snapshots_offset),
        )
        counts.add(h.snapshots_offset, snapshots.table_length(raw, h.nb_snapshots), "snapshots")
        for snap in reader.snapshots:
            counts.add(snap.l1_table_offset, snap.l1_size * 8, f"snapshot {snap.id}'s L1 table")
            l1 = codec.decode_table(await file.pread(snap.l1_table_offset, snap.l1_size * 8))
            await _count_l1(reader, counts, l1, None, external)
    if reader.bitmap_entries:
        assert info.bitmaps_extension is not None
        _, size, offset = bm.decode_extension(info.bitmaps_extension)
        counts.add(offset, size, "the bitmap directory")
        for e in reader.bitmap_entries:
            counts.add(e.table_offset, e.table_size * 8, f"bitmap '{e.name}'")
            table = codec.decode_table(await file.pread(e.table_offset, e.table_size * 8))
            for entry in table:
                host, _ = bm.decode_table_entry(entry, cs)
                if host:
                    counts.add(host, cs, f"bitmap '{e.name}' data")

    reftable_offset, reftable_clusters = await _write_refcounts(file, h, counts)
    await _fix_copied(reader, counts, active, external)
    await file.flush()
    header = attrs.evolve(
        h,
        refcount_table_offset=reftable_offset,
        refcount_table_clusters=reftable_clusters,
        incompatible_features=h.incompatible_features & ~int(codec.Incompatible.DIRTY),
    )
    await file.pwrite(0, codec.encode_header(header))
    await file.flush()
    return attrs.evolve(info, header=header)


async def _count_l1(
    reader: Qcow2Driver,
    counts: _Counts,
    l1: array[int],
    active: dict[int, array[int]] | None,
    external: bool,
) -> None:
    """Count the L2 tables of ``l1`` and the data clusters they map."""
    cs = reader.layout.cluster_size
    step = 2 if reader.header.extended_l2 else 1
    shift = reader.layout.compressed_offset_bits
    sector_mask = (1 << (reader.layout.cluster_bits - 8)) - 1
    for index, entry in enumerate(l1):
        try:
            l2 = codec.l1_entry_offset(entry, cs, index)
        except codec.Qcow2FormatError as exc:
            raise ImageError(f"{counts.where}: {exc}") from None
        if not l2:
            continue
        counts.add(l2, cs, "an L2 table")
        table = codec.decode_table(await reader.child.pread(l2, cs))
        if active is not None:
            active[l2] = table
        for i in range(0, len(table), step):
            e = table[i]
            if not e:
                continue
            if e & COMPRESSED:
                host = e & ((1 << shift) - 1)
                sectors = ((e >> shift) & sector_mask) + 1
                counts.add(host & ~511, sectors * 512, "a compressed cluster")
            elif e & OFFSET_MASK and not external:
                host = e & OFFSET_MASK
                if host % cs:
                    raise ImageError(
                        f"{counts.where}: Cluster allocation offset {host:#x} unaligned (L2 "
                        f"offset {l2:#x}, entry {i // step}); the refcounts cannot be repaired"
                    )
                counts.add(host, cs, "a data cluster")


async def _write_refcounts(file: Driver, h: codec.Header, counts: _Counts) -> tuple[int, int]:
    """Write new refcount blocks and table after the last cluster in use; return the
    table's offset and size in clusters."""
    cs, bits, order = h.cluster_size, h.cluster_bits, h.refcount_order
    rpb = cs * 8 // h.refcount_bits
    c = counts.counts
    start = len(c)
    while start and not c[start - 1]:
        start -= 1
    blocks = tables = 0
    while True:  # the new structures need refcounts too: find the fixed point
        total = start + blocks + tables
        need_blocks = -(-total // rpb)
        need_tables = -(-need_blocks * 8 // cs)
        if (need_blocks, need_tables) == (blocks, tables):
            break
        blocks, tables = need_blocks, need_tables
    total = start + blocks + tables
    if len(c) < total:
        c.extend(codec.refcount_array(order, total - len(c)))
    for k in range(start, total):
        c[k] = 1
    reftable = array("Q", bytes(tables * cs))
    for b in range(blocks):
        block = codec.refcount_array(order, rpb)
        part = c[b * rpb : (b + 1) * rpb]
        block[: len(part)] = part
        host = (start + b) << bits
        await file.pwrite(host, codec.encode_refblock(block, order))
        reftable[b] = host
    table_offset = (start + blocks) << bits
    await file.pwrite(table_offset, codec.encode_table(reftable))
    return table_offset, tables


async def _fix_copied(
    reader: Qcow2Driver, counts: _Counts, active: dict[int, array[int]], external: bool
) -> None:
    """COPIED exactly where the active layer's L1 and L2 entries have refcount 1."""
    step = 2 if reader.header.extended_l2 else 1
    for l2, table in active.items():
        changed = False
        for i in range(0, len(table), step):
            e = table[i]
            if not e or e & COMPRESSED or not (e & OFFSET_MASK or (external and e & COPIED)):
                continue
            own = external or counts.of(e & OFFSET_MASK) == 1
            fixed = e | COPIED if own else e & ~COPIED
            if fixed != e:
                table[i] = fixed
                changed = True
        if changed:
            await reader.child.pwrite(l2, codec.encode_table(table))
    l1 = reader._l1
    changed = False
    for index, entry in enumerate(l1):
        l2 = entry & OFFSET_MASK
        if not l2:
            continue
        fixed = entry | COPIED if counts.of(l2) == 1 else entry & ~COPIED
        if fixed != entry:
            l1[index] = fixed
            changed = True
    if changed:
        h = reader.header
        await reader.child.pwrite(h.l1_table_offset, codec.encode_table(l1)[: h.l1_size * 8])
