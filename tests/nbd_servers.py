"""Real NBD servers for tests: nbdkit (any plugin, stacked filters, optional TLS) and qemu-nbd.

Every server listens on a Unix socket in the test's ``tmp_path`` (or, with ``tcp=True``, on
a free port of 127.0.0.1; of ``::1`` for nbdkit with ``host="::1"``, where the machine has
IPv6 - see :func:`ipv6_loopback`), is only handed out once it really speaks NBD (a probe
connects, reads the ``NBDMAGIC`` greeting and sends ``NBD_OPT_ABORT``), and is always
stopped at teardown: SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT` seconds. A server
that exits or stays silent for :data:`START_TIMEOUT` seconds fails the test with its
command line and its stderr.

The fixtures are factories::

    def test_copy(nbdkit_server: NbdkitLauncher, qemu_nbd_server: QemuNbdLauncher) -> None:
        ram = nbdkit_server("memory", ["size=8M"], filters=["delay"],
                            filter_args=["delay-read=2ms"])
        ram.uri            # 'nbd+unix:///?socket=/tmp/pytest-.../nbdkit-1.sock'
        disk = qemu_nbd_server(image, fmt="qcow2", readonly=True)
        disk.uri           # 'nbd+unix:///?socket=/tmp/pytest-.../qemu-nbd-1.sock'
        ram.kill()         # the server vanishes mid-test (see NBDServer.stop for SIGTERM)

To see the fixtures, register this module once in ``tests/conftest.py`` with
``pytest_plugins = ["tests.nbd_servers"]``, or bind them in a test module with
``nbdkit_server = nbd_servers.nbdkit_server`` (``from .nbd_servers import nbdkit_server``
trips ruff's F811 on the test arguments, and ``pytest_plugins`` in a test module that
already imported this one fails with PytestAssertRewriteWarning). Outside fixtures,
:func:`nbdkit` and :func:`qemu_nbd` are context managers, and :func:`start_nbdkit` /
:func:`start_qemu_nbd` return a running :class:`NBDServer` that the caller must stop.

A Python client verifies TLS with ``ssl.create_default_context(cafile=certs.ca_cert)``
and ``server_hostname="localhost"`` (Unix socket) or ``"127.0.0.1"`` (TCP); that works
against both servers, also with ``ssl.VERIFY_X509_STRICT``.

TLS: :func:`make_tls_certs` (fixture ``nbd_tls_certs``) writes a throw-away CA and a
server certificate for ``localhost`` / ``127.0.0.1`` with ``openssl``. The server side
reads ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem`` from
:attr:`TLSCerts.server_dir`; a client needs only ``ca-cert.pem`` (:attr:`TLSCerts.ca_cert`,
or the directory :attr:`TLSCerts.client_dir` for qemu's ``tls-creds-x509``) and must
verify the host name ``localhost`` (Unix socket) or ``127.0.0.1`` (TCP).

Servers are started with ``--exit-with-parent`` (nbdkit) or ``setpriv --pdeathsig KILL``
(qemu-nbd), so they die with pytest even if pytest is killed. That signal follows the
*thread* that started them: start servers from the test's own thread (fixtures, sync or
trio tests), not from ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket as _socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, ParamSpec, Protocol, Self
from urllib.parse import quote

import pytest

from .conftest import require_tool

__all__ = [
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "NBDServer",
    "NbdkitLauncher",
    "QemuNbdLauncher",
    "ServerStartError",
    "TLSCerts",
    "ipv6_loopback",
    "make_tls_certs",
    "nbd_tls_certs",
    "nbdkit",
    "nbdkit_server",
    "qemu_nbd",
    "qemu_nbd_server",
    "start_nbdkit",
    "start_qemu_nbd",
    "start_server",
]

START_TIMEOUT = 10.0
"""Seconds a server may take to accept NBD connections before the test fails."""

STOP_TIMEOUT = 5.0
"""Seconds between SIGTERM and SIGKILL when stopping a server."""

LOCALHOST = "127.0.0.1"
TLS_HOSTNAME = "localhost"

_NBD_GREETING = b"NBDMAGIC"
_IHAVEOPT = b"IHAVEOPT"
_NBD_FLAG_C_FIXED_NEWSTYLE = 1
_NBD_FLAG_C_NO_ZEROES = 2
_NBD_OPT_ABORT = 2
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux

P = ParamSpec("P")


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TLSCerts:
    """A throw-away CA and a server certificate, laid out the way nbdkit and qemu want.

    ``server_dir`` holds ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem``
    (nbdkit ``--tls-certificates``, qemu ``tls-creds-x509,endpoint=server,dir=``);
    ``client_dir`` holds only ``ca-cert.pem`` (qemu ``tls-creds-x509,endpoint=client``).
    The certificate is valid for ``localhost`` and ``127.0.0.1``.
    """

    server_dir: Path
    client_dir: Path
    hostname: str = TLS_HOSTNAME

    @property
    def ca_cert(self) -> Path:
        """The CA certificate a client verifies the server with."""
        return self.client_dir / "ca-cert.pem"


_SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def make_tls_certs(directory: Path) -> TLSCerts:
    """Write a self-signed CA (EC P-256) and a server certificate signed by it."""
    openssl = require_tool("openssl")
    work = directory / "ca"
    server_dir = directory / "server"
    client_dir = directory / "client"
    for d in (work, server_dir, client_dir):
        d.mkdir(parents=True, exist_ok=True)
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl_run(*args: str | Path) -> None:
        result = subprocess.run(
            [openssl, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            pytest.fail(f"openssl {' '.join(map(str, args))} failed:\n{result.stderr}")

    openssl_run(
        "req", "-x509", "-new", *newkey, "-days", "3650",
        "-keyout", work / "ca-key.pem", "-out", server_dir / "ca-cert.pem",
        "-subj", "/CN=trioconv test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    openssl_run(
        "req", "-new", *newkey,
        "-keyout", server_dir / "server-key.pem", "-out", work / "server.csr",
        "-subj", f"/CN={TLS_HOSTNAME}",
    )  # fmt: skip
    (work / "server.ext").write_text(_SERVER_EXTENSIONS)
    openssl_run(
        "x509", "-req", "-days", "3650", "-in", work / "server.csr",
        "-CA", server_dir / "ca-cert.pem", "-CAkey", work / "ca-key.pem",
        "-set_serial", "2", "-extfile", work / "server.ext",
        "-out", server_dir / "server-cert.pem",
    )  # fmt: skip
    (server_dir / "server-key.pem").chmod(0o600)
    shutil.copyfile(server_dir / "ca-cert.pem", client_dir / "ca-cert.pem")
    return TLSCerts(server_dir=server_dir, client_dir=client_dir)


# --------------------------------------------------------------------------- servers


def _escape_opt(value: str | Path) -> str:
    """Escape a value for qemu's comma-separated option syntax."""
    return str(value).replace(",", ",,")


@dataclass(eq=False)
class NBDServer:
    """A running (or stopped) NBD server process and how to reach it."""

    name: str
    """``nbdkit-N`` or ``qemu-nbd-N``; also the stem of the socket and log file names."""
    argv: list[str]
    process: subprocess.Popen[bytes]
    log: Path
    """The server's stdout and stderr."""
    export_name: str = ""
    socket: Path | None = None
    """The Unix socket path, or ``None`` for a TCP server."""
    host: str | None = None
    port: int | None = None
    tls: TLSCerts | None = None
    _cleanup: list[Path] = field(default_factory=list, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def uri(self) -> str:
        """The NBD URI (NetworkBlockDevice/nbd doc/uri.md) of the export.

        ``nbd+unix:///EXPORT?socket=PATH`` or ``nbd://127.0.0.1:PORT/EXPORT``; with TLS
        the schemes are ``nbds+unix`` (plus ``&tls-hostname=localhost``) and ``nbds``.
        qemu-img does not understand ``nbds``; use :meth:`qemu_object` and
        :meth:`qemu_image_opts` for TLS servers.
        """
        scheme = "nbds" if self.tls else "nbd"
        path = quote(self.export_name, safe="")
        if self.socket is not None:
            query = "socket=" + quote(str(self.socket), safe="/")
            if self.tls:
                query += "&tls-hostname=" + self.tls.hostname
            return f"{scheme}+unix:///{path}?{query}"
        host = f"[{self.host}]" if self.host is not None and ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{path}"

    @property
    def address(self) -> str | tuple[str, int]:
        """What to connect to: the socket path, or ``(host, port)``."""
        if self.socket is not None:
            return str(self.socket)
        assert self.host is not None
        assert self.port is not None
        return (self.host, self.port)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stderr(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def qemu_object(self, object_id: str = "tls0") -> list[str]:
        """qemu-img/qemu-io arguments defining the client TLS credentials (or none)."""
        if self.tls is None:
            return []
        directory = _escape_opt(self.tls.client_dir)
        return ["--object", f"tls-creds-x509,id={object_id},endpoint=client,dir={directory}"]

    def qemu_image_opts(self, object_id: str = "tls0") -> str:
        """An ``--image-opts`` string opening this export with qemu's nbd driver."""
        if self.socket is not None:
            opts = f"driver=nbd,server.type=unix,server.path={_escape_opt(self.socket)}"
        else:
            opts = f"driver=nbd,server.type=inet,server.host={self.host},server.port={self.port}"
        if self.export_name:
            opts += f",export={_escape_opt(self.export_name)}"
        if self.tls is not None:
            opts += f",tls-creds={object_id}"
            if self.socket is not None:
                opts += f",tls-hostname={self.tls.hostname}"
        return opts

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """Stop the server (SIGTERM, SIGKILL after ``timeout``); idempotent.

        Returns the exit status (negative: killed by that signal). qemu-nbd exits at once
        on SIGTERM, closing its clients' connections. nbdkit 1.32 does not: it stops
        greeting new clients but keeps serving connected ones until they disconnect, so
        with a client still connected this takes ``timeout`` seconds and ends in SIGKILL.
        For a server that vanishes at once, mid-request, use :meth:`kill`.
        """
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._finish()
        assert self.process.returncode is not None
        return self.process.returncode

    def kill(self) -> int:
        """SIGKILL the server at once, as a crash would; idempotent.

        Connected clients see EOF (or ECONNRESET) immediately.
        """
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._finish()
        assert self.process.returncode is not None
        return self.process.returncode

    def _finish(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.socket is not None:
            self.socket.unlink(missing_ok=True)  # nbdkit leaves its socket behind
        for directory in self._cleanup:
            shutil.rmtree(directory, ignore_errors=True)


class ServerStartError(Exception):
    """The server process exited before it accepted connections."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.output = server.stderr()
        super().__init__(
            f"{server.name} exited with status {server.process.returncode}: "
            f"{' '.join(server.argv)}\n{self.output}"
        )


def _family(host: str) -> _socket.AddressFamily:
    return _socket.AF_INET6 if ":" in host else _socket.AF_INET


def _free_port(host: str = LOCALHOST) -> int:
    with _socket.socket(_family(host), _socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def ipv6_loopback() -> bool:
    """True when this machine can listen on ``::1`` (containers often cannot)."""
    try:
        with _socket.socket(_socket.AF_INET6, _socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _socket_path(workdir: Path, name: str, cleanup: list[Path]) -> Path:
    """``workdir/NAME.sock``, or a short temporary directory if that is too long."""
    path = workdir / f"{name}.sock"
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        short = Path(tempfile.mkdtemp(prefix="nbd-"))
        cleanup.append(short)
        path = short / f"{name}.sock"
    path.unlink(missing_ok=True)
    return path


def _probe(address: str | tuple[str, int]) -> bool:
    """True once the server greets with ``NBDMAGIC``; leaves it cleanly with NBD_OPT_ABORT."""
    family = _socket.AF_UNIX if isinstance(address, str) else _family(address[0])
    try:
        with _socket.socket(family, _socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(address)
            greeting = b""
            while len(greeting) < 18:
                chunk = s.recv(18 - len(greeting))
                if not chunk:
                    break
                greeting += chunk
            if not greeting.startswith(_NBD_GREETING):
                return False
            if greeting[8:16] == _IHAVEOPT:  # newstyle: say goodbye properly
                flags = _NBD_FLAG_C_FIXED_NEWSTYLE | _NBD_FLAG_C_NO_ZEROES
                s.sendall(struct.pack(">I8sII", flags, _IHAVEOPT, _NBD_OPT_ABORT, 0))
                with contextlib.suppress(OSError):
                    while s.recv(4096):
                        pass
            return True
    except OSError:
        return False


def start_server(
    argv: Sequence[str],
    *,
    name: str,
    workdir: Path,
    socket: Path | None = None,
    host: str | None = None,
    port: int | None = None,
    export_name: str = "",
    tls: TLSCerts | None = None,
    cleanup: Sequence[Path] = (),
    timeout: float = START_TIMEOUT,
) -> NBDServer:
    """Run any NBD server ``argv`` and wait until it accepts NBD connections.

    Raises :class:`ServerStartError` if the process exits first; fails the test (after
    killing the process) if it does not answer within ``timeout`` seconds.
    """
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    server = NBDServer(
        name=name,
        argv=list(argv),
        process=process,
        log=log,
        export_name=export_name,
        socket=socket,
        host=host,
        port=port,
        tls=tls,
        _cleanup=list(cleanup),
    )
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if process.poll() is not None:
            server.stop()
            raise ServerStartError(server)
        if (socket is None or socket.exists()) and _probe(server.address):
            return server
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(
                f"{name} did not accept NBD connections within {timeout:g} s: "
                f"{' '.join(server.argv)}\n--- its output ---\n{server.stderr()}",
                pytrace=False,
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _start_with_port_retry(
    build: Callable[[int | None], NBDServer], tcp: bool, host: str = LOCALHOST
) -> NBDServer:
    """``build(None)`` for a Unix socket; with TCP ``build(port)``, retrying on a new port
    if another process grabbed the free one in the meantime."""
    attempts = 5 if tcp else 1
    for attempt in range(attempts):
        try:
            return build(_free_port(host) if tcp else None)
        except ServerStartError as e:
            in_use = "address already in use" in e.output.lower()
            if not (in_use and attempt + 1 < attempts):
                pytest.fail(str(e), pytrace=False)
    raise AssertionError("unreachable")


@functools.cache
def _nbdkit_exit_with_parent(binary: str) -> bool:
    config = subprocess.run(
        [binary, "--dump-config"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    return "exit_with_parent=yes" in config.splitlines()


@functools.cache
def _pdeathsig_prefix() -> tuple[str, ...]:
    """``setpriv --pdeathsig KILL`` (util-linux >= 2.33) if available, else nothing."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    usage = subprocess.run(
        [setpriv, "--help"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    return (setpriv, "--pdeathsig", "KILL") if "--pdeathsig" in usage else ()


_counter = iter(range(1, 1 << 62))


def start_nbdkit(
    workdir: Path,
    plugin: str,
    args: Sequence[str] = (),
    *,
    filters: Sequence[str] = (),
    filter_args: Sequence[str] = (),
    readonly: bool = False,
    tcp: bool = False,
    export_name: str = "",
    tls: TLSCerts | None = None,
    tls_mode: Literal["require", "on"] = "require",
    options: Sequence[str] = (),
    timeout: float = START_TIMEOUT,
    host: str = LOCALHOST,
) -> NBDServer:
    """Start ``nbdkit [options] [--filter=F ...] PLUGIN ARGS... FILTER_ARGS...``.

    ``filters`` are listed outermost first (the first one sees the client's requests
    first). ``export_name`` only goes into :attr:`NBDServer.uri` (and ``-e``): most
    plugins serve any name; add ``filters=["exportname"]`` with
    ``exportname=NAME exportname-strict=true`` to make nbdkit insist on it.
    ``options`` are extra nbdkit options, e.g. ``["-v"]`` or ``["--threads", "4"]``.
    With ``tcp``, ``host`` is the address listened on: ``"::1"`` for IPv6 (see
    :func:`ipv6_loopback`), which the URI then writes in brackets.
    """
    binary = require_tool("nbdkit")
    name = f"nbdkit-{next(_counter)}"
    cleanup: list[Path] = []

    def build(port: int | None) -> NBDServer:
        argv = [binary, "--foreground"]
        if _nbdkit_exit_with_parent(binary):
            argv.append("--exit-with-parent")
        sock: Path | None = None
        if port is None:
            sock = _socket_path(workdir, name, cleanup)
            argv += ["--unix", str(sock)]
        else:
            argv += ["--ipaddr", host, "--port", str(port)]
        if readonly:
            argv.append("--readonly")
        if export_name:
            argv += ["--exportname", export_name]
        if tls is not None:
            argv += [f"--tls={tls_mode}", f"--tls-certificates={tls.server_dir}"]
        argv += [f"--filter={f}" for f in filters]
        argv += [*options, plugin, *args, *filter_args]
        return start_server(
            argv,
            name=name,
            workdir=workdir,
            socket=sock,
            host=None if port is None else host,
            port=port,
            export_name=export_name,
            tls=tls,
            cleanup=cleanup,
            timeout=timeout,
        )

    return _start_with_port_retry(build, tcp, host)


def start_qemu_nbd(
    workdir: Path,
    image: Path,
    fmt: str | None = "qcow2",
    *,
    readonly: bool = False,
    tcp: bool = False,
    export_name: str = "",
    shared: int = 8,
    tls: TLSCerts | None = None,
    options: Sequence[str] = (),
    timeout: float = START_TIMEOUT,
) -> NBDServer:
    """Start ``qemu-nbd --persistent -e SHARED -f FMT [-r] (-k SOCKET | -b 127.0.0.1 -p PORT)``.

    ``--persistent`` keeps it serving after a client leaves (sequential connections);
    ``-e shared`` allows that many at once. ``fmt=None`` lets qemu-nbd probe. qemu-nbd
    locks the image: open it elsewhere only read-only with ``-U`` (force share), or
    after :meth:`NBDServer.stop`. ``options`` are extra qemu-nbd options, e.g.
    ``["--allocation-depth"]``, ``["--discard=unmap"]`` or ``["--cache=none"]``.
    """
    binary = require_tool("qemu-nbd")
    name = f"qemu-nbd-{next(_counter)}"
    cleanup: list[Path] = []

    def build(port: int | None) -> NBDServer:
        argv = [*_pdeathsig_prefix(), binary, "--persistent", f"--shared={shared}"]
        if fmt is not None:
            argv.append(f"--format={fmt}")
        sock: Path | None = None
        if port is None:
            sock = _socket_path(workdir, name, cleanup)
            argv.append(f"--socket={sock}")
        else:
            argv += [f"--bind={LOCALHOST}", f"--port={port}"]
        if readonly:
            argv.append("--read-only")
        if export_name:
            argv.append(f"--export-name={export_name}")
        if tls is not None:
            # qemu's server-side default is verify-peer=on (client certificates required);
            # off matches nbdkit without --tls-verify-peer.
            creds = (
                f"tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,"
                f"dir={_escape_opt(tls.server_dir)}"
            )
            argv += ["--object", creds, "--tls-creds=tls0"]
        argv += [*options, str(image)]
        return start_server(
            argv,
            name=name,
            workdir=workdir,
            socket=sock,
            host=None if port is None else LOCALHOST,
            port=port,
            export_name=export_name,
            tls=tls,
            cleanup=cleanup,
            timeout=timeout,
        )

    return _start_with_port_retry(build, tcp)


def _managed(
    start: Callable[P, NBDServer],
) -> Callable[P, contextlib.AbstractContextManager[NBDServer]]:
    @contextlib.contextmanager
    def managed(*args: P.args, **kwargs: P.kwargs) -> Iterator[NBDServer]:
        server = start(*args, **kwargs)
        try:
            yield server
        finally:
            server.stop()

    managed.__name__ = start.__name__.removeprefix("start_")
    managed.__doc__ = f"Context manager around :func:`{start.__name__}` (same arguments)."
    return managed


nbdkit = _managed(start_nbdkit)
"""``with nbdkit(tmp_path, "memory", ["size=8M"]) as server:`` -- stopped on exit."""

qemu_nbd = _managed(start_qemu_nbd)
"""``with qemu_nbd(tmp_path, image, "qcow2", readonly=True) as server:`` -- stopped on exit."""


# --------------------------------------------------------------------------- fixtures


class _Stoppable(Protocol):
    def stop(self) -> object: ...


class _Launcher:
    """Starts servers in ``workdir`` and stops every one of them in :meth:`stop_all`
    (also the base of other server fixtures: tests/http_server.py)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[_Stoppable] = []

    def stop_all(self) -> None:
        errors: list[BaseException] = []
        for server in reversed(self.servers):
            try:
                server.stop()
            except BaseException as e:  # keep stopping the others
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


class NbdkitLauncher(_Launcher):
    """The ``nbdkit_server`` fixture: call it like :func:`start_nbdkit` without workdir."""

    def __call__(
        self,
        plugin: str,
        args: Sequence[str] = (),
        *,
        filters: Sequence[str] = (),
        filter_args: Sequence[str] = (),
        readonly: bool = False,
        tcp: bool = False,
        export_name: str = "",
        tls: TLSCerts | None = None,
        tls_mode: Literal["require", "on"] = "require",
        options: Sequence[str] = (),
        timeout: float = START_TIMEOUT,
        host: str = LOCALHOST,
    ) -> NBDServer:
        server = start_nbdkit(
            self.workdir,
            plugin,
            args,
            filters=filters,
            filter_args=filter_args,
            readonly=readonly,
            tcp=tcp,
            export_name=export_name,
            tls=tls,
            tls_mode=tls_mode,
            options=options,
            timeout=timeout,
            host=host,
        )
        self.servers.append(server)
        return server


class QemuNbdLauncher(_Launcher):
    """The ``qemu_nbd_server`` fixture: call it like :func:`start_qemu_nbd` without workdir."""

    def __call__(
        self,
        image: Path,
        fmt: str | None = "qcow2",
        *,
        readonly: bool = False,
        tcp: bool = False,
        export_name: str = "",
        shared: int = 8,
        tls: TLSCerts | None = None,
        options: Sequence[str] = (),
        timeout: float = START_TIMEOUT,
    ) -> NBDServer:
        server = start_qemu_nbd(
            self.workdir,
            image,
            fmt,
            readonly=readonly,
            tcp=tcp,
            export_name=export_name,
            shared=shared,
            tls=tls,
            options=options,
            timeout=timeout,
        )
        self.servers.append(server)
        return server


@pytest.fixture
def nbdkit_server(tmp_path: Path) -> Iterator[NbdkitLauncher]:
    """Factory: ``nbdkit_server("memory", ["size=8M"], filters=["delay"], ...)``."""
    with NbdkitLauncher(tmp_path) as launcher:
        yield launcher


@pytest.fixture
def qemu_nbd_server(tmp_path: Path) -> Iterator[QemuNbdLauncher]:
    """Factory: ``qemu_nbd_server(image, fmt="qcow2", readonly=False, ...)``."""
    with QemuNbdLauncher(tmp_path) as launcher:
        yield launcher


@pytest.fixture(scope="session")
def nbd_tls_certs(tmp_path_factory: pytest.TempPathFactory) -> TLSCerts:
    """One CA + server certificate per test session (needs ``openssl``)."""
    return make_tls_certs(tmp_path_factory.mktemp("nbd-tls"))
