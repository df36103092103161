"""The null protocols: ``null-co://`` and ``null-aio://``, devices that hold nothing.

A null device has a size (1 GiB unless block options say otherwise) and no content:
writes are accepted and dropped, reads give zeroes. QEMU users point a conversion at
one to measure how fast the source can be read, with nothing written anywhere::

    trioconv convert -n -O raw disk.qcow2 null-co://
    trioconv convert -n disk.qcow2 --target-image-opts driver=null-co,size=20G

and read one as an empty source. Both names behave the same here (in QEMU they differ
only in how requests are completed). The block options are QEMU's: ``size``,
``read-zeroes`` (QEMU leaves the read buffer untouched unless it is on; trioconv
always gives zeroes) and ``latency-ns``, a delay added to every request, which makes a
null device a cheap stand-in for slow storage.

Like QEMU's, a null device is never created: a target must be given with ``-n``.
"""

from __future__ import annotations

import attrs
import trio

from .._errors import ImageError, UnsupportedError
from ..driver import Buffer, Caps, Driver, Extent, ExtentKind, Limits

__all__ = ["NullDriver", "NullOptions", "open_null"]

#: A null device's size when none is given (QEMU's default).
DEFAULT_SIZE = 1 << 30


@attrs.frozen
class NullOptions:
    """A null device's block options."""

    size: int = DEFAULT_SIZE
    read_zeroes: bool = False
    latency_ns: int = 0


class NullDriver(Driver):
    """A device of ``size`` bytes that drops writes and reads as zeroes.

    Its size is rounded up to whole 512-byte sectors, as QEMU counts it. Every request
    waits ``latency_ns`` first (none by default).
    """

    def __init__(
        self, protocol: str = "null-co", options: NullOptions | None = None, *, writable: bool
    ) -> None:
        options = options or NullOptions()
        self.name = protocol
        self.location = f"{protocol}://"
        self.options = options
        self._size = -(-options.size // 512) * 512
        self._delay = options.latency_ns / 1e9
        self._writable = writable

    @property
    def size(self) -> int:
        return self._size

    @property
    def limits(self) -> Limits:
        return Limits()

    @property
    def caps(self) -> Caps:
        # No zero_init: QEMU does not promise a null device reads as zeroes (it does
        # not, without read-zeroes), so zero runs are written - and cost nothing.
        return Caps(writable=self._writable, zeroes=True, trim=True, block_status=True)

    async def _wait(self) -> None:
        if self._delay:
            await trio.sleep(self._delay)
        else:
            await trio.lowlevel.checkpoint()

    def _check_write(self) -> None:
        if not self._writable:
            raise UnsupportedError(f"{self.location}: opened read-only")

    async def preadinto(self, offset: int, buf: memoryview) -> None:
        await self._wait()
        with memoryview(buf).cast("B") as view:
            view[:] = bytes(view.nbytes)

    async def pwrite(self, offset: int, data: Buffer) -> None:
        self._check_write()
        await self._wait()

    async def pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
    ) -> None:
        self._check_write()
        await self._wait()

    async def discard(self, offset: int, length: int) -> None:
        self._check_write()
        await self._wait()

    async def block_status(self, offset: int, length: int) -> Extent:
        # Nothing is stored: every range reads as zeroes (QEMU reports it unallocated,
        # or zero with read-zeroes; qemu-img converts it as zeroes either way).
        await self._wait()
        return Extent(offset, min(length, self._size - offset), ExtentKind.ZERO)

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def open_null(location: str, options: NullOptions | None, *, writable: bool) -> NullDriver:
    """Open a null device by name: ``null-co://`` or ``null-aio://`` exactly, as QEMU
    allows (options come only from block options).

    Raises:
        ImageError: any other name of a null protocol.
    """
    protocol, _, rest = location.partition("://")
    if rest:
        raise ImageError(
            f"Could not open '{location}': The only allowed filename for this driver is "
            f"'{protocol}://'"
        )
    return NullDriver(protocol, options, writable=writable)
