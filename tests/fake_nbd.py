"""A scripted NBD server that misbehaves on purpose, for the client's fault tests.

Real servers (nbdkit, qemu-nbd) do not send short or malformed replies; this one does,
as told. It speaks the fixed newstyle handshake (structured replies, ``NBD_OPT_GO``) and
answers each request through ``behaviour``, a function of the request that returns the
bytes to send back - or a list of byte strings and pauses (floats, in seconds) to send
them slowly, :data:`NO_REPLY` to leave the request unanswered, or :data:`STOP_READING`
to stop reading the socket for good. It runs in a thread on a unix socket and serves any
number of connections::

    with FakeNBDServer(tmp_path / "s.sock", size=1 << 20, behaviour=short_reads) as srv:
        ... srv.uri ...

``stall`` makes it go silent during the handshake instead: before its greeting
(``"greeting"``), after it without answering any option (``"options"``), or at
``NBD_OPT_GO`` (``"go"``). It logs every request (:attr:`FakeNBDServer.requests`) and
counts the ``NBD_CMD_DISC`` it receives (:attr:`FakeNBDServer.disconnects`).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from ._scripted import ScriptedServer

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 7, 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT, REP_ERR_UNKNOWN = 1, 3, 4, (1 << 31) | 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = (
    0, 1, 2, 3, 4, 6, 7,
)  # fmt: skip
FLAG_DONE = 1
CHUNK_NONE, CHUNK_DATA, CHUNK_HOLE, CHUNK_STATUS = 0, 1, 2, 5
CHUNK_ERROR, CHUNK_ERROR_OFFSET = 32769, 32770
STATE_HOLE, STATE_ZERO = 1, 2
#: The id this server gives ``base:allocation`` (with ``meta_context=True``).
ALLOCATION_CONTEXT = 1

#: What a behaviour returns to make the server stop reading from the connection.
STOP_READING = b"stop"
#: What a behaviour returns to leave a request unanswered (the server reads on).
NO_REPLY = b""

#: A behaviour's answer: bytes, or bytes and pauses (seconds) to send them slowly.
Answer = bytes | Sequence[bytes | float]

#: Where ``stall`` makes the server go silent in the handshake.
Stall = Literal["greeting", "options", "go"]


class Request:
    """One transmission-phase request."""

    def __init__(self, kind: int, cookie: int, offset: int, length: int, flags: int = 0) -> None:
        self.kind, self.cookie, self.offset, self.length = kind, cookie, offset, length
        self.flags = flags


def chunk(req: Request, kind: int, payload: bytes, *, done: bool = True) -> bytes:
    """A structured reply chunk of any type to ``req``."""
    flags = FLAG_DONE if done else 0
    return struct.pack(">IHHQI", STRUCTURED_MAGIC, flags, kind, req.cookie, len(payload)) + payload


def data_chunk(req: Request, offset: int, data: bytes, *, done: bool) -> bytes:
    return chunk(req, CHUNK_DATA, struct.pack(">Q", offset) + data, done=done)


def hole_chunk(req: Request, offset: int, length: int, *, done: bool) -> bytes:
    return chunk(req, CHUNK_HOLE, struct.pack(">QI", offset, length), done=done)


def status_chunk(req: Request, extents: Sequence[tuple[int, int]], *, done: bool = True) -> bytes:
    """``NBD_REPLY_TYPE_BLOCK_STATUS`` for ``base:allocation``: ``(length, flags)`` pairs."""
    pairs = b"".join(struct.pack(">II", n, state) for n, state in extents)
    return chunk(req, CHUNK_STATUS, struct.pack(">I", ALLOCATION_CONTEXT) + pairs, done=done)


def error_chunk(req: Request, error: int, message: bytes) -> bytes:
    return chunk(req, CHUNK_ERROR, struct.pack(">IH", error, len(message)) + message)


def error_offset_chunk(req: Request, error: int, message: bytes, offset: int) -> bytes:
    payload = struct.pack(">IH", error, len(message)) + message + struct.pack(">Q", offset)
    return chunk(req, CHUNK_ERROR_OFFSET, payload)


def simple_reply(req: Request, error: int = 0) -> bytes:
    return struct.pack(">IIQ", SIMPLE_MAGIC, error, req.cookie)


def honest(req: Request) -> bytes:
    """A well-behaved server of zeroes (holes, for block status)."""
    if req.kind == CMD_READ:
        return data_chunk(req, req.offset, bytes(req.length), done=True)
    if req.kind == CMD_BLOCK_STATUS:
        return status_chunk(req, [(req.length, STATE_HOLE | STATE_ZERO)])
    return simple_reply(req)


class FakeNBDServer(ScriptedServer):
    """See the module. ``block_sizes`` is what ``NBD_INFO_BLOCK_SIZE`` says, or a list:
    one for each connection in turn (the last one for the rest). ``extra_flags`` are
    transmission flags besides the ones always sent (has flags, flush, and multi-conn
    with ``multi_conn``); ``meta_context`` answers ``base:allocation``, ``structured``
    False refuses structured replies."""

    def __init__(
        self,
        path: Path,
        *,
        size: int,
        behaviour: Callable[[Request], Answer] = honest,
        block_sizes: tuple[int, int, int] | list[tuple[int, int, int]] | None = None,
        go_error: bytes | None = None,
        multi_conn: bool = False,
        size_step: int = 0,
        structured: bool = True,
        meta_context: bool = False,
        stall: Stall | None = None,
        extra_flags: int = 0,
    ) -> None:
        self.path = path
        self.size = size
        self.multi_conn = multi_conn
        self.size_step = size_step  # each new connection sees an export this much larger
        self._served = 0
        self.behaviour = behaviour
        self.block_sizes = block_sizes
        self.go_error = go_error
        self.structured = structured
        self.meta_context = meta_context
        self.stall = stall
        self.extra_flags = extra_flags
        self.requests: list[Request] = []
        self.disconnects = 0
        self._count_lock = threading.Lock()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(8)
        super().__init__(listener)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"

    def serve(self, conn: socket.socket) -> None:
        try:
            if not self._handshake(conn):
                _wait_for_close(conn)
                return
            while True:
                head = _recv(conn, 28)
                _, flags, kind, cookie, offset, length = struct.unpack(">IHHQQI", head)
                if kind == CMD_WRITE:
                    _recv(conn, length)
                if kind == CMD_DISC:
                    with self._count_lock:
                        self.disconnects += 1
                    return
                request = Request(kind, cookie, offset, length, flags)
                with self._count_lock:
                    self.requests.append(request)
                answer = self.behaviour(request)
                if answer == STOP_READING:
                    threading.Event().wait()  # the connection stays open, unread
                if isinstance(answer, bytes):
                    conn.sendall(answer)
                    continue
                for piece in answer:
                    if isinstance(piece, float):
                        time.sleep(piece)
                    else:
                        conn.sendall(piece)
        except EOFError:
            return

    def _handshake(self, conn: socket.socket) -> bool:
        """Negotiate; False when ``stall`` says to go silent instead."""
        if self.stall == "greeting":
            return False
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1 | 2))
        _recv(conn, 4)
        while True:
            _, option, length = struct.unpack(">QII", _recv(conn, 16))
            data = _recv(conn, length)
            if self.stall == "options" or (self.stall == "go" and option == OPT_GO):
                return False
            if option == OPT_STRUCTURED_REPLY:
                answer = REP_ACK if self.structured else (1 << 31) | 1
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, answer, 0))
            elif option == OPT_SET_META_CONTEXT and self.meta_context:
                if b"base:allocation" in data:
                    name = struct.pack(">I", ALLOCATION_CONTEXT) + b"base:allocation"
                    head = struct.pack(">QIII", OPT_REPLY_MAGIC, option, REP_META_CONTEXT, 19)
                    conn.sendall(head + name)
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, REP_ACK, 0))
            elif option == OPT_GO:
                if self.go_error is not None:
                    reply = struct.pack(
                        ">QIII", OPT_REPLY_MAGIC, option, REP_ERR_UNKNOWN, len(self.go_error)
                    )
                    conn.sendall(reply + self.go_error)
                    continue
                with self._count_lock:
                    served = self._served
                    self._served += 1
                size = self.size + served * self.size_step
                # has flags, flush, multi-conn; the others as told
                flags = 1 | 4 | (256 if self.multi_conn else 0) | self.extra_flags
                info = struct.pack(">HQH", INFO_EXPORT, size, flags)
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, REP_INFO, 12) + info)
                block_sizes = self.block_sizes
                if isinstance(block_sizes, list):
                    block_sizes = block_sizes[min(served, len(block_sizes) - 1)]
                if block_sizes is not None:
                    sizes = struct.pack(">HIII", INFO_BLOCK_SIZE, *block_sizes)
                    conn.sendall(
                        struct.pack(">QIII", OPT_REPLY_MAGIC, option, REP_INFO, 14) + sizes
                    )
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, REP_ACK, 0))
                return True
            else:  # meta contexts (unless asked for) and the rest: unsupported
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, (1 << 31) | 1, 0))


def _wait_for_close(conn: socket.socket) -> None:
    """Read and drop whatever the client sends until it hangs up (or the server stops)."""
    while conn.recv(65536):
        pass


def _recv(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)
