"""trioconv's native iSCSI initiator against a real target (tgt on loopback).

Each test gets its own target with a file-backed LUN from the ``iscsi_target`` fixture;
results are checked with ``qemu-img compare`` against the LUN's backing file. Thin LUNs
(tgt's ``thin_provisioning=1``: UNMAP, WRITE SAME with UNMAP, GET LBA STATUS, unmapped
blocks read as zeroes) must end with holes where the image has zeroes; thick LUNs must
have every zero really written. Faults - a wrong IQN, LUN or password, a LUN too small,
the target killed mid-copy and not coming back - end with one clear line, promptly. (tgtd
restarted mid-copy, which the initiator rides out, is in :mod:`tests.test_iscsi_reconnect`.)
"""

from __future__ import annotations

import json
import os
import signal
import threading
from functools import partial
from pathlib import Path

import pytest
import trio

import trioconv
from trioconv import ExtentKind, TrioconvIOError
from trioconv.protocols.iscsi import ISCSIDriver, open_iscsi, parse_iscsi_uri
from trioconv.testing import check_block_status_tiles, check_driver

from ._faults import (
    FAULT_DEADLINE,
    MiB,
    check_cancelled_while_stopped,
    check_killed_mid_copy,
    check_reader_fails_after_loss,
    make_mixed_src,
    one_line_error,
)
from .conftest import ImageMaker, assert_identical, qemu_map, run, trioconv_cli
from .iscsi_target import ISCSITarget


@pytest.fixture
def mixed_src(make_image: ImageMaker) -> Path:
    """8 MiB raw: data, written zeroes, holes, a data run that ends unaligned."""
    return make_mixed_src(make_image)


def garbage_lun(
    iscsi_target: ISCSITarget, tmp_path: Path, size: int, *, thin: bool
) -> tuple[str, Path]:
    """A LUN of ``size`` bytes whose backing file is full of random bytes."""
    backing = tmp_path / f"lun-{'thin' if thin else 'thick'}.img"
    url = iscsi_target.add_lun(backing, size, thin=thin)
    with backing.open("r+b") as f:
        f.write(os.urandom(size))
    return url, backing


def allocated(path: Path) -> int:
    """Bytes the backing file really occupies on disk."""
    return os.stat(path).st_blocks * 512


# -- writing and reading ---------------------------------------------------------------------


@pytest.mark.parametrize("thin", [False, True], ids=["thick", "thin"])
@pytest.mark.parametrize("flags", [(), ("-m", "1"), ("-W", "-m", "8")], ids=["default", "m1", "W"])
def test_write_into_lun(
    iscsi_target: ISCSITarget, mixed_src: Path, tmp_path: Path, thin: bool, flags: tuple[str, ...]
) -> None:
    """Every zero run of the image ends up zero on a LUN that held random bytes."""
    url, backing = garbage_lun(iscsi_target, tmp_path, 8 * MiB, thin=thin)
    result = trioconv_cli("convert", "-n", *flags, "-f", "raw", "-O", "raw", mixed_src, url)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, backing)
    if thin:
        # The zero runs were deallocated, not written: only the data takes space.
        assert allocated(backing) < 4 * MiB, allocated(backing)


def test_create_checks_the_lun_size(
    iscsi_target: ISCSITarget, mixed_src: Path, tmp_path: Path, make_image: ImageMaker
) -> None:
    """Without -n the LUN is used as it is (QEMU's behaviour), but it cannot grow."""
    url, backing = garbage_lun(iscsi_target, tmp_path, 8 * MiB, thin=True)
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", mixed_src, url)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, backing)

    big = make_image("big.img", "9M", "write -P 0x42 8M 1M")
    line = one_line_error(trioconv_cli("convert", "-f", "raw", "-O", "raw", big, url))
    assert "Cannot grow iSCSI devices" in line
    line = one_line_error(trioconv_cli("convert", "-n", "-f", "raw", "-O", "raw", big, url))
    assert "smaller than input" in line
    assert_identical(mixed_src, backing)  # neither failure touched the LUN

    # A qcow2 image is written onto the LUN as qemu-img writes it (its header cluster
    # whole, over the old bytes), then a vmdk is refused: it would grow past the end.
    result = trioconv_cli("convert", "-f", "raw", "-O", "qcow2", mixed_src, url)
    assert result.returncode == 0, result.stderr
    run("qemu-img", "check", "-f", "qcow2", backing)
    assert_identical(mixed_src, backing, fmt_b="qcow2")
    line = one_line_error(trioconv_cli("convert", "-f", "raw", "-O", "vmdk", mixed_src, url))
    assert "into an iSCSI LUN is not supported" in line
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", mixed_src, url)
    assert result.returncode == 0, result.stderr
    # Into a vdi already in the LUN: refused, it would have to grow past the LUN's end.
    run("qemu-img", "create", "-q", "-f", "vdi", tmp_path / "v.vdi", "4M")
    with backing.open("r+b") as f:
        f.write((tmp_path / "v.vdi").read_bytes())
    before = backing.read_bytes()
    line = one_line_error(trioconv_cli("convert", "-n", "-O", "vdi", mixed_src, url))
    assert "into an iSCSI LUN is not supported" in line
    assert backing.read_bytes() == before

    # Into a qcow2 already in the LUN (the rest random bytes): its clusters come after
    # its last used one, within the LUN, and the old bytes there never show through.
    src = make_image(
        "src.img",
        "8197k",
        "write -P 0x11 0 100k",
        "write -z 200k 60k",
        "write -P 0x22 300k 5k",
        "write -P 0x33 1M 70k",
        "write -P 0x55 8195k 1k",
    )
    q = tmp_path / "q.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", q, "8197k")
    with backing.open("r+b") as f:
        f.write(os.urandom(8 * MiB))
        f.seek(0)
        f.write(q.read_bytes())
    result = trioconv_cli("convert", "-n", "-O", "qcow2", src, url)
    assert result.returncode == 0, result.stderr
    assert backing.stat().st_size == 8 * MiB
    check = run("qemu-img", "check", "-f", "qcow2", backing, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert_identical(src, backing, "raw", "qcow2")

    # A qcow2 with more data than the LUN has room for: one clear error.
    full = make_image("full.img", "8197k", "write -P 0x66 0 8197k")
    line = one_line_error(trioconv_cli("convert", "-n", "-O", "qcow2", full, url))
    assert "no space left in the iSCSI LUN" in line


def test_image_smaller_than_lun_unaligned_tail(
    iscsi_target: ISCSITarget, make_image: ImageMaker, tmp_path: Path
) -> None:
    """An image whose size is not a multiple of the block size: the tail is merged.
    (A raw image counts whole 512-byte sectors, as in QEMU: 4 MiB + 1000 bytes of file
    are 4 MiB + 1024 bytes of disk, the last 24 of them zeroes.)"""
    src = make_image("odd.img", "4097k", "write -P 0x33 0 4097k")
    with src.open("r+b") as f:
        f.truncate(4 * MiB + 1000)
    backing = tmp_path / "lun.img"
    url = iscsi_target.add_lun(backing, 5 * MiB)
    with backing.open("r+b") as f:
        f.seek(4 * MiB + 1000)
        f.write(b"\x77" * 600)  # past the image: must survive the read-merge-write
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "raw", src, url)
    assert result.returncode == 0, result.stderr
    data = backing.read_bytes()
    assert data[: 4 * MiB + 1000] == src.read_bytes()
    assert data[4 * MiB + 1000 : 4 * MiB + 1024] == bytes(24)
    assert data[4 * MiB + 1024 : 4 * MiB + 1600] == b"\x77" * 576


@pytest.mark.parametrize(
    "settings",
    [
        {"InitialR2T": "No", "FirstBurstLength": "262144", "MaxRecvDataSegmentLength": "65536"},
        {"ImmediateData": "No", "MaxBurstLength": "65536", "MaxRecvDataSegmentLength": "4096"},
    ],
    ids=["unsolicited", "r2t-only"],
)
async def test_negotiated_data_transfer(
    iscsi_target: ISCSITarget, tmp_path: Path, settings: dict[str, str]
) -> None:
    """Writes follow what login settled: immediate and unsolicited Data-Out when the
    target allows them, many small R2T bursts when it does not."""
    backing = tmp_path / "lun.img"
    url = iscsi_target.add_lun(backing, 8 * MiB)
    tid = str(iscsi_target.lun(url).tid)
    for key, value in settings.items():
        iscsi_target.tgtadm(
            "--lld", "iscsi", "--mode", "target", "--op", "update", "--tid", tid,
            "--name", key, "--value", value,
        )  # fmt: skip
    data = os.urandom(3 * MiB + 4096)
    async with open_iscsi(url, writable=True) as lun:
        params = lun._conn.params
        if "InitialR2T" in settings:
            assert not params.initial_r2t and params.first_burst == 262144
            assert params.immediate_data and params.max_send_segment == 65536
        else:
            assert params.initial_r2t and not params.immediate_data
            assert params.max_burst == 65536 and params.max_send_segment == 4096
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(lun.pwrite, i * 2 * MiB, memoryview(data)[: 2 * MiB - 4096])
        await lun.pwrite(512, data[:4096])
        await lun.flush()
        assert await lun.pread(2 * MiB, 2 * MiB - 4096) == data[: 2 * MiB - 4096]
    piece = data[: 2 * MiB - 4096]
    expected = bytearray(8 * MiB)
    for i in range(4):
        expected[i * 2 * MiB : i * 2 * MiB + len(piece)] = piece
    expected[512 : 512 + 4096] = data[:4096]
    assert backing.read_bytes() == bytes(expected)


async def test_target_pings_are_answered(
    iscsi_target: ISCSITarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target that pings (NOP-In) and drops sessions that stay silent keeps ours."""
    from trioconv.protocols.iscsi import _client

    url = iscsi_target.add_lun(tmp_path / "lun.img", MiB)
    tid = str(iscsi_target.lun(url).tid)
    for key, value in (("nop_interval", "1"), ("nop_count", "2")):
        iscsi_target.tgtadm(
            "--lld", "iscsi", "--mode", "target", "--op", "update", "--tid", tid,
            "--name", key, "--value", value,
        )  # fmt: skip
    answered: list[int] = []
    answer = _client.Connection._answer_ping

    async def spy(self: _client.Connection, header: object, data: bytes) -> None:
        answered.append(1)
        await answer(self, header, data)  # type: ignore[arg-type]

    monkeypatch.setattr(_client.Connection, "_answer_ping", spy)
    async with open_iscsi(url, writable=True) as lun:
        for i in range(5):
            await lun.pwrite(i * 4096, bytes([i + 1]) * 4096)
            await trio.sleep(1)
        assert answered, "the target sent no NOP-In in 5 s"
        assert await lun.pread(4 * 4096, 4096) == b"\x05" * 4096


async def test_keepalive_pings_amid_commands(
    iscsi_target: ISCSITarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The initiator's own pings (NOP-Out with a task tag), sent here after every 5 ms
    without a byte from the target, are answered by tgt amid reads and writes in flight,
    and cost nothing in sequence numbers: the data arrives whole."""
    from trioconv.protocols.iscsi import _client

    monkeypatch.setattr(_client, "_PING_INTERVAL", 0.005)
    pings: list[int] = []
    ping = _client.Connection.ping

    async def counted(self: _client.Connection) -> None:
        await ping(self)
        pings.append(1)

    monkeypatch.setattr(_client.Connection, "ping", counted)
    backing = tmp_path / "lun.img"
    url = iscsi_target.add_lun(backing, 16 * MiB)
    data = os.urandom(16 * MiB)
    async with open_iscsi(url, writable=True) as lun:
        await ping(lun._conn)  # one answered on its own
        for _ in range(3):
            await lun.pwrite(0, data)
            assert await lun.pread(0, 16 * MiB) == data
            if pings:
                break
        assert pings, "no keepalive ping went out"
        await lun.flush()
    assert backing.read_bytes() == data


def test_read_from_lun(iscsi_target: ISCSITarget, mixed_src: Path, tmp_path: Path) -> None:
    backing = tmp_path / "lun.img"
    url = iscsi_target.add_lun(backing, 8 * MiB, thin=True)
    backing.write_bytes(mixed_src.read_bytes())
    for flags in ((), ("-W",), ("-m", "1")):
        out = tmp_path / "out.img"
        result = trioconv_cli("convert", *flags, "-O", "raw", url, out)
        assert result.returncode == 0, result.stderr
        assert_identical(mixed_src, out)
        out.unlink()


def test_qcow2_image_on_a_lun(
    iscsi_target: ISCSITarget, mixed_src: Path, tmp_path: Path, qemu_img: str
) -> None:
    """A format driver on top of the LUN: a qcow2 image QEMU wrote into it, probed."""
    backing = tmp_path / "lun.img"
    url = iscsi_target.add_lun(backing, 8 * MiB)
    run(qemu_img, "convert", "-f", "raw", "-O", "qcow2", mixed_src, tmp_path / "tmp.qcow2")
    data = (tmp_path / "tmp.qcow2").read_bytes()
    with backing.open("r+b") as f:
        f.write(data)
    out = tmp_path / "out.img"
    result = trioconv_cli("convert", "-O", "raw", url, out)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, out)


# -- the driver -----------------------------------------------------------------------------


@pytest.mark.parametrize("thin", [False, True], ids=["thick", "thin"])
async def test_driver_contract(iscsi_target: ISCSITarget, tmp_path: Path, thin: bool) -> None:
    url = iscsi_target.add_lun(tmp_path / "lun.img", 4 * MiB, thin=thin)
    async with open_iscsi(url, writable=True) as lun:
        assert isinstance(lun, ISCSIDriver)
        assert lun.size == 4 * MiB
        assert lun.limits.request_alignment == 512
        assert lun.caps.trim is thin and lun.caps.block_status is thin
        assert not lun.caps.zero_init
        await check_driver(lun)


async def test_thin_block_status_and_discard(
    iscsi_target: ISCSITarget, mixed_src: Path, tmp_path: Path
) -> None:
    """GET LBA STATUS: holes where the backing file has holes, as qemu-img map sees it."""
    backing = tmp_path / "lun.img"
    url = iscsi_target.add_lun(backing, 8 * MiB, thin=True)
    async with open_iscsi(url, writable=True) as lun:
        await lun.pwrite_zeroes(0, lun.size, may_unmap=True, fast=True)
        data = os.urandom(MiB)
        await lun.pwrite(2 * MiB, data)
        await lun.pwrite(5 * MiB, data)
        await lun.flush()
        tiles = await check_block_status_tiles(lun)
        expected = [
            (0, 2 * MiB, ExtentKind.HOLE),
            (2 * MiB, MiB, ExtentKind.DATA),
            (3 * MiB, 2 * MiB, ExtentKind.HOLE),
            (5 * MiB, MiB, ExtentKind.DATA),
            (6 * MiB, 2 * MiB, ExtentKind.HOLE),
        ]
        assert tiles == expected
        await lun.discard(5 * MiB, MiB)
        assert (await lun.block_status(5 * MiB, MiB)).kind is ExtentKind.HOLE
        assert await lun.pread(5 * MiB, 4096) == bytes(4096)
    holes = [m for m in qemu_map(backing) if not m["data"]]
    assert sum(m["length"] for m in holes) == 7 * MiB


async def test_thick_lun_refuses_fast_zeroes(iscsi_target: ISCSITarget, tmp_path: Path) -> None:
    url = iscsi_target.add_lun(tmp_path / "lun.img", MiB)
    async with open_iscsi(url, writable=True) as lun:
        with pytest.raises(trioconv.ZeroesNotSupported):
            await lun.pwrite_zeroes(0, MiB, may_unmap=True, fast=True)
        await lun.pwrite(0, b"\xff" * MiB)
        await lun.pwrite_zeroes(4096, 8192)  # WRITE SAME, written by the target
        assert await lun.pread(0, 16384) == b"\xff" * 4096 + bytes(8192) + b"\xff" * 4096


async def test_read_only_lun_refuses_writes(iscsi_target: ISCSITarget, tmp_path: Path) -> None:
    url = iscsi_target.add_lun(tmp_path / "lun.img", MiB)
    async with open_iscsi(url) as lun:
        with pytest.raises(trioconv.UnsupportedError):
            await lun.pwrite(0, bytes(512))


def test_a_write_protected_lun_is_refused_before_writing(
    iscsi_target: ISCSITarget, mixed_src: Path, tmp_path: Path
) -> None:
    """MODE SENSE's WP bit, asked at open as qemu-img asks it: a write-protected LUN is
    refused in one line before anything is sent (it used to fail at the first write),
    and is still read."""
    backing = tmp_path / "lun.img"
    backing.write_bytes(b"\xab" * 8 * MiB)
    url = iscsi_target.add_lun(backing, 8 * MiB, readonly=True)
    for args in (["-n"], []):
        line = one_line_error(trioconv_cli("convert", *args, "-O", "raw", mixed_src, url))
        assert line.endswith("LUN is write protected"), line
        theirs = run("qemu-img", "convert", *args, "-O", "raw", mixed_src, url, check=False)
        assert "LUN is write protected" in theirs.stderr
    assert backing.read_bytes() == b"\xab" * 8 * MiB
    out = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-O", "raw", url, out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == b"\xab" * 8 * MiB


# -- login and addressing ---------------------------------------------------------------------


def test_chap(iscsi_target: ISCSITarget, mixed_src: Path, tmp_path: Path) -> None:
    backing = tmp_path / "lun.img"
    url = iscsi_target.add_lun(backing, 8 * MiB, chap=("alice", "s3cret-passw0rd"))
    assert "alice%s3cret-passw0rd@" in url
    result = trioconv_cli("convert", "-n", "-O", "raw", mixed_src, url)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, backing)

    shown = trioconv_cli("info", url)
    assert shown.returncode == 0, shown.stderr
    assert "image: iscsi://alice@" in shown.stdout and "s3cret" not in shown.stdout

    wrong = url.replace("s3cret-passw0rd", "wrong-password1")
    line = one_line_error(trioconv_cli("convert", "-n", "-O", "raw", mixed_src, wrong))
    assert "authentication failed" in line
    assert "wrong-password1" not in line  # passwords never reach messages

    address = parse_iscsi_uri(url)
    anonymous = f"iscsi://{address.host}:{address.port}/{address.target}/{address.lun}"
    line = one_line_error(trioconv_cli("convert", "-n", "-O", "raw", mixed_src, anonymous))
    assert "authentication" in line


def test_chap_with_secret_object_and_image_opts(
    iscsi_target: ISCSITarget, mixed_src: Path, tmp_path: Path
) -> None:
    # qemu-img's spelling: the password in a secret object, the LUN in block options.
    backing = tmp_path / "lun.img"
    url = iscsi_target.add_lun(backing, 8 * MiB, chap=("alice", "s3cret-passw0rd"))
    address = parse_iscsi_uri(url)
    secret = ["--object", "secret,id=sec0,data=s3cret-passw0rd"]
    opts = (
        f"driver=iscsi,transport=tcp,portal={address.host}:{address.port},"
        f"target={address.target},lun={address.lun},user=alice,password-secret=sec0"
    )
    result = trioconv_cli("convert", *secret, "-n", mixed_src, "--target-image-opts", opts)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, backing)
    ours, theirs = tmp_path / "ours.img", tmp_path / "theirs.img"
    result = trioconv_cli("convert", *secret, "--image-opts", opts, "-O", "raw", ours)
    assert result.returncode == 0, result.stderr
    run("qemu-img", "convert", *secret, "--image-opts", opts, "-O", "raw", theirs)
    assert ours.read_bytes() == theirs.read_bytes() == mixed_src.read_bytes()
    wrong = ["--object", "secret,id=sec0,data=wrong-password1"]
    line = one_line_error(trioconv_cli("convert", *wrong, "--image-opts", opts, tmp_path / "x"))
    assert "authentication failed" in line and "wrong-password1" not in line
    assert not (tmp_path / "x").exists()


def test_chap_passwords_are_taken_as_written(
    iscsi_target: ISCSITarget, mixed_src: Path, tmp_path: Path
) -> None:
    """A URL's password is taken as written, as libiscsi (so qemu-img) takes it: after
    the first ``%``, ``%41`` stays three characters and a ``:`` is part of it. The block
    options' ``password`` (plain, as QEMU 7.2 still takes it) works too."""
    password = "ab%41cd-pass:w"
    backing = tmp_path / "lun.img"
    url = iscsi_target.add_lun(backing, 8 * MiB, chap=("carol", password))
    address = parse_iscsi_uri(url)
    assert address.password == password
    result = trioconv_cli("convert", "-n", "-O", "raw", mixed_src, url)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, backing)
    out = tmp_path / "theirs.img"
    run("qemu-img", "convert", "-O", "raw", url, out)
    assert_identical(mixed_src, out)
    opts = (
        f"driver=iscsi,transport=tcp,portal={address.host}:{address.port},"
        f"target={address.target},lun={address.lun},user=carol,password={password}"
    )
    ours = tmp_path / "ours.img"
    result = trioconv_cli("convert", "--image-opts", opts, "-O", "raw", ours)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, ours)


def test_info_matches_qemu_img(iscsi_target: ISCSITarget, mixed_src: Path, tmp_path: Path) -> None:
    backing = tmp_path / "lun.img"
    url = iscsi_target.add_lun(backing, 8 * MiB)
    backing.write_bytes(mixed_src.read_bytes())
    # (qemu-img names the LUN with a json: name of its options, passwords included;
    # trioconv by its URL, without the password: the name is left out here.)
    ours = trioconv_cli("info", url)
    assert ours.returncode == 0, ours.stderr
    theirs = run("qemu-img", "info", url).stdout
    assert ours.stdout.splitlines()[1:] == theirs.splitlines()[1:]
    ours = trioconv_cli("info", "--output", "json", url)
    assert ours.returncode == 0, ours.stderr
    mine, qemus = (
        json.loads(ours.stdout),
        json.loads(run("qemu-img", "info", "--output=json", url).stdout),
    )
    del mine["filename"], qemus["filename"]
    assert mine == qemus


def test_wrong_iqn_lun_and_port(iscsi_target: ISCSITarget, mixed_src: Path, tmp_path: Path) -> None:
    url = iscsi_target.add_lun(tmp_path / "lun.img", 8 * MiB)
    address = parse_iscsi_uri(url)
    base = f"iscsi://{address.host}:{address.port}"
    cases = [
        (f"{base}/iqn.2024-01.nowhere:nothing/1", "target not found"),
        (f"{base}/{address.target}/7", "LUN 7 of target"),
        (f"{base}/{address.target}/0", "not a disk"),
        (f"iscsi://127.0.0.1:1/{address.target}/1", "Connection refused"),
        (f"{base}/{address.target}", "target-iqn/lun"),
    ]
    for bad, expected in cases:
        line = one_line_error(trioconv_cli("convert", "-n", "-O", "raw", mixed_src, bad))
        assert expected in line, (bad, line)
        line = one_line_error(trioconv_cli("convert", "-O", "raw", bad, tmp_path / "out.img"))
        assert expected in line, (bad, line)
        assert not (tmp_path / "out.img").exists()


async def test_login_redirect(iscsi_target: ISCSITarget, tmp_path: Path) -> None:
    """A portal that redirects the login (status class 1, TargetAddress) is followed."""
    iqn = "iqn.2024-01.trioconv.test:redirected"
    backing = tmp_path / "lun.img"
    backing.write_bytes(bytes(MiB))
    admin = ("--lld", "iscsi", "--mode", "target")
    # The LUN lives on a second tgtd on 127.0.0.3; the session's tgtd answers logins to
    # the same name with "moved temporarily" (tgt does not redirect initiators that
    # connect from the redirect address itself, hence a different loopback address).
    back = ISCSITarget(tmp_path, iscsi_target._tgtd, iscsi_target._tgtadm)
    back.host = "127.0.0.3"
    back.port, back.control_port = iscsi_target.port + 1, iscsi_target.control_port + 1
    back.start()
    tid = "999"
    try:
        back.tgtadm(*admin, "--op", "new", "--tid", "1", "--targetname", iqn)
        back.tgtadm(
            "--lld", "iscsi", "--mode", "logicalunit", "--op", "new", "--tid", "1",
            "--lun", "1", "--backing-store", str(backing),
        )  # fmt: skip
        back.tgtadm(*admin, "--op", "bind", "--tid", "1", "--initiator-address", "ALL")
        iscsi_target.tgtadm(*admin, "--op", "new", "--tid", tid, "--targetname", iqn)
        iscsi_target.tgtadm(*admin, "--op", "bind", "--tid", tid, "--initiator-address", "ALL")
        for key, value in (
            ("RedirectAddress", back.host),
            ("RedirectPort", str(back.port)),
            ("RedirectReason", "Temporary"),
        ):
            iscsi_target.tgtadm(
                *admin, "--op", "update", "--tid", tid, "--name", key, "--value", value
            )
        url = f"iscsi://{iscsi_target.host}:{iscsi_target.port}/{iqn}/1"
        async with open_iscsi(url, writable=True) as lun:
            assert lun.size == MiB
            await lun.pwrite(4096, b"\xa5" * 4096)
            await lun.flush()
        assert backing.read_bytes()[4096:8192] == b"\xa5" * 4096
    finally:
        iscsi_target.tgtadm(*admin, "--op", "delete", "--force", "--tid", tid, check=False)
        back.stop(kill=True)


# -- faults -------------------------------------------------------------------------------------


@pytest.fixture
def quick_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three attempts to reconnect, 50 ms apart, 0.3 s each (five within 12 s for real):
    a target that stays away ends the conversion at once."""
    from trioconv.protocols.iscsi import _client

    monkeypatch.setattr(_client, "_RECONNECT_DELAYS", (0.0, 0.05, 0.05))
    monkeypatch.setattr(_client, "_RECONNECT_ATTEMPT_TIMEOUT", 0.3)


@pytest.mark.usefixtures("quick_reconnects")
@pytest.mark.parametrize("direction", ["read", "write"])
async def test_target_killed_mid_copy(
    iscsi_target: ISCSITarget, tmp_path: Path, direction: str
) -> None:
    """Killing the target (and its portal with it) fails the conversion promptly, once
    the attempts to reconnect failed, with one line naming it."""
    url = iscsi_target.add_lun(tmp_path / "lun.img", 64 * MiB)
    try:
        if direction == "read":
            (tmp_path / "lun.img").write_bytes(os.urandom(64 * MiB))
        kill = partial(iscsi_target.stop, kill=True)
        await check_killed_mid_copy(direction, url, 64 * MiB, kill, "iSCSI target")
    finally:
        iscsi_target.start()


@pytest.mark.usefixtures("quick_reconnects")
async def test_a_stopped_target_is_given_up(
    iscsi_target: ISCSITarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tgtd stopped (SIGSTOP) mid-write keeps its connections open and answers nothing:
    the initiator pings it, then gives the connection up - here after 1 s of silence (20 s
    for real) - and tries to log in again; the kernel still takes the connections, but
    no login is answered: the conversion ends instead of waiting for ever."""
    from trioconv.protocols.iscsi import _client

    monkeypatch.setattr(_client, "_PING_INTERVAL", 0.2)
    monkeypatch.setattr(_client, "_SILENCE_LIMIT", 1.0)
    url = iscsi_target.add_lun(tmp_path / "lun.img", 64 * MiB)
    data = os.urandom(MiB)
    rescue = threading.Timer(FAULT_DEADLINE, os.kill, (iscsi_target.pid, signal.SIGCONT))
    stopped_at: list[float] = []
    try:
        with pytest.raises(BaseExceptionGroup) as info:  # noqa: PT012
            async with open_iscsi(url, writable=True) as lun:
                for i in range(64):
                    if i == 8:
                        os.kill(iscsi_target.pid, signal.SIGSTOP)
                        rescue.start()
                        stopped_at.append(trio.current_time())
                    await lun.pwrite(i * MiB, data)
    finally:
        rescue.cancel()
        os.kill(iscsi_target.pid, signal.SIGCONT)
    errors, _ = info.value.split(TrioconvIOError)
    assert errors is not None, info.value
    first: BaseException = errors
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    assert str(first) == (
        f"{url}: connection to the iSCSI target lost: the target sent nothing for 1 s, "
        "not even the answer to a ping; 3 attempts to reconnect failed, the last: no "
        "answer in 0.3 s"
    )
    assert trio.current_time() - stopped_at[0] < 5


async def test_cancelled_while_the_target_is_stopped(
    iscsi_target: ISCSITarget, tmp_path: Path
) -> None:
    url = iscsi_target.add_lun(tmp_path / "lun.img", 64 * MiB)
    await check_cancelled_while_stopped(url, 64 * MiB, iscsi_target.pid)


@pytest.mark.usefixtures("quick_reconnects")
async def test_driver_after_connection_loss_raises(
    iscsi_target: ISCSITarget, tmp_path: Path
) -> None:
    url = iscsi_target.add_lun(tmp_path / "lun.img", MiB)
    try:
        await check_reader_fails_after_loss(url, partial(iscsi_target.stop, kill=True))
    finally:
        iscsi_target.start()
