"""A scripted NBD server that misbehaves on purpose, for the client's fault tests.

Real servers (nbdkit, qemu-nbd) do not send short or malformed replies; this one does,
as told. It speaks the fixed newstyle handshake (structured replies, ``NBD_OPT_GO``) and
answers each request through ``behaviour``, a function of the request that returns the
bytes to send back (or :data:`STOP_READING` to stop reading the socket for good). It
runs in a thread on a unix socket and serves any number of connections::

    with FakeNBDServer(tmp_path / "s.sock", size=1 << 20, behaviour=short_reads) as srv:
        ... srv.uri ...
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from ._scripted import ScriptedServer

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
OPT_GO, OPT_STRUCTURED_REPLY = 7, 8
REP_ACK, REP_INFO, REP_ERR_UNKNOWN = 1, 3, (1 << 31) | 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
FLAG_DONE = 1
CHUNK_DATA, CHUNK_ERROR = 1, 32769

#: What a behaviour returns to make the server stop reading from the connection.
STOP_READING = b"stop"


class Request:
    """One transmission-phase request."""

    def __init__(self, kind: int, cookie: int, offset: int, length: int) -> None:
        self.kind, self.cookie, self.offset, self.length = kind, cookie, offset, length


def data_chunk(req: Request, offset: int, data: bytes, *, done: bool) -> bytes:
    payload = struct.pack(">Q", offset) + data
    header = struct.pack(
        ">IHHQI", STRUCTURED_MAGIC, FLAG_DONE if done else 0, CHUNK_DATA, req.cookie, len(payload)
    )
    return header + payload


def error_chunk(req: Request, error: int, message: bytes) -> bytes:
    payload = struct.pack(">IH", error, len(message)) + message
    header = struct.pack(
        ">IHHQI", STRUCTURED_MAGIC, FLAG_DONE, CHUNK_ERROR, req.cookie, len(payload)
    )
    return header + payload


def simple_reply(req: Request, error: int = 0) -> bytes:
    return struct.pack(">IIQ", SIMPLE_MAGIC, error, req.cookie)


def honest(req: Request) -> bytes:
    """A well-behaved server of zeroes."""
    if req.kind == CMD_READ:
        return data_chunk(req, req.offset, bytes(req.length), done=True)
    return simple_reply(req)


class FakeNBDServer(ScriptedServer):
    def __init__(
        self,
        path: Path,
        *,
        size: int,
        behaviour: Callable[[Request], bytes] = honest,
        block_sizes: tuple[int, int, int] | None = None,
        go_error: bytes | None = None,
        multi_conn: bool = False,
        size_step: int = 0,
    ) -> None:
        self.path = path
        self.size = size
        self.multi_conn = multi_conn
        self.size_step = size_step  # each new connection sees an export this much larger
        self._served = 0
        self.behaviour = behaviour
        self.block_sizes = block_sizes
        self.go_error = go_error
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(8)
        super().__init__(listener)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"

    def serve(self, conn: socket.socket) -> None:
        try:
            self._handshake(conn)
            while True:
                head = _recv(conn, 28)
                _, _flags, kind, cookie, offset, length = struct.unpack(">IHHQQI", head)
                if kind == CMD_WRITE:
                    _recv(conn, length)
                if kind == CMD_DISC:
                    return
                answer = self.behaviour(Request(kind, cookie, offset, length))
                if answer == STOP_READING:
                    threading.Event().wait()  # the connection stays open, unread
                conn.sendall(answer)
        except EOFError:
            return

    def _handshake(self, conn: socket.socket) -> None:
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1 | 2))
        _recv(conn, 4)
        while True:
            _, option, length = struct.unpack(">QII", _recv(conn, 16))
            _recv(conn, length)
            if option == OPT_STRUCTURED_REPLY:
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, REP_ACK, 0))
            elif option == OPT_GO:
                if self.go_error is not None:
                    reply = struct.pack(
                        ">QIII", OPT_REPLY_MAGIC, option, REP_ERR_UNKNOWN, len(self.go_error)
                    )
                    conn.sendall(reply + self.go_error)
                    continue
                size = self.size + self._served * self.size_step
                self._served += 1
                flags = 1 | 4 | (256 if self.multi_conn else 0)  # flags, flush, multi-conn
                info = struct.pack(">HQH", INFO_EXPORT, size, flags)
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, REP_INFO, 12) + info)
                if self.block_sizes is not None:
                    sizes = struct.pack(">HIII", INFO_BLOCK_SIZE, *self.block_sizes)
                    conn.sendall(
                        struct.pack(">QIII", OPT_REPLY_MAGIC, option, REP_INFO, 14) + sizes
                    )
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, REP_ACK, 0))
                return
            else:  # meta contexts and the rest: unsupported
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, (1 << 31) | 1, 0))


def _recv(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)
