"""The read-only qcow2 driver: the codec's tables put to work over a child driver.

Opening reads the first cluster (header and extensions) and the active L1 table, which
stays in memory (at most 32 MiB, refused beyond). L2 tables are read when first needed
and kept in a small LRU cache, bounded in bytes whatever the image claims.

A read is mapped through L1 and L2 into *segments* (:func:`~._codec.map_l2`), each of
which is served one way:

* NORMAL - one read on the data file (the image itself, or its external data file);
  host-contiguous clusters were already merged into one segment, so a freshly
  converted image is read in requests as large as the caller's. A cluster of the
  image itself that lies wholly past the end of its file fails the read (a truncated
  copy), where qemu would read zeroes;
* ZERO - the buffer is cleared;
* UNALLOCATED - read from the backing image (zeroes past its end), or cleared;
* COMPRESSED - the stream is read and inflated; neighbouring streams are fetched in one
  read, and big batches are inflated in a worker thread so the event loop keeps going.

``block_status`` answers for what a reader sees, so the copy engine can trust it: DATA
for normal and compressed clusters and for unallocated ones whose backing image has
data there, ZERO for zero clusters (and unallocated ones when there is no backing
image), HOLE for unallocated clusters that read as zeroes through the backing chain.
``layer_status`` answers for this image alone (``convert -B``): HOLE wherever a cluster
is unallocated and the backing image shows through.
"""

from __future__ import annotations

import collections
import zlib
from array import array
from typing import TYPE_CHECKING

import attrs
import trio

from ..._errors import (
    BackingChainTooLong,
    ImageError,
    TrioconvError,
    TrioconvIOError,
    UnsupportedError,
)
from ..._qdict import qemu_order
from ...driver import Caps, Driver, Extent, ExtentKind, Limits
from .. import _luks
from .._common import backing_error, check_range, full_backing_name, read_or_zero
from .._common import fill_zero as _fill_zero
from .._common import resolve_name as _resolve
from .._common import same_place as _same_place
from . import _bitmaps as bm
from . import _codec as codec
from . import _snapshot as snapshots
from ._codec import ClusterKind, Segment

if TYPE_CHECKING:
    from ..._open import OpenContext

__all__ = ["Qcow2Driver", "open_qcow2"]

#: Bytes of L2 tables kept in memory at most (and never more than 32 tables).
L2_CACHE_BYTES = 16 * 1024 * 1024
L2_CACHE_TABLES = 32
#: Compressed bytes above which a batch is inflated in a worker thread.
THREAD_INFLATE_BYTES = 256 * 1024
#: Largest read that fetches several neighbouring compressed streams at once.
COMPRESSED_READ_SPAN = 4 * 1024 * 1024
#: Most clusters one ``block_status`` call looks at.
STATUS_CLUSTERS = 65536
#: Zeroes to copy from when clearing parts of a buffer.


def _inflate_zlib(data: bytes, cluster_size: int) -> bytes:
    # Raw deflate with a 4 KiB window, as qemu writes it; the stream may be followed
    # by padding up to the next sector.
    return zlib.decompressobj(-12).decompress(data, cluster_size)


def _inflate_zstd(data: bytes, cluster_size: int) -> bytes:
    try:
        import zstandard  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise UnsupportedError("zstd-compressed qcow2 needs the zstandard package") from None
    # A stream reader never produces more than asked for, whatever the frame claims.
    parts: list[bytes] = []
    got = 0
    with zstandard.ZstdDecompressor().stream_reader(data) as reader:
        while got < cluster_size:
            part = reader.read(cluster_size - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
    return b"".join(parts)


def _inflate_all(streams: list[bytes], zstd: bool, cluster_size: int) -> list[bytes | None]:
    """Inflate each stream to one cluster; None where a stream is broken."""
    inflate = _inflate_zstd if zstd else _inflate_zlib
    out: list[bytes | None] = []
    for data in streams:
        try:
            plain: bytes | None = inflate(data, cluster_size)
        except UnsupportedError:
            raise
        except Exception:  # zlib.error, zstandard.ZstdError: a broken stream
            plain = None
        out.append(plain if plain is not None and len(plain) == cluster_size else None)
    return out


class Qcow2Driver(Driver):
    """A qcow2 image opened read-only. Made by :func:`open_qcow2`."""

    name = "qcow2"

    def __init__(
        self,
        child: Driver,
        info: codec.ImageInfo,
        l1: array[int],
        *,
        data: Driver | None = None,
        backing: Driver | None = None,
    ) -> None:
        self.child = child
        self.info = info
        self.header = info.header
        self.layout = info.layout
        self.location = child.location
        self.backing = backing
        self._data = data if data is not None else child
        self._l1 = l1
        self._table_span = self.layout.l2_entries * self.layout.cluster_size
        table_bytes = self.layout.cluster_size
        self._cache_max = max(2, min(L2_CACHE_TABLES, L2_CACHE_BYTES // table_bytes))
        self._cache: collections.OrderedDict[int, tuple[array[int], bytes]] = (
            collections.OrderedDict()
        )
        self._closed = False
        self.snapshots: list[snapshots.Snapshot] = []
        #: The bitmap directory, when the image has consistent persistent bitmaps.
        self.bitmap_entries: list[bm.DirectoryEntry] = []
        #: The LUKS header of a LUKS-encrypted image (opened only to be described).
        self.luks: _luks.LuksHeader | None = None

    # -- contract ---------------------------------------------------------------------
    @property
    def size(self) -> int:
        # Whole 512-byte sectors, as QEMU reads it (a hostile header may say 7).
        return self.header.size // 512 * 512

    def describe(self) -> dict[str, object]:
        """qemu-img info's qcow2 keys: cluster size, backing file, format-specific data."""
        h = self.header
        out: dict[str, object] = {"cluster-size": self.layout.cluster_size}
        if self.snapshots:
            out["snapshots"] = [snap.describe() for snap in self.snapshots]
        if self.info.backing_file is not None:
            out["backing-filename"] = self.info.backing_file
            full = full_backing_name(self.info.backing_file, self.backing, self.location)
            if full is not None:
                out["full-backing-filename"] = full
            if self.info.backing_format is not None:
                out["backing-filename-format"] = self.info.backing_format
        data: dict[str, object] = {"compat": "0.10" if h.version == 2 else "1.1"}
        if h.version >= 3:
            data["compression-type"] = (
                "zstd" if h.compression_type == codec.CompressionType.ZSTD else "zlib"
            )
            data["lazy-refcounts"] = bool(h.compatible_features & codec.Compatible.LAZY_REFCOUNTS)
            if self.bitmap_entries:
                data["bitmaps"] = [
                    {
                        "flags": (["in-use"] if e.flags & bm.IN_USE else [])
                        + (["auto"] if e.flags & bm.AUTO else []),
                        "name": e.name,
                        "granularity": 1 << e.granularity_bits,
                    }
                    for e in self.bitmap_entries
                ]
            data["refcount-bits"] = 1 << h.refcount_order
            self._describe_data_file(data)  # where QEMU's human output has it
            data["corrupt"] = bool(h.incompatible_features & codec.Incompatible.CORRUPT)
            data["extended-l2"] = bool(h.incompatible_features & codec.Incompatible.EXTENDED_L2)
        else:
            data["compression-type"] = "zlib"
            data["refcount-bits"] = 16
            self._describe_data_file(data)
        if h.crypt_method:
            self._describe_encryption(data)
        out["format-specific"] = {"type": "qcow2", "data": data}
        out["dirty-flag"] = bool(h.incompatible_features & codec.Incompatible.DIRTY)
        if h.crypt_method:
            out["encrypted"] = True
        return out

    def _describe_encryption(self, data: dict[str, object]) -> None:
        """The ``encrypt`` entry: ``{"format": "aes"}`` for the legacy method, the LUKS
        header's fields for LUKS (none when the image has no LUKS header to show).

        qemu prints the format-specific data in its dictionary's hash order, and the
        human layout walks ``data`` as it is, so ``data`` is put in that order here:
        ``encrypt`` lands between ``refcount-bits`` and ``corrupt`` (and between an
        external data file's two keys), where qemu-img shows it.
        """
        if self.header.crypt_method == codec.CRYPT_AES:
            data["encrypt"] = {"format": "aes"}
        elif self.luks is not None:
            data["encrypt"] = _luks.describe(self.luks, qcow2=True)
        ordered = qemu_order(dict(data))
        assert isinstance(ordered, dict)
        data.clear()
        data.update(ordered)

    def _describe_data_file(self, data: dict[str, object]) -> None:
        if self.info.data_file is not None:
            data["data-file"] = self.info.data_file
            h = self.info.header
            data["data-file-raw"] = bool(h.autoclear_features & codec.Autoclear.DATA_FILE_RAW)

    @property
    def limits(self) -> Limits:
        return Limits(request_alignment=1)

    @property
    def caps(self) -> Caps:
        return Caps(block_status=True)

    async def aclose(self) -> None:
        # The child, the data file and the backing image belong to the opener's exit
        # stack, which closes them; here only the caches go.
        self._closed = True
        self._cache.clear()

    # -- metadata ---------------------------------------------------------------------
    def _corrupt(self, problem: str, offset: int | None = None) -> TrioconvIOError:
        return TrioconvIOError(f"{self.location}: corrupt qcow2 image: {problem}", offset=offset)

    async def load_bitmaps(self) -> list[bm.Bitmap]:
        """The image's persistent dirty bitmaps, read into memory.

        Raises:
            TrioconvIOError: a bitmap table or data cluster lies outside the file or is
                malformed, or the bitmaps would need more than ``bm.MAX_DATA_BYTES``.
        """
        out: list[bm.Bitmap] = []
        h, cs, file = self.header, self.layout.cluster_size, self.child
        total = 0
        for e in self.bitmap_entries:
            try:
                nbytes = bm.data_size(h.size, e.granularity_bits)
                total += nbytes
                if total > bm.MAX_DATA_BYTES:
                    raise bm.BitmapError(
                        f"the bitmaps need more than {bm.MAX_DATA_BYTES} bytes of memory"
                    )
                data = bytearray(nbytes)
                if e.table_offset + e.table_size * 8 > file.size:
                    # (Checked here, not on open: QEMU reads such an image, and only
                    # these bitmaps cannot be.)
                    raise bm.BitmapError(
                        f"bitmap '{e.name}': table at {e.table_offset:#x} lies past the end "
                        "of the file"
                    )
                raw = await file.pread(e.table_offset, e.table_size * 8)
                hosts: list[int] = []
                for i, entry in enumerate(codec.decode_table(raw)):
                    host, ones = bm.decode_table_entry(entry, cs)
                    lo = i * cs
                    n = min(cs, nbytes - lo)
                    if host:
                        if host + cs > file.size:
                            raise bm.BitmapError(
                                f"bitmap '{e.name}': data cluster {host:#x} lies past the "
                                "end of the file"
                            )
                        data[lo : lo + n] = await file.pread(host, n)
                        hosts.append(host)
                    elif ones:
                        data[lo : lo + n] = b"\xff" * n
            except bm.BitmapError as exc:
                raise self._corrupt(str(exc)) from None
            bits = bm.bit_count(h.size, e.granularity_bits)
            if bits % 8:
                data[-1] &= (1 << bits % 8) - 1  # unused tail bits read as zero
            out.append(
                bm.Bitmap(
                    e.name,
                    e.granularity_bits,
                    bool(e.flags & bm.AUTO),
                    bits,
                    data,
                    in_use=bool(e.flags & bm.IN_USE),
                    extra_data=e.extra_data,
                    extra_compatible=bool(e.flags & bm.EXTRA_DATA_COMPATIBLE),
                    stored=(e.table_offset, e.table_size, tuple(hosts)),
                )
            )
        return out

    async def _l2_table(self, index: int) -> tuple[array[int], bytes] | None:
        """The L2 table of L1 entry ``index`` (None when it has none), through the cache."""
        cs = self.layout.cluster_size
        try:
            offset = codec.l1_entry_offset(self._l1[index], cs, index)
        except codec.Qcow2FormatError as exc:
            raise self._corrupt(str(exc), exc.offset) from None
        if offset == 0:
            return None
        cached = self._cache.get(offset)
        if cached is not None:
            self._cache.move_to_end(offset)
            return cached
        if offset + cs > self.child.size:
            raise self._corrupt(
                f"L2 table offset {offset:#x} in L1 entry {index} lies beyond the end of "
                f"the file ({self.child.size} bytes)",
                offset,
            )
        raw = await self.child.pread(offset, cs)
        table = codec.decode_table(raw)
        self._cache[offset] = (table, raw)
        while len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)
        return table, raw

    async def _segments(self, offset: int, end: int) -> list[Segment]:
        """Map guest ``[offset, end)`` to merged segments."""
        out: list[Segment] = []
        pos = offset
        while pos < end:
            index = pos // self._table_span
            base = index * self._table_span
            stop = min(end, base + self._table_span)
            loaded = await self._l2_table(index)
            table, raw = loaded if loaded is not None else (None, b"")
            try:
                segs = codec.map_l2(table, raw, self.layout, base, pos, stop)
            except codec.Qcow2FormatError as exc:
                raise self._corrupt(str(exc), exc.offset) from None
            if out and segs:  # only the first can continue the last table's
                codec.append_segment(out, segs[0])
                out += segs[1:]
            else:
                out += segs
            pos = stop
        return out

    # -- reading ----------------------------------------------------------------------
    async def preadinto(self, offset: int, buf: memoryview) -> None:
        buf = buf.cast("B") if buf.format != "B" else buf
        if offset < 0 or offset + buf.nbytes > self.size:
            raise TrioconvIOError(
                f"{self.location}: read of {buf.nbytes} bytes at {offset} is outside the "
                f"image ({self.size} bytes)",
                offset=offset,
            )
        if self.header.crypt_method:
            raise UnsupportedError(
                f"{self.location}: encrypted qcow2 images are not supported (crypt method "
                f"{self.header.crypt_method}): trioconv has no key to read its data"
            )
        if not buf.nbytes:
            return
        compressed: list[Segment] = []
        host_reads: list[tuple[int, memoryview]] = []
        for seg in await self._segments(offset, offset + buf.nbytes):
            view = buf[seg.offset - offset : seg.end - offset]
            if seg.kind is ClusterKind.NORMAL:
                # Gathered and read in one batch: scattered clusters cost one hand-off.
                if self._data is self.child:
                    self._check_in_file(seg.host_offset, view.nbytes)
                n = max(0, min(view.nbytes, self._data.size - seg.host_offset))
                if n:
                    host_reads.append((seg.host_offset, view[:n]))
                if n < view.nbytes:
                    _fill_zero(view[n:])
            elif seg.kind is ClusterKind.UNALLOCATED and self.backing is not None:
                await self._read_backing(seg.offset, view)
            elif seg.kind is ClusterKind.COMPRESSED:
                compressed.append(seg)
            else:
                _fill_zero(view)
        if host_reads:
            await self._data.preadinto_many(host_reads)
        if compressed:
            await self._read_compressed(compressed, buf, offset)

    def _check_in_file(self, host: int, length: int) -> None:
        """Refuse a read of data clusters that lie wholly past the end of the image file.

        The file may end inside the last cluster it maps (the rest reads as zeroes, as
        in qemu; a raw external data file ends where the guest does, which is not
        checked here). A cluster that starts at or past the end is not data cut short
        but data that is gone - a truncated copy of the image - and reading it as
        zeroes would silently lose it, so the read fails instead (``--salvage`` still
        gets past it, one sector at a time).
        """
        cs, size = self.layout.cluster_size, self.child.size
        if (host + length - 1) // cs * cs < size:
            return
        bad = max(host // cs * cs, -(-size // cs) * cs)
        raise self._corrupt(
            f"data cluster at host offset {bad:#x} lies past the end of the file ({size} bytes)",
            bad,
        )

    async def _read_host(self, source: Driver, host: int, view: memoryview) -> None:
        """Read ``view`` at ``host`` of ``source``; bytes past its end read as zeroes."""
        await read_or_zero(source, host, view)

    async def _read_backing(self, guest: int, view: memoryview) -> None:
        assert self.backing is not None
        await self._read_host(self.backing, guest, view)

    async def _read_compressed(self, segs: list[Segment], buf: memoryview, offset: int) -> None:
        """Fetch the streams of ``segs`` (neighbours in one read) and inflate them."""
        file_size = self.child.size
        streams: list[bytes] = []
        group: list[Segment] = []

        async def fetch() -> None:
            start = group[0].host_offset
            stop = min(file_size, max(s.host_offset + s.compressed_size for s in group))
            if start >= file_size:
                raise self._corrupt(
                    f"compressed cluster at guest offset {group[0].cluster_offset:#x} starts "
                    f"at {start:#x}, beyond the end of the file ({file_size} bytes)",
                    start,
                )
            raw = await self.child.pread(start, stop - start)
            for s in group:
                at = s.host_offset - start
                streams.append(raw[at : at + s.compressed_size])

        for seg in segs:
            if group:
                lo = group[0].host_offset
                hi = max(s.host_offset + s.compressed_size for s in group)
                near = lo <= seg.host_offset <= hi + 512
                if not near or seg.host_offset + seg.compressed_size - lo > COMPRESSED_READ_SPAN:
                    await fetch()
                    group = []
            group.append(seg)
        await fetch()

        zstd = self.header.compression_type == codec.CompressionType.ZSTD
        cs = self.layout.cluster_size
        if sum(len(d) for d in streams) > THREAD_INFLATE_BYTES:
            plain = await trio.to_thread.run_sync(_inflate_all, streams, zstd, cs)
        else:
            plain = _inflate_all(streams, zstd, cs)
        for seg, data in zip(segs, plain, strict=True):
            if data is None:
                raise self._corrupt(
                    f"compressed cluster at guest offset {seg.cluster_offset:#x} (host offset "
                    f"{seg.host_offset:#x}) could not be decompressed",
                    seg.host_offset,
                )
            inner = seg.offset - seg.cluster_offset
            buf[seg.offset - offset : seg.end - offset] = data[inner : inner + seg.length]

    # -- block status -----------------------------------------------------------------
    async def block_status(self, offset: int, length: int) -> Extent:
        return await self._status(offset, length, layer=False)

    async def layer_status(self, offset: int, length: int) -> Extent:
        """This image's own clusters: DATA, ZERO (zero clusters, or unallocated with no
        backing image or past its end) or HOLE (unallocated: the backing image shows)."""
        return await self._status(offset, length, layer=True)

    async def _status(self, offset: int, length: int, *, layer: bool) -> Extent:
        check_range(self.location, self.size, "block status", offset, 1)
        cs = self.layout.cluster_size
        # Cover at least the rest of this cluster and end on a cluster boundary (or the
        # image's end); look at most STATUS_CLUSTERS clusters ahead.
        end = min(self.size, offset + max(length, 1), offset + STATUS_CLUSTERS * cs)
        if end < self.size:
            end = min(self.size, max(end // cs * cs, (offset // cs + 1) * cs))
        kind: ExtentKind | None = None
        stop = offset
        pos = offset
        # Map in small steps and stop at the first change of kind: mapping far ahead
        # only to return a short extent would make a walk over a mixed image quadratic.
        step = 256 * cs
        while pos < end:
            chunk_end = min(end, (pos // self._table_span + 1) * self._table_span, pos + step)
            step = min(step * 2, STATUS_CLUSTERS * cs)
            for seg in await self._segments(pos, chunk_end):
                pieces = self._layer_pieces(seg) if layer else await self._status_pieces(seg)
                for p_end, p_kind in pieces:
                    if kind is None:
                        kind = p_kind
                    elif p_kind is not kind:
                        return Extent(offset, stop - offset, kind)
                    stop = p_end
            pos = chunk_end
        assert kind is not None
        if kind is ExtentKind.ZERO and self.backing is None and stop < self.size:
            # Past an L1 entry with no table, whole table spans are unallocated: a
            # sparse image of a petabyte is a few extents, not a million.
            index = stop // self._table_span
            empty = _empty_entries(self._l1, index)
            if empty:
                stop = min(self.size, (index + empty) * self._table_span)
        return Extent(offset, stop - offset, kind)

    def _layer_pieces(self, seg: Segment) -> list[tuple[int, ExtentKind]]:
        """``(end, kind)`` pieces that tile ``seg``, for this layer alone."""
        if seg.kind in (ClusterKind.NORMAL, ClusterKind.COMPRESSED):
            return [(seg.end, ExtentKind.DATA)]
        backing_end = self.backing.size if self.backing is not None else 0
        if seg.kind is ClusterKind.ZERO or seg.offset >= backing_end:
            return [(seg.end, ExtentKind.ZERO)]
        if seg.end > backing_end:
            return [(backing_end, ExtentKind.HOLE), (seg.end, ExtentKind.ZERO)]
        return [(seg.end, ExtentKind.HOLE)]

    async def _status_pieces(self, seg: Segment) -> list[tuple[int, ExtentKind]]:
        """``(end, kind)`` pieces that tile ``seg``, in order."""
        if seg.kind in (ClusterKind.NORMAL, ClusterKind.COMPRESSED):
            return [(seg.end, ExtentKind.DATA)]
        if seg.kind is ClusterKind.ZERO or self.backing is None:
            return [(seg.end, ExtentKind.ZERO)]
        return await self._backing_pieces(seg.offset, seg.end)

    async def _backing_pieces(self, start: int, end: int) -> list[tuple[int, ExtentKind]]:
        """Unallocated here: DATA where the backing chain has data, else HOLE - as
        finely as the backing chain answers, not rounded to this image's clusters (a
        large-cluster overlay on a sparse base would otherwise copy whole clusters of
        the base's holes as data, as qemu-img does not)."""
        assert self.backing is not None
        out: list[tuple[int, ExtentKind]] = []
        pos = start
        backing_size = self.backing.size
        while pos < end:
            if pos >= backing_size:
                out.append((end, ExtentKind.HOLE))
                break
            ext = await self.backing.block_status(pos, min(end, backing_size) - pos)
            ext_end = min(end, pos + max(ext.length, 1))
            if ext.offset != pos:
                ext_end = pos + 1  # a confused answer: treat as data, conservatively
                data = True
            else:
                data = ext.kind is ExtentKind.DATA
            if ext_end >= backing_size and backing_size < end and not data:
                ext_end = end  # zeroes to the backing image's end, then past it
            stop = ext_end
            kind = ExtentKind.DATA if data else ExtentKind.HOLE
            if out and out[-1][1] is kind:
                out[-1] = (stop, kind)
            else:
                out.append((stop, kind))
            pos = stop
        return out


async def _open_backing(ctx: OpenContext, info: codec.ImageInfo) -> Driver | None:
    if info.backing_file is None or ctx.no_backing:
        return None
    path = _resolve(ctx, info.backing_file, "backing file")
    if any(_same_place(path, seen) for seen in (*ctx.chain, ctx.location)):
        raise ImageError(f"Backing file '{path}' creates an infinite loop")
    try:
        backing = await ctx.open_backing(path, info.backing_format)
    except BackingChainTooLong:
        raise
    except ImageError as exc:
        raise backing_error(f"Could not open '{ctx.location}'", exc) from None
    if info.backing_format is None and backing.name == "raw":
        raise ImageError(
            f"Could not open '{ctx.location}': backing file '{path}': backing file format "
            "not specified; probing a raw backing file is refused"
        )
    return backing


async def _read_snapshot_table(
    transport: Driver, info: codec.ImageInfo, where: str
) -> list[snapshots.Snapshot]:
    """The snapshot table, parsed (empty when there are no snapshots)."""
    h = info.header
    if not h.nb_snapshots:
        return []
    length = min(snapshots.table_bytes_bound(h.nb_snapshots), transport.size - h.snapshots_offset)
    if length <= 0:
        raise ImageError(f"{where}: the snapshot table lies beyond the end of the file")
    try:
        return snapshots.parse_snapshots(
            await transport.pread(h.snapshots_offset, length), h.nb_snapshots
        )
    except codec.Qcow2FormatError as exc:
        raise ImageError(f"{where}: {exc}") from None


def _load_snapshot(
    ctx: OpenContext, info: codec.ImageInfo, table: list[snapshots.Snapshot], file_size: int
) -> codec.ImageInfo:
    """The image as of the snapshot ``ctx.snapshot`` names: its L1 table, with the
    image's current size, as qemu loads a snapshot for reading (``-l``): an image grown
    since the snapshot reads past the snapshot's tables as unallocated."""
    assert ctx.snapshot is not None
    where = f"Failed to load snapshot '{ctx.snapshot}'"
    try:
        spec = snapshots.parse_snapshot_spec(ctx.snapshot)
    except ValueError as exc:
        raise ImageError(str(exc)) from None
    h = info.header
    snap = snapshots.find_snapshot(table, spec)
    if snap is None:
        raise ImageError(f"{where}: Can't find snapshot")
    if snap.l1_table_offset % info.layout.cluster_size or (
        snap.l1_size and snap.l1_table_offset + snap.l1_size * 8 > file_size
    ):
        raise ImageError(f"{where}: its L1 table at {snap.l1_table_offset:#x} is invalid")
    size = snap.disk_size if snap.disk_size is not None else h.size
    if snap.l1_size * info.layout.l2_entries * info.layout.cluster_size < min(size, h.size):
        raise ImageError(f"{where}: its L1 table is too small for {size} bytes")
    ctx.snapshot_loaded = True
    header = attrs.evolve(h, l1_table_offset=snap.l1_table_offset, l1_size=snap.l1_size)
    return attrs.evolve(info, header=header)


async def open_qcow2(
    transport: Driver, ctx: OpenContext, *, writable_data: bool = False
) -> Qcow2Driver:
    """Read the header and the active L1 table; open the data file and backing image.

    ``writable_data`` opens the external data file (if there is one) for writing.

    Raises:
        ImageError: the image is not valid qcow2, uses something this reader does not
            support, or its backing chain cannot be opened.
    """
    file_size = transport.size
    where = f"Could not open '{ctx.location}'"
    try:
        first = await transport.pread(0, min(file_size, codec.HEADER_READ))
        header = codec.parse_header(first)
        cluster = await transport.pread(0, min(file_size, header.cluster_size))
        # An encrypted image opens only to be described (alone, as info opens it).
        described = ctx.alone and not writable_data and not transport.caps.writable
        info = codec.parse_image(cluster, file_size, encrypted_ok=described)
        luks = await _read_luks_header(transport, info)
    except codec.Qcow2FormatError as exc:
        raise ImageError(f"{where}: {exc}") from None
    except _luks.LuksFormatError as exc:
        raise ImageError(f"{where}: its LUKS header: {exc}") from None
    except UnsupportedError as exc:
        raise UnsupportedError(f"{where}: its LUKS header: {exc}") from None
    except TrioconvIOError as exc:
        raise ImageError(f"{where}: {exc}") from None
    table = await _read_snapshot_table(transport, info, where)
    if ctx.snapshot is not None:
        info = _load_snapshot(ctx, info, table, file_size)
    h = info.header
    raw_l1 = await transport.pread(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b""
    l1 = codec.decode_table(raw_l1)
    needed = -(-h.size // (info.layout.l2_entries * info.layout.cluster_size))
    if len(l1) < needed:  # a snapshot's table, of a smaller disk: the rest unallocated
        l1.extend([0] * (needed - len(l1)))
    data: Driver | None = None
    if info.data_file is not None:
        # As qemu opens it: the name as stored, a relative one from the current
        # directory (see _writer._data_file_path), wherever the image itself is.
        path = info.data_file
        try:
            if writable_data:
                from ..._open import open_image

                data = await ctx.stack.enter_async_context(
                    open_image(path, "raw", writable=True, cache=ctx.cache)
                )
            else:
                data = await ctx.open_backing(path, "raw")
        except TrioconvError as exc:
            message = f"{where}: cannot open its external data file: {exc}"
            if not ctx.alone or writable_data:
                raise ImageError(message) from None
            data = _MissingDataFile(path, message)
    backing = await _open_backing(ctx, info)
    driver = Qcow2Driver(transport, info, l1, data=data, backing=backing)
    driver.location = ctx.location
    driver.snapshots = table
    driver.bitmap_entries = await _read_bitmap_directory(transport, info, where)
    driver.luks = luks
    return driver


async def _read_luks_header(transport: Driver, info: codec.ImageInfo) -> _luks.LuksHeader | None:
    """The LUKS header of a LUKS-encrypted image, where its extension says it is.

    None for an image that is not LUKS-encrypted, or has no such extension (qemu-img
    info shows that one too, encrypted, with no ``encrypt`` details). The header must
    lie inside the length the extension gives it; bytes past the end of the file read
    as zeroes.

    Raises:
        Qcow2FormatError: the extension is too short to hold a LUKS header.
        LuksFormatError, UnsupportedError: the header is not one to trust (LUKS2).
    """
    if info.header.crypt_method != codec.CRYPT_LUKS or info.crypto_header is None:
        return None
    offset, length = info.crypto_header
    if length < _luks.HEADER_SIZE:
        raise codec.Qcow2FormatError(
            f"the LUKS header's area ({length} bytes at {offset:#x}) is too short for a "
            f"LUKS header ({_luks.HEADER_SIZE} bytes)",
            offset,
        )
    raw = bytearray(_luks.HEADER_SIZE)
    await read_or_zero(transport, offset, memoryview(raw))
    return _luks.decode_header(raw)


class _MissingDataFile(Driver):
    """Stands in for an external data file that could not be opened, in an image opened
    alone (as ``qemu-img info`` opens one, reading no guest data): the image's tables
    still read, and a read of guest data fails with the reason the file did not open."""

    name = "file"

    def __init__(self, location: str, error: str) -> None:
        self.location = location
        self._error = error

    @property
    def size(self) -> int:
        return 2**63 - 1  # so no read is cut short and filled with zeroes instead

    async def preadinto(self, offset: int, buf: memoryview) -> None:
        raise TrioconvIOError(self._error, offset=offset)

    async def aclose(self) -> None:
        pass


async def _read_bitmap_directory(
    transport: Driver, info: codec.ImageInfo, where: str
) -> list[bm.DirectoryEntry]:
    """The bitmap directory, checked; [] when the image has no consistent bitmaps (no
    extension, or a program that did not keep them up to date cleared the autoclear bit)."""
    h = info.header
    body = info.bitmaps_extension
    if body is None or h.version < 3 or not h.autoclear_features & codec.Autoclear.BITMAPS:
        return []
    cs = h.cluster_size
    try:
        count, size, offset = bm.decode_extension(body)
        if offset % cs or offset + size > transport.size:
            raise bm.BitmapError(
                f"bitmap directory at {offset:#x} ({size} bytes) is misaligned or lies past "
                "the end of the file"
            )
        entries = bm.decode_directory(await transport.pread(offset, size), count)
        for e in entries:
            if e.type != bm.TYPE_DIRTY_TRACKING:
                raise bm.BitmapError(f"bitmap '{e.name}' has unknown type {e.type}")
            if not bm.MIN_GRANULARITY_BITS <= e.granularity_bits <= bm.MAX_GRANULARITY_BITS:
                raise bm.BitmapError(
                    f"bitmap '{e.name}' has granularity 2^{e.granularity_bits} (2^9 to 2^31)"
                )
            expected = bm.table_size(h.size, e.granularity_bits, cs)
            if e.table_size != expected:
                raise bm.BitmapError(
                    f"bitmap '{e.name}' has a table of {e.table_size} entries; the image's "
                    f"size needs {expected}"
                )
            if e.table_offset % cs:
                raise bm.BitmapError(
                    f"bitmap '{e.name}': table at {e.table_offset:#x} is not cluster aligned"
                )
    except bm.BitmapError as exc:
        raise ImageError(f"{where}: corrupt bitmaps: {exc}") from None
    return entries


def _empty_entries(l1: array[int], index: int) -> int:
    """How many L1 entries from ``index`` on are 0 (no L2 table), counted in C."""
    count = 0
    step = 4096
    while index + count < len(l1):
        chunk = l1[index + count : index + count + step].tobytes()
        rest = chunk.lstrip(b"\0")
        count += (len(chunk) - len(rest)) // 8
        if rest:
            break
    return count
