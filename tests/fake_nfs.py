"""A scripted NFSv3 + MOUNTv3 server that misbehaves on purpose, for the client's fault tests.

nfs-ganesha (:mod:`tests.nfs_server`) always answers the same correct way; this server
answers as told. It exports ``/export``, holding one in-memory file, ``disk.img``, and
speaks ONC RPC over TCP with record marking: MOUNT (MNT, UMNT) on one port, NFS (NULL,
LOOKUP, GETATTR, ACCESS, FSINFO, READ, WRITE, COMMIT, CREATE, SETATTR, REMOVE) on
another; other programs and procedures are unavailable. Given no data, the file does
not exist until a client CREATEs it.

Every call goes to ``behaviour``, a function of the decoded :class:`Call` that returns
the raw bytes to send back - a whole record with its mark, several, anything at all, or
``b""`` for no answer (the server hung) - or None for the honest reply.
:meth:`Call.honest` makes the honest reply (and does what the call asks);
:func:`reply`, :func:`error`, :func:`read_reply`, :func:`write_reply` and
:func:`record` build the others, and a :class:`Reset` is sent, then the connection
closed with a TCP reset. It runs in threads on 127.0.0.1, on ephemeral ports that
``url`` names, so the client skips the portmapper::

    def short_eof(call: Call) -> bytes | None:
        if call.proc == "READ":
            return read_reply(call, b"", eof=True)
        return None

    with FakeNFSServer(data, short_eof) as server:
        ... server.url ...   # nfs://127.0.0.1/export/disk.img?nfsport=P&mountport=Q
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Self

import attrs

from trioconv.protocols.nfs import _proto as proto
from trioconv.protocols.nfs import _rpc as rpc
from trioconv.protocols.nfs._xdr import Unpacker, pad

from ._scripted import ScriptedServer

EXPORT, NAME = "/export", "disk.img"
ROOT_FH, FILE_FH = b"root of /export", b"the file"
NFS3ERR_NOTDIR, NFS3ERR_FBIG, NFS3ERR_NOSPC, NFS3ERR_STALE = 20, 27, 28, 70
PROCS = {proto.MOUNT_PROG: {0: "MOUNT NULL", 1: "MNT", 3: "UMNT"}}
PROCS[proto.NFS_PROG] = {0: "NULL"} | {p.value: p.name for p in proto.Proc}


#: What a test gives the server: the bytes to send back for a call, None for the honest reply.
Behaviour = Callable[["Call"], "bytes | None"]


class Reset(bytes):
    """A reply after which the server resets the connection (``Reset()``: at once)."""


@attrs.define
class Call:
    """One call as the server decoded it; fields a procedure does not have stay empty."""

    xid: int
    proc: str  # "MNT", "UMNT", "GETATTR", "READ", ... (see PROCS)
    fh: bytes = b""  # the handle: the file's, or the directory's for LOOKUP/CREATE/REMOVE
    name: str = ""  # LOOKUP, CREATE, REMOVE: the name; MNT, UMNT: the export path
    offset: int = 0  # READ, WRITE, COMMIT
    count: int = 0  # READ, WRITE, COMMIT
    data: bytes = b""  # WRITE
    stable: int = 0  # WRITE: stable_how (proto.Stable)
    size: int | None = None  # SETATTR: the new size, when it sets one
    guarded: bool = False  # CREATE
    server: FakeNFSServer | None = attrs.field(default=None, repr=False)

    def honest(self) -> bytes:
        """The reply a correct server sends, after doing what the call asks."""
        assert self.server is not None
        return reply(self, self.server.results(self))


def record(body: bytes, *, last: bool = True) -> bytes:
    """``body`` as one record-marking fragment (the last of its record unless told)."""
    return struct.pack(">I", (rpc.LAST_FRAGMENT if last else 0) | len(body)) + body


def reply(call: Call, results: bytes, accept: int = 0) -> bytes:
    """The record of an accepted reply to ``call``: the ``accept`` status (SUCCESS unless
    told), then ``results``."""
    return record(struct.pack(">6I", call.xid, rpc.REPLY, rpc.MSG_ACCEPTED, 0, 0, accept) + results)


def error(call: Call, status: int) -> bytes:
    """A failed procedure: ``status``, no attributes (nor wcc data)."""
    return reply(call, _words(status, 0, 0))


def read_reply(call: Call, data: bytes, *, eof: bool) -> bytes:
    """``data`` read, and whether it reaches the end of the file."""
    return reply(call, _read_results(data, eof))


def write_reply(call: Call, count: int, verf: bytes) -> bytes:
    """``count`` bytes written UNSTABLE under the write verifier ``verf`` (8 bytes)."""
    return reply(call, _write_results(count, verf))


def _read_results(data: bytes, eof: bool) -> bytes:
    return _words(0, 0, len(data), eof) + _opaque(data)


def _write_results(count: int, verf: bytes, committed: int = proto.Stable.UNSTABLE) -> bytes:
    return _words(0, 0, 0, count, committed) + verf


def _words(*values: int) -> bytes:
    return struct.pack(f">{len(values)}I", *values)


def _opaque(data: bytes) -> bytes:
    return _words(len(data)) + data + pad(len(data))


def _fattr(size: int) -> bytes:
    """``fattr3`` of a regular file: type, mode, nlink, uid, gid, size, used, rdev, fsid,
    fileid, times."""
    return struct.pack(
        ">5I2Q2I2Q6I", proto.FileType.REG, 0o644, 1, 0, 0, size, size, 0, 0, 1, 1, *[0] * 6
    )


class FakeNFSServer(ScriptedServer):
    """Serves ``data`` as ``/export/disk.img`` until the ``with`` block ends; see the module.

    ``file`` is the file's bytes as they stand (None: it does not exist), ``calls`` the
    procedures called so far, ``verf`` the write verifier of honest WRITEs and COMMITs.
    """

    def __init__(
        self,
        data: bytes | None,
        behaviour: Behaviour = lambda call: None,
        *,
        transfer: int = 1 << 20,
    ) -> None:
        self.file = bytearray(data) if data is not None else None
        self.behaviour = behaviour
        self.transfer = transfer  # FSINFO's READ and WRITE sizes
        self.verf = b"verifier"
        self.calls: list[str] = []
        self._state = threading.Lock()
        super().__init__(socket.create_server(("127.0.0.1", 0)))
        self._mount = _MountPort(self)

    @property
    def nfs_port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def mount_port(self) -> int:
        return self._mount.port

    @property
    def url(self) -> str:
        return f"nfs://127.0.0.1{EXPORT}/{NAME}?nfsport={self.nfs_port}&mountport={self.mount_port}"

    def __enter__(self) -> Self:
        self._mount.__enter__()
        return super().__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        super().__exit__(exc_type, exc, tb)
        self._mount.__exit__(exc_type, exc, tb)

    def serve(self, conn: socket.socket, prog: int = proto.NFS_PROG) -> None:
        records = rpc.RecordReader(4 << 20)
        while data := conn.recv(1 << 20):
            records.receive_data(data)
            while (message := records.next_record()) is not None:
                answer = self._answer(Unpacker(bytes(message)), prog)
                conn.sendall(answer)
                if isinstance(answer, Reset):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return  # closing with a zero linger time sends a reset

    def _answer(self, u: Unpacker, port_prog: int) -> bytes:
        xid, _call, _version, prog, _vers, number = (u.unpack_uint() for _ in range(6))
        for _ in range(2):  # the credential and the verifier: flavour, body
            u.unpack_uint(), u.unpack_opaque()
        call = Call(xid, PROCS[port_prog].get(number, "?"), server=self)
        if prog != port_prog:  # MOUNT on the NFS port, or the other way round
            return reply(call, b"", rpc.AcceptStat.PROG_UNAVAIL)
        if call.proc == "?":
            return reply(call, b"", rpc.AcceptStat.PROC_UNAVAIL)
        _decode_args(call, u)
        with self._state:
            self.calls.append(call.proc)
            answer = self.behaviour(call)
            return call.honest() if answer is None else answer

    def results(self, call: Call) -> bytes:
        """The honest results of ``call`` (after doing what it asks)."""
        if call.proc == "MNT" and call.name != EXPORT:
            return _words(proto.NFS3ERR_NOENT)
        if call.proc == "MNT":  # the root handle, the one auth flavour accepted
            return _words(0) + _opaque(ROOT_FH) + _words(1, rpc.AUTH_SYS)
        if call.proc in ("MOUNT NULL", "UMNT", "NULL"):
            return b""
        if call.proc in ("LOOKUP", "CREATE", "REMOVE") and call.fh != ROOT_FH:
            return _words(NFS3ERR_NOTDIR, 0, 0)
        if call.proc == "LOOKUP":
            if call.name != NAME or self.file is None:
                return _words(proto.NFS3ERR_NOENT, 0)
            return _words(0) + _opaque(FILE_FH) + _words(1) + _fattr(len(self.file)) + _words(0)
        if call.proc == "CREATE":
            if call.guarded and self.file is not None:
                return _words(proto.NFS3ERR_EXIST, 0, 0)
            self.file = bytearray()
            return _words(0, 1) + _opaque(FILE_FH) + _words(0, 0, 0)
        if call.proc == "REMOVE":
            self.file = None
            return _words(0, 0, 0)
        file = self.file
        if call.fh != FILE_FH or file is None:
            return _words(NFS3ERR_STALE, 0, 0)
        if call.proc == "GETATTR":
            return _words(0) + _fattr(len(file))
        if call.proc == "ACCESS":
            return _words(0, 0, 0x3F)
        if call.proc == "FSINFO":  # rt: max, pref, mult; wt: the same; dtpref; maxfilesize ...
            sizes = (self.transfer, self.transfer, 4096) * 2
            return _words(0, 0, *sizes, 4096) + struct.pack(">Q3I", 1 << 62, 0, 1, 0x1B)
        if call.proc == "SETATTR":
            if call.size is not None:
                del file[call.size :]
                file.extend(bytes(call.size - len(file)))
            return _words(0, 0, 0)
        if call.proc == "READ":
            data = bytes(file[call.offset : call.offset + call.count])
            return _read_results(data, call.offset + len(data) >= len(file))
        if call.proc == "WRITE":
            file.extend(bytes(max(0, call.offset - len(file))))
            file[call.offset : call.offset + len(call.data)] = call.data
            return _write_results(len(call.data), self.verf, call.stable)
        if call.proc == "COMMIT":
            return _words(0, 0, 0) + self.verf
        raise AssertionError(f"no honest reply to {call.proc}")


def _decode_args(call: Call, u: Unpacker) -> None:
    """Fill in ``call``'s fields from its XDR arguments."""
    if call.proc in ("MNT", "UMNT"):
        call.name = u.unpack_string()
    if call.proc in ("NULL", "MNT", "UMNT", "MOUNT NULL"):
        return
    call.fh = u.unpack_opaque()
    if call.proc in ("LOOKUP", "CREATE", "REMOVE"):
        call.name = u.unpack_string()
        call.guarded = call.proc == "CREATE" and u.unpack_uint() == proto.CreateMode.GUARDED
    elif call.proc in ("READ", "WRITE", "COMMIT"):
        call.offset, call.count = u.unpack_uhyper(), u.unpack_uint()
        if call.proc == "WRITE":
            call.stable = u.unpack_uint()
            call.data = u.unpack_opaque()
    elif call.proc == "SETATTR":  # sattr3: mode, uid, gid (each optional), then the size
        for _ in range(3):
            if u.unpack_bool():
                u.unpack_uint()
        call.size = u.unpack_uhyper() if u.unpack_bool() else None


class _MountPort(ScriptedServer):
    """MOUNT, on a port of its own (as real servers have it), served by ``nfs``."""

    def __init__(self, nfs: FakeNFSServer) -> None:
        super().__init__(socket.create_server(("127.0.0.1", 0)))
        self.port: int = self._listener.getsockname()[1]
        self._nfs = nfs

    def serve(self, conn: socket.socket) -> None:
        self._nfs.serve(conn, proto.MOUNT_PROG)
