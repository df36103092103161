"""trioconv's native NBD client against real servers (nbdkit and qemu-nbd).

Every conversion is checked with ``qemu-img compare`` (which reads NBD URIs itself), and
what the client did on the wire is read back from nbdkit's ``log`` filter: how many
connections it opened, which requests it sent, how many were in flight at once. Faults
come from nbdkit's ``error`` filter, from killing a server mid-copy, and from servers that
refuse the export, TLS or writing; each must end the command with exit status 1 and one
``trioconv: ...`` line, promptly.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from urllib.parse import quote

import pytest
import trio

import trioconv
from trioconv import ConvertOptions, ExtentKind
from trioconv.protocols.nbd import MultiConnDriver, NBDDriver, open_nbd

from . import nbd_servers
from ._faults import interrupt_cli, one_line_error, start_cli
from .conftest import (
    ImageMaker,
    assert_identical,
    create_filled,
    qemu_map,
    run,
    trioconv_cli,
)
from .fake_nbd import CMD_FLUSH, CMD_WRITE, FakeNBDServer, Request, honest
from .nbd_servers import NbdkitLauncher, NBDServer, QemuNbdLauncher, TLSCerts

MiB = 1024 * 1024
GiB = 1024 * MiB
KiB = 1024

#: A fault must end the command within this many seconds.
FAULT_DEADLINE = 15.0

#: What ``mixed_src`` holds: data at these ``[start, end)`` ranges, zeroes elsewhere
#: (written zeroes at 2M..3M, holes everywhere else).
#: (nbdkit's memory plugin allocates 32 KiB pages, so every range is a multiple of that.)
MIXED_DATA = [(0, MiB), (3 * MiB, 3 * MiB + 512 * KiB), (5 * MiB + 64 * KiB, 5 * MiB + 96 * KiB)]


# -- helpers -----------------------------------------------------------------------------------


def compare_uri(image: Path, uri: str) -> None:
    """``qemu-img compare`` of a local raw image with an NBD export: identical."""
    result = run("qemu-img", "compare", "-f", "raw", "-F", "raw", image, uri, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Images are identical" in result.stdout


def compare_tls(image: Path, server: NBDServer) -> None:
    """``qemu-img compare`` of a local raw image with a TLS export (via --image-opts)."""
    result = run(
        "qemu-img",
        "compare",
        *server.qemu_object(),
        "--image-opts",
        f"driver=raw,file.driver=file,file.filename={image}",
        server.qemu_image_opts(),
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Images are identical" in result.stdout


def fill_export(src: Path, uri: str) -> None:
    """Write ``src`` into an NBD export with qemu-img (the reference client)."""
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri)


def tls_uri(server: NBDServer) -> str:
    """The server's ``nbds`` URI plus ``tls-certificates=`` pointing at the CA."""
    assert server.tls is not None
    sep = "&" if "?" in server.uri else "?"
    return f"{server.uri}{sep}tls-certificates={quote(str(server.tls.client_dir), safe='/')}"


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Exit status 1 and exactly one ``trioconv: ...`` line on stderr; return it."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trioconv: "), result.stderr
    return lines[0]


def timed_cli(*args: str | Path) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    result = trioconv_cli(*args, timeout=FAULT_DEADLINE + 30)
    return result, time.monotonic() - start


def failing_cli(*args: str | Path) -> str:
    """Run a conversion that must fail: one line, exit 1, within :data:`FAULT_DEADLINE`."""
    result, elapsed = timed_cli(*args)
    line = one_error_line(result)
    assert elapsed < FAULT_DEADLINE, (elapsed, line)
    return line


def log_lines(logfile: Path) -> list[str]:
    """nbdkit log filter lines without their timestamp (``connection=N Verb id=M ...``)."""
    text = logfile.read_text(errors="replace")
    return [line.split(" ", 2)[2] for line in text.splitlines() if line.count(" ") >= 2]


_REQUEST = re.compile(
    r"^connection=(\d+) (Read|Write|Zero|Trim|Extents|Flush|Cache) id=(\d+)"
    r"(?: offset=0x([0-9a-f]+) count=0x([0-9a-f]+))?(.*) \.\.\.$"
)
_REPLY = re.compile(r"^connection=(\d+) \.\.\.(\w+) id=(\d+) ")


def requests(logfile: Path, verb: str, *, skip: int = 0) -> list[tuple[int, int, str]]:
    """``(offset, count, rest-of-line)`` of every ``verb`` request in an nbdkit log,
    leaving out those of the first ``skip`` connections (other clients before ours)."""
    found = []
    for line in log_lines(logfile):
        m = _REQUEST.match(line)
        if m and m.group(2) == verb and int(m.group(1)) > skip:
            offset = int(m.group(4) or "0", 16)
            count = int(m.group(5) or "0", 16)
            found.append((offset, count, m.group(6)))
    return found


def connections_opened(logfile: Path) -> int:
    return sum(1 for line in log_lines(logfile) if re.match(r"^connection=\d+ Connect ", line))


def max_in_flight(logfile: Path, verb: str) -> int:
    """The most ``verb`` requests one connection had outstanding at the same moment."""
    outstanding: dict[str, int] = {}
    most = 0
    for line in log_lines(logfile):
        if (m := _REQUEST.match(line)) and m.group(2) == verb:
            outstanding[m.group(1)] = outstanding.get(m.group(1), 0) + 1
            most = max(most, outstanding[m.group(1)])
        elif (r := _REPLY.match(line)) and r.group(2) == verb:
            outstanding[r.group(1)] -= 1
    return most


def data_ranges(extents: Sequence[dict[str, object]]) -> list[tuple[int, int]]:
    """Merged ``[start, end)`` ranges that ``qemu-img map`` reports as data."""
    merged: list[tuple[int, int]] = []
    for e in extents:
        if not e["data"]:
            continue
        start = int(str(e["start"]))
        end = start + int(str(e["length"]))
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def mixed_src(make_image: ImageMaker) -> Path:
    """8 MiB: data, written zeroes, holes, and a 32 KiB island (see :data:`MIXED_DATA`)."""
    return make_image(
        "mixed.img",
        "8M",
        "write -P 0xab 0 1M",
        "write -z 2M 1M",
        "write -P 0xcd 3M 512k",
        "write -P 0x11 5184k 32k",
    )


@pytest.fixture
def full_src(make_image: ImageMaker) -> Path:
    """8 MiB of data with no zero block anywhere (every 2 MiB request must be read)."""
    return make_image(
        "full.img", "8M", "write -P 0x5a 0 2M", "write -P 0xa5 2M 2M", "write -P 0x3c 4M 4M"
    )


# -- 1. reading ---------------------------------------------------------------------------------


def test_read_pattern_export(nbdkit_server: NbdkitLauncher, tmp_path: Path) -> None:
    server = nbdkit_server("pattern", ["size=4M"])
    out = tmp_path / "pattern.img"
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", server.uri, out)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size == 4 * MiB
    compare_uri(out, server.uri)


def test_read_memory_export_written_by_qemu_img(
    nbdkit_server: NbdkitLauncher, mixed_src: Path, tmp_path: Path
) -> None:
    log = tmp_path / "read.log"
    server = nbdkit_server("memory", ["size=8M"], filters=["log"], filter_args=[f"logfile={log}"])
    fill_export(mixed_src, server.uri)
    out = tmp_path / "out.img"
    result = trioconv_cli("convert", "-O", "raw", server.uri, out)  # format probed
    assert result.returncode == 0, result.stderr
    # Block status was asked, and nothing outside the data ranges was read (connection 1
    # was qemu-img's).
    assert requests(log, "Extents", skip=1)
    reads = requests(log, "Read", skip=1)
    assert reads
    # Probing reads the last 512 bytes too (a VHD keeps its footer there).
    probe_tail = (8 * 1024 * 1024 - 512, 512)
    for offset, count, _ in reads:
        if (offset, count) == probe_tail:
            continue
        assert any(s <= offset and offset + count <= e for s, e in MIXED_DATA), (offset, count)
    assert_identical(mixed_src, out)
    compare_uri(out, server.uri)


# -- 2. writing into an existing export ---------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [[], ["-W", "-m", "16"], ["-t", "none"], ["-S", "0"]],
    ids=["default", "oob-m16", "cache-none", "sparse-0"],
)
def test_write_into_memory_export(
    nbdkit_server: NbdkitLauncher, mixed_src: Path, tmp_path: Path, flags: list[str]
) -> None:
    log = tmp_path / "write.log"
    server = nbdkit_server("memory", ["size=8M"], filters=["log"], filter_args=[f"logfile={log}"])
    # Dirty the whole export first, so zero runs really have to be written.
    rc = run("qemu-io", "-f", "raw", "-c", "write -P 0xee 0 8M", server.uri, check=False)
    assert rc.returncode == 0, rc.stdout + rc.stderr
    result = trioconv_cli("convert", "-n", *flags, "-f", "raw", "-O", "raw", mixed_src, server.uri)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    compare_uri(mixed_src, server.uri)
    if flags == ["-S", "0"]:
        # Fully allocated: every byte goes out as data, like qemu-img -S 0.
        # (connection 1 was qemu-io's.)
        assert requests(log, "Zero", skip=1) == []
        assert sum(c for _, c, _ in requests(log, "Write", skip=1)) == 8 * MiB


@pytest.mark.parametrize("cache", ["unsafe", "writeback", "writethrough", "directsync"])
def test_write_through_cache_modes(
    nbdkit_server: NbdkitLauncher, mixed_src: Path, tmp_path: Path, cache: str
) -> None:
    """``writethrough`` and ``directsync`` make every write durable: WRITE and
    WRITE_ZEROES carry FUA. The other modes send no FUA, and one FLUSH at the end
    (``qemu-img`` sends its final flush even under ``unsafe``)."""
    log = tmp_path / "fua.log"
    server = nbdkit_server("memory", ["size=8M"], filters=["log"], filter_args=[f"logfile={log}"])
    result = trioconv_cli(
        "convert", "-n", "-t", cache, "--connections", "1", "-f", "raw", "-O", "raw",
        mixed_src, server.uri,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    compare_uri(mixed_src, server.uri)
    writes = requests(log, "Write") + requests(log, "Zero")
    assert writes
    fua = ["fua=1" in rest for _, _, rest in writes]
    assert all(fua) if cache in ("writethrough", "directsync") else not any(fua), log.read_text()
    assert len(requests(log, "Flush")) == 1


@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_write_through_without_fua_flushes_each_write(
    tmp_path: Path, mixed_src: Path, cache: str
) -> None:
    """A server that cannot take FUA (the scripted one advertises only FLUSH) gets a
    FLUSH after each write under a write-through mode, as qemu emulates FUA."""
    kinds: list[int] = []

    def recording(req: Request) -> bytes:
        kinds.append(req.kind)
        return honest(req)

    with FakeNBDServer(tmp_path / "s.sock", size=8 * MiB, behaviour=recording) as server:
        result = trioconv_cli(
            "convert", "-n", "-t", cache, "-f", "raw", "-O", "raw", mixed_src, server.uri
        )
    assert result.returncode == 0, result.stderr
    writes, flushes = kinds.count(CMD_WRITE), kinds.count(CMD_FLUSH)
    assert writes
    # Each write is one WRITE (2 MiB at most; zeroes too: no WRITE_ZEROES here).
    assert flushes == (writes + 1 if cache == "writethrough" else 1), kinds
    assert kinds[-1] == CMD_FLUSH


# -- 3. qemu-nbd serving qcow2 as raw ------------------------------------------------------------


@pytest.fixture
def qcow2_src(make_image: ImageMaker) -> Path:
    return make_image(
        "disk.qcow2",
        "8M",
        "write -P 0xab 0 1M",
        "write -P 0xcd 4M 64k",
        "write -P 0 6M 4k",  # allocated, but zeroes
        fmt="qcow2",
    )


def test_qemu_nbd_qcow2_to_file(
    qemu_nbd_server: QemuNbdLauncher, qcow2_src: Path, tmp_path: Path
) -> None:
    server = qemu_nbd_server(qcow2_src, fmt="qcow2", readonly=True)
    reference = tmp_path / "reference.img"
    run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", qcow2_src, reference)
    out = tmp_path / "out.img"
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", server.uri, out)
    assert result.returncode == 0, result.stderr
    assert_identical(reference, out)
    compare_uri(out, server.uri)
    assert out.stat().st_size == 8 * MiB
    # Unallocated clusters stay holes in the new file.
    assert data_ranges(qemu_map(out)) == [(0, MiB), (4 * MiB, 4 * MiB + 64 * KiB)]


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemus_older_nbd_names(
    qemu_nbd_server: QemuNbdLauncher, qcow2_src: Path, tmp_path: Path, tcp: bool
) -> None:
    """``nbd:unix:PATH:exportname=X`` and ``nbd:HOST:PORT:exportname=X``, the names
    scripts used before NBD URIs: read as qemu-img reads them, and named in ``info``
    by the URI they stand for, as qemu-img names them."""
    server = qemu_nbd_server(qcow2_src, fmt="qcow2", readonly=True, tcp=tcp, export_name="e x")
    where = f"unix:{server.socket}" if not tcp else f"{server.host}:{server.port}"
    name = f"nbd:{where}:exportname=e x"
    for output in ("human", "json"):
        ours = trioconv_cli("info", "--output", output, name)
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == run("qemu-img", "info", "--output", output, name).stdout
    out = tmp_path / "out.img"
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", name, out)
    assert result.returncode == 0, result.stderr
    compare_uri(out, server.uri)
    if tcp:
        line = one_error_line(trioconv_cli("info", f"nbd:{server.host}"))
        assert line.endswith(
            f"Could not open 'nbd:{server.host}': error parsing address '{server.host}'"
        )


#: Data, holes and zero runs inside clusters, and a partly written last cluster (the
#: images are 8M + 5k: qcow2's last cluster is partial).
QCOW2_SRC_WRITES = (
    "write -P 0x11 0 100k",
    "write -z 200k 60k",
    "write -P 0x22 300k 5k",
    "write -P 0x33 1M 70k",
    "write -P 0x44 3M 1k",
    "write -P 0x55 8195k 1k",
)


def qcow2_in_garbage(path: Path, file_size: int, *options: str) -> None:
    """A new qcow2 (8M + 5k) at the start of a file of ``file_size`` random bytes."""
    run("qemu-img", "create", "-q", "-f", "qcow2", *options, path, "8197k")
    used = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(used)
        f.write(os.urandom(file_size - used))


@pytest.mark.parametrize(
    "options",
    [(), ("-o", "extended_l2=on"), ("-o", "cluster_size=4k"), ("-o", "compat=0.10")],
    ids=["default", "extended-l2", "4k-clusters", "v2"],
)
def test_writing_qcow2_into_an_export(
    nbdkit_server: NbdkitLauncher,
    tmp_path: Path,
    make_image: ImageMaker,
    options: tuple[str, ...],
) -> None:
    """A qcow2 in an export cannot grow: clusters come after its last used one, and the
    old bytes there never show through."""
    image = tmp_path / "in-export.qcow2"
    qcow2_in_garbage(image, 16 * MiB, *options)
    src = make_image("src.img", "8197k", *QCOW2_SRC_WRITES)
    server = nbdkit_server("file", [str(image)])
    result = trioconv_cli("convert", "-n", "-O", "qcow2", src, server.uri)
    assert result.returncode == 0, result.stderr
    assert image.stat().st_size == 16 * MiB
    check = run("qemu-img", "check", "-f", "qcow2", image, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert_identical(src, image, "raw", "qcow2")
    # Writing again (over its own clusters) keeps it so.
    result = trioconv_cli("convert", "-n", "-O", "qcow2", "-S", "0", src, server.uri)
    assert result.returncode == 0, result.stderr
    assert run("qemu-img", "check", "-f", "qcow2", image, check=False).returncode == 0
    assert_identical(src, image, "raw", "qcow2")


def test_writing_qcow2_into_a_too_small_export(
    nbdkit_server: NbdkitLauncher, tmp_path: Path, make_image: ImageMaker
) -> None:
    image = tmp_path / "in-export.qcow2"
    qcow2_in_garbage(image, 512 * KiB)
    src = make_image("src.img", "8197k", "write -P 0x11 0 2M")
    server = nbdkit_server("file", [str(image)])
    result = trioconv_cli("convert", "-n", "-O", "qcow2", src, server.uri)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no space left in the NBD export" in lines[0]
    assert image.stat().st_size == 512 * KiB


def test_writing_other_formats_into_an_export_is_refused(
    nbdkit_server: NbdkitLauncher, tmp_path: Path, qemu_img: str
) -> None:
    """A vdi in an export cannot grow past the export's end: refused, untouched."""
    image = tmp_path / "in-export.vdi"
    run(qemu_img, "create", "-q", "-f", "vdi", image, "8M")
    with image.open("r+b") as f:
        f.truncate(16 * MiB)
    before = image.read_bytes()
    src = tmp_path / "src.img"
    src.write_bytes(b"\x5a" * MiB)
    server = nbdkit_server("file", [str(image)])
    result = trioconv_cli("convert", "-n", "-O", "vdi", src, server.uri)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "into an NBD export is not supported" in lines[0]
    assert image.read_bytes() == before


async def test_qemu_nbd_block_status_reaches_the_client(
    qemu_nbd_server: QemuNbdLauncher, qcow2_src: Path
) -> None:
    server = qemu_nbd_server(qcow2_src, fmt="qcow2", readonly=True)
    async with trioconv.open_image(server.uri, "raw") as image:
        assert image.caps.block_status
        first = await image.block_status(0, image.size)
        assert (first.offset, first.kind) == (0, ExtentKind.DATA)
        assert first.length <= MiB
        hole = await image.block_status(MiB, 3 * MiB)
        assert hole.offset == MiB
        assert hole.kind in (ExtentKind.ZERO, ExtentKind.HOLE)
        assert hole.length == 3 * MiB


# -- 4. NBD to NBD ----------------------------------------------------------------------------


def test_nbd_to_nbd(nbdkit_server: NbdkitLauncher, mixed_src: Path) -> None:
    source = nbdkit_server("memory", ["size=8M"])
    target = nbdkit_server("memory", ["size=8M"])
    fill_export(mixed_src, source.uri)
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "raw", source.uri, target.uri)
    assert result.returncode == 0, result.stderr
    compare_uri(mixed_src, target.uri)
    compare_uri(mixed_src, source.uri)  # the source is untouched


def test_odd_sized_exports(nbdkit_server: NbdkitLauncher, tmp_path: Path) -> None:
    """A size that is no multiple of 512: the last partial sector is copied too. (As in
    QEMU, the image counts whole sectors: a file made from it is 1000448 bytes, as
    qemu-img makes it; onto an export of the same odd size, the zeroes past its end are
    left out, where qemu-img fails.)"""
    source = nbdkit_server("pattern", ["size=1000001"])
    target = nbdkit_server("memory", ["size=1000001"])
    out = tmp_path / "odd.img"
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", source.uri, out)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size == 1000448
    compare_uri(out, source.uri)
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "raw", source.uri, target.uri)
    assert result.returncode == 0, result.stderr
    compare_uri(out, target.uri)


def test_concatenate_export_and_file(
    nbdkit_server: NbdkitLauncher, mixed_src: Path, tmp_path: Path
) -> None:
    source = nbdkit_server("pattern", ["size=3M"])
    head = tmp_path / "head.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", source.uri, head)
    expected = tmp_path / "expected.img"
    expected.write_bytes(head.read_bytes() + mixed_src.read_bytes())
    out = tmp_path / "cat.img"
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", source.uri, mixed_src, out)
    assert result.returncode == 0, result.stderr
    assert_identical(expected, out)


# -- 5. filters: block sizes, no extents, no zeroes ----------------------------------------------


@pytest.mark.parametrize(
    ("filters", "filter_args"),
    [
        (["blocksize"], ["minblock=4096", "maxdata=65536"]),
        (
            ["blocksize-policy"],
            [
                "blocksize-minimum=4096",
                "blocksize-preferred=65536",
                "blocksize-maximum=65536",
                "blocksize-error-policy=error",
            ],
        ),
        (["noextents"], []),
    ],
    ids=["blocksize", "blocksize-policy-strict", "noextents"],
)
def test_filters_read_and_write(
    nbdkit_server: NbdkitLauncher,
    mixed_src: Path,
    tmp_path: Path,
    filters: list[str],
    filter_args: list[str],
) -> None:
    """nbdkit 1.32's blocksize filter advertises no limits and splits requests itself;
    blocksize-policy advertises 4 KiB..64 KiB and, with ``error``, fails any request that
    breaks them, so there the client must split (and align) its requests itself."""
    log = tmp_path / "requests.log"
    server = nbdkit_server(
        "memory",
        ["size=8M"],
        filters=["log", *filters],
        filter_args=[f"logfile={log}", *filter_args],
    )
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "raw", mixed_src, server.uri)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "back.img"
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", server.uri, out)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, out)
    if filters == ["blocksize-policy"]:
        data = requests(log, "Read") + requests(log, "Write")
        assert len(data) > 8  # 1.5 MiB of data went in 64 KiB pieces, and came back
        for offset, count, _ in data:
            assert count <= 64 * KiB, (offset, count)
            assert offset % 4096 == 0, (offset, count)
            assert count % 4096 == 0, (offset, count)
    compare_uri(mixed_src, server.uri)


def test_requests_under_the_minimum_block_size(
    nbdkit_server: NbdkitLauncher, tmp_path: Path
) -> None:
    """A source whose size and extents are not multiples of the server's 4 KiB minimum
    block (a 10 KiB image, a qcow2 with 512-byte clusters, read from such an export):
    the blocks covered in part are read, patched and written whole, as qemu-img does,
    and the server, which fails anything unaligned, sees only whole blocks."""
    log = tmp_path / "requests.log"
    policy = [
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
    ]
    server = nbdkit_server(
        "memory",
        ["size=8M"],
        filters=["log", "blocksize-policy"],
        filter_args=[f"logfile={log}", *policy],
    )
    run("qemu-io", "-f", "raw", "-c", "write -P 0xee 0 8M", server.uri)
    small = tmp_path / "small.raw"
    small.write_bytes(os.urandom(10240))
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "raw", small, server.uri)
    assert result.returncode == 0, result.stderr
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, back)
    data = back.read_bytes()
    assert data[:10240] == small.read_bytes() and data[10240:12288] == b"\xee" * 2048
    fine = create_filled(
        tmp_path / "fine.qcow2",
        "qcow2",
        "1M",
        "write -P 3 1000 5000",
        "write -P 4 9000 700",
        "write -z 20000 3000",
        options="cluster_size=512",
    )
    expected = tmp_path / "fine.raw"
    run("qemu-img", "convert", "-O", "raw", fine, expected)
    for flags in ([], ["-W", "-m", "16"]):
        result = trioconv_cli("convert", "-n", *flags, "-O", "raw", fine, server.uri)
        assert result.returncode == 0, result.stderr
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, back)
        assert back.read_bytes()[:MiB] == expected.read_bytes()
    for offset, count, _ in requests(log, "Read") + requests(log, "Write"):
        assert offset % 4096 == 0 and count % 4096 == 0, (offset, count)
    # Read the other way: the qcow2 itself exported (its header, tables and 512-byte
    # clusters all smaller than a block), opened over NBD.
    with fine.open("ab") as f:
        f.truncate(-(-fine.stat().st_size // 4096) * 4096)
    source = nbdkit_server("file", [str(fine)], filters=["blocksize-policy"], filter_args=policy)
    out = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-f", "qcow2", "-O", "raw", source.uri, out)
    assert result.returncode == 0, result.stderr
    assert_identical(fine, out, "qcow2", "raw")


def test_nozero_export_gets_real_zeroes(nbdkit_server: NbdkitLauncher, mixed_src: Path) -> None:
    server = nbdkit_server("memory", ["size=8M"], filters=["nozero"], filter_args=["zeromode=none"])
    rc = run("qemu-io", "-f", "raw", "-c", "write -P 0xff 0 8M", server.uri, check=False)
    assert rc.returncode == 0, rc.stdout + rc.stderr
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "raw", mixed_src, server.uri)
    assert result.returncode == 0, result.stderr
    compare_uri(mixed_src, server.uri)


# -- 6. faults -----------------------------------------------------------------------------------


def test_fault_write_errors(nbdkit_server: NbdkitLauncher, mixed_src: Path, tmp_path: Path) -> None:
    trigger = tmp_path / "fail-writes"
    trigger.touch()
    server = nbdkit_server(
        "memory",
        ["size=8M"],
        filters=["error"],
        filter_args=["error-pwrite=EIO", "error-pwrite-rate=100%", f"error-pwrite-file={trigger}"],
    )
    line = failing_cli("convert", "-n", "-f", "raw", "-O", "raw", mixed_src, server.uri)
    assert "Input/output error" in line
    assert "writ" in line


def test_fault_read_errors(nbdkit_server: NbdkitLauncher, mixed_src: Path, tmp_path: Path) -> None:
    trigger = tmp_path / "fail-reads"
    server = nbdkit_server(
        "memory",
        ["size=8M"],
        filters=["error"],
        filter_args=["error-pread=EIO", "error-pread-rate=100%", f"error-pread-file={trigger}"],
    )
    fill_export(mixed_src, server.uri)
    trigger.touch()
    out = tmp_path / "out.img"
    line = failing_cli("convert", "-f", "raw", "-O", "raw", server.uri, out)
    assert "Input/output error" in line
    assert "read" in line


def test_fault_extents_errors(
    nbdkit_server: NbdkitLauncher, mixed_src: Path, tmp_path: Path
) -> None:
    trigger = tmp_path / "fail-extents"
    server = nbdkit_server(
        "memory",
        ["size=8M"],
        filters=["error"],
        filter_args=[
            "error-extents=EIO",
            "error-extents-rate=100%",
            f"error-extents-file={trigger}",
        ],
    )
    fill_export(mixed_src, server.uri)
    trigger.touch()
    line = failing_cli("convert", "-f", "raw", "-O", "raw", server.uri, tmp_path / "out.img")
    assert "Input/output error" in line


@pytest.mark.parametrize("side", ["source", "target"])
def test_fault_server_killed_mid_copy(
    nbdkit_server: NbdkitLauncher, full_src: Path, tmp_path: Path, side: str
) -> None:
    # One request at a time, each held 1 s by the server: 4 requests, about 4 s.
    delay = "delay-read=1" if side == "source" else "delay-write=1"
    server = nbdkit_server("memory", ["size=8M"], filters=["delay"], filter_args=[delay])
    out = tmp_path / "out.img"
    if side == "source":
        fill_export(full_src, server.uri)
        files = [server.uri, str(out)]
    else:
        files = ["-n", str(full_src), server.uri]
    proc = start_cli(["convert", "-m", "1", "--connections", "1", "-f", "raw", "-O", "raw", *files])
    try:
        time.sleep(1.2)
        assert proc.poll() is None, proc.communicate()
        assert server.kill() == -9
        killed = time.monotonic()
        stdout, stderr = proc.communicate(timeout=FAULT_DEADLINE)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    line = one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert elapsed < 5, elapsed
    assert "connection" in line.lower()
    if side == "source":
        assert not out.exists()  # the target file trioconv created is removed


def test_fault_missing_socket(tmp_path: Path) -> None:
    missing = tmp_path / "no-such.sock"
    line = failing_cli(
        "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///?socket={missing}", tmp_path / "o.img"
    )
    assert f"Failed to connect to '{missing}': No such file or directory" in line
    assert not (tmp_path / "o.img").exists()


def test_fault_tcp_connection_refused(mixed_src: Path) -> None:
    """The line says why the connection failed, as qemu-img does
    (``Failed to connect to '127.0.0.1:PORT': Connection refused``)."""
    port = free_tcp_port()
    line = failing_cli("convert", "-n", "-f", "raw", mixed_src, f"nbd://127.0.0.1:{port}/")
    assert f"Failed to connect to '127.0.0.1:{port}': Connection refused" in line


def test_fault_unknown_export(nbdkit_server: NbdkitLauncher, tmp_path: Path) -> None:
    server = nbdkit_server(
        "memory",
        ["size=1M"],
        filters=["exportname"],
        filter_args=["exportname=good", "exportname-strict=true"],
        export_name="good",
    )
    assert server.uri.startswith("nbd+unix:///good?")
    ok = trioconv_cli("info", server.uri)
    assert ok.returncode == 0, ok.stderr
    bad = server.uri.replace("/good?", "/bad?")
    line = failing_cli("convert", "-f", "raw", "-O", "raw", bad, tmp_path / "o.img")
    assert "Could not open" in line
    assert "bad" in line
    assert not (tmp_path / "o.img").exists()


def test_nbd_target_without_n_is_no_local_file(
    nbdkit_server: NbdkitLauncher, mixed_src: Path, tmp_path: Path
) -> None:
    """Without -n the export is written (as qemu-img writes it), and no local file is
    made from the URI's text."""
    server = nbdkit_server("memory", ["size=8M"])
    here = tmp_path / "cwd"
    here.mkdir()
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", mixed_src, server.uri, cwd=here)
    assert result.returncode == 0, result.stderr
    compare_uri(mixed_src, server.uri)
    assert list(here.iterdir()) == []


def test_fault_read_only_export_as_target(nbdkit_server: NbdkitLauncher, mixed_src: Path) -> None:
    server = nbdkit_server("memory", ["size=8M"], readonly=True)
    line = failing_cli("convert", "-n", "-f", "raw", "-O", "raw", mixed_src, server.uri)
    assert "read-only" in line


def test_fault_target_export_too_small(nbdkit_server: NbdkitLauncher, mixed_src: Path) -> None:
    server = nbdkit_server("memory", ["size=4M"])
    line = failing_cli("convert", "-n", "-f", "raw", "-O", "raw", mixed_src, server.uri)
    assert "smaller" in line


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_signal_during_nbd_copy(
    nbdkit_server: NbdkitLauncher, full_src: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    """A signal cancels a conversion whose NBD requests are in flight: one line,
    promptly, the target file it created is gone, and the process ends by the signal
    (a shell sees 128+N)."""
    server = nbdkit_server("memory", ["size=8M"], filters=["delay"], filter_args=["delay-read=2"])
    fill_export(full_src, server.uri)
    out = tmp_path / "out.img"
    # (connected at 1 s, reads outstanding for another second)
    status, stderr, elapsed = interrupt_cli(
        ["convert", "-f", "raw", "-O", "raw", server.uri, out], after=1.0, signum=signum
    )
    assert status == -signum, stderr
    assert stderr.splitlines() == [f"trioconv: interrupted by {signum.name}"]
    assert elapsed < 5, elapsed
    assert not out.exists()
    assert server.running


def stop_for_a_while(server: NBDServer) -> None:
    """SIGSTOP the server, then give the client time to fill the socket buffer."""
    server.process.send_signal(signal.SIGSTOP)
    time.sleep(0.5)


def test_signal_while_writing_qcow2_into_an_export(
    nbdkit_server: NbdkitLauncher, full_src: Path, tmp_path: Path
) -> None:
    """Interrupted while a qcow2 image is written into an export: the connection's
    reader stops first, so closing the image must not wait for replies nobody reads."""
    server = nbdkit_server(
        "memory",
        ["size=64M"],
        filters=["blocksize", "noparallel", "delay"],
        filter_args=["maxdata=32k", "delay-write=40ms"],
    )
    inside = tmp_path / "inside.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", inside, "16M")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", inside, server.uri)
    status, stderr, elapsed = interrupt_cli(
        ["convert", "-n", "-O", "qcow2", full_src, server.uri], after=1.0, signum=signal.SIGINT
    )
    assert status == -signal.SIGINT, stderr
    assert stderr.splitlines() == ["trioconv: interrupted by SIGINT"]
    assert elapsed < 5, elapsed


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_the_target_server_is_stopped(
    nbdkit_server: NbdkitLauncher, full_src: Path, signum: signal.Signals
) -> None:
    """A server that stopped reading (SIGSTOP) leaves a send stuck on a full socket
    buffer; Ctrl-C still ends the conversion at once."""
    server = nbdkit_server(
        "memory", ["size=8M"], filters=["delay"], filter_args=["delay-write=500ms"]
    )
    try:
        status, stderr, elapsed = interrupt_cli(
            ["convert", "-n", "-m", "1", full_src, server.uri],
            after=0.8,
            signum=signum,
            before_signal=partial(stop_for_a_while, server),
        )
    finally:
        server.process.send_signal(signal.SIGCONT)
    assert status == -signum, stderr
    assert stderr.splitlines() == [f"trioconv: interrupted by {signum.name}"]
    assert elapsed < 5, elapsed


# -- 7. TLS --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_tls_nbdkit(
    nbdkit_server: NbdkitLauncher,
    nbd_tls_certs: TLSCerts,
    mixed_src: Path,
    tmp_path: Path,
    tcp: bool,
) -> None:
    server = nbdkit_server("memory", ["size=8M"], tls=nbd_tls_certs, tcp=tcp)
    uri = tls_uri(server)
    assert uri.startswith("nbds://127.0.0.1:" if tcp else "nbds+unix:///?socket=")
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "raw", mixed_src, uri)
    assert result.returncode == 0, result.stderr
    compare_tls(mixed_src, server)
    out = tmp_path / "back.img"
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", uri, out)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, out)

    # The same server without TLS: refused, in one line that says why.
    plain = uri.replace("nbds", "nbd", 1)
    line = failing_cli("convert", "-f", "raw", "-O", "raw", plain, tmp_path / "plain.img")
    assert "TLS" in line
    assert not (tmp_path / "plain.img").exists()


def test_tls_untrusted_server_is_refused(
    nbdkit_server: NbdkitLauncher, nbd_tls_certs: TLSCerts, tmp_path: Path
) -> None:
    server = nbdkit_server("pattern", ["size=1M"], tls=nbd_tls_certs)
    # No tls-certificates: the system CAs do not know our throw-away CA.
    line = failing_cli("convert", "-f", "raw", "-O", "raw", server.uri, tmp_path / "o.img")
    assert "certificate" in line.lower()
    assert not (tmp_path / "o.img").exists()


def test_tls_qemu_nbd(
    qemu_nbd_server: QemuNbdLauncher,
    nbd_tls_certs: TLSCerts,
    qcow2_src: Path,
    tmp_path: Path,
) -> None:
    server = qemu_nbd_server(qcow2_src, fmt="qcow2", readonly=True, tls=nbd_tls_certs)
    reference = tmp_path / "reference.img"
    run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", qcow2_src, reference)
    out = tmp_path / "out.img"
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", tls_uri(server), out)
    assert result.returncode == 0, result.stderr
    assert_identical(reference, out)
    compare_tls(out, server)


# -- 8. multi-conn -------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "expected"), [([], 4), (["--connections", "1"], 1)])
def test_multi_conn_connection_count(
    nbdkit_server: NbdkitLauncher,
    mixed_src: Path,
    tmp_path: Path,
    flags: list[str],
    expected: int,
) -> None:
    log = tmp_path / "conn.log"
    server = nbdkit_server("memory", ["size=8M"], filters=["log"], filter_args=[f"logfile={log}"])
    result = trioconv_cli("convert", "-n", *flags, "-f", "raw", "-O", "raw", mixed_src, server.uri)
    assert result.returncode == 0, result.stderr
    assert connections_opened(log) == expected, log.read_text()
    # Each connection flushed: completed writes are durable whichever carried them.
    flushed = {line.split()[0] for line in log_lines(log) if " Flush id=" in line}
    assert len(flushed) == expected
    compare_uri(mixed_src, server.uri)


def test_info_takes_one_connection(nbdkit_server: NbdkitLauncher, tmp_path: Path) -> None:
    """``info`` looks once, over one connection, as qemu-img does (no others opened and
    dropped mid-handshake on a multi-conn server)."""
    log = tmp_path / "conn.log"
    server = nbdkit_server("memory", ["size=8M"], filters=["log"], filter_args=[f"logfile={log}"])
    result = trioconv_cli("info", server.uri)
    assert result.returncode == 0, result.stderr
    assert connections_opened(log) == 1, log.read_text()


def test_no_multi_conn_means_one_connection(
    qemu_nbd_server: QemuNbdLauncher, qcow2_src: Path, tmp_path: Path
) -> None:
    """qemu-nbd exporting writable does not advertise multi-conn: one connection only."""
    target = tmp_path / "target.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", target, "8M")
    server = qemu_nbd_server(target, fmt="qcow2", shared=1)  # a 2nd connection would hang
    reference = tmp_path / "reference.img"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow2_src, reference)
    result, elapsed = timed_cli(
        "convert", "-n", "--connections", "4", "-f", "raw", "-O", "raw", reference, server.uri
    )
    assert result.returncode == 0, result.stderr
    assert elapsed < FAULT_DEADLINE
    server.stop()
    assert_identical(reference, target, fmt_b="qcow2")


def test_a_server_that_takes_fewer_connections_than_it_allows(
    qemu_nbd_server: QemuNbdLauncher,
    nbdkit_server: NbdkitLauncher,
    mixed_src: Path,
    tmp_path: Path,
) -> None:
    """A multi-conn server may serve fewer connections than trioconv opens: ``qemu-nbd
    -e 2`` leaves a third one unanswered, nbdkit's limit filter closes it. The copy
    starts on the first connection at once and goes on over those that are served, as
    qemu-img's (which opens one) does; ``info`` does not wait either."""
    read_only = qemu_nbd_server(mixed_src, fmt="raw", readonly=True, shared=2)
    limited = nbdkit_server("memory", ["size=8M"], filters=["limit"], filter_args=["limit=2"])
    for server in (read_only, limited):
        info, elapsed = timed_cli("info", server.uri)
        assert info.returncode == 0, info.stderr
        assert elapsed < 5, elapsed
    out = tmp_path / "out.raw"
    result, elapsed = timed_cli("convert", "-f", "raw", "-O", "raw", read_only.uri, out)
    assert result.returncode == 0, result.stderr
    assert elapsed < 5, elapsed
    assert_identical(mixed_src, out)
    result, elapsed = timed_cli("convert", "-n", "-f", "raw", "-O", "raw", mixed_src, limited.uri)
    assert result.returncode == 0, result.stderr
    assert elapsed < 5, elapsed
    compare_uri(mixed_src, limited.uri)


@pytest.mark.parametrize("style", ["-o", "--mask-handshake=0"], ids=["oldstyle", "newstyle"])
def test_older_handshakes(
    nbdkit_server: NbdkitLauncher, mixed_src: Path, tmp_path: Path, style: str
) -> None:
    """Servers that speak the old style or plain newstyle (no options but the export
    name) are read as qemu-img reads them, without block status; a plain newstyle one is
    written too. (nbdkit's old style refuses WRITE_ZEROES though it advertises it, so
    qemu-img cannot write there either.)"""
    server = nbdkit_server("file", [str(mixed_src)], readonly=True, options=[style])
    out = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", server.uri, out)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, out)
    ours = trioconv_cli("info", server.uri)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == run("qemu-img", "info", server.uri).stdout
    if style != "-o":
        target = nbdkit_server("memory", ["size=8M"], options=[style])
        result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "raw", mixed_src, target.uri)
        assert result.returncode == 0, result.stderr
        compare_uri(mixed_src, target.uri)


def test_without_n_the_export_is_used_as_it_is(
    nbdkit_server: NbdkitLauncher, mixed_src: Path, tmp_path: Path
) -> None:
    """As qemu-img: without ``-n`` an existing export is taken for the new image when it
    is large enough - raw bytes, or a qcow2 image written over its old bytes - and a
    smaller one cannot grow."""
    for fmt in ("raw", "qcow2"):
        ours = nbdkit_server("memory", ["size=8M"])
        theirs = nbdkit_server("memory", ["size=8M"])
        for server in (ours, theirs):
            run("qemu-io", "-f", "raw", "-c", "write -P 0xee 0 8M", server.uri)
        result = trioconv_cli("convert", "-f", "raw", "-O", fmt, mixed_src, ours.uri)
        assert result.returncode == 0, result.stderr
        run("qemu-img", "convert", "-f", "raw", "-O", fmt, mixed_src, theirs.uri)
        ours_raw, theirs_raw = tmp_path / f"ours.{fmt}", tmp_path / f"theirs.{fmt}"
        for server, out in ((ours, ours_raw), (theirs, theirs_raw)):
            run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, out)
        if fmt == "qcow2":
            run("qemu-img", "check", "-f", "qcow2", ours_raw)
            assert_identical(mixed_src, ours_raw, fmt_b="qcow2")
        else:
            assert ours_raw.read_bytes() == theirs_raw.read_bytes()  # (the tail: old bytes)
            assert ours_raw.read_bytes()[: mixed_src.stat().st_size] == mixed_src.read_bytes()
    small = nbdkit_server("memory", ["size=4M"])
    line = one_line_error(trioconv_cli("convert", "-f", "raw", "-O", "raw", mixed_src, small.uri))
    assert "Cannot grow NBD nodes" in line
    # A qcow2 image takes what it allocates, not its virtual size: 8 MiB into 4 MiB.
    result = trioconv_cli("convert", "-f", "raw", "-O", "qcow2", mixed_src, small.uri)
    assert result.returncode == 0, result.stderr
    back = tmp_path / "small.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", small.uri, back)
    run("qemu-img", "check", "-f", "qcow2", back)
    assert_identical(mixed_src, back, fmt_b="qcow2")
    theirs_line = run("qemu-img", "convert", "-O", "raw", mixed_src, small.uri, check=False)
    assert "Cannot grow NBD nodes" in theirs_line.stderr
    line = one_line_error(trioconv_cli("convert", "-f", "raw", "-O", "vdi", mixed_src, ours.uri))
    assert "into an NBD export is not supported" in line


# -- 9. info -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("export", ["", "disk 1"], ids=["no-export", "export"])
def test_info_on_export(nbdkit_server: NbdkitLauncher, tcp: bool, export: str) -> None:
    server = nbdkit_server("memory", ["size=6M"], tcp=tcp, export_name=export)
    human = trioconv_cli("info", server.uri)
    assert human.returncode == 0, human.stderr
    assert "file format: raw\n" in human.stdout
    vsize = [line for line in human.stdout.splitlines() if line.startswith("virtual size: ")]
    assert len(vsize) == 1, human.stdout
    assert vsize[0].endswith(" (6291456 bytes)")
    as_json = trioconv_cli("info", "--output", "json", server.uri)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["format"] == "raw"
    assert data["virtual-size"] == 6 * MiB
    # Byte for byte what qemu-img says, the image's name as QEMU writes it included.
    assert human.stdout == run("qemu-img", "info", server.uri).stdout
    assert as_json.stdout == run("qemu-img", "info", "--output=json", server.uri).stdout


def test_info_on_a_qcow2_with_a_relative_backing_name_in_an_export(
    nbdkit_server: NbdkitLauncher, tmp_path: Path
) -> None:
    """An export is in no folder: a relative backing file name cannot be resolved, and
    info says so as qemu-img says it (no full-backing-filename)."""
    image = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "raw", image, "4M")
    server = nbdkit_server("file", [str(image)], readonly=True)
    for args in ([], ["--output", "json"]):
        ours = trioconv_cli("info", "-f", "qcow2", *args, server.uri)
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == run("qemu-img", "info", "-f", "qcow2", *args, server.uri).stdout


# -- 10. the library -----------------------------------------------------------------------------


async def test_open_image_reads_what_the_server_holds(
    nbdkit_server: NbdkitLauncher, mixed_src: Path
) -> None:
    server = nbdkit_server("memory", ["size=8M"])
    fill_export(mixed_src, server.uri)
    expected = mixed_src.read_bytes()
    for connections in (None, 1):
        async with trioconv.open_image(server.uri, connections=connections) as image:
            assert image.name == "raw"
            assert image.size == 8 * MiB
            assert await image.pread(0, image.size) == expected
            assert await image.pread(3 * MiB - 7, 4099) == expected[3 * MiB - 7 : 3 * MiB + 4092]


async def test_cancelled_convert_leaves_the_server_usable(
    nbdkit_server: NbdkitLauncher, full_src: Path, tmp_path: Path
) -> None:
    server = nbdkit_server(
        "memory", ["size=8M"], filters=["delay"], filter_args=["delay-read=200ms"]
    )
    fill_export(full_src, server.uri)
    slow = ConvertOptions(parallel=1, buffer_size="64k", connections=1)  # ~25 s in all
    start = trio.current_time()
    with trio.move_on_after(0.5) as scope:
        await trioconv.convert(server.uri, tmp_path / "cancelled.img", slow)
    assert scope.cancelled_caught
    assert trio.current_time() - start < 3

    out = tmp_path / "out.img"
    result = await trioconv.convert(server.uri, out)
    assert result.total == 8 * MiB
    assert_identical(full_src, out)
    compare_uri(out, server.uri)


# -- 11. requests in flight ----------------------------------------------------------------------


@pytest.mark.parametrize(("parallel", "in_flight"), [("8", 4), ("1", 1)])
def test_requests_are_pipelined(
    nbdkit_server: NbdkitLauncher,
    full_src: Path,
    tmp_path: Path,
    parallel: str,
    in_flight: int,
) -> None:
    """On one connection, ``-m 8`` has all four 2 MiB reads outstanding before the first
    reply, ``-m 1`` only ever one (nbdkit logs each request when it arrives and again when
    it is answered). The server holds each read 200 ms, far longer than a busy machine
    takes to schedule the client's next request."""
    log = tmp_path / "pipe.log"
    server = nbdkit_server(
        "memory",
        ["size=8M"],
        filters=["log", "delay"],
        filter_args=[f"logfile={log}", "delay-read=200ms"],
    )
    fill_export(full_src, server.uri)
    out = tmp_path / "out.img"
    result = trioconv_cli(
        "convert", "-m", parallel, "--connections", "1", "-f", "raw", "-O", "raw", server.uri, out
    )
    assert result.returncode == 0, result.stderr
    assert_identical(full_src, out)
    reads = requests(log, "Read")
    assert sum(c for _, c, _ in reads) == 8 * MiB
    if in_flight > 1:
        assert max_in_flight(log, "Read") >= in_flight, log.read_text()
    else:
        assert max_in_flight(log, "Read") == 1, log.read_text()


def test_target_is_zeroed_up_front_requests_in_flight(
    nbdkit_server: NbdkitLauncher, tmp_path: Path
) -> None:
    """An existing target is zeroed first with fast WRITE_ZEROES of 256 MiB: the first
    alone (a server that cannot zero fast refuses it, and nothing has changed), the rest
    ``-m`` at a time, each a round trip (200 ms here)."""
    src = tmp_path / "src.raw"
    with src.open("wb") as f:
        f.truncate(GiB)
        f.seek(300 * MiB)
        f.write(os.urandom(MiB))
    log = tmp_path / "zero.log"
    server = nbdkit_server(
        "memory",
        [f"size={GiB}"],
        filters=["log", "delay"],
        filter_args=[f"logfile={log}", "delay-zero=200ms"],
    )
    result = trioconv_cli(
        "convert", "-n", "-m", "4", "--connections", "1", "-f", "raw", "-O", "raw", src,
        server.uri,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    compare_uri(src, server.uri)
    zeroes = requests(log, "Zero")
    # The first goes alone; the others in whatever order the tasks reach the server.
    assert (zeroes[0][0], zeroes[0][1]) == (0, 256 * MiB)
    assert sorted((o, c) for o, c, _ in zeroes) == [(i * 256 * MiB, 256 * MiB) for i in range(4)]
    assert all("fast=1" in rest for _, _, rest in zeroes)
    lines = log_lines(log)
    first_reply = next(i for i, line in enumerate(lines) if re.match(r".*\.\.\.Zero id=", line))
    second_request = [i for i, line in enumerate(lines) if _REQUEST.match(line)
                      and " Zero " in line][1]  # fmt: skip
    assert first_reply < second_request, log.read_text()
    assert max_in_flight(log, "Zero") == 3, log.read_text()


# -- 12. discard ---------------------------------------------------------------------------------


@pytest.mark.parametrize("connections", [1, None], ids=["one-connection", "multi-conn"])
async def test_discard_punches_a_hole_in_max_block_pieces(
    nbdkit_server: NbdkitLauncher, tmp_path: Path, connections: int | None
) -> None:
    """``discard`` sends NBD_CMD_TRIM, split at the server's maximum request size (1 MiB
    here) and all in flight at once; the memory plugin then holds a hole there."""
    log = tmp_path / "trim.log"
    server = nbdkit_server(
        "memory",
        ["size=8M"],
        filters=["log", "blocksize-policy"],
        filter_args=[f"logfile={log}", "blocksize-maximum=1M", "blocksize-error-policy=error"],
    )
    rc = run("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 8M", server.uri, check=False)
    assert rc.returncode == 0, rc.stdout + rc.stderr
    async with open_nbd(server.uri, writable=True, connections=connections) as nbd:
        assert nbd.caps.trim
        assert isinstance(nbd, NBDDriver | MultiConnDriver)
        await nbd.discard(MiB, 3 * MiB + 64 * KiB)
        await nbd.discard(0, 0)  # nothing to do
    trims = requests(log, "Trim", skip=1)  # connection 1 was qemu-io's
    assert sorted((o, c) for o, c, _ in trims) == [
        (MiB, MiB),
        (2 * MiB, MiB),
        (3 * MiB, MiB),
        (4 * MiB, 64 * KiB),
    ]
    mapped = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", server.uri).stdout)
    assert data_ranges(mapped) == [(0, MiB), (4 * MiB + 64 * KiB, 8 * MiB)]
    for check in ("read -P 0xab 0 1M", "read -P 0 1M 3136k", "read -P 0xab 4160k 3968k"):
        rc = run("qemu-io", "-f", "raw", "-c", check, server.uri, check=False)
        assert rc.returncode == 0 and "Pattern verification failed" not in rc.stdout, rc.stdout


async def test_discard_errors(nbdkit_server: NbdkitLauncher, tmp_path: Path) -> None:
    """A failed trim is an I/O error naming the offset; a read-only connection or a server
    without trim refuses before sending anything."""
    failing = nbdkit_server(
        "memory",
        ["size=8M"],
        filters=["error"],
        filter_args=["error-trim=EIO", "error-trim-rate=1"],
    )
    async with open_nbd(failing.uri, writable=True, connections=1) as nbd:
        assert isinstance(nbd, NBDDriver)
        with pytest.raises(trioconv.TrioconvIOError, match=r"trimming .* at byte 4096") as info:
            await nbd.discard(4096, 4096)
        assert info.value.errno == errno.EIO
        await nbd.pwrite(0, b"still usable")  # the connection survives the error
    async with open_nbd(failing.uri, connections=1) as nbd:
        assert isinstance(nbd, NBDDriver)
        with pytest.raises(trioconv.UnsupportedError, match="read-only"):
            await nbd.discard(0, 4096)
    no_trim = nbdkit_server(
        "eval",
        ["get_size=echo 1048576", "pread=head -c $3 /dev/zero", "pwrite=cat >/dev/null"],
    )
    async with open_nbd(no_trim.uri, writable=True) as nbd:
        assert isinstance(nbd, NBDDriver)
        assert not nbd.caps.trim
        with pytest.raises(trioconv.UnsupportedError, match="cannot discard"):
            await nbd.discard(0, 4096)


# -- 13. small limits, block status, URIs and TLS wording ---------------------------------------


def test_block_status_of_a_fragmented_export_under_a_small_maximum(
    nbdkit_server: NbdkitLauncher, tmp_path: Path
) -> None:
    """A server that announces a 1 KiB maximum payload still describes a fragmented
    export in one block status chunk of about a thousand extents (8 KiB here: nbdkit
    does not cut it down). Read chunks stay bounded by the maximum; status chunks have
    their own, larger bound, so the copy goes through, holes and all."""
    server = nbdkit_server(
        "sparse-random",
        ["size=16M", "percent=50", "runlength=16384", "seed=7"],
        filters=["blocksize-policy"],
        filter_args=[
            "blocksize-maximum=1024",
            "blocksize-preferred=1024",
            "blocksize-error-policy=error",
        ],
    )
    out = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", server.uri, out)
    assert result.returncode == 0, result.stderr
    compare_uri(out, server.uri)
    expected = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", server.uri).stdout)
    assert data_ranges(qemu_map(out)) == data_ranges(expected)


def test_a_tiny_maximum_keeps_many_requests_in_flight(
    nbdkit_server: NbdkitLauncher, tmp_path: Path
) -> None:
    """With a 1 KiB maximum, one 2 MiB read of the copy becomes 2048 requests: none
    larger than the maximum, and many of them outstanding at once on the one
    connection, not one after the other (nbdkit runs 128 threads here, each request
    held 10 ms)."""
    log = tmp_path / "tiny.log"
    server = nbdkit_server(
        "pattern",
        ["size=2M"],
        filters=["log", "blocksize-policy", "delay"],
        filter_args=[
            f"logfile={log}",
            "blocksize-maximum=1024",
            "blocksize-preferred=1024",
            "blocksize-error-policy=error",
            "delay-read=10ms",
        ],
        options=["--threads", "128"],
    )
    out = tmp_path / "out.raw"
    result = trioconv_cli(
        "convert", "-m", "1", "--connections", "1", "-f", "raw", "-O", "raw", server.uri, out
    )
    assert result.returncode == 0, result.stderr
    reads = requests(log, "Read")
    assert sum(c for _, c, _ in reads) == 2 * MiB
    assert max(c for _, c, _ in reads) == 1024
    assert max_in_flight(log, "Read") >= 64, max_in_flight(log, "Read")
    # (qemu-img would take 20 s to compare: it sends the 1 KiB pieces one at a time)
    pattern = b"".join(offset.to_bytes(8, "big") for offset in range(0, 2 * MiB, 8))
    assert out.read_bytes() == pattern


@pytest.mark.parametrize("connections", [1, None], ids=["one-connection", "multi-conn"])
async def test_block_status_sees_the_writes_before_it(
    nbdkit_server: NbdkitLauncher, connections: int | None
) -> None:
    """Block status is kept from one query to the next, but not across a write, zero
    or trim - over any of the connections, as a file's extent map is dropped on every
    write: a query after it sees the new data."""
    server = nbdkit_server("memory", ["size=1M"])
    async with open_nbd(server.uri, writable=True, connections=connections) as nbd:
        if isinstance(nbd, MultiConnDriver):
            for _ in range(200):
                if len(nbd.connections) == 4:
                    break
                await trio.sleep(0.01)
            assert len(nbd.connections) == 4
        assert await nbd.block_status(0, MiB) == trioconv.Extent(0, MiB, ExtentKind.ZERO)
        async with trio.open_nursery() as nursery:  # (on as many connections)
            for i in range(4):
                nursery.start_soon(nbd.pwrite, i * 256 * KiB, b"\x01" * 4096)
        for i in range(4):
            ext = await nbd.block_status(i * 256 * KiB, 4096)
            assert ext.kind is ExtentKind.DATA, (i, ext)
        await nbd.pwrite_zeroes(0, MiB, may_unmap=True)
        assert (await nbd.block_status(0, 4096)).kind is ExtentKind.ZERO
        await nbd.pwrite(0, b"\x02" * 4096)
        assert (await nbd.block_status(0, 4096)).kind is ExtentKind.DATA
        await nbd.discard(0, MiB)
        assert (await nbd.block_status(0, 4096)).kind is ExtentKind.ZERO


def test_a_socket_path_with_a_plus_sign(tmp_path: Path) -> None:
    """In ``?socket=`` a '+' is a plus sign, as QEMU and libnbd read it: only
    percent-escapes are decoded (an HTML form's '+' for a space is not)."""
    folder = tmp_path / "run+nbd"
    folder.mkdir()
    with nbd_servers.nbdkit(folder, "memory", ["size=3M"]) as server:
        assert server.socket is not None and "+" in str(server.socket)
        uri = f"nbd+unix:///?socket={server.socket}"
        ours = trioconv_cli("info", "--output", "json", uri)
        assert ours.returncode == 0, ours.stderr
        assert json.loads(ours.stdout)["virtual-size"] == 3 * MiB
        theirs = run("qemu-img", "info", "--output=json", uri)
        assert json.loads(theirs.stdout)["virtual-size"] == 3 * MiB


def test_an_ipv6_host_and_an_export_name_that_needs_escaping(
    nbdkit_server: NbdkitLauncher, mixed_src: Path, tmp_path: Path
) -> None:
    """``nbd://[::1]:PORT/NAME``: the host in brackets, the export name percent-encoded
    (spaces, '#', '?', '&', '+', '%', '/', and letters beyond ASCII) reaches a server
    that insists on the exact name."""
    if not nbd_servers.ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    name = "dïsk #1?&+%/x"
    server = nbdkit_server(
        "memory",
        ["size=8M"],
        filters=["exportname"],
        filter_args=[f"exportname={name}", "exportname-strict=true"],
        export_name=name,
        tcp=True,
        host="::1",
    )
    uri = server.uri
    assert uri == f"nbd://[::1]:{server.port}/d%C3%AFsk%20%231%3F%26%2B%25%2Fx"
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "raw", mixed_src, uri)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "back.raw"
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", uri, out)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, out)
    wrong = failing_cli("info", uri.replace("%2Fx", "%2Fy"))
    assert "unknown export" in wrong


def test_tls_failures_say_what_to_do(
    nbdkit_server: NbdkitLauncher, nbd_tls_certs: TLSCerts, tmp_path: Path
) -> None:
    """Each way TLS fails ends in one line that says what is wrong and what would help:
    a server that takes only pre-shared keys (which Python's ssl cannot do), one that
    wants a client certificate, a folder without the CA certificate, a plain URI for a
    server that requires TLS and a TLS URI for one without it."""
    keys = tmp_path / "keys.psk"
    keys.write_text(f"alice:{os.urandom(32).hex()}\n")
    keys.chmod(0o600)
    psk = nbdkit_server("memory", ["size=1M"], options=["--tls=require", f"--tls-psk={keys}"])
    line = failing_cli("info", f"nbds+unix:///?socket={psk.socket}")
    assert "the server closed the connection (a server that takes only pre-shared keys" in line
    line = failing_cli("info", f"nbds+unix:///?socket={psk.socket}&tls-psk-file={keys}")
    assert "TLS with a pre-shared key ('tls-psk-file') is not supported" in line

    peer = nbdkit_server("memory", ["size=1M"], tls=nbd_tls_certs, options=["--tls-verify-peer"])
    line = failing_cli("info", tls_uri(peer))
    assert "the server ended the TLS session during the negotiation" in line
    assert "client-cert.pem and client-key.pem" in line

    x509 = nbdkit_server("memory", ["size=1M"], tls=nbd_tls_certs)
    empty = tmp_path / "no-certs"
    empty.mkdir()
    line = failing_cli("info", f"{x509.uri}&tls-certificates={empty}")
    assert f"TLS: cannot use '{empty}/ca-cert.pem': No such file or directory" in line
    line = failing_cli("info", f"nbd+unix:///?socket={x509.socket}")
    assert "TLS required (use an nbds:// or nbds+unix:// URI)" in line
    plain = nbdkit_server("memory", ["size=1M"])
    line = failing_cli("info", f"nbds+unix:///?socket={plain.socket}")
    assert "server refused TLS" in line and "nbd+unix://" in line


async def test_a_cancelled_read_in_tiny_pieces_leaves_its_buffer_alone(
    nbdkit_server: NbdkitLauncher,
) -> None:
    """A 2 MiB read from a server with a 1 KiB maximum goes out as batches of requests;
    cancelled half-way, the replies still due are dropped (the buffer, which its owner
    may already reuse, is not written again), and the connection reads on in step."""
    server = nbdkit_server(
        "pattern",
        ["size=4M"],
        filters=["blocksize-policy", "delay"],
        filter_args=["blocksize-maximum=1024", "blocksize-preferred=1024", "delay-read=5ms"],
    )
    pattern = b"".join(offset.to_bytes(8, "big") for offset in range(0, 4 * MiB, 8))
    async with open_nbd(server.uri, connections=1) as nbd:
        buf = bytearray(2 * MiB)
        with trio.move_on_after(0.1) as scope:
            await nbd.preadinto(0, memoryview(buf))
        assert scope.cancelled_caught
        left = bytes(buf)
        assert left != pattern[: 2 * MiB]  # (cut short indeed)
        buf[:] = b"\xee" * len(buf)  # reused at once
        again = bytearray(MiB)
        await nbd.preadinto(3 * MiB, memoryview(again))
        assert again == pattern[3 * MiB :]
        await trio.sleep(0.3)
        assert buf == b"\xee" * len(buf)
