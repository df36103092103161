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
refusing any record longer than its limit before buffering it.

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


def encode_call(
    xid: int, prog: int, vers: int, proc: int, cred: AuthSys | None, args: bytes = b""
) -> bytes:
    """One call message (without record marking): header, credential, verifier, args."""
    header = struct.pack(">IIIIII", xid, CALL, RPC_VERSION, prog, vers, proc)
    return header + (cred.encode() if cred is not None else _AUTH_NONE) + _AUTH_NONE + args


def frame(length: int) -> bytes:
    """The record-marking header of a one-fragment record of ``length`` bytes."""
    if not 0 <= length <= MAX_FRAGMENT:
        raise ValueError(f"record of {length} bytes needs several fragments")
    return _U32.pack(LAST_FRAGMENT | length)


@attrs.frozen
class Reply:
    """An accepted, successful reply: ``body[offset:]`` holds the procedure's results."""

    xid: int
    body: bytes
    offset: int

    def unpacker(self) -> Unpacker:
        """An :class:`Unpacker` positioned at the results."""
        return Unpacker(self.body, self.offset)


def reply_xid(record: bytes) -> int:
    """The ``xid`` of a received message (routing needs nothing else)."""
    if len(record) < 4:
        raise RPCProtocolError(f"message of {len(record)} bytes has no xid")
    return int.from_bytes(record[:4], "big")


def decode_reply(record: bytes) -> Reply:
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

    ``receive_data(chunk)`` as bytes arrive, then ``next_record()`` until it returns
    None. A record longer than ``max_record`` is refused as soon as a fragment header
    announces it, before its bytes are buffered.
    """

    def __init__(self, max_record: int) -> None:
        self.max_record = max_record
        self._buf = bytearray()
        self._pos = 0
        self._fragments: list[bytes] = []
        self._fragments_size = 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a record."""
        return len(self._buf) - self._pos + self._fragments_size

    def next_record(self) -> bytes | None:
        """The next complete record, or None until more bytes arrive."""
        while True:
            if len(self._buf) - self._pos < 4:
                return None
            (header,) = _U32.unpack_from(self._buf, self._pos)
            size = header & MAX_FRAGMENT
            if self._fragments_size + size > self.max_record:
                raise RPCProtocolError(
                    f"record of at least {self._fragments_size + size} bytes exceeds the "
                    f"limit of {self.max_record}"
                )
            start = self._pos + 4
            if len(self._buf) - start < size:
                return None
            fragment = bytes(self._buf[start : start + size])
            self._pos = start + size
            if not header & LAST_FRAGMENT:
                self._fragments.append(fragment)
                self._fragments_size += size
                continue
            if self._fragments:
                self._fragments.append(fragment)
                fragment = b"".join(self._fragments)
                self._fragments.clear()
                self._fragments_size = 0
            return fragment
