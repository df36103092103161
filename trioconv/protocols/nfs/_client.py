"""A Trio NFSv3 client: ONC RPC over TCP, many calls in flight, one reader task.

Opening ``nfs://host/export/dir/file`` asks the portmapper for the MOUNT and NFS ports,
mounts the export (the longest leading directory the server agrees to mount, as libnfs
tries the URL's directory first), connects to NFS and checks with a NULL call that it
answers, then LOOKUPs the remaining names, GETATTRs the size, FSINFOs the transfer
sizes and checks ACCESS - all one call at a time, before any task starts, so an open
fails with one plain :class:`~trioconv.ImageError`.

After that the NFS connection works like the NBD client: each call is written whole
under a send lock (shielded from cancellation, so a half-sent record can never corrupt
the stream) and waits for its reply; a single reader task receives into one reusable
buffer, reassembles records and routes each reply to its caller by ``xid``. A READ
reply's data does not go through that buffer: once the reader has parsed the record
mark, the RPC reply header and the READ results up to the data, it receives the data
straight into the caller's buffer (checking right before every receive that the caller
still waits, so a cancelled call's buffer is never written), and drops the padding.
Small READ replies are copied from the buffer once; anything unusual (an error status,
a reply in several fragments) goes to the caller, which decodes it the ordinary way.

If the connection drops (the server restarted, a reset, an end of stream) while the
file is open, the reader finds the NFS port again as opening did and connects, as
libnfs does, and wakes every call still waiting for its reply, which sends itself
again: READ, WRITE and COMMIT - all an open file sends - may run twice, and file
handles outlive a server restart. That is bounded: at most five attempts within 12 s,
a new connection that breaks before answering anything counting as one. After that,
or when the server sends what cannot be a reply, the reader fails every waiting call
at once and raises, which cancels whatever runs inside :func:`open_nfs`.

TCP cannot tell a server that is thinking from one that hung (or was stopped: its
kernel still takes connections), so every wait has a bound of its own, strict where
nothing legitimate takes long and generous where something may. Each new connection
must be made and answer its first call (GETPORT, MNT, NULL) within
:data:`_HANDSHAKE_TIMEOUT` when opening, within :data:`_RECONNECT_ATTEMPT_TIMEOUT` when
reconnecting; the opening as a whole has :data:`OPEN_TIMEOUT`. An open file's calls may
take as long as the server needs, as long as it keeps answering: only when calls wait
and no reply at all has come for :data:`_REPLY_TIMEOUT` (a minute, the Linux client's
``timeo`` over TCP: a busy server's COMMIT can take long) is the connection taken for
dead and made again, the calls sent again; the same silence on the new connection
ends the conversion. That is a "soft" mount in Linux terms: a conversion must end, with
an error, rather than wait for ever as a "hard" mount (and QEMU's libnfs) would.

Writes are UNSTABLE and kept (a copy) until a COMMIT covers them with the same write
verifier; if the verifier changed - the server restarted and may have lost them - they
are written again and committed once more. A reconnect changes nothing there: what was
answered before it is kept under the old verifier, and the first COMMIT on the new
connection tells whether the server still has it. Writes block for a COMMIT whenever
more than :data:`COMMIT_THRESHOLD` bytes are waiting, which bounds the memory held.
Under a write-through cache mode (``writethrough``, ``directsync``) writes are
FILE_SYNC instead: durable when answered, nothing kept.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import functools
import itertools
import math
import os
import posixpath
import random
import socket
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import TypeVar

import attrs
import trio

from ..._cache import CacheMode
from ..._errors import ImageError, TrioconvIOError, UnsupportedError
from ..._open import is_nfs_uri as is_nfs_uri
from ...driver import Buffer, Caps, Driver, Limits
from .._net import WholeSends, receive_payload, together
from .._net import connection_error_reason as _reason
from . import _proto as proto
from . import _rpc as rpc
from ._proto import Proc, Stable
from ._xdr import Unpacker, XDRError, pad

__all__ = [
    "NFSAddress",
    "NFSDriver",
    "create_nfs_file",
    "is_nfs_uri",
    "open_nfs",
    "parse_nfs_uri",
    "remove_nfs_file",
]

_T = TypeVar("_T")

#: Bytes of UNSTABLE writes held for rewriting before a COMMIT is forced.
COMMIT_THRESHOLD = 64 * 1024 * 1024
#: Seconds allowed for opening (portmapper, MOUNT, LOOKUPs) and for closing.
OPEN_TIMEOUT = 30.0
#: Seconds a new connection at opening - to the portmapper, MOUNT or NFS - may take to be
#: made and to answer (GETPORT, MNT, a NULL call). A healthy server answers in
#: milliseconds, and none of these make it touch its disks.
_HANDSHAKE_TIMEOUT = 10.0
#: Seconds UMNT's reply is waited for: the mount list it tidies is advisory, so a server
#: that does not answer it is left alone.
_UMNT_TIMEOUT = 2.0
#: Seconds an open file's connection may stay silent while calls wait for replies
#: before it is taken for dead and made again (Linux's ``timeo`` over TCP). Any reply
#: to a waiting call restarts the clock: a server that is slow but answering is waited
#: for, however long the whole takes.
_REPLY_TIMEOUT = 60.0
#: Such silences in a row (no reply to any call in between, the connection made again
#: after each) that end the conversion.
_REPLY_TIMEOUTS = 2
#: A READ or WRITE call carries at most FSINFO's ``rtmax`` or ``wtmax`` (RFC 1813: the
#: largest the server supports; a server may refuse more, or cut the connection), and
#: never more than this (libnfs: 1 MiB at most, which also keeps many calls in flight).
_MAX_TRANSFER = 1024 * 1024
#: The call size when FSINFO states no limit (``rtmax``/``wtmax`` 0), and the least
#: ``max_transfer`` the driver reports: it splits bigger requests into calls the
#: server takes, so a server of 1 KiB calls does not make the copy ask 1 KiB at a time.
_MIN_TRANSFER = 4096


def _call_size(most: int) -> int:
    """The largest READ or WRITE to send, for FSINFO's ``rtmax`` or ``wtmax``."""
    return min(most, _MAX_TRANSFER) if most else _MIN_TRANSFER


#: Symbolic links followed at most while looking a path up (Linux's limit).
_MAX_LINKS = 40
#: Retries of a call the server answers with NFS3ERR_JUKEBOX ("busy, try later").
_JUKEBOX_RETRIES = 20
_JUKEBOX_DELAY = 0.5
#: Rounds of rewrite-and-commit before a changing write verifier is an error.
_MAX_REWRITE_ROUNDS = 5
_SEND_WHOLE = 65536
#: The most one receive asks for, and the size of the scratch space.
_RECEIVE_SIZE = 256 * 1024
#: READ data with at least this much still to come is received straight into the
#: caller's buffer rather than through the record reader's.
_DIRECT_MIN = 64 * 1024
#: A READ reply's record mark and head (the RPC reply header and READ3resok up to the
#: data) take about 130 bytes; a receive between records asks for this much.
_HEAD_SIZE = 512
_HEAD_RECEIVE = 4096
#: When the NFS connection of an open file breaks, it is made again: the pause (seconds)
#: before each attempt - the first at once, for a connection that dropped while the
#: server stayed up, then growing, for a server that is restarting.
_RECONNECT_DELAYS = (0.0, 0.5, 1.0, 2.0, 4.0)
#: Seconds one attempt (portmapper, connect and a NULL call) may take, and all of them
#: together: a server that stays away fails the conversion within about this long.
_RECONNECT_ATTEMPT_TIMEOUT = 3.0
_RECONNECT_TIMEOUT = 12.0


@attrs.frozen
class NFSAddress:
    """Where a file lives, parsed from ``nfs://host[:port]/export/path?uid=N&gid=N``.

    Attributes:
        path: the absolute path of the file on the server, ``/export/dir/file``.
        port: the NFS port (from the URL or ``?nfsport=``); None asks the portmapper.
        mount_port: ``?mountport=``; None asks the portmapper.
    """

    host: str
    path: str
    uid: int
    gid: int
    port: int | None = None
    mount_port: int | None = None

    @property
    def names(self) -> list[str]:
        return [n for n in self.path.split("/") if n]


#: QEMU's tuning parameters for libnfs (read-ahead and page cache sizes, TCP connect
#: retries, debug level): numbers, checked and taken, with no effect on what is copied.
_TUNING = ("readahead", "pagecache", "tcp-syncnt", "debug")


def parse_nfs_uri(uri: str) -> NFSAddress:
    """Parse an ``nfs://`` URL as libnfs and QEMU do.

    Raises:
        ImageError: the URL is malformed.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme.lower() != "nfs":
        raise ImageError(f"'{uri}' is not an NFS URL")
    if not parts.hostname:
        raise ImageError(f"'{uri}': missing host")
    path = urllib.parse.unquote(parts.path)
    names = [n for n in path.split("/") if n and n != "."]  # (a "." names the same folder)
    if len(names) < 1 or path.endswith("/"):
        raise ImageError(f"'{uri}': the URL must name a file (nfs://host/export/file)")
    if ".." in names:
        raise ImageError(f"'{uri}': '..' is not allowed in the path")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    ints: dict[str, int] = {}
    for key, values in query.items():
        if key not in ("uid", "gid", "nfsport", "mountport", *_TUNING):
            raise ImageError(f"'{uri}': unknown URL parameter '{key}'")
        try:
            ints[key] = int(values[-1])
        except ValueError:
            raise ImageError(f"'{uri}': parameter '{key}' must be a number") from None
        limit = 0xFFFF if key.endswith("port") else 0xFFFFFFFF
        if not 0 <= ints[key] <= limit:
            raise ImageError(f"'{uri}': parameter '{key}' out of range")
    try:
        port = parts.port or ints.get("nfsport")
    except ValueError:
        raise ImageError(f"'{uri}': invalid port") from None
    return NFSAddress(
        host=parts.hostname,
        path="/" + "/".join(names),
        uid=ints.get("uid", os.getuid()),
        gid=ints.get("gid", os.getgid()),
        port=port,
        mount_port=ints.get("mountport"),
    )


def _credential(address: NFSAddress) -> rpc.AuthSys:
    default = address.uid == os.getuid() and address.gid == os.getgid()
    gids = tuple(g for g in os.getgroups() if g != address.gid)[:16] if default else ()
    return rpc.AuthSys(
        uid=address.uid,
        gid=address.gid,
        gids=gids,
        machine=socket.gethostname()[:255],
        stamp=random.getrandbits(32),
    )


class _Pending:
    """A call waiting for its reply.

    A READ carries the caller's buffer (``buf``, None once the caller stopped waiting:
    then nothing may be written there) and how much it asked for (``count``; -1 for
    other calls). The reader puts a successful READ's data there itself and sets ``got``
    and ``eof``; any other reply is kept whole in ``record`` for the caller to decode.
    A caller woken with no answer (not :attr:`answered`) finds the connection replaced,
    and sends its call again.
    """

    __slots__ = ("buf", "count", "done", "eof", "error", "got", "record", "task")

    def __init__(self, buf: memoryview | None = None) -> None:
        self.buf = buf
        self.count = -1 if buf is None else buf.nbytes
        self.record: bytes | None = None
        self.error: TrioconvIOError | None = None
        self.got = -1
        self.eof = False
        self.done = False
        self.task: trio.lowlevel.Task | None = None

    @property
    def answered(self) -> bool:
        """The reply (or the error that ends the call) is in."""
        return self.record is not None or self.got >= 0 or self.error is not None

    def finish(self) -> None:
        """The reply (or an error) is in - or the connection was replaced and the call
        must go out again (not :attr:`answered`): wake the caller."""
        self.done = True
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def _abort(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        # From now on the caller no longer waits: its buffer is not ours any more.
        self.task = None
        self.buf = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def wait(self) -> None:
        """Until :meth:`finish` (a trio.Event without its own allocation and set)."""
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        self.task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)


class RPCClient:
    """One TCP connection to one RPC server, any number of calls in flight.

    Until :meth:`reader` runs, :meth:`call` reads its own reply (one call at a time):
    that is how the short portmapper and MOUNT sessions and the opening LOOKUPs run.

    Given :attr:`redial` - a way to connect to the same server again - the reader
    replaces a connection that breaks, and every call still waiting for its reply goes
    out again on the new one (see :meth:`_reconnect`). Without it (the short sessions,
    and everything before the reader runs) a broken connection fails the calls at once.

    The reader also watches for silence: while calls wait, a deadline
    :data:`_REPLY_TIMEOUT` after the last reply (or after the first of them began to
    wait, if later) is kept on the scope the reader receives in, moved on by every reply
    to a waiting call. When it passes, the connection is given up as broken (see
    :meth:`reader`). Replies to no waiting call - a cancelled caller's, or an xid never
    sent - are no sign of life: they move nothing on.
    """

    #: Makes a new connection to the same server (None: a lost connection is an error).
    redial: Callable[[], Awaitable[trio.SocketStream]] | None = None

    def __init__(
        self, stream: trio.SocketStream, what: str, cred: rpc.AuthSys | None, max_record: int
    ) -> None:
        self._stream = stream
        self.what = what
        self._cred = cred.encode() if cred is not None else None
        self._records = rpc.RecordReader(max_record)
        self._pending: dict[int, _Pending] = {}
        self._xids = itertools.count(random.getrandbits(31))
        self._sends = WholeSends()
        self._reading = False
        self._closing = False
        self._scratch = bytearray(_RECEIVE_SIZE)
        self.broken: TrioconvIOError | None = None
        #: The number of the connection in use: 0 for the first, one more per reconnect.
        self.connection = 0
        #: A reply has come on this connection (or it is the first, which had them while
        #: opening). Until one comes on a new connection, reconnecting goes on with the
        #: same attempts, time limit, first loss and failures (see :meth:`_reconnect`).
        self._replied = True
        self._episode_end = 0.0
        self._episode_lost = ""
        self._failures: list[str] = []
        self._redialling: trio.CancelScope | None = None
        #: The scope the reader receives in, whose deadline is the silence limit (None
        #: while it does not receive: before it runs, while it reconnects).
        self._watch: trio.CancelScope | None = None
        #: When the silence began: the last reply to a waiting call, or the moment a
        #: call began to wait with none before it, or the connection was made again.
        self._quiet_since = 0.0
        #: A READ reply's data is being received straight into its caller's buffer
        #: (that call is out of :attr:`_pending` meanwhile, but still waits).
        self._direct = False
        #: Silences in a row (see :data:`_REPLY_TIMEOUTS`); a reply resets it.
        self._silences = 0

    @classmethod
    async def connect(
        cls, host: str, port: int, what: str, cred: rpc.AuthSys | None, max_record: int
    ) -> RPCClient:
        return cls(await _tcp_stream(host, port), what, cred, max_record)

    def set_max_record(self, size: int) -> None:
        self._records.max_record = size

    async def _call(
        self,
        prog: int,
        vers: int,
        proc: int,
        args: bytes,
        payload: memoryview | None = None,
        buf: memoryview | None = None,
    ) -> _Pending:
        """Send a call and wait for its reply (``buf``: a READ's destination)."""
        if self.broken is not None:
            raise self.broken
        if self._closing:
            raise TrioconvIOError(f"{self.what}: connection is closed")
        xid = next(self._xids) & 0xFFFFFFFF
        message = rpc.encode_call(xid, prog, vers, proc, self._cred, args)
        extra = payload.nbytes if payload is not None else 0
        head = rpc.frame(len(message) + extra + (-extra % 4)) + message
        pending = _Pending(buf)
        due = self._waiting()
        self._pending[xid] = pending
        if not due:
            # Nothing was due before: the silence counts from now, not from the last
            # reply, which may be long ago.
            self._quiet_since = trio.current_time()
            self._arm()
        try:
            while True:
                await self._send(pending, head, payload)
                if self._reading:
                    await pending.wait()
                else:
                    await self._read_inline(xid, pending)
                if pending.answered:
                    break
                # Woken with no answer: the connection was replaced while the call was
                # waiting, so it goes out again on the new one. It keeps its xid - the
                # reply is routed by the same entry of _pending, no reply can arrive on
                # one connection for a call sent on another, and a server whose
                # duplicate request cache keys on the xid (RFC 5531 section 9) may tell
                # the retransmission. Nothing relies on that: READ, WRITE and COMMIT,
                # all an open file sends, are safe to run twice.
        except BaseException:
            # Cancelled or failed: the reply may still come; never write into ``buf``.
            pending.buf = None
            raise
        finally:
            self._pending.pop(xid, None)
        if pending.error is not None:
            raise pending.error
        return pending

    async def _send(self, pending: _Pending, head: bytes, payload: memoryview | None) -> None:
        """Send a call's record on the connection in use.

        A record is sent whole (see WholeSends); the reader gives the connection up if
        the server goes away or the conversion ends. When the reader reconnects, a send
        that fails is no error: the reader sees the same loss (the stream is shut down
        to make sure it does), and wakes the caller to send again on the new connection.
        """
        async with self._sends.whole(lambda: self.broken):
            stream = self._stream
            pending.done = False  # (a wake-up for an earlier connection is spent)
            extra = payload.nbytes if payload is not None else 0
            try:
                if payload is None:
                    await stream.send_all(head)
                elif extra <= _SEND_WHOLE:
                    await stream.send_all(head + payload + pad(extra))
                else:
                    await stream.send_all(head)
                    await stream.send_all(payload)
                    if extra % 4:
                        await stream.send_all(pad(extra))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if self._reconnects():
                    _shut(stream)
                    return
                raise self.broken or TrioconvIOError(
                    f"{self.what}: connection to the NFS server lost: {_reason(exc)}"
                ) from exc

    def _reconnects(self) -> bool:
        """A lost connection is made again (rather than failing the calls)."""
        return (
            self._reading and self.redial is not None and not self._closing and self.broken is None
        )

    def _unpack(self, pending: _Pending) -> Unpacker:
        assert pending.record is not None
        try:
            return rpc.decode_reply(pending.record).unpacker()
        except (rpc.RPCError, rpc.RPCProtocolError) as exc:
            raise TrioconvIOError(f"{self.what}: {exc}") from exc

    async def call(
        self, prog: int, vers: int, proc: int, args: bytes, payload: memoryview | None = None
    ) -> Unpacker:
        """Make a call; return an unpacker at its results.

        Raises:
            TrioconvIOError: the connection is gone, or the server refused the call.
        """
        return self._unpack(await self._call(prog, vers, proc, args, payload))

    async def call_read(self, args: bytes, buf: memoryview) -> tuple[int, bool] | Unpacker:
        """Make an NFSv3 READ call of ``buf.nbytes`` bytes (``args`` ask for that many).

        Returns the bytes received into the start of ``buf`` and ``eof`` when the reply
        was a plain success - or, for anything else (an error status, a reply in several
        fragments), an unpacker at its results, for :func:`~._proto.decode_read`. Nothing
        is written into ``buf`` once this call was cancelled.

        Raises:
            TrioconvIOError: the connection is gone, or the server refused the call.
        """
        pending = await self._call(proto.NFS_PROG, proto.NFS_VERS, Proc.READ, args, buf=buf)
        if pending.got >= 0:
            return pending.got, pending.eof
        return self._unpack(pending)

    async def _read_inline(self, xid: int, pending: _Pending) -> None:
        try:
            while pending.record is None:
                record = self._records.next_record()
                if record is None:
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                    if not data:
                        raise trio.BrokenResourceError("the server closed the connection")
                    self._records.receive_data(data)
                elif rpc.reply_xid(record) == xid:
                    pending.record = bytes(record)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
            rpc.RPCProtocolError,
        ) as exc:
            # As the reader does: the stream is unusable, and the caller expects
            # TrioconvIOError (not a trio or RPC exception, which would escape as a
            # traceback, or past contextlib.suppress(TrioconvIOError) around UMNT).
            self.broken = self.broken or TrioconvIOError(
                f"{self.what}: connection to the NFS server lost: {_reason(exc)}"
            )
            raise self.broken from exc

    def _waiting(self) -> bool:
        """Some call waits for its reply (so silence counts)."""
        return bool(self._pending) or self._direct

    def _arm(self) -> None:
        """Put the silence deadline where it belongs now: :data:`_REPLY_TIMEOUT` after
        the silence began while calls wait, none when nothing is due."""
        if self._watch is not None:
            due = self._waiting()
            self._watch.deadline = self._quiet_since + _REPLY_TIMEOUT if due else math.inf

    def _answered(self) -> None:
        """A reply to a waiting call came: the server is alive, and the connection in
        use counts as answering (see :meth:`_reconnect`)."""
        self._replied = True
        self._silences = 0
        self._quiet_since = trio.current_time()
        self._arm()

    def _dispatch(self, record: memoryview) -> None:
        """Hand a complete reply to its caller (a READ's data straight into its buffer)."""
        pending = self._pending.pop(rpc.reply_xid(record), None)
        if pending is None:
            # Its caller was cancelled - or the xid was never sent: either way no
            # answer to anything waiting, so nothing the reconnect and silence limits
            # count (else a server that answers each call with a wrong xid, then
            # drops the connection or stays silent, would keep them from ever ending).
            return
        self._answered()
        if pending.count >= 0:
            pos = rpc.success_offset(record)
            head = proto.read_head(record, pos, pending.count) if pos is not None else None
            if head is not None and head.start + head.length + (-head.length % 4) == len(record):
                if pending.buf is not None:
                    pending.buf[: head.length] = record[head.start : head.start + head.length]
                pending.got, pending.eof = head.length, head.eof
                pending.finish()
                return
        pending.record = bytes(record)
        pending.finish()

    async def _receive_direct(self, fd: int) -> bool:
        """Receive the data of the READ reply being received straight into its caller's
        buffer, if that is what it is and enough of it is still to come.

        The bytes are read with ``os.readv`` right after checking that the caller still
        wants them - with no checkpoint in between - so a caller that was cancelled (and
        may already reuse its buffer) never gets written to; its bytes are received into
        scratch space and dropped.
        """
        found = self._records.current()
        if found is None:
            return False
        size, have = found
        with have:
            if have.nbytes < 4:
                return False
            xid = rpc.reply_xid(have)
            pending = self._pending.get(xid)
            if pending is None or pending.count < 0:
                return False
            pos = rpc.success_offset(have)
            head = proto.read_head(have, pos, pending.count) if pos is not None else None
            if (
                head is None
                or head.start + head.length + (-head.length % 4) != size
                or head.start + head.length - have.nbytes < _DIRECT_MIN
            ):
                return False
        del self._pending[xid]
        self._direct = True
        view, _remaining = self._records.hand_over(head.start, head.length)
        with view:
            pos = view.nbytes
            if pending.buf is not None:
                pending.buf[:pos] = view
        end = head.length
        try:
            await receive_payload(fd, pos, end, lambda: pending.buf, self._scratch)
        except BaseException:
            # The connection broke mid-data (or went silent, or the reader is
            # cancelled): the READ has no answer, and waits again - to go out on the
            # next connection, or to be failed with the others. (The stream is
            # mid-record now: _direct stays set until the connection is replaced.)
            if pending.buf is not None:
                self._pending[xid] = pending
            raise
        self._direct = False
        # Only a whole reply counts as one (see _reconnect): a server that cuts every
        # READ reply short has answered nothing.
        self._answered()
        pending.got, pending.eof = head.length, head.eof
        pending.finish()
        return True

    async def reader(self) -> None:
        """Receive replies and route them by xid until the connection closes - and, with
        :attr:`redial`, reconnect when it breaks.

        A connection that stays silent while calls wait (see the class) is broken
        too, and made again - unless the one before it went silent as well, with no
        reply in between (:data:`_REPLY_TIMEOUTS`): a server that takes calls and never
        answers them ends the conversion.

        Raises:
            TrioconvIOError: the connection is lost (and could not be made again), the
                server stopped answering, or sent what cannot be a reply. Every waiting
                call fails with it.
        """
        self._reading = True
        self._quiet_since = trio.current_time()
        try:
            while True:
                try:
                    with trio.CancelScope() as self._watch:
                        self._arm()
                        await self._receive()  # (returns only by raising)
                except rpc.RPCProtocolError as exc:
                    # A server that sends what cannot be a reply is broken, not
                    # restarting: a new connection would most likely get the same.
                    if self._closing:
                        break
                    raise self._fail(f"connection to the NFS server lost: {_reason(exc)}") from exc
                except (
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    OSError,
                    TrioconvIOError,
                ) as exc:
                    if self._closing:
                        break
                    if self.redial is None:
                        raise self._fail(
                            f"connection to the NFS server lost: {_reason(exc)}"
                        ) from exc
                    if not await self._reconnect(_reason(exc)):
                        break  # closed meanwhile
                    continue
                finally:
                    self._watch = None
                # The deadline passed: silence - unless nothing was due after all (the
                # only call waiting was cancelled), when receiving goes on. (Not
                # mid-record then: a READ's data being received is due.)
                if not self._waiting():
                    continue
                self._silences += 1
                silent = f"no reply in {_REPLY_TIMEOUT:g} s"
                if self.redial is None or self._silences >= _REPLY_TIMEOUTS:
                    if self._silences > 1:
                        silent += f", nor in {_REPLY_TIMEOUT:g} s more on a new connection"
                    raise self._fail(f"the NFS server stopped answering: {silent}")
                if not await self._reconnect(silent):
                    break  # closed meanwhile
        except BaseException:
            # Cancelled (the conversion is ending and nothing reads replies any more),
            # or failed above: no call waits for ever.
            self._give_up(TrioconvIOError(f"{self.what}: the connection is closed"))
            raise
        # Closed: a call still waiting (there should be none) fails rather than hangs.
        self._give_up(TrioconvIOError(f"{self.what}: the connection is closed"))

    async def _receive(self) -> None:
        """Receive and route replies from the connection in use until it fails.

        A plain socket is read into the record reader's buffer, and the bulk of each
        READ reply's data straight into its caller's buffer: each byte of data is copied
        at most once in user space.
        """
        records = self._records
        sock = getattr(self._stream, "socket", None)
        fd = sock.fileno() if sock is not None else -1
        while True:
            while (record := records.next_record()) is not None:
                self._dispatch(record)
            if fd >= 0 and await self._receive_direct(fd):
                continue
            if sock is not None:
                # Between records, ask for little: the next READ reply's data
                # should go straight to its caller, not through this buffer.
                limit = _RECEIVE_SIZE if records.buffered >= _HEAD_SIZE else _HEAD_RECEIVE
                space = records.get_buffer()
                with space:
                    n = await sock.recv_into(space, min(space.nbytes, limit))
                if not n:
                    raise TrioconvIOError("the server closed the connection")
                records.buffer_updated(n)
            else:
                data = await self._stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    raise TrioconvIOError("the server closed the connection")
                records.receive_data(data)

    def _fail(self, text: str) -> TrioconvIOError:
        """Give the connection up for good with the error ``WHAT: text``."""
        error = TrioconvIOError(f"{self.what}: {text}")
        self._give_up(error)
        return error

    async def _reconnect(self, why: str) -> bool:
        """Replace the broken connection and wake every waiting call to send again.

        Each attempt asks the portmapper again (unless the URL gave the port), as
        opening did. The attempts of one *episode* - from a connection that had
        answered breaking to a reply on a new one - are bounded: at most
        ``len(_RECONNECT_DELAYS)``, after growing pauses, within
        :data:`_RECONNECT_TIMEOUT` seconds. A new connection that breaks before any
        reply counts as a failed attempt, not as a new episode: a server that drops
        every connection (or every call sent again) cannot keep the conversion busy
        for ever, but a server that is only dying - whose listening socket may still
        take a connection, then reset it - does not end the conversion when it is
        back a moment later.

        Args:
            why: what broke the connection (``Connection reset by peer``, ``no reply
                in 60 s``).

        Returns:
            False when the client was closed meanwhile (nothing to reconnect for).

        Raises:
            TrioconvIOError: the episode's attempts failed; the error says what broke
                the connection first, and the last failure.
        """
        now = trio.current_time()
        if self._replied or now >= self._episode_end:
            self._episode_end = now + _RECONNECT_TIMEOUT
            self._episode_lost = f"connection to the NFS server lost: {why}"
            self._failures = []
        else:
            self._failures.append(f"connected, then lost before any reply: {why}")
        with trio.CancelScope(shield=True):
            await self._stream.aclose()  # (also stops a send stuck on it: it fails now)
        if self._closing:
            return False  # closed meanwhile (aclose found no reconnect to stop yet)
        self._records.clear()
        self._direct = False
        redial = self.redial
        assert redial is not None
        stream: trio.SocketStream | None = None
        try:
            # (Entered with no checkpoint since the check above: aclose() finds it.)
            with trio.CancelScope() as self._redialling, trio.move_on_at(self._episode_end):
                while stream is None and len(self._failures) < len(_RECONNECT_DELAYS):
                    await trio.sleep(_RECONNECT_DELAYS[len(self._failures)])
                    try:
                        with trio.fail_after(_RECONNECT_ATTEMPT_TIMEOUT):
                            stream = await redial()
                    except trio.TooSlowError:
                        self._failures.append(f"no answer in {_RECONNECT_ATTEMPT_TIMEOUT:g} s")
                    except (OSError, TrioconvIOError, XDRError) as exc:
                        self._failures.append(_reason(exc))
        finally:
            self._redialling = None
        if stream is None:
            if self._closing:
                return False
            if len(self._failures) < len(_RECONNECT_DELAYS):  # out of time
                self._failures.append(f"no connection in {_RECONNECT_TIMEOUT:g} s")
            raise self._fail(
                f"{self._episode_lost}; {len(self._failures)} attempts to reconnect failed, "
                f"the last: {self._failures[-1]}"
            )
        taken = False
        try:
            async with self._sends.lock:
                # Under the send lock, so no call goes out half on the old stream and
                # half on the new one; every waiting call is woken to send again. (Not
                # when the client was closed meanwhile: nothing would close this one.)
                if not self._closing:
                    self._stream, taken = stream, True
                    self.connection += 1
                    self._replied = False
                    # The calls go out again now: their replies are due from now.
                    self._quiet_since = trio.current_time()
                    for pending in self._pending.values():
                        pending.finish()
        finally:
            if not taken:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
        return taken

    def _give_up(self, error: TrioconvIOError) -> None:
        """The connection is unusable: fail every call waiting on it, stop a send stuck
        on a server that stopped reading, refuse new calls."""
        if self.broken is None:
            self.broken = error
        for pending in self._pending.values():
            pending.error = self.broken
            pending.buf = None
            pending.finish()
        self._pending.clear()
        self._sends.abandon()

    async def aclose(self) -> None:
        self._closing = True
        if self._redialling is not None:
            self._redialling.cancel()
        with trio.CancelScope(shield=True):
            await self._stream.aclose()


async def _tcp_stream(host: str, port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(host, port)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return stream


def _shut(stream: trio.SocketStream) -> None:
    """Shut a broken stream down, so that its reader sees the end too (EOF)."""
    with contextlib.suppress(OSError):
        stream.socket.shutdown(socket.SHUT_RDWR)


# -- opening -------------------------------------------------------------------------------


async def _connect(
    address: NFSAddress, port: int, label: str, uri: str, what: str | None = None
) -> RPCClient:
    """Connect to the ``label`` server (errors are about ``uri``, calls say ``what``)."""
    try:
        return await RPCClient.connect(
            address.host, port, what or label, _credential(address), 64 * 1024
        )
    except OSError as exc:
        raise ImageError(
            f"Could not open '{uri}': {_reason(exc)} ({label} at {address.host}:{port})"
        ) from exc


@contextlib.contextmanager
def _handshake(uri: str, server: str, address: NFSAddress, port: int) -> Iterator[None]:
    """Bound a stage of opening - a new connection to ``server`` and its first calls -
    to :data:`_HANDSHAKE_TIMEOUT` seconds, with an error that says who did not answer.

    Raises:
        ImageError: the time ran out.
    """
    try:
        with trio.fail_after(_HANDSHAKE_TIMEOUT):
            yield
    except trio.TooSlowError:
        raise ImageError(
            f"Could not open '{uri}': the {server} at {address.host}:{port} did not answer "
            f"in {_HANDSHAKE_TIMEOUT:g} s"
        ) from None


async def _ports(address: NFSAddress, uri: str) -> tuple[int, int]:
    """The MOUNT and NFS TCP ports, from the URL or the portmapper."""
    if address.port is not None and address.mount_port is not None:
        return address.mount_port, address.port
    with _handshake(uri, "portmapper", address, proto.PMAP_PORT):
        pmap = await _connect(address, proto.PMAP_PORT, "portmapper", uri)
        try:
            found: list[int] = []
            for prog, given, name in (
                (proto.MOUNT_PROG, address.mount_port, "MOUNT v3"),
                (proto.NFS_PROG, address.port, "NFS v3"),
            ):
                if given is not None:
                    found.append(given)
                    continue
                vers = proto.MOUNT_VERS if prog == proto.MOUNT_PROG else proto.NFS_VERS
                port = await _getport(pmap, prog, vers)
                if port == 0:
                    raise ImageError(
                        f"Could not open '{uri}': no {name} server over TCP is registered "
                        f"with the portmapper at {address.host}"
                    )
                found.append(port)
            return found[0], found[1]
        finally:
            await pmap.aclose()


async def _getport(pmap: RPCClient, prog: int, vers: int) -> int:
    """The TCP port the portmapper knows for ``prog`` version ``vers`` (0: none)."""
    u = await pmap.call(
        proto.PMAP_PROG, proto.PMAP_VERS, proto.PMAPPROC_GETPORT, proto.encode_getport(prog, vers)
    )
    return proto.decode_getport(u)


async def _redial(address: NFSAddress) -> trio.SocketStream:
    """A new connection to the NFS server of an open file, found the way opening found
    it: the port from the URL, or the portmapper's answer now (a restarted server may
    listen on another). The export need not be mounted again: NFSv3 file handles stay
    valid, also across server restarts.

    The connection is handed over only once the server answered a NULL call on it: a
    hung or stopped server's kernel still takes connections, and the calls sent again
    on such a one would wait the whole silence limit. (The caller bounds the time.)

    Raises:
        OSError: no connection.
        TrioconvIOError: the portmapper did not answer, or knows no NFS v3 server; the
            new connection broke, or the server refused the NULL call.
        XDRError: the portmapper's reply is malformed.
    """
    port = address.port
    if port is None:
        pmap = await RPCClient.connect(address.host, proto.PMAP_PORT, "portmapper", None, 64 * 1024)
        try:
            port = await _getport(pmap, proto.NFS_PROG, proto.NFS_VERS)
        finally:
            await pmap.aclose()
        if port == 0:
            raise TrioconvIOError("no NFS v3 server over TCP is registered with the portmapper")
    stream = await _tcp_stream(address.host, port)
    try:
        await _null(RPCClient(stream, "NULL call", None, 64 * 1024))
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def _null(client: RPCClient) -> None:
    """Call NFS NULL, which does nothing: the reply shows the server itself answers (and
    speaks NFS v3 on that port).

    Raises:
        TrioconvIOError: the connection broke, or the server refused the call.
    """
    await client.call(proto.NFS_PROG, proto.NFS_VERS, Proc.NULL, b"")


async def _mount(address: NFSAddress, port: int, uri: str) -> tuple[bytes, str, list[str]]:
    """Mount the export: its root handle, its path and the names to LOOKUP below it.

    The URL does not say where the export ends and the path inside it begins. libnfs
    mounts the file's directory; so does this, then each shorter leading directory in
    turn until the server accepts one. The first refusal is the one reported.
    """
    names = address.names
    first_error: proto.MountError | None = None
    with _handshake(uri, "MOUNT server", address, port):
        client = await _connect(address, port, "MOUNT", uri)
        try:
            for depth in range(len(names) - 1, -1, -1):
                export = "/" + "/".join(names[:depth])
                u = await client.call(
                    proto.MOUNT_PROG, proto.MOUNT_VERS, proto.MOUNTPROC_MNT,
                    proto.encode_dirpath(export),
                )  # fmt: skip
                try:
                    fh = proto.decode_mnt(u, export)
                except proto.MountError as exc:
                    first_error = first_error or exc
                    continue
                # The mount list is advisory; NFSv3 handles stay valid without it, so
                # a UMNT that fails or goes unanswered changes nothing.
                with trio.move_on_after(_UMNT_TIMEOUT), contextlib.suppress(TrioconvIOError):
                    await client.call(
                        proto.MOUNT_PROG, proto.MOUNT_VERS, proto.MOUNTPROC_UMNT,
                        proto.encode_dirpath(export),
                    )  # fmt: skip
                return fh, export, names[depth:]
        finally:
            await client.aclose()
    assert first_error is not None
    raise ImageError(f"Could not open '{uri}': mounting '{first_error.path}' failed: {first_error}")


@attrs.define(eq=False)
class _Session:
    """An NFS connection with the root handle of the mounted export."""

    client: RPCClient
    root: bytes
    export: str
    names: list[str]
    uri: str

    async def nfs(
        self,
        proc: Proc,
        args: bytes,
        decode: Callable[[Unpacker], _T],
        payload: memoryview | None = None,
    ) -> _T:
        """Call an NFS procedure, retrying while the server says JUKEBOX.

        Raises:
            NFSStatusError: the procedure failed.
            TrioconvIOError: the connection failed or the reply is malformed.
        """
        for attempt in itertools.count():
            u = await self.client.call(proto.NFS_PROG, proto.NFS_VERS, proc, args, payload)
            try:
                return decode(u)
            except proto.NFSStatusError as exc:
                if exc.status != proto.NFS3ERR_JUKEBOX or attempt >= _JUKEBOX_RETRIES:
                    raise
            except XDRError as exc:
                raise TrioconvIOError(f"{self.uri}: malformed {proc.name} reply: {exc}") from exc
            await trio.sleep(_JUKEBOX_DELAY)
        raise AssertionError("unreachable")

    async def read(self, fh: bytes, offset: int, buf: memoryview) -> tuple[int, bool]:
        """READ ``buf.nbytes`` bytes at ``offset`` into ``buf``, retrying while the server
        says JUKEBOX: the bytes received (at the start of ``buf``) and ``eof``.

        Raises:
            NFSStatusError: the READ failed.
            TrioconvIOError: the connection failed or the reply is malformed.
        """
        count = buf.nbytes
        args = proto.encode_read(fh, offset, count)
        for attempt in itertools.count():
            done = await self.client.call_read(args, buf)
            if isinstance(done, tuple):
                return done
            try:
                result = proto.decode_read(done, count)
            except proto.NFSStatusError as exc:
                if exc.status != proto.NFS3ERR_JUKEBOX or attempt >= _JUKEBOX_RETRIES:
                    raise
            except XDRError as exc:
                raise TrioconvIOError(f"{self.uri}: malformed READ reply: {exc}") from exc
            else:
                got = result.data.nbytes
                buf[:got] = result.data
                return got, result.eof
            await trio.sleep(_JUKEBOX_DELAY)
        raise AssertionError("unreachable")

    async def lookup(self, names: list[str]) -> tuple[bytes, proto.FileAttr | None]:
        """LOOKUP ``names`` one by one from the export's root, following symbolic links
        as libnfs (QEMU's NFS client) follows them: a relative one from the folder it is
        in, an absolute one only when it names a path inside the export.

        Raises:
            ImageError: a name is missing, a link leads out of the export or loops.
        """
        fh, attr = self.root, None
        walked: list[str] = []
        todo = list(names)
        links = 0
        while todo:
            name = todo.pop(0)
            try:
                fh, attr = await self.nfs(
                    Proc.LOOKUP, proto.encode_diropargs(fh, name), proto.decode_lookup
                )
                if attr is None:  # (the server may leave the attributes out)
                    attr = await self.nfs(Proc.GETATTR, proto.encode_fh(fh), proto.decode_getattr)
                target = None
                if attr.type == proto.FileType.LNK:
                    target = await self.nfs(
                        Proc.READLINK, proto.encode_fh(fh), proto.decode_readlink
                    )
            except proto.NFSStatusError as exc:
                where = "/".join([self.export.rstrip("/"), *walked, name])
                raise ImageError(f"Could not open '{self.uri}': {exc} at '{where}'") from exc
            if target is None:
                walked.append(name)
                continue
            links += 1
            if links > _MAX_LINKS:
                raise ImageError(f"Could not open '{self.uri}': Too many levels of symbolic links")
            path = self._link_path(target, walked)
            # Walk again from the root, the link's path in place of its name.
            fh, attr, walked, todo = self.root, None, [], [*path, *todo]
        return fh, attr

    def _link_path(self, target: str, folder: list[str]) -> list[str]:
        """The names, from the export's root, that a link in ``folder`` points at."""
        export = "/" + self.export.strip("/")
        if target.startswith("/"):
            if target != export and not target.startswith(export.rstrip("/") + "/"):
                raise ImageError(
                    f"Could not open '{self.uri}': Symbolic link points outside export"
                )
            target = target[len(export) :]
        else:
            target = "/".join([*folder, target])
        names = posixpath.normpath(target.lstrip("/") or ".").split("/")
        if names[0] == "..":  # (above the root of what was mounted)
            raise ImageError(f"Could not open '{self.uri}': Symbolic link points outside export")
        return [name for name in names if name != "."]


@asynccontextmanager
async def _session(uri: str) -> AsyncIterator[_Session]:
    """Find the ports, mount, and connect to NFS (no reader task yet)."""
    address = parse_nfs_uri(uri)
    try:
        with trio.fail_after(OPEN_TIMEOUT):
            mount_port, nfs_port = await _ports(address, uri)
            root, export, names = await _mount(address, mount_port, uri)
            with _handshake(uri, "NFS server", address, nfs_port):
                client = await _connect(address, nfs_port, "NFS", uri, uri)
                try:
                    await _null(client)
                except BaseException:
                    await client.aclose()
                    raise
    except trio.TooSlowError:
        raise ImageError(f"Could not open '{uri}': the server did not answer in time") from None
    except TrioconvIOError as exc:
        raise _open_error(uri, exc) from exc
    except XDRError as exc:
        raise ImageError(f"Could not open '{uri}': malformed reply: {exc}") from exc
    try:
        yield _Session(client, root, export, names, uri)
    finally:
        await client.aclose()


def _open_error(uri: str, exc: Exception, verb: str = "open") -> ImageError:
    """``Could not VERB 'URI': what went wrong`` (naming the URL once)."""
    if isinstance(exc, ImageError):
        return exc
    if isinstance(exc, trio.TooSlowError):
        return ImageError(f"Could not {verb} '{uri}': the server did not answer in time")
    text = str(exc)
    text = text.removeprefix(f"{uri}: ")  # the connection's messages name the URL already
    return ImageError(f"Could not {verb} '{uri}': {text}")


# -- the driver ----------------------------------------------------------------------------


class NFSDriver(Driver):
    """A regular file on an NFSv3 server. Made by :func:`open_nfs`, which runs its reader."""

    name = "nfs"

    def __init__(
        self,
        session: _Session,
        fh: bytes,
        size: int,
        fsinfo: proto.FSInfo,
        *,
        writable: bool,
        cache: CacheMode = CacheMode.WRITEBACK,
    ) -> None:
        self._session = session
        self._fh = fh
        # Write-through: every WRITE durable before it is answered (RFC 1813 FILE_SYNC).
        self._stable = Stable.FILE_SYNC if cache.dsync else Stable.UNSTABLE
        self._size = size
        self.location = session.uri
        self._writable = writable
        # What one call carries; :meth:`_split` cuts every request to it.
        self._rsize = _call_size(fsinfo.rtmax)
        self._wsize = _call_size(fsinfo.wtmax)
        self._rpref = min(fsinfo.rtpref or self._rsize, self._rsize)
        self._wpref = min(fsinfo.wtpref or self._wsize, self._wsize)
        self._log = proto.WriteBackLog()
        self._commit_lock = trio.Lock()
        self._closed = False
        #: Bytes the server says the file takes on its storage, when it was opened
        #: (``qemu-img info``'s disk size).
        self.allocated: int | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def limits(self) -> Limits:
        # Requests bigger than one call are split, so tiny calls need not mean tiny
        # requests (each would be a task, a buffer, a pass through the pipeline).
        if self._writable:
            most = max(min(self._rsize, self._wsize), _MIN_TRANSFER)
            return Limits(max_transfer=most, opt_transfer=min(self._wpref, most))
        most = max(self._rsize, _MIN_TRANSFER)
        return Limits(max_transfer=most, opt_transfer=min(self._rpref, most))

    @property
    def caps(self) -> Caps:
        # NFSv3 has no block status and no write-zeroes. A file is zero-initialised
        # when created or truncated and extended, which is what a new target is.
        return Caps(writable=self._writable, zero_init=True)

    def _io_error(self, exc: proto.NFSStatusError, what: str, offset: int) -> TrioconvIOError:
        return TrioconvIOError(
            f"error while {what} {self.location} at byte {offset}: {exc}",
            offset=offset,
            errno=exc.errno,
        )

    async def _split(
        self,
        fn: Callable[[int, memoryview], Awaitable[None]],
        step: int,
        offset: int,
        view: memoryview,
    ) -> None:
        """One call per ``step`` bytes, all in flight together."""
        if view.nbytes <= step:
            await fn(offset, view)
            return
        async with trio.open_nursery() as nursery:
            for start in range(0, view.nbytes, step):
                nursery.start_soon(fn, offset + start, view[start : start + step])

    # -- reads ---------------------------------------------------------------------------------
    async def preadinto(self, offset: int, buf: memoryview) -> None:
        if buf.nbytes:
            view = buf.cast("B") if buf.format != "B" else buf
            await self._split(self._read_piece, self._rsize, offset, view)

    async def _read_piece(self, offset: int, buf: memoryview) -> None:
        while buf.nbytes:
            n = buf.nbytes
            try:
                got, eof = await self._session.read(self._fh, offset, buf)
            except proto.NFSStatusError as exc:
                raise self._io_error(exc, "reading", offset) from exc
            if got < n and (eof or not got):
                if not eof:
                    raise TrioconvIOError(
                        f"error while reading {self.location} at byte {offset}: "
                        "the server returned no data",
                        offset=offset,
                        errno=errno_mod.EIO,
                    )
                if offset + got < self._size:
                    # RFC 1813: eof means offset + count is the file's size. Ending
                    # before the size the file was opened with is not zeroes to fill in.
                    raise TrioconvIOError(
                        f"error while reading {self.location} at byte {offset + got}: the "
                        f"server reported the end of the file before its size ({self._size})",
                        offset=offset + got,
                        errno=errno_mod.EIO,
                    )
                buf[got:] = bytes(n - got)  # past the end of the file
                return
            buf = buf[got:]
            offset += got

    # -- writes --------------------------------------------------------------------------------
    async def pwrite(self, offset: int, data: Buffer) -> None:
        if not self._writable:
            raise UnsupportedError(f"{self.location}: opened read-only")
        view = memoryview(data).cast("B")
        if view.nbytes:
            await self._split(self._write_piece, self._wsize, offset, view)
        if self._log.nbytes >= COMMIT_THRESHOLD:
            await self._commit(COMMIT_THRESHOLD)

    async def _write(self, offset: int, data: Buffer) -> bytes | None:
        """WRITE all of ``data`` as :attr:`_stable` says; return the verifier, None when
        the server made it stable already."""
        verf: bytes | None = None
        pos = 0
        restarts = 0
        while pos < len(data):
            chunk = memoryview(data)[pos:]
            try:
                result = await self._session.nfs(
                    Proc.WRITE,
                    proto.encode_write_head(self._fh, offset + pos, chunk.nbytes, self._stable),
                    proto.decode_write,
                    payload=chunk,
                )
            except proto.NFSStatusError as exc:
                raise self._io_error(exc, "writing", offset + pos) from exc
            if not 0 < result.count <= chunk.nbytes:
                raise TrioconvIOError(
                    f"error while writing {self.location} at byte {offset + pos}: the "
                    f"server wrote {result.count} of {chunk.nbytes} bytes",
                    offset=offset + pos,
                    errno=errno_mod.EIO,
                )
            if result.committed is Stable.UNSTABLE:
                if verf is not None and verf != result.verf:
                    # The server restarted between two parts: write it all again.
                    restarts += 1
                    if restarts > _MAX_REWRITE_ROUNDS:
                        raise TrioconvIOError(
                            f"error while writing {self.location} at byte {offset}: the "
                            f"server's write verifier changed {restarts} times while "
                            "writing one piece (is it restarting?)",
                            offset=offset,
                            errno=errno_mod.EIO,
                        )
                    pos, verf = 0, None
                    continue
                verf = result.verf
            pos += result.count
        return verf

    async def _write_piece(self, offset: int, data: memoryview) -> None:
        if self._stable is not Stable.UNSTABLE:
            verf = await self._write(offset, data)
            if verf is not None:  # a server that wrote it unstable after all
                self._log.add(offset, bytes(data), verf)
            return
        # The copy is kept until a COMMIT with the same verifier makes it durable.
        copy = bytes(data)
        verf = await self._write(offset, copy)
        if verf is not None:
            self._log.add(offset, copy, verf)

    async def _commit(self, min_bytes: int = 0) -> None:
        """COMMIT what was written; rewrite what a server restart may have lost."""
        async with self._commit_lock:
            if not self._log or self._log.nbytes < min_bytes:
                return
            for _ in range(_MAX_REWRITE_ROUNDS):
                ids = self._log.snapshot()
                try:
                    verf = await self._session.nfs(
                        Proc.COMMIT, proto.encode_commit(self._fh), proto.decode_commit
                    )
                except proto.NFSStatusError as exc:
                    raise self._io_error(exc, "flushing", 0) from exc
                stale = self._log.committed(ids, verf)
                if not stale:
                    return
                await together([functools.partial(self._rewrite, entry) for entry in stale])
            raise TrioconvIOError(
                f"error while flushing {self.location}: the server's write verifier "
                f"changed {_MAX_REWRITE_ROUNDS} times in a row (is it restarting?)",
                errno=errno_mod.EIO,
            )

    async def _rewrite(self, entry: proto.Dirty) -> None:
        verf = await self._write(entry.offset, entry.data)
        self._log.rewritten(entry, verf)

    async def flush(self) -> None:
        if self._writable:
            await self._commit()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._session.client.aclose()


async def _open_file(
    session: _Session, *, writable: bool
) -> tuple[bytes, proto.FileAttr, proto.FSInfo]:
    """LOOKUP the file, check its type and our access, read its size and FSINFO."""
    uri = session.uri
    fh, attr = await session.lookup(session.names)
    try:
        attr = await session.nfs(Proc.GETATTR, proto.encode_fh(fh), proto.decode_getattr)
        if attr.type == proto.FileType.DIR:
            raise ImageError(f"Could not open '{uri}': Is a directory")
        if attr.type != proto.FileType.REG:
            raise ImageError(f"Could not open '{uri}': not a regular file")
        want = proto.ACCESS_READ | (proto.ACCESS_MODIFY if writable else 0)
        granted = await session.nfs(Proc.ACCESS, proto.encode_access(fh, want), proto.decode_access)
        if granted & want != want:
            # ACCESS says what is refused, not why: the file's owner and mode, a
            # read-only export or a squashed root all look the same from here.
            what = "write" if granted & proto.ACCESS_READ else "read"
            raise ImageError(
                f"Could not open '{uri}': Permission denied: the server does not let this "
                f"client {what} it (the file: uid {attr.uid}, mode {attr.mode & 0o7777:04o};"
                " the export may also be read-only or map root to another user)"
            )
        fsinfo = await session.nfs(Proc.FSINFO, proto.encode_fh(fh), proto.decode_fsinfo)
    except proto.NFSStatusError as exc:
        raise ImageError(f"Could not open '{uri}': {exc}") from exc
    return fh, attr, fsinfo


@asynccontextmanager
async def open_nfs(
    uri: str, *, writable: bool = False, cache: CacheMode | str = CacheMode.WRITEBACK
) -> AsyncIterator[Driver]:
    """Open a file on an NFSv3 server and keep its reader task running while in use.

    Writes are committed on :meth:`~trioconv.Driver.flush` whatever ``cache`` says; a
    write-through mode (``writethrough``, ``directsync``) makes every WRITE FILE_SYNC.

    Raises:
        ImageError: the server cannot be reached, refuses the mount, the file does not
            exist, is not a regular file, or our credential may not read (or write) it.
    """
    async with _session(uri) as session:
        try:
            with trio.fail_after(OPEN_TIMEOUT):
                fh, attr, fsinfo = await _open_file(session, writable=writable)
        except (trio.TooSlowError, TrioconvIOError) as exc:
            raise _open_error(uri, exc) from exc
        driver = NFSDriver(
            session, fh, attr.size, fsinfo, writable=writable, cache=CacheMode.parse(cache)
        )
        driver.allocated = attr.used
        session.client.set_max_record(max(driver._rsize, driver._wsize) + 64 * 1024)
        # From now on a lost connection is made again (same credential, same record
        # limit: the client stays, only its stream is new).
        session.client.redial = functools.partial(_redial, parse_nfs_uri(uri))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.client.reader)
            try:
                yield driver
            finally:
                await driver.aclose()


# -- creating and removing -----------------------------------------------------------------


async def _parent(session: _Session) -> tuple[bytes, str]:
    """The handle of the file's directory, and the file's name."""
    *dirs, name = session.names
    if not dirs and not name:
        raise ImageError(f"'{session.uri}': the URL must name a file")
    fh, _attr = await session.lookup(dirs)
    return fh, name


async def create_nfs_file(uri: str, size: int) -> bool:
    """Create ``uri`` (or truncate it) as an empty file of ``size`` bytes.

    A file this call created is removed again (over a new connection: the first may be
    what failed) when setting its size fails, since the caller never learns it was new.

    Returns:
        True when the file did not exist before (the caller may remove it on failure).

    Raises:
        ImageError: it cannot be created.
    """
    created = False
    try:
        async with _session(uri) as session:
            try:
                with trio.fail_after(OPEN_TIMEOUT):
                    dir_fh, name = await _parent(session)
                    try:
                        fh = await session.nfs(
                            Proc.CREATE,
                            # Mode 0600, as QEMU (libnfs) creates an image.
                            proto.encode_create(
                                dir_fh, name, proto.CreateMode.GUARDED, perms=0o600
                            ),
                            proto.decode_create,
                        )
                        created = True
                    except proto.NFSStatusError as exc:
                        if exc.status != proto.NFS3ERR_EXIST:
                            raise
                        fh = None
                    if fh is None:
                        fh, attr = await session.lookup(session.names)
                        if attr is not None and attr.type == proto.FileType.DIR:
                            raise ImageError(f"Could not create '{uri}': Is a directory")
                        if attr is not None and attr.type != proto.FileType.REG:
                            raise ImageError(f"Could not create '{uri}': not a regular file")
                    # An existing file is truncated first: a new file reads as zeroes.
                    for length in ([] if created else [0]) + ([size] if size else []):
                        await session.nfs(
                            Proc.SETATTR,
                            proto.encode_setattr_size(fh, length),
                            lambda u: proto.decode_wcc_status(u, "SETATTR"),
                        )
                    return created
            except (proto.NFSStatusError, trio.TooSlowError, TrioconvIOError) as exc:
                raise _open_error(uri, exc, "create") from exc
    except BaseException:
        if created:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(OPEN_TIMEOUT),
                contextlib.suppress(Exception),
            ):
                await remove_nfs_file(uri)
        raise


async def remove_nfs_file(uri: str) -> None:
    """Remove ``uri`` from the server.

    Raises:
        ImageError: it cannot be removed.
    """
    async with _session(uri) as session:
        try:
            with trio.fail_after(OPEN_TIMEOUT):
                dir_fh, name = await _parent(session)
                await session.nfs(
                    Proc.REMOVE,
                    proto.encode_diropargs(dir_fh, name),
                    lambda u: proto.decode_wcc_status(u, "REMOVE"),
                )
        except (proto.NFSStatusError, trio.TooSlowError, TrioconvIOError) as exc:
            raise _open_error(uri, exc, "remove") from exc
