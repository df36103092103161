"""The nbd driver's ``open-timeout`` and ``reconnect-delay``, as QEMU 7.2 means them.

``open-timeout=N``: a connect that fails (the socket not there yet, refused) is tried
again for N seconds. ``reconnect-delay=N``: a connection lost mid-copy is made again,
and the requests it had in flight go again, for N seconds; then the copy fails with one
line. Both are 0 by default: one connect, and a loss ends the copy.

The servers are real: nbdkit's ``file`` plugin on an image file (so a restarted server
serves the same bytes), slowed by its ``delay`` filter (and others) so that a copy is still running
when the server is killed. The client connects through a symbolic link to the server's
socket: a restarted server listens on a new socket, and pointing the link at it is, for
the client, the same server coming back on the same path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trioconv._blockopts import parse_image_opts, parse_object, resolve
from trioconv._errors import UnsupportedError

from ._faults import one_line_error
from .conftest import ImageMaker, assert_identical, trioconv_cli
from .nbd_servers import NbdkitLauncher, NBDServer

#: nbdkit's filters making a copy slow: requests of at most 256 KiB, one at a time over
#: all connections, each waiting 200 ms - the 2.5 MiB of data take over 2 s, long
#: enough to kill the server in the middle of a copy.
SLOW_FILTERS = ["noparallel", "blocksize-policy", "delay"]
SLOW = [
    "serialize=all-requests",
    "blocksize-maximum=256K",
    "blocksize-preferred=256K",
    "delay-read=200ms",
    "delay-write=200ms",
]


def _point(link: Path, server: NBDServer) -> None:
    """Make ``link`` lead to ``server``'s socket, atomically (a client connecting
    meanwhile finds the old link or the new one, never none)."""
    assert server.socket is not None
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(server.socket)
    os.replace(tmp, link)


def _opts(link: Path, **extra: int) -> str:
    opts = f"driver=nbd,server.type=unix,server.path={link}"
    return opts + "".join(f",{key.replace('_', '-')}={value}" for key, value in extra.items())


def _start_cli(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "trioconv", *[os.fspath(a) for a in args]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def source(make_image: ImageMaker) -> Path:
    return make_image(
        "src.raw", "4M", "write -P 0x11 0 1M", "write -P 0x22 1536K 1M", "write -P 0x33 3M 512K"
    )


# -- open-timeout ------------------------------------------------------------------------
def test_open_timeout_waits_for_a_server_that_comes_up(
    tmp_path: Path, source: Path, nbdkit_server: NbdkitLauncher
) -> None:
    """The socket does not exist when the copy starts; a server appears on it about a
    second later, and the copy goes through as if it had been there all along."""
    link, out = tmp_path / "s", tmp_path / "out.raw"
    proc = _start_cli("convert", "--image-opts", _opts(link, open_timeout=10), "-O", "raw", out)
    time.sleep(0.8)
    assert proc.poll() is None, "gave up before the open-timeout"
    _point(link, nbdkit_server("file", [str(source)], readonly=True))
    result = _finish(proc)
    assert result.returncode == 0, result.stderr
    assert_identical(source, out)


def test_open_timeout_zero_tries_once(tmp_path: Path) -> None:
    """The default (and ``open-timeout=0``): one attempt, the failure at once."""
    for opts in (_opts(tmp_path / "s"), _opts(tmp_path / "s", open_timeout=0)):
        start = time.monotonic()
        result = trioconv_cli("convert", "--image-opts", opts, "-O", "raw", tmp_path / "o")
        line = one_line_error(result)
        assert time.monotonic() - start < 5
        assert "Failed to connect to" in line and "No such file or directory" in line, line
        assert "tried for" not in line


def test_open_timeout_ends_with_what_the_last_attempt_met(tmp_path: Path) -> None:
    start = time.monotonic()
    opts = _opts(tmp_path / "s", open_timeout=1)
    result = trioconv_cli("convert", "--image-opts", opts, "-O", "raw", tmp_path / "o")
    line = one_line_error(result)
    assert 1.0 <= time.monotonic() - start < 6
    assert "No such file or directory (tried for 1 s)" in line, line


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5", 5), ("0x10", 16), ("010", 8), ("4294967296", 0), ("-1", 2**32 - 1)],
)
def test_seconds_read_as_qemu_reads_them(value: str, seconds: int) -> None:
    """C's notations, and a ``uint32_t``'s wrap-around (qemu-img 7.2 does the same)."""
    for key, field in (
        ("open-timeout", "nbd_open_timeout"),
        ("reconnect-delay", "nbd_reconnect_delay"),
    ):
        text = f"driver=nbd,server.type=unix,server.path=/s,{key}={value}"
        spec = resolve(parse_image_opts(text), text)
        assert getattr(spec, field) == seconds


@pytest.mark.parametrize("value", ["abc", "1.5", "", "08", "18446744073709551616"])
def test_bad_seconds_refused_as_qemu_refuses_them(tmp_path: Path, value: str) -> None:
    for key in ("open-timeout", "reconnect-delay"):
        opts = f"driver=nbd,server.type=unix,server.path=/s,{key}={value}"
        line = one_line_error(trioconv_cli("info", "--image-opts", opts))
        assert line.endswith(f"Parameter '{key}' expects a number"), line


# -- reconnect-delay -----------------------------------------------------------------------
def test_source_restarted_mid_copy(
    tmp_path: Path, source: Path, nbdkit_server: NbdkitLauncher
) -> None:
    """nbd -> file: the source server is killed mid-copy and started again on the
    same socket; the reads it owed are read again from the new one."""
    link, out = tmp_path / "s", tmp_path / "out.raw"
    first = nbdkit_server(
        "file", [str(source)], readonly=True, filters=SLOW_FILTERS, filter_args=SLOW
    )
    _point(link, first)
    proc = _start_cli("convert", "--image-opts", _opts(link, reconnect_delay=10), "-O", "raw", out)
    time.sleep(0.8)
    assert proc.poll() is None, "the copy ended before the server was killed"
    first.kill()
    time.sleep(0.5)  # (the client finds nothing there for a while)
    log = tmp_path / "second.log"
    second = nbdkit_server(
        "file",
        [str(source)],
        readonly=True,
        filters=["log", *SLOW_FILTERS],
        filter_args=[f"logfile={log}", *SLOW],
    )
    _point(link, second)
    result = _finish(proc)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    served = log.read_text()
    assert "Read" in served, "the restarted server served no reads"
    # (nbdkit's file plugin allows multi-conn: each connection came back on its own.)
    assert "connection=2 " in served, served
    assert_identical(source, out)


def test_target_restarted_mid_copy(
    tmp_path: Path, source: Path, make_image: ImageMaker, nbdkit_server: NbdkitLauncher
) -> None:
    """file -> nbd (-n): the target server is killed mid-copy and started again; the
    writes it owed go again, and the image holds exactly the source's bytes."""
    target = make_image("dst.raw", "4M", "write -P 0xee 0 4M")
    link = tmp_path / "s"
    first = nbdkit_server("file", [str(target)], filters=SLOW_FILTERS, filter_args=SLOW)
    _point(link, first)
    proc = _start_cli(
        "convert", "-n", "-f", "raw", source, "--target-image-opts",
        _opts(link, reconnect_delay=10),
    )  # fmt: skip
    time.sleep(0.8)
    assert proc.poll() is None, "the copy ended before the server was killed"
    first.kill()
    time.sleep(0.5)
    log = tmp_path / "second.log"
    second = nbdkit_server(
        "file", [str(target)], filters=["log", *SLOW_FILTERS], filter_args=[f"logfile={log}", *SLOW]
    )
    _point(link, second)
    result = _finish(proc)
    assert result.returncode == 0, result.stderr
    second.stop()
    assert "Write" in log.read_text() or "Zero" in log.read_text()
    assert_identical(source, target)


def test_server_that_never_comes_back(
    tmp_path: Path, source: Path, nbdkit_server: NbdkitLauncher
) -> None:
    """After reconnect-delay seconds without a server, one line: the loss, then what
    the last attempt met."""
    link, out = tmp_path / "s", tmp_path / "out.raw"
    first = nbdkit_server(
        "file", [str(source)], readonly=True, filters=SLOW_FILTERS, filter_args=SLOW
    )
    _point(link, first)
    proc = _start_cli("convert", "--image-opts", _opts(link, reconnect_delay=2), "-O", "raw", out)
    time.sleep(0.8)
    first.kill()
    killed = time.monotonic()
    result = _finish(proc)
    elapsed = time.monotonic() - killed
    line = one_line_error(result)
    assert 2.0 <= elapsed < 6, elapsed
    assert "connection to the NBD server lost" in line, line
    assert "not reconnected within 2 s: No such file or directory" in line, line


def test_export_of_another_size_is_not_taken(
    tmp_path: Path, source: Path, make_image: ImageMaker, nbdkit_server: NbdkitLauncher
) -> None:
    """The server comes back with another export: not the one half copied - one line
    at once, not the rest of the delay."""
    other = make_image("other.raw", "8M")
    link, out = tmp_path / "s", tmp_path / "out.raw"
    first = nbdkit_server(
        "file", [str(source)], readonly=True, filters=SLOW_FILTERS, filter_args=SLOW
    )
    _point(link, first)
    proc = _start_cli("convert", "--image-opts", _opts(link, reconnect_delay=30), "-O", "raw", out)
    time.sleep(0.8)
    first.kill()
    _point(link, nbdkit_server("file", [str(other)], readonly=True))
    start = time.monotonic()
    line = one_line_error(_finish(proc))
    assert time.monotonic() - start < 10
    assert f"the export is now {8 << 20} bytes, not {4 << 20}" in line, line


def test_export_refused_on_reconnect_is_final(
    tmp_path: Path, source: Path, nbdkit_server: NbdkitLauncher
) -> None:
    """A server that answers and refuses the export is not asked again: one line at
    once, with its refusal."""
    link, out = tmp_path / "s", tmp_path / "out.raw"
    first = nbdkit_server(
        "file", [str(source)], readonly=True, filters=SLOW_FILTERS, filter_args=SLOW
    )
    _point(link, first)
    proc = _start_cli("convert", "--image-opts", _opts(link, reconnect_delay=30), "-O", "raw", out)
    time.sleep(0.8)
    first.kill()
    strict = nbdkit_server(
        "file",
        [str(source)],
        readonly=True,
        filters=["exportname"],
        filter_args=["exportname=other", "exportname-strict=true"],
    )
    _point(link, strict)
    start = time.monotonic()
    line = one_line_error(_finish(proc))
    assert time.monotonic() - start < 10
    assert "connection to the NBD server lost" in line and "not reconnected" in line, line
    assert "export" in line.split("not reconnected", 1)[1], line


def test_target_back_read_only_is_final(
    tmp_path: Path, source: Path, make_image: ImageMaker, nbdkit_server: NbdkitLauncher
) -> None:
    """The target comes back read-only: the writes it owes cannot go - one line."""
    target = make_image("dst.raw", "4M", "write -P 0xee 0 4M")
    link = tmp_path / "s"
    first = nbdkit_server("file", [str(target)], filters=SLOW_FILTERS, filter_args=SLOW)
    _point(link, first)
    proc = _start_cli(
        "convert", "-n", "-f", "raw", source, "--target-image-opts",
        _opts(link, reconnect_delay=30),
    )  # fmt: skip
    time.sleep(0.8)
    first.kill()
    _point(link, nbdkit_server("file", [str(target)], readonly=True))
    start = time.monotonic()
    line = one_line_error(_finish(proc))
    assert time.monotonic() - start < 10
    assert line.endswith("; not reconnected: the export is now read-only"), line


def test_no_reconnect_by_default(
    tmp_path: Path, source: Path, nbdkit_server: NbdkitLauncher
) -> None:
    """reconnect-delay=0: a lost connection ends the copy at once, as before."""
    link, out = tmp_path / "s", tmp_path / "out.raw"
    first = nbdkit_server(
        "file", [str(source)], readonly=True, filters=SLOW_FILTERS, filter_args=SLOW
    )
    _point(link, first)
    proc = _start_cli("convert", "--image-opts", _opts(link), "-O", "raw", out)
    time.sleep(0.8)
    first.kill()
    _point(link, nbdkit_server("file", [str(source)], readonly=True))
    line = one_line_error(_finish(proc, timeout=10))
    assert "connection to the NBD server lost" in line and "reconnected" not in line, line


# -- objects --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tls-creds-psk", "tls-creds-anon"])
def test_tls_objects_other_than_x509_say_why(kind: str) -> None:
    with pytest.raises(UnsupportedError) as info:
        parse_object(f"{kind},id=t0,dir=/")
    assert str(info.value) == (
        f"Object type '{kind}' is not supported (trioconv speaks TLS with X.509 certificates only)"
    )
