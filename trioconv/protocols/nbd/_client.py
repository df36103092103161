"""A Trio NBD client: one connection, many requests in flight, one reader task.

Requests are written under a send lock (header and payload together, shielded from
cancellation so a half-sent request can never corrupt the stream) and wait on their own
event. A single reader task feeds received bytes to the sans-I/O
:class:`~trioconv.protocols.nbd._proto.ReplyParser` and routes each reply to its request
by cookie, copying read data straight into the requester's buffer. If the connection
drops, the reader fails every waiting request at once and raises, which cancels whatever
runs inside :func:`open_nbd` - a conversion stops promptly instead of hanging.
"""

from __future__ import annotations

import errno as errno_mod
import functools
import itertools
import logging
import os
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from ..._cache import CacheMode
from ..._errors import (
    ImageError,
    TrioconvError,
    TrioconvIOError,
    UnsupportedError,
    ZeroesNotSupported,
)
from ..._open import is_nbd_uri as is_nbd_uri
from ...driver import Buffer, Caps, Driver, Extent, ExtentKind, Limits
from .._net import WholeSends, receive_payload, together
from . import _proto as proto
from ._proto import Cmd, CmdFlag, TxFlag

log = logging.getLogger(__name__)

__all__ = [
    "MultiConnDriver",
    "NBDAddress",
    "NBDDriver",
    "is_nbd_uri",
    "open_nbd",
    "parse_nbd_uri",
]

DEFAULT_PORT = 10809
_SCHEMES = ("nbd", "nbds", "nbd+tcp", "nbds+tcp", "nbd+unix", "nbds+unix")
_MAX_ZERO = 1 << 30
_MAX_STATUS = 1 << 30
#: Read payloads with at least this much still to come are received straight into the
#: requester's buffer rather than through the parser's.
_DIRECT_MIN = 64 * 1024
_HANDSHAKE_TIMEOUT = 30.0


@attrs.frozen
class NBDAddress:
    """Where an export lives, parsed from an NBD URI.

    Attributes:
        tls_certificates: folder holding ``ca-cert.pem`` (and optionally
            ``client-cert.pem``/``client-key.pem``), from ``?tls-certificates=DIR``.
        tls_hostname: the name the server certificate must carry, from
            ``?tls-hostname=NAME``; the host of a TCP URI by default.
        tls_verify: False (``?tls-verify-peer=false``) accepts any server certificate.
    """

    export: str
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None
    tls: bool = False
    tls_certificates: str | None = None
    tls_hostname: str | None = None
    tls_verify: bool = True

    @property
    def uri(self) -> str:
        """The address written back as a URI."""
        quoted = urllib.parse.quote(self.export)
        s = "s" if self.tls else ""
        if self.socket is not None:
            return f"nbd{s}+unix:///{quoted}?socket={self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd{s}://{host}:{self.port}/{quoted}"


#: The query parameters of an NBD URI: QEMU's ``socket``, libnbd's TLS ones.
_URI_PARAMETERS = frozenset({"socket", "tls-certificates", "tls-hostname", "tls-verify-peer"})


def parse_nbd_uri(uri: str) -> NBDAddress:
    """Parse ``nbd://host[:port]/export`` or ``nbd+unix:///export?socket=PATH``.

    Raises:
        UsageError-like ImageError: the URI is malformed.
    """
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ImageError(f"'{uri}' is not an NBD URI")
    tls = scheme.startswith("nbds")
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - _URI_PARAMETERS)
    if unknown:
        raise ImageError(f"'{uri}': unknown NBD URI parameter '{unknown[0]}'")
    certs = query.get("tls-certificates", [None])[0]
    tls_hostname = query.get("tls-hostname", [None])[0]
    verify_text = query.get("tls-verify-peer", ["true"])[0].lower()
    if verify_text not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
        raise ImageError(f"'{uri}': tls-verify-peer must be true or false")
    verify = verify_text in ("true", "1", "on", "yes")
    if scheme.endswith("+unix"):
        sockets = query.get("socket")
        if not sockets:
            raise ImageError(f"'{uri}': an nbd+unix URI needs ?socket=PATH")
        if parts.netloc:
            raise ImageError(f"'{uri}': an nbd+unix URI has no host")
        return NBDAddress(
            export=export,
            socket=sockets[0],
            tls=tls,
            tls_certificates=certs,
            tls_hostname=tls_hostname,
            tls_verify=verify,
        )
    if not parts.hostname:
        raise ImageError(f"'{uri}': missing host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ImageError(f"'{uri}': invalid port") from None
    return NBDAddress(
        export=export,
        host=parts.hostname,
        port=port,
        tls=tls,
        tls_certificates=certs,
        tls_hostname=tls_hostname or parts.hostname,
        tls_verify=verify,
    )


def _tls_context(address: NBDAddress) -> ssl.SSLContext:
    """A client TLS context verifying the server against the given CA."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if address.tls_certificates is not None:
        folder = Path(address.tls_certificates)
        if address.tls_verify or (folder / "ca-cert.pem").exists():
            ctx.load_verify_locations(cafile=folder / "ca-cert.pem")
        if (folder / "client-cert.pem").exists():
            ctx.load_cert_chain(folder / "client-cert.pem", folder / "client-key.pem")
    ctx.check_hostname = address.tls_hostname is not None and address.tls_verify
    if not address.tls_verify:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@attrs.define(eq=False)
class _Pending:
    cmd: Cmd
    offset: int
    buf: memoryview | None = None
    error: TrioconvIOError | None = None
    #: A structured READ: its length, and how many of its bytes the chunks so far gave
    #: (data or holes); a reply that ends short is an error, not a buffer left stale.
    length: int = 0
    covered: int = 0
    extents: tuple[tuple[int, int], ...] = ()
    done: trio.Event = attrs.field(factory=trio.Event)


class NBDDriver(Driver):
    """An NBD export. Made by :func:`open_nbd`, which also runs its reader task."""

    name = "nbd"

    def __init__(
        self,
        stream: trio.abc.Stream,
        info: proto.ExportInfo,
        address: NBDAddress,
        *,
        writable: bool,
        leftover: bytes = b"",
        cache: CacheMode = CacheMode.WRITEBACK,
    ) -> None:
        self._stream = stream
        self.info = info
        # Write-through (``writethrough``, ``directsync``): every write carries FUA, or,
        # on a server without it, a FLUSH follows each write, as qemu emulates FUA.
        self._fua = CmdFlag.FUA if cache.dsync and info.flags & TxFlag.SEND_FUA else CmdFlag.NONE
        self._flush_each = cache.dsync and not self._fua
        self.address = address
        self.location = address.uri
        self._writable = writable
        self._parser = proto.ReplyParser(max_payload=info.max_block + 4096)
        if leftover:
            self._parser.receive_data(leftover)
        self._pending: dict[int, _Pending] = {}
        self._cookies = itertools.count(1)
        self._sends = WholeSends()
        self._closing = False
        self._broken: TrioconvIOError | None = None
        self._status: list[Extent] = []
        self._zero = bytes(min(info.max_block, 256 * 1024))
        self._scratch = bytearray(256 * 1024)
        #: Serialises read-modify-writes of blocks under the server's minimum block
        #: size; shared by every connection to the export (see :meth:`_patch_edges`).
        self.edges_lock = trio.Lock()

    # -- geometry ------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.info.size

    @property
    def limits(self) -> Limits:
        return Limits(
            request_alignment=self.info.min_block,
            max_transfer=self.info.max_block,
            opt_transfer=self.info.preferred_block,
        )

    @property
    def caps(self) -> Caps:
        flags = self.info.flags
        return Caps(
            writable=self._writable,
            zeroes=bool(flags & TxFlag.SEND_WRITE_ZEROES),
            trim=bool(flags & TxFlag.SEND_TRIM),
            block_status=self.info.allocation_context is not None,
            zero_init=False,
        )

    # -- the reader task -------------------------------------------------------------------
    async def reader(self) -> None:
        """Receive replies and route them until the connection closes."""
        # A plain socket is read into the parser's buffer, and the bulk of each read
        # payload straight into the requester's buffer; TLS goes through the stream.
        # Either way each payload byte is copied at most once in user space.
        sock = getattr(self._stream, "socket", None)
        try:
            while True:
                if sock is not None:
                    with self._parser.get_buffer() as space:
                        n = await sock.recv_into(space)
                    self._parser.buffer_updated(n)
                else:
                    data = await self._stream.receive_some(256 * 1024)
                    n = len(data)
                    self._parser.receive_data(data)
                if not n:
                    raise TrioconvIOError("the server closed the connection")
                while True:
                    event = self._parser.next_event()
                    if event is not None:
                        self._dispatch(event)
                        continue
                    if sock is None:
                        break
                    direct = self._parser.direct_payload(_DIRECT_MIN)
                    if direct is None:
                        break
                    await self._receive_direct(sock, direct)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
            proto.NBDProtocolError,
            TrioconvIOError,
        ) as exc:
            if self._closing:
                return
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            error = TrioconvIOError(f"{self.location}: connection to the NBD server lost: {reason}")
            self._give_up(error)
            raise error from exc
        except BaseException:
            # Cancelled: the conversion is ending and nothing reads replies any more.
            self._give_up(TrioconvIOError(f"{self.location}: the connection is closed"))
            raise

    def _give_up(self, error: TrioconvIOError) -> None:
        """The connection is unusable: fail every request waiting on it, stop a send
        stuck on a server that stopped reading, refuse new requests."""
        if self._broken is None:
            self._broken = error
        for pending in self._pending.values():
            pending.error = self._broken
            pending.done.set()
        self._pending.clear()
        self._sends.abandon()

    async def _receive_direct(
        self, sock: trio.socket.SocketType, direct: proto.DirectPayload
    ) -> None:
        """Receive the rest of a read payload straight into the requester's buffer.

        The bytes are read with ``os.readv`` right after checking that the request still
        wants them - with no checkpoint in between - so a requester that was cancelled
        (and may already reuse its buffer) never gets written to; its bytes are
        received into scratch space and dropped.
        """
        event = direct.event
        pending = self._pending.get(event.cookie)
        if pending is None:
            raise proto.NBDProtocolError(f"reply for unknown cookie {event.cookie}")
        data = event.data
        assert data is not None  # a direct payload always has its (maybe empty) start
        have = data.nbytes
        start = event.offset - pending.offset if isinstance(event, proto.DataChunk) else 0
        end = start + have + direct.remaining
        if pending.buf is not None:
            if start < 0 or end > pending.buf.nbytes:
                raise proto.NBDProtocolError("read chunk outside the request")
            pending.buf[start : start + have] = data
        pos = start + have
        await receive_payload(sock.fileno(), pos, end, lambda: pending.buf, self._scratch)
        pending.covered += end - start
        if isinstance(event, proto.SimpleReply) or event.done:
            self._complete(event.cookie, pending)

    def _complete(self, cookie: int, pending: _Pending) -> None:
        if (
            pending.cmd is Cmd.READ
            and self.info.structured
            and pending.error is None
            and pending.covered != pending.length
        ):
            pending.error = TrioconvIOError(
                f"{self.location}: the server's reply to a read of {pending.length} bytes "
                f"at byte {pending.offset} gave {pending.covered}",
                offset=pending.offset,
                errno=errno_mod.EIO,
            )
        del self._pending[cookie]
        self._parser.forget(cookie)
        pending.done.set()

    def _dispatch(self, event: proto.ReplyEvent) -> None:
        pending = self._pending.get(event.cookie)
        if pending is None:
            raise proto.NBDProtocolError(f"reply for unknown cookie {event.cookie}")
        done = True
        if isinstance(event, proto.SimpleReply):
            if event.error:
                pending.error = self._server_error(pending, event.error, "")
                pending.covered = pending.length  # (an error: nothing else is due)
            elif pending.cmd is Cmd.READ and self.info.structured:
                raise proto.NBDProtocolError("a simple reply to a read (structured replies)")
            elif event.data is not None and pending.buf is not None:
                pending.buf[:] = event.data
        elif isinstance(event, proto.DataChunk):
            start = event.offset - pending.offset
            if pending.buf is not None:
                if start < 0 or start + event.data.nbytes > pending.buf.nbytes:
                    raise proto.NBDProtocolError("read chunk outside the request")
                pending.buf[start : start + event.data.nbytes] = event.data
            pending.covered += event.data.nbytes
            done = event.done
        elif isinstance(event, proto.HoleChunk):
            start = event.offset - pending.offset
            if pending.buf is not None:
                if start < 0 or start + event.length > pending.buf.nbytes:
                    raise proto.NBDProtocolError("hole chunk outside the request")
                zero = memoryview(self._zero)
                for pos in range(start, start + event.length, zero.nbytes):
                    n = min(zero.nbytes, start + event.length - pos)
                    pending.buf[pos : pos + n] = zero[:n]
            pending.covered += event.length
            done = event.done
        elif isinstance(event, proto.StatusChunk):
            if event.context == self.info.allocation_context:
                pending.extents = event.extents
            done = event.done
        elif isinstance(event, proto.ErrorChunk):
            pending.error = self._server_error(pending, event.error, event.message)
            done = event.done
        if done:
            self._complete(event.cookie, pending)

    def _server_error(self, pending: _Pending, error: int, message: str) -> TrioconvIOError:
        what = {
            Cmd.READ: "reading",
            Cmd.WRITE: "writing",
            Cmd.WRITE_ZEROES: "zeroing",
            Cmd.FLUSH: "flushing",
            Cmd.BLOCK_STATUS: "querying block status of",
            Cmd.TRIM: "trimming",
        }.get(pending.cmd, "accessing")
        text = proto.errno_text(error) + (f" ({message})" if message else "")
        return TrioconvIOError(
            f"error while {what} {self.location} at byte {pending.offset}: {text}",
            offset=pending.offset,
            errno=errno_mod.ENOTSUP if error == 95 else error,
        )

    # -- requests ----------------------------------------------------------------------------
    async def _request(
        self,
        cmd: Cmd,
        offset: int,
        length: int,
        *,
        flags: CmdFlag = CmdFlag.NONE,
        payload: memoryview | None = None,
        buf: memoryview | None = None,
    ) -> _Pending:
        if self._broken is not None:
            raise self._broken
        if self._closing:
            raise TrioconvIOError(f"{self.location}: connection is closed")
        cookie = next(self._cookies)
        pending = _Pending(cmd, offset, buf, length=length)
        self._pending[cookie] = pending
        if cmd is Cmd.READ and not self.info.structured:
            self._parser.expect_read(cookie, length)
        header = proto.encode_request(cmd, cookie, offset, length, flags)
        try:
            # A request is sent whole (see WholeSends); the reader gives the connection
            # up if the server goes away or the conversion ends.
            async with self._sends.whole(lambda: self._broken):
                try:
                    if payload is None:
                        await self._stream.send_all(header)
                    elif payload.nbytes <= 65536:
                        await self._stream.send_all(header + payload)
                    else:
                        await self._stream.send_all(header)
                        await self._stream.send_all(payload)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise self._broken or TrioconvIOError(
                        f"{self.location}: connection to the NBD server lost: {exc}"
                    ) from exc
            await pending.done.wait()
        except BaseException:
            # Cancelled or failed: the reply may still come; never write into ``buf``.
            pending.buf = None
            raise
        if pending.error is not None:
            raise pending.error
        return pending

    async def _split(
        self, cmd: Cmd, offset: int, view: memoryview, flags: CmdFlag = CmdFlag.NONE
    ) -> None:
        """Send one request per max-block piece, all in flight together."""
        step = self.info.max_block
        if view.nbytes <= step:
            if cmd is Cmd.READ:
                await self._request(cmd, offset, view.nbytes, buf=view)
            else:
                await self._request(cmd, offset, view.nbytes, flags=flags, payload=view)
            return
        await together(
            [
                functools.partial(
                    self._split, cmd, offset + start, view[start : start + step], flags
                )
                for start in range(0, view.nbytes, step)
            ]
        )

    async def preadinto(self, offset: int, buf: memoryview) -> None:
        view = buf.cast("B") if buf.format != "B" else buf
        if not view.nbytes:
            return
        a = self.info.min_block
        if not (offset | view.nbytes) % a:
            await self._split(Cmd.READ, offset, view)
            return
        # Under the server's minimum block size: whole blocks are read, the edges
        # through a block-sized buffer (a server may refuse anything else).
        start, end = offset, offset + view.nbytes
        inner_start, inner_end = self._whole_blocks(start, end)
        if inner_start < inner_end:
            await self._split(Cmd.READ, inner_start, view[inner_start - start : inner_end - start])
        for block in self._edge_blocks(start, end):
            data = await self._read_block(block)
            lo, hi = max(start, block), min(end, block + len(data))
            view[lo - start : hi - start] = data[lo - block : hi - block]

    def _whole_blocks(self, start: int, end: int) -> tuple[int, int]:
        """The part of ``[start, end)`` made of whole minimum-size blocks (empty when
        the range covers none)."""
        a = self.info.min_block
        return -(-start // a) * a, end // a * a

    def _edge_blocks(self, start: int, end: int) -> list[int]:
        """The starts of the minimum-size blocks that ``[start, end)`` covers in part."""
        a = self.info.min_block
        blocks = []
        if start % a:
            blocks.append(start - start % a)
        if end % a and (not blocks or end - end % a != blocks[0]):
            blocks.append(end - end % a)
        return blocks

    async def _read_block(self, block: int) -> bytearray:
        """The minimum-size block at ``block`` (shorter at the export's end)."""
        data = bytearray(min(self.info.min_block, self.size - block))
        await self._split(Cmd.READ, block, memoryview(data))
        return data

    async def _patch_edges(self, start: int, end: int, data: memoryview | None) -> None:
        """Write ``[start, end)``'s bytes (``data``; zeroes when None) into the blocks it
        covers in part: read the block, patch it, write it whole, as qemu does for
        servers with a minimum block size. One at a time per export, so two requests
        that each cover part of the same block do not undo each other."""
        async with self.edges_lock:
            for block in self._edge_blocks(start, end):
                buf = await self._read_block(block)
                lo, hi = max(start, block), min(end, block + len(buf))
                if data is None:
                    buf[lo - block : hi - block] = bytes(hi - lo)
                else:
                    buf[lo - block : hi - block] = data[lo - start : hi - start]
                await self._split(Cmd.WRITE, block, memoryview(buf), self._fua)

    async def preadinto_many(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        """All the reads in flight at once."""
        if requests:
            await together([functools.partial(self.preadinto, off, buf) for off, buf in requests])

    async def pwrite(self, offset: int, data: Buffer) -> None:
        if not self._writable:
            raise UnsupportedError(f"{self.location}: opened read-only")
        view = memoryview(data).cast("B")
        if not view.nbytes:
            return
        a = self.info.min_block
        if (offset | view.nbytes) % a:
            start, end = offset, offset + view.nbytes
            inner_start, inner_end = self._whole_blocks(start, end)
            if inner_start < inner_end:
                inner = view[inner_start - start : inner_end - start]
                await self._split(Cmd.WRITE, inner_start, inner, self._fua)
            await self._patch_edges(start, end, view)
        else:
            await self._split(Cmd.WRITE, offset, view, self._fua)
        if self._flush_each:
            await self.flush()

    async def pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
    ) -> None:
        if not self._writable:
            raise UnsupportedError(f"{self.location}: opened read-only")
        if not self.info.flags & TxFlag.SEND_WRITE_ZEROES:
            raise ZeroesNotSupported(f"{self.location}: server cannot write zeroes")
        if fast and not self.info.flags & TxFlag.SEND_FAST_ZERO:
            raise ZeroesNotSupported(f"{self.location}: server cannot promise fast zeroes")
        flags = (CmdFlag.NONE if may_unmap else CmdFlag.NO_HOLE) | self._fua
        if fast:
            flags |= CmdFlag.FAST_ZERO
        a = self.info.min_block
        if (offset | length) % a:
            # Under the server's minimum block size: the blocks covered in part get
            # zero bytes (read, patched, written), which is never fast.
            if fast:
                raise ZeroesNotSupported(f"{self.location}: zeroing part of a block is not fast")
            end = offset + length
            inner_start, inner_end = self._whole_blocks(offset, end)
            if inner_start < inner_end:
                await self.pwrite_zeroes(inner_start, inner_end - inner_start, may_unmap=may_unmap)
            await self._patch_edges(offset, end, None)
            if self._flush_each:
                await self.flush()
            return
        step = _MAX_ZERO - _MAX_ZERO % a
        pieces = range(offset, offset + length, step)
        await together(
            [
                functools.partial(
                    self._zero_piece, start, min(step, offset + length - start), flags
                )
                for start in pieces
            ]
        )
        if self._flush_each:
            await self.flush()

    async def _zero_piece(self, offset: int, length: int, flags: CmdFlag) -> None:
        try:
            await self._request(Cmd.WRITE_ZEROES, offset, length, flags=flags)
        except TrioconvIOError as exc:
            if exc.errno in (errno_mod.ENOTSUP, errno_mod.EOPNOTSUPP):
                raise ZeroesNotSupported(str(exc)) from exc
            raise

    async def discard(self, offset: int, length: int) -> None:
        """Tell the server that ``[offset, offset + length)`` is no longer needed
        (``NBD_CMD_TRIM``): it may deallocate the range, which then reads as zeroes or
        as what it held before - the protocol promises neither.

        Requests larger than the server's maximum are split and sent together.

        Raises:
            UnsupportedError: opened read-only, or the server does not take trims.
            TrioconvIOError: the server failed a trim.
        """
        if not self._writable:
            raise UnsupportedError(f"{self.location}: opened read-only")
        if not self.info.flags & TxFlag.SEND_TRIM:
            raise UnsupportedError(f"{self.location}: server cannot discard")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TrioconvIOError(
                f"{self.location}: discard of {length} bytes at {offset} is outside the export",
                offset=offset,
            )
        step = self.info.max_block - self.info.max_block % self.info.min_block
        pieces = range(offset, offset + length, step)
        await together(
            [
                functools.partial(self._trim_piece, start, min(step, offset + length - start))
                for start in pieces
            ]
        )

    async def _trim_piece(self, offset: int, length: int) -> None:
        await self._request(Cmd.TRIM, offset, length)

    async def block_status(self, offset: int, length: int) -> Extent:
        end = min(self.size, offset + length)
        if self.info.allocation_context is None:
            return Extent(offset, end - offset, ExtentKind.DATA)
        for ext in self._status:
            if ext.offset <= offset < ext.end:
                return Extent(offset, min(ext.end, end) - offset, ext.kind)
        want = min(end - offset, _MAX_STATUS)
        pending = await self._request(Cmd.BLOCK_STATUS, offset, want)
        if not pending.extents:
            raise TrioconvIOError(f"{self.location}: server sent no block status at byte {offset}")
        extents: list[Extent] = []
        pos = offset
        for n, state in pending.extents:
            if n == 0 or pos >= self.size:
                break
            n = min(n, self.size - pos)
            kind = ExtentKind.ZERO if state & proto.STATE_ZERO else ExtentKind.DATA
            if extents and extents[-1].kind is kind:
                extents[-1] = Extent(extents[-1].offset, extents[-1].length + n, kind)
            else:
                extents.append(Extent(pos, n, kind))
            pos += n
        if not extents:
            raise TrioconvIOError(f"{self.location}: empty block status at byte {offset}")
        self._status = extents
        first = extents[0]
        return Extent(offset, min(first.end, end) - offset, first.kind)

    async def flush(self) -> None:
        if self._writable and self.info.flags & TxFlag.SEND_FLUSH:
            await self._request(Cmd.FLUSH, 0, 0)

    async def aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            if self._broken is None:
                try:
                    async with self._sends.whole(lambda: self._broken):
                        await self._stream.send_all(proto.encode_request(Cmd.DISC, 0))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                except TrioconvIOError:
                    pass  # given up meanwhile
            await self._stream.aclose()


class MultiConnDriver(Driver):
    """Several connections to one export, used together (``NBD_FLAG_CAN_MULTI_CONN``).

    The server promises that all connections see one consistent image and that a flush
    on any of them covers writes completed on all, so requests can go to whichever
    connection has the fewest in flight. Block status always uses the first connection
    (its extent cache then stays useful); flush goes to every connection.
    """

    name = "nbd"

    def __init__(self, connections: list[NBDDriver]) -> None:
        self.connections = connections
        self.location = connections[0].location
        self._load = [0] * len(connections)
        self._closing = False

    def add(self, conn: NBDDriver) -> bool:
        """Use one more connection from now on (it shares the first one's edge lock);
        False, and not used, once the driver is closing."""
        if self._closing:
            return False
        conn.edges_lock = self.connections[0].edges_lock
        self.connections.append(conn)
        self._load.append(0)
        return True

    @property
    def size(self) -> int:
        return self.connections[0].size

    @property
    def limits(self) -> Limits:
        return self.connections[0].limits

    @property
    def caps(self) -> Caps:
        return self.connections[0].caps

    @asynccontextmanager
    async def _pick(self) -> AsyncIterator[NBDDriver]:
        i = self._load.index(min(self._load))
        self._load[i] += 1
        try:
            yield self.connections[i]
        finally:
            self._load[i] -= 1

    async def preadinto(self, offset: int, buf: memoryview) -> None:
        async with self._pick() as conn:
            await conn.preadinto(offset, buf)

    async def pwrite(self, offset: int, data: Buffer) -> None:
        async with self._pick() as conn:
            await conn.pwrite(offset, data)

    async def pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
    ) -> None:
        async with self._pick() as conn:
            await conn.pwrite_zeroes(offset, length, may_unmap=may_unmap, fast=fast)

    async def discard(self, offset: int, length: int) -> None:
        """See :meth:`NBDDriver.discard`."""
        async with self._pick() as conn:
            await conn.discard(offset, length)

    async def block_status(self, offset: int, length: int) -> Extent:
        return await self.connections[0].block_status(offset, length)

    async def flush(self) -> None:
        await together([conn.flush for conn in list(self.connections)])

    async def aclose(self) -> None:
        self._closing = True
        for conn in list(self.connections):
            await conn.aclose()


async def _handshake(
    stream: trio.abc.Stream, address: NBDAddress
) -> tuple[trio.abc.Stream, proto.ExportInfo, bytes]:
    """Drive the sans-I/O handshake over ``stream`` (which TLS may replace)."""
    gen = proto.client_handshake(address.export, tls=address.tls)
    received = bytearray()
    reply: bytes | None = None
    while True:
        try:
            step = gen.send(reply)
        except StopIteration as stop:
            info: proto.ExportInfo = stop.value
            return stream, info, bytes(received)
        reply = None
        if isinstance(step, proto.Send):
            await stream.send_all(step.data)
        elif isinstance(step, proto.StartTLS):
            if received:
                raise proto.NBDProtocolError("server sent data before the TLS handshake")
            ctx = await trio.to_thread.run_sync(_tls_context, address)
            tls_stream = trio.SSLStream(stream, ctx, server_hostname=address.tls_hostname)
            try:
                await tls_stream.do_handshake()
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__ or exc
                raise proto.NBDOptionError(f"TLS handshake failed: {cause}") from exc
            stream = tls_stream
        else:
            while len(received) < step.size:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise proto.NBDProtocolError(
                        "server closed the connection during the handshake"
                    )
                received += chunk
            reply = bytes(received[: step.size])
            del received[: step.size]


def _connect_reason(exc: OSError) -> str:
    """Why a connection failed, as the system words its error number ("Connection
    refused"); trio puts each attempt's error in ``__cause__``."""
    cause = exc.__cause__
    leaves: list[BaseException] = [exc]
    if isinstance(cause, BaseExceptionGroup):
        leaves = [*cause.exceptions, exc]
    elif cause is not None:
        leaves = [cause, exc]
    # (A resolver error's number is not the system's: its own words are kept.)
    for leaf in [e for e in leaves if isinstance(e, OSError)]:
        if not isinstance(leaf, socket.gaierror) and leaf.errno is not None and leaf.errno > 0:
            return os.strerror(leaf.errno)
    return exc.strerror or str(exc)


async def _connect(address: NBDAddress) -> trio.abc.Stream:
    if address.socket is not None:
        return await trio.open_unix_socket(address.socket)
    assert address.host is not None
    return await trio.open_tcp_stream(address.host, address.port)


async def _open_connection(
    uri: str, address: NBDAddress, *, writable: bool, cache: CacheMode = CacheMode.WRITEBACK
) -> NBDDriver:
    try:
        stream = await _connect(address)
    except OSError as exc:
        where = address.socket if address.socket is not None else f"{address.host}:{address.port}"
        raise ImageError(
            f"Could not open '{uri}': Failed to connect to '{where}': {_connect_reason(exc)}"
        ) from exc
    try:
        with trio.fail_after(_HANDSHAKE_TIMEOUT):
            stream, info, leftover = await _handshake(stream, address)
    except (proto.NBDProtocolError, proto.NBDOptionError, ssl.SSLError, OSError) as exc:
        await stream.aclose()
        raise ImageError(f"Could not open '{uri}': {exc}") from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
        await stream.aclose()
        raise ImageError(
            f"Could not open '{uri}': handshake failed ({str(exc) or 'timed out'})"
        ) from exc
    except BaseException:
        await stream.aclose()
        raise
    if writable and info.flags & TxFlag.READ_ONLY:
        await stream.aclose()
        raise ImageError(f"Could not open '{uri}': the export is read-only")
    return NBDDriver(stream, info, address, writable=writable, leftover=leftover, cache=cache)


#: Connections used when the server allows several and the caller does not say.
DEFAULT_CONNECTIONS = 4


@asynccontextmanager
async def open_nbd(
    uri: str,
    *,
    writable: bool = False,
    connections: int | None = None,
    cache: CacheMode | str = CacheMode.WRITEBACK,
) -> AsyncIterator[Driver]:
    """Connect to an NBD export and keep its reader tasks running while in use.

    Args:
        connections: how many connections to use when the server advertises
            multi-conn (default 4); servers that do not get exactly one.
        cache: a write-through mode (``writethrough``, ``directsync``) sends every
            write with FUA (or a FLUSH after it, when the server has no FUA); the
            others change nothing (the final :meth:`~trioconv.Driver.flush` is always
            sent, as ``qemu-img`` sends it even under ``unsafe``).

    Raises:
        ImageError: the server cannot be reached, refuses the export or TLS, or (for a
            writable open) exports it read-only.
    """
    address = parse_nbd_uri(uri)
    mode = CacheMode.parse(cache)
    first = await _open_connection(uri, address, writable=writable, cache=mode)
    wanted = DEFAULT_CONNECTIONS if connections is None else max(1, connections)
    extra = wanted - 1 if first.info.flags & TxFlag.CAN_MULTI_CONN else 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first.reader)
        driver: Driver = first
        if extra:
            multi = MultiConnDriver([first])
            for _ in range(extra):
                nursery.start_soon(_add_connection, multi, nursery, uri, address, writable, mode)
            driver = multi
        try:
            yield driver
        finally:
            await driver.aclose()
            nursery.cancel_scope.cancel()  # connections still in their handshake


async def _add_connection(
    driver: MultiConnDriver,
    nursery: trio.Nursery,
    uri: str,
    address: NBDAddress,
    writable: bool,
    cache: CacheMode,
) -> None:
    """Open one more connection to a multi-conn export and put it to use once its
    handshake is done, while the first one already serves requests.

    A server may allow fewer connections than it could take: ``qemu-nbd -e 2`` leaves
    a third one waiting unanswered, nbdkit's limit filter closes it. As ``qemu-img``
    (which opens one) and ``nbdcopy``, the copy goes on over the connections it has.
    """
    try:
        conn = await _open_connection(uri, address, writable=writable, cache=cache)
    except TrioconvError as exc:
        log.debug("%s: one connection fewer: %s", uri, exc)
        return
    if conn.info.size != driver.size:  # one export, one size: this one is not used
        log.debug("%s: a connection with another export size (%d)", uri, conn.info.size)
        await conn.aclose()
        return
    if not driver.add(conn):  # the copy is over
        await conn.aclose()
        return
    nursery.start_soon(conn.reader)
