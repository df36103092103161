"""What the scripted servers of the fault tests share: a listening socket, a thread that
accepts, one thread per connection, and a clean stop.

A subclass gives the listener and serves one connection in :meth:`ScriptedServer.serve`
(in its own thread; return to close it). ``with server:`` starts accepting; leaving the
block shuts every socket down, which also wakes the threads blocked on them::

    class Echo(ScriptedServer):
        def __init__(self) -> None:
            super().__init__(socket.create_server(("127.0.0.1", 0)))

        def serve(self, conn: socket.socket) -> None:
            while data := conn.recv(4096):
                conn.sendall(data)
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from typing import Self

__all__ = ["ScriptedServer"]


class ScriptedServer:
    """Accepts on ``listener`` until the ``with`` block ends; see the module."""

    def __init__(self, listener: socket.socket) -> None:
        self._listener = listener
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def serve(self, conn: socket.socket) -> None:
        """Serve one connection (a thread of its own); it is closed on return."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept
        self._listener.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
        self._thread.join(5)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve_then_close, args=(conn,), daemon=True).start()

    def _serve_then_close(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.serve(conn)
