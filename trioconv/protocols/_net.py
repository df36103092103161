"""What the network clients (NBD, NFS, iSCSI) share: payloads received in place, and
readable causes of a lost connection."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import trio

from .._errors import TrioconvError, TrioconvIOError

__all__ = ["SPLIT_LIMIT", "WholeSends", "connection_error_reason", "receive_payload", "together"]


#: Pieces of one split request that run at once (see :func:`together`).
SPLIT_LIMIT = 128


async def together(
    calls: Sequence[Callable[[], Awaitable[None]]], *, limit: int = SPLIT_LIMIT
) -> None:
    """Run ``calls`` at the same time (at most ``limit`` at once); the first failure
    cancels the rest.

    A driver splits one request into several when the server's limits say so. The
    failure comes out as itself, not in an exception group, so that callers can catch
    :class:`~trioconv.ZeroesNotSupported` or :class:`~trioconv.TrioconvIOError` whether
    a request was split or not. ``limit`` keeps a server's tiny limits (a 512-byte
    maximum request) from turning one request into thousands of tasks.
    """
    if len(calls) == 1:
        await calls[0]()
        return
    queue = iter(calls)

    async def worker() -> None:
        for call in queue:
            await call()

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(min(limit, len(calls))):
                nursery.start_soon(worker)
    except BaseExceptionGroup as group:
        ours, rest = group.split(TrioconvError)
        if ours is None or rest is not None:
            raise
        first: BaseException = ours
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from group


def connection_error_reason(exc: BaseException) -> str:
    """Readable cause of a connection failure (trio hides errnos in ``__cause__``)."""
    todo: list[BaseException] = [exc]
    while todo:
        item = todo.pop(0)
        if isinstance(item, socket.gaierror):
            # A resolver error: its number is not the system's (-2 is EAI_NONAME).
            return f"Could not resolve host: {item.strerror or item}"
        if isinstance(item, OSError) and item.errno:
            return os.strerror(item.errno)
        if isinstance(item, BaseExceptionGroup):
            todo.extend(item.exceptions)
        if item.__cause__ is not None:
            todo.append(item.__cause__)
    return str(exc) or type(exc).__name__


async def receive_payload(
    fd: int,
    pos: int,
    end: int,
    wanted: Callable[[], memoryview | None],
    scratch: bytearray,
    peer: str = "server",
) -> None:
    """Receive bytes ``[pos, end)`` of a payload from socket ``fd`` straight into place.

    ``wanted()`` gives the buffer the payload belongs in (positions are indexes into it),
    or None once its owner has stopped waiting - cancelled, and maybe already reusing
    the buffer for something else. It is asked right before every ``os.readv``, with no
    checkpoint in between, so such a buffer is never written to: the rest of the payload
    goes into ``scratch`` and is dropped, which keeps the stream in step.

    Raises:
        TrioconvIOError: the peer closed the connection.
    """
    while pos < end:
        buf = wanted()
        target = memoryview(scratch)[: end - pos] if buf is None else buf[pos:end]
        try:
            n = os.readv(fd, [target])
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            continue
        finally:
            target.release()
        if not n:
            raise TrioconvIOError(f"the {peer} closed the connection")
        pos += n


class WholeSends:
    """The send side of a connection with many requests in flight.

    A request goes out whole or not at all: a requester cancelled half-way through
    its send would leave the stream mid-message, unusable for every other request, so
    sends run shielded from the requester's cancellation (one at a time, under
    :attr:`lock`). But when the connection itself is given up - its reader stopped
    because the conversion is ending, or the peer is gone - :meth:`abandon` cancels a
    send stuck on a full socket buffer (a peer that stopped reading), and every later
    :meth:`whole` fails at once::

        async with self._sends.whole(lambda: self.broken):
            await self._stream.send_all(message)
    """

    def __init__(self) -> None:
        self.lock = trio.Lock()
        self._scope: trio.CancelScope | None = None
        self._abandoned = False

    @asynccontextmanager
    async def whole(self, broken: Callable[[], TrioconvIOError | None]) -> AsyncIterator[None]:
        """Send inside: under the lock, shielded, unless the connection is given up.

        Raises:
            TrioconvIOError: ``broken()``, when the connection is (or becomes) unusable.
        """
        async with self.lock, self.shielded(broken):
            yield

    @asynccontextmanager
    async def shielded(self, broken: Callable[[], TrioconvIOError | None]) -> AsyncIterator[None]:
        """The shielded part of :meth:`whole`, for a caller that already holds the lock."""
        if self._abandoned or broken() is not None:
            raise broken() or TrioconvIOError("the connection is closed")
        with trio.CancelScope(shield=True) as scope:
            self._scope = scope
            try:
                yield
            finally:
                self._scope = None
        if scope.cancelled_caught:
            raise broken() or TrioconvIOError("the connection is closed")

    def abandon(self) -> None:
        """Give the connection up: stop the send under way, refuse the next ones."""
        self._abandoned = True
        if self._scope is not None:
            self._scope.cancel()
