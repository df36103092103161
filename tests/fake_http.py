"""A scripted HTTP/1.1 server that frames its replies oddly on purpose, for client tests.

nginx (:mod:`tests.http_server`) always answers the same correct way; servers in the
wild do not. This one serves ``image`` over ``HEAD`` and ``GET`` with ``Range`` and lets
``behaviour`` - a function of the request - say which raw bytes go back (``None``
closes the connection instead, a :class:`Closing` reply closes it after sending).
:func:`honest` is the correct answer; the builders :func:`head` and :func:`partial`
help write the others. It runs in threads on 127.0.0.1 (or ``host``: ``"::1"`` for
IPv6) and serves any number of connections::

    def gzipped(req: Request) -> bytes | None:
        return partial(req, headers=[("Content-Encoding", "gzip")])

    with FakeHTTPServer(image, gzipped) as server:
        ... server.url ...
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Sequence

import attrs

from ._scripted import ScriptedServer


@attrs.frozen
class Request:
    """One request as the server saw it."""

    method: str
    target: str
    headers: dict[str, str]  # names in lower case
    range: tuple[int, int] | None  # ``bytes=FIRST-LAST``, clamped to the image
    image: bytes


class Closing(bytes):
    """A reply after which the server closes the connection (a body delimited by the
    close, as HTTP/1.0 servers send it)."""


Behaviour = Callable[[Request], "bytes | None"]


def head(status: str, headers: Sequence[tuple[str, object]], *, eol: bytes = b"\r\n") -> bytes:
    """A response head: ``HTTP/1.1 STATUS``, the headers, the blank line."""
    lines = [f"HTTP/1.1 {status}".encode("latin-1")]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    return eol.join(lines) + eol + eol


def partial(
    req: Request,
    *,
    headers: Sequence[tuple[str, object]] = (),
    body: bytes | None = None,
    length: bool = True,
    eol: bytes = b"\r\n",
) -> bytes:
    """``206`` for the request's range: Content-Range, Content-Length (unless
    ``length=False``), then ``headers``; the body is the range unless given."""
    assert req.range is not None
    first, last = req.range
    data = req.image[first : last + 1] if body is None else body
    fields: list[tuple[str, object]] = [("Content-Range", f"bytes {first}-{last}/{len(req.image)}")]
    if length:
        fields.append(("Content-Length", last - first + 1))
    return head("206 Partial Content", [*fields, *headers], eol=eol) + data


def chunked(data: bytes, size: int = 100_000) -> bytes:
    """``data`` in the chunked transfer coding, chunks of ``size`` bytes."""
    parts = [b"%x\r\n%b\r\n" % (len(data[i : i + size]), data[i : i + size])
             for i in range(0, len(data), size)]  # fmt: skip
    return b"".join(parts) + b"0\r\n\r\n"


def honest(req: Request) -> bytes | None:
    """What a correct server sends."""
    if req.method == "HEAD":
        return head("200 OK", [("Content-Length", len(req.image)), ("Accept-Ranges", "bytes")])
    if req.range is None:
        return head("200 OK", [("Content-Length", len(req.image))]) + req.image
    return partial(req)


class FakeHTTPServer(ScriptedServer):
    """The server, on an ephemeral port of ``host``, until the ``with`` block ends."""

    def __init__(
        self, image: bytes, behaviour: Behaviour = honest, host: str = "127.0.0.1"
    ) -> None:
        self.image = image
        self.behaviour = behaviour
        self.requests: list[Request] = []
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, 0), family=family)
        self.port: int = listener.getsockname()[1]
        super().__init__(listener)

    def url(self, path: str = "/disk.img") -> str:
        """``http://HOST:PORT/PATH``, an IPv6 address in brackets (``http://[::1]:PORT``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def serve(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            raw, _, buf = buf.partition(b"\r\n\r\n")
            reply = self.behaviour(self._parse(raw))
            if reply is None:
                return
            conn.sendall(reply)
            if isinstance(reply, Closing):
                return

    def _parse(self, raw: bytes) -> Request:
        first, *lines = raw.decode("latin-1").split("\r\n")
        method, target, _ = first.split(" ", 2)
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        found = re.fullmatch(r"bytes=(\d+)-(\d+)", headers.get("range", ""))
        span = None
        if found:
            span = (int(found[1]), min(int(found[2]), len(self.image) - 1))
        req = Request(method, target, headers, span, self.image)
        self.requests.append(req)
        return req
