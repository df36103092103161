"""The NBD server fixtures of tests/nbd_servers.py work, with qemu-img/qemu-io as the client."""

from __future__ import annotations

import contextlib
import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from .conftest import ImageMaker, run
from .nbd_servers import (
    NbdkitLauncher,
    NBDServer,
    QemuNbdLauncher,
    TLSCerts,
    nbdkit,
    start_server,
)

MiB = 1024 * 1024


def info(server: NBDServer) -> dict[str, Any]:
    result = run(
        "qemu-img",
        "info",
        "--output=json",
        *server.qemu_object(),
        "--image-opts",
        server.qemu_image_opts(),
    )
    return dict(json.loads(result.stdout))


def nbd_map(server: NBDServer) -> list[dict[str, Any]]:
    return list(json.loads(run("qemu-img", "map", "--output=json", server.uri).stdout))


def compare(image: Path, server: NBDServer, fmt: str = "raw") -> None:
    result = run("qemu-img", "compare", "-f", fmt, "-F", "raw", image, server.uri, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Images are identical" in result.stdout


def nbd_io(server: NBDServer, *commands: str) -> tuple[int, str]:
    args: list[str] = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    result = run(*args, server.uri, check=False)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture
def src(make_image: ImageMaker) -> Path:
    return make_image("src.img", "8M", "write -P 0xab 0 1M", "write -P 0xcd 3M 512k")


# ------------------------------------------------------------------ nbdkit plugins


def test_memory_plugin_takes_a_convert(
    nbdkit_server: NbdkitLauncher, src: Path, qemu_img: str
) -> None:
    server = nbdkit_server("memory", ["size=8M"])
    assert server.socket is not None
    assert server.uri == f"nbd+unix:///?socket={server.socket}"
    assert info(server)["virtual-size"] == 8 * MiB
    run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", src, server.uri)
    compare(src, server)  # a second connection sees the data


def test_file_plugin_read_only(nbdkit_server: NbdkitLauncher, src: Path, qemu_io: str) -> None:
    server = nbdkit_server("file", [f"file={src}"], readonly=True)
    compare(src, server)
    status, output = nbd_io(server, "write -P 1 0 4k")
    assert status != 0
    assert "Permission denied" in output, output  # qemu refuses to open it writable


def test_pattern_plugin(nbdkit_server: NbdkitLauncher, tmp_path: Path, qemu_img: str) -> None:
    server = nbdkit_server("pattern", ["size=1M"])
    out = tmp_path / "out.img"
    run(qemu_img, "convert", "-f", "raw", "-O", "raw", server.uri, out)
    data = out.read_bytes()
    assert len(data) == MiB
    # Every 8 bytes hold their own offset, big-endian.
    assert [struct.unpack_from(">Q", data, o)[0] for o in (0, 8, 4096, MiB - 8)] == [
        0,
        8,
        4096,
        MiB - 8,
    ]


def test_export_name_goes_into_the_uri(nbdkit_server: NbdkitLauncher, qemu_img: str) -> None:
    server = nbdkit_server(
        "memory",
        ["size=1M"],
        filters=["exportname"],
        filter_args=["exportname=disk one", "exportname-strict=true"],
        export_name="disk one",
    )
    assert server.uri == f"nbd+unix:///disk%20one?socket={server.socket}"
    assert info(server)["virtual-size"] == MiB
    wrong = run(qemu_img, "info", server.uri.replace("disk%20one", "other"), check=False)
    assert wrong.returncode != 0


# ------------------------------------------------------------------ nbdkit filters


def test_delay_filter_slows_reads(nbdkit_server: NbdkitLauncher, qemu_io: str) -> None:
    server = nbdkit_server(
        "memory", ["size=1M"], filters=["delay"], filter_args=["delay-read=200ms"]
    )
    start = time.monotonic()
    status, output = nbd_io(server, "read 0 512")
    assert status == 0, output
    assert time.monotonic() - start >= 0.2


def test_error_filter_fails_writes(
    nbdkit_server: NbdkitLauncher, src: Path, qemu_img: str, qemu_io: str
) -> None:
    server = nbdkit_server(
        "memory",
        ["size=8M"],
        filters=["error"],
        filter_args=["error-pwrite=ENOSPC", "error-pwrite-rate=100%"],
    )
    result = run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", src, server.uri, check=False)
    assert result.returncode != 0
    assert "No space left on device" in result.stderr
    assert "injecting ENOSPC error into pwrite" in server.stderr()
    assert nbd_io(server, "read 0 64k")[0] == 0  # reads are untouched


def test_error_filter_trigger_file(
    nbdkit_server: NbdkitLauncher, tmp_path: Path, qemu_io: str
) -> None:
    trigger = tmp_path / "inject-now"
    server = nbdkit_server(
        "memory",
        ["size=1M"],
        filters=["error"],
        filter_args=["error-pread-rate=100%", f"error-pread-file={trigger}"],
    )
    assert nbd_io(server, "read 0 4k")[0] == 0
    trigger.touch()
    status, output = nbd_io(server, "read 0 4k")
    assert status != 0
    assert "Input/output error" in output


def test_blocksize_noextents_nozero_rate_filters(
    nbdkit_server: NbdkitLauncher, qemu_io: str
) -> None:
    plain = nbdkit_server("memory", ["size=1M"])
    assert nbd_map(plain) == [
        {
            "start": 0,
            "length": MiB,
            "depth": 0,
            "present": True,
            "zero": True,
            "data": False,
            "offset": 0,
        },
    ]

    server = nbdkit_server(
        "memory",
        ["size=1M"],
        filters=["blocksize", "noextents", "nozero", "rate"],
        filter_args=["minblock=4096", "maxdata=64k", "zeromode=emulate", "rate=1G", "burstiness=2"],
    )
    # noextents: the whole disk is reported as data.
    assert [(e["start"], e["length"], e["data"]) for e in nbd_map(server)] == [(0, MiB, True)]
    # blocksize: unaligned and larger-than-maxdata requests still come out right.
    status, output = nbd_io(
        server,
        "write -P 0x11 1 10",
        "write -P 0x22 64k 200k",
        "write -z 300k 4k",
        "read -P 0 0 1",
        "read -P 0x11 1 10",
        "read -P 0x22 64k 200k",
        "read -P 0 300k 4k",
    )
    assert status == 0, output
    assert "Pattern verification failed" not in output


def test_bad_filter_argument_fails_with_nbdkit_message(nbdkit_server: NbdkitLauncher) -> None:
    with pytest.raises(pytest.fail.Exception, match="minblock must be a power of 2"):
        nbdkit_server("memory", ["size=1M"], filters=["blocksize"], filter_args=["minblock=3"])


# ------------------------------------------------------------------ qemu-nbd


def test_qemu_nbd_serves_qcow2_as_raw_with_block_status(
    qemu_nbd_server: QemuNbdLauncher, make_image: ImageMaker, tmp_path: Path, qemu_img: str
) -> None:
    image = make_image(
        "disk.qcow2", "8M", "write -P 0xab 0 1M", "write -P 0xcd 4M 64k", fmt="qcow2"
    )
    server = qemu_nbd_server(image, fmt="qcow2", readonly=True)
    assert info(server)["virtual-size"] == 8 * MiB
    extents = [(e["start"], e["length"], e["data"]) for e in nbd_map(server)]
    assert extents == [
        (0, MiB, True),
        (MiB, 3 * MiB, False),
        (4 * MiB, 64 * 1024, True),
        (4 * MiB + 64 * 1024, 4 * MiB - 64 * 1024, False),
    ]
    compare(image, server, fmt="qcow2")  # sequential connections: --persistent works
    out = tmp_path / "copy.img"
    run(qemu_img, "convert", "-f", "raw", "-O", "raw", server.uri, out)
    assert out.read_bytes()[: MiB + 1] == b"\xab" * MiB + b"\0"


def test_qemu_nbd_writable_with_export_name(
    qemu_nbd_server: QemuNbdLauncher, make_image: ImageMaker, src: Path, qemu_img: str
) -> None:
    image = make_image("target.qcow2", "8M", fmt="qcow2")
    server = qemu_nbd_server(image, export_name="disk")
    assert server.uri == f"nbd+unix:///disk?socket={server.socket}"
    run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", src, server.uri)
    compare(src, server)
    server.stop()  # releases the image lock
    run(qemu_img, "compare", "-f", "raw", "-F", "qcow2", src, image)


# ------------------------------------------------------------------ TCP, TLS


def test_tcp(
    nbdkit_server: NbdkitLauncher,
    qemu_nbd_server: QemuNbdLauncher,
    make_image: ImageMaker,
    src: Path,
    qemu_img: str,
) -> None:
    kit = nbdkit_server("memory", ["size=8M"], tcp=True)
    assert kit.socket is None
    assert kit.uri == f"nbd://127.0.0.1:{kit.port}/"
    run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", src, kit.uri)
    compare(src, kit)

    qnbd = qemu_nbd_server(make_image("t.qcow2", "1M", fmt="qcow2"), tcp=True)
    assert qnbd.address == ("127.0.0.1", qnbd.port)
    assert qnbd.port != kit.port
    assert info(qnbd)["virtual-size"] == MiB


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_tls_required(
    nbdkit_server: NbdkitLauncher,
    qemu_nbd_server: QemuNbdLauncher,
    nbd_tls_certs: TLSCerts,
    make_image: ImageMaker,
    tmp_path: Path,
    qemu_img: str,
    tcp: bool,
) -> None:
    assert sorted(p.name for p in nbd_tls_certs.server_dir.iterdir()) == [
        "ca-cert.pem",
        "server-cert.pem",
        "server-key.pem",
    ]
    assert sorted(p.name for p in nbd_tls_certs.client_dir.iterdir()) == ["ca-cert.pem"]

    kit = nbdkit_server("pattern", ["size=1M"], tls=nbd_tls_certs, tcp=tcp)
    qnbd = qemu_nbd_server(make_image("tls.qcow2", "2M", fmt="qcow2"), tls=nbd_tls_certs, tcp=tcp)
    for server in (kit, qnbd):
        assert server.uri.startswith("nbds+unix:///?socket=" if not tcp else "nbds://127.0.0.1:")
        without_tls = server.qemu_image_opts().partition(",tls-creds=")[0]
        plain = run(qemu_img, "info", "--image-opts", without_tls, check=False)
        assert plain.returncode != 0
        assert "TLS" in plain.stderr, plain.stderr
    assert info(kit)["virtual-size"] == MiB
    assert info(qnbd)["virtual-size"] == 2 * MiB
    out = tmp_path / "pattern.img"
    run(
        qemu_img,
        "convert",
        *kit.qemu_object(),
        "--image-opts",
        kit.qemu_image_opts(),
        "-O",
        "raw",
        out,
    )
    assert struct.unpack_from(">Q", out.read_bytes(), 4096) == (4096,)


# ------------------------------------------------------------------ lifecycle


def test_stop_is_idempotent_and_the_server_goes_away(
    nbdkit_server: NbdkitLauncher, qemu_nbd_server: QemuNbdLauncher, make_image: ImageMaker
) -> None:
    kit = nbdkit_server("memory", ["size=1M"])
    qnbd = qemu_nbd_server(make_image("gone.qcow2", "1M", fmt="qcow2"))
    for server in (kit, qnbd):
        assert server.running
        assert server.stop() == 0  # both exit cleanly on SIGTERM when no client is connected
        assert server.process.poll() is not None
        assert not server.running
        server.stop()
        server.kill()
        assert server.socket is not None
        assert not server.socket.exists()
        assert run("qemu-img", "info", server.uri, check=False).returncode != 0


def test_kill_is_abrupt(nbdkit_server: NbdkitLauncher) -> None:
    server = nbdkit_server("memory", ["size=1M"])
    assert server.kill() == -9
    assert server.stop() == -9


def test_fixture_teardown_stops_every_server(tmp_path: Path, make_image: ImageMaker) -> None:
    image = make_image("x.qcow2", "1M", fmt="qcow2")
    with NbdkitLauncher(tmp_path) as kits, QemuNbdLauncher(tmp_path) as qnbds:
        servers = [
            kits("memory", ["size=1M"]),
            kits("pattern", ["size=1M"], tcp=True),
            qnbds(image, readonly=True),
        ]
        assert all(s.process.poll() is None for s in servers)
    assert all(s.process.poll() is not None for s in servers)
    with nbdkit(tmp_path, "memory", ["size=1M"]) as server:
        assert server.running
    assert server.process.poll() is not None


def children() -> set[int]:
    """PIDs of this process's live children (Linux)."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


def test_start_timeout_fails_and_kills(tmp_path: Path) -> None:
    before = children()
    with pytest.raises(
        pytest.fail.Exception, match=r"did not accept NBD connections within 0\.3 s"
    ):
        start_server(
            ["sleep", "30"],
            name="sleeper",
            workdir=tmp_path,
            socket=tmp_path / "never.sock",
            timeout=0.3,
        )
    assert children() <= before  # the silent server was killed and reaped


# ------------------------------------------------------------------ from trio


async def read_greeting(server: NBDServer) -> trio.abc.Stream:
    if isinstance(server.address, str):
        stream: trio.abc.Stream = await trio.open_unix_socket(server.address)
    else:
        stream = await trio.open_tcp_stream(*server.address)
    greeting = b""
    while len(greeting) < 18:
        greeting += await stream.receive_some(18 - len(greeting))
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    return stream


async def assert_closed_by_server(stream: trio.abc.Stream) -> None:
    with trio.fail_after(2):
        with contextlib.suppress(trio.BrokenResourceError):  # ECONNRESET
            assert await stream.receive_some() == b""


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_trio_client_sees_server_vanish(
    nbdkit_server: NbdkitLauncher,
    qemu_nbd_server: QemuNbdLauncher,
    make_image: ImageMaker,
    tcp: bool,
) -> None:
    kit = nbdkit_server("memory", ["size=1M"], tcp=tcp)
    async with await read_greeting(kit) as stream:
        assert kit.kill() == -9  # nbdkit would wait for us on SIGTERM
        await assert_closed_by_server(stream)

    qnbd = qemu_nbd_server(make_image("v.qcow2", "1M", fmt="qcow2"), tcp=tcp)
    async with await read_greeting(qnbd) as stream:
        assert qnbd.stop() == 0  # qemu-nbd leaves at once on SIGTERM
        await assert_closed_by_server(stream)
