"""A scripted iSCSI target that misbehaves on purpose, for the initiator's fault tests.

tgtd (:mod:`tests.iscsi_target`) always answers the same correct way; this one answers
as told. It logs in without authentication, answering the initiator's operational keys
with ``params``, the target's own values (``MaxRecvDataSegmentLength``,
``MaxBurstLength``, ``FirstBurstLength``, ``InitialR2T``, ``ImmediateData``) combined
with the initiator's offer as RFC 7143 section 13 says. It serves ``lun``, a bytearray
of 512-byte blocks, as LUN 1: INQUIRY (standard; VPD pages 0x00, 0xB0 block limits and
0xB2 provisioning), TEST UNIT READY, READ CAPACITY (16), READ (16), WRITE (16) and WRITE
SAME (16) (immediate data, unsolicited Data-Out, then R2Ts), SYNCHRONIZE CACHE (16),
NOP-Out and Logout. Anything else is CHECK CONDITION, ILLEGAL REQUEST.

Hooks script the misbehaviour, each a function of the :class:`Session` (one connection:
its sequence numbers and the builders of target PDUs) and of the request:

* ``reads(session, command, data)`` returns the PDUs answering a READ of ``data``
  (:func:`honest_read`: Data-In PDUs, the last one with the status);
* ``writes(session, command)`` takes a WRITE's or WRITE SAME's data with
  :meth:`Session.collect` (which sends the R2Ts) and returns the PDUs that end it
  (:func:`honest_write`);
* ``login(session, request)`` returns a Login Response to send instead of the honest
  one, or None (:meth:`Session.refuse` and :meth:`Session.redirect` build two).

A hook that raises :class:`Dropped` drops the connection once what it queued went out,
as a restarting target or a network reset does; :meth:`FakeISCSITarget.drop` drops
every connection at once (between commands), and :meth:`FakeISCSITarget.go_away` also
stops taking new ones; a hook may change ``params`` or ``block_size`` (which READ
CAPACITY reports; the data is still served in 512-byte blocks) for the connections to
come. The target records what a reconnecting initiator must get right:

* each login's ISID and TSIH (:attr:`~FakeISCSITarget.logins`);
* the READs and WRITEs each connection received, in order (:attr:`~FakeISCSITarget.seen`);
* Data-Out whose task tag the connection never saw (:attr:`~FakeISCSITarget.strays`:
  data of a task of a lost connection, sent on the new one);
* data sent against the values agreed at login (:attr:`~FakeISCSITarget.violations`).

Each connection has a thread that reads requests and answers them in order, and another
that sends what the first one queued: the target reads on while its answers wait in the
socket, and reads nothing while a hook sleeps. It runs on 127.0.0.1 until the ``with`` ends::

    def no_r2t(session: Session, cmd: PDU) -> list[bytes]:
        return [session.store(cmd, cmd.data)]  # GOOD after the immediate data alone

    with FakeISCSITarget(bytearray(1 << 20), writes=no_r2t) as target:
        ... target.url ...
"""

from __future__ import annotations

import collections
import contextlib
import queue
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence

import attrs

from trioconv.protocols.iscsi import _scsi as scsi
from trioconv.protocols.iscsi._login import decode_text, encode_text
from trioconv.protocols.iscsi._pdu import (
    CONTINUE,
    FINAL,
    OVERFLOW,
    RESERVED_TAG,
    STATUS,
    TRANSIT,
    UNDERFLOW,
    Opcode,
    _header,
    pad_length,
)

from ._scripted import ScriptedServer

IQN = "iqn.2024-01.test.fake:disk"


class Dropped(Exception):
    """Raised by a hook: the connection is dropped once what was queued went out."""


BLOCK = 512
GOOD, CHECK_CONDITION, BUSY, TASK_SET_FULL, ILLEGAL_REQUEST = 0x00, 0x02, 0x08, 0x28, 0x5
#: MaxCmdSN - ExpCmdSN + 1: the commands the initiator may have in flight.
WINDOW = 64
#: The target's values unless ``params`` says otherwise.
DEFAULTS = {
    "MaxRecvDataSegmentLength": "262144",
    "MaxBurstLength": "262144",
    "FirstBurstLength": "65536",
    "InitialR2T": "Yes",
    "ImmediateData": "Yes",
}


@attrs.frozen
class PDU:
    """An initiator PDU as received: the header fields the target looks at, the data."""

    opcode: Opcode
    flags: int  # byte 1: F (final) and the opcode's own bits
    lun: bytes  # bytes 8-15 (a Login Request's ISID and TSIH)
    itt: int
    word20: int  # a SCSI Command's expected data transfer length; a NOP-Out's TTT
    cmd_sn: int
    offset: int  # a Data-Out's buffer offset
    cdb: bytes
    data: bytes

    @classmethod
    def decode(cls, bhs: bytes, data: bytes) -> PDU:
        itt, word20, cmd_sn = struct.unpack_from(">III", bhs, 16)
        offset = int.from_bytes(bhs[40:44], "big")
        return cls(Opcode(bhs[0] & 0x3F), bhs[1], bhs[8:16], itt, word20, cmd_sn, offset,
                   bhs[32:48], data)  # fmt: skip

    @property
    def final(self) -> bool:
        return bool(self.flags & FINAL)

    @property
    def lba_blocks(self) -> tuple[int, int]:
        """LBA and block count of a 16-byte READ, WRITE or WRITE SAME CDB."""
        _, _, lba, blocks, _, _ = struct.unpack(">BBQIBB", self.cdb)
        return lba, blocks


ReadHook = Callable[["Session", PDU, bytes], Sequence[bytes]]
WriteHook = Callable[["Session", PDU], Sequence[bytes]]
LoginHook = Callable[["Session", PDU], "bytes | None"]


def honest_read(session: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
    return session.read_reply(cmd, data)


def honest_write(session: Session, cmd: PDU) -> Sequence[bytes]:
    return [session.store(cmd, session.collect(cmd))]


class Session:
    """One connection: its sequence numbers, its queue of PDUs to send, and builders.

    ``number`` counts the target's connections from 0; ``itts`` holds the task tags of
    the commands it received.
    """

    def __init__(self, target: FakeISCSITarget, sock: socket.socket, number: int) -> None:
        self.target = target
        self.sock = sock
        self.number = number
        self.itts: set[int] = set()
        self.stat_sn = self.exp_cmd_sn = 0
        self.peer_segment = 8192  # the initiator's MaxRecvDataSegmentLength
        self.segment = 8192  # the target's own (declared at login)
        self.agreed = dict(DEFAULTS)  # the values both sides settled on
        self._lock = threading.Lock()
        self._out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._backlog: collections.deque[PDU] = collections.deque()  # to serve later

    def send(self, *pdus: bytes) -> None:
        for p in pdus:
            self._out.put(p)

    # -- building target PDUs ----------------------------------------------------------
    def pdu(
        self,
        op: Opcode,
        *,
        flags: int = FINAL,
        b2: int = 0,
        status: int = 0,
        field8: bytes = bytes(8),
        itt: int = RESERVED_TAG,
        ttt: int = RESERVED_TAG,
        words: tuple[int, int, int] = (0, 0, 0),
        data: bytes = b"",
    ) -> bytes:
        """A whole target PDU (``b2``: byte 2, a response code or reason; ``status``:
        byte 3; ``words``: bytes 36-47). StatSN advances when it ends a task, or is a
        Reject or an Async Message."""
        ends = op in (Opcode.SCSI_RESPONSE, Opcode.LOGIN_RESPONSE, Opcode.LOGOUT_RESPONSE)
        ends |= op in (Opcode.REJECT, Opcode.ASYNC_MESSAGE)
        ends |= op is Opcode.DATA_IN and bool(flags & STATUS)
        ends |= op is Opcode.NOP_IN and itt != RESERVED_TAG
        with self._lock:
            sn, self.stat_sn = self.stat_sn, self.stat_sn + ends
        most = (self.exp_cmd_sn + WINDOW - 1) & 0xFFFFFFFF
        tail = struct.pack(">7I", ttt, sn, self.exp_cmd_sn, most, *words)
        head = _header(
            op, flags, len(data), b2=b2, b3=status, lun_or_isid=field8, itt=itt, tail=tail
        )
        return head + data + bytes(pad_length(len(data)))

    def data_in(
        self,
        cmd: PDU,
        offset: int,
        data: bytes,
        *,
        status: int | None = None,
        underflow: int = 0,
        overflow: int = 0,
        data_sn: int | None = None,
    ) -> bytes:
        """``data`` as Data-In from ``offset``, in PDUs the initiator takes (its
        MaxRecvDataSegmentLength); with ``status``, the last one says it (F and S bits)
        and the residual count (``underflow``: U bit; ``overflow``: O bit). The first
        PDU's DataSN is ``data_sn``, by default the number of whole PDUs before
        ``offset`` (right when every earlier PDU was a whole one, from offset 0)."""
        step = self.peer_segment
        first = offset // step if data_sn is None else data_sn
        residual = (UNDERFLOW, underflow) if underflow else (OVERFLOW, overflow)
        out = b""
        for pos in range(0, len(data), step):
            last = pos + step >= len(data)
            end = status is not None and last
            flags = (FINAL | STATUS if end else 0) | (residual[0] if end and residual[1] else 0)
            at = offset + pos
            words = (first + pos // step, at, residual[1] if end else 0)  # DataSN, offset, residual
            out += self.pdu(Opcode.DATA_IN, flags=flags, status=(status or 0) if end else 0,
                            field8=cmd.lun, itt=cmd.itt, words=words,
                            data=data[pos : pos + step])  # fmt: skip
        return out

    def response(
        self, cmd: PDU, status: int = GOOD, *, sense: bytes = b"", underflow: int = 0
    ) -> bytes:
        """SCSI Response (``underflow``: the residual count, with the U bit)."""
        segment = struct.pack(">H", len(sense)) + sense if sense else b""
        flags = FINAL | (UNDERFLOW if underflow else 0)
        return self.pdu(Opcode.SCSI_RESPONSE, flags=flags, status=status, itt=cmd.itt,
                        words=(0, 0, underflow), data=segment)  # fmt: skip

    def check(self, cmd: PDU, key: int, asc: int) -> bytes:
        """CHECK CONDITION with fixed-format sense data."""
        sense = bytes((0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, 0, 0, 0, 0, 0))
        return self.response(cmd, CHECK_CONDITION, sense=sense)

    def r2t(self, cmd: PDU, offset: int, length: int, sn: int = 0, ttt: int | None = None) -> bytes:
        """Ready To Transfer ``length`` bytes at ``offset``: R2TSN ``sn``, target transfer
        tag ``ttt`` (by default ``0x100 + sn``)."""
        words = (sn, offset, length)
        tag = 0x100 + sn if ttt is None else ttt
        return self.pdu(Opcode.R2T, field8=cmd.lun, itt=cmd.itt, ttt=tag, words=words)

    def nop_in(
        self, *, itt: int = RESERVED_TAG, ttt: int = RESERVED_TAG, data: bytes = b""
    ) -> bytes:
        """A ping (``ttt`` set: the initiator must echo it) or the answer to one (``itt``)."""
        return self.pdu(Opcode.NOP_IN, itt=itt, ttt=ttt, data=data)

    def refuse(self, req: PDU, status_class: int = 2, detail: int = 3, text: bytes = b"") -> bytes:
        """A Login Response refusing ``req`` (by default 0x0203: target not found)."""
        words = ((status_class << 24) | (detail << 16), 0, 0)
        return self.pdu(Opcode.LOGIN_RESPONSE, field8=req.lun[:6] + b"\0\0", itt=req.itt,
                        words=words, data=text)  # fmt: skip

    def redirect(self, req: PDU, port: int) -> bytes:
        """A Login Response sending the initiator to 127.0.0.1:``port`` (moved
        temporarily, 0x0101)."""
        return self.refuse(req, 1, 1, encode_text({"TargetAddress": f"127.0.0.1:{port},1"}))

    def login_response(self, req: PDU, text: bytes, *, more: bool = False) -> bytes:
        """Answer ``req`` in its stage, moving on as it asks unless ``more`` (C bit)."""
        flags = (req.flags & 0x0C | CONTINUE) if more else req.flags & (TRANSIT | 0x0F)
        isid_tsih = req.lun[:6] + b"\0\1"
        return self.pdu(
            Opcode.LOGIN_RESPONSE, flags=flags, field8=isid_tsih, itt=req.itt, data=text
        )

    def read_reply(self, cmd: PDU, data: bytes) -> list[bytes]:
        """Honest Data-In for ``data`` (cut to the expected length, U bit when shorter)."""
        data = data[: cmd.word20]
        under = cmd.word20 - len(data)
        if not data:
            return [self.response(cmd, underflow=under)]
        return [self.data_in(cmd, 0, data, status=GOOD, underflow=under)]

    # -- write data ----------------------------------------------------------------------
    def collect(
        self,
        cmd: PDU,
        r2ts: Sequence[tuple[int, int]] | None = None,
        *,
        first_sn: int = 0,
        ttt: int | None = None,
        together: bool = False,
    ) -> bytes:
        """The write data of ``cmd``: immediate, unsolicited, then what R2Ts ask for -
        ``r2ts`` as ``(offset, length)``, or the rest in MaxBurstLength pieces.

        The R2Ts are numbered from ``first_sn`` and carry the transfer tag ``ttt`` (by
        default one of their own). Each waits for the data of the one before, unless
        ``together``: then all of them go at once, before any data is read."""
        total = cmd.word20
        buf = bytearray(total)
        buf[: len(cmd.data)] = cmd.data
        got = len(cmd.data) if cmd.final else self._data_out(cmd, buf)
        if r2ts is None:
            burst = int(self.agreed["MaxBurstLength"])
            r2ts = [(pos, min(burst, total - pos)) for pos in range(got, total, burst)]
        asks = [self.r2t(cmd, o, n, first_sn + i, ttt) for i, (o, n) in enumerate(r2ts)]
        if together:
            self.send(b"".join(asks))
        for ask in asks:
            if not together:
                self.send(ask)
            self._data_out(cmd, buf)
        return bytes(buf)

    def _data_out(self, cmd: PDU, buf: bytearray) -> int:
        """Receive one sequence of Data-Out for ``cmd`` into ``buf``; where it ended."""
        while True:
            mine = [p for p in self._backlog if p.opcode is Opcode.DATA_OUT and p.itt == cmd.itt]
            if mine:
                self._backlog.remove(p := mine[0])
            elif (p := self._recv()).opcode is not Opcode.DATA_OUT or p.itt != cmd.itt:
                if p.opcode in (Opcode.NOP_OUT, Opcode.LOGOUT_REQUEST):
                    self._dispatch(p)
                else:
                    self._backlog.append(p)
                continue
            buf[p.offset : p.offset + len(p.data)] = p.data
            if p.final:
                return p.offset + len(p.data)

    def store(self, cmd: PDU, data: bytes) -> bytes:
        """Write ``data`` (WRITE) or its first block repeated (WRITE SAME): the status."""
        lba, blocks = cmd.lba_blocks
        if (lba + blocks) * BLOCK > len(self.target.lun):
            return self.check(cmd, ILLEGAL_REQUEST, 0x21)  # LBA out of range
        if cmd.cdb[0] == scsi.WRITE_SAME_16:
            data = data[:BLOCK] * blocks
        self.target.lun[lba * BLOCK : lba * BLOCK + len(data)] = data
        return self.response(cmd)

    # -- the two threads -----------------------------------------------------------------
    def run(self) -> None:
        """Log in, then serve requests in order until the initiator closes or logs out;
        a second thread sends what was queued meanwhile."""
        sender = threading.Thread(target=self._send, daemon=True)
        sender.start()
        try:
            self._login()
            while True:
                self._dispatch(self._backlog.popleft() if self._backlog else self._recv())
        except EOFError:
            pass
        except Dropped:
            self._out.put(None)
            sender.join()  # what was queued went out; then the end of the stream
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
                # Read what the initiator still sends until it closes its end too, so
                # that closing ours is a plain end of stream, never a reset.
                self.sock.settimeout(5)
                while self.sock.recv(1 << 20):
                    pass
            return
        finally:
            self._out.put(None)
            sender.join()

    def _send(self) -> None:
        with contextlib.suppress(OSError):
            while (data := self._out.get()) is not None:
                self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(min(n - len(data), 1 << 20))
            if not chunk:
                raise EOFError
            data += chunk
        return bytes(data)

    def _recv(self) -> PDU:
        bhs = self._recv_exact(48)
        ahs, n = bhs[4] * 4, int.from_bytes(bhs[5:8], "big")
        p = PDU.decode(bhs, self._recv_exact(ahs + n + pad_length(n))[ahs : ahs + n])
        if p.opcode is Opcode.SCSI_COMMAND:
            self.itts.add(p.itt)
            if not bhs[0] & 0x40:  # not immediate
                self.exp_cmd_sn = (p.cmd_sn + 1) & 0xFFFFFFFF
            if p.data and self.agreed["ImmediateData"] == "No":
                self.target.violations.append(f"immediate data (ITT {p.itt})")
            if not p.final and self.agreed["InitialR2T"] == "Yes":
                self.target.violations.append(f"unsolicited data announced (ITT {p.itt})")
        elif p.opcode is Opcode.DATA_OUT and p.itt not in self.itts:
            self.target.strays += 1
        if p.opcode in (Opcode.SCSI_COMMAND, Opcode.DATA_OUT) and len(p.data) > self.segment:
            self.target.violations.append(f"a {len(p.data)}-byte segment (at most {self.segment})")
        return p

    def _login(self) -> None:
        first = True
        while True:
            req = self._recv()
            if first:
                self.target.logins.append((req.lun[:6], int.from_bytes(req.lun[6:8], "big")))
                first = False
            answer = self.target.login(self, req) if self.target.login else None
            if answer is None:
                pairs = decode_text(req.data)
                if (req.flags >> 2) & 3 == 0:  # security stage: no authentication
                    keys = {"AuthMethod": "None", "TargetPortalGroupTag": "1"} if pairs else {}
                else:
                    keys = {key: self._negotiate(key, value) for key, value in pairs.items()}
                answer = self.login_response(req, encode_text(keys))
            self.send(answer)
            if answer[1] & TRANSIT and answer[1] & 3 == 3:  # on to full feature phase
                return

    def _negotiate(self, key: str, offered: str) -> str:
        mine = self.target.params.get(key, DEFAULTS.get(key, offered))
        if key == "MaxRecvDataSegmentLength":  # declared by each side, not negotiated
            self.peer_segment, self.segment = int(offered), int(mine)
            return mine
        if key in ("MaxBurstLength", "FirstBurstLength"):
            mine = str(min(int(mine), int(offered)))
        elif key == "InitialR2T":
            mine = "Yes" if "Yes" in (mine, offered) else "No"
        elif key == "ImmediateData":
            mine = "Yes" if mine == offered == "Yes" else "No"
        self.agreed[key] = mine
        return mine

    def _dispatch(self, p: PDU) -> None:
        target = self.target
        if p.opcode is Opcode.SCSI_COMMAND:
            self.send(*target.execute(self, p))
        elif p.opcode is Opcode.NOP_OUT and p.itt != RESERVED_TAG:  # the initiator pings
            target.pinged += 1
            self.send(self.nop_in(itt=p.itt, data=p.data))
        elif p.opcode is Opcode.NOP_OUT:  # the answer to our ping
            target.pongs.append((p.word20, zlib.crc32(p.data)))
        elif p.opcode is Opcode.LOGOUT_REQUEST:
            target.logout_at = time.monotonic()
            if target.answer_logout:
                self.send(self.pdu(Opcode.LOGOUT_RESPONSE, itt=p.itt))
            raise EOFError  # the session is over
        # Stray Data-Out (for a command refused or already answered): ignored.


class FakeISCSITarget(ScriptedServer):
    """The target, on an ephemeral port of 127.0.0.1, until the ``with`` block ends.

    ``params`` are the target's own operational values (:data:`DEFAULTS` for the rest).
    ``thin`` reports logical block provisioning (LBPME, LBPRZ: zeroes then go as WRITE
    SAME with UNMAP); ``max_transfer`` and ``max_write_same`` are the maxima of the Block
    Limits page, in blocks (0: none). ``write_same=False`` refuses WRITE SAME (ILLEGAL
    REQUEST, invalid opcode); ``answer_logout=False`` closes the connection instead.
    ``block_size`` is the logical block size READ CAPACITY reports (the data is served
    in 512-byte blocks whatever it says).
    """

    def __init__(
        self,
        lun: bytearray,
        *,
        params: Mapping[str, str] | None = None,
        thin: bool = False,
        max_transfer: int = 0,
        max_write_same: int = 0,
        write_same: bool = True,
        answer_logout: bool = True,
        block_size: int = BLOCK,
        reads: ReadHook = honest_read,
        writes: WriteHook = honest_write,
        login: LoginHook | None = None,
    ) -> None:
        self.lun = lun  # a multiple of 512 bytes, changed in place by writes
        self.params = dict(params or {})
        self.thin, self.max_transfer, self.max_write_same = thin, max_transfer, max_write_same
        self.write_same, self.answer_logout = write_same, answer_logout
        self.reads, self.writes, self.login = reads, writes, login
        self.pongs: list[tuple[int, int]] = []  # (TTT, CRC-32 of the data) of ping answers
        self.pinged = 0  # pings (NOP-Out with a task tag) from the initiator, answered
        self.logout_at: float | None = None  # time.monotonic() when a Logout came
        self.opcodes: collections.Counter[int] = collections.Counter()  # of the CDBs seen
        self.block_size = block_size  # what READ CAPACITY reports
        self.logins: list[tuple[bytes, int]] = []  # (ISID, TSIH) of each login
        #: For each connection, its READs and WRITEs in the order received: (opcode,
        #: LBA, blocks, ITT, CmdSN).
        self.seen: list[list[tuple[int, int, int, int, int]]] = []
        self.strays = 0  # Data-Out for a task tag the connection never saw
        #: What the initiator sent against the values agreed at login: immediate data
        #: when ImmediateData is No, unsolicited data when InitialR2T is Yes, a data
        #: segment longer than the target's MaxRecvDataSegmentLength.
        self.violations: list[str] = []
        listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = listener.getsockname()[1]
        super().__init__(listener)

    @property
    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{IQN}/1"

    def serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            number = len(self.seen)
            self.seen.append([])
        Session(self, conn, number).run()

    def drop(self) -> None:
        """Drop every connection now (a reset): the initiator sees the end of the stream."""
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def go_away(self) -> None:
        """Drop every connection and take no new one: connecting is refused."""
        self.stop_listening()
        self.drop()

    def stop_listening(self) -> None:
        """Take no new connection (connecting is refused); the open ones go on. With a
        hook that then raises :class:`Dropped`, the target goes away once what it
        queued went out (:meth:`go_away` cuts it off)."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def execute(self, s: Session, cmd: PDU) -> Sequence[bytes]:
        """The answer to one SCSI command."""
        op, lun = cmd.cdb[0], self.lun
        self.opcodes[op] += 1
        if op in (scsi.READ_16, scsi.WRITE_16):
            self.seen[s.number].append((op, *cmd.lba_blocks, cmd.itt, cmd.cmd_sn))
        if op == scsi.READ_16:
            lba, blocks = cmd.lba_blocks
            if (lba + blocks) * BLOCK > len(lun):
                return [s.check(cmd, ILLEGAL_REQUEST, 0x21)]  # LBA out of range
            return self.reads(s, cmd, bytes(lun[lba * BLOCK : (lba + blocks) * BLOCK]))
        if op == scsi.WRITE_16 or (op == scsi.WRITE_SAME_16 and self.write_same):
            return self.writes(s, cmd)
        if op == scsi.INQUIRY:
            data = self._inquiry(cmd.cdb[1] & 1, cmd.cdb[2])
            if data is None:
                return [s.check(cmd, ILLEGAL_REQUEST, 0x24)]  # invalid field in CDB
            return s.read_reply(cmd, data)
        if op == scsi.SERVICE_ACTION_IN_16 and cmd.cdb[1] & 0x1F == scsi.SA_READ_CAPACITY_16:
            flags = 0xC0 if self.thin else 0  # LBPME, LBPRZ
            last = len(lun) // self.block_size - 1
            data = struct.pack(">QIBBH16x", last, self.block_size, 0, 0, flags << 8)
            return s.read_reply(cmd, data)
        if op in (scsi.TEST_UNIT_READY, scsi.SYNCHRONIZE_CACHE_16):
            return [s.response(cmd)]
        return [s.check(cmd, ILLEGAL_REQUEST, 0x20)]  # invalid command operation code

    def _inquiry(self, evpd: int, page: int) -> bytes | None:
        if not evpd:  # a disk, SPC-3
            return struct.pack(
                ">BBBBB3x8s16s4s", 0, 0, 5, 2, 31, b"FAKE    ", b"fake disk".ljust(16), b"1   "
            )
        if page == scsi.VPD_SUPPORTED_PAGES:
            return bytes((0, 0, 0, 3, 0x00, 0xB0, 0xB2))
        if page == scsi.VPD_BLOCK_LIMITS:
            limits = (self.max_transfer, 0, self.max_write_same)  # max, optimal, WRITE SAME
            return struct.pack(">xBH4xII20xQ20x", 0xB0, 60, *limits)
        if page == scsi.VPD_LOGICAL_BLOCK_PROVISIONING:  # WRITE SAME (16) with UNMAP, LBPRZ
            return bytes((0, 0xB2, 0, 4, 0, (0x40 if self.write_same else 0) | 0x04, 0, 0))
        return None
