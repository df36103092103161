"""A real HTTP server for tests: nginx serving a directory, with byte ranges, TLS and auth.

nginx is what HTTP clients meet in the wild, so the tests of an HTTP client talk to it
rather than to a hand-written mock: it answers ``Range`` requests with ``206 Partial
Content`` the way real servers do, keeps connections alive, and speaks TLS.

Every server runs in the foreground as a single process (``daemon off; master_process
off``), listens on a free port of 127.0.0.1, keeps its configuration, logs and temporary
directories in its own work directory, and is only handed out once nginx itself holds
the listening socket (checked in ``/proc``: a connect alone could reach another process
that grabbed the port) and a TCP connect succeeds. It runs under ``setpriv --pdeathsig
KILL`` when available, so it dies with pytest even if pytest itself is killed (that
signal follows the *thread* that started it: start servers from the test's own thread,
not from ``trio.to_thread.run_sync``).

What a server offers, for a file ``NAME`` in the document root:

``/NAME``
    The file, with ``Range`` support (``206``, ``Content-Range: bytes A-B/SIZE``), or,
    with ``ranges=False``, always the whole file with ``200`` (``max_ranges 0``), like a
    server that ignores ``Range``.
``/redirect/NAME``
    ``302 Found`` with ``Location: http://127.0.0.1:PORT/NAME`` (``https://`` with TLS).
``/private/NAME``
    The same file behind HTTP Basic authentication: ``401`` without credentials, the
    file with user :data:`AUTH_USER` and password :data:`AUTH_PASSWORD`.

The fixture is a factory::

    def test_read(http_server: HTTPServerLauncher, tmp_path: Path) -> None:
        root = tmp_path / "www"
        root.mkdir()
        (root / "disk.img").write_bytes(b"x" * 4096)
        server = http_server(root)
        server.url("disk.img")   # 'http://127.0.0.1:PORT/disk.img'
        ...
        server.access_log()      # ['GET /disk.img 206 bytes=0-511 512', ...]
        server.stop()            # the server goes away (kill=True: SIGKILL) ...
        server.start()           # ... and comes back on the same port

With TLS (``http_server(root, tls=http_tls_certs)``) the URLs are
``https://localhost:PORT/NAME``; a client verifies them with
``ssl.create_default_context(cafile=http_tls_certs.ca_cert)``.

``tests/conftest.py`` does not register this module as a plugin, so a test module binds
the fixtures itself::

    from . import http_server as _http

    http_server = _http.http_server
    http_tls_certs = _http.http_tls_certs

(an assignment, not ``from .http_server import http_server``: ruff reports an imported
name that a test function's argument shadows as F811). Outside fixtures,
:func:`start_nginx` returns a running :class:`HTTPServer` that the caller must stop.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import IN_CI, require_tool
from .nbd_servers import (
    LOCALHOST,
    TLS_HOSTNAME,
    TLSCerts,
    _free_port,
    _Launcher,
    _pdeathsig_prefix,
)
from .nbd_servers import make_tls_certs as _make_tls_certs

__all__ = [
    "AUTH_PASSWORD",
    "AUTH_USER",
    "ACCESS_LOG_FORMAT",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "HTTPServer",
    "HTTPServerLauncher",
    "TLSCerts",
    "http_server",
    "http_tls_certs",
    "require_nginx",
    "start_nginx",
]

START_TIMEOUT = 10.0
"""Seconds nginx may take to accept TCP connections before starting it fails."""

STOP_TIMEOUT = 5.0
"""Seconds between SIGTERM and SIGKILL when stopping nginx."""

AUTH_USER = "alice"
"""The one user ``/private/`` lets in."""

AUTH_PASSWORD = "s3cret"
""":data:`AUTH_USER`'s password."""

ACCESS_LOG_FORMAT = "$request_method $uri $status $http_range $body_bytes_sent"
"""One access-log line per request, e.g. ``GET /disk.img 206 bytes=10-19 10``.

nginx writes ``-`` for an empty variable: a request without ``Range`` logs
``GET /disk.img 200 - 4096``. ``$uri`` is the path after nginx normalised it (no query
string); ``$body_bytes_sent`` counts the body only, without headers.
"""

_NGINX_PATHS = ("nginx", "/usr/sbin/nginx")
_PORT_ATTEMPTS = 5
_counter = itertools.count(1)


def require_nginx() -> str:
    """Return the path of nginx; skip (or fail under ``CI=true``) when it is missing.

    Like :func:`tests.conftest.require_tool`, but also looks in ``/usr/sbin``, which is
    not on a normal user's ``PATH``, and names the right Debian package.
    """
    for candidate in _NGINX_PATHS:
        path = shutil.which(candidate)
        if path is not None:
            return path
    message = "nginx is not installed (Debian: apt-get install nginx-light)"
    if IN_CI:
        pytest.fail(f"CI=true and {message}")
    pytest.skip(message)


def _quote(value: str | Path) -> str:
    """A double-quoted nginx configuration string (a path may hold spaces or ``;``)."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _write_htpasswd(path: Path) -> None:
    """An htpasswd file for :data:`AUTH_USER`, with an Apache MD5 (``$apr1$``) hash.

    nginx reads crypt(3), ``{SHA}``, ``{SSHA}`` and ``$apr1$`` hashes but not plain text;
    ``openssl passwd -apr1`` makes one without Python's ``crypt`` module (deprecated,
    gone in 3.13).
    """
    openssl = require_tool("openssl")
    result = subprocess.run(
        [openssl, "passwd", "-apr1", AUTH_PASSWORD],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl passwd -apr1 failed:\n{result.stderr}")
    path.write_text(f"{AUTH_USER}:{result.stdout.strip()}\n")


def _config(
    workdir: Path, root: Path, port: int, tls: TLSCerts | None, ranges: bool, extra: str
) -> str:
    """The whole ``nginx.conf``: one process, everything it writes kept in ``workdir``.

    nginx's compiled-in defaults put temporary files, logs and the pid file under
    ``/var/lib/nginx`` and ``/var/log/nginx``, which a test may not be allowed to write;
    every one of them is redirected here.
    """
    w = workdir
    temp_paths = "\n".join(
        f"    {kind}_temp_path {_quote(w / 'temp' / kind)};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    listen = f"{LOCALHOST}:{port}" + (" ssl" if tls is not None else "")
    server_options = []
    if tls is not None:
        server_options += [
            f"ssl_certificate {_quote(tls.server_dir / 'server-cert.pem')};",
            f"ssl_certificate_key {_quote(tls.server_dir / 'server-key.pem')};",
        ]
    if not ranges:
        server_options.append("max_ranges 0;")
    options = "".join(f"        {line}\n" for line in server_options)
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {_quote(w / "nginx.pid")};
error_log {_quote(w / "error.log")} info;

events {{
    worker_connections 256;
}}

http {{
    log_format fmt '{ACCESS_LOG_FORMAT}';
    access_log {_quote(w / "access.log")} fmt;
{temp_paths}
    keepalive_requests 1000;
    sendfile on;
    default_type application/octet-stream;

    server {{
        listen {listen};
        server_name localhost;
        root {_quote(root)};
{options}
        location /redirect/ {{
            rewrite ^/redirect/(.*)$ /$1 redirect;
        }}

        location /private/ {{
            auth_basic "t";
            auth_basic_user_file {_quote(w / "htpasswd")};
            alias {_quote(str(root) + "/")};
        }}
{extra}
    }}
}}
"""


def _listens(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a socket listening on 127.0.0.1:``port``.

    A successful connect alone proves nothing: while nginx is still starting (or
    retrying a failed ``bind()``), whoever else owns the port answers it. Linux lists
    listening sockets, with their inode, in ``/proc/net/tcp`` (address and port in
    hex, state ``0A`` = LISTEN), and each of a process's descriptors links to
    ``socket:[INODE]`` under ``/proc/PID/fd``. ``None`` when ``/proc`` cannot tell.
    """
    local = f"0100007F:{port:04X}"  # 127.0.0.1 as a little-endian u32, then the port
    try:
        with open("/proc/net/tcp") as table:
            next(table)  # the header
            inodes = {
                f"socket:[{fields[9]}]"
                for fields in map(str.split, table)
                if fields[1] == local and fields[3] == "0A"
            }
        if not inodes:
            return False
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):  # closed since listed
                if os.readlink(fd) in inodes:
                    return True
    except (OSError, StopIteration, IndexError):
        return None
    return False


class HTTPServer:
    """One nginx process serving :attr:`root` on 127.0.0.1::attr:`port`.

    The configuration is written once, by :func:`start_nginx`; :meth:`stop` ends the
    process and :meth:`start` runs a new one with the same configuration on the same
    port, so a test can make the server go away under a client and come back. The logs
    accumulate across restarts.
    """

    def __init__(
        self, binary: str, workdir: Path, root: Path, port: int, tls: TLSCerts | None
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        """Holds ``nginx.conf``, ``error.log``, ``access.log``, ``htpasswd``, ``temp/``."""
        self.root = root
        """The document root: ``/NAME`` serves ``root / NAME``."""
        self.port = port
        self.tls = tls
        """The certificates the server presents, or ``None`` for plain HTTP."""
        self.conf = workdir / "nginx.conf"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        """The command line: ``-p`` sets the prefix for relative paths, ``-e`` the log
        nginx writes to before (and instead of) ``/var/log/nginx/error.log``."""
        return [
            *_pdeathsig_prefix(),
            self.binary,
            "-c", str(self.conf),
            "-p", str(self.workdir),
            "-e", str(self.workdir / "error.log"),
        ]  # fmt: skip

    @property
    def host(self) -> str:
        """The host name of :meth:`url`: ``localhost`` with TLS (the name the certificate
        is checked against), else ``127.0.0.1``.

        nginx listens on 127.0.0.1 only; a client that resolves ``localhost`` to ``::1``
        first must fall back to the next address, as ``socket.create_connection`` does.
        """
        return TLS_HOSTNAME if self.tls is not None else LOCALHOST

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` or ``https://localhost:PORT``, without a slash."""
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def url(self, name: str) -> str:
        """The URL of ``name`` (a path relative to the root, e.g. ``"private/disk.img"``)."""
        return f"{self.base_url}/{name.lstrip('/')}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Run nginx and wait until it listens on :attr:`port` and a TCP connect succeeds.

        Raises :class:`RuntimeError` with the error log if nginx exits first (a bad
        ``extra``), cannot bind the port (``Address already in use``: another process
        holds it), or stays deaf for ``timeout`` seconds; nothing is left running then.
        """
        if self.running:
            raise RuntimeError(f"nginx on port {self.port} is already running")
        log_offset = self._log_offsets()
        with (self.workdir / "stderr.log").open("ab") as stderr:
            process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        self.process = process
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"nginx exited with status {process.returncode}: "
                    f"{' '.join(self.argv)}\n{self._log_since(log_offset)}"
                )
            output = self._log_since(log_offset)
            if "address already in use" in output.lower():
                # nginx would retry bind() for 2.5 s, then exit; give up at once instead.
                self.stop(kill=True)
                raise RuntimeError(f"nginx could not bind port {self.port}:\n{output}")
            if _listens(process.pid, self.port) is not False and self._accepts():
                return
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise RuntimeError(
                    f"nginx did not accept connections on port {self.port} within "
                    f"{timeout:g} s: {' '.join(self.argv)}\n{self._log_since(log_offset)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def stop(self, kill: bool = False, timeout: float = STOP_TIMEOUT) -> None:
        """Stop nginx and wait until it has exited; idempotent.

        SIGTERM is nginx's fast shutdown: it closes every connection at once, also one
        in the middle of a response. ``kill=True`` sends SIGKILL, as a crash would (same
        effect on clients, but nothing is logged). A SIGTERM not obeyed within
        ``timeout`` seconds is followed by SIGKILL. Once this returns, connecting to
        :attr:`port` is refused.
        """
        process = self.process
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait()

    def log_text(self) -> str:
        """nginx's error log (level ``info``) and anything it printed, for assertion
        messages: ``assert ..., server.log_text()``."""
        text = ""
        for name in ("error.log", "stderr.log"):
            with contextlib.suppress(FileNotFoundError):
                text += (self.workdir / name).read_text(errors="replace")
        return text

    def access_log(self, *, wait_for: int = 0, timeout: float = 5.0) -> list[str]:
        """The access log, one line per finished request, in :data:`ACCESS_LOG_FORMAT`.

        nginx writes a line only after it has sent the response, so a client that just
        read a response may look before the line is there. ``wait_for=N`` waits (up to
        ``timeout`` seconds) until there are at least ``N`` lines and returns them, or
        whatever is there once the time is up.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                lines = (self.workdir / "access.log").read_text().splitlines()
            except FileNotFoundError:
                lines = []
            if len(lines) >= wait_for or time.monotonic() > deadline:
                return lines
            time.sleep(0.01)

    def _log_offsets(self) -> tuple[int, int]:
        """Where this run's output starts in ``error.log`` and ``stderr.log``."""
        sizes = []
        for name in ("error.log", "stderr.log"):
            try:
                sizes.append((self.workdir / name).stat().st_size)
            except FileNotFoundError:
                sizes.append(0)
        return sizes[0], sizes[1]

    def _log_since(self, offsets: tuple[int, int]) -> str:
        """The error log and nginx's own output written since ``offsets`` (this run)."""
        text = ""
        for name, offset in zip(("error.log", "stderr.log"), offsets, strict=True):
            try:
                with (self.workdir / name).open("rb") as f:
                    f.seek(offset)
                    text += f.read().decode(errors="replace")
            except FileNotFoundError:
                pass
        return text

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((LOCALHOST, self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<HTTPServer {self.base_url} root={self.root} {state}>"


def start_nginx(
    workdir: Path,
    root: Path,
    *,
    tls: TLSCerts | None = None,
    ranges: bool = True,
    extra: str = "",
    timeout: float = START_TIMEOUT,
) -> HTTPServer:
    """Serve ``root`` with nginx on a free port; the caller must :meth:`HTTPServer.stop` it.

    ``workdir`` (created if missing) receives the configuration, logs and temporary
    files; give each server its own. ``tls`` serves HTTPS with ``tls.server_dir``'s
    certificate. ``ranges=False`` makes nginx ignore ``Range`` headers. ``extra`` is
    nginx configuration appended inside the ``server`` block, e.g.
    ``"keepalive_timeout 0;"`` (a new connection per request) or
    ``f"location /slow/ {{ limit_rate 64k; alias {root}/; }}"`` (``/slow/NAME`` trickles).

    A free port can be taken by another process before nginx binds it; then nginx is
    started again on another port, a few times. Any other failure raises
    :class:`RuntimeError` with the error log.
    """
    binary = require_nginx()
    workdir.mkdir(parents=True, exist_ok=True)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / "temp" / kind).mkdir(parents=True, exist_ok=True)
    _write_htpasswd(workdir / "htpasswd")
    root = root.resolve()
    for attempt in range(_PORT_ATTEMPTS):
        port = _free_port()
        server = HTTPServer(binary, workdir, root, port, tls)
        server.conf.write_text(_config(workdir, root, port, tls, ranges, extra))
        try:
            server.start(timeout)
        except RuntimeError as e:
            server.stop(kill=True)
            in_use = "address already in use" in str(e).lower()
            if not (in_use and attempt + 1 < _PORT_ATTEMPTS):
                raise
            continue
        except BaseException:
            server.stop(kill=True)
            raise
        return server
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- fixtures


class HTTPServerLauncher(_Launcher):
    """The ``http_server`` fixture: starts nginx servers and stops them all at teardown.

    Each server gets its own work directory ``nginx-N`` under the test's ``tmp_path``.
    """

    def __call__(
        self,
        root: Path,
        tls: TLSCerts | None = None,
        ranges: bool = True,
        extra: str = "",
        *,
        timeout: float = START_TIMEOUT,
    ) -> HTTPServer:
        """Like :func:`start_nginx` without the work directory."""
        workdir = self.workdir / f"nginx-{next(_counter)}"
        server = start_nginx(workdir, root, tls=tls, ranges=ranges, extra=extra, timeout=timeout)
        self.servers.append(server)
        return server


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[HTTPServerLauncher]:
    """Factory: ``http_server(root, tls=None, ranges=True, extra="")`` -> :class:`HTTPServer`."""
    with HTTPServerLauncher(tmp_path) as launcher:
        yield launcher


@pytest.fixture(scope="session")
def http_tls_certs(tmp_path_factory: pytest.TempPathFactory) -> TLSCerts:
    """One CA + server certificate for ``localhost`` / ``127.0.0.1`` per test session."""
    return _make_tls_certs(tmp_path_factory.mktemp("http-tls"))


# -- a forward proxy ---------------------------------------------------------------------------


def require_tinyproxy() -> str:
    """The tinyproxy binary; skip (fail under CI=true) when it is missing."""
    path = shutil.which("tinyproxy") or (
        "/usr/bin/tinyproxy" if os.path.exists("/usr/bin/tinyproxy") else None
    )
    if path is None:
        message = "tinyproxy is not installed (Debian: apt-get install tinyproxy)"
        if IN_CI:
            pytest.fail(f"CI=true and {message}")
        pytest.skip(message)
    return path


class ProxyServer:
    """A running tinyproxy on 127.0.0.1: plain HTTP forwarding and CONNECT tunnels."""

    def __init__(self, workdir: Path, port: int, process: subprocess.Popen[bytes]) -> None:
        self.workdir = workdir
        self.port = port
        self.process = process

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` - what ``http_proxy`` / ``https_proxy`` are set to."""
        return f"http://{LOCALHOST}:{self.port}"

    def log_text(self) -> str:
        return (self.workdir / "tinyproxy.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(STOP_TIMEOUT)


def start_tinyproxy(
    workdir: Path, timeout: float = START_TIMEOUT, *, auth: tuple[str, str] | None = None
) -> ProxyServer:
    """Start tinyproxy in the foreground on a free port of 127.0.0.1 (no upstream proxy,
    CONNECT allowed to any port; with ``auth``, only for that user and password) and
    wait until it accepts connections."""
    binary = require_tinyproxy()
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    conf = workdir / "tinyproxy.conf"
    conf.write_text(
        f"Port {port}\nListen {LOCALHOST}\nAllow {LOCALHOST}\nTimeout 60\n"
        f'MaxClients 64\nLogLevel Info\nLogFile "{workdir / "tinyproxy.log"}"\n'
        f'PidFile "{workdir / "tinyproxy.pid"}"\n'
        + (f"BasicAuth {auth[0]} {auth[1]}\n" if auth else "")
    )
    out = (workdir / "stdout.log").open("wb")
    process = subprocess.Popen(
        [*_pdeathsig_prefix(), binary, "-d", "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    out.close()
    server = ProxyServer(workdir, port, process)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"tinyproxy exited {process.returncode}: {server.log_text()[-2000:]}"
            )
        with contextlib.suppress(OSError), socket.create_connection((LOCALHOST, port), 0.2):
            return server
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"tinyproxy not ready after {timeout} s")
        time.sleep(0.02)


@pytest.fixture
def http_proxy(tmp_path: Path) -> Iterator[ProxyServer]:
    """A tinyproxy for the test, stopped at teardown."""
    server = start_tinyproxy(tmp_path / "tinyproxy")
    try:
        yield server
    finally:
        server.stop()
