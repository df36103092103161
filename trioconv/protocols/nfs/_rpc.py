"""ONC RPC version 2 (RFC 5531) over TCP, sans I/O: calls, replies, record marking.

An RPC *call* names a program, version and procedure, carries a credential (here
``AUTH_NONE`` or ``AUTH_SYS``: uid, gid and groups, which is all NFSv3 servers usually
ask for) and the procedure's XDR arguments. The *reply* echoes the call's ``xid`` - which
is how a client with many calls in flight on one connection routes replies - and says
whether the call was accepted and ran, with the results following.

On a stream, messages are framed by *record marking*: each record is one or more
fragments, each preceded by a 4-byte header whose top bit marks the last fragment and
whose low 31 bits give the fragment's length. :func:`frame` builds that header and
:class:`RecordReader` reassembles records from arbitrary chunks of received bytes,
refusing any record longer than its limit before buffering it; it can also hand a
stretch of a record (a READ reply's data, found with :func:`success_offset` and
``_proto.read_head``) over to the caller to receive straight into its destination.

Errors are split by blame: :class:`RPCProtocolError` when the peer sends something the
protocol does not allow, :class:`RPCError` when it refuses a well-formed call
(program unavailable, authentication rejected, ...).
"""

from __future__ import annotations

import enum
import struct

import attrs

from ._xdr import Packer, Unpacker, XDRError

__all__ = [
    "AuthSys",
    "RPCError",
    "RPCProtocolError",
    "RecordReader",
    "Reply",
    "decode_reply",
    "encode_call",
    "frame",
    "success_offset",
]

RPC_VERSION = 2
CALL = 0
REPLY = 1
MSG_ACCEPTED = 0
MSG_DENIED = 1
AUTH_NONE = 0
AUTH_SYS = 1
LAST_FRAGMENT = 0x80000000
#: Largest fragment :func:`frame` makes (and the record-marking maximum).
MAX_FRAGMENT = 0x7FFFFFFF
#: The most fragments one record may come in. Servers send one; a stream of empty
#: fragments would otherwise keep the reader busy for ever without a record.
MAX_FRAGMENTS = 65536
#: RFC 5531: ``opaque body<400>`` in every credential and verifier.
MAX_AUTH_BODY = 400

_U32 = struct.Struct(">I")


class RPCProtocolError(Exception):
    """The peer sent bytes that are not a valid RPC message (or too large a record)."""


class RPCError(Exception):
    """The server refused a well-formed call; ``str()`` says why."""


class AcceptStat(enum.IntEnum):
    SUCCESS = 0
    PROG_UNAVAIL = 1
    PROG_MISMATCH = 2
    PROC_UNAVAIL = 3
    GARBAGE_ARGS = 4
    SYSTEM_ERR = 5


class AuthStat(enum.IntEnum):
    OK = 0
    BADCRED = 1
    REJECTEDCRED = 2
    BADVERF = 3
    REJECTEDVERF = 4
    TOOWEAK = 5
    INVALIDRESP = 6
    FAILED = 7


_ACCEPT_TEXT = {
    AcceptStat.PROG_UNAVAIL: "program not available",
    AcceptStat.PROG_MISMATCH: "program version not supported",
    AcceptStat.PROC_UNAVAIL: "procedure not available",
    AcceptStat.GARBAGE_ARGS: "server could not decode the arguments",
    AcceptStat.SYSTEM_ERR: "server system error",
}
_AUTH_TEXT = {
    AuthStat.BADCRED: "bad credential",
    AuthStat.REJECTEDCRED: "credential rejected",
    AuthStat.BADVERF: "bad verifier",
    AuthStat.REJECTEDVERF: "verifier rejected",
    AuthStat.TOOWEAK: "authentication too weak (the server wants another security flavour)",
    AuthStat.INVALIDRESP: "invalid response verifier",
    AuthStat.FAILED: "authentication failed",
}


@attrs.frozen
class AuthSys:
    """An ``AUTH_SYS`` credential: who the server should think we are.

    Attributes:
        machine: the client's host name (at most 255 bytes).
        gids: supplementary groups (at most 16).
        stamp: an arbitrary id of this credential.
    """

    uid: int
    gid: int
    gids: tuple[int, ...] = ()
    machine: str = ""
    stamp: int = 0

    def encode(self) -> bytes:
        """The credential's ``opaque_auth``: flavour and body."""
        body = Packer()
        body.pack_uint(self.stamp & 0xFFFFFFFF)
        body.pack_string(self.machine[:255], 255)
        body.pack_uint(self.uid)
        body.pack_uint(self.gid)
        body.pack_array(list(self.gids[:16]), body.pack_uint, 16)
        p = Packer()
        p.pack_uint(AUTH_SYS)
        p.pack_opaque(body.get_buffer(), MAX_AUTH_BODY)
        return p.get_buffer()


_AUTH_NONE = b"\0\0\0\0\0\0\0\0"


_CALL_HEAD = struct.Struct(">IIIIII")


def encode_call(
    xid: int, prog: int, vers: int, proc: int, cred: AuthSys | bytes | None, args: bytes = b""
) -> bytes:
    """One call message (without record marking): header, credential, verifier, args.

    ``cred`` may also be a credential already encoded by :meth:`AuthSys.encode`.
    """
    header = _CALL_HEAD.pack(xid, CALL, RPC_VERSION, prog, vers, proc)
    if cred is None:
        cred = _AUTH_NONE
    elif isinstance(cred, AuthSys):
        cred = cred.encode()
    return b"".join((header, cred, _AUTH_NONE, args))


def frame(length: int) -> bytes:
    """The record-marking header of a one-fragment record of ``length`` bytes."""
    if not 0 <= length <= MAX_FRAGMENT:
        raise ValueError(f"record of {length} bytes needs several fragments")
    return _U32.pack(LAST_FRAGMENT | length)


@attrs.frozen
class Reply:
    """An accepted, successful reply: ``body[offset:]`` holds the procedure's results."""

    xid: int
    body: bytes | memoryview
    offset: int

    def unpacker(self) -> Unpacker:
        """An :class:`Unpacker` positioned at the results."""
        return Unpacker(self.body, self.offset)


def reply_xid(record: bytes | memoryview) -> int:
    """The ``xid`` of a received message (routing needs nothing else)."""
    if len(record) < 4:
        raise RPCProtocolError(f"message of {len(record)} bytes has no xid")
    return int(_U32.unpack_from(record)[0])


_REPLY_HEAD = struct.Struct(">IIIII")


def success_offset(message: bytes | bytearray | memoryview) -> int | None:
    """Where the results of an accepted, successful reply start in ``message``.

    ``message`` may be just the beginning of a reply. None when it is not (yet) known
    to be a successful reply - too short, or anything else: :func:`decode_reply` then
    says what it is.
    """
    if len(message) < 24:
        return None
    _xid, mtype, stat, _flavour, vlen = _REPLY_HEAD.unpack_from(message)
    if mtype != REPLY or stat != MSG_ACCEPTED or vlen > MAX_AUTH_BODY:
        return None
    pos: int = 20 + vlen + (-vlen % 4)
    if len(message) < pos + 4 or _U32.unpack_from(message, pos)[0] != AcceptStat.SUCCESS:
        return None
    return pos + 4


def decode_reply(record: bytes | memoryview) -> Reply:
    """Decode a reply message; raise :class:`RPCError` unless it was accepted and ran.

    Raises:
        RPCProtocolError: not a valid reply.
        RPCError: the server refused the call (with the reason).
    """
    u = Unpacker(record)
    try:
        xid = u.unpack_uint()
        if u.unpack_uint() != REPLY:
            raise RPCProtocolError(f"message {xid:#x} is not a reply")
        stat = u.unpack_uint()
        if stat == MSG_ACCEPTED:
            u.unpack_uint()  # verifier flavour
            u.unpack_opaque_view(MAX_AUTH_BODY)
            accept = u.unpack_uint()
            if accept == AcceptStat.SUCCESS:
                return Reply(xid, record, u.pos)
            if accept == AcceptStat.PROG_MISMATCH:
                low, high = u.unpack_uint(), u.unpack_uint()
                raise RPCError(f"program version not supported (server has {low} to {high})")
            try:
                raise RPCError(_ACCEPT_TEXT[AcceptStat(accept)])
            except ValueError:
                raise RPCProtocolError(f"unknown accept status {accept}") from None
        if stat == MSG_DENIED:
            reject = u.unpack_uint()
            if reject == 0:
                low, high = u.unpack_uint(), u.unpack_uint()
                raise RPCError(f"RPC version mismatch (server speaks {low} to {high})")
            if reject == 1:
                auth = u.unpack_uint()
                try:
                    text = _AUTH_TEXT[AuthStat(auth)]
                except (ValueError, KeyError):
                    text = f"authentication error {auth}"
                raise RPCError(f"call denied: {text}")
            raise RPCProtocolError(f"unknown reject status {reject}")
        raise RPCProtocolError(f"unknown reply status {stat}")
    except XDRError as exc:
        raise RPCProtocolError(f"malformed reply: {exc}") from exc


class RecordReader:
    """Reassembles record-marked messages from a byte stream, in any chunking.

    The reader owns one receive buffer. Bytes arrive two ways: copied in with
    :meth:`receive_data`, or - with no copy - received by the caller straight into the
    space :meth:`get_buffer` hands out (``sock.recv_into(reader.get_buffer())``) followed
    by :meth:`buffer_updated`. Then ``next_record()`` until it returns None. A record
    longer than ``max_record`` is refused as soon as a fragment header announces it,
    before its bytes are buffered.

    A one-fragment record can also be handed over part-way (:meth:`current` and
    :meth:`hand_over`): the caller receives a stretch of it - a READ reply's data -
    straight into its destination, and the reader skips what follows that stretch.
    """

    def __init__(self, max_record: int, buffer_size: int = 256 * 1024) -> None:
        self.max_record = max_record
        self._buf = bytearray(buffer_size)
        self._start = 0
        self._end = 0
        #: Bytes of the stream still to be dropped (the tail of a handed-over record).
        self._discard = 0
        #: The fragments of the record being reassembled, joined as they come (a list
        #: of them would cost ~90 bytes per fragment, even an empty one, when joined).
        self._fragments = bytearray()
        self._fragments_size = 0
        self._fragment_count = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a record (or dropped)."""
        return self._end - self._start + self._fragments_size

    def get_buffer(self, min_size: int = 64 * 1024) -> memoryview:
        """Free space at the end of the receive buffer, at least ``min_size`` bytes.

        Unparsed bytes move to the front first, and the buffer grows when the fragment
        being received needs more room. Views of earlier records become invalid; release
        the returned view before the next call.
        """
        pending = self._end - self._start
        need = min_size
        if pending >= 4 and not self._discard:
            (header,) = _U32.unpack_from(self._buf, self._start)
            # Room for the whole fragment (capped: the limit is checked when parsed).
            need = max(need, min(4 + (header & MAX_FRAGMENT), 4 + self.max_record) - pending)
        if len(self._buf) - self._end < need:
            if pending + need > len(self._buf):
                grown = bytearray(pending + need)
                grown[:pending] = self._buf[self._start : self._end]
                self._buf = grown
            elif pending:
                self._buf[:pending] = self._buf[self._start : self._end]
            self._start, self._end = 0, pending
        elif self._start == self._end:
            self._start = self._end = 0
        return memoryview(self._buf)[self._end :]

    def clear(self) -> None:
        """Forget everything received: the connection it came from is gone, and the next
        one starts with a fresh record mark."""
        self._start = self._end = 0
        self._discard = 0
        self._fragments.clear()
        self._fragments_size = 0
        self._fragment_count = 0

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last :meth:`get_buffer` view."""
        self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes (copying them in)."""
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        view = self.get_buffer(n)
        try:
            view[:n] = data
        finally:
            view.release()
        self.buffer_updated(n)

    def _drop(self) -> None:
        if self._discard:
            n = min(self._discard, self._end - self._start)
            self._start += n
            self._discard -= n

    def next_record(self) -> memoryview | None:
        """The next complete record, or None until more bytes arrive.

        A one-fragment record is a view of the receive buffer, valid until the next
        :meth:`get_buffer` or :meth:`receive_data`: copy what must be kept.
        """
        self._drop()
        if self._discard:
            return None
        while True:
            if self._end - self._start < 4:
                return None
            (header,) = _U32.unpack_from(self._buf, self._start)
            size = header & MAX_FRAGMENT
            if self._fragments_size + size > self.max_record:
                raise RPCProtocolError(
                    f"record of at least {self._fragments_size + size} bytes exceeds the "
                    f"limit of {self.max_record}"
                )
            start = self._start + 4
            if self._end - start < size:
                return None
            self._start = start + size
            if not header & LAST_FRAGMENT:
                self._fragment_count += 1
                if self._fragment_count > MAX_FRAGMENTS:
                    raise RPCProtocolError(f"a record in more than {MAX_FRAGMENTS} fragments")
                with memoryview(self._buf) as view:
                    self._fragments += view[start : start + size]
                self._fragments_size += size
                continue
            if self._fragment_count:
                with memoryview(self._buf) as view:
                    self._fragments += view[start : start + size]
                record = bytes(self._fragments)
                self._fragments.clear()
                self._fragments_size = 0
                self._fragment_count = 0
                return memoryview(record)
            return memoryview(self._buf)[start : start + size]

    def current(self) -> tuple[int, memoryview] | None:
        """The record being received, when it can be handed over: its size and a view
        of its bytes received so far.

        Only a record that is one (last) fragment qualifies, and only when
        :meth:`next_record` has nothing complete to return. None otherwise. The view is
        valid until the next :meth:`get_buffer`, :meth:`receive_data` or
        :meth:`hand_over`.
        """
        if self._discard or self._fragment_count or self._end - self._start < 4:
            return None
        (header,) = _U32.unpack_from(self._buf, self._start)
        size = header & MAX_FRAGMENT
        if not header & LAST_FRAGMENT or size > self.max_record:
            return None
        start = self._start + 4
        return size, memoryview(self._buf)[start : min(self._end, start + size)]

    def hand_over(self, skip: int, length: int) -> tuple[memoryview, int]:
        """Give the caller ``length`` bytes of the :meth:`current` record from byte
        ``skip``; the reader drops the record's other bytes.

        Returns the part of that stretch already received (a view of the buffer, valid
        until the next :meth:`get_buffer` or :meth:`receive_data`: copy it out first)
        and how many more of its bytes follow on the stream. The caller must receive
        exactly those itself before it feeds the reader again.
        """
        found = self.current()
        if found is None:
            raise ValueError("no record to hand over")
        size, have = found
        if skip < 0 or length < 0 or skip + length > size:
            raise ValueError(f"bytes {skip}+{length} are outside a record of {size}")
        received = have.nbytes
        have.release()
        if skip > received:
            raise ValueError("the bytes before the stretch have not all arrived")
        start = self._start + 4
        end = min(received, skip + length)
        view = memoryview(self._buf)[start + skip : start + end]
        # Everything buffered up to the stretch's end is consumed; what follows it in
        # the record is dropped as it arrives.
        self._start = start + end
        self._discard = size - (skip + length)
        self._drop()
        return view, skip + length - end
