"""What the network clients (NBD, NFS, iSCSI) share: payloads received in place, and
readable causes of a lost connection."""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

from .._errors import TrioconvIOError

__all__ = ["connection_error_reason", "receive_payload"]


def connection_error_reason(exc: BaseException) -> str:
    """Readable cause of a connection failure (trio hides errnos in ``__cause__``)."""
    todo: list[BaseException] = [exc]
    while todo:
        item = todo.pop(0)
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
