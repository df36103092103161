"""A Trio iSCSI initiator: one session, one connection, many SCSI commands in flight.

Opening ``iscsi://[user%password@]host[:port]/target-iqn/lun`` connects, logs in
(:mod:`._login`), starts the reader task and then asks the LUN, one command at a time,
whether it is a disk, how large it is and how it is provisioned. After that any number of
tasks may issue commands at once:

* Each command gets an *initiator task tag* (ITT) and, when it is sent, the next
  *CmdSN*. The target says how far it will accept commands (MaxCmdSN, in every
  response); a command waits while the window is closed. Commands go out whole under a
  send lock, shielded from cancellation, so a half-sent PDU can never corrupt the stream
  and CmdSNs reach the target in order.
* One reader task frames PDUs and routes them by ITT. Data-In segments are received
  straight into the buffer of the task that asked (``os.readv``, after checking that
  the task still waits, so a cancelled one's buffer is never written); a SCSI
  Response or a Data-In with status completes the task; an R2T (ready to transfer)
  wakes a writing task, which answers it with Data-Out PDUs sent in one vectored
  ``sendmsg``.
* Writes use what login allowed: the first part goes as *immediate data* inside the
  command PDU and, when InitialR2T is No, more follows *unsolicited* up to
  FirstBurstLength; the rest waits for R2Ts.

If the connection drops once the LUN is open - the target restarted, a network reset, a
path failing over, or the target asking to be logged out - the session carries on over a
new one, as libiscsi's reconnect does for QEMU (see :meth:`Connection._reconnect`): the
reader dials the same portal again, logs in with the same ISID and TSIH 0 (*session
reinstatement*, RFC 7143 6.3.5: the target ends whatever the old session still had
running before the new one starts), checks with READ CAPACITY that the LUN is still the
one opened, and every command that had not received its status is issued again, in the
order it first went out, with a new task tag and CmdSN - reads into the same buffers,
writes with the same bytes for the same blocks. That is bounded: a few attempts within
:data:`_RECONNECT_TIMEOUT` seconds, a new connection that breaks before answering
anything counting as one; a LUN that came back smaller or with other blocks, or a target
that sends what the protocol does not allow, ends the conversion at once. Then the reader
fails every waiting command and raises, which cancels whatever runs inside
:func:`open_iscsi`.

A target that falls silent with the connection still open - a frozen host, a network
that drops everything - is pinged (NOP-Out) and, when even that goes unanswered, its
connection is taken for lost the same way (:meth:`Connection._watch`); silent again on
the new one, it ends the conversion. A target that answers BUSY or TASK SET FULL is asked
again after growing waits, and a UNIT ATTENTION (a reset, a changed mode page) is asked
again at once, as QEMU does.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import functools
import itertools
import os
import random
import socket
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from ..._cache import CacheMode
from ..._errors import ImageError, TrioconvIOError, UnsupportedError, ZeroesNotSupported
from ..._open import is_iscsi_uri as is_iscsi_uri
from ...driver import Buffer, Caps, Driver, Extent, ExtentKind, Limits
from .._net import WholeSends, receive_payload, together
from .._net import connection_error_reason as _reason
from . import _login as login_mod
from . import _pdu as pdu
from . import _scsi as scsi
from ._pdu import BHS, Opcode
from ._scsi import SCSIStatus, SenseKey

__all__ = [
    "ISCSIAddress",
    "ISCSIDriver",
    "is_iscsi_uri",
    "open_iscsi",
    "parse_iscsi_uri",
]

DEFAULT_PORT = 3260
#: The initiator's name unless ``?initiator-name=`` says otherwise.
DEFAULT_INITIATOR = "iqn.2024-01.io.trioconv:initiator"
#: Seconds allowed for connecting, logging in and the opening commands; and for logout.
OPEN_TIMEOUT = 30.0
CLOSE_TIMEOUT = 5.0
#: The largest READ/WRITE sent whatever the LUN allows.
_MAX_TRANSFER = 8 * 1024 * 1024
#: The largest range one WRITE SAME or GET LBA STATUS covers.
_MAX_ZERO_BLOCKS = 0x400000  # 2 GiB of 512-byte blocks
_STATUS_ALLOC = 8 + 16 * 64
#: The largest WRITE SAME that writes (rather than unmaps) zeroes.
_WRITE_SAME_PIECE = 8 * 1024 * 1024
#: Retries of a command the target answers with UNIT ATTENTION (which reports an event,
#: such as a reset or a changed mode page, once per initiator: the retry then succeeds).
_RETRIES = 10
#: Waits, in seconds, before each retry of a command the target answered BUSY or TASK SET
#: FULL: QEMU's (its ``iscsi_retry_times``), growing fourfold from 8 ms to 33 s and about
#: 44 s in all, so that a target busy for seconds (a controller failing over, a queue
#: full under load) is waited out rather than failing the conversion. Each wait is
#: between half and one and a half times its value, so that the many commands a full
#: queue turned away do not all come back at the same moment.
_BUSY_DELAYS = (0.008, 0.032, 0.128, 0.512, 2.048, 8.192, 32.768)
_RECV_BUFFER = 256 * 1024
#: A target that owes answers (commands in flight) and has sent nothing for this many
#: seconds is pinged (a NOP-Out it must answer, RFC 7143 11.18); one that stays silent
#: for :data:`_SILENCE_LIMIT` seconds, pings unanswered, is taken for gone and the
#: connection given up. QEMU pings every 5 s and reconnects after 3 pings unanswered.
_PING_INTERVAL = 5.0
_SILENCE_LIMIT = 20.0
#: Seconds a command may wait for its status while the target, answering pings, is
#: alive: a target whose backing store hangs (a disk gone, a hung NFS mount under it)
#: still answers NOP-Outs, and its commands would otherwise wait for ever. Past the
#: bound the connection is made again and the command sent again (as QEMU does when a
#: request times out); stuck a second time, the conversion ends. SYNCHRONIZE CACHE,
#: which may write gigabytes out, is not bounded - unless the ``timeout`` option bounds
#: every command (QEMU's meaning of it).
_COMMAND_LIMIT = 300.0
#: Operation codes of SYNCHRONIZE CACHE (10) and (16).
_SYNC_OPCODES = (0x35, 0x91)
#: Login redirections (status class 1, TargetAddress) followed before giving up.
_MAX_REDIRECTS = 5
#: When the connection of an open LUN is lost, it is made again: the pause (seconds)
#: before each attempt - the first at once, for a connection that dropped while the
#: target stayed up, then growing, for a target that is restarting. (libiscsi waits
#: 0, 1, 2... seconds between attempts and never gives up; a conversion must end.)
_RECONNECT_DELAYS = (0.0, 0.5, 1.0, 2.0, 4.0)
#: Seconds one attempt (connecting, logging in, READ CAPACITY) may take, and all the
#: attempts after one loss together: a target that stays away fails the conversion
#: within about this long.
_RECONNECT_ATTEMPT_TIMEOUT = 3.0
_RECONNECT_TIMEOUT = 12.0
#: Seconds the Logout a target asked for (Async Message, event 1) may take to be
#: answered before its connection is dropped anyway.
_LEAVE_TIMEOUT = 2.0
#: Silences (see :data:`_SILENCE_LIMIT`) in a row, with no answer to any command in
#: between and the connection made again after each, that end the conversion.
_SILENCES = 2
_MAX_IOV = 512


@attrs.frozen
class ISCSIAddress:
    """Where a LUN lives, parsed from ``iscsi://[user[%password]@]host[:port]/iqn/lun``."""

    host: str
    target: str
    lun: int
    port: int = DEFAULT_PORT
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    initiator: str = DEFAULT_INITIATOR

    @property
    def uri(self) -> str:
        """The address as a URL, without the password (for messages)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port != DEFAULT_PORT else ""
        user = f"{urllib.parse.quote(self.user)}@" if self.user else ""
        return f"iscsi://{user}{host}{port}/{self.target}/{self.lun}"


def parse_iscsi_uri(uri: str) -> ISCSIAddress:
    """Parse an ``iscsi://`` URL as libiscsi and QEMU do.

    The password, when the URL carries one, follows the user after a ``%``
    (``iscsi://admin%secret@host/iqn.2024-01.example:disk/1``) or, as libiscsi also
    takes it, a ``:``. User and password are taken as written, as libiscsi takes them
    (``%41`` is those three characters, not ``A``). LUN 0 is usually the target's
    controller, so disks start at LUN 1 on most targets.

    Raises:
        ImageError: the URL is malformed.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme.lower() != "iscsi":
        raise ImageError(f"'{uri}' is not an iSCSI URL")
    userinfo, at, _host = parts.netloc.rpartition("@")
    # libiscsi cuts at the first "%", or else at the first ":".
    sep = "%" if "%" in userinfo else ":"
    shown = (
        uri.replace(userinfo, userinfo.partition(sep)[0] + sep + "***") if sep in userinfo else uri
    )
    if not parts.hostname:
        raise ImageError(f"'{shown}': missing host")
    user = password = None
    if at:
        name, pct, secret = userinfo.partition(sep)
        user = name
        password = secret if pct else os.environ.get("LIBISCSI_CHAP_PASSWORD")
        if not user:
            raise ImageError(f"'{shown}': empty user name")
        if password is None:
            raise ImageError(f"'{shown}': the URL names a CHAP user but no password")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ImageError(f"'{shown}': invalid port") from None
    names = [n for n in urllib.parse.unquote(parts.path).split("/") if n]
    if len(names) != 2:
        raise ImageError(f"'{shown}': the URL must be iscsi://host[:port]/target-iqn/lun")
    target, lun_text = names
    try:
        lun = int(lun_text)
    except ValueError:
        raise ImageError(f"'{shown}': the LUN must be a number, not '{lun_text}'") from None
    if not 0 <= lun < 16384:
        raise ImageError(f"'{shown}': LUN {lun} out of range")
    initiator = DEFAULT_INITIATOR
    for key, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items():
        if key != "initiator-name" or not values[-1]:
            raise ImageError(f"'{shown}': unknown URL parameter '{key}'")
        initiator = values[-1]
    return ISCSIAddress(
        host=parts.hostname,
        target=target,
        lun=lun,
        port=port,
        user=user,
        password=password,
        initiator=initiator,
    )


class CommandError(Exception):
    """A SCSI command ended with a status other than GOOD."""

    def __init__(self, status: int, sense: scsi.Sense | None) -> None:
        self.status = status
        self.sense = sense
        if sense is not None:
            text = sense.text
        else:
            try:
                text = f"SCSI status {SCSIStatus(status).name.replace('_', ' ').lower()}"
            except ValueError:
                text = f"SCSI status 0x{status:02x}"
        super().__init__(text)

    @property
    def unsupported(self) -> bool:
        """ILLEGAL REQUEST for the opcode or a CDB field: the LUN does not do this."""
        s = self.sense
        return s is not None and s.key == SenseKey.ILLEGAL_REQUEST and s.asc in (0x20, 0x24)


@attrs.define(eq=False)
class _Task:
    """One command in flight, as the reader sees it."""

    itt: int
    data_in: memoryview | None = None
    received: int = 0
    header: BHS | None = None
    segment: bytes = b""
    error: TrioconvIOError | None = None
    done: trio.Event = attrs.field(factory=trio.Event)
    r2ts: list[tuple[int, int, int]] = attrs.field(factory=list)
    r2t_ready: trio.Event = attrs.field(factory=trio.Event)
    scsi: bool = False  # a SCSI command: only a SCSI Response / Data-In with S ends it
    sent: int = 0  # write data sent so far (in order: DataSequenceInOrder=Yes)
    out_total: int = 0  # write data in all
    asked: int = 0  # write data sent unasked or asked for by R2Ts so far
    data_sn: int = 0  # the DataSN the next Data-In must carry
    r2t_sn: int = 0  # the R2TSN the next R2T must carry
    ticket: int | None = None  # its place in the order commands first went out in
    issued: bool = False  # its command went out (or began to) on the connection in use
    reissue: bool = False  # that connection was lost first: the command must go again
    issued_at: float = 0.0  # trio.current_time() when it went out
    bounded: bool = True  # its wait for a status counts against the command bound
    stalls: int = 0  # connections given up because this command got no answer

    def finish(self) -> None:
        """The command is over (status, error or rejection): wake whoever waits."""
        self.done.set()
        self.r2t_ready.set()


class Connection:
    """A logged-in iSCSI connection: sequence numbers, the reader, and commands.

    Given :attr:`redial` - a way to log in to the same LUN again - the reader replaces
    a connection that is lost, and the commands still waiting for their status go out
    again on the new one (see :meth:`_reconnect`). Without it (while the LUN is being
    opened) a lost connection fails the commands at once.
    """

    #: Logs in again on a new connection and checks the LUN, given the attempt's number
    #: after the loss (0 for the first); None: a lost connection is an error.
    redial: Callable[[int], Awaitable[Connection]] | None = None

    def __init__(self, stream: trio.SocketStream, what: str) -> None:
        self._stream = stream
        self._sock = stream.socket
        self.what = what
        self._buf = bytearray(_RECV_BUFFER)
        self._scratch = bytearray(_RECV_BUFFER)
        self._start = 0
        self._end = 0
        self._pending: dict[int, _Task] = {}
        self._itts = itertools.count(1)
        self._sends = WholeSends()
        self._window = trio.Event()
        self.cmd_sn = 0
        self.max_cmd_sn = 0
        self.exp_stat_sn = 0
        self.params = login_mod.Params()
        self.broken: TrioconvIOError | None = None
        self._closing = False
        self._pings_send, _ = trio.open_memory_channel[tuple[BHS, bytes]](4)
        self._heard = 0.0  # trio.current_time() when bytes last moved, either way
        self._pinging = False  # a keepalive ping is waiting for its answer
        #: The ISID the session logged in with (the same again reinstates the session),
        #: and where that login succeeded (the portal a redirection gave, if any).
        self.isid = b""
        self.portal: ISCSIAddress | None = None
        #: The number of the connection in use: 0 for the first, one more per reconnect.
        self.connection = 0
        #: Commands may go out: not while the connection is replaced, or being left.
        self._ready = True
        #: Commands that went out on a connection since lost, waiting for the next one.
        self._lost: list[_Task] = []
        #: The tickets of the commands going out again after a reconnect, in their
        #: first order: each waits for its turn, and commands new since wait for all.
        self._turns: deque[int] = deque()
        self._tickets = itertools.count()
        #: A command was answered on this connection (or it is the first). Until one is
        #: on a new connection, reconnecting goes on with the same attempts, time limit,
        #: first loss and failures (see :meth:`_reconnect`).
        self._replied = True
        self._episode_end = 0.0
        self._episode_lost = ""
        self._failures: list[str] = []
        #: Connections given up for silence in a row, no command answered in between.
        self._silences = 0
        self._silent = False  # the watchdog gave up the connection in use
        self._leaving = False  # logging out of it, as the target asked
        #: Why the reading of the connection in use was stopped (silence, a logout).
        self._stop_reason: str | None = None
        #: Seconds a command may wait for its status (see :data:`_COMMAND_LIMIT`), and
        #: whether that bounds SYNCHRONIZE CACHE too (the ``timeout`` option given).
        self.command_limit = _COMMAND_LIMIT
        self.limit_sync = False
        #: A command got no answer on two connections: the conversion ends with this.
        self._stuck: str | None = None
        #: Seconds the target asked to wait before logging in again (Time2Wait).
        self._hold_off = 0.0

    @classmethod
    async def connect(cls, address: ISCSIAddress) -> Connection:
        stream = await trio.open_tcp_stream(address.host, address.port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(stream, address.uri)

    # -- receiving ---------------------------------------------------------------------
    async def _fill(self, want: int) -> None:
        """Make at least ``want`` bytes available in the receive buffer."""
        if self._end - self._start >= want:
            return
        if self._start:
            remaining = self._end - self._start
            self._buf[:remaining] = self._buf[self._start : self._end]
            self._start, self._end = 0, remaining
        if want > len(self._buf):
            self._buf.extend(bytes(want - len(self._buf)))
        view = memoryview(self._buf)
        while self._end < want:
            n = await self._sock.recv_into(view[self._end :], want - self._end)
            if not n:
                raise TrioconvIOError("the target closed the connection")
            self._end += n
            self._heard = trio.current_time()

    async def _recv_exact(self, n: int) -> bytes:
        await self._fill(n)
        data = bytes(self._buf[self._start : self._start + n])
        self._start += n
        return data

    async def _receive_data_in(self, task: _Task, offset: int, n: int) -> None:
        """Receive a Data-In segment straight into the reading task's buffer.

        A task that stopped waiting (cancelled: its buffer may already hold something
        else) is never written to; its bytes go to scratch space.
        """

        def wanted() -> memoryview | None:
            # Asked before every read of the payload: bytes are arriving.
            self._heard = trio.current_time()
            return task.data_in if self._pending.get(task.itt) is task else None

        have = min(self._end - self._start, n)
        if have:
            buf = wanted()
            if buf is not None:
                buf[offset : offset + have] = self._buf[self._start : self._start + have]
            self._start += have
        fd = self._sock.fileno()
        await receive_payload(fd, offset + have, offset + n, wanted, self._scratch, "target")

    async def _skip(self, n: int) -> None:
        while n:
            await self._fill(min(n, len(self._buf)))
            step = min(n, self._end - self._start)
            self._start += step
            n -= step

    async def read_pdu(self, limit: int = pdu.MAX_SEGMENT) -> tuple[BHS, bytes]:
        """Receive one whole PDU (login phase and tests; the reader has its own loop)."""
        header = pdu.decode_bhs(await self._recv_exact(pdu.BHS_SIZE))
        if header.data_length > limit:
            raise pdu.ProtocolError(f"a {header.data_length}-byte data segment (at most {limit})")
        await self._skip(header.ahs_length)
        data = await self._recv_exact(header.data_length + pdu.pad_length(header.data_length))
        return header, data[: header.data_length]

    # -- sending -------------------------------------------------------------------------
    async def _sendv(self, parts: list[Buffer]) -> None:
        """Send ``parts`` in order with vectored writes (no joining of the buffers)."""
        sock = self._sock  # (all of it on one connection, even if another replaces it)
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        first = 0  # views[first] is the first part not sent whole
        while first < len(views):
            sent = await sock.sendmsg(views[first : first + _MAX_IOV])
            self._heard = trio.current_time()  # the target takes what we send
            while sent:
                view = views[first]
                if sent >= view.nbytes:
                    sent -= view.nbytes
                    first += 1
                else:
                    views[first] = view[sent:]
                    sent = 0

    async def send(self, parts: list[Buffer]) -> None:
        """Send PDUs whole, shielded from cancellation, under the send lock."""
        if self.broken is not None:
            raise self.broken
        async with self._sends.whole(lambda: self.broken):
            await self._send_locked(parts)

    async def _send_locked(self, parts: list[Buffer]) -> None:
        try:
            await self._sendv(parts)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._shut()
            raise self.broken or TrioconvIOError(
                f"{self.what}: connection to the iSCSI target lost: {_reason(exc)}"
            ) from exc

    def _shut(self) -> None:
        """Shut the connection down after a failed send - a PDU may have gone in part,
        so nothing can follow it - and so that the reader sees the loss too."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _reconnects(self) -> bool:
        """A lost connection is made again (rather than failing the commands)."""
        return self.redial is not None and not self._closing and self.broken is None

    def _wake(self) -> None:
        """Wake the commands waiting to go out: the command window, the connection or
        the turn changed."""
        window, self._window = self._window, trio.Event()
        window.set()

    def _note_sequence(self, header: BHS) -> None:
        """Advance ExpStatSN and the command window from a target response."""
        op = header.opcode
        if op is Opcode.NOP_IN and header.itt == pdu.RESERVED_TAG:
            # A ping from the target carries the *next* StatSN without using it up.
            if pdu.sn_lt(self.exp_stat_sn, header.stat_sn):
                self.exp_stat_sn = header.stat_sn
        elif op is not Opcode.R2T and (op is not Opcode.DATA_IN or header.has_status):
            self.exp_stat_sn = (header.stat_sn + 1) & 0xFFFFFFFF
        exp, most = header.exp_cmd_sn, header.max_cmd_sn
        # RFC 7143 4.2.2.1: ignore MaxCmdSN < ExpCmdSN - 1 (a stale or bogus window).
        if pdu.sn_lt(most, (exp - 1) & 0xFFFFFFFF):
            return
        if pdu.sn_lt(self.max_cmd_sn, most):
            self.max_cmd_sn = most
            self._wake()

    async def reader(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive PDUs and route them to their commands until the connection closes -
        and, with :attr:`redial`, make it again when it is lost (:meth:`_reconnect`).

        Beside the reading of each connection run the answers to the target's pings and
        the watchdog (:meth:`_watch`), which stops the reading when the target falls
        silent.

        Raises:
            TrioconvIOError: the connection is lost (and could not be made again), or
                the target broke the protocol. Every waiting command fails with it.
        """
        task_status.started()
        try:
            while True:
                try:
                    why = await self._serve()
                except pdu.ProtocolError as exc:
                    # A target that sends what the protocol does not allow is broken,
                    # not restarting: a new connection would most likely get the same.
                    if self._closing:
                        break
                    raise self._fail(
                        f"connection to the iSCSI target lost: {_reason(exc)}"
                    ) from exc
                if self._closing:
                    break
                if self.redial is None:
                    raise self._fail(f"connection to the iSCSI target lost: {why}")
                if not await self._reconnect(why):
                    break  # closed meanwhile
        except BaseException:
            # Cancelled (the conversion is ending and nothing reads responses any more),
            # or failed above: no command waits for ever.
            self._give_up(TrioconvIOError(f"{self.what}: the connection is closed"))
            raise
        self._give_up(TrioconvIOError(f"{self.what}: the connection is closed"))

    async def _serve(self) -> str:
        """Receive and route PDUs on the connection in use until it is lost; say why.

        Raises:
            ProtocolError: the target sent what the protocol does not allow.
        """
        self._stop_reason = None
        self._leaving = False
        self._heard = trio.current_time()
        # Pings of this connection are answered on it, never on the next one.
        self._pings_send, pings = trio.open_memory_channel[tuple[BHS, bytes]](4)
        reading = trio.CancelScope()
        why = "the reading stopped"
        broken: pdu.ProtocolError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._answer_pings, pings)
            nursery.start_soon(self._watch, nursery, reading)
            try:
                with reading:
                    await self._read_loop(nursery, reading)
            except pdu.ProtocolError as exc:
                broken = exc
            except (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
                TrioconvIOError,
            ) as exc:
                why = _reason(exc)
            # Nothing more goes out on it; and a send stuck on a target that stopped
            # reading (a ping, its answer, a command) fails now, so that all of it ends.
            self._ready = False
            with trio.CancelScope(shield=True):
                await self._stream.aclose()
            nursery.cancel_scope.cancel()
        if broken is not None:
            raise broken
        return self._stop_reason or why

    def _fail(self, text: str) -> TrioconvIOError:
        """Give the connection up for good with the error ``WHAT: text``."""
        error = TrioconvIOError(f"{self.what}: {text}", errno=errno_mod.EIO)
        self._give_up(error)
        return error

    def _give_up(self, error: TrioconvIOError) -> None:
        """The connection is unusable: fail every command waiting on it (on the command
        window, or for a new connection), stop a send stuck on a target that stopped
        reading, refuse new commands."""
        if self.broken is None:
            self.broken = error
        self._ready = False
        for task in [*self._pending.values(), *self._lost]:
            task.error = self.broken
            task.finish()
        self._pending.clear()
        self._lost.clear()
        self._turns.clear()
        self._wake()
        self._sends.abandon()

    def _answered(self) -> None:
        """A command got its status: the target is alive, and the connection in use
        counts as answering (see :meth:`_reconnect`)."""
        self._replied = True
        self._silences = 0

    # -- reconnecting ---------------------------------------------------------------------
    async def _reconnect(self, why: str) -> bool:
        """Replace the lost connection; every command that was waiting for its status
        goes out again on the new one.

        Each attempt (:attr:`redial`) dials the portal again - first the one the
        session was logged in at, then the URL's, which may redirect anew - and logs in
        with the session's ISID and a TSIH of 0. That *reinstates* the session (RFC
        7143 6.3.5): the target ends every task of the old one that may still be
        running, so none of them can write after the commands that replace them. CHAP
        uses the same credentials; the operational values are negotiated afresh, and
        commands follow the new ones (immediate and unsolicited data, burst and
        segment sizes). READ CAPACITY then checks that the LUN has the same blocks and
        at least the same size: if not, the conversion ends at once, as its data would
        go to other places.

        The commands that were waiting (:meth:`_detach`) then go out again one after
        the other, in the order they first went, each as a new task with a new task tag
        and CmdSN; commands issued meanwhile follow them. A read is read again into the
        same buffer; a write sends the same bytes for the same blocks, which is safe
        even when the first one reached the disk. Responses that came for a command
        before the loss stand: it does not go again.

        The attempts of one *episode* - from a connection that had answered a command
        being lost to a command answered on a new one - are bounded as the NFS
        client's are: at most ``len(_RECONNECT_DELAYS)``, after growing pauses, within
        :data:`_RECONNECT_TIMEOUT` seconds. A new connection lost before any answer
        counts as a failed attempt, not as a new episode: a target that drops every
        connection (or every command sent again) cannot keep the conversion busy for
        ever, while one that is only restarting - whose portal may refuse for a moment,
        whose target or LUN may not be set up yet - is waited for. A connection given
        up for silence right after another was, no command answered in between, ends
        the conversion too (:data:`_SILENCES`). DefaultTime2Wait is not waited for (as
        libiscsi does not); the Time2Wait of an Async Message announcing a drop is.

        Args:
            why: what ended the connection ("Connection reset by peer", "the target
                asked to log out").

        Returns:
            False when the connection was closed meanwhile (nothing to reconnect for).

        Raises:
            TrioconvIOError: the attempts failed, or the LUN changed; the error says what
                ended the connection first, and the last failure.
        """
        silent, self._silent = self._silent, False
        self._detach(why)
        with trio.CancelScope(shield=True):
            await self._stream.aclose()  # (also stops a send stuck on it: it fails now)
        if self._closing:
            return False
        lost = f"connection to the iSCSI target lost: {why}"
        if self._stuck is not None:
            raise self._fail(f"{lost}, {self._stuck}")
        if silent:
            self._silences += 1
            if self._silences >= _SILENCES:
                raise self._fail(f"{lost}, nor in {_SILENCE_LIMIT:g} s more on a new connection")
        now = trio.current_time()
        if self._replied or now >= self._episode_end:
            self._episode_end = now + _RECONNECT_TIMEOUT
            self._episode_lost = lost
            self._failures = []
        else:
            self._failures.append(f"connected, then lost before any answer: {why}")
        redial = self.redial
        assert redial is not None
        hold_off, self._hold_off = self._hold_off, 0.0
        fresh: Connection | None = None
        with trio.move_on_at(self._episode_end):
            while fresh is None and len(self._failures) < len(_RECONNECT_DELAYS):
                attempt = len(self._failures)
                await trio.sleep(max(_RECONNECT_DELAYS[attempt], hold_off))
                hold_off = 0.0
                try:
                    with trio.fail_after(_RECONNECT_ATTEMPT_TIMEOUT):
                        fresh = await redial(attempt)
                except trio.TooSlowError:
                    self._failures.append(f"no answer in {_RECONNECT_ATTEMPT_TIMEOUT:g} s")
                except LunChanged as exc:
                    raise self._fail(
                        f"{self._episode_lost}; the target came back, but {exc}"
                    ) from exc
                except login_mod.LoginError as exc:
                    self._failures.append(f"login failed: {exc}")
                except (OSError, TrioconvIOError, pdu.ProtocolError, scsi.DecodeError) as exc:
                    self._failures.append(_reason(exc))
        if fresh is None:
            if len(self._failures) < len(_RECONNECT_DELAYS):  # out of time
                self._failures.append(f"no connection in {_RECONNECT_TIMEOUT:g} s")
            n = len(self._failures)
            raise self._fail(
                f"{self._episode_lost}; {n} attempt{'s' if n > 1 else ''} to reconnect "
                f"failed, the last: {self._failures[-1]}"
            )
        return await self._adopt(fresh)

    def _detach(self, why: str) -> None:
        """The connection in use is lost: take the commands that went out on it off it.

        Their task tags mean nothing on the next connection, so whatever else comes
        for them is never taken (a read's buffer is never written from the old
        connection), and a write's Data-Out stops (:meth:`_send_for`): they wait, in
        :attr:`_lost`, to go out again. Commands not sent yet stay, to go out on the
        next connection; pings and logouts fail.
        """
        self._ready = False
        for itt, task in list(self._pending.items()):
            if task.scsi and not task.issued:
                continue
            del self._pending[itt]
            if task.scsi:
                self._lost.append(task)
                task.r2t_ready.set()  # its writer stops waiting for an R2T
            else:
                task.error = TrioconvIOError(
                    f"{self.what}: connection to the iSCSI target lost: {why}",
                    errno=errno_mod.EIO,
                )
                task.finish()
        self._wake()

    async def _adopt(self, fresh: Connection) -> bool:
        """Carry on over ``fresh``, logged in and checked: take its connection, its
        sequence numbers and operational values, and wake the commands that were lost
        to go out again, in their order.

        Returns:
            False when the connection was closed meanwhile (``fresh`` is closed too).
        """
        taken = False
        try:
            # Under the send lock: no PDU goes out half on one connection, half on the
            # other.
            async with self._sends.lock:
                if not self._closing:
                    self._stream, self._sock = fresh._stream, fresh._sock
                    # (What it received after READ CAPACITY - a ping - is read next.)
                    self._buf, self._start, self._end = fresh._buf, fresh._start, fresh._end
                    self.params = fresh.params
                    self.cmd_sn, self.max_cmd_sn = fresh.cmd_sn, fresh.max_cmd_sn
                    self.exp_stat_sn = fresh.exp_stat_sn
                    self.portal = fresh.portal
                    self.connection += 1
                    self._replied = False
                    lost, self._lost = self._lost, []
                    tickets = {t.ticket for t in lost if t.ticket is not None}
                    self._turns = deque(sorted(tickets | set(self._turns)))
                    for task in lost:
                        task.reissue = True
                        task.finish()
                    self._ready = True
                    self._wake()
                    taken = True
        finally:
            if not taken:
                await fresh.aclose()
        return taken

    def _release(self, task: _Task) -> None:
        """``task`` will not go out (again): its command was answered, failed or
        cancelled. It no longer waits for a new connection, nor holds up the commands
        after it."""
        if task in self._lost:
            self._lost.remove(task)
        self._drop_turn(task.ticket)

    def _drop_turn(self, ticket: int | None) -> None:
        if ticket is not None and ticket in self._turns:
            self._turns.remove(ticket)
            self._wake()

    async def _read_loop(self, nursery: trio.Nursery, reading: trio.CancelScope) -> None:
        while True:
            header = pdu.decode_bhs(await self._recv_exact(pdu.BHS_SIZE))
            await self._skip(header.ahs_length)
            n = header.data_length
            if n > self.params.max_recv_segment:  # what we declared, for every PDU
                raise pdu.ProtocolError(
                    f"a {n}-byte data segment (at most {self.params.max_recv_segment})"
                )
            padding = pdu.pad_length(n)
            self._note_sequence(header)
            op = header.opcode
            task = self._pending.get(header.itt)
            if op is Opcode.DATA_IN:
                offset = header.word40
                if task is not None and (task.data_in is None or not task.scsi):
                    raise pdu.ProtocolError(
                        f"Data-In for a task that reads nothing (ITT {header.itt})"
                    )
                if task is not None and task.data_in is not None:
                    if offset + n > task.data_in.nbytes:
                        raise pdu.ProtocolError(
                            f"Data-In at offset {offset}+{n} beyond the "
                            f"{task.data_in.nbytes} bytes asked for"
                        )
                    # DataPDUInOrder=Yes and DataSequenceInOrder=Yes (we offer Yes, the
                    # result is the OR): each Data-In continues where the last one ended,
                    # no gaps, no overlays (RFC 7143 13.19, 13.20). And each one carries
                    # the next DataSN, counting from 0 for the command (11.7.4): a target
                    # whose numbering skips or repeats lost track of what it sent.
                    if offset != task.received:
                        raise pdu.ProtocolError(
                            f"Data-In at offset {offset} where {task.received} was expected"
                        )
                    if header.word36 != task.data_sn:
                        raise pdu.ProtocolError(
                            f"Data-In with DataSN {header.word36} where {task.data_sn} was "
                            f"expected (ITT {header.itt})"
                        )
                    task.data_sn += 1
                    await self._receive_data_in(task, offset, n)
                    task.received += n
                    await self._skip(padding)
                else:
                    await self._skip(n + padding)
                if header.has_status and task is not None:
                    task.header = header
                    # Nothing more belongs in its buffer: later PDUs for it are strays.
                    self._pending.pop(task.itt, None)
                    task.finish()
                    self._answered()
                continue
            data = await self._recv_exact(n + padding) if n + padding else b""
            if op is Opcode.R2T:
                if task is not None:
                    self._check_r2t(task, header)
                    task.asked += header.word44
                    task.r2t_sn += 1
                    task.r2ts.append((header.ttt, header.word40, header.word44))
                    task.r2t_ready.set()
            elif op is Opcode.NOP_IN:
                if header.ttt != pdu.RESERVED_TAG:
                    # The target pings: answer with the same TTT and its data, from one
                    # task through a small queue - a target that pings faster than it
                    # reads the answers is throttled (the reader waits), not buffered.
                    await self._pings_send.send((header, data[:n]))
                elif task is not None:
                    if task.scsi:
                        raise pdu.ProtocolError(f"NOP-In for a SCSI command (ITT {header.itt})")
                    task.header = header
                    task.finish()
            elif op is Opcode.ASYNC_MESSAGE:
                event = header.async_event
                if event == 1 and not self._leaving:
                    # The target asks to be logged out (RFC 7143 11.9.1): no new command
                    # goes out on this connection; the Logout goes out from a task of
                    # its own, while the reading goes on for the answers already due.
                    self._leaving, self._ready = True, False
                    nursery.start_soon(self._leave, nursery, reading)
                elif event in (2, 3):
                    # The target is about to drop the connection (2) or the session (3);
                    # Parameter2 is how long to wait before logging in again (Time2Wait).
                    self._hold_off = min(float(header.word40 >> 16), _RECONNECT_DELAYS[-1])
                    raise TrioconvIOError("the target is dropping the connection")
            elif op is Opcode.REJECT:
                rejected = data[16:20]
                itt = int.from_bytes(rejected, "big") if len(rejected) == 4 else -1
                victim = self._pending.get(itt)
                if victim is None:
                    if 0 < itt < pdu.RESERVED_TAG:
                        # A task that stopped waiting (cancelled): a stray, as a
                        # response for it would be.
                        continue
                    # One of our untagged PDUs (an answer to a ping): nothing to fail,
                    # and something went wrong between us.
                    raise pdu.ProtocolError(f"the target rejected a PDU (reason 0x{header.b2:02x})")
                victim.error = TrioconvIOError(
                    f"{self.what}: the target rejected the command (reason 0x{header.b2:02x})",
                    errno=errno_mod.EIO,
                )
                self._pending.pop(itt, None)  # (answered: never sent again)
                victim.finish()
            elif task is not None:
                # SCSI Response, Logout/Text/Task management responses.
                if task.scsi != (op is Opcode.SCSI_RESPONSE):
                    raise pdu.ProtocolError(
                        f"{op.name} for the wrong kind of task (ITT {header.itt})"
                    )
                task.header = header
                task.segment = data[:n]
                self._pending.pop(task.itt, None)
                task.finish()
                if task.scsi:
                    self._answered()

    def _check_r2t(self, task: _Task, header: BHS) -> None:
        """Refuse an R2T that RFC 7143 (11.8) does not allow.

        Checked here, by the reader, not by the writer: a bad R2T leaves the target
        waiting for data that will not come, so the whole connection is given up (which
        also frees the other pieces of a split write). An R2T asks for ``length`` bytes
        from ``offset`` of the command's data; it must

        * carry the next R2TSN of its command (0, 1, 2, ...): a gap is an R2T lost;
        * carry a target transfer tag other than 0xffffffff, which Data-Out PDUs
          reserve for unsolicited data;
        * ask for 1 to MaxBurstLength bytes (the negotiated maximum of one sequence);
        * ask for the bytes right after those already sent or asked for, within the
          command's data: DataSequenceInOrder=Yes makes sequences follow each other
          in order, so anything else asks again for data sent (immediate or
          unsolicited) or leaves a gap.

        Several R2Ts of one command may be waiting at once: the writer answers them in
        the order they came, each with exactly the bytes it asks for. (A target that
        sends more of them at once than MaxOutstandingR2T allows is not refused: the
        reader cannot tell that apart from a lawful R2T that overtook the end of the
        writer's send, and the answer is the same either way.)

        Raises:
            ProtocolError: the R2T breaks one of these rules.
        """
        r2t_sn, offset, length = header.word36, header.word40, header.word44
        if r2t_sn != task.r2t_sn:
            raise pdu.ProtocolError(
                f"R2T with R2TSN {r2t_sn} where {task.r2t_sn} was expected (ITT {header.itt})"
            )
        if header.ttt == pdu.RESERVED_TAG:
            raise pdu.ProtocolError(f"R2T with the reserved transfer tag (ITT {header.itt})")
        most = self.params.max_burst
        if length > most:
            raise pdu.ProtocolError(
                f"R2T for {length} bytes at {offset}, more than MaxBurstLength ({most})"
            )
        if offset != task.asked or not length or offset + length > task.out_total:
            raise pdu.ProtocolError(
                f"R2T for {length} bytes at {offset} of a {task.out_total}-byte "
                f"write ({task.asked} sent or asked for before)"
            )

    async def _watch(self, nursery: trio.Nursery, reading: trio.CancelScope) -> None:
        """Give the connection up when the target stops answering.

        A target can fall silent without closing the connection: its host froze or lost
        power, the network between dropped every packet, the process was stopped. TCP
        then reports nothing for many minutes, and every command would wait forever.
        So, while commands wait for the target, the watchdog looks every
        :data:`_PING_INTERVAL` seconds at when bytes last moved either way (PDUs or
        payload received, or data the socket took to send). After that long without
        any it pings the target (NOP-Out) - a live target answers at once, even while
        a slow command keeps it busy - and after :data:`_SILENCE_LIMIT` seconds it
        stops the reading: the connection is taken for lost, and made again (see
        :meth:`_reconnect`). Time with no command waiting does not count: the target
        owes nothing then.
        """
        while True:
            await trio.sleep(_PING_INTERVAL)
            now = trio.current_time()
            if not self._pending or self._closing:
                self._heard = now
                continue
            silent = now - self._heard
            if silent >= _SILENCE_LIMIT:
                self._silent = True
                self._stop_reason = (
                    f"the target sent nothing for {_SILENCE_LIMIT:g} s, not even the "
                    "answer to a ping"
                )
                reading.cancel()
                return
            if silent >= _PING_INTERVAL and not self._pinging:
                self._pinging = True
                nursery.start_soon(self._keepalive)
            if (stuck := self._stuck_command(now)) is not None:
                stuck.stalls += 1
                self._stop_reason = (
                    f"a command got no answer in {self.command_limit:g} s, though the "
                    "target answers pings"
                )
                if stuck.stalls >= 2:
                    self._stuck = "nor on a new connection"
                reading.cancel()
                return

    def _stuck_command(self, now: float) -> _Task | None:
        """The command that has waited for its status longer than the command bound,
        if any (the oldest)."""
        waiting = [
            task
            for task in self._pending.values()
            if task.scsi and task.issued and (task.bounded or self.limit_sync)
        ]
        oldest = min(waiting, key=lambda task: task.issued_at, default=None)
        if oldest is not None and now - oldest.issued_at >= self.command_limit:
            return oldest
        return None

    async def _keepalive(self) -> None:
        try:
            with contextlib.suppress(TrioconvIOError):
                await self.ping()
        finally:
            self._pinging = False

    async def ping(self) -> None:
        """Ping the target: a NOP-Out with a task tag of its own, which the target
        answers with a NOP-In carrying the same tag (RFC 7143 11.18). Immediate, so it
        goes even while the command window is closed, and takes no CmdSN.

        Raises:
            TrioconvIOError: the connection failed.
        """
        task = self._new_task()
        try:
            async with self._sends.whole(lambda: self.broken):
                request = pdu.encode_nop_out(
                    lun=0,
                    itt=task.itt,
                    ttt=pdu.RESERVED_TAG,
                    cmd_sn=self.cmd_sn,
                    exp_stat_sn=self.exp_stat_sn,
                )
                await self._send_locked([request])
            await task.done.wait()
        finally:
            self._pending.pop(task.itt, None)
        if task.error is not None:
            raise task.error

    async def _answer_pings(self, pings: trio.MemoryReceiveChannel[tuple[BHS, bytes]]) -> None:
        async for header, data in pings:
            # (A send that fails shuts the connection down: the reader sees the loss.)
            with contextlib.suppress(TrioconvIOError):
                await self._answer_ping(header, data)

    async def _leave(self, nursery: trio.Nursery, reading: trio.CancelScope) -> None:
        """Log out, as the target asked (Async Message, event 1), then stop reading.

        The reader goes on meanwhile: commands the target answers before its Logout
        Response are done; the others go out again on the next connection. A target
        that does not answer the Logout within :data:`_LEAVE_TIMEOUT` seconds (or does
        not even read it: the send is shielded, so it is waited for aside) is left all
        the same.
        """
        self._stop_reason = "the target asked to log out"
        answered = trio.Event()
        nursery.start_soon(self._log_out_here, answered)
        with trio.move_on_after(_LEAVE_TIMEOUT):
            await answered.wait()
        reading.cancel()

    async def _log_out_here(self, answered: trio.Event) -> None:
        with contextlib.suppress(TrioconvIOError):
            task = self._new_task()
            try:
                await self._send_logout(task)
                await task.done.wait()
            finally:
                self._pending.pop(task.itt, None)
        answered.set()

    async def _answer_ping(self, header: BHS, data: bytes) -> None:
        reply = pdu.encode_nop_out(
            lun=pdu.decode_lun(header.field8),
            itt=pdu.RESERVED_TAG,
            ttt=header.ttt,
            cmd_sn=self.cmd_sn,
            exp_stat_sn=self.exp_stat_sn,
            data=data,
        )
        async with self._sends.whole(lambda: self.broken):
            await self._send_locked([reply])

    # -- commands -------------------------------------------------------------------------
    def _new_task(self, data_in: memoryview | None = None) -> _Task:
        if self.broken is not None:
            raise self.broken
        if self._closing:
            raise TrioconvIOError(f"{self.what}: connection is closed")
        while True:
            itt = next(self._itts) & 0x7FFFFFFF
            if itt and itt not in self._pending:
                break
        task = _Task(itt, data_in)
        self._pending[itt] = task
        return task

    async def command(
        self,
        lun: int,
        cdb: bytes,
        *,
        data_in: memoryview | None = None,
        data_out: memoryview | None = None,
    ) -> _Task:
        """Run one SCSI command; return its task once the status is in.

        A command whose connection is lost before its status came goes out again on the
        next one (see :meth:`_reconnect`): as a new task, with a new task tag and CmdSN
        and the same buffers, in the place it first had among the commands.

        Raises:
            CommandError: the status was not GOOD (after retrying unit attentions and a
                busy target).
            TrioconvIOError: the connection failed.
        """
        busy = unit_attentions = stalls = 0
        ticket: int | None = None  # (kept when the command goes out again)
        bounded = cdb[0] not in _SYNC_OPCODES
        while True:
            try:
                task = self._new_task(data_in)
            except BaseException:
                self._drop_turn(ticket)
                raise
            task.scsi, task.ticket, ticket = True, ticket, None
            task.bounded, task.stalls = bounded, stalls
            try:
                await self._issue(task, lun, cdb, data_in, data_out)
                await task.done.wait()
            except BaseException:
                # Cancelled or failed: whatever comes for it is never taken, and the
                # commands after it do not wait for its turn.
                self._pending.pop(task.itt, None)
                self._release(task)
                raise
            self._pending.pop(task.itt, None)
            if task.reissue:
                ticket, stalls = task.ticket, task.stalls
                continue
            self._release(task)
            if task.error is not None:
                raise task.error
            header = task.header
            assert header is not None
            status = header.status
            if header.opcode is Opcode.SCSI_RESPONSE and header.b2 != 0:
                raise TrioconvIOError(
                    f"{self.what}: the target failed the command (iSCSI response "
                    f"0x{header.b2:02x})",
                    errno=errno_mod.EIO,
                )
            if status == SCSIStatus.GOOD or status == SCSIStatus.CONDITION_MET:
                if data_out is not None and task.sent < data_out.nbytes:
                    raise TrioconvIOError(
                        f"{self.what}: the target ended a write after {task.sent} of its "
                        f"{data_out.nbytes} bytes",
                        errno=errno_mod.EIO,
                    )
                return task
            sense = scsi.sense_of_response(task.segment) if task.segment else None
            if status in (SCSIStatus.BUSY, SCSIStatus.TASK_SET_FULL) and busy < len(_BUSY_DELAYS):
                await trio.sleep(_BUSY_DELAYS[busy] * (0.5 + random.random()))
                busy += 1
                continue
            unit_attention = sense is not None and sense.key == SenseKey.UNIT_ATTENTION
            if unit_attention and unit_attentions < _RETRIES:
                unit_attentions += 1
                continue
            raise CommandError(status, sense)

    def _may_go(self, task: _Task) -> bool:
        """Whether ``task``'s command may go out now (asked under the send lock): the
        connection is in use, the command window open, and it is the command's turn -
        after a reconnect the commands going out again go first, in their order."""
        if not self._ready or not pdu.sn_le(self.cmd_sn, self.max_cmd_sn):
            return False
        return not self._turns or self._turns[0] == task.ticket

    async def _issue(
        self,
        task: _Task,
        lun: int,
        cdb: bytes,
        data_in: memoryview | None,
        data_out: memoryview | None,
    ) -> None:
        """Send the command (and, for writes, all its data) once it may go out.

        How a write's data goes - immediate, unsolicited, asked for by R2Ts - follows
        the values of the connection it goes out on. If that connection fails under
        the send, the command waits for the next one (the reader sees the loss too).
        """
        total = data_out.nbytes if data_out is not None else 0
        expected = data_in.nbytes if data_in is not None else total
        while True:
            async with self._sends.lock:
                if self.broken is not None:
                    raise self.broken
                if self._may_go(task):
                    params = self.params
                    immediate = unsolicited = 0
                    if total:
                        burst = min(total, params.first_burst)
                        if params.immediate_data:
                            immediate = min(burst, params.max_send_segment)
                        if not params.initial_r2t:
                            unsolicited = burst - immediate
                    task.out_total, task.asked = total, immediate + unsolicited  # before R2Ts
                    if task.ticket is None:
                        task.ticket = next(self._tickets)
                    elif self._turns and self._turns[0] == task.ticket:
                        self._turns.popleft()
                        self._wake()  # the next one's turn
                    cmd_sn = self.cmd_sn
                    self.cmd_sn = (cmd_sn + 1) & 0xFFFFFFFF
                    head = pdu.encode_scsi_command(
                        lun=lun,
                        itt=task.itt,
                        cdb=cdb,
                        expected_length=expected,
                        cmd_sn=cmd_sn,
                        exp_stat_sn=self.exp_stat_sn,
                        read=data_in is not None,
                        write=data_out is not None,
                        final=unsolicited == 0,
                        immediate_length=immediate,
                    )
                    parts: list[Buffer] = [head]
                    if immediate:
                        assert data_out is not None
                        parts += [data_out[:immediate], bytes(pdu.pad_length(immediate))]
                    if unsolicited:
                        assert data_out is not None
                        self._data_out(parts, task.itt, lun, pdu.RESERVED_TAG, data_out,
                                       immediate, unsolicited)  # fmt: skip
                    task.issued = True
                    task.issued_at = trio.current_time()
                    try:
                        async with self._sends.shielded(lambda: self.broken):
                            await self._send_locked(parts)
                    except TrioconvIOError:
                        if not self._reconnects():
                            raise
                        return  # it goes out again on the next connection
                    break
                window = self._window
            await window.wait()
        first = immediate + unsolicited
        remaining = total - first
        task.sent = first
        if data_out is None or remaining <= 0:
            return
        # The rest goes when the target asks for it. Shielded: a write whose data never
        # comes would hold the target's task (and our CmdSN slot) forever. It stops when
        # the command is over - or taken off a lost connection (see _detach).
        with trio.CancelScope(shield=True):
            while remaining > 0 and self._current(task):
                await task.r2t_ready.wait()
                if not self._current(task):
                    break
                task.r2t_ready = trio.Event()
                while task.r2ts:
                    ttt, offset, length = task.r2ts.pop(0)  # checked by the reader
                    parts = []
                    self._data_out(parts, task.itt, lun, ttt, data_out, offset, length)
                    if not await self._send_for(task, parts):
                        return
                    remaining -= length
                    task.sent += length

    def _current(self, task: _Task) -> bool:
        """``task`` waits for its status on the connection in use."""
        return not task.done.is_set() and self._pending.get(task.itt) is task

    async def _send_for(self, task: _Task, parts: list[Buffer]) -> bool:
        """Send Data-Out that an R2T of ``task`` asked for, unless ``task`` is no longer
        on the connection in use: its connection was lost, and on the next one its task
        tag means nothing - or another task's.

        Returns:
            False when nothing was sent, and nothing more of the task's data should be.

        Raises:
            TrioconvIOError: the connection failed, and is not made again.
        """
        async with self._sends.whole(lambda: self.broken):
            if self._pending.get(task.itt) is not task:
                return False
            try:
                await self._send_locked(parts)
            except TrioconvIOError:
                if self._reconnects():
                    return False
                raise
        return True

    def _data_out(
        self,
        parts: list[Buffer],
        itt: int,
        lun: int,
        ttt: int,
        data: memoryview,
        offset: int,
        length: int,
    ) -> None:
        """Append the Data-Out PDUs of one sequence (``length`` bytes from ``offset``)."""
        step = self.params.max_send_segment
        heads = memoryview(
            pdu.encode_data_out_sequence(
                lun=lun, itt=itt, ttt=ttt, exp_stat_sn=self.exp_stat_sn, offset=offset,
                length=length, segment=step,
            )
        )  # fmt: skip
        size = pdu.BHS_SIZE
        end = offset + length
        for i, pos in enumerate(range(offset, end, step)):
            n = min(step, end - pos)
            parts.append(heads[i * size : (i + 1) * size])
            parts.append(data[pos : pos + n])
            if n % 4:
                parts.append(bytes(pdu.pad_length(n)))

    async def logout(self) -> None:
        """Log out (reason: close the session) and wait briefly for the answer."""
        task = self._new_task()
        self._closing = True  # the target closes the connection after answering
        try:
            await self._send_logout(task)
            await task.done.wait()
        finally:
            self._pending.pop(task.itt, None)

    async def _send_logout(self, task: _Task) -> None:
        """Send a Logout Request (reason: close the session) under ``task``'s tag."""
        request = pdu.encode_logout(
            itt=task.itt, cid=0, cmd_sn=self.cmd_sn, exp_stat_sn=self.exp_stat_sn
        )
        await self.send([request])

    @property
    def ready(self) -> bool:
        """Commands go out now: the connection is not being replaced, or left."""
        return self._ready and self.broken is None

    async def ask_alone(self, lun: int, cdb: bytes, size: int) -> tuple[BHS, bytes]:
        """Run one SCSI command that reads up to ``size`` bytes, on a connection whose
        reader does not run: a new one, checked before it replaces a lost one. Returns
        the header that ended it and the data (or, after a SCSI Response, its sense
        segment). The target's pings meanwhile are answered.

        Raises:
            TrioconvIOError: the connection failed, or the target is leaving it.
            ProtocolError: the target answered with something else.
        """
        if not pdu.sn_le(self.cmd_sn, self.max_cmd_sn):
            raise TrioconvIOError("the target takes no command yet (its window is closed)")
        itt = next(self._itts) & 0x7FFFFFFF
        cmd_sn = self.cmd_sn
        self.cmd_sn = (cmd_sn + 1) & 0xFFFFFFFF
        request = pdu.encode_scsi_command(
            lun=lun, itt=itt, cdb=cdb, expected_length=size, cmd_sn=cmd_sn,
            exp_stat_sn=self.exp_stat_sn, read=True, write=False, final=True,
            immediate_length=0,
        )  # fmt: skip
        await self.send([request])
        data = bytearray()
        while True:
            header, segment = await self.read_pdu(self.params.max_recv_segment)
            self._note_sequence(header)
            op = header.opcode
            if op is Opcode.NOP_IN:
                if header.ttt != pdu.RESERVED_TAG:
                    await self._answer_ping(header, segment)
                continue
            if op is Opcode.ASYNC_MESSAGE:
                if header.async_event in (1, 2, 3):
                    raise TrioconvIOError("the target is leaving the new connection already")
                continue
            if header.itt != itt or op not in (Opcode.DATA_IN, Opcode.SCSI_RESPONSE):
                raise pdu.ProtocolError(f"{op.name} in answer to a command (ITT {header.itt})")
            if op is Opcode.SCSI_RESPONSE:
                return header, segment
            if header.word40 != len(data) or len(data) + len(segment) > size:
                raise pdu.ProtocolError(
                    f"Data-In at offset {header.word40}+{len(segment)} where {len(data)} "
                    f"of {size} bytes were expected"
                )
            data += segment
            if header.has_status:
                return header, bytes(data)

    async def aclose(self) -> None:
        self._closing = True
        with trio.CancelScope(shield=True):
            await self._stream.aclose()


# -- opening ---------------------------------------------------------------------------------


async def _login(conn: Connection, address: ISCSIAddress, isid: bytes) -> None:
    """Log in on ``conn`` as session ``isid`` - a new session (TSIH 0), which reinstates
    one the target may still have under that ISID."""
    chap = (address.user, address.password or "") if address.user else None
    state = login_mod.Login(address.initiator, address.target, isid, chap=chap)
    request: bytes | None = state.start()
    while request is not None:
        await conn.send([request])
        header, data = await conn.read_pdu(login_mod.LOGIN_SEGMENT)
        if header.opcode is Opcode.REJECT:
            raise login_mod.LoginError("the target rejected the login request")
        if header.opcode is not Opcode.LOGIN_RESPONSE:
            raise login_mod.LoginError(f"unexpected {header.opcode.name} during login")
        request = state.receive(header, data)
    conn.params = state.params
    conn.isid = isid
    conn.cmd_sn = state.cmd_sn
    conn.exp_stat_sn = state.exp_stat_sn
    conn.max_cmd_sn = state.max_cmd_sn


@attrs.frozen
class _Geometry:
    capacity: scsi.Capacity
    limits: scsi.BlockLimits
    provisioning: scsi.Provisioning
    vendor: str
    product: str


async def _ask(conn: Connection, lun: int, cdb: bytes, size: int) -> memoryview:
    """Run a command that returns up to ``size`` bytes (its allocation length): the bytes
    the target sent. Decoders see only those - a short answer is an error, never the
    zeroes of a fresh buffer taken as data."""
    buf = memoryview(bytearray(size))
    task = await conn.command(lun, cdb, data_in=buf)
    return buf[: task.received]


async def _refuse_write_protected(conn: Connection, address: ISCSIAddress) -> None:
    """Refuse a LUN that MODE SENSE says is write protected, before anything is written
    (as QEMU asks it); a target that does not answer MODE SENSE is taken as writable.

    Raises:
        ImageError: the LUN is write protected.
    """
    try:
        data = await _ask(conn, address.lun, scsi.cdb_mode_sense_6(255), 255)
        protected = scsi.write_protected(data)
    except (CommandError, scsi.DecodeError):
        return
    if protected:
        raise ImageError(f"Could not open '{address.uri}': LUN is write protected")


async def _probe(conn: Connection, address: ISCSIAddress) -> _Geometry:
    """Check that the LUN is a ready disk; read its size, limits and provisioning."""
    lun = address.lun
    where = f"LUN {lun} of target '{address.target}'"
    try:
        inquiry = scsi.decode_inquiry(await _ask(conn, lun, scsi.cdb_inquiry(None, 96), 96))
    except CommandError as exc:
        sense = exc.sense
        if sense is not None and sense.asc == 0x25:  # LOGICAL UNIT NOT SUPPORTED
            raise ImageError(f"Could not open '{address.uri}': {where} does not exist") from exc
        raise ImageError(f"Could not open '{address.uri}': INQUIRY failed: {exc}") from exc
    except scsi.DecodeError as exc:
        raise ImageError(f"Could not open '{address.uri}': INQUIRY failed: {exc}") from exc
    if not inquiry.connected:
        raise ImageError(f"Could not open '{address.uri}': {where} does not exist")
    if inquiry.device_type != scsi.TYPE_DISK:
        raise ImageError(
            f"Could not open '{address.uri}': {where} is not a disk (peripheral device "
            f"type 0x{inquiry.device_type:02x}; LUN 0 is usually the target's controller)"
        )
    for attempt in range(_RETRIES):
        try:
            await conn.command(lun, scsi.cdb_test_unit_ready())
            break
        except CommandError as exc:
            sense = exc.sense
            becoming = sense is not None and (sense.asc, sense.ascq) == (0x04, 0x01)
            if not becoming or attempt == _RETRIES - 1:
                raise ImageError(
                    f"Could not open '{address.uri}': {where} is not ready: {exc}"
                ) from exc
            await trio.sleep(0.2)
    try:
        capacity = scsi.decode_read_capacity_16(
            await _ask(conn, lun, scsi.cdb_read_capacity_16(32), 32)
        )
    except (CommandError, scsi.DecodeError) as exc:
        raise ImageError(f"Could not open '{address.uri}': READ CAPACITY failed: {exc}") from exc
    limits = scsi.BlockLimits()
    provisioning = scsi.Provisioning()
    try:
        page_list = await _ask(conn, lun, scsi.cdb_inquiry(scsi.VPD_SUPPORTED_PAGES, 255), 255)
        pages = scsi.decode_supported_pages(page_list)
        if scsi.VPD_BLOCK_LIMITS in pages:
            page = await _ask(conn, lun, scsi.cdb_inquiry(scsi.VPD_BLOCK_LIMITS, 64), 64)
            limits = scsi.decode_block_limits(page)
        if scsi.VPD_LOGICAL_BLOCK_PROVISIONING in pages and capacity.lbpme:
            cdb = scsi.cdb_inquiry(scsi.VPD_LOGICAL_BLOCK_PROVISIONING, 64)
            provisioning = scsi.decode_provisioning(await _ask(conn, lun, cdb, 64))
    except (CommandError, scsi.DecodeError):
        pass  # VPD pages are optional: keep the defaults
    return _Geometry(capacity, limits, provisioning, inquiry.vendor, inquiry.product)


# -- the driver ------------------------------------------------------------------------------


async def _in_pieces(
    piece: Callable[[int, memoryview], Awaitable[None]], offset: int, view: memoryview, step: int
) -> None:
    """``piece(offset, view)`` for ``view`` cut into ``step``-byte pieces, all at once."""
    if view.nbytes <= step:
        await piece(offset, view)
        return
    await together(
        [
            functools.partial(piece, offset + p, view[p : p + step])
            for p in range(0, view.nbytes, step)
        ]
    )


class ISCSIDriver(Driver):
    """A LUN behind an iSCSI target. Made by :func:`open_iscsi`, which runs its reader.

    Reads and writes are READ(16)/WRITE(16) of whole logical blocks (unaligned ends are
    read, merged and written back). On a thin-provisioned LUN (LBPME) zeroes go as WRITE
    SAME with UNMAP, which deallocates instead of writing, and GET LBA STATUS answers
    block status; on a thick LUN zeroes go as plain WRITE SAME, which the target expands
    without the zeroes crossing the network.

    :meth:`flush` sends SYNCHRONIZE CACHE unless the cache mode is ``unsafe``, which
    ignores flushes here as it does for a local file (qemu-img's default for targets
    sends none either). A write-through mode (``writethrough``, ``directsync``) sends
    one after every write as well, as qemu does for a target whose writes it does not
    mark FUA.
    """

    name = "iscsi"

    def __init__(
        self,
        conn: Connection,
        address: ISCSIAddress,
        geometry: _Geometry,
        *,
        writable: bool,
        cache: CacheMode = CacheMode.WRITEBACK,
    ) -> None:
        self._conn = conn
        self._cache = cache
        self._lun = address.lun
        self.location = address.uri
        self._geometry = geometry
        self._writable = writable
        cap = geometry.capacity
        self._bs = cap.block_size
        self._size = cap.size
        most = _MAX_TRANSFER
        if geometry.limits.max_transfer:
            most = min(most, geometry.limits.max_transfer * self._bs)
        self._max_transfer = max(self._bs, most - most % self._bs)
        opt = geometry.limits.opt_transfer * self._bs
        self._opt_transfer = min(opt, self._max_transfer) if opt else 0
        # UNMAP is a command of its own, which a thin LUN need not have (the LBPU bit of
        # its provisioning page says; WRITE SAME with UNMAP is another): discard only
        # where it is there, as QEMU does.
        self._trim = cap.lbpme and geometry.provisioning.unmap
        self._zeroes = writable  # WRITE SAME, until the LUN says it has none
        self._unmap = cap.lbpme and (geometry.provisioning.write_same_16 or cap.lbprz)
        self._status = cap.lbpme
        ws = geometry.limits.max_write_same
        self._max_same = min(ws, _MAX_ZERO_BLOCKS) if ws else _MAX_ZERO_BLOCKS
        self._rmw_lock = trio.Lock()
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def limits(self) -> Limits:
        return Limits(
            request_alignment=self._bs,
            max_transfer=self._max_transfer,
            opt_transfer=self._opt_transfer,
        )

    @property
    def caps(self) -> Caps:
        return Caps(
            writable=self._writable,
            zeroes=self._writable and self._zeroes,
            trim=self._writable and self._trim,
            block_status=self._status,
            zero_init=False,  # a LUN holds whatever it held before
        )

    def describe(self) -> dict[str, object]:
        cap = self._geometry.capacity
        return {
            "iscsi": {
                "block-size": cap.block_size,
                "thin-provisioned": cap.lbpme,
                "unmapped-reads-as-zero": cap.lbprz,
                "vendor": self._geometry.vendor,
                "product": self._geometry.product,
            }
        }

    def _error(self, exc: Exception, what: str, offset: int) -> TrioconvIOError:
        if isinstance(exc, TrioconvIOError):
            return exc
        return TrioconvIOError(
            f"error while {what} {self.location} at byte {offset}: {exc}",
            offset=offset,
            errno=errno_mod.EIO,
        )

    async def _run(
        self,
        cdb: bytes,
        what: str,
        offset: int,
        *,
        data_in: memoryview | None = None,
        data_out: memoryview | None = None,
    ) -> _Task:
        try:
            return await self._conn.command(self._lun, cdb, data_in=data_in, data_out=data_out)
        except (CommandError, pdu.ProtocolError) as exc:
            raise self._error(exc, what, offset) from exc

    # -- reads -----------------------------------------------------------------------------
    async def preadinto(self, offset: int, buf: memoryview) -> None:
        view = buf.cast("B") if buf.format != "B" else buf
        if not view.nbytes:
            return
        bs = self._bs
        end = offset + view.nbytes
        if offset % bs or end % bs:
            start = offset - offset % bs
            stop = end + (-end % bs)
            scratch = memoryview(bytearray(stop - start))
            await self._read_aligned(start, scratch)
            view[:] = scratch[offset - start : end - start]
            return
        await self._read_aligned(offset, view)

    async def preadinto_many(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        await together([functools.partial(self.preadinto, off, buf) for off, buf in requests])

    async def _read_aligned(self, offset: int, view: memoryview) -> None:
        await _in_pieces(self._read_piece, offset, view, self._max_transfer)

    async def _read_piece(self, offset: int, view: memoryview) -> None:
        if offset + view.nbytes > self._size:
            raise TrioconvIOError(
                f"error while reading {self.location} at byte {offset}: beyond the end "
                f"of the LUN ({self._size} bytes)",
                offset=offset,
                errno=errno_mod.EINVAL,
            )
        cdb = scsi.cdb_read_16(offset // self._bs, view.nbytes // self._bs)
        task = await self._run(cdb, "reading", offset, data_in=view)
        self._check_residual(task, "reading", offset)
        if task.received < view.nbytes:
            raise TrioconvIOError(
                f"error while reading {self.location} at byte {offset}: the target sent "
                f"{task.received} of {view.nbytes} bytes",
                offset=offset,
                errno=errno_mod.EIO,
            )

    # -- writes -----------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if not self._writable:
            raise UnsupportedError(f"{self.location}: opened read-only")

    async def pwrite(self, offset: int, data: Buffer) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        if not view.nbytes:
            return
        bs = self._bs
        end = offset + view.nbytes
        if offset % bs or end % bs:
            await self._write_unaligned(offset, view)
        else:
            await self._write_aligned(offset, view)
        if self._cache.dsync:
            await self._synchronize()

    async def _write_unaligned(self, offset: int, view: memoryview) -> None:
        """Read the blocks the ends fall in, merge, write back (one at a time)."""
        bs = self._bs
        end = offset + view.nbytes
        start = offset - offset % bs
        stop = end + (-end % bs)
        async with self._rmw_lock:
            scratch = memoryview(bytearray(stop - start))
            await self._read_aligned(start, scratch[:bs])
            if stop - bs > start:
                await self._read_aligned(stop - bs, scratch[-bs:])
            scratch[offset - start : end - start] = view
            await self._write_aligned(start, scratch)

    def _write_step(self) -> int:
        """How much one WRITE carries: what the target takes without waiting for a second
        R2T. Every further burst of a write costs a round trip (the target sends one R2T
        at a time), so a large write goes as several WRITEs in flight together."""
        params = self._conn.params
        bs = self._bs
        step = max(params.max_burst, params.first_burst, bs)
        return max(bs, min(self._max_transfer, step - step % bs))

    async def _write_aligned(self, offset: int, view: memoryview) -> None:
        await _in_pieces(self._write_piece, offset, view, self._write_step())

    async def _write_piece(self, offset: int, view: memoryview) -> None:
        if offset + view.nbytes > self._size:
            raise TrioconvIOError(
                f"error while writing {self.location} at byte {offset}: beyond the end "
                f"of the LUN ({self._size} bytes)",
                offset=offset,
                errno=errno_mod.ENOSPC,
            )
        cdb = scsi.cdb_write_16(offset // self._bs, view.nbytes // self._bs)
        task = await self._run(cdb, "writing", offset, data_out=view)
        self._check_residual(task, "writing", offset)

    def _check_residual(self, task: _Task, what: str, offset: int) -> None:
        """A READ or WRITE whose status has a residual count failed, whatever the status
        (RFC 7143 11.4.5).

        Underflow (U bit): part of the data was not transferred. Overflow (O bit): the
        CDB asks the target for more than the expected data transfer length - which is
        exactly the CDB's blocks times the block size read at open, so the target now
        counts in larger blocks (the LUN was reformatted under us) and the bytes moved
        belong at other offsets.
        """
        header = task.header
        if header is None or not header.residual:
            return
        if header.flags & pdu.UNDERFLOW:
            happened = f"transferred {header.residual} bytes less than asked for"
        else:
            happened = (
                f"wanted to transfer {header.residual} bytes more than asked for (blocks "
                f"larger than {self._bs} bytes?)"
            )
        raise TrioconvIOError(
            f"error while {what} {self.location} at byte {offset}: the target {happened}",
            offset=offset,
            errno=errno_mod.EIO,
        )

    async def pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
    ) -> None:
        self._check_writable()
        unmap = may_unmap and self._unmap
        if fast and not unmap:
            raise ZeroesNotSupported(f"{self.location}: zeroing is not fast on this LUN")
        if not self._zeroes:
            raise ZeroesNotSupported(f"{self.location}: the LUN has no WRITE SAME")
        bs = self._bs
        end = offset + length
        head = min(end, offset + (-offset % bs))
        tail = max(head, end - end % bs)
        if head > offset:
            await self._write_unaligned(offset, memoryview(bytes(head - offset)))
        if tail > head:
            block = memoryview(bytes(bs))
            step = self._max_same * bs
            if not unmap:
                # The target writes every block itself (tgt: one pwrite per block, in
                # one of its I/O threads per command): pieces in flight together use
                # all of its threads instead of one.
                step = min(step, _WRITE_SAME_PIECE)
            calls = [
                functools.partial(self._write_same, pos, min(step, tail - pos), block, unmap)
                for pos in range(head, tail, step)
            ]
            await together(calls)
        if end > tail:
            await self._write_unaligned(tail, memoryview(bytes(end - tail)))
        if self._cache.dsync:
            await self._synchronize()

    async def _write_same(self, offset: int, length: int, block: memoryview, unmap: bool) -> None:
        cdb = scsi.cdb_write_same_16(offset // self._bs, length // self._bs, unmap=unmap)
        try:
            await self._conn.command(self._lun, cdb, data_out=block)
        except CommandError as exc:
            if exc.unsupported:
                if unmap:
                    self._unmap = False
                else:
                    self._zeroes = False
                raise ZeroesNotSupported(f"{self.location}: WRITE SAME refused: {exc}") from exc
            raise self._error(exc, "zeroing", offset) from exc
        except pdu.ProtocolError as exc:
            raise self._error(exc, "zeroing", offset) from exc

    async def discard(self, offset: int, length: int) -> None:
        """Deallocate whole blocks of ``[offset, offset + length)`` with UNMAP (thin LUNs).

        Unlike :meth:`pwrite_zeroes` this promises nothing about what the range reads as
        afterwards, unless the LUN reports that unmapped blocks read as zeroes.
        """
        self._check_writable()
        if not self._trim:
            raise UnsupportedError(f"{self.location}: the LUN has no UNMAP")
        bs = self._bs
        first = -(-offset // bs)
        last = (offset + length) // bs
        most = self._geometry.limits.max_unmap or 0xFFFFFFFF
        lba = first
        while lba < last:
            count = min(last - lba, most, 0xFFFFFFFF)
            params = scsi.unmap_parameters([(lba, count)])
            cdb = scsi.cdb_unmap(len(params))
            try:
                await self._conn.command(self._lun, cdb, data_out=memoryview(params))
            except CommandError as exc:
                if exc.unsupported:  # said to be there, but refused: not asked again
                    self._trim = False
                    raise UnsupportedError(f"{self.location}: UNMAP refused: {exc}") from exc
                raise self._error(exc, "discarding", lba * bs) from exc
            except pdu.ProtocolError as exc:
                raise self._error(exc, "discarding", lba * bs) from exc
            lba += count

    # -- block status -----------------------------------------------------------------------
    async def block_status(self, offset: int, length: int) -> Extent:
        length = min(length, self._size - offset)
        if not self._status:
            return Extent(offset, length, ExtentKind.DATA)
        bs = self._bs
        lba = offset // bs
        buf = memoryview(bytearray(_STATUS_ALLOC))
        try:
            await self._conn.command(
                self._lun, scsi.cdb_get_lba_status(lba, _STATUS_ALLOC), data_in=buf
            )
            descriptors = scsi.decode_get_lba_status(buf)
        except (CommandError, scsi.DecodeError):
            self._status = False  # the LUN cannot tell: everything is data
            return Extent(offset, length, ExtentKind.DATA)
        for d in descriptors:
            if d.lba <= lba < d.lba + d.blocks:
                end = min((d.lba + d.blocks) * bs, offset + length)
                if end <= offset:
                    break
                mapped = d.status is scsi.Provision.MAPPED
                kind = (
                    ExtentKind.DATA
                    if mapped or not self._geometry.capacity.lbprz
                    else (ExtentKind.HOLE)
                )
                return Extent(offset, end - offset, kind)
        return Extent(offset, min(length, bs - offset % bs), ExtentKind.DATA)

    async def flush(self) -> None:
        if self._writable and self._cache.flush:
            await self._synchronize()

    async def _synchronize(self) -> None:
        """SYNCHRONIZE CACHE (16) of the whole LUN (a LUN without one has no cache)."""
        try:
            await self._conn.command(self._lun, scsi.cdb_synchronize_cache_16())
        except CommandError as exc:
            if not exc.unsupported:
                raise self._error(exc, "flushing", 0) from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            if self._conn.ready:  # (not while reconnecting: that stops now)
                with contextlib.suppress(TrioconvIOError):
                    await self._conn.logout()
        await self._conn.aclose()


async def _connect_and_login(address: ISCSIAddress, timeout: float = OPEN_TIMEOUT) -> Connection:
    """Connect and log in, following the target's redirections (a few at most); each
    step may take ``timeout`` seconds."""
    where = address
    isid = login_mod.new_isid()
    for _ in range(_MAX_REDIRECTS + 1):
        try:
            with trio.fail_after(timeout):
                conn = await Connection.connect(where)
        except OSError as exc:
            raise ImageError(
                f"Could not open '{address.uri}': {_reason(exc)} (iSCSI target at "
                f"{where.host}:{where.port})"
            ) from exc
        except trio.TooSlowError:
            raise ImageError(
                f"Could not open '{address.uri}': the target did not answer in time"
            ) from None
        try:
            with trio.fail_after(timeout):
                await _login(conn, address, isid)
            conn.portal = where
            return conn
        except login_mod.LoginError as exc:
            await conn.aclose()
            if exc.redirect is not None:
                host, port = exc.redirect
                where = attrs.evolve(where, host=host, port=port)
                continue
            raise ImageError(f"Could not open '{address.uri}': login failed: {exc}") from exc
        except (TrioconvIOError, pdu.ProtocolError) as exc:
            await conn.aclose()
            raise ImageError(f"Could not open '{address.uri}': login failed: {exc}") from exc
        except trio.TooSlowError:
            await conn.aclose()
            raise ImageError(
                f"Could not open '{address.uri}': the login did not finish in time"
            ) from None
        except BaseException:
            await conn.aclose()
            raise
    raise ImageError(
        f"Could not open '{address.uri}': login failed: redirected more than {_MAX_REDIRECTS} times"
    )


class LunChanged(Exception):
    """The LUN a session logged in to again is not the one it had opened."""


async def _dial(address: ISCSIAddress, where: ISCSIAddress, isid: bytes) -> Connection:
    """Connect to ``where`` and log in to ``address``'s target as session ``isid``,
    following redirections (a few at most).

    Raises:
        OSError: no connection.
        LoginError: the target refused the login.
        TrioconvIOError, ProtocolError: the login went wrong.
    """
    for _ in range(_MAX_REDIRECTS + 1):
        conn = await Connection.connect(where)
        try:
            await _login(conn, address, isid)
        except login_mod.LoginError as exc:
            await conn.aclose()
            if exc.redirect is None:
                raise
            host, port = exc.redirect
            where = attrs.evolve(where, host=host, port=port)
            continue
        except BaseException:
            await conn.aclose()
            raise
        conn.portal = where
        return conn
    raise login_mod.LoginError(f"redirected more than {_MAX_REDIRECTS} times")


async def _check_lun(conn: Connection, address: ISCSIAddress, was: scsi.Capacity) -> None:
    """Check with READ CAPACITY, on a new connection, that the LUN is still the one
    opened: the same block size, at least the same size (a LUN grown meanwhile is the
    same LUN; only what was there is read or written).

    The unit attention that follows a target's restart or a new session (power on,
    reset, I_T nexus loss) is asked past, as are a busy target and a LUN becoming
    ready, within the attempt's time.

    Raises:
        LunChanged: the LUN has other blocks, or fewer of them.
        TrioconvIOError: the LUN did not answer READ CAPACITY: not there (yet), not
            ready, or the connection failed.
        ProtocolError, DecodeError: the answer is malformed.
    """
    lun = address.lun
    cdb = scsi.cdb_read_capacity_16(32)
    for _ in range(_RETRIES):
        header, data = await conn.ask_alone(lun, cdb, 32)
        if header.opcode is Opcode.SCSI_RESPONSE and header.b2 != 0:
            raise TrioconvIOError(
                f"READ CAPACITY failed: the target failed the command (iSCSI response "
                f"0x{header.b2:02x})"
            )
        status = header.status
        if status == SCSIStatus.GOOD:
            break
        sense = scsi.sense_of_response(data) if header.opcode is Opcode.SCSI_RESPONSE else None
        if sense is not None and sense.key == SenseKey.UNIT_ATTENTION:
            continue
        becoming = sense is not None and (sense.asc, sense.ascq) == (0x04, 0x01)
        if becoming or status in (SCSIStatus.BUSY, SCSIStatus.TASK_SET_FULL):
            await trio.sleep(0.1)
            continue
        raise TrioconvIOError(f"READ CAPACITY failed: {CommandError(status, sense)}")
    else:
        raise TrioconvIOError(f"READ CAPACITY failed {_RETRIES} times")
    now = scsi.decode_read_capacity_16(data)
    if now.block_size != was.block_size:
        raise LunChanged(
            f"LUN {lun} now has {now.block_size}-byte blocks, not {was.block_size}-byte ones"
        )
    if now.size < was.size:
        raise LunChanged(f"LUN {lun} now holds {now.size} bytes, not {was.size}")


async def _redial(
    conn: Connection, address: ISCSIAddress, capacity: scsi.Capacity, attempt: int
) -> Connection:
    """Log in again for ``conn``, whose connection was lost, and check the LUN: a new
    connection, not yet reading, for :meth:`Connection._reconnect` to carry on over.

    The first attempt after a loss dials the portal the session was logged in at (the
    one a redirection gave, if any); later ones dial the URL's, which redirects anew
    if the target moved (a path failing over), as libiscsi always does.
    """
    start = conn.portal if attempt == 0 and conn.portal is not None else address
    fresh = await _dial(address, start, conn.isid)
    try:
        await _check_lun(fresh, address, capacity)
    except BaseException:
        await fresh.aclose()
        raise
    return fresh


@asynccontextmanager
async def open_iscsi(
    uri: str,
    *,
    writable: bool = False,
    cache: CacheMode | str = CacheMode.WRITEBACK,
    chap: tuple[str, str] | None = None,
    timeout: float | None = None,
) -> AsyncIterator[ISCSIDriver]:
    """Log in to an iSCSI target and open one of its LUNs as a driver.

    The session (its connection and reader task) lives inside the ``async with``
    block; leaving it logs out. ``cache`` decides whether :meth:`~ISCSIDriver.flush`
    reaches the LUN (not under ``unsafe``) and whether every write is followed by one
    (``writethrough``, ``directsync``). ``chap`` gives the CHAP user and password in
    place of the URL's (QEMU's ``user`` and ``password-secret`` options); ``timeout``
    bounds, in seconds, connecting and logging in (30 s when None) and, as QEMU's
    ``timeout`` bounds its requests, every command's wait for its status, SYNCHRONIZE
    CACHE included (:data:`_COMMAND_LIMIT` when None, SYNCHRONIZE CACHE excepted). A
    command past its bound has its connection made again and goes out again; past it
    again, the conversion ends.

    Raises:
        ImageError: the target cannot be reached, refuses the login, or the LUN does
            not exist or is not a disk.
    """
    address = parse_iscsi_uri(uri)
    if chap is not None:
        address = attrs.evolve(address, user=chap[0], password=chap[1])
    conn = await _connect_and_login(address, OPEN_TIMEOUT if timeout is None else timeout)
    if timeout is not None:
        conn.command_limit, conn.limit_sync = timeout, True
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.reader)
            try:
                with trio.fail_after(OPEN_TIMEOUT):
                    geometry = await _probe(conn, address)
                    if writable:
                        await _refuse_write_protected(conn, address)
            except trio.TooSlowError:
                raise ImageError(
                    f"Could not open '{address.uri}': the LUN did not answer in time"
                ) from None
            except TrioconvIOError as exc:
                raise ImageError(f"Could not open '{address.uri}': {exc}") from exc
            driver = ISCSIDriver(
                conn, address, geometry, writable=writable, cache=CacheMode.parse(cache)
            )
            # From now on a lost connection is made again.
            conn.redial = functools.partial(_redial, conn, address, geometry.capacity)
            try:
                yield driver
            finally:
                await driver.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await conn.aclose()
