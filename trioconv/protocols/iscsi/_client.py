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

If the connection drops, the reader fails every waiting command at once and raises,
which cancels whatever runs inside :func:`open_iscsi`. A target that falls silent with
the connection still open - a frozen host, a network that drops everything - is pinged
(NOP-Out) and, when even that goes unanswered, given up the same way
(:meth:`Connection._watch`). A target that answers BUSY or TASK SET FULL is asked
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
from collections.abc import AsyncIterator, Sequence
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
#: Login redirections (status class 1, TargetAddress) followed before giving up.
_MAX_REDIRECTS = 5
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

    def finish(self) -> None:
        """The command is over (status, error or rejection): wake whoever waits."""
        self.done.set()
        self.r2t_ready.set()


class Connection:
    """A logged-in iSCSI connection: sequence numbers, the reader, and commands."""

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
        self._pings_send, self._pings_recv = trio.open_memory_channel[tuple[BHS, bytes]](4)
        self._heard = 0.0  # trio.current_time() when bytes last moved, either way
        self._pinging = False  # a keepalive ping is waiting for its answer
        self._silence: TrioconvIOError | None = None  # why the watchdog stopped the reader

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
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        first = 0  # views[first] is the first part not sent whole
        while first < len(views):
            sent = await self._sock.sendmsg(views[first : first + _MAX_IOV])
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
            raise self.broken or TrioconvIOError(
                f"{self.what}: connection to the iSCSI target lost: {_reason(exc)}"
            ) from exc

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
            window, self._window = self._window, trio.Event()
            window.set()

    async def reader(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive PDUs and route them to their commands until the connection closes.

        Beside it run the answers to the target's pings and the watchdog
        (:meth:`_watch`), which stops the reading when the target falls silent.
        """
        reading = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            self._heard = trio.current_time()
            nursery.start_soon(self._answer_pings)
            nursery.start_soon(self._watch, nursery, reading)
            task_status.started()
            try:
                with reading:
                    await self._read_loop()
                raise self._silence or TrioconvIOError("the reading stopped")
            except (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
                pdu.ProtocolError,
                TrioconvIOError,
            ) as exc:
                nursery.cancel_scope.cancel()
                if self._closing:
                    self._give_up(TrioconvIOError(f"{self.what}: the connection is closed"))
                    return
                error = TrioconvIOError(
                    f"{self.what}: connection to the iSCSI target lost: {_reason(exc)}",
                    errno=errno_mod.EIO,
                )
                self._give_up(error)
                raise error from exc
            except BaseException:
                # Cancelled: the conversion is ending and nothing reads responses any more.
                self._give_up(TrioconvIOError(f"{self.what}: the connection is closed"))
                raise

    def _give_up(self, error: TrioconvIOError) -> None:
        """The connection is unusable: fail every command waiting on it (and on the
        command window), stop a send stuck on a target that stopped reading, refuse new
        commands."""
        if self.broken is None:
            self.broken = error
        for task in self._pending.values():
            task.error = self.broken
            task.finish()
        self._pending.clear()
        window, self._window = self._window, trio.Event()
        window.set()
        self._sends.abandon()

    async def _read_loop(self) -> None:
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
                if event in (1, 2, 3):
                    what = "asked to log out" if event == 1 else "is dropping the connection"
                    raise TrioconvIOError(f"the target {what}")
            elif op is Opcode.REJECT:
                rejected = data[16:20]
                itt = int.from_bytes(rejected, "big") if len(rejected) == 4 else -1
                victim = self._pending.get(itt)
                if victim is None:
                    raise pdu.ProtocolError(f"the target rejected a PDU (reason 0x{header.b2:02x})")
                victim.error = TrioconvIOError(
                    f"{self.what}: the target rejected the command (reason 0x{header.b2:02x})",
                    errno=errno_mod.EIO,
                )
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
        stops the reader, which fails every command with one clear error. Time with no
        command waiting does not count: the target owes nothing then.
        """
        while True:
            await trio.sleep(_PING_INTERVAL)
            now = trio.current_time()
            if not self._pending or self._closing:
                self._heard = now
                continue
            silent = now - self._heard
            if silent >= _SILENCE_LIMIT:
                self._silence = TrioconvIOError(
                    f"the target sent nothing for {_SILENCE_LIMIT:g} s, not even the "
                    "answer to a ping"
                )
                reading.cancel()
                return
            if silent >= _PING_INTERVAL and not self._pinging:
                self._pinging = True
                nursery.start_soon(self._keepalive)

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

    async def _answer_pings(self) -> None:
        async for header, data in self._pings_recv:
            await self._answer_ping(header, data)

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

        Raises:
            CommandError: the status was not GOOD (after retrying unit attentions and a
                busy target).
            TrioconvIOError: the connection failed.
        """
        busy = unit_attentions = 0
        while True:
            task = self._new_task(data_in)
            task.scsi = True
            try:
                await self._issue(task, lun, cdb, data_in, data_out)
                await task.done.wait()
            finally:
                self._pending.pop(task.itt, None)
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

    async def _issue(
        self,
        task: _Task,
        lun: int,
        cdb: bytes,
        data_in: memoryview | None,
        data_out: memoryview | None,
    ) -> None:
        """Send the command (and, for writes, all its data) once the window allows."""
        total = data_out.nbytes if data_out is not None else 0
        params = self.params
        immediate = unsolicited = 0
        if total:
            burst = min(total, params.first_burst)
            if params.immediate_data:
                immediate = min(burst, params.max_send_segment)
            if not params.initial_r2t:
                unsolicited = burst - immediate
        expected = data_in.nbytes if data_in is not None else total
        task.out_total, task.asked = total, immediate + unsolicited  # before any R2T
        while True:
            async with self._sends.lock:
                if self.broken is not None:
                    raise self.broken
                if pdu.sn_le(self.cmd_sn, self.max_cmd_sn):
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
                    async with self._sends.shielded(lambda: self.broken):
                        await self._send_locked(parts)
                    break
                window = self._window
            await window.wait()
        remaining = total - immediate - unsolicited
        task.sent = immediate + unsolicited
        if data_out is None or remaining <= 0:
            return
        # The rest goes when the target asks for it. Shielded: a write whose data never
        # comes would hold the target's task (and our CmdSN slot) forever.
        with trio.CancelScope(shield=True):
            while remaining > 0 and not task.done.is_set():
                await task.r2t_ready.wait()
                if task.done.is_set():
                    break
                task.r2t_ready = trio.Event()
                while task.r2ts:
                    ttt, offset, length = task.r2ts.pop(0)  # checked by the reader
                    parts = []
                    self._data_out(parts, task.itt, lun, ttt, data_out, offset, length)
                    await self.send(parts)
                    remaining -= length
                    task.sent += length

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
            request = pdu.encode_logout(
                itt=task.itt, cid=0, cmd_sn=self.cmd_sn, exp_stat_sn=self.exp_stat_sn
            )
            await self.send([request])
            await task.done.wait()
        finally:
            self._pending.pop(task.itt, None)

    async def aclose(self) -> None:
        self._closing = True
        with trio.CancelScope(shield=True):
            await self._stream.aclose()


# -- opening ---------------------------------------------------------------------------------


async def _login(conn: Connection, address: ISCSIAddress) -> None:
    chap = (address.user, address.password or "") if address.user else None
    state = login_mod.Login(address.initiator, address.target, login_mod.new_isid(), chap=chap)
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
        step = self._max_transfer
        if view.nbytes <= step:
            await self._read_piece(offset, view)
            return
        pieces = range(0, view.nbytes, step)
        calls = [
            functools.partial(self._read_piece, offset + p, view[p : p + step]) for p in pieces
        ]
        await together(calls)

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
        step = self._write_step()
        if view.nbytes <= step:
            await self._write_piece(offset, view)
            return
        pieces = range(0, view.nbytes, step)
        calls = [
            functools.partial(self._write_piece, offset + p, view[p : p + step]) for p in pieces
        ]
        await together(calls)

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
            if self._conn.broken is None:
                with contextlib.suppress(TrioconvIOError):
                    await self._conn.logout()
        await self._conn.aclose()


async def _connect_and_login(address: ISCSIAddress, timeout: float = OPEN_TIMEOUT) -> Connection:
    """Connect and log in, following the target's redirections (a few at most); each
    step may take ``timeout`` seconds."""
    where = address
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
                await _login(conn, address)
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
    bounds, in seconds, connecting and logging in (QEMU's ``timeout``; 30 s when None).

    Raises:
        ImageError: the target cannot be reached, refuses the login, or the LUN does
            not exist or is not a disk.
    """
    address = parse_iscsi_uri(uri)
    if chap is not None:
        address = attrs.evolve(address, user=chap[0], password=chap[1])
    conn = await _connect_and_login(address, OPEN_TIMEOUT if timeout is None else timeout)
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
            try:
                yield driver
            finally:
                await driver.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await conn.aclose()
