"""HTTP servers that frame their replies in unusual or wrong ways: the right bytes or one
clear line, never the framing's bytes in the image.

The scripted server (:mod:`tests.fake_http`) answers as told. Replies that RFC 9112
allows - chunked bodies (which win over a Content-Length), bodies ended by the close,
bare LF line ends - convert to the served bytes; replies that cannot be trusted - an
encoded body, lengths that are not numbers or disagree, broken chunks - end the
conversion with one line, escaped and short.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ._faults import FAULT_DEADLINE, MiB, one_line_error
from .conftest import run, trioconv_cli
from .fake_http import (
    Behaviour,
    Closing,
    FakeHTTPServer,
    Request,
    chunked,
    head,
    honest,
    partial,
)

#: 3 MiB of random bytes, 1 MiB of zeroes, then a short tail: several range requests,
#: zero detection, and a last range shorter than the others.
IMAGE = os.urandom(3 * MiB) + bytes(MiB) + os.urandom(12800)
#: A Content-Range with more digits than any int64 (Python's int() would take them).
HUGE_RANGE = f"bytes {'1' * 5000}-2/3"


def data_reads(req: Request) -> bool:
    """A range GET for image data (not the one-byte size probe)."""
    return req.method == "GET" and req.range is not None and req.range != (0, 0)


def chunked_and_length(req: Request) -> bytes | None:
    """Transfer-Encoding: chunked beside a Content-Length: the chunks are the body."""
    if not data_reads(req):
        return honest(req)
    assert req.range is not None
    body = req.image[req.range[0] : req.range[1] + 1]
    return partial(req, headers=[("Transfer-Encoding", "chunked")], body=chunked(body))


def chunked_only(req: Request) -> bytes | None:
    if not data_reads(req):
        return honest(req)
    assert req.range is not None
    body = req.image[req.range[0] : req.range[1] + 1]
    extended = chunked(body).replace(b"\r\n", b";ext=1\r\n", 1)  # an ignored extension
    return partial(req, length=False, headers=[("Transfer-Encoding", "Chunked")], body=extended)


def ended_by_close(req: Request) -> bytes | None:
    """No length at all: the body ends where the server closes the connection."""
    if not data_reads(req):
        return honest(req)
    return Closing(partial(req, length=False, headers=[("Connection", "close")]))


def bare_lf(req: Request) -> bytes | None:
    if req.method == "HEAD":
        fields: list[tuple[str, object]] = [
            ("Content-Length", len(req.image)),
            ("Accept-Ranges", "bytes"),
        ]
        return head("200 OK", fields, eol=b"\n")
    return partial(req, eol=b"\n")


def probe_claims_a_gigabyte(req: Request) -> bytes | None:
    """No Accept-Ranges on HEAD, so trioconv probes with ``bytes=0-0``, to which this
    server claims a 1 GiB body (and sends one byte)."""
    if req.method == "HEAD":
        return head("200 OK", [("Content-Length", len(req.image))])
    if req.range == (0, 0):
        fields: list[tuple[str, object]] = [
            ("Content-Range", f"bytes 0-0/{len(req.image)}"),
            ("Content-Length", 1 << 30),
        ]
        return Closing(head("206 Partial Content", fields) + req.image[:1])
    return honest(req)


@pytest.mark.parametrize("behaviour", [chunked_and_length, chunked_only, ended_by_close, bare_lf])
def test_framings_the_protocol_allows(tmp_path: Path, behaviour: Behaviour) -> None:
    out = tmp_path / "out.raw"
    with FakeHTTPServer(IMAGE, behaviour) as server:
        result = trioconv_cli("convert", "-f", "raw", "-O", "raw", server.url(), out)
        assert result.returncode == 0, result.stderr
        assert any(data_reads(r) for r in server.requests)
    assert out.read_bytes() == IMAGE


def closes_after_every_reply(req: Request) -> bytes | None:
    """HTTP/1.1 with a Content-Length and no "Connection: close", and then the close
    anyway (tinyproxy does this): every kept connection is found dead on its next use."""
    reply = honest(req)
    return None if reply is None else Closing(reply)


@pytest.mark.parametrize("parallel", ["1", "8", "16"])
def test_a_server_that_closes_every_connection_silently(tmp_path: Path, parallel: str) -> None:
    out = tmp_path / "out.raw"
    with FakeHTTPServer(IMAGE * 4, closes_after_every_reply) as server:
        result = trioconv_cli(
            "convert", "-m", parallel, "-f", "raw", "-O", "raw", server.url(), out
        )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == IMAGE * 4


def test_a_probe_claiming_a_huge_body_takes_no_memory(tmp_path: Path) -> None:
    """The one-byte probe's body is read only when it is one byte long; memory stays
    bounded by what trioconv asks for, whatever Content-Length says."""
    out = tmp_path / "out.raw"
    with FakeHTTPServer(IMAGE, probe_claims_a_gigabyte) as server:
        code = (
            "import resource, subprocess, sys; "
            "r = subprocess.run([sys.executable, '-m', 'trioconv', *sys.argv[1:]]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.exit(r.returncode)"
        )
        args = ["convert", "-f", "raw", "-O", "raw", server.url(), str(out)]
        result = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
        )
        assert (0, 0) in [r.range for r in server.requests]
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 200 * 1024  # KiB
    assert out.read_bytes() == IMAGE


def on_data(reply: bytes) -> Behaviour:
    """A behaviour that answers every data read with ``reply`` (honest otherwise)."""

    def behaviour(req: Request) -> bytes | None:
        return reply if data_reads(req) else honest(req)

    return behaviour


def with_headers(*fields: tuple[str, object], length: bool = True) -> Behaviour:
    def behaviour(req: Request) -> bytes | None:
        if not data_reads(req):
            return honest(req)
        return partial(req, headers=list(fields), length=length)

    return behaviour


def chunks(body: bytes, *, transfer_encoding: str = "chunked") -> Behaviour:
    """Every data read answered with ``body`` as its chunked body."""

    def behaviour(req: Request) -> bytes | None:
        if not data_reads(req):
            return honest(req)
        fields = [("Transfer-Encoding", transfer_encoding)]
        return partial(req, length=False, headers=fields, body=body)

    return behaviour


def redirect_to(location: str) -> Behaviour:
    def behaviour(req: Request) -> bytes | None:
        if req.method == "HEAD":
            return head("302 Found", [("Location", location), ("Content-Length", 0)])
        return honest(req)

    return behaviour


def encoded_file(req: Request) -> bytes | None:
    if req.method == "HEAD":
        fields: list[tuple[str, object]] = [
            ("Content-Length", len(req.image)),
            ("Accept-Ranges", "bytes"),
            ("Content-Encoding", "gzip"),
        ]
        return head("200 OK", fields)
    return honest(req)


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        (with_headers(("Content-Encoding", "gzip")), "Content-Encoding 'gzip'"),
        (encoded_file, "sends the file with Content-Encoding 'gzip'"),
        (with_headers(("Content-Length", "\u00b2"), length=False), "invalid Content-Length"),
        (with_headers(("Content-Length", "9" * 5000), length=False), "invalid Content-Length"),
        (with_headers(("Content-Length", "1, 2")), "invalid Content-Length"),
        (
            on_data(head("206 Partial Content", [("Content-Range", HUGE_RANGE)])),
            "invalid Content-Range",
        ),
        (chunks(b"zz\r\n"), "invalid chunk size"),
        (chunks(b"%x\r\n" % (8 * MiB) + bytes(64)), "chunked body longer than the range"),
        (chunks(b"10\r\n" + bytes(16) + b"\r\n0\r\n\r\n"), "chunked body shorter than the range"),
        (chunks(b"", transfer_encoding="gzip, chunked"), "Transfer-Encoding 'gzip, chunked'"),
        (on_data(head("500 Internal Server Error", [("Content-Length", 0)])), "HTTP 500"),
        (redirect_to("ftp://example.invalid/\x1b[31mred"), "\\x1b[31mred"),
    ],
)
def test_replies_that_cannot_be_trusted(tmp_path: Path, behaviour: Behaviour, message: str) -> None:
    out = tmp_path / "out.raw"
    with FakeHTTPServer(IMAGE, behaviour) as server:
        started = time.monotonic()
        result = trioconv_cli("convert", "-f", "raw", "-O", "raw", server.url(), out)
    assert time.monotonic() - started < FAULT_DEADLINE
    line = one_line_error(result)
    assert message in line
    assert line.count("error while reading") <= 1
    assert "\x1b" not in line
    assert len(line) < 600
    assert not out.exists()


def replaced_after_first_read() -> Behaviour:
    """A file replaced on the server (same size, new ETag) once its first range was read."""
    reads = 0

    def behaviour(req: Request) -> bytes | None:
        nonlocal reads
        tag = '"v1"' if reads == 0 else '"v2"'
        if req.method == "HEAD":
            fields = [("Content-Length", len(req.image)), ("Accept-Ranges", "bytes"), ("ETag", tag)]
            return head("200 OK", fields)
        if data_reads(req):
            reads += 1
        return partial(req, headers=[("ETag", tag)])

    return behaviour


def test_a_file_replaced_while_read(tmp_path: Path) -> None:
    """The same size but another strong ETag: the bytes would mix two files."""
    out = tmp_path / "out.raw"
    with FakeHTTPServer(IMAGE, replaced_after_first_read()) as server:
        result = trioconv_cli("convert", "-f", "raw", "-m", "1", server.url(), out)
    line = one_line_error(result)
    assert 'the file changed on the server: ETag "v2", "v1" when opened' in line
    assert not out.exists()


def test_passwords_stay_out_of_messages() -> None:
    line = one_line_error(trioconv_cli("info", "http://alice:s3cret@127.0.0.1:99999/disk.img"))
    assert "invalid URL" in line
    assert "alice@127.0.0.1:99999" in line
    assert "s3cret" not in line


def test_a_stalled_server_times_out_as_told(tmp_path: Path) -> None:
    """QEMU's ``timeout`` option bounds each ranged read: a server that stops sending
    mid-copy ends the conversion after that many seconds with one line."""
    import threading

    release = threading.Event()

    def stalls(req: Request) -> bytes | None:
        if data_reads(req) and req.range is not None and req.range[0] >= MiB:
            release.wait(30)
            return None
        return honest(req)

    out = tmp_path / "out.raw"
    with FakeHTTPServer(IMAGE, stalls) as server:
        opts = f"driver=raw,file.driver=http,file.url={server.url()},file.timeout=1"
        started = time.monotonic()
        result = trioconv_cli("convert", "--image-opts", opts, "-O", "raw", out)
        elapsed = time.monotonic() - started
        release.set()
    line = one_line_error(result)
    assert "did not answer in 1 s" in line
    assert elapsed < 10  # (120 s without the option)
    assert not out.exists()
    # Checked as qemu-img checks them (its curl driver): at most 10000 s, 0 for none.
    for option, value, message in (
        ("timeout", "10001", "timeout parameter is too large or negative"),
        ("timeout", "-1", "timeout parameter is too large or negative"),
        ("timeout", "x", "Parameter 'timeout' expects a number"),
        ("readahead", "511", "HTTP_READAHEAD_SIZE 511 is not a multiple of 512"),
        ("readahead", "-5", "Parameter 'readahead' expects a non-negative number below 2^64"),
    ):
        opts = f"driver=raw,file.driver=http,file.url=http://127.0.0.1:1/x,file.{option}={value}"
        bad = trioconv_cli("convert", "--image-opts", opts, "-O", "raw", out)
        assert message in one_line_error(bad)
        theirs = run("qemu-img", "convert", "--image-opts", opts, "-O", "raw", out, check=False)
        assert theirs.returncode == 1 and message in theirs.stderr
    with FakeHTTPServer(IMAGE) as server:
        for option, value in (("timeout", "0"), ("timeout", "10000"), ("readahead", "64k")):
            opts = f"driver=raw,file.driver=http,file.url={server.url()},file.{option}={value}"
            good = trioconv_cli("convert", "--image-opts", opts, "-O", "raw", out)
            assert good.returncode == 0, good.stderr
            assert out.read_bytes() == IMAGE


@pytest.mark.parametrize(
    "url", ["http://nonexistent.invalid/disk.img", "nfs://nonexistent.invalid/export/disk.img"]
)
def test_a_host_that_does_not_resolve_is_named_so(tmp_path: Path, url: str) -> None:
    """The resolver's error has its own numbers: said in words, not "Unknown error -2"."""
    line = one_line_error(trioconv_cli("convert", "-O", "raw", url, tmp_path / "out.raw"))
    assert "Could not resolve host" in line and "Unknown error" not in line
    assert not (tmp_path / "out.raw").exists()


def test_opening_asks_head_once(tmp_path: Path) -> None:
    """One HEAD learns the size (and follows no redirect here): a slow server is not
    asked twice, and a ``timeout`` that suits qemu-img suits trioconv."""
    with FakeHTTPServer(IMAGE) as server:
        result = trioconv_cli("info", server.url())
        heads = [r for r in server.requests if r.method == "HEAD"]
    assert result.returncode == 0, result.stderr
    assert len(heads) == 1
    assert heads[0].headers["accept-encoding"] == "identity"


def test_cookies_as_qemu_img_sends_them(tmp_path: Path) -> None:
    """``cookie`` (or a ``cookie-secret``) goes with every request, as with qemu-img's
    curl driver; both at once are refused."""

    def needs_the_cookie(req: Request) -> bytes | None:
        if req.headers.get("cookie") != "session=abc; theme=dark":
            return Closing(head("403 Forbidden", [("Content-Length", 0)]))
        return honest(req)

    out = tmp_path / "out.raw"
    with FakeHTTPServer(IMAGE, needs_the_cookie) as server:
        base = f"driver=raw,file.driver=http,file.url={server.url()}"
        refused = trioconv_cli("convert", "--image-opts", base, "-O", "raw", out)
        assert "403" in one_line_error(refused)
        cookie = base + ",file.cookie=session=abc; theme=dark"
        result = trioconv_cli("convert", "--image-opts", cookie, "-O", "raw", out)
        assert result.returncode == 0, result.stderr
        assert out.read_bytes() == IMAGE
        secret = ["--object", "secret,id=c0,data=session=abc; theme=dark"]
        hidden = base + ",file.cookie-secret=c0"
        result = trioconv_cli("convert", *secret, "--image-opts", hidden, "-O", "raw", out)
        assert result.returncode == 0, result.stderr
        assert all(r.headers.get("cookie") for r in server.requests[-3:])
        both = trioconv_cli("convert", *secret, "--image-opts", cookie + ",file.cookie-secret=c0",
                            "-O", "raw", out)  # fmt: skip
        assert "both cookie and cookie secret" in one_line_error(both)
