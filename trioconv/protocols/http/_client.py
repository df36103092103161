"""A read-only HTTP(S) transport: an image on a web server, read with byte ranges.

``http://[user[:password]@]host[:port]/path`` and ``https://...`` as QEMU's curl driver
takes them. Opening sends ``HEAD`` (following redirects) to learn the size and whether
the server serves byte ranges - when the answer leaves doubt, one ``GET`` of the first
byte settles it; every read is then a ``GET`` with ``Range: bytes=FIRST-LAST``.

Reads run over a small pool of keep-alive connections (one request at a time on each:
HTTP/1.1 pipelining is not reliable across servers), so the copy engine's requests in
flight become requests in flight to the server. A plain-HTTP body is received with
``recv_into`` straight into the caller's buffer; over TLS it is decrypted into it. A
connection the server closed while idle is noticed when a request on it fails before
any answer, and that request is sent again on a new connection; any other failure, a
status other than ``206``, a ``Content-Range`` that is not the one asked for, or a
strong ``ETag`` other than the one the file had when opened (it was replaced on the
server) fails the read with a message naming the URL and the offset. When opening was
redirected and a read is then refused (a redirection, 401, 403, 404, 410: a signed URL
that expired), the redirections are followed again from the URL given - as curl does
for every request - and the read is sent once more to where they lead now. A read's
``timeout`` runs from when a connection is free for it, so reads queued behind busy
connections are not taken for a server that stalls.

Bodies are framed as RFC 9112 (6.3) says: ``Transfer-Encoding: chunked`` wins over any
``Content-Length`` (and such a connection is not reused), else ``Content-Length``, else
the body runs to the close; whatever the framing, it must hold exactly the range asked
for. A content coding (``Content-Encoding: gzip``) is refused - the ranges would be of
the encoded bytes - as is any transfer coding but chunked. Lengths must be plain
digits that fit 64 bits, and repeated ones must agree.

TLS certificates are verified against the system's trust store (``SSL_CERT_FILE`` /
``SSL_CERT_DIR`` point elsewhere); passwords never appear in messages.
"""

from __future__ import annotations

import base64
import contextlib
import errno as errno_mod
import math
import os
import re
import ssl
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from ..._errors import ImageError, TrioconvIOError, UnsupportedError
from ...driver import Caps, Driver, Extent, ExtentKind, Limits
from .._net import connection_error_reason as _reason
from .._text import peer_text
from . import _proto as proto

__all__ = ["HTTPAddress", "HTTPDriver", "is_http_uri", "open_http", "parse_http_uri"]

#: Connections to one server (at most; made as requests need them).
DEFAULT_CONNECTIONS = 8
#: Seconds allowed for connecting and the opening requests.
OPEN_TIMEOUT = 30.0
#: Seconds one ranged read may take from sending it to its last byte.
READ_TIMEOUT = 120.0
#: Redirections followed when opening.
MAX_REDIRECTS = 10
#: The largest range asked for in one request.
MAX_RANGE = 64 * 1024 * 1024
#: Error bodies up to this size are read and dropped to keep the connection.
_DRAIN_LIMIT = 64 * 1024
_RECEIVE = 256 * 1024
_HEAD_RECEIVE = 16 * 1024
#: The longest line of a chunked body accepted (a chunk size with extensions, a trailer).
_MAX_CHUNK_LINE = 4096
#: The password part of a URL's authority, left out when a URL is shown.
_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/?#@:]*):[^/?#@]*@")
_USER_AGENT = "trioconv"


def is_http_uri(location: str) -> bool:
    """True when ``location`` is an ``http://`` or ``https://`` URL."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.lower() in ("http", "https")


@attrs.frozen
class HTTPAddress:
    """Where an image is: a parsed ``http(s)://`` URL."""

    scheme: str
    host: str
    port: int
    target: str
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    #: False accepts any server certificate (QEMU's ``sslverify=off``).
    verify: bool = True
    #: Sent in a Cookie header with every request (QEMU's ``cookie``).
    cookie: str | None = attrs.field(default=None, repr=False)
    #: The credentials for the environment's proxy (QEMU's ``proxy-username`` and
    #: ``proxy-password-secret``), in place of those in the proxy's URL.
    proxy_user: str | None = None
    proxy_password: str | None = attrs.field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        """``host[:port]`` as the Host header carries it (the port only when not the
        scheme's default)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def authority_with_port(self) -> str:
        """``host:port`` always (a CONNECT request's target)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def uri(self) -> str:
        """The URL without the password."""
        user = f"{urllib.parse.quote(self.user, safe='')}@" if self.user else ""
        return f"{self.scheme}://{user}{self.authority}{self.target}"

    def auth_header(self) -> list[tuple[str, str]]:
        """The headers that carry the credentials: Authorization, Cookie."""
        headers = [("Cookie", self.cookie)] if self.cookie else []
        if self.user is None:
            return headers
        secret = f"{self.user}:{self.password or ''}".encode()
        return [("Authorization", "Basic " + base64.b64encode(secret).decode("ascii")), *headers]

    def follow(self, location: str) -> HTTPAddress:
        """The address a redirection's ``Location`` names (relative to this one);
        credentials and the cookie go along only to the same scheme, host and port (as
        curl sends them): not to another server, nor in clear text after TLS."""
        base = f"{self.scheme}://{self.authority}{self.target}"
        new = parse_http_uri(urllib.parse.urljoin(base, _location_text(location)))
        if (new.scheme, new.host, new.port) == (self.scheme, self.host, self.port):
            new = attrs.evolve(new, cookie=self.cookie)
            if new.user is None:
                new = attrs.evolve(new, user=self.user, password=self.password)
        return attrs.evolve(
            new,
            verify=self.verify,
            proxy_user=self.proxy_user,
            proxy_password=self.proxy_password,
        )


#: The bytes of a ``Location`` kept as they are: ASCII (what a URL may not hold as it is,
#: a space say, is encoded with the rest of the URL by :func:`parse_http_uri`).
_ASCII = "".join(map(chr, range(0x80)))


def _location_text(location: str) -> str:
    """A ``Location`` header's value (decoded as Latin-1, one character a byte) with
    every byte beyond ASCII percent-encoded as it is, as curl does.

    Servers send non-ASCII paths as raw UTF-8: ``/\u00c3\u00a9.img`` here is the UTF-8 of
    ``/\u00e9.img`` and becomes ``/%C3%A9.img``. Left as text, it would be encoded again
    as UTF-8 (``%C3%83%C2%A9``) and name another file."""
    return urllib.parse.quote(location.strip().encode("latin-1"), safe=_ASCII)


def parse_http_uri(uri: str) -> HTTPAddress:
    """Parse ``http(s)://[user[:password]@]host[:port]/path[?query]``.

    Raises:
        ImageError: not such a URL, or without a host.
    """
    shown = peer_text(_PASSWORD.sub(r"\1@", uri))
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise ImageError(f"Could not open '{shown}': invalid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ImageError(f"Could not open '{shown}': not an http:// or https:// URL with a host")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    target = urllib.parse.quote(target, safe="/?&=%:@!$'()*+,;~-._")
    user = urllib.parse.unquote(parts.username) if parts.username is not None else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return HTTPAddress(
        scheme,
        parts.hostname,
        port if port is not None else (443 if scheme == "https" else 80),
        target,
        user,
        password,
    )


class _ClosedByServer(Exception):
    """The server closed the connection before answering (an idle keep-alive timeout)."""


class _Connection:
    """One HTTP/1.1 connection: a request, its response head, then its body."""

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType | None) -> None:
        self.stream = stream
        self._sock = sock  # plain TCP: bodies are received straight into place
        self._parser = proto.HeadParser()
        self._rest = b""
        self.reusable = True

    async def request(self, data: bytes) -> proto.Response:
        """Send a request and receive its response head.

        Raises:
            _ClosedByServer: the connection closed before any byte of an answer.
        """
        await self.stream.send_all(data)
        received = False
        while True:
            head = self._parser.next_head()
            if head is not None:
                self._rest = self._parser.rest
                self.reusable = head.keep_alive
                return head
            # Small reads: what comes after the head is the body, which should go straight
            # into the caller's buffer, not through the head parser's copies.
            chunk = await self.stream.receive_some(_HEAD_RECEIVE)
            if not chunk:
                if not received:
                    raise _ClosedByServer
                raise TrioconvIOError("the HTTP server closed the connection in a response head")
            received = True
            self._parser.feed(chunk)

    async def receive_into(self, view: memoryview) -> None:
        """Receive exactly ``len(view)`` body bytes into ``view``."""
        pos = min(len(self._rest), view.nbytes)
        view[:pos] = self._rest[:pos]
        self._rest = self._rest[pos:]
        while pos < view.nbytes:
            if self._sock is not None:
                n = await self._sock.recv_into(view[pos:])
            else:
                chunk = await self.stream.receive_some(min(_RECEIVE, view.nbytes - pos))
                n = len(chunk)
                view[pos : pos + n] = chunk
            if not n:
                raise TrioconvIOError("the HTTP server closed the connection in a body")
            pos += n

    async def _line(self) -> bytes:
        """One line of a chunked body (a size line, a trailer), without its CRLF (or
        bare LF, as in heads)."""
        while (end := self._rest.find(b"\n")) < 0:
            if len(self._rest) > _MAX_CHUNK_LINE:
                raise proto.HTTPProtocolError("chunked body: line too long")
            chunk = await self.stream.receive_some(_HEAD_RECEIVE)
            if not chunk:
                raise TrioconvIOError("the HTTP server closed the connection in a body")
            self._rest += chunk
        line, self._rest = self._rest[:end], self._rest[end + 1 :]
        return line[:-1] if line.endswith(b"\r") else line

    async def receive_chunked_into(self, view: memoryview) -> None:
        """Receive a chunked body (RFC 9112, 7.1) of exactly ``len(view)`` bytes."""
        pos = 0
        while True:
            size = (await self._line()).split(b";", 1)[0].strip()
            if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                raise proto.HTTPProtocolError(f"invalid chunk size {peer_text(size, 40)!r}")
            n = int(size, 16)
            if not n:
                break
            if n > view.nbytes - pos:
                raise proto.HTTPProtocolError("chunked body longer than the range asked for")
            await self.receive_into(view[pos : pos + n])
            pos += n
            if await self._line():
                raise proto.HTTPProtocolError("chunk not followed by CRLF")
        trailers = 0
        while line := await self._line():
            trailers += len(line)
            if trailers > proto.MAX_HEAD:
                raise proto.HTTPProtocolError("chunked body: trailers too large")
        if pos != view.nbytes:
            raise proto.HTTPProtocolError("chunked body shorter than the range asked for")

    async def receive_until_close_into(self, view: memoryview) -> None:
        """A body without length (ended by the server closing): exactly ``len(view)``."""
        self.reusable = False
        await self.receive_into(view)
        if self._rest or await self.stream.receive_some(1):
            raise proto.HTTPProtocolError("body longer than the range asked for")

    async def receive_body_into(self, response: proto.Response, view: memoryview) -> None:
        """Receive a body of exactly ``len(view)`` bytes, framed as RFC 9112 (6.3) says:
        chunked when Transfer-Encoding says so (whatever Content-Length claims: such a
        connection is not reused), else Content-Length bytes, else up to the close.

        Raises:
            TrioconvIOError: another transfer coding than chunked.
            HTTPProtocolError: the framing does not hold exactly ``len(view)`` bytes.
        """
        coding = response.transfer_coding
        if coding is None and response.content_length is not None:
            await self.receive_into(view)
        elif coding is None:
            await self.receive_until_close_into(view)
        elif coding == "chunked":
            if response.header("content-length") is not None:
                self.reusable = False
            await self.receive_chunked_into(view)
        else:
            raise TrioconvIOError(
                f"the server sent the range with Transfer-Encoding {peer_text(coding, 40)!r} "
                "(only chunked is understood)"
            )
        if self._rest:  # bytes beyond the body: the stream is not to be trusted again
            self.reusable = False

    async def drain(self, response: proto.Response) -> None:
        """Drop a small body so the connection can be reused; else mark it spent."""
        length = response.content_length
        if response.transfer_coding is not None or length is None or length > _DRAIN_LIMIT:
            self.reusable = False
            return
        await self.receive_into(memoryview(bytearray(length)))

    async def aclose(self) -> None:
        errors = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
        with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(*errors):
            await self.stream.aclose()


def _environment_proxy(scheme: str) -> str | None:
    """The proxy URL the environment names for ``scheme``, read as curl reads it:
    ``http_proxy`` in lower case only (a web server's CGI programs find a client's
    ``Proxy:`` header in ``HTTP_PROXY``), ``https_proxy`` or ``HTTPS_PROXY``, then
    ``all_proxy`` or ``ALL_PROXY``; an empty value is as good as none."""
    names = ["http_proxy"] if scheme == "http" else [f"{scheme}_proxy", f"{scheme.upper()}_PROXY"]
    for name in (*names, "all_proxy", "ALL_PROXY"):
        if value := os.environ.get(name, "").strip():
            return value
    return None


def proxy_for(address: HTTPAddress) -> HTTPAddress | None:
    """The proxy the environment names for ``address`` (``http_proxy``, ``https_proxy``,
    ``all_proxy``, ``no_proxy``, as curl reads them), or None for a direct connection.

    Raises:
        ImageError: the proxy URL is not an ``http://`` one.
    """
    url = _environment_proxy(address.scheme)
    if not url or urllib.request.proxy_bypass(address.host):
        return None
    if "://" not in url:
        url = "http://" + url
    shown = peer_text(_PASSWORD.sub(r"\1@", url), 80)
    where = f"Could not open '{address.uri}': the proxy '{shown}'"
    if url.partition("://")[0].lower() != "http":
        raise ImageError(f"{where} is not supported (only http:// proxies are)")
    try:
        proxy = parse_http_uri(url)
    except ImageError:
        raise ImageError(f"{where} is not a valid URL") from None
    if address.proxy_user is not None:
        proxy = attrs.evolve(proxy, user=address.proxy_user, password=address.proxy_password)
    return proxy


class _Pool:
    """Keep-alive connections to one server, at most ``size`` of them - direct, or
    through an HTTP proxy: plain requests in absolute form, TLS through a CONNECT tunnel."""

    def __init__(self, address: HTTPAddress, size: int, proxy: HTTPAddress | None) -> None:
        self.address = address
        self.proxy = proxy
        self._slots = trio.Semaphore(size)
        self._idle: list[_Connection] = []
        self._closed = False  # connections in use are closed when given back
        self._tls = ssl.create_default_context() if address.tls else None
        if self._tls is not None and not address.verify:
            self._tls.check_hostname = False
            self._tls.verify_mode = ssl.CERT_NONE

    def build(self, method: str, headers: list[tuple[str, str]]) -> bytes:
        """A request for the pool's file, in the form its connections need."""
        a = self.address
        target = a.target
        if self.proxy is not None and not a.tls:
            target = f"http://{a.authority}{a.target}"  # absolute form, for the proxy
            headers = headers + _proxy_auth(self.proxy)
        return proto.build_request(method, target, a.authority, headers)

    async def _connect(self) -> _Connection:
        a = self.address
        hop = self.proxy or a
        tcp = await trio.open_tcp_stream(hop.host, hop.port)
        if self._tls is None:
            return _Connection(tcp, tcp.socket)
        try:
            if self.proxy is not None:
                await _tunnel(tcp, a, self.proxy)
            stream = trio.SSLStream(tcp, self._tls, server_hostname=a.host, https_compatible=True)
            await stream.do_handshake()
        except BaseException:
            await tcp.aclose()
            raise
        return _Connection(stream, None)

    @asynccontextmanager
    async def connection(
        self, timeout: float = math.inf
    ) -> AsyncIterator[tuple[_Connection, bool]]:
        """A connection and whether it was reused; back to the pool if still usable.

        ``timeout`` (seconds) bounds what follows once a connection is free - connecting,
        and the caller's block - but not the wait for one: a read queued behind busy
        connections has not reached the server yet, and a server that answers every
        read in time must not be taken for a stalled one (``trio.TooSlowError``).
        """
        async with self._slots:
            with trio.fail_after(timeout):
                reused = bool(self._idle)
                conn = self._idle.pop() if reused else await self._connect()
                ok = False
                try:
                    yield conn, reused
                    ok = True
                finally:
                    if ok and conn.reusable and not self._closed:
                        self._idle.append(conn)
                    else:
                        await conn.aclose()

    @asynccontextmanager
    async def exchange(
        self, request: bytes, timeout: float = math.inf
    ) -> AsyncIterator[tuple[_Connection, proto.Response]]:
        """Send ``request`` and give its connection and response head; the body is the
        caller's to receive, within ``timeout`` seconds of a connection being free
        (see :meth:`connection`). A reused connection that turns out closed before any answer
        (a server or proxy that dropped it while idle, or one that closes every connection
        after its response without saying so, as tinyproxy does), or that holds bytes
        that are no response head (what is left of a body sent where none belongs, after
        an answer to HEAD), is dropped and the next one tried, down to a new connection,
        whose failure is final. (Requests are GETs and HEADs: sending one again is
        harmless.)"""
        while True:
            async with self.connection(timeout) as (conn, reused):
                try:
                    response = await conn.request(request)
                except (
                    _ClosedByServer,
                    trio.BrokenResourceError,
                    OSError,
                    proto.HTTPProtocolError,
                ):
                    conn.reusable = False
                    if reused:
                        continue
                    raise
                try:
                    yield conn, response
                except BaseException:
                    conn.reusable = False
                    raise
                return

    async def aclose(self) -> None:
        """Close the idle connections, and those in use as they are given back."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()


def _proxy_auth(proxy: HTTPAddress) -> list[tuple[str, str]]:
    return [
        (name.replace("Authorization", "Proxy-Authorization"), value)
        for name, value in proxy.auth_header()
    ]


async def _tunnel(tcp: trio.SocketStream, address: HTTPAddress, proxy: HTTPAddress) -> None:
    """Ask the proxy for a tunnel to ``address`` (``CONNECT host:port``).

    Raises:
        TrioconvIOError: the proxy refused or closed the connection.
    """
    request = proto.build_connect(address.authority_with_port, _proxy_auth(proxy))
    await tcp.send_all(request)
    parser = proto.HeadParser()
    while (head := parser.next_head()) is None:
        chunk = await tcp.receive_some(_RECEIVE)
        if not chunk:
            raise TrioconvIOError(f"the proxy {proxy.authority} closed the connection")
        parser.feed(chunk)
    if head.status // 100 != 2:
        raise TrioconvIOError(
            f"the proxy {proxy.authority} refused a tunnel to {address.authority_with_port}: "
            f"{head.describe()}"
        )


#: Answers to a read that say the address no longer serves the file.
_STALE = (301, 302, 303, 307, 308, 401, 403, 404, 410)


class _Stale(Exception):
    """A read found the address the redirections led to no longer working."""

    def __init__(self, error: TrioconvIOError) -> None:
        super().__init__(str(error))
        self.error = error


class HTTPDriver(Driver):
    """A file on a web server, read-only. Made by :func:`open_http`."""

    name = "http"

    def __init__(
        self,
        pool: _Pool,
        address: HTTPAddress,
        size: int,
        original: str,
        etag: str | None = None,
        *,
        timeout: float = READ_TIMEOUT,
        origin: HTTPAddress | None = None,
        open_timeout: float = OPEN_TIMEOUT,
    ) -> None:
        self._pool = pool
        self._timeout = timeout
        self._address = address
        self._size = size
        self._etag = etag  # the file's strong validator when opened, if the server gave one
        self.location = original
        self._closed = False
        #: The URL given, when redirections led from it to ``address``: followed again
        #: when ``address`` stops working (see :meth:`_renew`).
        self._origin = origin
        self._open_timeout = open_timeout
        self._renewing = trio.Lock()

    @property
    def size(self) -> int:
        return self._size

    @property
    def limits(self) -> Limits:
        return Limits(max_transfer=MAX_RANGE)

    @property
    def caps(self) -> Caps:
        return Caps()

    def describe(self) -> dict[str, object]:
        a = self._address
        return {"http": {"url": a.uri, "tls": a.tls}}

    @staticmethod
    def _headers(pool: _Pool, extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
        base = [("User-Agent", _USER_AGENT), ("Accept-Encoding", "identity")]
        return base + extra + pool.address.auth_header()

    async def preadinto(self, offset: int, buf: memoryview) -> None:
        view = buf.cast("B") if buf.format != "B" else buf
        if offset < 0 or offset + view.nbytes > self._size:
            raise TrioconvIOError(
                f"error while reading {self.location} at byte {offset}: beyond the end of "
                f"the file ({self._size} bytes)",
                offset=offset,
                errno=errno_mod.EINVAL,
            )
        for pos in range(0, view.nbytes, MAX_RANGE):
            await self._read_range(offset + pos, view[pos : pos + MAX_RANGE])

    async def _read_range(self, offset: int, view: memoryview) -> None:
        if not view.nbytes:
            return
        pool = self._pool
        try:
            await self._read_range_from(pool, offset, view, renewable=self._origin is not None)
        except _Stale as stale:
            if not await self._renew(pool, offset):
                raise stale.error from None
            await self._read_range_from(self._pool, offset, view, renewable=False)

    async def _renew(self, stale: _Pool, offset: int) -> bool:
        """Follow the redirections from the URL given again, as curl (and so qemu-img)
        does for every request, once the address they led to stops working - a signed
        URL that expired, a mirror that went away. True when reads can go on at the new
        address (another read may have found it already); False when following the URL
        again did not lead to a working one.

        Raises:
            TrioconvIOError: the URL now leads to another file (size or ETag).
        """
        assert self._origin is not None
        async with self._renewing:
            if self._pool is not stale:
                return True
            where = f"Could not open '{self._origin.uri}'"
            try:
                with trio.fail_after(self._open_timeout):
                    final, pool, (size, etag) = await _resolve(self._origin, where)
            except (
                ImageError,
                TrioconvIOError,
                OSError,
                trio.BrokenResourceError,
                trio.TooSlowError,
                proto.HTTPProtocolError,
                _ClosedByServer,
            ):
                return False
            changed = None
            if size != self._size:
                changed = f"{size} bytes, {self._size} when opened"
            elif self._etag is not None and etag is not None and etag != self._etag:
                changed = f"ETag {peer_text(etag, 80)}, {peer_text(self._etag, 80)} when opened"
            if changed is not None:
                await pool.aclose()
                raise TrioconvIOError(
                    f"error while reading {self.location} at byte {offset}: following the "
                    f"URL again leads to another file: {changed}",
                    offset=offset,
                    errno=errno_mod.EIO,
                )
            self._pool, self._address = pool, final
            await stale.aclose()
            return True

    async def _read_range_from(
        self, pool: _Pool, offset: int, view: memoryview, *, renewable: bool
    ) -> None:
        """Read one range over ``pool``.

        Raises:
            _Stale: ``renewable``, and the answer says the address no longer serves the
                file (a redirection, 401, 403, 404, 410).
        """
        last = offset + view.nbytes - 1
        request = pool.build("GET", self._headers(pool, [("Range", f"bytes={offset}-{last}")]))
        try:
            async with pool.exchange(request, self._timeout) as (conn, response):
                if response.status != 206:
                    await conn.drain(response)
                    error = TrioconvIOError(
                        self._unexpected(response, offset, view),
                        offset=offset,
                        errno=errno_mod.EIO,
                    )
                    if renewable and response.status in _STALE:
                        raise _Stale(error)
                    raise error
                self._check_range(response, offset, last)
                await conn.receive_body_into(response, view)
        except TrioconvIOError as exc:
            if exc.offset is not None:
                raise
            raise TrioconvIOError(
                f"error while reading {self.location} at byte {offset}: {exc}",
                offset=offset,
                errno=errno_mod.EIO,
            ) from exc
        except trio.TooSlowError:
            raise TrioconvIOError(
                f"error while reading {self.location} at byte {offset}: the HTTP server did "
                f"not answer in {self._timeout:.0f} s",
                offset=offset,
                errno=errno_mod.ETIMEDOUT,
            ) from None
        except (_ClosedByServer, trio.BrokenResourceError, OSError, proto.HTTPProtocolError) as exc:
            if isinstance(exc, _ClosedByServer):
                reason = "the HTTP server closed the connection"
            elif isinstance(exc, proto.HTTPProtocolError):
                reason = f"invalid reply from the HTTP server: {exc}"
            else:
                reason = f"connection to the HTTP server failed: {_reason(exc)}"
            raise TrioconvIOError(
                f"error while reading {self.location} at byte {offset}: {reason}",
                offset=offset,
                errno=errno_mod.EIO,
            ) from exc

    def _unexpected(self, response: proto.Response, offset: int, view: memoryview) -> str:
        what = f"error while reading {self.location} at byte {offset}"
        if response.status == 200:
            return f"{what}: the server ignored the byte range and sent the whole file"
        if response.status == 416:  # a range beyond the end: ``Content-Range: bytes */SIZE``
            value = response.header("content-range")
            with contextlib.suppress(proto.HTTPProtocolError):
                total = proto.parse_content_range(value)[2] if value else None
                if total is not None and total != self._size:
                    return (
                        f"{what}: the file changed size on the server: {total} bytes, "
                        f"{self._size} when opened"
                    )
        return f"{what}: {response.describe()}"

    def _check_range(self, response: proto.Response, first: int, last: int) -> None:
        value = response.header("content-range")
        if value is None:
            raise TrioconvIOError("206 response without Content-Range")
        start, stop, total = proto.parse_content_range(value)
        if (start, stop) != (first, last):
            raise TrioconvIOError(
                f"the server sent range {peer_text(value, 80)!r} for bytes={first}-{last}"
            )
        length = response.content_length if response.transfer_coding is None else None
        if length is not None and length != last - first + 1:
            raise TrioconvIOError(
                f"the server sent {length} bytes (Content-Length) for bytes={first}-{last}"
            )
        if response.content_coding is not None:
            raise TrioconvIOError(
                f"the server sent the range with Content-Encoding "
                f"{peer_text(response.content_coding, 40)!r} (identity was asked for)"
            )
        if total is not None and total != self._size:
            raise TrioconvIOError(
                f"the file changed size on the server: {total} bytes, {self._size} when opened"
            )
        etag = _strong_etag(response)
        if self._etag is not None and etag is not None and etag != self._etag:
            raise TrioconvIOError(
                f"the file changed on the server: ETag {peer_text(etag, 80)}, "
                f"{peer_text(self._etag, 80)} when opened"
            )

    async def block_status(self, offset: int, length: int) -> Extent:
        return Extent(offset, min(length, self._size - offset), ExtentKind.DATA)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._pool.aclose()


def _strong_etag(response: proto.Response) -> str | None:
    """The response's ETag when it is a strong one (``W/`` tags may match changed bytes)."""
    tag = response.header("etag")
    return tag if tag and not tag.startswith("W/") else None


def _head_headers(address: HTTPAddress) -> list[tuple[str, str]]:
    return [("User-Agent", _USER_AGENT), ("Accept-Encoding", "identity"), *address.auth_header()]


_REDIRECTIONS = (301, 302, 303, 307, 308)


class _Redirected(Exception):
    """The one-byte ``GET`` of :func:`_probe_size` was redirected to ``location``."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


def _location(response: proto.Response, where: str) -> str:
    location = response.header("location")
    if not location:
        raise ImageError(f"{where}: {response.describe()} without a Location")
    return location


async def _probe_size(
    pool: _Pool, address: HTTPAddress, where: str, response: proto.Response
) -> tuple[int, str | None]:
    """From the answer to HEAD, and when that leaves doubt a one-byte GET: the size and
    the strong ETag (a read whose reply carries another one finds the file changed);
    ranges must work.

    Raises:
        _Redirected: the GET was redirected (a server that refuses HEAD may redirect
            GET, as curl would follow it).
    """
    headers = _head_headers(address)
    if response.status == 200 and response.content_coding is not None:
        raise ImageError(
            f"{where}: the server sends the file with Content-Encoding "
            f"{peer_text(response.content_coding, 40)!r} (identity was asked for)"
        )
    if response.status == 200 and response.accepts_ranges:
        length = response.content_length
        if length is not None:
            return length, _strong_etag(response)
    elif response.status not in (200, 405, 501):
        raise ImageError(f"{where}: {response.describe()}")
    probe = pool.build("GET", [*headers, ("Range", "bytes=0-0")])
    async with pool.exchange(probe) as (conn, response):
        if response.status == 206:
            value = response.header("content-range")
            total = proto.parse_content_range(value)[2] if value else None
            if total is None:
                raise ImageError(f"{where}: the server does not say how large the file is")
            if response.transfer_coding is None and response.content_length == 1:
                await conn.receive_into(memoryview(bytearray(1)))
            else:
                conn.reusable = False  # not read: the connection is not used again
            return total, _strong_etag(response)
        if response.status in _REDIRECTIONS:
            await conn.drain(response)
            raise _Redirected(_location(response, where))
        conn.reusable = False
        if response.status == 416:  # an empty file has no byte 0
            value = response.header("content-range")
            total = proto.parse_content_range(value)[2] if value else None
            if total == 0:
                return 0, None
        if response.status == 200:
            raise ImageError(
                f"{where}: the server does not support byte ranges (it answers a range "
                "request with the whole file)"
            )
        raise ImageError(f"{where}: {response.describe()}")


async def _resolve(
    address: HTTPAddress, where: str
) -> tuple[HTTPAddress, _Pool, tuple[int, str | None]]:
    """Follow redirections from ``address``; the final address, its pool, the size and
    the strong ETag."""
    for _ in range(MAX_REDIRECTS + 1):
        pool = _Pool(address, DEFAULT_CONNECTIONS, proxy_for(address))
        try:
            head = pool.build("HEAD", _head_headers(address))
            async with pool.exchange(head) as (_conn, response):
                pass
            if response.status in _REDIRECTIONS:
                location = _location(response, where)
            else:
                try:
                    return address, pool, await _probe_size(pool, address, where, response)
                except _Redirected as redirected:
                    location = redirected.location
            await pool.aclose()
            address = address.follow(location)
        except BaseException:
            await pool.aclose()
            raise
    raise ImageError(f"{where}: redirected more than {MAX_REDIRECTS} times")


def _tls_reason(exc: BaseException) -> str | None:
    """What went wrong in TLS, when that is what failed (trio wraps it)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"TLS: the server's certificate could not be verified ({seen.verify_message})"
        if isinstance(seen, ssl.SSLError):
            return f"TLS: {seen.reason or seen}"
        seen = seen.__cause__ or seen.__context__
    return None


@asynccontextmanager
async def open_http(
    uri: str,
    *,
    writable: bool = False,
    verify: bool = True,
    timeout: float | None = None,
    cookie: str | None = None,
    proxy_user: str | None = None,
    proxy_password: str | None = None,
) -> AsyncIterator[HTTPDriver]:
    """Open a file on a web server for reading, as a driver.

    ``verify=False`` accepts any certificate from an ``https://`` server (QEMU's
    ``sslverify=off``, for a server with a self-made certificate). ``timeout`` (QEMU's
    ``timeout`` option) bounds, in seconds, opening and each ranged read; by default
    opening may take :data:`OPEN_TIMEOUT` and a read :data:`READ_TIMEOUT`. ``cookie``
    (QEMU's ``cookie``) goes in a Cookie header with every request to the server;
    ``proxy_user`` and ``proxy_password`` log in to the proxy the environment names
    (``http_proxy``, ...), in place of credentials in its URL.

    Raises:
        UnsupportedError: ``writable``: HTTP sources are read-only.
        ImageError: the server cannot be reached, answers with an error, or does not
            serve byte ranges.
    """
    address = attrs.evolve(
        parse_http_uri(uri),
        verify=verify,
        cookie=cookie,
        proxy_user=proxy_user,
        proxy_password=proxy_password,
    )
    where = f"Could not open '{address.uri}'"
    if writable:
        raise UnsupportedError(f"{where}: HTTP images are read-only")
    try:
        with trio.fail_after(OPEN_TIMEOUT if timeout is None else timeout):
            final, pool, (size, etag) = await _resolve(address, where)
    except trio.TooSlowError:
        raise ImageError(f"{where}: the server did not answer in time") from None
    except _ClosedByServer:
        raise ImageError(f"{where}: the HTTP server closed the connection") from None
    except (OSError, trio.BrokenResourceError, proto.HTTPProtocolError, TrioconvIOError) as exc:
        raise ImageError(f"{where}: {_tls_reason(exc) or _reason(exc)}") from None
    driver = HTTPDriver(
        pool,
        final,
        size,
        address.uri,
        etag,
        timeout=READ_TIMEOUT if timeout is None else timeout,
        origin=address if final != address else None,
        open_timeout=OPEN_TIMEOUT if timeout is None else timeout,
    )
    try:
        yield driver
    finally:
        await driver.aclose()
