"""trioconv's HTTP(S) source against a real web server (nginx on 127.0.0.1).

Images are made with qemu-img/qemu-io, served by nginx, converted by trioconv from their
``http://`` or ``https://`` URL and compared with ``qemu-img compare`` against the
served file. nginx's access log shows what was asked: byte ranges, never the whole file.
Faults - a missing file, a server without byte ranges, a wrong password, an untrusted
certificate, the server going away mid-copy - end with one clear line.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio

import trioconv
from trioconv.protocols.http import HTTPDriver, open_http

from ._faults import MiB, check_killed_mid_copy, make_mixed_src, one_line_error
from .conftest import ImageMaker, assert_identical, run, trioconv_cli
from .http_server import (
    AUTH_PASSWORD,
    AUTH_USER,
    HTTPServerLauncher,
    ProxyServer,
    TLSCerts,
    start_tinyproxy,
)

_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def _no_proxy_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """The servers here are local: a proxy set in the environment must not stand between."""
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def root(tmp_path: Path, make_image: ImageMaker) -> Path:
    """The document root: ``mixed.raw`` (8 MiB of data, zeroes and holes) and
    ``mixed.qcow2`` (the same as qcow2)."""
    www = tmp_path / "www"
    www.mkdir()
    src = make_mixed_src(make_image)
    shutil.copy(src, www / "mixed.raw")
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, www / "mixed.qcow2")
    return www


def ranges_asked(lines: list[str]) -> list[str]:
    """The GET lines of an access log (``GET /name STATUS RANGE BYTES``)."""
    return [line for line in lines if line.startswith("GET ")]


def test_convert_from_http(http_server: HTTPServerLauncher, root: Path, tmp_path: Path) -> None:
    server = http_server(root)
    out = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-p", "-O", "raw", server.url("mixed.raw"), out)
    assert result.returncode == 0, result.stderr
    assert_identical(root / "mixed.raw", out)
    gets = ranges_asked(server.access_log(wait_for=2))
    assert gets and all(" 206 bytes=" in line for line in gets), gets
    # One GET per copy job: the 8 MiB image went as 2 MiB ranges, not one download.
    assert sum(int(line.split()[-1]) for line in gets) >= 8 * MiB
    assert max(int(line.split()[-1]) for line in gets) <= 2 * MiB


def test_qcow2_over_http_is_probed(
    http_server: HTTPServerLauncher, root: Path, tmp_path: Path
) -> None:
    server = http_server(root)
    url = server.url("mixed.qcow2")
    shown = trioconv_cli("info", "--output", "json", url)
    assert shown.returncode == 0, shown.stderr
    assert '"format": "qcow2"' in shown.stdout
    out = tmp_path / "out.qcow2"
    result = trioconv_cli("convert", "-O", "qcow2", "-m", "4", "-W", url, out)
    assert result.returncode == 0, result.stderr
    assert_identical(root / "mixed.raw", out, "raw", "qcow2")
    run("qemu-img", "check", out)


def test_redirect_and_password(http_server: HTTPServerLauncher, root: Path, tmp_path: Path) -> None:
    server = http_server(root)
    out = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-O", "raw", server.url("redirect/mixed.raw"), out)
    assert result.returncode == 0, result.stderr
    assert_identical(root / "mixed.raw", out)

    private = server.url("private/mixed.raw")
    with_password = private.replace("://", f"://{AUTH_USER}:{AUTH_PASSWORD}@")
    out.unlink()
    result = trioconv_cli("convert", "-O", "raw", with_password, out)
    assert result.returncode == 0, result.stderr
    assert_identical(root / "mixed.raw", out)

    line = one_line_error(trioconv_cli("convert", "-O", "raw", private, tmp_path / "x.raw"))
    assert "HTTP 401" in line
    wrong = private.replace("://", f"://{AUTH_USER}:wrong-password@")
    line = one_line_error(trioconv_cli("info", wrong))
    assert "HTTP 401" in line and "wrong-password" not in line and f"{AUTH_USER}@" in line
    assert not (tmp_path / "x.raw").exists()


def test_https(
    http_server: HTTPServerLauncher,
    http_tls_certs: TLSCerts,
    root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = http_server(root, tls=http_tls_certs)
    url = server.url("mixed.raw")
    assert url.startswith("https://")
    out = tmp_path / "out.raw"
    line = one_line_error(trioconv_cli("convert", "-O", "raw", url, out))
    assert "certificate" in line and not out.exists()
    # QEMU's block options: sslverify=off accepts the unknown certificate ...
    opts = f"driver=https,url={url},sslverify=off"
    result = trioconv_cli("convert", "--image-opts", opts, "-O", "raw", out)
    assert result.returncode == 0, result.stderr
    assert_identical(root / "mixed.raw", out)
    out.unlink()
    # ... and sslverify=on (the default) does not.
    line = one_line_error(
        trioconv_cli("convert", "--image-opts", f"driver=https,url={url}", "-O", "raw", out)
    )
    assert "certificate" in line and not out.exists()
    monkeypatch.setenv("SSL_CERT_FILE", str(http_tls_certs.ca_cert))
    result = trioconv_cli("convert", "-O", "raw", url, out)
    assert result.returncode == 0, result.stderr
    assert_identical(root / "mixed.raw", out)


@pytest.mark.parametrize(
    ("name", "ranges", "needle"),
    [
        ("missing.raw", True, "HTTP 404 Not Found"),
        ("mixed.raw", False, "does not support byte ranges"),
    ],
    ids=["404", "no-ranges"],
)
def test_refused_sources(
    http_server: HTTPServerLauncher,
    root: Path,
    tmp_path: Path,
    name: str,
    ranges: bool,
    needle: str,
) -> None:
    server = http_server(root, ranges=ranges)
    out = tmp_path / "out.raw"
    line = one_line_error(trioconv_cli("convert", "-O", "raw", server.url(name), out))
    assert needle in line and server.url(name) in line
    assert not out.exists()
    # Of a server without ranges only one byte is asked for (the connection is then
    # dropped, whatever the server had started to send).
    assert all(line.split()[3] == "bytes=0-0" for line in ranges_asked(server.access_log()))


def test_unreachable_server(tmp_path: Path) -> None:
    from .nbd_servers import _free_port

    url = f"http://127.0.0.1:{_free_port()}/disk.raw"
    line = one_line_error(trioconv_cli("info", url))
    assert "Could not open" in line and "refused" in line.lower()


def test_other_schemes_are_unknown(tmp_path: Path) -> None:
    line = one_line_error(trioconv_cli("info", "ftp://127.0.0.1/disk.raw"))
    assert "Unknown protocol 'ftp'" in line


def test_http_targets_are_refused(
    http_server: HTTPServerLauncher, root: Path, make_image: ImageMaker
) -> None:
    server = http_server(root)
    src = make_image("small.raw", "1M")
    before = (root / "mixed.raw").read_bytes()
    for args in (["-n"], []):
        line = one_line_error(
            trioconv_cli("convert", *args, "-O", "raw", src, server.url("mixed.raw"))
        )
        assert "read-only" in line
    assert (root / "mixed.raw").read_bytes() == before


async def test_driver_reads(http_server: HTTPServerLauncher, root: Path) -> None:
    """Unaligned reads, the last byte, many reads at once; beyond the end is refused."""
    server = http_server(root)
    data = (root / "mixed.raw").read_bytes()
    async with open_http(server.url("mixed.raw")) as drv:
        assert isinstance(drv, HTTPDriver)
        assert drv.size == len(data) and not drv.caps.writable
        assert await drv.pread(12345, 6789) == data[12345 : 12345 + 6789]
        assert await drv.pread(len(data) - 1, 1) == data[-1:]
        got: dict[int, bytes] = {}

        async def read(offset: int) -> None:
            got[offset] = await drv.pread(offset, 100_000)

        async with trio.open_nursery() as nursery:
            for offset in range(0, len(data) - 100_000, 333_333):
                nursery.start_soon(read, offset)
        assert all(v == data[k : k + 100_000] for k, v in got.items())
        with pytest.raises(trioconv.TrioconvIOError, match="beyond the end"):
            await drv.pread(len(data) - 10, 11)


async def test_idle_connection_closed_by_the_server(
    http_server: HTTPServerLauncher, root: Path
) -> None:
    """nginx drops keep-alive connections idle for 1 s; the next read goes on a new one."""
    server = http_server(root, extra="keepalive_timeout 1s;")
    data = (root / "mixed.raw").read_bytes()
    async with open_http(server.url("mixed.raw")) as drv:
        assert await drv.pread(0, 4096) == data[:4096]
        await trio.sleep(1.5)
        assert await drv.pread(MiB, 4096) == data[MiB : MiB + 4096]


async def test_server_stopped_mid_copy(
    http_server: HTTPServerLauncher, root: Path, make_image: ImageMaker
) -> None:
    big = make_image("big.raw", "32M", "write -P 0x42 0 32M")
    shutil.copy(big, root / "big.raw")
    server = http_server(root, extra="sendfile off; limit_rate 2m;")  # a copy of ~2 s
    await check_killed_mid_copy(
        "read", server.url("big.raw"), 32 * MiB, lambda: server.stop(kill=True), "HTTP server"
    )


def test_empty_file(http_server: HTTPServerLauncher, root: Path, tmp_path: Path) -> None:
    (root / "empty.raw").write_bytes(b"")
    server = http_server(root)
    out = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", server.url("empty.raw"), out)
    assert result.returncode == 0, result.stderr
    assert out.exists() and os.path.getsize(out) == 0


def test_overlay_with_relative_backing_file(
    http_server: HTTPServerLauncher, root: Path, tmp_path: Path
) -> None:
    """A qcow2 overlay's relative backing name is found next to it on the server, as
    qemu-img finds it (``actual path: http://.../base.qcow2``)."""
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", root / "mixed.raw", root / "base.qcow2")
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        root / "overlay.qcow2",
    )
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 4M 64k", root / "overlay.qcow2")
    server = http_server(root)
    url = server.url("overlay.qcow2")
    shown = trioconv_cli("info", url)
    assert shown.returncode == 0, shown.stderr
    assert f"(actual path: {server.url('base.qcow2')})" in shown.stdout
    assert "backing file: base.qcow2" in shown.stdout
    out = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-O", "raw", url, out)
    assert result.returncode == 0, result.stderr
    assert_identical(root / "overlay.qcow2", out, "qcow2", "raw")


def test_proxy_credentials_as_block_options(
    http_server: HTTPServerLauncher, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``proxy-username`` and ``proxy-password-secret`` log in to the environment's
    proxy, as with qemu-img's curl driver; without them the proxy refuses."""
    proxy = start_tinyproxy(tmp_path / "proxy", auth=("pxuser", "pxpass"))
    try:
        plain = http_server(root)
        monkeypatch.setenv("http_proxy", proxy.url)
        out = tmp_path / "out.raw"
        base = f"driver=raw,file.driver=http,file.url={plain.url('mixed.raw')}"
        refused = trioconv_cli("convert", "--image-opts", base, "-O", "raw", out)
        assert refused.returncode == 1 and "407" in refused.stderr, refused.stderr
        secret = ["--object", "secret,id=p0,data=pxpass"]
        opts = base + ",file.proxy-username=pxuser,file.proxy-password-secret=p0"
        result = trioconv_cli("convert", *secret, "--image-opts", opts, "-O", "raw", out)
        assert result.returncode == 0, result.stderr
        assert_identical(root / "mixed.raw", out)
        # (qemu-img takes the same options; it is not run here: its curl driver, 7.2,
        # sometimes hangs on tinyproxy, which closes every connection after a response.)
    finally:
        proxy.stop()


def test_through_a_proxy(
    http_server: HTTPServerLauncher,
    http_tls_certs: TLSCerts,
    http_proxy: ProxyServer,
    root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``http_proxy`` / ``https_proxy`` as curl reads them: plain requests go to the proxy
    in absolute form, TLS through a CONNECT tunnel; ``no_proxy`` goes direct."""
    plain = http_server(root)
    secure = http_server(root, tls=http_tls_certs)
    monkeypatch.setenv("SSL_CERT_FILE", str(http_tls_certs.ca_cert))
    monkeypatch.setenv("http_proxy", http_proxy.url)
    monkeypatch.setenv("https_proxy", http_proxy.url)
    for server in (plain, secure):
        out = tmp_path / f"out-{server.port}.raw"
        result = trioconv_cli("convert", "-O", "raw", server.url("mixed.raw"), out)
        assert result.returncode == 0, result.stderr
        assert_identical(root / "mixed.raw", out)
    log = http_proxy.log_text()
    assert f"GET {plain.url('mixed.raw')}" in log
    assert f"CONNECT localhost:{secure.port}" in log

    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    before = log.count("Request (file descriptor")
    out = tmp_path / "direct.raw"
    assert trioconv_cli("convert", "-O", "raw", plain.url("mixed.raw"), out).returncode == 0
    assert http_proxy.log_text().count("Request (file descriptor") == before

    http_proxy.stop()
    monkeypatch.delenv("no_proxy")
    line = one_line_error(trioconv_cli("info", plain.url("mixed.raw")))
    assert "Could not open" in line and "refused" in line.lower()
