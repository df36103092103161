"""The NBD protocol, sans I/O: bytes in, events out, no sockets.

Two parts, as the protocol has two phases (NetworkBlockDevice ``doc/proto.md``):

* **Handshake** - :func:`client_handshake` is a generator that *yields* what it needs
  from the transport (:class:`Send` some bytes, :class:`Recv` exactly ``n`` bytes) and
  *returns* the negotiated :class:`ExportInfo`. The fixed newstyle negotiation asks for
  structured replies and the ``base:allocation`` meta context, then ``NBD_OPT_GO`` with
  block-size information; servers that do not know ``NBD_OPT_GO`` fall back to
  ``NBD_OPT_EXPORT_NAME``. A refused option (an unknown export, TLS) ends with
  ``NBD_OPT_ABORT`` before the error is raised, so the server sees a client that
  leaves, not one that vanishes. Driving it with canned bytes replays a session exactly.
* **Transmission** - :func:`encode_request` builds request headers, and
  :class:`ReplyParser` turns the byte stream from the server into :class:`SimpleReply`,
  :class:`DataChunk`, :class:`HoleChunk`, :class:`StatusChunk`, :class:`ErrorChunk` and
  :class:`DoneChunk` events. Read payloads arrive as ``memoryview`` slices of what was
  received, so the caller copies each byte once, into its own buffer.

Errors are split by blame as h11 does: :class:`NBDProtocolError` when the server
breaks the protocol, :class:`NBDOptionError` when it refuses an option we need.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Generator

import attrs

from .._text import peer_text

__all__ = [
    "Cmd",
    "CmdFlag",
    "DataChunk",
    "DirectPayload",
    "DoneChunk",
    "ErrorChunk",
    "ExportInfo",
    "HoleChunk",
    "NBDOptionError",
    "NBDProtocolError",
    "Recv",
    "ReplyParser",
    "Send",
    "SimpleReply",
    "StatusChunk",
    "TxFlag",
    "client_handshake",
    "encode_request",
]

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
#: The old-style greeting's second magic, in place of IHAVEOPT.
CLISERV_MAGIC = 0x00420281861253
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_STARTTLS = 5
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_NAMES = {
    REP_ERR | 1: "unsupported",
    REP_ERR | 2: "denied by policy",
    REP_ERR | 3: "invalid",
    REP_ERR | 4: "not supported on this platform",
    REP_ERR | 5: "TLS required",
    REP_ERR | 6: "unknown export",
    REP_ERR | 7: "server shutting down",
    REP_ERR | 8: "block size required",
    REP_ERR | 9: "request too big",
}

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

CHUNK_NONE = 0
CHUNK_OFFSET_DATA = 1
CHUNK_OFFSET_HOLE = 2
CHUNK_BLOCK_STATUS = 5
CHUNK_ERROR = (1 << 15) | 1
CHUNK_ERROR_OFFSET = (1 << 15) | 2
REPLY_FLAG_DONE = 1

STATE_HOLE = 1
STATE_ZERO = 2

#: NBD error numbers, which are fixed by the protocol, not the host.
ERRNO_NAMES = {
    1: "Operation not permitted",
    5: "Input/output error",
    12: "Cannot allocate memory",
    22: "Invalid argument",
    28: "No space left on device",
    75: "Value too large for defined data type",
    95: "Operation not supported",
    108: "Cannot send after transport endpoint shutdown",
}

_OPT_HEADER = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_STRUCTURED = struct.Struct(">IHHQI")


class TxFlag(enum.IntFlag):
    """Transmission flags: what the export supports."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(enum.IntEnum):
    """Request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    """Request flags."""

    NONE = 0
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class NBDProtocolError(Exception):
    """The server sent something the protocol does not allow."""


class NBDOptionError(Exception):
    """The server refused an option the client needs."""


def errno_text(error: int) -> str:
    """Readable text for an NBD error number."""
    return ERRNO_NAMES.get(error, f"error {error}")


# -- handshake -------------------------------------------------------------------------


@attrs.frozen
class Send:
    """Send these bytes to the server.

    ``may_fail``: the negotiation is ending (an ``NBD_OPT_ABORT`` after a refusal) and a
    server that already hung up is no error - what the generator raises next is.
    """

    data: bytes
    may_fail: bool = False


@attrs.frozen
class Recv:
    """Receive exactly ``size`` bytes; send them back into the generator."""

    size: int


@attrs.frozen
class StartTLS:
    """Wrap the transport in TLS now (after ``NBD_OPT_STARTTLS`` was acknowledged)."""


@attrs.frozen
class ExportInfo:
    """What the handshake negotiated.

    Attributes:
        size: export size in bytes.
        flags: transmission flags.
        structured: structured replies are on.
        allocation_context: the meta context id of ``base:allocation``, or None.
        min_block / preferred_block / max_block: the server's block size constraints
            (1, 4096 and 32 MiB when it gives none).
    """

    size: int
    flags: TxFlag
    structured: bool = False
    allocation_context: int | None = None
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024


Step = Send | Recv | StartTLS
Handshake = Generator[Step, bytes | None, ExportInfo]


def _option(option: int, data: bytes = b"") -> Send:
    return Send(_OPT_HEADER.pack(IHAVEOPT, option, len(data)) + data)


def _abort() -> Send:
    """``NBD_OPT_ABORT`` before giving up on a refused option, as qemu's client sends it.

    A client that just hangs up mid-negotiation is logged by qemu-nbd as a failure
    ("option negotiation failed: Failed to read opts magic"); one that says it aborts is
    not. The server's acknowledgement is not waited for (the protocol lets the client
    close at once), and a server that already hung up is no error.
    """
    return Send(_option(OPT_ABORT).data, may_fail=True)


#: The longest option reply accepted. The largest the protocol has (NBD_REP_SERVER: a
#: name and a description of at most 4096 bytes each) fits well; more is not NBD.
MAX_OPTION_REPLY = 64 * 1024

#: The largest block size constraint taken from a server: the client never asks for
#: more in one request, and replies are refused past it (memory stays bounded).
MAX_BLOCK_LIMIT = 32 * 1024 * 1024

#: The largest ``NBD_REPLY_TYPE_BLOCK_STATUS`` chunk accepted: the context id and 2^20
#: descriptors, the most the protocol says a server should send in one chunk. This is
#: a limit of its own, not the read limit: a server that advertises a small maximum
#: payload (nbdkit's blocksize-policy filter at 1 KiB) still describes a fragmented
#: export in one chunk of thousands of extents.
MAX_STATUS_CHUNK = 4 + 8 * (1 << 20)


def _option_reply(expected: int) -> Generator[Step, bytes | None, tuple[int, bytes]]:
    header = yield Recv(_OPT_REPLY.size)
    assert header is not None
    magic, option, reply, length = _OPT_REPLY.unpack(header)
    if magic != REPLY_MAGIC:
        raise NBDProtocolError(f"bad option reply magic {magic:#x}")
    if option != expected:
        raise NBDProtocolError(f"reply to option {option}, expected {expected}")
    if length > MAX_OPTION_REPLY:
        raise NBDProtocolError(f"option reply of {length} bytes is too large")
    if not length:
        return reply, b""
    payload = yield Recv(length)
    assert payload is not None
    return reply, payload


def client_handshake(
    export_name: str = "",
    *,
    structured: bool = True,
    meta_contexts: tuple[str, ...] = ("base:allocation",),
    tls: bool = False,
) -> Handshake:
    """The client side of the handshake, as a sans-I/O generator.

    Fixed newstyle, with options, is what servers speak today. With ``tls``, the first
    option is ``NBD_OPT_STARTTLS``; once the server agrees the generator yields
    :class:`StartTLS` and every later byte goes through TLS. The older styles QEMU still
    speaks are spoken too, without TLS, structured replies or block status: plain
    newstyle (only ``NBD_OPT_EXPORT_NAME``) and old style (no export names at all).

    Raises:
        NBDProtocolError: the server is not speaking NBD newstyle.
        NBDOptionError: the export does not exist or the server refuses it.
    """
    name = export_name.encode()
    greeting = yield Recv(18)
    assert greeting is not None
    magic, opt_magic, server_flags = struct.unpack(">QQH", greeting)
    if magic != NBDMAGIC:
        raise NBDProtocolError("not an NBD server (bad magic)")
    if opt_magic == CLISERV_MAGIC:
        # Old style: the size and flags follow at once, then 124 reserved bytes.
        rest = yield Recv(134)
        assert rest is not None
        if tls:
            raise NBDProtocolError("NBD server speaks the old-style protocol, which has no TLS")
        if name:
            raise NBDOptionError("Server does not support non-empty export names")
        old_size, old_flags = struct.unpack(">QI", greeting[16:18] + rest[:10])
        return ExportInfo(size=old_size, flags=TxFlag(old_flags & 0xFFFF))
    if opt_magic != IHAVEOPT:
        raise NBDProtocolError("not an NBD server (bad magic)")
    no_zeroes = bool(server_flags & FLAG_NO_ZEROES)
    if not server_flags & FLAG_FIXED_NEWSTYLE:
        # Plain newstyle: a server that may hang up on any option but the export name.
        if tls:
            raise NBDProtocolError(
                "NBD server does not support fixed newstyle negotiation, which TLS needs"
            )
        yield Send(struct.pack(">I", FLAG_NO_ZEROES if no_zeroes else 0))
        yield _option(OPT_EXPORT_NAME, name)
        export = yield Recv(10 if no_zeroes else 134)
        assert export is not None
        plain_size, plain_flags = struct.unpack(">QH", export[:10])
        return ExportInfo(size=plain_size, flags=TxFlag(plain_flags))
    yield Send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0)))

    if tls:
        yield _option(OPT_STARTTLS)
        reply, payload = yield from _option_reply(OPT_STARTTLS)
        if reply != REP_ACK:
            why = REP_ERR_NAMES.get(reply, f"error {reply:#x}")
            yield _abort()
            raise NBDOptionError(
                f"server refused TLS: {why} (a server without TLS takes an nbd:// or "
                "nbd+unix:// URI)"
            )
        yield StartTLS()

    have_structured = False
    if structured:
        yield _option(OPT_STRUCTURED_REPLY)
        reply, _ = yield from _option_reply(OPT_STRUCTURED_REPLY)
        have_structured = reply == REP_ACK

    context: int | None = None
    if have_structured and meta_contexts:
        queries = b"".join(struct.pack(">I", len(q.encode())) + q.encode() for q in meta_contexts)
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(meta_contexts)) + queries
        yield _option(OPT_SET_META_CONTEXT, data)
        while True:
            reply, payload = yield from _option_reply(OPT_SET_META_CONTEXT)
            if reply == REP_META_CONTEXT:
                if len(payload) < 4:
                    raise NBDProtocolError("short meta context reply")
                if payload[4:] == b"base:allocation":
                    context = int.from_bytes(payload[:4], "big")
                continue
            break  # ACK, or an error: block status is then simply unavailable

    go = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
    yield _option(OPT_GO, go)
    size: int | None = None
    flags = TxFlag(0)
    min_block, preferred, max_block = 1, 4096, 32 * 1024 * 1024
    while True:
        reply, payload = yield from _option_reply(OPT_GO)
        if reply == REP_INFO:
            if len(payload) < 2:
                raise NBDProtocolError("short NBD_REP_INFO")
            kind = int.from_bytes(payload[:2], "big")
            if kind == INFO_EXPORT and len(payload) >= 12:
                size, raw_flags = struct.unpack(">QH", payload[2:12])
                flags = TxFlag(raw_flags)
            elif kind == INFO_BLOCK_SIZE and len(payload) >= 14:
                min_block, preferred, max_block = struct.unpack(">III", payload[2:14])
            continue
        if reply == REP_ACK:
            break
        if reply == REP_ERR_UNSUP:
            # An old server: NBD_OPT_EXPORT_NAME has no error reply, only the export.
            yield _option(OPT_EXPORT_NAME, name)
            export = yield Recv(10 if no_zeroes else 134)
            assert export is not None
            size, raw_flags = struct.unpack(">QH", export[:10])
            return ExportInfo(
                size=size,
                flags=TxFlag(raw_flags),
                structured=have_structured,
                allocation_context=context,
            )
        why = REP_ERR_NAMES.get(reply, f"error {reply:#x}")
        message = peer_text(payload) if reply & REP_ERR else ""
        if reply == REP_ERR_TLS_REQD and not tls:
            # The fix is on the client's side: say which one.
            why += " (use an nbds:// or nbds+unix:// URI)"
        yield _abort()
        raise NBDOptionError(
            f"server refused export '{export_name}': {why}" + (f" ({message})" if message else "")
        )
    if size is None:
        raise NBDProtocolError("server did not send the export size")
    # The protocol's rules (as QEMU checks them): a power-of-two minimum of at most
    # 64 KiB, a power-of-two preferred size no smaller, a maximum that is a multiple of
    # the minimum (or 0xffffffff: no limit). More than trioconv ever asks for is capped.
    if (
        not 1 <= min_block <= 65536
        or min_block & (min_block - 1)
        or preferred < max(min_block, 1)
        or preferred & (preferred - 1)
        or max_block < min_block
        or (max_block % min_block and max_block != 0xFFFFFFFF)
    ):
        raise NBDProtocolError(f"invalid block sizes {min_block}/{preferred}/{max_block}")
    max_block = min(max_block, MAX_BLOCK_LIMIT)
    preferred = min(preferred, max_block)
    return ExportInfo(
        size=size,
        flags=flags,
        structured=have_structured,
        allocation_context=context,
        min_block=min_block,
        preferred_block=preferred,
        max_block=max_block,
    )


def encode_abort() -> bytes:
    """``NBD_OPT_ABORT``, to end a negotiation politely."""
    return _option(OPT_ABORT).data


# -- transmission ----------------------------------------------------------------------


def encode_request(
    cmd: Cmd, cookie: int, offset: int = 0, length: int = 0, flags: CmdFlag = CmdFlag.NONE
) -> bytes:
    """A request header; a WRITE's payload follows it on the wire."""
    return _REQUEST.pack(REQUEST_MAGIC, int(flags), int(cmd), cookie, offset, length)


@attrs.frozen
class SimpleReply:
    """A simple reply; for a successful READ, ``data`` holds the payload."""

    cookie: int
    error: int
    data: memoryview | None = None


@attrs.frozen
class DataChunk:
    """``NBD_REPLY_TYPE_OFFSET_DATA``: bytes at an absolute offset."""

    cookie: int
    offset: int
    data: memoryview
    done: bool


@attrs.frozen
class HoleChunk:
    """``NBD_REPLY_TYPE_OFFSET_HOLE``: a run that reads as zeroes."""

    cookie: int
    offset: int
    length: int
    done: bool


@attrs.frozen
class StatusChunk:
    """``NBD_REPLY_TYPE_BLOCK_STATUS``: ``(length, flags)`` descriptors for a context."""

    cookie: int
    context: int
    extents: tuple[tuple[int, int], ...]
    done: bool


@attrs.frozen
class ErrorChunk:
    """An error chunk; ``offset`` is set for ``NBD_REPLY_TYPE_ERROR_OFFSET``."""

    cookie: int
    error: int
    message: str
    offset: int | None
    done: bool


@attrs.frozen
class DoneChunk:
    """``NBD_REPLY_TYPE_NONE`` with the done flag: the reply is complete."""

    cookie: int


ReplyEvent = SimpleReply | DataChunk | HoleChunk | StatusChunk | ErrorChunk | DoneChunk


@attrs.frozen
class DirectPayload:
    """A read payload whose rest the caller receives itself (see
    :meth:`ReplyParser.direct_payload`).

    Attributes:
        event: a :class:`SimpleReply` or :class:`DataChunk` whose ``data`` is the part of
            the payload already received (possibly empty).
        remaining: how many more payload bytes follow on the wire.
    """

    event: SimpleReply | DataChunk
    remaining: int


class ReplyParser:
    """Turn the server's byte stream into reply events.

    The parser owns one receive buffer. Data can arrive two ways: copied in with
    :meth:`receive_data`, or - with no copy at all - received by the caller straight into
    the space :meth:`get_buffer` hands out (``sock.recv_into(parser.get_buffer())``)
    followed by :meth:`buffer_updated`, as asyncio's ``BufferedProtocol`` does.

    Read payloads (``SimpleReply.data``, ``DataChunk.data``) are memoryviews into that
    buffer: copy them out before receiving more data, and the bytes are then copied
    exactly once on their way from the kernel to their destination.

    Simple replies to READ carry no length on the wire, so the client tells the parser
    how much a READ will return with :meth:`expect_read` before sending it.

    Everything the protocol says about a chunk on its own is checked here - a data chunk
    with no data, an empty hole, an error chunk with error 0 or a message longer than
    the chunk, an error offset missing - and is an :class:`NBDProtocolError`. What needs
    the request (is the chunk inside it, is it a chunk that request can get) is the
    client's to check. ``structured=False`` (the server did not agree to structured
    replies) makes any structured reply an error too.

    Args:
        max_payload: the longest chunk accepted, bar block status chunks: a read chunk
            longer than any read the client sends is refused before memory is taken
            for it.
        max_status: the longest block status chunk accepted (:data:`MAX_STATUS_CHUNK`).
    """

    def __init__(
        self,
        *,
        max_payload: int = 64 * 1024 * 1024 + 1024,
        max_status: int = MAX_STATUS_CHUNK,
        structured: bool = True,
    ) -> None:
        self._buf = bytearray(256 * 1024)
        self._start = 0  # first unparsed byte
        self._end = 0  # end of received bytes
        self._need = 0  # bytes the next frame needs in all (0: unknown yet)
        self._reads: dict[int, int] = {}
        self._max_payload = max_payload
        self._max_status = max_status
        self._structured = structured

    def expect_read(self, cookie: int, length: int) -> None:
        """Note that a simple reply to ``cookie`` carries ``length`` bytes of data."""
        self._reads[cookie] = length

    def forget(self, cookie: int) -> None:
        """The request for ``cookie`` is complete."""
        self._reads.pop(cookie, None)

    def get_buffer(self, min_size: int = 64 * 1024) -> memoryview:
        """Free space at the end of the receive buffer, at least ``min_size`` bytes.

        Unparsed bytes move to the front first, and the buffer grows when the frame being
        received needs more room than it has. Release the view before the next call.
        """
        pending = self._end - self._start
        if len(self._buf) - self._end < min_size or (
            self._need and self._start + self._need > len(self._buf)
        ):
            size = max(len(self._buf), self._need + min_size, pending + min_size)
            if size > len(self._buf):
                grown = bytearray(size)
                grown[:pending] = self._buf[self._start : self._end]
                self._buf = grown
            else:
                self._buf[:pending] = self._buf[self._start : self._end]
            self._start, self._end = 0, pending
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last :meth:`get_buffer` view."""
        self._end += nbytes

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add bytes received from the server (copying them in)."""
        view = self.get_buffer(len(data))
        try:
            view[: len(data)] = data
        finally:
            view.release()
        self.buffer_updated(len(data))

    def direct_payload(self, min_remaining: int = 1) -> DirectPayload | None:
        """Hand the rest of a partly received read payload over to the caller.

        Call it when :meth:`next_event` returned None. If the frame being received is a
        read payload - a simple reply to a READ, or an ``OFFSET_DATA`` chunk - whose header
        is complete and of which at least ``min_remaining`` bytes are still to come, the
        parser gives up the frame: it returns the event with the payload bytes it already
        holds, and the next :attr:`DirectPayload.remaining` bytes of the stream are the
        rest of that payload, which the caller receives itself - straight into their
        destination (``recv_into``), so even the one copy out of the receive buffer is
        saved. Only after that does it feed the parser again. Otherwise returns None and
        changes nothing.
        """
        available = self._available()
        if available < 4:
            return None
        view = memoryview(self._buf)[: self._end]
        magic = int.from_bytes(view[self._start : self._start + 4], "big")
        event: SimpleReply | DataChunk
        if magic == SIMPLE_REPLY_MAGIC:
            if available < _SIMPLE.size:
                return None
            _, error, cookie = _SIMPLE.unpack_from(view, self._start)
            length = self._reads.get(cookie, 0) if error == 0 else 0
            head = _SIMPLE.size
        elif magic == STRUCTURED_REPLY_MAGIC and self._structured:
            if available < _STRUCTURED.size + 8:
                return None
            _, flags, kind, cookie, length = _STRUCTURED.unpack_from(view, self._start)
            if kind != CHUNK_OFFSET_DATA or not 8 < length <= self._max_payload:
                return None  # next_event() deals with it (and with its errors)
            head = _STRUCTURED.size + 8
            length -= 8
            offset = int.from_bytes(
                view[self._start + _STRUCTURED.size : self._start + head], "big"
            )
        else:
            return None
        remaining = length - (available - head)
        if remaining < max(1, min_remaining):
            return None
        data = view[self._start + head : self._end]
        self._start = self._end
        self._need = 0
        if magic == SIMPLE_REPLY_MAGIC:
            event = SimpleReply(cookie, 0, data)
        else:
            event = DataChunk(cookie, offset, data, bool(flags & REPLY_FLAG_DONE))
        return DirectPayload(event, remaining)

    def _available(self) -> int:
        return self._end - self._start

    def next_event(self) -> ReplyEvent | None:
        """The next complete event, or None when more data is needed."""
        if self._available() < 4:
            return None
        view = memoryview(self._buf)[: self._end]
        magic = int.from_bytes(view[self._start : self._start + 4], "big")
        if magic == SIMPLE_REPLY_MAGIC:
            return self._simple(view)
        if magic == STRUCTURED_REPLY_MAGIC:
            if not self._structured:
                raise NBDProtocolError("a structured reply, which was not negotiated")
            return self._structured_chunk(view)
        raise NBDProtocolError(f"bad reply magic {magic:#x}")

    def _take(self, view: memoryview, n: int) -> memoryview:
        out = view[self._start : self._start + n]
        self._start += n
        self._need = 0
        return out

    def _simple(self, view: memoryview) -> SimpleReply | None:
        if self._available() < _SIMPLE.size:
            return None
        _, error, cookie = _SIMPLE.unpack_from(view, self._start)
        length = self._reads.get(cookie, 0) if error == 0 else 0
        if self._available() < _SIMPLE.size + length:
            self._need = _SIMPLE.size + length
            return None
        self._start += _SIMPLE.size
        data = self._take(view, length) if length else None
        return SimpleReply(cookie, error, data)

    def _structured_chunk(self, view: memoryview) -> ReplyEvent | None:
        if self._available() < _STRUCTURED.size:
            return None
        _, flags, kind, cookie, length = _STRUCTURED.unpack_from(view, self._start)
        limit = self._max_status if kind == CHUNK_BLOCK_STATUS else self._max_payload
        if length > limit:
            raise NBDProtocolError(f"reply chunk of {length} bytes is too large")
        if self._available() < _STRUCTURED.size + length:
            self._need = _STRUCTURED.size + length
            return None
        self._start += _STRUCTURED.size
        payload = self._take(view, length)
        done = bool(flags & REPLY_FLAG_DONE)
        if kind == CHUNK_NONE:
            if not done or length:
                raise NBDProtocolError("NBD_REPLY_TYPE_NONE without the done flag")
            return DoneChunk(cookie)
        if kind == CHUNK_OFFSET_DATA:
            if length <= 8:  # (the protocol: at least one byte of data)
                raise NBDProtocolError("OFFSET_DATA chunk without data")
            return DataChunk(cookie, int.from_bytes(payload[:8], "big"), payload[8:], done)
        if kind == CHUNK_OFFSET_HOLE:
            if length != 12:
                raise NBDProtocolError("bad OFFSET_HOLE chunk")
            offset, size = struct.unpack(">QI", payload)
            if not size:
                raise NBDProtocolError("OFFSET_HOLE chunk of 0 bytes")
            return HoleChunk(cookie, offset, size, done)
        if kind == CHUNK_BLOCK_STATUS:
            if length < 12 or (length - 4) % 8:
                raise NBDProtocolError("bad BLOCK_STATUS chunk")
            context = int.from_bytes(payload[:4], "big")
            pairs = struct.unpack(f">{(length - 4) // 4}I", payload[4:])
            extents = tuple(zip(pairs[::2], pairs[1::2], strict=True))
            return StatusChunk(cookie, context, extents, done)
        if kind & (1 << 15):
            return self._error_chunk(kind, cookie, payload, done)
        raise NBDProtocolError(f"unknown reply chunk type {kind}")

    @staticmethod
    def _error_chunk(kind: int, cookie: int, payload: memoryview, done: bool) -> ErrorChunk:
        """An error chunk: every error type starts with the error and a message; the
        message must fit in the chunk, and ``NBD_REPLY_TYPE_ERROR_OFFSET`` ends with
        the offset."""
        tail = 8 if kind == CHUNK_ERROR_OFFSET else 0
        if len(payload) < 6 + tail:
            raise NBDProtocolError("short error chunk")
        error, msg_len = struct.unpack(">IH", payload[:6])
        if msg_len > len(payload) - 6 - tail:
            raise NBDProtocolError("error chunk message longer than the chunk")
        if not error:
            raise NBDProtocolError("error chunk with error 0")
        message = peer_text(bytes(payload[6 : 6 + msg_len]))
        if kind == CHUNK_ERROR_OFFSET:
            offset = int.from_bytes(payload[6 + msg_len : 14 + msg_len], "big")
            return ErrorChunk(cookie, error, message, offset, done)
        if kind != CHUNK_ERROR:
            # An unknown error type is still an error (protocol: the reply failed).
            message = message or f"unknown error chunk {kind}"
        return ErrorChunk(cookie, error, message, None, done)
