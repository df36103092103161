"""trioconv's NBD client against qemu-nbd as deployments run it.

virt-v2v, oVirt's imageio, KubeVirt's CDI and backup tools put a disk behind
``qemu-nbd -f qcow2 --persistent --shared=N -t`` and read or write it over NBD. These
tests do the same and hold trioconv to what QEMU itself sees:

* block status of a qcow2 export (data, zero clusters, unallocated ranges, a backing
  file) is what ``qemu-img map`` says of the image;
* what trioconv writes into a qcow2 or raw export (``-n``, with ``--discard`` and
  ``--detect-zeroes``, into a backing chain, with ``--target-is-zero``) is, once
  qemu-nbd has exited, identical to the source for ``qemu-img compare`` and clean for
  ``qemu-img check``; write-zeroes keeps or frees clusters as ``may_unmap`` asks;
* a read-only export, an unknown export name, a server that wants TLS, a client
  certificate or a pre-shared key (which trioconv does not speak), bitmaps over NBD
  (which trioconv does not claim): one line, exit status 1, nothing written;
* the server's own log stays clean. qemu-nbd logs every client that hangs up in the
  middle of the negotiation (``option negotiation failed: ...``), and operators watch
  that log: a refused option ends with ``NBD_OPT_ABORT``, and the extra connections of
  a multi-conn export that are still negotiating when the work is done finish their
  handshake and say goodbye instead of vanishing.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

import trioconv
from trioconv import ExtentKind
from trioconv.protocols.nbd import _proto as proto
from trioconv.protocols.nbd import open_nbd
from trioconv.protocols.nbd._client import HANDSHAKE_GRACE

from .conftest import (
    assert_identical,
    create_filled,
    qemu_map,
    require_tool,
    run,
    trioconv_cli,
    walk_extents,
)
from .fake_nbd import FakeNBDServer
from .nbd_servers import NBDServer, QemuNbdLauncher, TLSCerts, make_tls_certs

MiB = 1024 * 1024
KiB = 1024

#: What qemu-nbd writes to its log when a client hangs up while negotiating.
NEGOTIATION_FAILED = "option negotiation failed"


# -- helpers -------------------------------------------------------------------------------


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """Exit status 1, no traceback, exactly one ``trioconv: ...`` line; return it."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("trioconv: "), result.stderr
    return lines[0]


def server_log(server: NBDServer, settle: float = 0.3) -> str:
    """The server's log, after giving it ``settle`` seconds to notice a hang-up."""
    time.sleep(settle)
    return server.stderr()


def runs(extents: list[dict[str, object]]) -> list[tuple[int, int, bool]]:
    """``qemu-img map`` entries as merged ``(start, end, reads_as_zero)`` runs."""
    merged: list[tuple[int, int, bool]] = []
    for e in extents:
        start, length = int(str(e["start"])), int(str(e["length"]))
        zero = bool(e["zero"])
        if merged and merged[-1][1] == start and merged[-1][2] == zero:
            merged[-1] = (merged[-1][0], start + length, zero)
        else:
            merged.append((start, start + length, zero))
    return merged


def make_client_cert(certs: TLSCerts) -> Path:
    """A folder with the CA and a client certificate signed by it (``client-cert.pem``,
    ``client-key.pem``: the names qemu's ``tls-creds-x509`` reads)."""
    openssl = require_tool("openssl")
    folder = certs.client_dir.parent / "with-client-cert"
    folder.mkdir()
    (folder / "ca-cert.pem").write_bytes(certs.ca_cert.read_bytes())
    work = certs.client_dir.parent / "ca"
    (work / "client.ext").write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = clientAuth\n"
    )
    steps: list[list[str | Path]] = [
        ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", folder / "client-key.pem", "-out", work / "client.csr",
         "-subj", "/CN=trioconv test client"],
        ["x509", "-req", "-days", "30", "-in", work / "client.csr",
         "-CA", certs.server_dir / "ca-cert.pem", "-CAkey", work / "ca-key.pem",
         "-set_serial", "3", "-extfile", work / "client.ext",
         "-out", folder / "client-cert.pem"],
    ]  # fmt: skip
    for args in steps:
        run(openssl, *args)
    return folder


@pytest.fixture
def qcow2_chain(tmp_path: Path) -> Path:
    """A qcow2 over a qcow2 backing file: data in either layer, zero clusters that hide
    backing data (one allocated, one not), unallocated ranges over backing data and past
    it, and a partly written cluster."""
    base = create_filled(tmp_path / "base.qcow2", "qcow2", "4M", "write -P 0xaa 0 2M")
    return create_filled(
        tmp_path / "top.qcow2",
        "qcow2",
        "4M",
        "write -P 0xbb 64k 64k",
        "write -z 512k 128k",  # zero clusters over backing data
        "write -z -u 1M 64k",  # (may be unmapped)
        "write -P 0xcc 3M 4k",  # part of a cluster past the backing data
        "write -z 3584k 64k",
        backing=str(base),
        backing_fmt="qcow2",
    )


@pytest.fixture
def mixed_src(tmp_path: Path) -> Path:
    """8 MiB raw: data, written zeroes, holes, an island of data."""
    return create_filled(
        tmp_path / "mixed.img",
        "raw",
        "8M",
        "write -P 0xab 0 1M",
        "write -z 2M 1M",
        "write -P 0xcd 3M 512k",
        "write -P 0x11 5184k 32k",
    )


# -- reading: block status -----------------------------------------------------------------


async def test_block_status_of_a_qcow2_chain_is_what_qemu_img_map_says(
    qemu_nbd_server: QemuNbdLauncher, qcow2_chain: Path, tmp_path: Path
) -> None:
    """``qemu-nbd -f qcow2 -r -A`` of a chain: each extent trioconv reports reads as
    zero exactly where ``qemu-img map`` of the image says so (zero clusters, and the
    unallocated ranges past the backing data) and is data elsewhere (either layer). The
    ``qemu:allocation-depth`` context the server also offers is not asked for and does
    not confuse the client. A conversion to qcow2 copies what is data, no more."""
    server = qemu_nbd_server(qcow2_chain, fmt="qcow2", readonly=True, options=["-A"])
    async with trioconv.open_image(server.uri, "raw") as image:
        seen = await walk_extents(image.block_status, image.size)
    ours: list[tuple[int, int, bool]] = []
    for start, length, kind in seen:
        zero = kind is not ExtentKind.DATA
        if ours and ours[-1][1] == start and ours[-1][2] == zero:
            ours[-1] = (ours[-1][0], start + length, zero)
        else:
            ours.append((start, start + length, zero))
    expected = runs(qemu_map(qcow2_chain, "qcow2"))
    assert ours == expected
    assert ours == [
        (0, 512 * KiB, False),
        (512 * KiB, 640 * KiB, True),
        (640 * KiB, MiB, False),
        (MiB, MiB + 64 * KiB, True),
        (MiB + 64 * KiB, 2 * MiB, False),
        (2 * MiB, 3 * MiB, True),
        (3 * MiB, 3 * MiB + 64 * KiB, False),
        (3 * MiB + 64 * KiB, 4 * MiB, True),
    ]

    out = tmp_path / "out.qcow2"
    result = trioconv_cli("convert", "-f", "raw", "-O", "qcow2", server.uri, out)
    assert result.returncode == 0, result.stderr
    run("qemu-img", "check", "-q", out)
    assert_identical(qcow2_chain, out, "qcow2", "qcow2")
    data = [(s, e) for s, e, zero in runs(qemu_map(out, "qcow2")) if not zero]
    assert data == [(s, e) for s, e, zero in expected if not zero]


# -- writing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options", "chain"),
    [
        pytest.param("qcow2", [], False, id="qcow2"),
        pytest.param("qcow2", ["--discard=unmap", "--detect-zeroes=unmap"], True, id="chain"),
        pytest.param("raw", ["--discard=unmap", "--detect-zeroes=unmap"], False, id="raw"),
    ],
)
def test_writing_into_a_qemu_nbd_export(
    qemu_nbd_server: QemuNbdLauncher,
    mixed_src: Path,
    tmp_path: Path,
    fmt: str,
    options: list[str],
    chain: bool,
) -> None:
    """``trioconv convert -n`` into ``qemu-nbd -f FMT -t`` of an image full of old bytes
    (or a qcow2 whose backing file holds data everywhere): once qemu-nbd has exited, the
    image is what the source is - no old byte and no backing byte shows through the
    zeroes - and a qcow2 passes ``qemu-img check``."""
    target = tmp_path / f"target.{fmt}"
    if chain:
        base = create_filled(tmp_path / "base.qcow2", "qcow2", "8M", "write -P 0xee 0 8M")
        create_filled(target, fmt, "8M", backing=str(base), backing_fmt="qcow2")
    else:
        create_filled(target, fmt, "8M", "write -P 0xee 0 8M")
    server = qemu_nbd_server(target, fmt=fmt, shared=4, options=options)
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "raw", mixed_src, server.uri)
    assert result.returncode == 0, result.stderr
    assert server.stop() == 0
    assert NEGOTIATION_FAILED not in server.stderr()
    if fmt == "qcow2":
        run("qemu-img", "check", "-q", target)
    assert_identical(mixed_src, target, "raw", fmt)


def test_target_is_zero_into_a_fresh_qcow2_export(
    qemu_nbd_server: QemuNbdLauncher, mixed_src: Path, tmp_path: Path
) -> None:
    """``-n --target-is-zero`` into a new qcow2 behind qemu-nbd: nothing is zeroed, so
    only the data clusters are allocated; without ``-n`` it is refused, as qemu-img
    refuses it."""
    target = create_filled(tmp_path / "fresh.qcow2", "qcow2", "8M")
    server = qemu_nbd_server(target, fmt="qcow2")
    uri = server.uri
    line = one_line(trioconv_cli("convert", "--target-is-zero", "-O", "raw", mixed_src, uri))
    assert line == "trioconv: --target-is-zero requires use of -n flag"
    result = trioconv_cli("convert", "-n", "--target-is-zero", "-O", "raw", mixed_src, uri)
    assert result.returncode == 0, result.stderr
    server.stop()
    run("qemu-img", "check", "-q", target)
    assert_identical(mixed_src, target, "raw", "qcow2")
    allocated = [(s, e) for s, e, zero in runs(qemu_map(target, "qcow2")) if not zero]
    assert allocated == [(0, MiB), (3 * MiB, 3 * MiB + 512 * KiB), (5184 * KiB, 5248 * KiB)]


async def test_write_zeroes_keeps_or_frees_clusters_as_asked(
    qemu_nbd_server: QemuNbdLauncher, tmp_path: Path
) -> None:
    """Write-zeroes without ``may_unmap`` (``NBD_CMD_FLAG_NO_HOLE``) leaves the clusters
    allocated (zeroed in place, as a preallocated target needs); with it, qemu-nbd
    ``--discard=unmap`` frees them. Both read as zeroes."""
    image = create_filled(tmp_path / "full.qcow2", "qcow2", "4M", "write -P 0x5a 0 4M")
    server = qemu_nbd_server(image, fmt="qcow2", options=["--discard=unmap"])
    async with trioconv.open_image(server.uri, "raw", writable=True) as nbd:
        await nbd.pwrite_zeroes(0, MiB, may_unmap=False)
        await nbd.pwrite_zeroes(MiB, MiB, may_unmap=True)
        await nbd.flush()
    server.stop()
    run("qemu-img", "check", "-q", image)
    entries = qemu_map(image, "qcow2")
    by_start = {int(e["start"]): e for e in entries}
    kept, freed = by_start[0], by_start[MiB]
    assert kept["zero"] and kept["length"] == MiB and "offset" in kept, entries
    assert freed["zero"] and freed["length"] == MiB and "offset" not in freed, entries
    expected = create_filled(tmp_path / "expected.img", "raw", "4M", "write -P 0x5a 2M 2M")
    assert_identical(expected, image, "raw", "qcow2")


def test_an_odd_sized_raw_file_behind_qemu_nbd(
    qemu_nbd_server: QemuNbdLauncher, tmp_path: Path
) -> None:
    """qemu-nbd serves a 1000-byte raw file as 1024 bytes (whole sectors): trioconv
    reads and writes it exactly as qemu-img does, byte for byte."""
    content = os.urandom(1000)
    source = tmp_path / "odd.raw"
    source.write_bytes(content)
    served = qemu_nbd_server(source, fmt="raw", readonly=True)
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", served.uri, ours)
    assert result.returncode == 0, result.stderr
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri, theirs)
    assert ours.read_bytes() == theirs.read_bytes() == content + bytes(24)

    targets = []
    for who in ("ours", "theirs"):
        target = tmp_path / f"target-{who}.raw"
        target.write_bytes(b"\xee" * 1000)
        targets.append((target, qemu_nbd_server(target, fmt="raw")))
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "raw", source, targets[0][1].uri)
    assert result.returncode == 0, result.stderr
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, targets[1][1].uri)
    for _, server in targets:
        server.stop()
    assert targets[0][0].read_bytes() == targets[1][0].read_bytes() == content + bytes(24)


# -- refusals --------------------------------------------------------------------------------


def test_a_read_only_export_is_refused_before_any_request(
    qemu_nbd_server: QemuNbdLauncher, mixed_src: Path, tmp_path: Path
) -> None:
    """``qemu-nbd -r`` as the target, with ``-n`` or without, to raw or qcow2: one line
    that says the export is read-only; the image is untouched; the server logs no
    failure. On the wire (a scripted server that says read-only): no request is sent
    but ``NBD_CMD_DISC``, the goodbye the protocol asks for."""
    image = create_filled(tmp_path / "ro.raw", "raw", "8M", "write -P 0x77 0 8M")
    before = image.read_bytes()
    server = qemu_nbd_server(image, fmt="raw", readonly=True)
    for args in (["-n", "-O", "raw"], ["-O", "raw"], ["-n", "-O", "qcow2"]):
        line = one_line(trioconv_cli("convert", *args, "-f", "raw", mixed_src, server.uri))
        assert line == f"trioconv: Could not open '{server.uri}': the export is read-only"
    assert image.read_bytes() == before
    assert NEGOTIATION_FAILED not in server_log(server)

    with FakeNBDServer(tmp_path / "ro.sock", size=8 * MiB, extra_flags=2) as fake:
        line = one_line(trioconv_cli("convert", "-n", "-O", "raw", mixed_src, fake.uri))
        assert line.endswith("the export is read-only")
        deadline = time.monotonic() + 5
        while fake.disconnects < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake.requests == []
        assert fake.disconnects == 1


def test_refused_options_end_with_an_abort(
    qemu_nbd_server: QemuNbdLauncher, tmp_path: Path
) -> None:
    """An export name qemu-nbd does not have, and a plain connection to a server that
    requires TLS: one line with the server's own words, and the client leaves with
    ``NBD_OPT_ABORT`` as qemu-img does - qemu-nbd logs nothing (a client that just
    hangs up is logged as a failed negotiation)."""
    image = create_filled(tmp_path / "disk.raw", "raw", "1M")
    server = qemu_nbd_server(image, fmt="raw", readonly=True, export_name="disk")
    wrong = server.uri.replace("/disk?", "/nope?")
    line = one_line(trioconv_cli("info", wrong))
    assert line == (
        f"trioconv: Could not open '{wrong}': server refused export 'nope': "
        "unknown export (export 'nope' not present)"
    )
    certs = make_tls_certs(tmp_path / "tls")
    tls = qemu_nbd_server(image, fmt="raw", readonly=True, tls=certs)
    line = one_line(trioconv_cli("info", f"nbd+unix:///?socket={tls.socket}"))
    assert "TLS required (use an nbds:// or nbds+unix:// URI)" in line
    for s in (server, tls):
        assert NEGOTIATION_FAILED not in server_log(s), s.stderr()


def test_export_names_that_need_escaping_and_a_description(
    qemu_nbd_server: QemuNbdLauncher, mixed_src: Path, tmp_path: Path
) -> None:
    """``qemu-nbd -x 'vm disk%20/1' -D '...'``: the name percent-encoded in the URI
    (a space, a percent sign, a slash) reaches qemu-nbd as it is; info says what
    qemu-img says, and the copy is identical."""
    name = "vm disk%20/1"
    server = qemu_nbd_server(
        mixed_src, fmt="raw", readonly=True, export_name=name, options=["-D", "the VM's disk"]
    )
    uri = server.uri
    assert "/vm%20disk%2520%2F1?" in uri
    ours = trioconv_cli("info", "--output", "json", uri)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == run("qemu-img", "info", "--output=json", uri).stdout
    out = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", uri, out)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, out)


def test_bitmaps_over_nbd_are_not_claimed(qemu_nbd_server: QemuNbdLauncher, tmp_path: Path) -> None:
    """trioconv reads no ``qemu:dirty-bitmap:NAME`` context: ``x-dirty-bitmap`` is
    refused by name, ``--bitmaps`` from an export fails as in qemu-img, and the server
    (which offers the bitmap) logs no half-finished negotiation for it."""
    image = create_filled(tmp_path / "bm.qcow2", "qcow2", "4M")
    run("qemu-img", "bitmap", "--add", image, "b0")
    server = qemu_nbd_server(image, fmt="qcow2", readonly=True, options=["-B", "b0"])
    out = tmp_path / "out.qcow2"
    line = one_line(trioconv_cli("convert", "--bitmaps", "-O", "qcow2", server.uri, out))
    assert line == "trioconv: Source lacks bitmap support"
    opts = (
        f"driver=nbd,server.type=unix,server.path={server.socket},"
        "x-dirty-bitmap=qemu:dirty-bitmap:b0"
    )
    line = one_line(trioconv_cli("info", "--image-opts", opts))
    assert "doesn't support the option 'x-dirty-bitmap'" in line
    assert NEGOTIATION_FAILED not in server_log(server), server.stderr()


# -- TLS -------------------------------------------------------------------------------------


def test_qemu_nbd_tls_with_client_certificates(
    qemu_nbd_server: QemuNbdLauncher, mixed_src: Path, tmp_path: Path
) -> None:
    """qemu-nbd's TLS default, ``verify-peer=on``, wants a client certificate: the URI's
    folder or ``--object tls-creds-x509`` (as qemu-img takes it) with ``client-cert.pem``
    works; without one the line says what is missing. The read-only export offers
    multi-conn: the copy is over before the extra connections have negotiated TLS, and
    they still end it properly (qemu-nbd logs no failed handshake)."""
    certs = make_tls_certs(tmp_path / "tls")
    folder = make_client_cert(certs)
    server = qemu_nbd_server(
        mixed_src,
        fmt="raw",
        readonly=True,
        options=[
            "--object",
            f"tls-creds-x509,id=tls1,endpoint=server,verify-peer=on,dir={certs.server_dir}",
            "--tls-creds=tls1",
        ],
    )
    uri = f"nbds+unix:///?socket={server.socket}&tls-hostname=localhost"
    out = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-O", "raw", f"{uri}&tls-certificates={folder}", out)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, out)
    out.unlink()
    opts = (
        f"driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={server.socket},"
        "file.tls-creds=c,file.tls-hostname=localhost"
    )
    obj = f"tls-creds-x509,id=c,endpoint=client,dir={folder}"
    result = trioconv_cli("convert", "--object", obj, "--image-opts", opts, "-O", "raw", out)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, out)
    assert "TLS handshake failed" not in server_log(server), server.stderr()

    line = one_line(trioconv_cli("info", f"{uri}&tls-certificates={certs.client_dir}"))
    assert "client-cert.pem and client-key.pem in the tls-certificates folder" in line


def test_qemu_nbd_tls_with_pre_shared_keys_is_refused_clearly(
    qemu_nbd_server: QemuNbdLauncher, tmp_path: Path
) -> None:
    """``tls-creds-psk`` (qemu-nbd's other TLS): Python's ``ssl`` (before 3.13) speaks
    no PSK. Each way of asking for it - the URI's ``tls-psk-file``, qemu-img's
    ``--object tls-creds-psk`` - and a plain ``nbds`` URI to such a server end in one
    line that names the reason."""
    keys = tmp_path / "psk"
    keys.mkdir()
    (keys / "keys.psk").write_text(f"alice:{os.urandom(32).hex()}\n")
    image = create_filled(tmp_path / "disk.raw", "raw", "1M")
    server = qemu_nbd_server(
        image,
        fmt="raw",
        readonly=True,
        options=[
            "--object",
            f"tls-creds-psk,id=tls1,endpoint=server,dir={keys}",
            "--tls-creds=tls1",
        ],
    )
    uri = f"nbds+unix:///?socket={server.socket}"
    line = one_line(trioconv_cli("info", uri))
    assert "a server that takes only pre-shared keys (PSK) does so" in line
    line = one_line(trioconv_cli("info", f"{uri}&tls-psk-file={keys}/keys.psk"))
    assert "TLS with a pre-shared key ('tls-psk-file') is not supported" in line
    obj = f"tls-creds-psk,id=k,endpoint=client,dir={keys},username=alice"
    opts = f"driver=nbd,server.type=unix,server.path={server.socket},tls-creds=k"
    line = one_line(trioconv_cli("info", "--object", obj, "--image-opts", opts))
    assert "tls-creds-psk" in line and "not supported" in line


async def test_structured_replies_without_block_status(tmp_path: Path) -> None:
    """A server that agrees to structured replies but to no meta context: no block
    status is claimed, every extent is data, and reads still work."""
    with FakeNBDServer(tmp_path / "s.sock", size=MiB, structured=True) as fake:
        async with trioconv.open_image(fake.uri, "raw") as image:
            assert not image.caps.block_status
            extent = await image.block_status(0, image.size)
            assert (extent.offset, extent.length, extent.kind) == (0, MiB, ExtentKind.DATA)
            assert await image.pread(MiB - 4096, 4096) == bytes(4096)


# -- connections -------------------------------------------------------------------------------


async def test_extra_connections_end_their_negotiation(
    qemu_nbd_server: QemuNbdLauncher, mixed_src: Path
) -> None:
    """A read-only qemu-nbd export offers multi-conn, so trioconv opens more connections
    while it already works on the first. A short use - one read - is over before they
    have negotiated: they finish and disconnect, rather than leaving qemu-nbd a
    half-done negotiation to log as failed."""
    server = qemu_nbd_server(mixed_src, fmt="raw", readonly=True)
    for _ in range(3):
        async with trioconv.open_image(server.uri, "raw") as image:
            assert await image.pread(0, 4096) == b"\xab" * 4096
    await trio.sleep(0.3)
    assert NEGOTIATION_FAILED not in server.stderr(), server.stderr()


class _ExtrasGoSilent(FakeNBDServer):
    """Negotiates the first connection; greets every later one and then says nothing."""

    #: Handshakes begun so far.
    handshakes = 0

    def _handshake(self, conn: socket.socket) -> bool:
        with self._count_lock:
            later = self.handshakes > 0
            self.handshakes += 1
        if later:
            self.stall = "options"
        return super()._handshake(conn)


async def test_a_stalled_extra_handshake_holds_the_end_only_for_the_grace(
    tmp_path: Path,
) -> None:
    """The wait for extra connections to finish negotiating is bounded: a multi-conn
    server that greets them and then goes silent holds the end of the work for
    :data:`HANDSHAKE_GRACE` seconds, not for the open timeout (30 s)."""
    with _ExtrasGoSilent(tmp_path / "s.sock", size=MiB, multi_conn=True) as fake:
        async with open_nbd(fake.uri, connections=4) as nbd:
            buf = bytearray(b"\xff" * 4096)
            await nbd.preadinto(0, memoryview(buf))
            assert buf == bytes(4096)
            for _ in range(500):  # (until every extra connection is greeted and stalled)
                if fake.handshakes == 4:
                    break
                await trio.sleep(0.01)
            ended = trio.current_time()
        took = trio.current_time() - ended
    assert fake.handshakes == 4
    assert HANDSHAKE_GRACE - 0.5 <= took <= HANDSHAKE_GRACE + 1.5, took


def test_two_clients_share_an_export(qemu_nbd_server: QemuNbdLauncher, tmp_path: Path) -> None:
    """``qemu-nbd -r --shared=2`` and two conversions at once, each wanting four
    connections: both get what they can and copy the whole export, promptly."""
    image = create_filled(tmp_path / "big.raw", "raw", "32M", "write -P 0x3c 0 32M")
    server = qemu_nbd_server(image, fmt="raw", readonly=True, shared=2)
    start = time.monotonic()
    outs = [tmp_path / f"out{i}.raw" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "trioconv", "convert", "-O", "raw", server.uri, out],
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert time.monotonic() - start < 15
    for out in outs:
        assert_identical(image, out)


def test_the_handshake_abort_is_on_the_wire() -> None:
    """The sans-I/O handshake, refused at ``NBD_OPT_GO``: the last thing it sends before
    raising is ``NBD_OPT_ABORT``, marked as a send that may fail (the server may have
    hung up already; the refusal is what the user must see)."""

    def reply(option: int, kind: int, payload: bytes = b"") -> bytes:
        return struct.pack(">QIII", proto.REPLY_MAGIC, option, kind, len(payload)) + payload

    server = [
        struct.pack(">QQH", proto.NBDMAGIC, proto.IHAVEOPT, 3),
        reply(proto.OPT_STRUCTURED_REPLY, proto.REP_ACK),
        reply(proto.OPT_SET_META_CONTEXT, proto.REP_ACK),
        reply(proto.OPT_GO, proto.REP_ERR | 6, b"gone")[:20],
        b"gone",
    ]
    sent: list[proto.Send] = []

    def negotiate() -> None:
        gen = proto.client_handshake("x")
        answer: bytes | None = None
        while True:
            step = gen.send(answer)
            answer = None
            if isinstance(step, proto.Send):
                sent.append(step)
            elif isinstance(step, proto.Recv):
                answer = server.pop(0)
                assert len(answer) == step.size

    with pytest.raises(proto.NBDOptionError, match="unknown export"):
        negotiate()
    assert sent[-1].data == proto.encode_abort()
    assert sent[-1].may_fail
