"""HTTP(S) sources as a user of ``qemu-img convert https://...`` meets them.

Each test here is a situation a real server puts a client in - a redirection whose
``Location`` holds raw UTF-8, a server that refuses ``HEAD`` and redirects ``GET``, a
slow server with more reads queued than connections, a file shrunk on the server
mid-copy, a signed URL that expires mid-copy, a body sent after an answer to ``HEAD``,
an IPv6 address with a user and password, a self-signed certificate accepted in
``json:`` - and checks that trioconv either reads the right bytes (compared with
``qemu-img compare`` or byte for byte) or ends with one clear line.

nginx (:mod:`tests.http_server`) plays the servers that behave; the scripted server
(:mod:`tests.fake_http`) plays the ones that cannot be made to misbehave on purpose.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import attrs
import pytest
import trio

import trioconv
from trioconv.protocols.http import open_http, parse_http_uri

from ._faults import MiB, one_line_error
from .conftest import ImageMaker, assert_identical, run, trioconv_cli
from .fake_http import FakeHTTPServer, Request, head, honest
from .http_server import HTTPServerLauncher, TLSCerts

#: Random data, a run of zeroes, and a tail shorter than a cluster (a whole number of
#: 512-byte sectors: qemu-img convert rounds a raw target up to one).
IMAGE = os.urandom(2 * MiB) + bytes(MiB) + os.urandom(9 * 512)


@pytest.fixture(autouse=True)
def _no_proxy_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """The servers here are local: a proxy set in the environment must not stand between."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def moved(status: str, location: str) -> bytes:
    """A redirection to ``location`` (a ``str`` whose characters are the raw bytes sent:
    ``"/\\u00e9".encode().decode("latin-1")`` sends the UTF-8 of ``/é``)."""
    return head(status, [("Location", location), ("Content-Length", 0)])


def test_a_location_in_raw_utf8_is_percent_encoded_once(tmp_path: Path) -> None:
    """Servers send non-ASCII ``Location`` values as raw UTF-8 bytes; curl (and so
    qemu-img) percent-encodes those bytes as they are. Decoding them as Latin-1 first
    would ask for ``%C3%83%C2%A9`` instead of ``%C3%A9`` - a 404, or here a loop."""
    raw = "/images/\u00e9t\u00e9 v1.img".encode().decode("latin-1")

    def behaviour(req: Request) -> bytes | None:
        if req.target == "/images/%C3%A9t%C3%A9%20v1.img":
            return honest(req)
        return moved("302 Found", raw)

    out = tmp_path / "out.raw"
    with FakeHTTPServer(IMAGE, behaviour) as server:
        result = trioconv_cli("convert", "-f", "raw", "-O", "raw", server.url(), out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == IMAGE


def test_head_refused_and_get_redirected(tmp_path: Path) -> None:
    """A server that does not allow ``HEAD`` (405) is asked for the first byte with
    ``GET``; when that ``GET`` is redirected, the redirection is followed as one of
    ``HEAD`` is, and the reads go to where it leads."""

    def behaviour(req: Request) -> bytes | None:
        if req.method == "HEAD":
            return head("405 Method Not Allowed", [("Allow", "GET"), ("Content-Length", 0)])
        if req.target != "/store/disk.img?sig=a%2Fb":
            return moved("307 Temporary Redirect", "store/disk.img?sig=a%2Fb")
        return honest(req)

    out = tmp_path / "out.raw"
    with FakeHTTPServer(IMAGE, behaviour) as server:
        result = trioconv_cli("convert", "-f", "raw", "-O", "raw", server.url("/disk.img"), out)
        reads = [r.target for r in server.requests if r.range not in (None, (0, 0))]
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == IMAGE
    assert reads and set(reads) == {"/store/disk.img?sig=a%2Fb"}


def test_a_redirection_loop_found_by_get_ends(tmp_path: Path) -> None:
    """Redirections of the one-byte ``GET`` count against the same limit as ``HEAD``'s."""

    def behaviour(req: Request) -> bytes | None:
        if req.method == "HEAD":
            return head("405 Method Not Allowed", [("Content-Length", 0)])
        return moved("302 Found", "/again")

    with FakeHTTPServer(IMAGE, behaviour) as server:
        started = time.monotonic()
        line = one_line_error(trioconv_cli("info", server.url()))
    assert time.monotonic() - started < 15
    assert "redirected more than 10 times" in line


async def test_the_timeout_counts_the_servers_time_not_the_queue() -> None:
    """``timeout`` bounds how long the server takes over a read. Reads waiting for one
    of the connections (more in flight than connections: ``-m 16``) have not been sent
    yet; counting their wait would fail a copy from a server that answers every read
    in time, with a message that blames the server."""
    delay = 1.2  # each read; two rounds of reads (2.4 s) exceed the 2 s timeout

    def slow(req: Request) -> bytes | None:
        if req.method == "GET" and req.range != (0, 0):
            time.sleep(delay)
        return honest(req)

    reads = 12  # more than the connections of one server (8)
    with FakeHTTPServer(IMAGE, slow) as server:
        async with open_http(server.url(), timeout=2) as drv:
            got: dict[int, bytes] = {}

            async def read(offset: int) -> None:
                got[offset] = await drv.pread(offset, 4096)

            async with trio.open_nursery() as nursery:
                for i in range(reads):
                    nursery.start_soon(read, i * 100_000)
    assert got == {i * 100_000: IMAGE[i * 100_000 : i * 100_000 + 4096] for i in range(reads)}


async def test_a_stalled_server_still_times_out() -> None:
    """The other side of the test above: a read the server does not finish fails
    after ``timeout`` seconds, naming the server."""
    release = threading.Event()

    def stalls(req: Request) -> bytes | None:
        if req.method == "GET" and req.range != (0, 0):
            release.wait(20)
            return None
        return honest(req)

    with FakeHTTPServer(IMAGE, stalls) as server:
        try:
            async with open_http(server.url(), timeout=1) as drv:
                started = trio.current_time()
                with pytest.raises(trioconv.TrioconvIOError, match="did not answer in 1 s"):
                    await drv.pread(0, 4096)
                assert trio.current_time() - started < 5
        finally:
            release.set()


async def test_a_file_shrunk_on_the_server_is_named_so(
    http_server: HTTPServerLauncher, tmp_path: Path
) -> None:
    """nginx answers a range beyond a file that shrank with ``416`` and the new size in
    ``Content-Range: bytes */SIZE``; the message says what happened, as it does when
    a ``206`` shows another size."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "disk.raw").write_bytes(IMAGE)
    server = http_server(root)
    async with open_http(server.url("disk.raw")) as drv:
        assert await drv.pread(0, 4096) == IMAGE[:4096]
        os.truncate(root / "disk.raw", MiB)
        with pytest.raises(trioconv.TrioconvIOError) as info:
            await drv.pread(2 * MiB, 4096)
    message = str(info.value)
    assert f"the file changed size on the server: {MiB} bytes, {len(IMAGE)} when opened" in (
        message
    )
    assert "at byte 2097152" in message


def test_redirections_of_every_kind_to_a_qcow2(
    http_server: HTTPServerLauncher, tmp_path: Path, make_image: ImageMaker
) -> None:
    """301, 302, 303, 307 and 308, absolute and relative, lead to a qcow2 image that is
    then read at random through the format driver: the converted image is identical to
    what qemu-img reads from the file itself."""
    root = tmp_path / "www"
    (root / "images").mkdir(parents=True)
    src = make_image("src.raw", "6M", "write -P 0x5a 0 1M", "write -P 0xc3 4M 300k")
    qcow2 = root / "images" / "disk.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", src, qcow2)
    extra = "absolute_redirect off;\n" + "".join(
        f"location = /r{code} {{ return {code} {target}; }}\n"
        for code, target in (
            (301, "/images/disk.qcow2"),
            (302, "images/disk.qcow2"),
            (303, "./images/../images/disk.qcow2"),
            (307, "/r308"),
            (308, "/images/disk.qcow2?v=1"),
        )
    )
    server = http_server(root, extra=extra)
    for code in (301, 302, 303, 307, 308):
        out = tmp_path / f"out-{code}.qcow2"
        result = trioconv_cli("convert", "-O", "qcow2", server.url(f"r{code}"), out)
        assert result.returncode == 0, result.stderr
        assert_identical(qcow2, out, "qcow2", "qcow2")
        run("qemu-img", "check", out)


def test_an_ipv6_literal_with_userinfo_and_a_query(tmp_path: Path) -> None:
    """``http://user:password@[::1]:PORT/path?query``: the address in brackets, the
    percent-encoded user and password decoded into Basic authentication, the query and
    its escapes sent as they were written, the Host header with its brackets."""

    def needs_alice(req: Request) -> bytes | None:
        if req.headers.get("authorization") != "Basic YUBiOnA6dyBk":  # a@b:p:w d
            return head("401 Unauthorized", [("Content-Length", 0)])
        return honest(req)

    out = tmp_path / "out.raw"
    with FakeHTTPServer(IMAGE, needs_alice, host="::1") as server:
        url = server.url("/d%20isk.img?sig=a%2Fb&x=1").replace("://", "://a%40b:p%3Aw%20d@")
        result = trioconv_cli("convert", "-f", "raw", "-O", "raw", url, out)
        seen = {(r.target, r.headers["host"]) for r in server.requests}
        line = one_line_error(trioconv_cli("info", url.replace("p%3Aw%20d@", "wrong@")))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == IMAGE
    assert seen == {("/d%20isk.img?sig=a%2Fb&x=1", f"[::1]:{server.port}")}
    assert "HTTP 401" in line and "wrong" not in line and f"a%40b@[::1]:{server.port}" in line


@pytest.mark.parametrize(
    "spec",
    [
        '{"file.driver": "https", "file.url": "URL", "file.sslverify": "off"}',
        '{"driver": "raw", "file": {"driver": "https", "url": "URL", "sslverify": false}}',
    ],
)
def test_https_self_signed_with_sslverify_off_in_json(
    http_server: HTTPServerLauncher, http_tls_certs: TLSCerts, tmp_path: Path, spec: str
) -> None:
    """``json:`` takes ``sslverify`` as qemu-img does, as a string or a JSON boolean;
    without it the unknown certificate is refused."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "disk.raw").write_bytes(IMAGE)
    url = http_server(root, tls=http_tls_certs).url("disk.raw")
    out = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-O", "raw", "json:" + spec.replace("URL", url), out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == IMAGE
    out.unlink()
    strict = spec.replace('"off"', '"on"').replace("false", "true")
    line = one_line_error(
        trioconv_cli("convert", "-O", "raw", "json:" + strict.replace("URL", url), out)
    )
    assert "certificate could not be verified" in line
    assert not out.exists()


class SignedRedirects:
    """A download link that redirects to a signed URL valid for ``uses`` data reads, as
    release pages and object stores hand them out: the signature then expires (403) and
    a new one is had by following the link again. curl - so qemu-img - follows the
    link for every read; trioconv follows it again when the signed URL stops working.
    """

    def __init__(self, uses: int) -> None:
        self.uses = uses
        self.generation = 0
        self.reads_left = uses
        self.lock = threading.Lock()
        self.links_followed = 0

    def __call__(self, req: Request) -> bytes | None:
        with self.lock:
            if req.target == "/download/disk.img":
                self.links_followed += 1
                return moved("302 Found", f"/signed/disk.img?sig={self.generation}")
            if req.target != f"/signed/disk.img?sig={self.generation}":
                return head("403 Forbidden", [("Content-Length", 9)]) + b"expired\r\n"
            if req.method == "GET" and req.range not in (None, (0, 0)):
                self.reads_left -= 1
                if self.reads_left == 0:  # this read is the signature's last
                    self.generation += 1
                    self.reads_left = self.uses
        return honest(req)


@pytest.mark.parametrize(
    ("parallel", "uses", "signatures"),
    [
        ("1", 2, 3),  # one read at a time: the link is followed again for reads 3 and 5
        ("8", 3, 2),  # the reads at once: 2 of 5 fail together, one new signature for both
    ],
)
def test_a_signed_redirection_that_expires_is_followed_again(
    tmp_path: Path, parallel: str, uses: int, signatures: int
) -> None:
    image = IMAGE * 3  # five 2 MiB reads
    link = SignedRedirects(uses)
    out = tmp_path / "out.raw"
    with FakeHTTPServer(image, link) as server:
        url = server.url("/download/disk.img")
        result = trioconv_cli("convert", "-m", parallel, "-f", "raw", "-O", "raw", url, out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == image
    assert link.links_followed == signatures


def test_a_link_that_stops_working_ends_with_the_reads_error(tmp_path: Path) -> None:
    """When following the link again does not help (the file is gone), the read fails
    with the status it got, once."""
    state = {"gone": False}

    def behaviour(req: Request) -> bytes | None:
        if state["gone"]:
            return head("404 Not Found", [("Content-Length", 0)])
        if req.target == "/download/disk.img":
            return moved("302 Found", "/signed/disk.img")
        if req.method == "GET" and req.range not in (None, (0, 0)):
            state["gone"] = True
        return honest(req)

    out = tmp_path / "out.raw"
    with FakeHTTPServer(IMAGE, behaviour) as server:
        url = server.url("/download/disk.img")
        args = ("convert", "-m", "1", "-f", "raw", "-O", "raw", url, out)
        line = one_line_error(trioconv_cli(*args))
    assert "at byte 2097152: HTTP 404 Not Found" in line
    assert not out.exists()


def test_credentials_follow_a_redirection_only_to_the_same_server() -> None:
    """The user, password and cookie go along to the same scheme, host and port only,
    as curl sends them: not to another host, another port, nor from TLS to clear text."""
    start = attrs.evolve(parse_http_uri("https://alice:pw@images.example:8443/d.img"), cookie="s=1")
    same = start.follow("/elsewhere/d.img?sig=1")
    assert (same.user, same.password, same.cookie) == ("alice", "pw", "s=1")
    assert same.target == "/elsewhere/d.img?sig=1"
    for location in (
        "https://cdn.example:8443/d.img",
        "https://images.example/d.img",
        "http://images.example:8443/d.img",
    ):
        away = start.follow(location)
        assert (away.user, away.password, away.cookie) == (None, None, None), location
        assert away.auth_header() == []


def test_a_body_sent_after_a_head_reply_is_not_taken_for_the_next_reply(
    tmp_path: Path,
) -> None:
    """Some servers send the file after their answer to ``HEAD`` (which has no body).
    What is left of it on the kept connection is not a reply: the read that finds it
    there is sent again on a new connection, as curl drops such a connection."""

    def head_with_a_body(req: Request) -> bytes | None:
        reply = honest(req)
        if req.method == "HEAD" and reply is not None:
            return reply + req.image[:200_000]
        return reply

    out = tmp_path / "out.raw"
    with FakeHTTPServer(IMAGE, head_with_a_body) as server:
        result = trioconv_cli("convert", "-m", "1", "-f", "raw", "-O", "raw", server.url(), out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == IMAGE


def test_proxies_from_the_environment_as_curl_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``HTTP_PROXY`` in capitals is not read (curl leaves it alone: on a web server it
    holds a client's ``Proxy:`` header), so a copy qemu-img makes directly is made
    directly; a proxy trioconv cannot use (``socks5://``) is named as the proxy, not
    taken for the image."""
    from .nbd_servers import _free_port

    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("HTTP_PROXY", dead)
    out = tmp_path / "out.raw"
    with FakeHTTPServer(IMAGE) as server:
        result = trioconv_cli("convert", "-f", "raw", "-O", "raw", server.url(), out)
        assert result.returncode == 0, result.stderr
        assert out.read_bytes() == IMAGE
        theirs = run("qemu-img", "info", server.url(), check=False)
        assert theirs.returncode == 0, theirs.stderr
        monkeypatch.setenv("http_proxy", dead)  # the lower-case name is read
        line = one_line_error(trioconv_cli("info", server.url()))
        assert "refused" in line.lower()
        monkeypatch.delenv("http_proxy")
        monkeypatch.setenv("ALL_PROXY", "socks5://user:pw@127.0.0.1:1080")
        line = one_line_error(trioconv_cli("info", server.url()))
    assert f"Could not open '{server.url()}': the proxy 'socks5://user@127.0.0.1:1080'" in line
    assert "pw" not in line.replace(server.url(), "")


@pytest.mark.parametrize(
    "answer",
    [
        head("200 OK", [("Accept-Ranges", "bytes")]),  # no Content-Length
        head("200 OK", [("Accept-Ranges", "bytes"), ("Transfer-Encoding", "chunked")]),
        head("200 OK", [("Content-Length", len(IMAGE)), ("Accept-Ranges", "none")]),
        head("405 Method Not Allowed", [("Content-Length", 0)]),
        head("501 Not Implemented", [("Content-Length", 0)]),
    ],
    ids=["no-length", "chunked", "ranges-none", "405", "501"],
)
def test_the_size_when_head_does_not_tell_it(tmp_path: Path, answer: bytes) -> None:
    """When the answer to ``HEAD`` leaves the size or the byte ranges in doubt, one
    ``GET`` of byte 0 settles both (``Content-Range: bytes 0-0/SIZE``)."""

    def behaviour(req: Request) -> bytes | None:
        return answer if req.method == "HEAD" else honest(req)

    out = tmp_path / "out.raw"
    with FakeHTTPServer(IMAGE, behaviour) as server:
        result = trioconv_cli("convert", "-f", "raw", "-O", "raw", server.url(), out)
        probes = [r for r in server.requests if r.range == (0, 0)]
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == IMAGE
    assert len(probes) == 1
