"""The nginx fixture of tests/http_server.py behaves like the web servers clients meet.

Only the standard library talks to it here (``http.client``, ``urllib.request``, ``ssl``),
so a failure points at the fixture, not at an HTTP client under test.
"""

from __future__ import annotations

import base64
import http.client
import os
import socket
import ssl
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from . import http_server as _http
from .http_server import AUTH_PASSWORD, AUTH_USER, HTTPServer, HTTPServerLauncher, TLSCerts
from .nbd_servers import _free_port

KiB = 1024
NAME = "disk.img"
DATA = os.urandom(64 * KiB)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A document root holding :data:`NAME` with :data:`DATA`."""
    www = tmp_path / "www"
    www.mkdir()
    (www / NAME).write_bytes(DATA)
    return www


def connect(
    server: HTTPServer, context: ssl.SSLContext | None = None
) -> http.client.HTTPConnection:
    """An ``http.client`` connection to ``server`` (HTTPS if it has TLS)."""
    address = urlsplit(server.base_url)
    assert address.hostname is not None
    if server.tls is not None:
        return http.client.HTTPSConnection(
            address.hostname, server.port, timeout=10, context=context
        )
    return http.client.HTTPConnection(address.hostname, server.port, timeout=10)


def get(
    server: HTTPServer, path: str, headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    """One request on a fresh connection: the response (headers) and its whole body."""
    conn = connect(server)
    try:
        conn.request("GET", urlsplit(server.url(path)).path, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def test_serves_the_whole_file(http_server: HTTPServerLauncher, root: Path) -> None:
    server = http_server(root)
    assert server.url(NAME) == f"http://127.0.0.1:{server.port}/{NAME}"
    with urllib.request.urlopen(server.url(NAME), timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(DATA))
        assert response.headers["Accept-Ranges"] == "bytes"
        assert response.read() == DATA


def test_range_request_gets_206(http_server: HTTPServerLauncher, root: Path) -> None:
    server = http_server(root)
    response, body = get(server, NAME, {"Range": "bytes=10-19"})
    assert response.status == 206, server.log_text()
    assert response.headers["Content-Range"] == f"bytes 10-19/{len(DATA)}"
    assert body == DATA[10:20]


def test_missing_file_is_404(http_server: HTTPServerLauncher, root: Path) -> None:
    response, _ = get(http_server(root), "nothing-here.img")
    assert response.status == 404


def test_keep_alive_serves_two_requests_on_one_connection(
    http_server: HTTPServerLauncher, root: Path
) -> None:
    server = http_server(root)
    conn = connect(server)
    try:
        conn.request("GET", f"/{NAME}", headers={"Range": "bytes=0-99"})
        first = conn.getresponse()
        assert first.read() == DATA[:100]
        assert first.getheader("Connection", "keep-alive").lower() == "keep-alive"
        assert conn.sock is not None
        local = conn.sock.getsockname()
        conn.request("GET", f"/{NAME}", headers={"Range": "bytes=100-199"})
        second = conn.getresponse()
        assert second.read() == DATA[100:200]
        assert conn.sock is not None
        assert conn.sock.getsockname() == local  # the same TCP connection
    finally:
        conn.close()


def test_ranges_false_ignores_range(http_server: HTTPServerLauncher, root: Path) -> None:
    server = http_server(root, ranges=False)
    response, body = get(server, NAME, {"Range": "bytes=10-19"})
    assert response.status == 200
    assert response.headers["Content-Range"] is None
    assert body == DATA


def test_redirect_points_at_the_file(http_server: HTTPServerLauncher, root: Path) -> None:
    server = http_server(root)
    response, _ = get(server, f"redirect/{NAME}")
    assert response.status == 302
    assert response.headers["Location"].endswith(f"/{NAME}")
    # urllib follows it and gets the file.
    with urllib.request.urlopen(server.url(f"redirect/{NAME}"), timeout=10) as followed:
        assert followed.url == server.url(NAME)
        assert followed.read() == DATA


def test_private_needs_basic_auth(http_server: HTTPServerLauncher, root: Path) -> None:
    server = http_server(root)
    response, _ = get(server, f"private/{NAME}")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")

    wrong = base64.b64encode(f"{AUTH_USER}:nope".encode()).decode()
    response, _ = get(server, f"private/{NAME}", {"Authorization": f"Basic {wrong}"})
    assert response.status == 401

    token = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    response, body = get(
        server, f"private/{NAME}", {"Authorization": f"Basic {token}", "Range": "bytes=5-9"}
    )
    assert response.status == 206, server.log_text()
    assert body == DATA[5:10]


def test_tls_verified_with_the_test_ca(
    http_server: HTTPServerLauncher, root: Path, http_tls_certs: TLSCerts
) -> None:
    server = http_server(root, tls=http_tls_certs)
    assert server.url(NAME) == f"https://localhost:{server.port}/{NAME}"
    context = ssl.create_default_context(cafile=http_tls_certs.ca_cert)
    with urllib.request.urlopen(server.url(NAME), timeout=10, context=context) as response:
        assert response.read() == DATA
    conn = connect(server, context)
    try:
        conn.request("GET", f"/{NAME}", headers={"Range": "bytes=10-19"})
        response = conn.getresponse()
        assert response.status == 206
        assert response.read() == DATA[10:20]
    finally:
        conn.close()


def test_tls_rejected_without_the_test_ca(
    http_server: HTTPServerLauncher, root: Path, http_tls_certs: TLSCerts
) -> None:
    server = http_server(root, tls=http_tls_certs)
    conn = connect(server, ssl.create_default_context())
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            conn.request("GET", f"/{NAME}")
    finally:
        conn.close()


def test_stop_refuses_and_start_serves_again(http_server: HTTPServerLauncher, root: Path) -> None:
    server = http_server(root)
    port = server.port
    server.stop()
    server.stop()  # idempotent
    assert not server.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    server.start()
    assert server.port == port
    response, body = get(server, NAME)
    assert response.status == 200
    assert body == DATA
    server.stop(kill=True)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_access_log_records_range(http_server: HTTPServerLauncher, root: Path) -> None:
    server = http_server(root)
    get(server, NAME, {"Range": "bytes=10-19"})
    get(server, NAME)
    get(server, f"private/{NAME}")
    lines = server.access_log(wait_for=3)
    assert len(lines) == 3, lines
    assert lines[0] == f"GET /{NAME} 206 bytes=10-19 10"
    assert lines[1] == f"GET /{NAME} 200 - {len(DATA)}"
    assert lines[2].startswith(f"GET /private/{NAME} 401 - "), lines


def test_extra_goes_into_the_server_block(http_server: HTTPServerLauncher, root: Path) -> None:
    server = http_server(root, extra='location = /hello { return 200 "hi"; }')
    response, body = get(server, "hello")
    assert response.status == 200
    assert body == b"hi"


def test_bad_extra_raises_with_the_log(tmp_path: Path, root: Path) -> None:
    with pytest.raises(RuntimeError, match="unknown directive"):
        _http.start_nginx(tmp_path / "nginx", root, extra="no_such_directive on;")


def test_port_taken_meanwhile_retries_on_another(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        monkeypatch.setattr(_http, "_free_port", lambda: next(ports, None) or _free_port())
        server = _http.start_nginx(tmp_path / "nginx", root)
        try:
            assert server.port != taken
            assert "Address already in use" in server.log_text()
            response, body = get(server, NAME)
            assert (response.status, body) == (200, DATA)
        finally:
            server.stop()


def test_stop_cuts_a_response_short(http_server: HTTPServerLauncher, root: Path) -> None:
    big = root / "big.img"
    big.write_bytes(os.urandom(1024 * KiB))
    server = http_server(root, extra=f"location /slow/ {{ limit_rate 16k; alias {root}/; }}")
    conn = connect(server)
    try:
        conn.request("GET", "/slow/big.img")
        response = conn.getresponse()
        assert response.status == 200
        assert len(response.read(KiB)) == KiB
        server.stop()
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    finally:
        conn.close()
