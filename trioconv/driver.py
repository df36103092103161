"""The one driver contract that every image format and every transport keeps.

A *driver* is an open image: a range of ``size`` bytes that can be read, written, zeroed
and asked which parts hold data. Formats stack on transports the way QEMU stacks a
format driver on a protocol driver - raw over a file, later qcow2 over NBD - and the
copy engine only ever talks to the top of the stack through this contract:

==========================  ===========================================================
member                      meaning
==========================  ===========================================================
``size``                    virtual size in bytes, fixed after open
``limits``                  :class:`Limits`: alignment and transfer sizes (plain data)
``caps``                    :class:`Caps`: what the driver can do
``preadinto(off, buf)``     fill ``buf`` completely from ``off``; never short
``pread(off, n)``           convenience: returns ``bytes``
``pwrite(off, data)``       write all of ``data`` or raise
``pwrite_zeroes(off, n)``   make the range read as zeroes; may raise
                            :class:`~trioconv.ZeroesNotSupported`, and the caller then
                            writes zero buffers
``block_status(off, n)``    an :class:`Extent` starting at ``off`` that says whether it
                            holds DATA, reads as ZERO, or is a HOLE (unallocated in this
                            layer); its length is a hint and may be shorter or longer
``layer_status(off, n)``    like ``block_status``, but only for this layer, ignoring
                            what a backing image holds: DATA (held here), ZERO (reads
                            as zeroes because of this layer) or HOLE (not held here:
                            reads fall through to the backing image). The default
                            derives it from ``block_status``; formats with backing
                            images override it
``discard(off, n)``         deallocate the range (TRIM/UNMAP); what it reads as
                            afterwards is unspecified; may raise
                            :class:`~trioconv.UnsupportedError`
``flush()``                 make completed writes durable in the next layer down
``aclose()``                release everything; always closes, even when cancelled
==========================  ===========================================================

Offsets and lengths given by callers are in bytes and lie inside ``[0, size)``. Every
method may be called from many tasks at once, and cancelling one call leaves the driver
usable. Only :class:`~trioconv.TrioconvError` subclasses escape a driver.
"""

from __future__ import annotations

import abc
import enum
import mmap
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Self, TypeAlias

import attrs

from ._errors import UnsupportedError, UsageError, ZeroesNotSupported

__all__ = ["Buffer", "Caps", "Driver", "Extent", "ExtentKind", "Limits"]

#: What ``pwrite`` accepts: any contiguous bytes-like object.
Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap

#: Largest request a driver accepts unless it says otherwise.
DEFAULT_MAX_TRANSFER = 32 * 1024 * 1024


def require_trio(what: str) -> None:
    """Refuse, in one line, a call made outside a Trio task.

    trioconv runs on Trio. Awaited from asyncio (anyio's default backend included),
    Trio's primitives would fail deep inside, with "must be called from async context"
    or asyncio's "Task got bad yield"; entry points call this first to say instead
    what is wrong and how to run it. It costs a dictionary look-up, and loads nothing:
    when Trio was never imported, no Trio task can be running.

    Raises:
        UsageError: no Trio task is running in this thread.
    """
    trio = sys.modules.get("trio")
    if trio is None or not trio.lowlevel.in_trio_task():
        raise UsageError(
            f"{what} needs Trio: call it from a Trio task (trio.run, or "
            "anyio.run(..., backend='trio')), not from asyncio"
        )


class ExtentKind(enum.Enum):
    """What a range of an image holds, as far as this layer knows."""

    #: Allocated data: must be read to be known.
    DATA = "data"
    #: Reads as zeroes (allocated or not); nothing needs to be read.
    ZERO = "zero"
    #: Not allocated in this layer. With no backing image it reads as zeroes.
    HOLE = "hole"

    @property
    def reads_as_zero(self) -> bool:
        """True when the range is known to read as zeroes (no backing image assumed)."""
        return self is not ExtentKind.DATA


@attrs.frozen
class Extent:
    """A run of bytes of one kind: ``[offset, offset + length)``."""

    offset: int
    length: int
    kind: ExtentKind

    @property
    def end(self) -> int:
        """First byte after the extent."""
        return self.offset + self.length


@attrs.frozen
class Limits:
    """Request geometry a driver needs, as plain data (QEMU's ``BlockLimits``).

    Attributes:
        request_alignment: offsets and lengths should be multiples of this (the driver
            still accepts unaligned requests at the end of the image).
        max_transfer: the largest single read or write.
        opt_transfer: the request size that performs best; 0 when there is no preference.
        cluster_size: the format's allocation unit (qcow2 clusters, VHD blocks); 0 when
            there is none. Compressed writes come in whole clusters.
    """

    request_alignment: int = 1
    max_transfer: int = DEFAULT_MAX_TRANSFER
    opt_transfer: int = 0
    cluster_size: int = 0


@attrs.frozen
class Caps:
    """What a driver can do.

    Attributes:
        writable: opened for writing.
        zeroes: ``pwrite_zeroes`` is efficient (no data transferred).
        trim: the driver can discard ranges (:meth:`Driver.discard`).
        block_status: ``block_status`` returns real allocation information rather than
            reporting everything as DATA.
        zero_init: a newly created image of this kind reads as zeroes everywhere, so a
            conversion can skip zero runs.
        copy_range: the driver can offload copies from a driver of the same kind.
        compress: the driver takes compressed writes (:meth:`Driver.compress` and
            :meth:`Driver.pwrite_compressed`).
        max_writers: how many concurrent writers the driver tolerates (0 = unlimited).
    """

    writable: bool = False
    zeroes: bool = False
    trim: bool = False
    block_status: bool = False
    zero_init: bool = False
    copy_range: bool = False
    compress: bool = False
    max_writers: int = 0


class Driver(abc.ABC):
    """Base class of every format and transport driver. See the module docstring."""

    #: Short name of the driver, e.g. ``"file"`` or ``"raw"``.
    name: str = "driver"
    #: Human-readable description of what is open (a path or URI).
    location: str = ""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Virtual size in bytes."""

    @property
    def limits(self) -> Limits:
        """Request geometry; see :class:`Limits`."""
        return Limits()

    @property
    def caps(self) -> Caps:
        """Capabilities; see :class:`Caps`."""
        return Caps()

    @abc.abstractmethod
    async def preadinto(self, offset: int, buf: memoryview) -> None:
        """Fill all of ``buf`` with the bytes at ``offset``."""

    async def preadinto_many(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        """Fill several buffers from several offsets (a format's scattered clusters).

        The default reads them one after another; transports override it to batch them
        (one worker-thread hand-off for a local file, pipelined requests over a network).
        """
        for offset, buf in requests:
            await self.preadinto(offset, buf)

    async def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` into a new ``bytes`` object."""
        buf = bytearray(length)
        await self.preadinto(offset, memoryview(buf))
        return bytes(buf)

    async def pwrite(self, offset: int, data: Buffer) -> None:
        """Write all of ``data`` at ``offset``."""
        raise UnsupportedError(f"{self.name}: image is not writable")

    async def pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
    ) -> None:
        """Make ``[offset, offset + length)`` read as zeroes without sending zero bytes.

        Args:
            may_unmap: the range may be deallocated (a hole) rather than written.
            fast: only do it if it is fast (metadata, not writing zeroes); otherwise
                raise :class:`~trioconv.ZeroesNotSupported` and change nothing. The
                engine uses this to zero a whole existing target up front, as
                qemu-img does, when that costs next to nothing.

        Raises:
            ZeroesNotSupported: the caller should write zero buffers instead.
        """
        raise ZeroesNotSupported(f"{self.name}: write zeroes not supported")

    async def discard(self, offset: int, length: int) -> None:
        """Deallocate ``[offset, offset + length)`` (NBD TRIM, SCSI UNMAP).

        A hint to thin storage that the range is no longer needed: unlike
        :meth:`pwrite_zeroes` it promises nothing about what the range reads as
        afterwards. Transports that can discard override it.

        Raises:
            UnsupportedError: this driver cannot discard.
        """
        raise UnsupportedError(f"{self.name}: discard is not supported")

    async def compress(self, offset: int, data: memoryview) -> object:
        """Compress whole clusters of data bound for ``offset``; no I/O happens here.

        Compressed writes come in two steps so that the CPU work runs in parallel, in
        worker threads, *before* the copy engine hands out the turn to write, and the
        space for the result is then allocated in turn order:
        ``prepared = await target.compress(off, data)``, later
        ``await target.pwrite_compressed(off, prepared)``. ``offset`` is cluster-aligned
        and ``data`` covers whole clusters, except at the end of the image. The result
        is opaque to the caller; it must not refer to ``data``, which is reused.
        """
        raise UnsupportedError(f"{self.name}: compressed writes are not supported")

    async def pwrite_compressed(self, offset: int, prepared: object) -> None:
        """Write what :meth:`compress` prepared for ``offset``."""
        raise UnsupportedError(f"{self.name}: compressed writes are not supported")

    async def block_status(self, offset: int, length: int) -> Extent:
        """Say what ``[offset, ...)`` holds. The default: everything is DATA."""
        return Extent(offset, min(length, self.size - offset), ExtentKind.DATA)

    async def layer_status(self, offset: int, length: int) -> Extent:
        """Say what *this layer* holds at ``[offset, ...)`` (``qemu-img convert -B``).

        DATA: this layer holds data there (the copy engine copies it). ZERO: this layer
        makes the range read as zeroes - zero clusters, or an unallocated range with no
        backing image or past the backing image's end (the engine writes zeroes). HOLE:
        not held here, reads come from the backing image (the engine leaves the range
        unallocated in a target that has a backing file of its own).

        The default asks :meth:`block_status`. Without a backing image a HOLE reads as
        zeroes, so it becomes ZERO; with one, DATA may come from a lower layer (it is
        copied: correct, only larger) and a HOLE past the backing image's end becomes
        ZERO. Formats with backing images override this with their own allocation.
        """
        ext = await self.block_status(offset, length)
        if ext.kind is not ExtentKind.HOLE:
            return ext
        backing = self.backing
        if backing is None or offset >= backing.size:
            return Extent(ext.offset, ext.length, ExtentKind.ZERO)
        if ext.end > backing.size:
            return Extent(ext.offset, backing.size - ext.offset, ExtentKind.HOLE)
        return ext

    #: The backing image this image falls through to, when it has one.
    backing: Driver | None = None

    def describe(self) -> dict[str, object]:
        """Format details as ``qemu-img info --output json`` names them.

        The CLI's ``info`` adds these keys to the common ones (``virtual-size``,
        ``filename``, ``format``, ...): e.g. ``cluster-size``, ``backing-filename``,
        ``format-specific``. The default has nothing to add.
        """
        return {}

    async def flush(self) -> None:
        """Make completed writes durable in the next layer down."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the driver's resources. Safe to call more than once."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.location!r} size={self.size}>"
