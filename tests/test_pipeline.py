"""The copy engine on in-memory drivers: order, overlap, zeroes, failure and cancellation."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import trioconv
from trioconv import ExtentKind
from trioconv.convert.pipeline import Chunker, RunKind, SourceMap, find_zero_runs
from trioconv.protocols.memory import MemoryDriver, Request

from .conftest import ImageMaker, qemu_map, walk_extents

MiB = 1024 * 1024


def mixed_image(size: int = 16 * MiB, seed: int = 1) -> bytes:
    """Random data, zero-filled data and holes, in chunks of 64 KiB to 1 MiB."""
    rng = random.Random(seed)
    out = bytearray(size)
    pos = 0
    while pos < size:
        n = min(size - pos, rng.choice([64, 128, 256, 512, 1024]) * 1024)
        if rng.random() < 0.5:
            out[pos : pos + n] = rng.randbytes(n)
        pos += n
    return bytes(out)


def writes(driver: MemoryDriver) -> list[Request]:
    return [r for r in driver.log if r.op in ("write", "zero")]


# -- pure pieces --------------------------------------------------------------------------


def test_chunker_aligns_and_bounds() -> None:
    c = Chunker(10 * MiB, align=4096, max_data=2 * MiB)
    jobs = (
        c.feed(0, 3 * MiB, False)
        + c.feed(3 * MiB, 100, True)
        + c.feed(3 * MiB + 100, 7 * MiB - 100, True)
    )
    jobs += c.finish()
    assert jobs[0] == (0, 2 * MiB, RunKind.DATA)
    # The zero run's unaligned head becomes data; the rest is one zero job.
    assert (2 * MiB, MiB + 4096, RunKind.DATA) in jobs
    assert jobs[-1] == (3 * MiB + 4096, 7 * MiB - 4096, RunKind.ZERO)
    covered = sorted(jobs)
    assert sum(n for _, n, _ in covered) == 10 * MiB


@given(
    runs=st.lists(st.tuples(st.integers(1, 3 * MiB), st.booleans()), min_size=1, max_size=30),
    align=st.sampled_from([512, 4096, 65536]),
)
def test_chunker_tiles_everything(runs: list[tuple[int, bool]], align: int) -> None:
    total = sum(n for n, _ in runs)
    c = Chunker(total, align=align, max_data=2 * MiB)
    jobs = []
    pos = 0
    for n, zero in runs:
        jobs += c.feed(pos, n, zero)
        pos += n
    jobs += c.finish()
    pos = 0
    for offset, n, _ in jobs:
        assert offset == pos and n > 0
        assert offset % align == 0
        assert (offset + n) % align == 0 or offset + n == total
        pos += n
    assert pos == total
    assert all(n <= 2 * MiB for _, n, zero in jobs if not zero)


def test_find_zero_runs() -> None:
    buf = bytearray(16384)
    buf[5000] = 1
    runs = find_zero_runs(buf, len(buf), 0, 4096)
    assert runs == [(0, 4096, True), (4096, 4096, False), (8192, 8192, True)]
    # Blocks align to the absolute offset, not to the buffer; partial blocks are data.
    head = bytearray(6144)
    head[0] = 1
    runs = find_zero_runs(head, 6144, 2048, 4096)
    assert runs == [(2048, 2048, False), (4096, 4096, True)]
    # ... unless the whole buffer is zero, edges and all (qemu-img's short chunks).
    assert find_zero_runs(bytes(6144), 6144, 2048, 4096) == [(2048, 6144, True)]
    # A partial block of zeroes at an edge is zero too, as qemu-img skips it: here the
    # 3.5 KiB after the last block boundary of a data extent ending at 1 MiB + 3.5 KiB.
    tail = bytearray(8192 + 3584)
    tail[:8192] = b"\x01" * 8192
    runs = find_zero_runs(tail, len(tail), 2**20 - 8192, 4096)
    assert runs == [(2**20 - 8192, 8192, False), (2**20, 3584, True)]
    lead = bytearray(2048 + 4096)
    lead[4000] = 1
    runs = find_zero_runs(lead, len(lead), 2048, 4096)
    assert runs == [(2048, 2048, True), (4096, 4096, False)]


@given(
    blocks=st.lists(st.sampled_from(["zero", "data", "sparse-byte"]), min_size=1, max_size=40),
    base=st.sampled_from([0, 512, 4096, 2 * MiB]),
    tail=st.integers(0, 511),
)
def test_find_zero_runs_matches_naive_scan(blocks: list[str], base: int, tail: int) -> None:
    g = 1024
    buf = bytearray()
    for kind in blocks:
        chunk = bytearray(g) if kind != "data" else bytearray(random.randbytes(g))
        if kind == "sparse-byte":
            chunk[g // 2] = 1
        buf += chunk
    buf += bytes(tail)
    runs = find_zero_runs(bytes(buf), len(buf), base, g)
    pos = base
    for offset, n, zero in runs:
        assert offset == pos and n > 0
        pos += n
        if zero:
            # Zero runs start and end on block boundaries, or at the buffer's edges.
            assert offset % g == 0 or offset == base
            assert (offset + n) % g == 0 or offset + n == base + len(buf)
            assert buf[offset - base : offset - base + n] == bytes(n)
    assert pos == base + len(buf)
    # Every aligned, whole, all-zero block lies in a zero run, and so does an all-zero
    # partial block at the end.
    for start in range(-(-base // g) * g, base + len(buf) - g + 1, g):
        if buf[start - base : start - base + g] == bytes(g):
            assert any(z and o <= start < o + n for o, n, z in runs)
    last = max(base, (base + len(buf)) // g * g)
    if last < base + len(buf) and buf[last - base :] == bytes(base + len(buf) - last):
        assert runs[-1][2] and runs[-1][0] <= last


def test_find_zero_runs_checks_every_byte_of_a_candidate_run() -> None:
    g = 4096
    buf = bytearray(8 * g)
    buf[2 * g + 100] = 7  # block 2: first and last byte zero, yet not a zero block
    buf[5 * g : 6 * g] = b"\xff" * g  # block 5: data
    buf[7 * g - 1] = 1  # block 6 ends with a non-zero byte
    runs = find_zero_runs(buf, len(buf), 0, g)
    assert runs == [
        (0, 2 * g, True),
        (2 * g, g, False),
        (3 * g, 2 * g, True),
        (5 * g, 2 * g, False),
        (7 * g, g, True),
    ]
    # Within one block: zero only when it is zero throughout; no bytes.
    assert find_zero_runs(bytes(g), g - 512, 512, g) == [(512, g - 512, True)]
    short = bytearray(g)
    short[100] = 1
    assert find_zero_runs(short, g - 512, 512, g) == [(512, g - 512, False)]
    assert find_zero_runs(b"", 0, 0, g) == []


def _sparse_file(path: Path, size: int, data_at: list[int], chunk: int) -> bool:
    """Write ``chunk`` bytes at each offset, holes elsewhere; False: holes not reported."""
    with open(path, "wb") as f:
        for offset in data_at:
            f.seek(offset)
            f.write(b"\x5a" * chunk)
        f.truncate(size)
    fd = os.open(path, os.O_RDONLY)
    try:
        first_hole = chunk if data_at and data_at[0] == 0 else 0
        return os.lseek(fd, 0, os.SEEK_HOLE) == first_hole
    finally:
        os.close(fd)


async def test_file_block_status_maps_a_window_in_one_thread_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trioconv.protocols.file import open_file

    path = tmp_path / "sparse.img"
    chunk = 64 * 1024
    data_at = [i * 4 * chunk for i in range(40)] + [200 * chunk]
    if not _sparse_file(path, 256 * chunk, data_at, chunk):
        pytest.skip("this filesystem does not report holes")
    calls = []
    start_thread_soon = trio.lowlevel.start_thread_soon

    def counting(fn: Any, deliver: Any, name: str | None = None) -> None:
        calls.append(fn)
        start_thread_soon(fn, deliver, name)

    async with await open_file(path) as drv:
        monkeypatch.setattr(trio.lowlevel, "start_thread_soon", counting)
        seen = await walk_extents(drv.block_status, drv.size)
        assert len(calls) == 1  # 83 extents, one worker-thread call
        want_data = [(o, chunk) for o in data_at]
        assert [(o, n) for o, n, k in seen if k is ExtentKind.DATA] == want_data
        assert all(k is ExtentKind.ZERO for o, n, k in seen if (o, n) not in want_data)
        # A query inside a known extent starts where it was asked.
        ext = await drv.block_status(chunk + 100, 4096)
        assert (ext.offset, ext.end, ext.kind) == (chunk + 100, 4 * chunk, ExtentKind.ZERO)
        assert len(calls) == 1


async def test_file_block_status_map_is_dropped_by_writes(tmp_path: Path) -> None:
    from trioconv.protocols.file import open_file

    path = tmp_path / "target.img"
    if not _sparse_file(path, 4 * MiB, [], 0):
        pytest.skip("this filesystem does not report holes")
    async with await open_file(path, writable=True) as drv:
        ext = await drv.block_status(0, drv.size)
        assert (ext.length, ext.kind) == (4 * MiB, ExtentKind.ZERO)
        await drv.pwrite(MiB, b"\x01" * 65536)
        ext = await drv.block_status(MiB, drv.size - MiB)
        assert ext.kind is ExtentKind.DATA and ext.length >= 65536
        await drv.pwrite_zeroes(0, 4 * MiB, may_unmap=True)
        ext = await drv.block_status(MiB, drv.size - MiB)
        assert (ext.offset, ext.end, ext.kind) == (MiB, 4 * MiB, ExtentKind.ZERO)


@pytest.mark.parametrize("refuse", [False, True])
async def test_file_allocates_a_large_write_ahead_only_where_it_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuse: bool
) -> None:
    """A large buffered write reserves its own blocks first (one ``fallocate`` that
    keeps the size); holes elsewhere stay holes, and a file system that cannot is asked
    once."""
    import ctypes
    import errno

    from trioconv.protocols import file as file_mod

    path = tmp_path / "target.img"
    if not _sparse_file(path, 8 * MiB, [], 0):
        pytest.skip("this filesystem does not report holes")
    real = file_mod._fallocate
    calls: list[tuple[int, int, int]] = []

    def counting(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append((mode, offset, length))
        if refuse:
            ctypes.set_errno(errno.EOPNOTSUPP)
            return -1
        return int(real(fd, mode, offset, length))

    monkeypatch.setattr(file_mod, "_fallocate", counting)
    monkeypatch.setattr(file_mod, "_allocates_ahead", lambda fd: True)  # (ext4, XFS)
    data = random.Random(3).randbytes(256 * 1024)
    async with await file_mod.open_file(path, writable=True) as drv:
        await drv.pwrite(MiB, data)
        await drv.pwrite(4 * MiB + 512, data)
        await drv.pwrite(6 * MiB, b"\x01" * 4096)  # small: never allocated ahead
    keep = file_mod._FALLOC_FL_KEEP_SIZE
    want = (
        [(keep, MiB, len(data))]
        if refuse
        else [(keep, MiB, len(data)), (keep, 4 * MiB + 512, len(data))]
    )
    assert calls == want
    raw = path.read_bytes()
    assert len(raw) == 8 * MiB
    assert raw[MiB : MiB + len(data)] == data
    assert raw[4 * MiB + 512 : 4 * MiB + 512 + len(data)] == data
    assert raw[6 * MiB : 6 * MiB + 4096] == b"\x01" * 4096
    rest = (
        raw[:MiB] + raw[MiB + len(data) : 4 * MiB + 512] + raw[4 * MiB + 512 + len(data) : 6 * MiB]
    )
    assert rest == bytes(len(rest)) and raw[6 * MiB + 4096 :] == bytes(2 * MiB - 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == MiB
        assert os.lseek(fd, MiB, os.SEEK_HOLE) == MiB + len(data)
        assert os.lseek(fd, MiB + len(data), os.SEEK_DATA) == 4 * MiB
    finally:
        os.close(fd)


def test_only_ext4_and_xfs_allocate_ahead() -> None:
    """Where an allocation costs a round trip or buys nothing, writes do not ask."""
    from trioconv.protocols.file import _allocates_ahead

    fd = os.open("/proc", os.O_RDONLY)
    try:
        assert not _allocates_ahead(fd)
    finally:
        os.close(fd)
    fd = os.open(".", os.O_RDONLY)
    try:
        statfs = subprocess.run(["stat", "-f", "-c", "%T", "."], capture_output=True, text=True)
        assert _allocates_ahead(fd) is (statfs.stdout.strip() in ("ext2/ext3", "xfs"))
    finally:
        os.close(fd)


def test_source_map_splits_across_sources() -> None:
    a, b = MemoryDriver(1000), MemoryDriver(3000)
    smap = SourceMap([a, b])
    assert smap.total == 4000
    assert smap.pieces(900, 200) == [(a, 900, 100, 900), (b, 0, 100, 1000)]


def test_options_validation() -> None:
    with pytest.raises(trioconv.UsageError, match="coroutines"):
        trioconv.ConvertOptions(parallel=0)
    with pytest.raises(trioconv.UsageError, match="sparse"):
        trioconv.ConvertOptions(sparse_size=1000)
    with pytest.raises(trioconv.UsageError, match="-n"):
        trioconv.ConvertOptions(target_is_zero=True)
    with pytest.raises(trioconv.UsageError, match="copy offloading"):
        trioconv.ConvertOptions(copy_range=True, salvage=True)
    assert trioconv.ConvertOptions(rate_limit="10M").rate_limit == 10 * MiB
    assert trioconv.ConvertOptions().target_cache is trioconv.CacheMode.UNSAFE


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("parallel", 8.5, "coroutines"),
        ("parallel", None, "coroutines"),
        ("sparse_size", 4096.0, "sparse"),
        ("rate_limit", 1.5, "rate limit"),
        ("buffer_size", None, "buffer size"),
        ("target_options", {"lazy_refcounts": True}, "-o option 'lazy_refcounts'"),
        ("connections", "4", "connections"),
        ("target_cache", 1, "cache"),
    ],
)
def test_options_of_the_wrong_type_are_usage_errors(
    field: str, value: object, message: str
) -> None:
    """A program that passes a value of the wrong type (untyped code) gets the same
    UsageError as for a bad value, not a TypeError from deep inside."""
    with pytest.raises(trioconv.UsageError, match=message):
        trioconv.ConvertOptions(**{field: value})  # type: ignore[arg-type]


# -- the engine ----------------------------------------------------------------------------


@pytest.mark.parametrize("oob", [False, True])
@pytest.mark.parametrize("parallel", [1, 3, 8])
async def test_copy_is_exact(oob: bool, parallel: int) -> None:
    data = mixed_image()
    src = MemoryDriver(data=data, writable=False)
    dst = MemoryDriver(len(data), zero_init=False)
    dst.data[:] = b"\xee" * len(data)  # not zero: zero runs must be written
    opts = trioconv.ConvertOptions(parallel=parallel, oob_writes=oob)
    result = await trioconv.convert([src], dst, opts)
    assert bytes(dst.data) == data
    assert result.total == len(data)
    assert result.written + result.zeroed + result.skipped == len(data)


async def test_in_order_writes_start_in_order_and_overlap() -> None:
    data = os.urandom(32 * MiB)
    rng = random.Random(7)
    src = MemoryDriver(data=data, delay=lambda r: rng.uniform(0, 0.01))
    dst = MemoryDriver(len(data), delay=lambda r: rng.uniform(0.005, 0.02))
    await trioconv.convert([src], dst, trioconv.ConvertOptions(parallel=8))
    offsets = [r.offset for r in writes(dst)]
    assert offsets == sorted(offsets)
    assert dst.max_writes_in_flight > 1, "in-order mode must still overlap writes"
    assert bytes(dst.data) == data


async def test_oob_writes_may_start_out_of_order() -> None:
    data = os.urandom(32 * MiB)
    # The first extent is slow to read, so later ones overtake it.
    src = MemoryDriver(data=data, delay=lambda r: 0.2 if r.offset == 0 else 0.001)
    dst = MemoryDriver(len(data))
    await trioconv.convert([src], dst, trioconv.ConvertOptions(parallel=8, oob_writes=True))
    offsets = [r.offset for r in writes(dst)]
    assert offsets != sorted(offsets)
    assert offsets[-1] == 0
    assert bytes(dst.data) == data


async def test_zero_runs_skipped_on_zero_target_and_written_otherwise() -> None:
    data = bytearray(8 * MiB)
    data[3 * MiB : 4 * MiB] = os.urandom(MiB)
    src = MemoryDriver(data=bytes(data))
    dst = MemoryDriver(len(data))
    opts = trioconv.ConvertOptions(no_create=True, target_is_zero=True)
    result = await trioconv.convert([src], dst, opts)
    assert [(r.offset, r.length) for r in writes(dst)] == [(3 * MiB, MiB)]
    assert result.skipped == 7 * MiB
    dst2 = MemoryDriver(len(data))
    dst2.data[:] = b"\x01" * len(data)
    result = await trioconv.convert([src], dst2)
    assert bytes(dst2.data) == bytes(data)
    assert result.zeroed == 7 * MiB
    assert {r.op for r in writes(dst2)} == {"write", "zero"}


async def test_existing_target_is_zeroed_up_front_when_that_is_cheap() -> None:
    data = bytearray(8 * MiB)
    data[2 * MiB : 3 * MiB] = os.urandom(MiB)
    dst = MemoryDriver(len(data))
    dst.data[:] = b"\x05" * len(data)
    result = await trioconv.convert([MemoryDriver(data=bytes(data))], dst)
    assert bytes(dst.data) == bytes(data)
    ops = [(r.op, r.offset, r.length) for r in writes(dst)]
    assert ops[0] == ("zero", 0, 8 * MiB)  # one request instead of one per zero run
    assert [op for op, _, _ in ops[1:]] == ["write"]
    assert result.zeroed == 7 * MiB


async def test_zero_fallback_when_target_cannot_write_zeroes() -> None:
    data = bytes(4 * MiB)
    dst = MemoryDriver(len(data), zeroes=False)
    dst.data[:] = b"\x02" * len(data)
    await trioconv.convert([MemoryDriver(data=data)], dst)
    assert bytes(dst.data) == data
    assert {r.op for r in writes(dst)} == {"write"}


async def test_sparse_zero_disables_detection() -> None:
    data = bytes(4 * MiB)
    dst = MemoryDriver(len(data))
    result = await trioconv.convert(
        [MemoryDriver(data=data)], dst, trioconv.ConvertOptions(sparse_size=0)
    )
    assert result.written == len(data)
    assert all(r.op == "write" for r in writes(dst))


async def test_memory_stays_bounded_by_parallel() -> None:
    """However big the image, at most -m buffers are read and not yet written."""
    size = 64 * MiB
    src = MemoryDriver(data=os.urandom(size), delay=0.001)
    dst = MemoryDriver(size, delay=0.003)
    in_flight = 0
    peak = 0
    real_read, real_write = src.preadinto, dst.pwrite

    async def counting_read(offset: int, buf: memoryview) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await real_read(offset, buf)

    async def counting_write(offset: int, data: trioconv.driver.Buffer) -> None:
        nonlocal in_flight
        await real_write(offset, data)
        in_flight -= 1

    src.preadinto = counting_read  # type: ignore[method-assign]
    dst.pwrite = counting_write  # type: ignore[method-assign]
    await trioconv.convert([src], dst, trioconv.ConvertOptions(parallel=4))
    assert peak <= 4
    assert bytes(dst.data) == bytes(src.data)


async def test_failure_cancels_everything_and_raises_one_error() -> None:
    size = 32 * MiB
    src = MemoryDriver(data=os.urandom(size), delay=0.002)
    dst = MemoryDriver(size, delay=0.002)
    dst.fail_write_at = 10 * MiB
    with pytest.raises(trioconv.ConvertError, match="at byte") as info:
        await trioconv.convert([src], dst, trioconv.ConvertOptions(parallel=8, oob_writes=True))
    assert isinstance(info.value.__cause__, BaseExceptionGroup)
    # No task outlives convert(): nothing touches the drivers afterwards.
    n_src, n_dst = len(src.log), len(dst.log)
    await trio.sleep(0.1)
    assert (len(src.log), len(dst.log)) == (n_src, n_dst)
    # It stopped early rather than copying everything first.
    assert sum(r.length for r in dst.log if r.op == "write") < size


async def test_read_failure_without_and_with_salvage() -> None:
    data = os.urandom(4 * MiB)
    src = MemoryDriver(data=data)
    src.fail_read_at = MiB + 100
    with pytest.raises(trioconv.ConvertError, match="reading"):
        await trioconv.convert([src], MemoryDriver(len(data)))

    # With salvage, only the failing 512-byte unit... is zero: the driver fails any
    # request covering the bad byte, so exactly one unit is lost.
    dst = MemoryDriver(len(data))
    result = await trioconv.convert([src], dst, trioconv.ConvertOptions(salvage=True))
    assert result.salvaged == ((MiB, 512),)
    expected = bytearray(data)
    expected[MiB : MiB + 512] = bytes(512)
    assert bytes(dst.data) == bytes(expected)


async def test_caller_cancellation_stops_promptly() -> None:
    size = 64 * MiB
    src = MemoryDriver(data=bytes([1]) * size, delay=0.01)
    dst = MemoryDriver(size, delay=0.01, zeroes=False)
    progress = trioconv.Progress()
    with trio.move_on_after(0.1) as scope:
        await trioconv.convert([src], dst, progress=progress)
    assert scope.cancelled_caught
    assert progress.finished
    assert 0 < progress.done < size
    n = len(dst.log)
    await trio.sleep(0.1)
    assert len(dst.log) == n


async def test_cancellation_comes_out_as_one_cancelled(tmp_path: Path) -> None:
    """``except trio.Cancelled`` around the call sees the cancellation, at whatever
    moment it comes: not a group of the copy tasks' cancellations."""
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x01" * 16 * MiB)
    options = trioconv.ConvertOptions(rate_limit="128M")  # about 0.12 s of copying
    seen: list[str] = []
    for i in range(12):
        with trio.move_on_after(i * 0.01):
            try:
                await trioconv.convert([src], tmp_path / f"dst{i}.raw", options)
                seen.append("finished")
            except trio.Cancelled:
                seen.append("Cancelled")
                raise
            except BaseExceptionGroup:
                seen.append("group")
                raise
    assert "group" not in seen and "Cancelled" in seen, seen


def test_keyboard_interrupt_comes_out_as_itself(tmp_path: Path) -> None:
    """A Ctrl-C that Trio delivers mid-copy reaches the program as KeyboardInterrupt,
    and the target this call created is gone."""
    import signal
    import threading

    src = tmp_path / "src.raw"
    src.write_bytes(b"\x01" * 8 * MiB)
    out = tmp_path / "out.raw"

    async def main() -> None:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        await trioconv.convert([src], out, trioconv.ConvertOptions(rate_limit="4M"))

    with pytest.raises(KeyboardInterrupt):
        trio.run(main)
    assert not out.exists()


async def test_progress_is_observable() -> None:
    size = 16 * MiB
    src = MemoryDriver(data=os.urandom(size), delay=0.001)
    dst = MemoryDriver(size)
    progress = trioconv.Progress()
    seen: list[int] = []

    async def watch() -> None:
        while not progress.finished:
            await progress.wait_changed()
            seen.append(progress.done)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trioconv.convert([src], dst, progress=progress)
    assert seen == sorted(seen)
    assert seen[-1] == size and len(seen) > 2
    assert progress.percent == 100.0


async def test_progress_counts_data_as_qemu_img_does(
    tmp_path: Path, make_image: ImageMaker
) -> None:
    """The percentage is of the data, as qemu-img's ``-p`` is: a 64 MiB image holding
    8 MiB is at 50 % when 4 MiB of it are copied, not at 6 % with a jump over the holes
    at the end. The amount of data is what ``qemu-img map`` calls data."""
    src = make_image("sparse.raw", "64M", "write -P 0x5a 0 4M", "write -P 0x5a 40M 4M")
    data = sum(e["length"] for e in qemu_map(src) if e["data"])
    assert data == 8 * MiB
    progress = trioconv.Progress()
    seen: list[tuple[int | None, int, int, float]] = []

    async def watch() -> None:
        while not progress.finished:
            await progress.wait_changed()
            seen.append((progress.data_total, progress.data_done, progress.done, progress.percent))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trioconv.convert(
            src, tmp_path / "out.raw", trioconv.ConvertOptions(parallel=1), progress=progress
        )
    assert progress.data_total == progress.data_done == data
    assert progress.percent == 100.0
    percents = [p for *_, p in seen]
    assert percents == sorted(percents)
    for total, data_done, _, percent in seen:
        if total:
            assert percent == pytest.approx(100.0 * data_done / total)
    # A quarter of the data copied is a quarter of the way, though only a 16th of the
    # whole size is done.
    assert any(p >= 25.0 and done <= 4 * MiB for _, _, done, p in seen), seen


@pytest.mark.parametrize(
    "options",
    [
        {"target_format": "qcow2", "compress": True},  # jobs rounded to whole clusters
        {"target_format": "qcow2", "parallel": 3},
        {},
    ],
)
async def test_progress_data_ends_where_it_was_measured(
    tmp_path: Path, make_image: ImageMaker, options: dict[str, Any]
) -> None:
    """What is counted as done adds up to what was measured, whatever rounds the jobs
    (-c copies whole clusters): the percentage never runs ahead of the copy."""
    src = make_image("src.raw", "16M", "write -P 1 100k 3k", "write -P 2 5M 1M", "write 9M 1k")
    progress = trioconv.Progress()
    seen: list[float] = []

    async def watch() -> None:
        while not progress.finished:
            await progress.wait_changed()
            seen.append(progress.percent)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trioconv.convert(
            src, tmp_path / "out.img", trioconv.ConvertOptions(**options), progress=progress
        )
    assert progress.data_total is not None and progress.data_total > 0
    assert progress.data_done == progress.data_total
    assert seen == sorted(seen) and seen[-1] == 100.0


async def test_a_progress_nobody_watches_is_not_measured(
    tmp_path: Path, make_image: ImageMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a Progress of the caller's, the sources' block status is not walked a
    second time: nobody would see the percentage."""
    from trioconv.convert import pipeline

    src = make_image("src.raw", "8M", "write -P 1 0 1M")
    walks: list[int] = []
    original = pipeline._Engine.measure

    async def measure(self: Any, scope: trio.CancelScope) -> None:
        walks.append(1)
        await original(self, scope)

    monkeypatch.setattr(pipeline._Engine, "measure", measure)
    await trioconv.convert(src, tmp_path / "a.raw")
    assert walks == []
    await trioconv.convert(src, tmp_path / "b.raw", progress=trioconv.Progress())
    assert walks == [1]


async def test_progress_counts_everything_with_s_0(tmp_path: Path, make_image: ImageMaker) -> None:
    """With ``-S 0`` every byte is read and written, so all of it is data, known at once."""
    src = make_image("sparse.raw", "8M")
    progress = trioconv.Progress()
    opts = trioconv.ConvertOptions(sparse_size=0)
    await trioconv.convert(src, tmp_path / "out.raw", opts, progress=progress)
    assert progress.data_total == progress.data_done == 8 * MiB


async def test_a_progress_follows_one_conversion() -> None:
    """A Progress used once is refused the next time: its counters (and so the next
    result's) would run on from the first conversion's."""
    progress = trioconv.Progress()
    await trioconv.convert([MemoryDriver(data=b"\x01" * MiB)], MemoryDriver(MiB), progress=progress)
    target = MemoryDriver(MiB)
    with pytest.raises(trioconv.UsageError, match="used already"):
        await trioconv.convert([MemoryDriver(data=b"\x02" * MiB)], target, progress=progress)
    assert await target.pread(0, 1) == b"\x00"


async def test_several_sources_concatenate() -> None:
    parts = [os.urandom(n) for n in (MiB + 512, 3000 * 512, 2 * MiB)]
    dst = MemoryDriver(sum(map(len, parts)))
    await trioconv.convert([MemoryDriver(data=p) for p in parts], dst)
    assert bytes(dst.data) == b"".join(parts)


async def test_smaller_target_is_refused() -> None:
    with pytest.raises(trioconv.ImageError, match="smaller"):
        await trioconv.convert([MemoryDriver(2 * MiB)], MemoryDriver(MiB))


async def test_rate_limit_spreads_writes(autojump_clock: trio.testing.MockClock) -> None:
    size = 8 * MiB
    src = MemoryDriver(data=os.urandom(size))
    dst = MemoryDriver(size)
    start = trio.current_time()
    await trioconv.convert([src], dst, trioconv.ConvertOptions(rate_limit="2M"))
    # 8 MiB at 2 MiB/s: the last 2 MiB write may start after 3 s.
    assert trio.current_time() - start >= 3.0
    assert bytes(dst.data) == bytes(src.data)


@pytest.mark.parametrize("oob", [False, True])
async def test_compressed_writes(oob: bool) -> None:
    cluster = 64 * 1024
    data = bytearray(mixed_image(8 * MiB, seed=3))
    data[cluster * 5 : cluster * 6] = bytes(cluster)  # a whole zero cluster inside data
    src = MemoryDriver(data=bytes(data))
    dst = MemoryDriver(len(data), cluster_size=cluster, delay=lambda r: random.uniform(0, 0.003))
    opts = trioconv.ConvertOptions(
        compress=True, oob_writes=oob, no_create=True, target_is_zero=True
    )
    await trioconv.convert([src], dst, opts)
    assert bytes(dst.data) == bytes(data)
    written = [r for r in dst.log if r.op == "compressed"]
    assert all(r.offset % cluster == 0 for r in written)
    assert not any(r.offset <= cluster * 5 < r.offset + r.length for r in written)
    if not oob:
        offsets = [r.offset for r in written]
        assert offsets == sorted(offsets)


async def test_compression_refused_for_a_target_without_it() -> None:
    with pytest.raises(trioconv.UnsupportedError, match="Compression not supported"):
        await trioconv.convert(
            [MemoryDriver(MiB)], MemoryDriver(MiB), trioconv.ConvertOptions(compress=True)
        )


async def test_a_conversion_that_never_started_is_not_done(tmp_path: Path) -> None:
    progress = trioconv.Progress()
    with pytest.raises(trioconv.ImageError):
        await trioconv.convert([tmp_path / "missing.img"], tmp_path / "x.img", progress=progress)
    assert progress.finished and progress.percent == 0.0


def test_options_hash_and_refuse_a_bool_count() -> None:
    a = trioconv.ConvertOptions(target_options={"preallocation": "falloc"})
    b = trioconv.ConvertOptions(target_options={"preallocation": "falloc"})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(trioconv.UsageError, match="coroutines"):
        trioconv.ConvertOptions(parallel=True)


async def test_create_image_refuses_a_negative_size(tmp_path: Path) -> None:
    for fmt in ("raw", "qcow2"):
        with pytest.raises(trioconv.UsageError, match="Invalid image size"):
            await trioconv.create_image(tmp_path / f"x.{fmt}", fmt, -(1 << 20))
        assert not (tmp_path / f"x.{fmt}").exists()


async def test_an_older_nbd_name_is_named_as_typed_by_the_api(tmp_path: Path) -> None:
    """``trioconv.convert`` opens ``nbd:unix:PATH:exportname=X`` as the URI it stands
    for, and its error names it as the caller wrote it."""
    name = f"nbd:unix:{tmp_path / 'none.sock'}:exportname=x"
    with pytest.raises(trioconv.ImageError) as caught:
        await trioconv.convert(name, tmp_path / "out.raw")
    assert str(caught.value).startswith(f"Could not open '{name}': Failed to connect")
    assert not (tmp_path / "out.raw").exists()
