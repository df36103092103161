"""HTTP/1.1 for byte ranges without sockets: request bytes, response heads, Content-Range."""

from __future__ import annotations

import pytest

from trioconv.protocols.http import parse_http_uri
from trioconv.protocols.http._client import proxy_for
from trioconv.protocols.http._proto import (
    MAX_HEAD,
    HeadParser,
    HTTPProtocolError,
    build_connect,
    build_request,
    parse_content_range,
)


def test_request_bytes() -> None:
    data = build_request("GET", "/d/disk.img?x=1", "example.com:8080", [("Range", "bytes=0-9")])
    assert data == (
        b"GET /d/disk.img?x=1 HTTP/1.1\r\nHost: example.com:8080\r\nRange: bytes=0-9\r\n\r\n"
    )
    for target, headers in (("no-slash", []), ("/a b", []), ("/", [("X", "a\r\nB: c")])):
        with pytest.raises(ValueError, match="invalid"):
            build_request("GET", target, "h", headers)


def test_head_arrives_in_pieces_and_the_body_starts_after_it() -> None:
    parser = HeadParser()
    raw = (
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 10-19/100\r\n"
        b"Content-Length: 10\r\nAccept-Ranges: bytes\r\nX-A: 1\r\nx-a: 2\r\n\r\n0123"
    )
    end = raw.index(b"\r\n\r\n") + 4
    for i in range(end - 1):  # a byte at a time: no head until its blank line is in
        parser.feed(raw[i : i + 1])
        assert parser.next_head() is None
    parser.feed(raw[end - 1 :])
    head = parser.next_head()
    assert head is not None
    assert (head.version, head.status, head.reason) == ((1, 1), 206, "Partial Content")
    assert head.content_length == 10 and head.accepts_ranges and head.keep_alive
    assert head.header("x-a") == "1, 2"
    assert parser.rest == b"0123"
    assert head.describe() == "HTTP 206 Partial Content"


def test_reason_phrase_is_printable() -> None:
    """The reason phrase goes into error messages: control bytes escaped, cut short."""
    parser = HeadParser()
    parser.feed(b"HTTP/1.1 500 Bad\x1b[2J\rthing" + b"x" * 300 + b"\r\nContent-Length: 0\r\n\r\n")
    head = parser.next_head()
    assert head is not None
    assert head.reason.startswith("Bad\\x1b[2J\\rthingxx") and len(head.reason) <= 100
    assert head.reason.isprintable()


def test_interim_responses_are_skipped() -> None:
    parser = HeadParser()
    parser.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n")
    head = parser.next_head()
    assert head is not None and head.status == 404 and not head.keep_alive


def test_http_1_0_keep_alive() -> None:
    parser = HeadParser()
    parser.feed(b"HTTP/1.0 200 OK\r\n\r\n")
    head = parser.next_head()
    assert head is not None and not head.keep_alive
    parser.feed(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n")
    head = parser.next_head()
    assert head is not None and head.keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
    ],
)
def test_malformed_heads(raw: bytes) -> None:
    def decode() -> object:
        parser = HeadParser()
        parser.feed(raw)
        head = parser.next_head()
        assert head is not None
        return head.content_length

    with pytest.raises(HTTPProtocolError):
        decode()


def test_head_size_is_bounded() -> None:
    parser = HeadParser()
    parser.feed(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (MAX_HEAD // 6 + 1))
    with pytest.raises(HTTPProtocolError, match="larger than"):
        parser.next_head()


def test_content_range() -> None:
    assert parse_content_range("bytes 0-0/1234") == (0, 0, 1234)
    assert parse_content_range("bytes 5-9/*") == (5, 9, None)
    assert parse_content_range("bytes */1234") == (None, None, 1234)
    for bad in ("bytes 1-2", "items 0-1/2", "bytes a-b/c"):
        with pytest.raises(HTTPProtocolError):
            parse_content_range(bad)


def test_urls() -> None:
    a = parse_http_uri("https://alice:p%40ss@example.com/img/d%20isk.qcow2?sig=1")
    assert (a.scheme, a.host, a.port, a.user, a.password) == (
        "https",
        "example.com",
        443,
        "alice",
        "p@ss",
    )
    assert a.target == "/img/d%20isk.qcow2?sig=1"
    assert a.uri == "https://alice@example.com/img/d%20isk.qcow2?sig=1"  # no password
    assert a.auth_header() == [("Authorization", "Basic YWxpY2U6cEBzcw==")]
    b = parse_http_uri("http://[::1]:8080/x")
    assert (b.host, b.port, b.authority) == ("::1", 8080, "[::1]:8080")
    moved = a.follow("/other/place")
    assert moved.target == "/other/place" and moved.password == "p@ss"
    away = a.follow("http://elsewhere.example/x")
    assert away.host == "elsewhere.example" and away.user is None


def test_proxy_forms() -> None:
    assert build_request("GET", "http://h:8080/d.img", "h:8080").startswith(
        b"GET http://h:8080/d.img HTTP/1.1\r\nHost: h:8080\r\n"
    )
    assert build_connect("h:443", [("Proxy-Authorization", "Basic eA==")]) == (
        b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\nProxy-Authorization: Basic eA==\r\n\r\n"
    )


def test_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    plain = parse_http_uri("http://images.example/d.img")
    secure = parse_http_uri("https://images.example/d.img")
    assert proxy_for(plain) is None
    monkeypatch.setenv("http_proxy", "proxy.example:3128")
    found = proxy_for(plain)
    assert found is not None and (found.host, found.port) == ("proxy.example", 3128)
    assert proxy_for(secure) is None  # https_proxy is separate, as in curl
    monkeypatch.setenv("https_proxy", "http://u:p@proxy.example:8080")
    found = proxy_for(secure)
    assert found is not None and found.user == "u" and found.port == 8080
    monkeypatch.delenv("http_proxy")
    monkeypatch.setenv("all_proxy", "http://fallback.example:1080")
    found = proxy_for(plain)
    assert found is not None and found.host == "fallback.example"
    monkeypatch.setenv("no_proxy", ".example")
    assert proxy_for(plain) is None and proxy_for(secure) is None
