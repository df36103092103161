"""HTTP/1.1 for byte-range reads, without I/O: requests out, response heads in.

A disk image on a web server is read with ``GET`` requests that carry a ``Range:
bytes=FIRST-LAST`` header (RFC 9110, section 14). A server that supports ranges answers
``206 Partial Content`` with a ``Content-Range: bytes FIRST-LAST/TOTAL`` header and
exactly those bytes; one that does not answers ``200 OK`` with the whole file, which a
reader of a large image must refuse rather than download.

Only what that needs is here: :func:`build_request` makes a request's bytes,
:class:`HeadParser` finds the end of a response head in the bytes received so far and
decodes it into a :class:`Response`, and :func:`parse_content_range` reads the range the
server sent. Bodies are not parsed here: a range body has a ``Content-Length`` and the
client receives it straight into the caller's buffer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import attrs

from .._text import peer_text

__all__ = [
    "MAX_HEAD",
    "HTTPProtocolError",
    "HeadParser",
    "Response",
    "build_connect",
    "build_request",
    "parse_content_range",
]

#: The largest response head accepted (status line and headers).
MAX_HEAD = 64 * 1024

_STATUS_LINE = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?: (.*))?")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CONTENT_RANGE = re.compile(
    r"bytes\s+(?:([0-9]{1,19})-([0-9]{1,19})|\*)/([0-9]{1,19}|\*)\s*", re.IGNORECASE | re.ASCII
)
#: The blank line that ends a head. RFC 9112 (2.2) lets a recipient take a bare LF as a
#: line end, as curl and most clients do.
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")
#: A Content-Length value: ASCII digits, no more than fit an int64 (int() takes more).
_LENGTH = re.compile(r"[0-9]{1,19}", re.ASCII)


class HTTPProtocolError(ValueError):
    """The server's bytes are not a response this client can read."""


@attrs.frozen
class Response:
    """A response head.

    Attributes:
        version: ``(1, 1)`` for HTTP/1.1.
        status: the status code, e.g. 206.
        reason: the reason phrase, e.g. ``"Partial Content"`` (may be empty).
        headers: header values by lower-case name; repeated headers joined with ``", "``.
    """

    version: tuple[int, int]
    status: int
    reason: str
    headers: Mapping[str, str]

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def content_length(self) -> int | None:
        """The body's length, or None when the head does not give one."""
        value = self.header("content-length")
        if value is None:
            return None
        values = {v.strip() for v in value.split(",")}  # repeated identical values are allowed
        if len(values) != 1 or not _LENGTH.fullmatch(first := values.pop()):
            raise HTTPProtocolError(f"invalid Content-Length {peer_text(value, 60)!r}")
        return int(first)

    @property
    def transfer_coding(self) -> str | None:
        """The Transfer-Encoding header (lower case), or None when the body is sent as is."""
        coding = self.header("transfer-encoding")
        return coding.strip().lower() if coding is not None else None

    @property
    def content_coding(self) -> str | None:
        """The Content-Encoding other than ``identity``, or None."""
        coding = (self.header("content-encoding") or "").strip().lower()
        return coding if coding not in ("", "identity") else None

    @property
    def keep_alive(self) -> bool:
        """Whether the connection can carry another request after this response."""
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if "close" in tokens:
            return False
        return self.version >= (1, 1) or "keep-alive" in tokens

    @property
    def accepts_ranges(self) -> bool:
        value = self.header("accept-ranges")
        return value is not None and "bytes" in value.lower()

    def describe(self) -> str:
        """``HTTP 404 Not Found``: the status for messages."""
        return f"HTTP {self.status}{' ' + self.reason if self.reason else ''}"


def build_request(
    method: str, target: str, host: str, headers: Iterable[tuple[str, str]] = ()
) -> bytes:
    """The bytes of one request without a body.

    ``target`` is the path and query (``/images/disk.img?x=1``), ``host`` the Host
    header's value (``example.com`` or ``example.com:8080``).
    """
    absolute = target.startswith(("http://", "https://"))  # for a proxy
    if not (target.startswith("/") or absolute) or any(c in target for c in " \r\n"):
        raise ValueError(f"invalid request target {target!r}")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or any(c in value for c in "\r\n"):
            raise ValueError(f"invalid header {name!r}")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def build_connect(authority: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A ``CONNECT host:port`` request: a proxy's tunnel to a TLS server."""
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class HeadParser:
    """Finds and decodes a response head in the bytes received so far.

    Feed it bytes with :meth:`feed`; :meth:`next_head` returns the head once the blank
    line that ends it has arrived, and :attr:`rest` holds what came after it (the start
    of the body). Interim ``1xx`` responses are skipped.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.rest = b""

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    def next_head(self) -> Response | None:
        """The response head, or None if more bytes are needed.

        Raises:
            HTTPProtocolError: the head is malformed or larger than :data:`MAX_HEAD`.
        """
        while True:
            end = _HEAD_END.search(self._buf)
            if end is None:
                if len(self._buf) > MAX_HEAD:
                    raise HTTPProtocolError(f"response head larger than {MAX_HEAD} bytes")
                return None
            head = bytes(self._buf[: end.start()])
            del self._buf[: end.end()]
            response = _parse_head(head)
            if 100 <= response.status < 200:
                continue  # 100 Continue and friends: the real response follows
            self.rest = bytes(self._buf)
            self._buf.clear()
            return response


def _parse_head(head: bytes) -> Response:
    lines = _LINE_END.split(head)
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        shown = peer_text(lines[0][:80].decode("latin-1"), 60)
        raise HTTPProtocolError(f"not an HTTP response: {shown!r}")
    major, minor, status, reason = match.groups()
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        if raw[:1] in (b" ", b"\t"):
            raise HTTPProtocolError("folded header lines are not allowed")
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HTTPProtocolError(f"malformed header line {raw[:80]!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return Response(
        (int(major), int(minor)),
        int(status),
        peer_text((reason or b"").decode("latin-1"), 100),  # (shown in messages)
        headers,
    )


def parse_content_range(value: str) -> tuple[int | None, int | None, int | None]:
    """``bytes FIRST-LAST/TOTAL`` as ``(first, last, total)``; None for ``*`` parts.

    Raises:
        HTTPProtocolError: not a byte range.
    """
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        raise HTTPProtocolError(f"invalid Content-Range {peer_text(value, 60)!r}")
    first, last, total = match.groups()
    return (
        int(first) if first is not None else None,
        int(last) if last is not None else None,
        int(total) if total != "*" else None,
    )
