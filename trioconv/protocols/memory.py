"""An in-memory driver, for unit tests and for programs that convert to or from RAM.

It keeps the bytes in a ``bytearray`` and remembers which ``granularity``-sized chunks
were written, so ``block_status`` reports DATA and ZERO like a sparse file. Tests can
make it slow (``delay``), make it fail at an offset (``fail_read_at``/``fail_write_at``),
and look at what happened: ``log`` records every request as it *starts*, and
``max_writes_in_flight`` tells whether writes overlapped.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import attrs
import trio

from .._errors import TrioconvIOError, UnsupportedError
from ..driver import Buffer, Caps, Driver, Extent, ExtentKind, Limits, require_trio

__all__ = ["MemoryDriver", "Request"]


@attrs.frozen
class Request:
    """One request as the driver saw it start."""

    op: str
    offset: int
    length: int


class MemoryDriver(Driver):
    """A driver whose image lives in memory.

    Args:
        size: virtual size; ignored when ``data`` is given.
        data: initial content; written chunks are those holding a non-zero byte.
        writable: accept writes.
        granularity: allocation unit reported by ``block_status``.
        zeroes / block_status / zero_init: capabilities to advertise.
        delay: seconds, or a function of the request giving seconds, to sleep in every
            read and write.
    """

    name = "memory"

    def __init__(
        self,
        size: int = 0,
        *,
        data: bytes | None = None,
        writable: bool = True,
        granularity: int = 64 * 1024,
        zeroes: bool = True,
        block_status: bool = True,
        zero_init: bool = True,
        delay: float | Callable[[Request], float] = 0.0,
        request_alignment: int = 1,
        location: str = "memory",
        cluster_size: int = 0,
    ) -> None:
        if data is not None:
            size = len(data)
        self.data = bytearray(data) if data is not None else bytearray(size)
        self.granularity = granularity
        nchunks = -(-size // granularity)
        self.allocated = bytearray(nchunks)
        if data is not None:
            for i in range(nchunks):
                chunk = self.data[i * granularity : (i + 1) * granularity]
                if chunk.count(0) != len(chunk):
                    self.allocated[i] = 1
        self.location = location
        self._writable = writable
        self._caps = Caps(
            writable=writable,
            zeroes=zeroes,
            block_status=block_status,
            zero_init=zero_init,
            compress=bool(cluster_size),
        )
        self._limits = Limits(request_alignment=request_alignment, cluster_size=cluster_size)
        self._delay = delay
        self.fail_read_at: int | None = None
        self.fail_write_at: int | None = None
        self.log: list[Request] = []
        self.writes_in_flight = 0
        self.max_writes_in_flight = 0
        self.flushes = 0
        self.closed = False

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def caps(self) -> Caps:
        return self._caps

    def _check(self, op: str, offset: int, length: int) -> None:
        require_trio(type(self).__name__)
        if self.closed:
            raise TrioconvIOError(f"{self.location}: driver is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TrioconvIOError(
                f"{self.location}: {op} of {length} bytes at {offset} is outside the image",
                offset=offset,
            )

    async def _pause(self, req: Request) -> None:
        delay = self._delay(req) if callable(self._delay) else self._delay
        if delay:
            await trio.sleep(delay)
        else:
            await trio.lowlevel.checkpoint()

    def _mark(self, offset: int, length: int, value: int) -> None:
        g = self.granularity
        first, last = offset // g, -(-(offset + length) // g)
        if value:
            self.allocated[first:last] = b"\1" * (last - first)
        else:
            # Only whole chunks become unallocated.
            lo, hi = -(-offset // g), (offset + length) // g
            if offset + length == self.size:
                hi = last
            if hi > lo:
                self.allocated[lo:hi] = bytes(hi - lo)

    async def preadinto(self, offset: int, buf: memoryview) -> None:
        req = Request("read", offset, buf.nbytes)
        self.log.append(req)
        self._check("read", offset, buf.nbytes)
        await self._pause(req)
        if self.fail_read_at is not None and offset <= self.fail_read_at < offset + buf.nbytes:
            raise TrioconvIOError(
                f"error while reading {self.location} at byte {offset}: Input/output error",
                offset=offset,
            )
        buf[:] = self.data[offset : offset + buf.nbytes]

    async def pwrite(self, offset: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        req = Request("write", offset, view.nbytes)
        self.log.append(req)
        await self._write(req, view)

    async def pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
    ) -> None:
        if not self._caps.zeroes:
            await super().pwrite_zeroes(offset, length, may_unmap=may_unmap, fast=fast)
        req = Request("zero", offset, length)
        self.log.append(req)
        if not self._writable:
            raise UnsupportedError(f"{self.location}: opened read-only")
        self._check("zero", offset, length)
        await self._pause(req)
        self.data[offset : offset + length] = bytes(length)
        self._mark(offset, length, 0 if may_unmap else 1)

    async def compress(self, offset: int, data: memoryview) -> object:
        """zlib in a worker thread (with ``cluster_size`` set); see :meth:`Driver.compress`."""
        if not self._caps.compress:
            return await super().compress(offset, data)
        require_trio(type(self).__name__)
        self.log.append(Request("compress", offset, data.nbytes))
        payload = data.tobytes()
        return await trio.to_thread.run_sync(zlib.compress, payload)

    async def pwrite_compressed(self, offset: int, prepared: object) -> None:
        """Write what :meth:`compress` prepared: a write like :meth:`pwrite`, refused
        when read-only or closed, failed by ``fail_write_at``, counted in
        ``max_writes_in_flight``, and logged as ``"compressed"``."""
        if not isinstance(prepared, bytes):
            raise TypeError("pwrite_compressed takes what compress() returned")
        data = zlib.decompress(prepared)
        req = Request("compressed", offset, len(data))
        self.log.append(req)
        await self._write(req, data)

    async def _write(self, req: Request, data: Buffer) -> None:
        """Store ``data`` at ``req.offset`` after the request's delay: the common part
        of plain and compressed writes."""
        offset, length = req.offset, req.length
        if not self._writable:
            raise UnsupportedError(f"{self.location}: opened read-only")
        self._check("write", offset, length)
        self.writes_in_flight += 1
        self.max_writes_in_flight = max(self.max_writes_in_flight, self.writes_in_flight)
        try:
            await self._pause(req)
            if self.fail_write_at is not None and offset <= self.fail_write_at < offset + length:
                raise TrioconvIOError(
                    f"error while writing {self.location} at byte {offset}: Input/output error",
                    offset=offset,
                )
            self.data[offset : offset + length] = data
            self._mark(offset, length, 1)
        finally:
            self.writes_in_flight -= 1

    async def block_status(self, offset: int, length: int) -> Extent:
        # (An extent starts at ``offset``, so it must be a byte of the image.)
        self._check("block status", offset, 1)
        end = min(self.size, offset + length)
        if not self._caps.block_status:
            return Extent(offset, end - offset, ExtentKind.DATA)
        await trio.lowlevel.checkpoint()
        g = self.granularity
        i = offset // g
        state = self.allocated[i]
        j = i + 1
        while j * g < end and self.allocated[j] == state:
            j += 1
        stop = min(j * g, end)
        kind = ExtentKind.DATA if state else ExtentKind.ZERO
        return Extent(offset, stop - offset, kind)

    async def flush(self) -> None:
        require_trio(type(self).__name__)
        await trio.lowlevel.checkpoint()
        self.flushes += 1

    async def aclose(self) -> None:
        self.closed = True
