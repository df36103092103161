"""trioconv's native NFSv3 client against a real server (nfs-ganesha on loopback).

Images are put into (and checked in) the exported folder locally, and converted through
``nfs://127.0.0.1/export/NAME``; every result is checked with ``qemu-img compare``.
Faults - a missing file, a refused mount, a file our uid may not read, the server
killed mid-copy, a source failing mid-copy - must end with one clear line, promptly,
and a target the conversion created must not stay behind. A server restarted mid-copy
is reconnected to (:mod:`tests.test_nfs_reconnect` has the same with scripted servers):
the copy goes on and is exact, the writes the restart may have lost written again.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

import trioconv
from trioconv import ConvertError, ConvertOptions
from trioconv.protocols.memory import MemoryDriver
from trioconv.protocols.nfs import _client as nfs_client
from trioconv.protocols.nfs import _proto as proto

from . import nfs_server as nfs_server_mod
from ._faults import (
    FAULT_DEADLINE,
    MiB,
    check_cancelled_while_stopped,
    check_killed_mid_copy,
    check_reader_fails_after_loss,
    make_mixed_src,
    one_line_error,
    start_cli,
)
from .conftest import ImageMaker, assert_identical, run, trioconv_cli
from .nfs_server import NFSServer

nfs_server = nfs_server_mod.nfs_server

_names = itertools.count()


def unique(stem: str) -> str:
    """A name no other test uses in the shared export."""
    return f"{stem}-{os.getpid()}-{next(_names)}"


@pytest.fixture
def mixed_src(make_image: ImageMaker) -> Path:
    """8 MiB raw: data, written zeroes, holes, a data run that ends unaligned."""
    return make_mixed_src(make_image)


def put(nfs: NFSServer, local: Path, name: str) -> Path:
    """Copy ``local`` into the export as ``name``; return its local path there."""
    dest = nfs.export_dir / name
    dest.write_bytes(local.read_bytes())
    return dest


# -- reading and writing -----------------------------------------------------------------


def test_read_from_nfs(nfs_server: NFSServer, mixed_src: Path, tmp_path: Path) -> None:
    name = unique("read") + ".img"
    put(nfs_server, mixed_src, name)
    out = tmp_path / "out.img"
    result = trioconv_cli("convert", "-O", "raw", nfs_server.url(name), out)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, out)


def test_image_opts_and_json_names(nfs_server: NFSServer, mixed_src: Path, tmp_path: Path) -> None:
    # qemu-img's block options for NFS: server.host and path, user and group for AUTH_SYS.
    name = unique("opts") + ".img"
    put(nfs_server, mixed_src, name)
    opts = (
        f"driver=nfs,server.type=inet,server.host=127.0.0.1,path=/export/{name},user={os.getuid()}"
    )
    ours, theirs = tmp_path / "ours.img", tmp_path / "theirs.img"
    result = trioconv_cli("convert", "--image-opts", opts, "-O", "raw", ours)
    assert result.returncode == 0, result.stderr
    run("qemu-img", "convert", "--image-opts", opts, "-O", "raw", theirs)
    assert ours.read_bytes() == theirs.read_bytes() == mixed_src.read_bytes()
    target = unique("json-target") + ".img"
    put(nfs_server, tmp_path / "theirs.img", target)
    (nfs_server.export_dir / target).write_bytes(bytes(mixed_src.stat().st_size))
    json_name = (
        f'json:{{"driver":"raw","file":{{"driver":"nfs","server":{{"type":"inet","host":"127.0.0.1"}},'
        f'"path":"/export/{target}"}}}}'
    )
    result = trioconv_cli("convert", "-n", mixed_src, json_name)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, nfs_server.export_dir / target)


def test_write_into_existing_file_with_n(
    nfs_server: NFSServer, mixed_src: Path, qemu_img: str
) -> None:
    name = unique("existing") + ".img"
    target = nfs_server.export_dir / name
    target.write_bytes(b"\xee" * (8 * MiB))  # garbage that must be overwritten with zeroes
    result = trioconv_cli("convert", "-n", "-O", "raw", mixed_src, nfs_server.url(name))
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, target)


def test_create_new_target(nfs_server: NFSServer, mixed_src: Path) -> None:
    name = unique("new") + ".img"
    target = nfs_server.export_dir / name
    result = trioconv_cli("convert", "-O", "raw", mixed_src, nfs_server.url(name))
    assert result.returncode == 0, result.stderr
    assert target.stat().st_size == mixed_src.stat().st_size
    assert target.stat().st_mode & 0o777 == 0o600  # as QEMU (libnfs) creates an image
    assert_identical(mixed_src, target)
    # Converting again truncates and rewrites the file that now exists.
    target.write_bytes(b"\xee" * (9 * MiB))
    result = trioconv_cli("convert", "-O", "raw", mixed_src, nfs_server.url(name))
    assert result.returncode == 0, result.stderr
    assert target.stat().st_size == mixed_src.stat().st_size
    assert_identical(mixed_src, target)


def test_create_qcow2_target(nfs_server: NFSServer, mixed_src: Path, qemu_img: str) -> None:
    name = unique("new") + ".qcow2"
    target = nfs_server.export_dir / name
    result = trioconv_cli("convert", "-O", "qcow2", mixed_src, nfs_server.url(name))
    assert result.returncode == 0, result.stderr
    run(qemu_img, "check", target)
    assert_identical(mixed_src, target, fmt_b="qcow2")


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("vmdk", []),
        ("vmdk", ["-o", "subformat=streamOptimized"]),
        ("qcow2", ["-o", "preallocation=metadata"]),
        ("vpc", []),
        ("vhdx", []),
        ("vdi", []),
    ],
    ids=["vmdk", "vmdk-stream", "qcow2-metadata", "vpc", "vhdx", "vdi"],
)
def test_create_targets_of_every_format(
    nfs_server: NFSServer, mixed_src: Path, qemu_img: str, fmt: str, options: list[str]
) -> None:
    """Every format qemu-img writes on NFS, trioconv writes too: the file grows as grains
    and blocks are appended, and qcow2's metadata preallocation is plain writes."""
    name = unique("fmt") + "." + fmt
    target = nfs_server.export_dir / name
    result = trioconv_cli("convert", "-O", fmt, *options, mixed_src, nfs_server.url(name))
    assert result.returncode == 0, result.stderr
    if fmt != "vpc":
        run(qemu_img, "check", "-f", fmt, target)
    assert_identical(mixed_src, target, fmt_b=fmt)
    if "subformat=streamOptimized" in options:
        return  # (written once: qemu-img refuses to write into it again too)
    # -n into the image now on the server: its own size stays.
    result = trioconv_cli("convert", "-n", "-O", fmt, mixed_src, nfs_server.url(name))
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, target, fmt_b=fmt)


def test_file_preallocation_is_refused_on_nfs(nfs_server: NFSServer, mixed_src: Path) -> None:
    """Reserving blocks needs fallocate, which NFSv3 lacks (qemu-img fails too)."""
    for fmt, mode in (("raw", "falloc"), ("qcow2", "full")):
        name = unique("prealloc") + "." + fmt
        line = one_line_error(
            trioconv_cli(
                "convert", "-O", fmt, "-o", f"preallocation={mode}", mixed_src, nfs_server.url(name)
            )
        )
        assert "does not support preallocation" in line
        assert not (nfs_server.export_dir / name).exists()


def test_info_matches_qemu_img(nfs_server: NFSServer, mixed_src: Path, qemu_img: str) -> None:
    """``info`` over NFS prints what qemu-img prints, the disk size the server reports
    included."""
    name = unique("info") + " x.qcow2"
    run(qemu_img, "convert", "-O", "qcow2", mixed_src, nfs_server.export_dir / name)
    quoted = name.replace(" ", "%20")
    # The image is named as QEMU names it: the path decoded, uid/gid when not 0, the
    # tuning parameters left out.
    for url in (
        nfs_server.url(quoted),
        nfs_server.url(quoted, "gid=1000&readahead=0"),
        nfs_server.url(quoted, "uid=0&gid=0"),
    ):
        for output in ("human", "json"):
            ours = trioconv_cli("info", "--output", output, url)
            assert ours.returncode == 0, ours.stderr
            theirs = run(qemu_img, "info", "--output", output, url)
            assert ours.stdout == theirs.stdout


def test_symbolic_links_are_followed_as_libnfs_follows_them(
    nfs_server: NFSServer, mixed_src: Path, tmp_path: Path
) -> None:
    """A link on the export is followed - relative from its folder, absolute when it
    names a path inside what was mounted (the image's folder, as QEMU mounts it),
    through linked folders too - and one that leads out of that, or loops, is refused
    in one line, as qemu-img (libnfs) does."""
    stem = unique("links")
    folder = nfs_server.export_dir / stem
    (folder / "sub").mkdir(parents=True)
    put(nfs_server, mixed_src, f"{stem}/sub/disk.img")
    (folder / "rel.img").symlink_to("sub/disk.img")
    (folder / "sub" / "up.img").symlink_to("../rel.img")
    (folder / "abs.img").symlink_to(f"/export/{stem}/sub/disk.img")  # the export's path
    (folder / "dir").symlink_to("sub")
    for name in ("rel.img", "abs.img", "dir/disk.img"):
        out = tmp_path / "out.img"
        result = trioconv_cli("convert", "-O", "raw", nfs_server.url(f"{stem}/{name}"), out)
        assert result.returncode == 0, (name, result.stderr)
        assert_identical(mixed_src, out)
    (folder / "escape.img").symlink_to("../../../etc/hostname")
    (folder / "root.img").symlink_to("/etc/hostname")
    (folder / "a.img").symlink_to("b.img")
    (folder / "b.img").symlink_to("a.img")
    for name, reason in (
        ("sub/up.img", "Symbolic link points outside export"),  # (above the mount)
        ("escape.img", "Symbolic link points outside export"),
        ("root.img", "Symbolic link points outside export"),
        ("a.img", "Too many levels of symbolic links"),
    ):
        line = one_line_error(trioconv_cli("info", nfs_server.url(f"{stem}/{name}")))
        assert reason in line


def test_parallel_out_of_order(nfs_server: NFSServer, tmp_path: Path, qemu_img: str) -> None:
    src = tmp_path / "random.img"
    src.write_bytes(os.urandom(24 * MiB + 12345))
    name = unique("wm8") + ".img"
    result = trioconv_cli("convert", "-W", "-m", "8", "-O", "raw", src, nfs_server.url(name))
    assert result.returncode == 0, result.stderr
    assert_identical(src, nfs_server.export_dir / name)
    back = tmp_path / "back.img"
    result = trioconv_cli("convert", "-W", "-m", "8", "-O", "raw", nfs_server.url(name), back)
    assert result.returncode == 0, result.stderr
    assert_identical(src, back)


def test_qcow2_image_on_nfs(
    nfs_server: NFSServer, mixed_src: Path, tmp_path: Path, qemu_img: str
) -> None:
    name = unique("qemu") + ".qcow2"
    run(qemu_img, "convert", "-O", "qcow2", mixed_src, nfs_server.export_dir / name)
    for fmt in ([], ["-f", "qcow2"]):
        out = tmp_path / f"out{len(fmt)}.img"
        result = trioconv_cli("convert", *fmt, "-O", "raw", nfs_server.url(name), out)
        assert result.returncode == 0, result.stderr
        assert_identical(mixed_src, out)


async def test_api_reports_limits_and_caps(nfs_server: NFSServer, mixed_src: Path) -> None:
    name = unique("api") + ".img"
    put(nfs_server, mixed_src, name)
    async with trioconv.open_image(nfs_server.url(name), "raw") as image:
        assert image.size == 8 * MiB
        assert 4096 <= image.limits.max_transfer <= MiB
        assert image.limits.opt_transfer <= image.limits.max_transfer
        assert not image.caps.block_status and not image.caps.writable
        assert await image.pread(8386560, 1536) == b"\x99" * 1536
        # Many reads in flight on one connection, each routed to its own buffer.
        results: dict[int, bytes] = {}

        async def read(off: int) -> None:
            results[off] = await image.pread(off, 4096)

        async with trio.open_nursery() as nursery:
            for off in range(0, 4 * MiB, 64 * 1024):
                nursery.start_soon(read, off)
    data = mixed_src.read_bytes()
    assert all(results[off] == data[off : off + 4096] for off in results)


# -- errors ------------------------------------------------------------------------------------


def test_missing_file(nfs_server: NFSServer, tmp_path: Path) -> None:
    url = nfs_server.url("no-such-dir/missing.img")
    line = one_line_error(trioconv_cli("convert", "-O", "raw", url, tmp_path / "out.img"))
    assert "No such file or directory" in line
    assert "no-such-dir" in line and url in line


def test_a_folder_as_the_target(nfs_server: NFSServer, mixed_src: Path) -> None:
    """A target name that is a folder on the export is refused by what it is."""
    name = unique("folder")
    (nfs_server.export_dir / name).mkdir()
    line = one_line_error(trioconv_cli("convert", "-O", "raw", mixed_src, nfs_server.url(name)))
    assert "Is a directory" in line
    assert (nfs_server.export_dir / name).is_dir()


def test_refused_export(nfs_server: NFSServer, tmp_path: Path) -> None:
    url = "nfs://127.0.0.1/not-exported/disk.img"
    line = one_line_error(trioconv_cli("convert", "-O", "raw", url, tmp_path / "out.img"))
    assert url in line and "mounting '/not-exported' failed" in line


def test_permission_denied_for_other_uid(
    nfs_server: NFSServer, mixed_src: Path, tmp_path: Path
) -> None:
    name = unique("secret") + ".img"
    path = put(nfs_server, mixed_src, name)
    path.chmod(0o644)
    ok = trioconv_cli(
        "convert", "-O", "raw", nfs_server.url(name, "uid=1000&gid=1000"), tmp_path / "ok.img"
    )
    assert ok.returncode == 0, ok.stderr
    assert_identical(mixed_src, tmp_path / "ok.img")
    path.chmod(0o000)
    url = nfs_server.url(name, "uid=1000&gid=1000")
    line = one_line_error(trioconv_cli("convert", "-O", "raw", url, tmp_path / "out.img"))
    assert "Permission denied" in line and name in line
    assert "does not let this client read it" in line
    # Writing as that uid is refused as well, before anything is written.
    path.chmod(0o444)
    line = one_line_error(trioconv_cli("convert", "-n", "-O", "raw", mixed_src, url))
    assert "Permission denied" in line and "does not let this client write it" in line
    assert path.read_bytes() == mixed_src.read_bytes()


def test_connection_refused(tmp_path: Path) -> None:
    url = "nfs://127.0.0.1/export/disk.img?nfsport=1&mountport=1"
    line = one_line_error(trioconv_cli("convert", "-O", "raw", url, tmp_path / "out.img"))
    assert "Connection refused" in line and url in line


async def test_failed_conversion_removes_created_file(nfs_server: NFSServer) -> None:
    name = unique("failed") + ".img"
    source = MemoryDriver(data=os.urandom(8 * MiB), block_status=False)
    source.fail_read_at = 6 * MiB
    with pytest.raises(ConvertError):
        await trioconv.convert(source, nfs_server.url(name), ConvertOptions(parallel=2))
    assert not (nfs_server.export_dir / name).exists()
    # Cancelled from outside: also removed (the removal is shielded).
    slow = MemoryDriver(data=os.urandom(8 * MiB), block_status=False, delay=2.0)
    seen: list[bool] = []

    async def look() -> None:
        await trio.sleep(0.5)
        seen.append((nfs_server.export_dir / name).exists())

    with trio.move_on_after(1.0) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(look)
            await trioconv.convert(slow, nfs_server.url(name))
    assert scope.cancelled_caught
    assert seen == [True]  # it was created, and is gone again
    assert not (nfs_server.export_dir / name).exists()
    # A file that existed before is left in place.
    existing = nfs_server.export_dir / name
    existing.write_bytes(b"x" * 100)
    source.fail_read_at = 6 * MiB
    with pytest.raises(ConvertError):
        await trioconv.convert(source, nfs_server.url(name))
    assert existing.exists()


async def test_server_stopped_mid_copy(nfs_server: NFSServer) -> None:
    """Killing the server fails the conversion promptly, reading or writing."""
    name = unique("killed") + ".img"
    nfs_server.export_dir.joinpath(name).write_bytes(os.urandom(64 * MiB))
    try:
        for direction in ("read", "write"):
            kill = partial(nfs_server.stop, kill=True)
            await check_killed_mid_copy(
                direction, nfs_server.url(name), 64 * MiB, kill, "NFS server"
            )
            nfs_server.start()
    finally:
        nfs_server.start()


async def test_cancelled_while_the_server_is_stopped(nfs_server: NFSServer) -> None:
    name = unique("stopped") + ".img"
    nfs_server.export_dir.joinpath(name).write_bytes(bytes(64 * MiB))
    await check_cancelled_while_stopped(nfs_server.url(name), 64 * MiB, nfs_server.pid)


async def test_driver_after_connection_loss_raises(nfs_server: NFSServer) -> None:
    name = unique("lost") + ".img"
    nfs_server.export_dir.joinpath(name).write_bytes(bytes(MiB))
    try:
        await check_reader_fails_after_loss(
            nfs_server.url(name), partial(nfs_server.stop, kill=True)
        )
    finally:
        nfs_server.start()


def test_qcow2_overlay_on_nfs_finds_its_backing_file(
    nfs_server: NFSServer, mixed_src: Path, tmp_path: Path, qemu_img: str
) -> None:
    """A relative backing file name resolves next to the overlay on the export, with
    the overlay URL's options (``?uid=``), as QEMU resolves it."""
    base, overlay = unique("base") + ".qcow2", unique("overlay") + ".qcow2"
    run(qemu_img, "convert", "-O", "qcow2", mixed_src, nfs_server.export_dir / base)
    local_overlay = nfs_server.export_dir / overlay
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", local_overlay)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x66 1M 64k", local_overlay)
    url = nfs_server.url(overlay, f"uid={os.getuid()}")
    shown = trioconv_cli("info", url)
    assert shown.returncode == 0, shown.stderr
    assert f"(actual path: {nfs_server.url(base, f'uid={os.getuid()}')})" in shown.stdout
    out = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-O", "raw", url, out)
    assert result.returncode == 0, result.stderr
    assert_identical(local_overlay, out, "qcow2", "raw")


# -- restarts: the client reconnects ---------------------------------------------------------

#: 16 MiB at ``-r 4M``: about four seconds, so a restart one second in lands mid-copy.
SIZE = 16 * MiB


def run_cli_with(
    args: list[str | Path], fault: Callable[[], None]
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the CLI and, a second in (mid-copy), ``fault()``: the run, and how many
    seconds it went on after the fault."""
    proc = start_cli(args)
    try:
        time.sleep(1.0)
        assert proc.poll() is None, proc.communicate()
        fault()
        done = time.monotonic()
        stdout, stderr = proc.communicate(timeout=FAULT_DEADLINE * 3)
        after = time.monotonic() - done
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), after


def test_reading_through_a_server_restart(nfs_server: NFSServer, tmp_path: Path) -> None:
    """The server crashes and comes back a second into a four-second copy: the copy
    goes on, quietly, and is exact."""
    name = unique("restart-read") + ".img"
    src = nfs_server.export_dir / name
    src.write_bytes(os.urandom(SIZE))
    out = tmp_path / "out.img"
    try:
        args: list[str | Path] = ["convert", "-m", "4", "-r", "4M", "-O", "raw"]
        # Frozen 0.3 s first, so that calls wait unanswered when the server dies.
        restart = partial(nfs_server.restart, freeze=0.3)
        result, _ = run_cli_with([*args, nfs_server.url(name), out], restart)
    finally:
        nfs_server.start()
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert_identical(src, out)


def test_writing_through_a_server_restart(nfs_server: NFSServer, tmp_path: Path) -> None:
    """The same into a new file on the server: exact too, although the restart may have
    lost what was written unstable before it."""
    name = unique("restart-write") + ".img"
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(SIZE))
    try:
        args: list[str | Path] = ["convert", "-m", "4", "-r", "4M", "-O", "raw"]
        restart = partial(nfs_server.restart, freeze=0.3)
        result, _ = run_cli_with([*args, src, nfs_server.url(name)], restart)
    finally:
        nfs_server.start()
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert_identical(src, nfs_server.export_dir / name)


def _copy_across(
    nfs_server: NFSServer, stem: str, direction: str, size: int
) -> tuple[Path, bytes, MemoryDriver, str | MemoryDriver, str | MemoryDriver, ConvertOptions]:
    """A slow copy of ``size`` random bytes from a new file on the server into memory
    (``direction`` "read") or from memory into one (zeroes before): the file, the
    bytes, the memory side, source, target and options (8 MiB/s)."""
    name = unique(stem) + ".img"
    on_server = nfs_server.export_dir / name
    data = os.urandom(size)
    if direction == "read":
        on_server.write_bytes(data)
        memory = MemoryDriver(len(data))
        # Two tasks, so that reading goes on until the end: with eight, the writes the
        # rate limit holds back would leave all the jobs read one second in.
        opts = ConvertOptions(rate_limit=8 * MiB, parallel=2)
        return on_server, data, memory, nfs_server.url(name), memory, opts
    on_server.write_bytes(bytes(len(data)))
    memory = MemoryDriver(data=data, block_status=False)
    opts = ConvertOptions(rate_limit=8 * MiB, no_create=True)
    return on_server, data, memory, memory, nfs_server.url(name), opts


@pytest.mark.parametrize("direction", ["read", "write"])
async def test_a_restart_with_calls_in_flight(
    nfs_server: NFSServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direction: str
) -> None:
    """In process, to see inside: the calls that were in flight when the server died
    went out again on a new connection; writing, the restart changed the write verifier
    and what was written before it was written again - and the copy is exact."""
    redials: list[bool] = []  # each attempt to reconnect: did it connect?
    waiting: list[int] = []  # calls waiting for a reply when the connection broke
    verifiers: list[bytes] = []
    rewritten: list[int] = []
    real_redial, real_reconnect, real_decode, real_rewrite = (
        nfs_client._redial,
        nfs_client.RPCClient._reconnect,
        proto.decode_write,
        nfs_client.NFSDriver._rewrite,
    )

    async def redial(address: nfs_client.NFSAddress) -> trio.SocketStream:
        redials.append(False)
        stream = await real_redial(address)
        redials[-1] = True
        return stream

    async def reconnect(self: nfs_client.RPCClient, why: str) -> bool:
        waiting.append(len(self._pending))
        return await real_reconnect(self, why)

    def decode_write(u: Any) -> proto.WriteResult:
        result = real_decode(u)
        verifiers.append(result.verf)
        return result

    async def rewrite(self: nfs_client.NFSDriver, entry: proto.Dirty) -> None:
        rewritten.append(entry.offset)
        await real_rewrite(self, entry)

    monkeypatch.setattr(nfs_client, "_redial", redial)
    monkeypatch.setattr(nfs_client.RPCClient, "_reconnect", reconnect)
    monkeypatch.setattr(proto, "decode_write", decode_write)
    monkeypatch.setattr(nfs_client.NFSDriver, "_rewrite", rewrite)

    on_server, data, memory, source, target, opts = _copy_across(
        nfs_server, "inflight", direction, 32 * MiB
    )
    restarted: list[float] = []

    async def restart_mid_copy() -> None:
        for _ in range(1000):
            if memory.log:
                break
            await trio.sleep(0.01)
        await trio.sleep(0.8)
        await trio.to_thread.run_sync(partial(nfs_server.restart, freeze=0.3))
        restarted.append(trio.current_time())

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(restart_mid_copy)
                await trioconv.convert(source, target, opts)
            finished = trio.current_time()
    finally:
        nfs_server.start()
    assert restarted and restarted[0] < finished, "the copy ended before the restart"
    assert len(waiting) == 1 and waiting[0] > 0, waiting
    assert redials.count(True) == 1 and redials[-1]  # (maybe refused first: still down)
    if direction == "read":
        out = tmp_path / "out.img"
        out.write_bytes(bytes(memory.data))
        assert_identical(on_server, out)
    else:
        assert len(set(verifiers)) == 2, set(verifiers)
        assert rewritten
        assert on_server.read_bytes() == data


@pytest.mark.parametrize(
    ("direction", "resumed"),
    [("read", True), ("write", False)],
    ids=["read-resumed", "write-hung"],
)
async def test_a_server_that_stops_answering(
    nfs_server: NFSServer, monkeypatch: pytest.MonkeyPatch, direction: str, resumed: bool
) -> None:
    """ganesha stopped (SIGSTOP) mid-copy, as a hung server: its kernel keeps the
    connection open and takes new ones, but nothing answers. After the silence limit (a
    minute really, 1 s here) the client connects again - rpcbind still answers, ganesha
    does not answer the NULL call. Resumed meanwhile, it answers: the copy goes on and is
    exact. Still stopped: the conversion ends with one line within the reconnect budget
    (3 s here), not when the server comes back."""
    monkeypatch.setattr(nfs_client, "_REPLY_TIMEOUT", 1.0)
    monkeypatch.setattr(nfs_client, "_RECONNECT_ATTEMPT_TIMEOUT", 1.0)
    monkeypatch.setattr(nfs_client, "_RECONNECT_TIMEOUT", 3.0)
    reconnects: list[str] = []  # why the connection was made again, each time
    real_reconnect = nfs_client.RPCClient._reconnect

    async def reconnect(self: nfs_client.RPCClient, why: str) -> bool:
        reconnects.append(why)
        return await real_reconnect(self, why)

    monkeypatch.setattr(nfs_client.RPCClient, "_reconnect", reconnect)
    on_server, data, memory, source, target, opts = _copy_across(
        nfs_server, "hung", direction, 16 * MiB
    )
    pid = nfs_server.pid
    # Resumed after FAULT_DEADLINE whatever happens, so a regression fails, not hangs.
    rescue = threading.Timer(FAULT_DEADLINE, os.kill, (pid, signal.SIGCONT))
    stopped: list[float] = []
    errors: list[ConvertError] = []

    async def stop_mid_copy() -> None:
        for _ in range(1000):
            if memory.log:
                break
            await trio.sleep(0.01)
        await trio.sleep(0.3)
        os.kill(pid, signal.SIGSTOP)
        rescue.start()
        stopped.append(trio.current_time())
        if resumed:
            await trio.sleep(1.5)  # past the silence limit: the client reconnects
            os.kill(pid, signal.SIGCONT)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_mid_copy)
            try:
                await trioconv.convert(source, target, opts)
            except ConvertError as exc:
                errors.append(exc)
        finished = trio.current_time()
    finally:
        rescue.cancel()
        os.kill(pid, signal.SIGCONT)
        # A fresh server for the next test: a ganesha woken from a long stop may refuse
        # or drop new connections for a moment as it catches up.
        nfs_server.stop(kill=True)
        nfs_server.start()
    assert stopped and stopped[0] < finished, "the copy ended before the server stopped"
    # (The first: resumed, ganesha may also drop the new connection as it catches up.)
    assert reconnects[:1] == ["no reply in 1 s"], reconnects
    if resumed:
        assert not errors, errors
        assert (memory.data if direction == "read" else on_server.read_bytes()) == data
        return
    assert errors, "the conversion succeeded although the server never answered"
    message = str(errors[0])
    assert "\n" not in message
    assert "connection to the NFS server lost: no reply in 1 s; " in message
    assert "attempts to reconnect failed" in message
    assert finished - stopped[0] < 1 + 3 + 2


@pytest.mark.parametrize(
    ("direction", "stop"), [("read", "kill"), ("write", "term")], ids=["read-kill", "write-term"]
)
def test_a_server_that_stays_down(
    nfs_server: NFSServer, tmp_path: Path, direction: str, stop: str
) -> None:
    """Killed (its ports still on the portmapper: connections refused) or stopped in
    order (its ports gone from the portmapper), and not started again: the conversion
    gives up within seconds, with one line. A local target it created is removed; an
    NFS one cannot be, with its server gone, and stays (as it always did)."""
    name = unique("down") + ".img"
    local = tmp_path / "local.img"
    args: list[str | Path] = ["convert", "-m", "4", "-r", "4M", "-O", "raw"]
    if direction == "read":
        (nfs_server.export_dir / name).write_bytes(os.urandom(SIZE))
        args += [nfs_server.url(name), local]
    else:
        local.write_bytes(os.urandom(SIZE))
        args += [local, nfs_server.url(name)]
    try:
        result, elapsed = run_cli_with(args, partial(nfs_server.stop, kill=stop == "kill"))
    finally:
        nfs_server.start()
    line = one_line_error(result)
    assert "connection to the NFS server lost" in line
    assert "attempts to reconnect failed, the last: " in line
    if stop == "kill":
        assert line.endswith("Connection refused")
    else:
        assert line.endswith("no NFS v3 server over TCP is registered with the portmapper")
    assert elapsed < FAULT_DEADLINE
    if direction == "read":
        assert not local.exists()
    else:
        assert (nfs_server.export_dir / name).exists()
