"""A Trio NBD client: one connection, many requests in flight, one reader task.

Requests are written under a send lock (header and payload together, shielded from
cancellation so a half-sent request can never corrupt the stream) and wait on their own
event. A single reader task feeds received bytes to the sans-I/O
:class:`~trioconv.protocols.nbd._proto.ReplyParser` and routes each reply to its request
by cookie, copying read data straight into the requester's buffer. If the connection
drops, the reader fails every waiting request at once and raises, which cancels whatever
runs inside :func:`open_nbd` - a conversion stops promptly instead of hanging.

A server that stops answering is not waited for forever either. Connecting and the
handshake together may take :data:`OPEN_TIMEOUT` seconds. Once connected, the reader
gives the connection up when requests are waiting and the server has sent nothing at
all for :data:`REPLY_TIMEOUT` seconds (any byte from it starts the count again, so a
slow server that answers is never cut off). QEMU's NBD client has neither bound: a
server that holds the connection open but never answers hangs ``qemu-img`` for good.

QEMU's own two options are about connecting again, and mean here what they mean there.
``open-timeout`` (``retry_connect``): a connect that fails is tried again for that many
seconds - a server still starting is waited for. ``reconnect-delay``
(``reconnect_delay``): a connection lost mid-copy (the server restarted, the silence
bound above) is made again for that many seconds, while its requests wait; then they
are sent again over the new connection, which must offer the same export (see
:meth:`NBDDriver._reconnect`). Both are 0 by default: one connect, and a lost connection
fails every request on it at once.

Connections end as the protocol asks, which servers' logs show: a refused option with
``NBD_OPT_ABORT``, an open connection with ``NBD_CMD_DISC`` (also when a writable open
finds the export read-only), and the extra connections of a multi-conn export that are
still negotiating when the work is over finish their handshake first, within
:data:`HANDSHAKE_GRACE` seconds (see :class:`_Opening`) - qemu-nbd logs a client that
hangs up mid-negotiation as a failure.

Replies are checked against their request as the protocol requires: a chunk for an
unknown cookie, a read chunk outside the request or overlapping an earlier one, a
chunk type the command cannot get, an error offset outside the request - each is the
server breaking the protocol, and the connection is given up with one clear error.
"""

from __future__ import annotations

import bisect
import contextlib
import errno as errno_mod
import functools
import itertools
import logging
import math
import os
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NoReturn

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
from .._net import SPLIT_LIMIT, WholeSends, receive_payload, together
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
#: Split requests whose pieces are this small or smaller are sent ``_BATCH`` at a time
#: (see :meth:`NBDDriver._split`).
_BATCH_PIECE = 64 * 1024
_BATCH = 16
#: A write's data up to this size is copied into the send with its header (one
#: syscall); larger data is sent from where it is.
_SMALL_PAYLOAD = 64 * 1024

#: Seconds that connecting and the handshake together may take.
OPEN_TIMEOUT = 30.0

#: The first and the longest pause between two connects, when connecting is tried
#: again (``open-timeout``, ``reconnect-delay``): a server restarting is found within a
#: second of being back, a server that is gone is not asked a thousand times a second.
RETRY_PAUSE_FIRST = 0.02
RETRY_PAUSE_MAX = 1.0

#: Seconds a connection with requests waiting may go without a single byte from the
#: server before it is given up. Generous: a server may take long over one request
#: (a flush of a large write cache to slow disks), but one that says nothing at all for
#: five minutes while requests wait has stopped serving them.
REPLY_TIMEOUT = 300.0
#: The most sent in one go; between slices the silence count starts again.
_SEND_SLICE = 1024 * 1024


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

#: libnbd's parameters for TLS with a pre-shared key, which Python's ``ssl`` module
#: (before 3.13) cannot do: refused by name rather than as unknown.
_PSK_PARAMETERS = frozenset({"tls-psk-file", "tls-username"})


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
    # Percent-decoding only, as QEMU and libnbd read the query: a '+' is a plus sign
    # (``socket=/run/a+b.sock``), not the space of an HTML form.
    query = urllib.parse.parse_qs(parts.query.replace("+", "%2B"), keep_blank_values=True)
    psk = sorted(set(query) & _PSK_PARAMETERS)
    if psk:
        raise ImageError(
            f"'{uri}': TLS with a pre-shared key ('{psk[0]}') is not supported; "
            "use X.509 certificates (tls-certificates=DIR)"
        )
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
    """A client TLS context verifying the server against the given CA.

    Raises:
        NBDOptionError: a certificate or key file in the folder cannot be read (the
            message names the file: ``ssl`` itself does not).
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if address.tls_certificates is not None:
        folder = Path(address.tls_certificates)
        ca = folder / "ca-cert.pem"
        cert, key = folder / "client-cert.pem", folder / "client-key.pem"
        current = ca
        try:
            if address.tls_verify or ca.exists():
                ctx.load_verify_locations(cafile=ca)
            if cert.exists():
                current = cert
                ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if current == cert and not key.exists():
                current, reason = key, "No such file or directory"
            raise proto.NBDOptionError(f"TLS: cannot use '{current}': {reason}") from exc
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
    #: The ``[start, end)`` ranges (from the request's offset) the chunks so far
    #: covered, sorted and merged: a chunk overlapping one of them is refused, so
    #: ``covered == length`` means every byte was given, none twice.
    spans: list[list[int]] = attrs.field(factory=list)
    extents: tuple[tuple[int, int], ...] | None = None
    done: trio.Event = attrs.field(factory=trio.Event)

    def cover(self, start: int, end: int) -> None:
        """A content chunk gave ``[start, end)`` of the request (from its offset).

        Raises:
            NBDProtocolError: the range is outside the request or overlaps an earlier
                chunk (the protocol forbids both).
        """
        if start < 0 or end > self.length or start >= end:
            raise proto.NBDProtocolError(
                f"read chunk at byte {self.offset + start} outside the request"
            )
        spans = self.spans
        i = bisect.bisect_right(spans, [start, end])
        if (i and spans[i - 1][1] > start) or (i < len(spans) and spans[i][0] < end):
            raise proto.NBDProtocolError(
                f"read chunk at byte {self.offset + start} overlaps an earlier one"
            )
        # Chunks come in order from every server seen: merging keeps one span.
        if i and spans[i - 1][1] == start:
            spans[i - 1][1] = end
            if i < len(spans) and spans[i][0] == end:
                spans[i - 1][1] = spans.pop(i)[1]
        elif i < len(spans) and spans[i][0] == end:
            spans[i][0] = start
        else:
            spans.insert(i, [start, end])
        self.covered += end - start


#: Replies each command may get, bar errors and ``NBD_REPLY_TYPE_NONE`` (any may).
_CHUNKS_FOR = {
    proto.DataChunk: (Cmd.READ,),
    proto.HoleChunk: (Cmd.READ,),
    proto.StatusChunk: (Cmd.BLOCK_STATUS,),
}

#: Commands whose reply may carry ``NBD_REPLY_TYPE_ERROR_OFFSET``.
_ERROR_OFFSET_CMDS = (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS)


class _ServerSilent(Exception):
    """The server answered nothing for the reply timeout while requests waited."""


class _Lost(TrioconvIOError):
    """A request met the loss of a connection that is being made again
    (``reconnect-delay``): it is sent again once it is, never shown to the user."""


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
        reply_timeout: float = REPLY_TIMEOUT,
        reconnect_delay: float = 0,
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
        # (A read chunk is at most max_block and its offset; an error chunk's message
        # up to 4096 bytes and its fields - which a tiny max_block must not refuse.)
        self._parser = proto.ReplyParser(
            max_payload=info.max_block + 8192, structured=info.structured
        )
        if leftover:
            self._parser.receive_data(leftover)
        self._pending: dict[int, _Pending] = {}
        self._cookies = itertools.count(1)
        self._sends = WholeSends()
        self._closing = False
        self._broken: TrioconvIOError | None = None
        self._status: list[Extent] = []
        self._status_starts: list[int] = []  # each cached extent's offset, for bisection
        #: Bumped by every write, zero and trim: block status asked before one of them
        #: finished is not kept (see :meth:`changed`).
        self._generation = 0
        self._zero = bytes(min(info.max_block, 256 * 1024))
        self._scratch = bytearray(256 * 1024)
        #: Serialises read-modify-writes of blocks under the server's minimum block
        #: size; shared by every connection to the export (see :meth:`_patch_edges`).
        self.edges_lock = trio.Lock()
        #: Its deadline is when the server, with requests waiting, has been silent for
        #: ``reply_timeout`` seconds; infinite while nothing waits (see :meth:`reader`).
        self._reply_timeout = reply_timeout
        #: FLUSH requests being waited for (the silence bound rests meanwhile): a count,
        #: so that every byte received does not look through the waiting requests.
        self._flushes = 0
        self._silence = trio.CancelScope()
        #: ``reconnect-delay`` (see :meth:`_reconnect`): while a lost connection is
        #: being made again, :attr:`_lost` is the loss and requests wait for
        #: :attr:`_reconnected`.
        self._reconnect_delay = reconnect_delay
        self._lost: TrioconvIOError | None = None
        self._reconnected = trio.Event()

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
        """Receive replies and route them until the connection closes; with a
        ``reconnect_delay``, a lost connection is made again (see :meth:`_reconnect`)
        and the replies of the new one received in turn."""
        while True:
            loss = await self._serve()
            if loss is None:
                return
            await self._reconnect(loss)

    async def _serve(self) -> TrioconvIOError | None:
        """Receive and route the replies of the current connection.

        The receiving runs inside :attr:`_silence`, a cancel scope whose deadline is
        :attr:`_reply_timeout` seconds after the last byte from the server while
        requests wait (and infinite while none does): :meth:`_exchange` sets it when the
        first request starts waiting, every receive moves it on. When it expires the
        server has answered nothing for that long, and the connection is given up like
        a lost one.

        Returns None when the driver closes, and the loss when the connection is lost
        and :meth:`_reconnect` is to make it again (``reconnect_delay`` > 0).

        Raises:
            TrioconvIOError: the connection is lost, with no reconnecting: every request
                waiting on it has failed with this error.
        """
        # A plain socket is read into the parser's buffer, and the bulk of each read
        # payload straight into the requester's buffer; TLS goes through the stream.
        # Either way each payload byte is copied at most once in user space.
        sock = getattr(self._stream, "socket", None)
        self._silence = trio.CancelScope()  # (a scope is entered once: one a connection)
        self._heard()
        try:
            with self._silence:
                await self._receive_replies(sock)
            if self._silence.cancelled_caught:
                waiting = len(self._pending)
                raise _ServerSilent(
                    f"{self.location}: the NBD server sent nothing for "
                    f"{self._reply_timeout:g} s while {waiting} "
                    f"request{'s' if waiting != 1 else ''} waited for a reply"
                )
            return None  # (the receiving ends only by an error)
        except _ServerSilent as exc:
            if self._closing:
                return None
            error = TrioconvIOError(str(exc), errno=errno_mod.ETIMEDOUT)
            if self._reconnect_delay > 0:
                return error
            self._give_up(error)
            raise error from None
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
            proto.NBDProtocolError,
            TrioconvIOError,
        ) as exc:
            if self._closing:
                return None
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            error = TrioconvIOError(f"{self.location}: connection to the NBD server lost: {reason}")
            if self._reconnect_delay > 0:
                return error
            self._give_up(error)
            raise error from exc
        except BaseException:
            # Cancelled: the conversion is ending and nothing reads replies any more.
            self._give_up(TrioconvIOError(f"{self.location}: the connection is closed"))
            raise

    async def _receive_replies(self, sock: trio.socket.SocketType | None) -> None:
        """The reader's loop: receive, parse, route; until the connection fails."""
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
            self._heard()

    def _heard(self) -> None:
        """The server sent or took something: the silence count starts again - or
        stops, while no request waits, or while a FLUSH does (writing a large cache
        out may take the server longer than any bound, with nothing to say meanwhile;
        a dead server still shows, when the connection breaks)."""
        waiting = self._pending and not self._flushes
        self._silence.deadline = trio.current_time() + self._reply_timeout if waiting else math.inf

    async def _reconnect(self, loss: TrioconvIOError) -> None:
        """Make a lost connection again, as QEMU's ``reconnect-delay`` asks.

        The requests waiting on the lost connection fail with :class:`_Lost`, which
        :meth:`_exchange` answers by sending them again once the connection is back;
        requests made meanwhile wait for it. NBD lets a request simply go again: a
        read reads the same bytes, a write writes the same bytes to the same place.

        Connecting is tried again and again, with pauses growing from
        :data:`RETRY_PAUSE_FIRST` to :data:`RETRY_PAUSE_MAX` seconds, for
        ``reconnect_delay`` seconds. A new connection must negotiate the same export
        as the lost one (size, block sizes, reply kind, writable): requests were cut
        to its measure and a copy is half-way through its bytes. The server refusing
        the export or TLS, or offering another export, is final at once; otherwise,
        when the time is up, the copy fails with one error naming the first loss and
        what the last attempt met.

        Raises:
            TrioconvIOError: the connection could not be made again.
        """
        self._lost = loss
        self._reconnected = trio.Event()
        lost = _Lost(str(loss))
        for pending in self._pending.values():
            pending.error = lost
            pending.done.set()
        self._pending.clear()
        old, self._sends = self._sends, WholeSends()
        old.abandon()
        await trio.aclose_forcefully(self._stream)
        log.info("%s: %s; reconnecting", self.location, loss)
        deadline = trio.current_time() + self._reconnect_delay
        pause = RETRY_PAUSE_FIRST
        last = "no attempt"
        while True:
            # (An attempt may run a little past the deadline: the last one, made at
            # the deadline, gets its chance to tell why it fails.)
            now = trio.current_time()
            try:
                with trio.fail_at(min(now + OPEN_TIMEOUT, max(deadline, now + RETRY_PAUSE_MAX))):
                    stream = await _connect(self.address)
                    try:
                        stream, info, leftover = await _handshake(stream, self.address)
                    except BaseException:
                        await trio.aclose_forcefully(stream)
                        raise
            except proto.NBDOptionError as exc:
                self._reconnect_failed(loss, str(exc), final=True)
            except OSError as exc:
                last = _connect_reason(exc)
            except (proto.NBDProtocolError, trio.BrokenResourceError) as exc:
                last = str(exc)
            except trio.TooSlowError:
                last = "no connection within the time left"
            else:
                if self._closing:  # (the work ended meanwhile: nothing to serve)
                    await trio.aclose_forcefully(stream)
                    return
                changed = self._changed_export(info)
                if changed is not None:
                    await trio.aclose_forcefully(stream)
                    self._reconnect_failed(loss, changed, final=True)
                self._adopt(stream, info, leftover)
                return
            now = trio.current_time()
            if now >= deadline:
                self._reconnect_failed(loss, last)
            await trio.sleep(min(pause, deadline - now))
            pause = min(pause * 2, RETRY_PAUSE_MAX)

    def _changed_export(self, info: proto.ExportInfo) -> str | None:
        """What a new connection negotiated otherwise than the lost one, if anything."""
        old = self.info
        if info.size != old.size:
            return f"the export is now {info.size} bytes, not {old.size}"
        if self._writable and info.flags & TxFlag.READ_ONLY:
            return "the export is now read-only"
        if (info.structured, info.min_block, info.max_block) != (
            old.structured,
            old.min_block,
            old.max_block,
        ):
            return "the server now negotiates the export otherwise (block sizes, replies)"
        return None

    def _adopt(self, stream: trio.abc.Stream, info: proto.ExportInfo, leftover: bytes) -> None:
        """Serve requests over ``stream``, the lost connection made again."""
        self._stream = stream
        self.info = info
        self._parser = proto.ReplyParser(
            max_payload=info.max_block + 8192, structured=info.structured
        )
        if leftover:
            self._parser.receive_data(leftover)
        self._lost = None
        self._reconnected.set()
        log.info("%s: reconnected", self.location)

    def _reconnect_failed(
        self, loss: TrioconvIOError, last: str, *, final: bool = False
    ) -> NoReturn:
        """Give the connection up for good: every request waiting fails, now and after.

        ``last``: what the last attempt met; ``final``: an answer no further attempt
        would change (the server refused the export), rather than the time being up.
        """
        within = "" if final else f" within {self._reconnect_delay:g} s"
        error = TrioconvIOError(f"{loss}; not reconnected{within}: {last}", errno=errno_mod.EIO)
        self._lost = None
        self._give_up(error)
        self._reconnected.set()
        raise error

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
        pending = self._expected(event)
        data = event.data
        assert data is not None  # a direct payload always has its (maybe empty) start
        have = data.nbytes
        start = event.offset - pending.offset if isinstance(event, proto.DataChunk) else 0
        end = start + have + direct.remaining
        if isinstance(event, proto.DataChunk):
            pending.cover(start, end)  # (checked before a byte lands in the buffer)
        if pending.buf is not None:
            pending.buf[start : start + have] = data
        pos = start + have

        def wanted() -> memoryview | None:
            self._heard()  # (asked before each receive: a long payload is progress)
            return pending.buf

        await receive_payload(sock.fileno(), pos, end, wanted, self._scratch)
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

    def _expected(self, event: proto.ReplyEvent) -> _Pending:
        """The request ``event`` answers, if the protocol lets it answer it so.

        Raises:
            NBDProtocolError: no request has that cookie (never sent, or already
                answered in full), or the chunk's type is not one its command gets.
        """
        pending = self._pending.get(event.cookie)
        if pending is None:
            raise proto.NBDProtocolError(f"reply for unknown cookie {event.cookie}")
        allowed = _CHUNKS_FOR.get(type(event))
        if allowed is not None and pending.cmd not in allowed:
            kind = type(event).__name__.removesuffix("Chunk").lower()
            raise proto.NBDProtocolError(
                f"a {kind} chunk in the reply to a {pending.cmd.name} request"
            )
        return pending

    def _dispatch(self, event: proto.ReplyEvent) -> None:
        pending = self._expected(event)
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
            pending.cover(start, start + event.data.nbytes)
            if pending.buf is not None:
                pending.buf[start : start + event.data.nbytes] = event.data
            done = event.done
        elif isinstance(event, proto.HoleChunk):
            start = event.offset - pending.offset
            pending.cover(start, start + event.length)
            if pending.buf is not None:
                zero = memoryview(self._zero)
                for pos in range(start, start + event.length, zero.nbytes):
                    n = min(zero.nbytes, start + event.length - pos)
                    pending.buf[pos : pos + n] = zero[:n]
            done = event.done
        elif isinstance(event, proto.StatusChunk):
            if event.context == self.info.allocation_context:
                if pending.extents is not None:
                    raise proto.NBDProtocolError("two block status chunks for one context")
                pending.extents = event.extents
            done = event.done
        elif isinstance(event, proto.ErrorChunk):
            at = event.offset
            if at is not None and pending.cmd in _ERROR_OFFSET_CMDS:
                if not pending.offset <= at < pending.offset + max(pending.length, 1):
                    raise proto.NBDProtocolError(
                        f"error offset {at} outside the request at byte {pending.offset}"
                    )
            else:
                at = None  # (an offset where the command has none: the reply failed)
            if pending.error is None:  # (the first error tells the most)
                pending.error = self._server_error(pending, event.error, event.message, at)
            done = event.done
        if done:
            self._complete(event.cookie, pending)

    def _server_error(
        self, pending: _Pending, error: int, message: str, at: int | None = None
    ) -> TrioconvIOError:
        """The server failed a request: where (``at``, from an error offset, or the
        request's offset), what it was doing, the error as the protocol numbers it."""
        what = {
            Cmd.READ: "reading",
            Cmd.WRITE: "writing",
            Cmd.WRITE_ZEROES: "zeroing",
            Cmd.FLUSH: "flushing",
            Cmd.BLOCK_STATUS: "querying block status of",
            Cmd.TRIM: "trimming",
        }.get(pending.cmd, "accessing")
        where = pending.offset if at is None else at
        text = proto.errno_text(error) + (f" ({message})" if message else "")
        return TrioconvIOError(
            f"error while {what} {self.location} at byte {where}: {text}",
            offset=where,
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
        """Send one request and wait for its reply (``buf``: where a READ's data goes;
        ``payload``: a WRITE's data).

        Raises:
            TrioconvIOError: the server failed the request, or the connection is lost.
        """
        (pending,) = await self._exchange(cmd, [(offset, length, buf, payload)], flags)
        return pending

    async def _exchange(
        self,
        cmd: Cmd,
        requests: Sequence[tuple[int, int, memoryview | None, memoryview | None]],
        flags: CmdFlag,
    ) -> list[_Pending]:
        """Send ``(offset, length, buf, payload)`` requests in one go and wait for every
        reply; the first failure (in order) is raised once all are answered.

        Each request is registered before anything is sent (its reply may come before
        the send returns), and the sending is whole - all of it, or the connection is
        given up (see :class:`~trioconv.protocols._net.WholeSends`). A caller cancelled
        before its requests went out takes them back: a request never sent must not
        count as one the server owes a reply (the silence bound would end the
        connection over it). Cancelled after, the replies still come and are dropped:
        a READ's buffer is never written to once its caller stopped waiting.
        """
        while True:
            while self._lost is not None and not self._closing:
                await self._reconnected.wait()  # (set again at once when given up)
            try:
                return await self._exchange_once(cmd, requests, flags)
            except _Lost:
                # The connection is being made again: then the requests go again. (A
                # send can find it broken before the reader does: it soon will.)
                if self._lost is None and self._broken is None:
                    await trio.sleep(0.01)

    async def _exchange_once(
        self,
        cmd: Cmd,
        requests: Sequence[tuple[int, int, memoryview | None, memoryview | None]],
        flags: CmdFlag,
    ) -> list[_Pending]:
        """:meth:`_exchange` over the current connection.

        Raises:
            _Lost: the connection was lost, and is being made again.
        """
        if self._broken is not None:
            raise self._broken
        if self._closing:
            raise TrioconvIOError(f"{self.location}: connection is closed")
        sends = self._sends

        def broken() -> TrioconvIOError | None:
            if self._broken is None and (sends is not self._sends or self._lost is not None):
                return _Lost("the connection was lost")
            return self._broken

        cookies: list[int] = []
        pendings: list[_Pending] = []
        wire: list[bytes | bytearray | memoryview] = []
        small = bytearray()  # headers and small payloads, gathered into one send
        for offset, length, buf, payload in requests:
            cookie = next(self._cookies)
            pending = _Pending(cmd, offset, buf, length=length)
            self._pending[cookie] = pending
            cookies.append(cookie)
            pendings.append(pending)
            if cmd is Cmd.READ and not self.info.structured:
                self._parser.expect_read(cookie, length)
            small += proto.encode_request(cmd, cookie, offset, length, flags)
            if payload is not None:
                if payload.nbytes <= _SMALL_PAYLOAD:
                    small += payload
                else:
                    wire += [small, payload]
                    small = bytearray()
        if small:
            wire.append(small)
        flushes = len(pendings) if cmd is Cmd.FLUSH else 0
        self._flushes += flushes
        if self._silence.deadline == math.inf:  # the first request to wait
            self._heard()
        sent = False
        try:
            # The reader gives the connection up if the server goes away or the
            # conversion ends, which also stops a send stuck on a full socket buffer.
            async with sends.whole(broken):
                try:
                    for part in wire:
                        # A large write over a slow link is sent a slice at a time: the
                        # server taking each one counts as hearing from it.
                        view = memoryview(part)
                        for start in range(0, max(len(view), 1), _SEND_SLICE):
                            await self._stream.send_all(view[start : start + _SEND_SLICE])
                            self._heard()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    if self._reconnect_delay > 0 and self._broken is None:
                        raise _Lost(str(exc)) from exc
                    raise broken() or TrioconvIOError(
                        f"{self.location}: connection to the NBD server lost: {exc}"
                    ) from exc
            sent = True
            for pending in pendings:
                await pending.done.wait()
        except BaseException:
            for pending in pendings:
                pending.buf = None  # the reply may still come: never write into ``buf``
            if not sent:
                for cookie in cookies:
                    self._pending.pop(cookie, None)
                    self._parser.forget(cookie)
                if not self._pending:
                    self._silence.deadline = math.inf
            raise
        finally:
            self._flushes -= flushes
            if flushes and not self._flushes:
                self._heard()  # the requests still waiting have their bound again
        errors = [p.error for p in pendings if p.error is not None]
        # (A server's own answer first; a loss only when it is all there is.)
        for error in errors:
            if not isinstance(error, _Lost):
                raise error
        if errors:
            raise errors[0]
        return pendings

    async def _split(
        self, cmd: Cmd, offset: int, view: memoryview, flags: CmdFlag = CmdFlag.NONE
    ) -> None:
        """Send one request per max-block piece, all in flight together.

        Pieces of at most :data:`_BATCH_PIECE` bytes (a server with a small maximum,
        down to 1 KiB or less) go out :data:`_BATCH` at a time, as one send of all
        their headers (and data, for writes): a request a send made the per-request
        cost - a lock, a syscall, a task switch - outweigh the bytes several times over.
        At most :data:`~trioconv.protocols._net.SPLIT_LIMIT` pieces are in flight.
        """
        step = self.info.max_block
        if view.nbytes <= step:
            if cmd is Cmd.READ:
                await self._request(cmd, offset, view.nbytes, buf=view)
            else:
                await self._request(cmd, offset, view.nbytes, flags=flags, payload=view)
            return
        if step <= _BATCH_PIECE:
            group = step * _BATCH
            await together(
                [
                    functools.partial(
                        self._batch, cmd, offset + start, view[start : start + group], flags
                    )
                    for start in range(0, view.nbytes, group)
                ],
                limit=max(1, SPLIT_LIMIT // _BATCH),
            )
            return
        await together(
            [
                functools.partial(
                    self._split, cmd, offset + start, view[start : start + step], flags
                )
                for start in range(0, view.nbytes, step)
            ]
        )

    async def _batch(self, cmd: Cmd, offset: int, view: memoryview, flags: CmdFlag) -> None:
        """``view`` (a READ's buffer or a WRITE's data) as max-block requests sent in
        one go (see :meth:`_exchange`)."""
        step = self.info.max_block
        read = cmd is Cmd.READ
        pieces = [
            (offset + start, piece.nbytes, piece if read else None, None if read else piece)
            for start in range(0, view.nbytes, step)
            for piece in (view[start : start + step],)
        ]
        await self._exchange(cmd, pieces, flags)

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

    def changed(self) -> None:
        """The export's contents change (a write, zero or trim starts or ends): the
        block status kept from the last query is dropped, and a query under way while
        the change runs is not kept either."""
        self._generation += 1
        self._status = []
        self._status_starts = []

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Around a write, zero or trim: :meth:`changed` at its start and its end."""
        self.changed()
        try:
            yield
        finally:
            self.changed()

    async def pwrite(self, offset: int, data: Buffer) -> None:
        if not self._writable:
            raise UnsupportedError(f"{self.location}: opened read-only")
        view = memoryview(data).cast("B")
        if not view.nbytes:
            return
        with self.changing():
            await self._pwrite(offset, view)

    async def _pwrite(self, offset: int, view: memoryview) -> None:
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
        with self.changing():
            await self._pwrite_zeroes(offset, length, flags, may_unmap=may_unmap, fast=fast)

    async def _pwrite_zeroes(
        self, offset: int, length: int, flags: CmdFlag, *, may_unmap: bool, fast: bool
    ) -> None:
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
        with self.changing():
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
        # The cached answer, found by bisection: a fragmented export's window holds
        # thousands of extents, and every extent is asked for in turn.
        i = bisect.bisect_right(self._status_starts, offset) - 1
        if i >= 0 and offset < (ext := self._status[i]).end:
            return Extent(offset, min(ext.end, end) - offset, ext.kind)
        want = min(end - offset, _MAX_STATUS)
        generation = self._generation
        pending = await self._request(Cmd.BLOCK_STATUS, offset, want)
        if not pending.extents:
            raise TrioconvIOError(f"{self.location}: server sent no block status at byte {offset}")
        extents: list[Extent] = []
        pos = offset
        for n, state in pending.extents:
            # An empty extent ends the list (the protocol forbids it: what follows is
            # not trusted), and so does the request's end: the last extent may reach
            # past it, no extent may follow one that does (QEMU clamps there too).
            if n == 0 or pos >= min(self.size, offset + want):
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
        if generation == self._generation:  # (else a write ran meanwhile: not kept)
            self._status = extents
            self._status_starts = [e.offset for e in extents]
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
            if self._broken is None and self._lost is None:
                try:
                    async with self._sends.whole(lambda: self._broken):
                        await self._stream.send_all(proto.encode_request(Cmd.DISC, 0))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                except TrioconvIOError:
                    pass  # given up meanwhile
            await self._stream.aclose()


#: Seconds an extra connection still negotiating when the work is over may take to
#: finish its handshake (it then disconnects properly; see :class:`_Opening`).
HANDSHAKE_GRACE = 2.0

#: Seconds from connecting within which a server greets a connection it has taken; one
#: not greeted by then waits in the listener's backlog (see :class:`_Opening`).
GREETING_WAIT = 0.5


@attrs.define(eq=False)
class _Opening:
    """An extra connection of a multi-conn export, still in its handshake.

    The handshake runs in :attr:`scope`, which is shielded: the work ending (a short
    copy, an error, an interrupt) does not cut a negotiation off in the middle, which
    qemu-nbd logs as a failure ("option negotiation failed: ...") - one line per
    connection, on every short run, in a log operators watch. When the driver closes,
    :meth:`wind_up` bounds it instead:

    * not connected yet: dropped at once (no server has seen it);
    * connected, not greeted: a server greets a connection as soon as it takes it, so
      one not greeted :data:`GREETING_WAIT` seconds after connecting waits in the
      listener's backlog (``qemu-nbd -e N`` with N clients served) and is dropped, unseen;
      a younger one gets the rest of that time for the greeting to come;
    * greeted: :data:`HANDSHAKE_GRACE` seconds to finish, then ``NBD_CMD_DISC``.
    """

    scope: trio.CancelScope = attrs.field(factory=lambda: trio.CancelScope(shield=True))
    connected_at: float | None = None
    greeted: bool = False
    closing: bool = False

    def connected(self) -> None:
        """The connection is established (the server may not have taken it yet)."""
        self.connected_at = trio.current_time()

    def greeting(self) -> None:
        """The server greeted the connection: it negotiates with it from now on."""
        self.greeted = True
        if self.closing:
            self.scope.deadline = trio.current_time() + HANDSHAKE_GRACE

    def wind_up(self) -> None:
        """The driver closes: bound the handshake as the class says."""
        self.closing = True
        now = trio.current_time()
        if self.greeted:
            deadline = now + HANDSHAKE_GRACE
        elif self.connected_at is not None:
            deadline = max(now, self.connected_at + GREETING_WAIT)
        else:
            deadline = now
        self.scope.deadline = min(self.scope.deadline, deadline)


class MultiConnDriver(Driver):
    """Several connections to one export, used together (``NBD_FLAG_CAN_MULTI_CONN``).

    The server promises that all connections see one consistent image and that a flush
    on any of them covers writes completed on all, so requests can go to whichever
    connection has the fewest in flight. Block status always uses the first connection
    (its extent cache then stays useful, and is dropped by a change over any
    connection); flush goes to every connection.
    """

    name = "nbd"

    def __init__(self, connections: list[NBDDriver]) -> None:
        self.connections = connections
        self.location = connections[0].location
        self._load = [0] * len(connections)
        self._closing = False
        #: Extra connections still negotiating (see :class:`_Opening`).
        self.opening: set[_Opening] = set()

    @property
    def closing(self) -> bool:
        """True once :meth:`aclose` has begun: no connection is added any more."""
        return self._closing

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
            with self.connections[0].changing():
                await conn.pwrite(offset, data)

    async def pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
    ) -> None:
        async with self._pick() as conn:
            with self.connections[0].changing():
                await conn.pwrite_zeroes(offset, length, may_unmap=may_unmap, fast=fast)

    async def discard(self, offset: int, length: int) -> None:
        """See :meth:`NBDDriver.discard`."""
        async with self._pick() as conn:
            with self.connections[0].changing():
                await conn.discard(offset, length)

    async def block_status(self, offset: int, length: int) -> Extent:
        return await self.connections[0].block_status(offset, length)

    async def flush(self) -> None:
        await together([conn.flush for conn in list(self.connections)])

    async def aclose(self) -> None:
        self._closing = True
        for opening in list(self.opening):
            opening.wind_up()
        for conn in list(self.connections):
            await conn.aclose()


async def _handshake(
    stream: trio.abc.Stream,
    address: NBDAddress,
    greeted: Callable[[], None] | None = None,
) -> tuple[trio.abc.Stream, proto.ExportInfo, bytes]:
    """Drive the sans-I/O handshake over ``stream`` (which TLS may replace).

    ``greeted`` is called once the server's greeting is in: from then on the server
    negotiates with this connection (see :class:`_Opening`).
    """
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
        if isinstance(step, proto.StartTLS):
            if received:
                raise proto.NBDProtocolError("server sent data before the TLS handshake")
            ctx = await trio.to_thread.run_sync(_tls_context, address)
            tls_stream = trio.SSLStream(stream, ctx, server_hostname=address.tls_hostname)
            try:
                await tls_stream.do_handshake()
            except trio.BrokenResourceError as exc:
                raise proto.NBDOptionError(_tls_failure(exc, address)) from exc
            stream = tls_stream
            continue
        if isinstance(step, proto.Send) and step.may_fail:
            # (A goodbye before an error the generator raises next: that error is what
            # the user must see, not a server that already hung up.)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.send_all(step.data)
            continue
        try:
            if isinstance(step, proto.Send):
                await stream.send_all(step.data)
                continue
            while len(received) < step.size:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise proto.NBDProtocolError(
                        "server closed the connection during the handshake"
                    )
                received += chunk
        except (trio.BrokenResourceError, proto.NBDProtocolError) as exc:
            if not isinstance(stream, trio.SSLStream):
                raise
            # The TLS handshake went through, and then the server hung up: with TLS 1.3
            # that is how a server refuses the client's certificate (or its absence) -
            # it checks it only after the client is done.
            reason = exc.__cause__ or exc
            raise proto.NBDOptionError(
                f"the server ended the TLS session during the negotiation ({reason}); a "
                "server that wants a client certificate it trusts does so (client-cert.pem "
                "and client-key.pem in the tls-certificates folder)"
            ) from exc
        reply = bytes(received[: step.size])
        del received[: step.size]
        if greeted is not None:
            greeted()
            greeted = None


def _tls_failure(exc: trio.BrokenResourceError, address: NBDAddress) -> str:
    """Why the TLS handshake failed, in words a user can act on."""
    cause = exc.__cause__ or exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = cause.verify_message
        text = f"TLS handshake failed: the server's certificate is not trusted: {why}"
        if address.tls_certificates is None:
            text += " (give the CA with tls-certificates=DIR, a folder holding ca-cert.pem)"
        return text
    if isinstance(cause, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError):
        # GnuTLS (nbdkit, qemu-nbd) hangs up without an alert when it has no
        # credentials in common with the client - a server set up for pre-shared keys.
        return (
            "TLS handshake failed: the server closed the connection (a server that takes "
            "only pre-shared keys (PSK) does so; trioconv speaks TLS with X.509 "
            "certificates only)"
        )
    reason = cause.reason if isinstance(cause, ssl.SSLError) and cause.reason else str(cause)
    return f"TLS handshake failed: {reason}"


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
    uri: str,
    address: NBDAddress,
    *,
    writable: bool,
    cache: CacheMode = CacheMode.WRITEBACK,
    open_timeout: float = OPEN_TIMEOUT,
    reply_timeout: float = REPLY_TIMEOUT,
    retry_connect: float = 0,
    reconnect_delay: float = 0,
    opening: _Opening | None = None,
) -> NBDDriver:
    """Connect and negotiate, within ``open_timeout`` seconds in all.

    A TCP connect to a server that is down without refusing (a host that drops
    packets, a listener whose backlog is full because it stopped accepting) would
    otherwise wait for the kernel's own timeout, minutes; a server that accepts and
    then says nothing, forever. ``opening``: an extra connection's progress, told as it
    connects and is greeted (see :class:`_Opening`).

    ``retry_connect`` (QEMU's ``open-timeout``): seconds during which a connect that
    fails - refused, the socket not there yet, no answer within ``open_timeout`` - is
    tried again, after pauses growing from :data:`RETRY_PAUSE_FIRST` to
    :data:`RETRY_PAUSE_MAX` seconds; the error then tells what the last attempt met. A
    server that answers and refuses (the export, TLS) is not asked again: that is its
    answer. ``reconnect_delay``: see :class:`NBDDriver`.

    A writable open of a read-only export is refused before any request is sent, and
    the connection ends with ``NBD_CMD_DISC``, the goodbye the protocol asks for.
    """
    where = address.socket if address.socket is not None else f"{address.host}:{address.port}"
    retry_until = trio.current_time() + retry_connect
    pause = RETRY_PAUSE_FIRST
    while True:
        deadline = trio.current_time() + open_timeout
        try:
            with trio.fail_after(open_timeout):
                stream = await _connect(address)
            if opening is not None:
                opening.connected()
            break
        except OSError as exc:
            reason = _connect_reason(exc)
        except trio.TooSlowError:
            reason = f"no connection within {open_timeout:g} s"
        # (``open-timeout``: refused, socket missing, too slow - tried again until
        # the time is up, with pauses growing from a few ms up to a second.)
        now = trio.current_time()
        if now >= retry_until:
            tried = f" (tried for {retry_connect:g} s)" if retry_connect else ""
            raise ImageError(
                f"Could not open '{uri}': Failed to connect to '{where}': {reason}{tried}"
            )
        await trio.sleep(min(pause, retry_until - now))
        pause = min(pause * 2, RETRY_PAUSE_MAX)
    try:
        with trio.fail_at(deadline):
            greeted = opening.greeting if opening is not None else None
            stream, info, leftover = await _handshake(stream, address, greeted)
    except (proto.NBDProtocolError, proto.NBDOptionError, ssl.SSLError, OSError) as exc:
        await stream.aclose()
        raise ImageError(f"Could not open '{uri}': {exc}") from exc
    except trio.TooSlowError:
        await stream.aclose()
        raise ImageError(
            f"Could not open '{uri}': the server did not complete the NBD handshake "
            f"within {open_timeout:g} s"
        ) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await stream.aclose()
        raise ImageError(f"Could not open '{uri}': handshake failed ({exc})") from exc
    except BaseException:
        await stream.aclose()
        raise
    if writable and info.flags & TxFlag.READ_ONLY:
        with (
            trio.move_on_after(1),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
        ):
            await stream.send_all(proto.encode_request(Cmd.DISC, 0))
        await stream.aclose()
        raise ImageError(f"Could not open '{uri}': the export is read-only")
    return NBDDriver(
        stream,
        info,
        address,
        writable=writable,
        leftover=leftover,
        cache=cache,
        reply_timeout=reply_timeout,
        reconnect_delay=reconnect_delay,
    )


#: Connections used when the server allows several and the caller does not say.
DEFAULT_CONNECTIONS = 4


@asynccontextmanager
async def open_nbd(
    uri: str,
    *,
    writable: bool = False,
    connections: int | None = None,
    cache: CacheMode | str = CacheMode.WRITEBACK,
    open_timeout: float | None = None,
    reply_timeout: float | None = None,
    retry_connect: float = 0,
    reconnect_delay: float = 0,
) -> AsyncIterator[Driver]:
    """Connect to an NBD export and keep its reader tasks running while in use.

    Args:
        connections: how many connections to use when the server advertises
            multi-conn (default 4); servers that do not get exactly one.
        cache: a write-through mode (``writethrough``, ``directsync``) sends every
            write with FUA (or a FLUSH after it, when the server has no FUA); the
            others change nothing (the final :meth:`~trioconv.Driver.flush` is always
            sent, as ``qemu-img`` sends it even under ``unsafe``).
        open_timeout: seconds that connecting and the handshake may take, each
            connection (:data:`OPEN_TIMEOUT` when None).
        reply_timeout: seconds a connection with requests waiting may go without a
            byte from the server before it is given up (:data:`REPLY_TIMEOUT` when
            None).
        retry_connect: QEMU's ``open-timeout``: seconds during which a connect that
            fails is tried again (0: one attempt); the first connection only.
        reconnect_delay: QEMU's ``reconnect-delay``: seconds during which requests on
            a lost connection wait for it to be made again, and are then sent again
            (0: a lost connection fails them; see :class:`NBDDriver`).

    Raises:
        ImageError: the server cannot be reached, refuses the export or TLS, or (for a
            writable open) exports it read-only.
    """
    address = parse_nbd_uri(uri)
    mode = CacheMode.parse(cache)
    timeouts = {
        "open_timeout": OPEN_TIMEOUT if open_timeout is None else open_timeout,
        "reply_timeout": REPLY_TIMEOUT if reply_timeout is None else reply_timeout,
        "reconnect_delay": reconnect_delay,
    }
    first = await _open_connection(
        uri,
        address,
        writable=writable,
        cache=mode,
        open_timeout=timeouts["open_timeout"],
        reply_timeout=timeouts["reply_timeout"],
        retry_connect=retry_connect,
        reconnect_delay=reconnect_delay,
    )
    wanted = DEFAULT_CONNECTIONS if connections is None else max(1, connections)
    extra = wanted - 1 if first.info.flags & TxFlag.CAN_MULTI_CONN else 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first.reader)
        driver: Driver = first
        if extra:
            multi = MultiConnDriver([first])
            for _ in range(extra):
                nursery.start_soon(
                    functools.partial(
                        _add_connection,
                        multi,
                        nursery,
                        uri,
                        address,
                        writable=writable,
                        cache=mode,
                        **timeouts,
                    )
                )
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
    *,
    writable: bool,
    cache: CacheMode,
    open_timeout: float,
    reply_timeout: float,
    reconnect_delay: float,
) -> None:
    """Open one more connection to a multi-conn export and put it to use once its
    handshake is done, while the first one already serves requests.

    A server may allow fewer connections than it could take: ``qemu-nbd -e 2`` leaves
    a third one waiting unanswered, nbdkit's limit filter closes it. As ``qemu-img``
    (which opens one) and ``nbdcopy``, the copy goes on over the connections it has.
    A connection that negotiated something else than the first one (size, flags, block
    sizes) is not used: requests go to any connection, so all must take the same ones.
    One still negotiating when the work is over ends its negotiation first (within
    :data:`HANDSHAKE_GRACE` seconds) and then disconnects (see :class:`_Opening`).
    """
    if driver.closing:
        return
    opening = _Opening()
    driver.opening.add(opening)
    conn: NBDDriver | None = None
    try:
        with opening.scope:
            try:
                conn = await _open_connection(
                    uri,
                    address,
                    writable=writable,
                    cache=cache,
                    open_timeout=open_timeout,
                    reply_timeout=reply_timeout,
                    reconnect_delay=reconnect_delay,
                    opening=opening,
                )
            except TrioconvError as exc:
                log.debug("%s: one connection fewer: %s", uri, exc)
    finally:
        driver.opening.discard(opening)
    if conn is None:  # (refused, failed, or dropped as the driver closed)
        return
    first = driver.connections[0].info
    if (conn.info.size, conn.info.flags, conn.info.structured) != (
        first.size,
        first.flags,
        first.structured,
    ) or (conn.info.min_block, conn.info.max_block) != (first.min_block, first.max_block):
        log.debug("%s: a connection that negotiated otherwise: %s", uri, conn.info)
        await conn.aclose()
        return
    if not driver.add(conn):  # the copy is over
        await conn.aclose()
        return
    nursery.start_soon(conn.reader)
