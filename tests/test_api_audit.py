"""``import trioconv`` as a Trio program uses it: cancellation, interrupts, concurrency,
progress, errors, option objects, anyio, and the examples in docs/api.rst.

Images are made by ``qemu-img``/``qemu-io`` and every copy is checked with ``qemu-img
compare`` (and ``qemu-img check`` for qcow2), so these tests say what a user would see.
"""

from __future__ import annotations

import copy
import doctest
import itertools
import os
import pickle
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
import trio.lowlevel

import trioconv
from trioconv.protocols.memory import MemoryDriver

from .conftest import assert_identical, create_filled, require_tool, run, trioconv_cli

MiB = 1024 * 1024
API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.rst"


def qcow2_source(path: Path, size: str = "8M") -> Path:
    """A qcow2 image holding data, a zero cluster range and holes (made by qemu-io)."""
    return create_filled(
        path,
        "qcow2",
        size,
        "write -P 0x5a 0 1M",
        "write -z 2M 1M",
        "write -P 0xc3 5M 512k",
        "write -P 0x11 7M 1M",
    )


def random_raw(path: Path, size: int) -> Path:
    """A raw image full of random data: every byte must be copied."""
    path.write_bytes(os.urandom(size))
    return path


def assert_check_clean(path: Path) -> None:
    result = run("qemu-img", "check", "-f", "qcow2", path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found" in result.stdout


def all_tasks() -> set[trio.lowlevel.Task]:
    """Every task of this Trio run, found from the root task down."""
    found: set[trio.lowlevel.Task] = set()
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is not None:
            found.add(task)
            todo += [child for nursery in task.child_nurseries for child in nursery.child_tasks]
    return found


SLOW = trioconv.ConvertOptions(rate_limit="1M")  # 1 MiB/s of writes: seconds per image


# -- cancellation, interrupts, concurrency ------------------------------------------------


async def test_cancelled_from_outside_is_cancelled_promptly_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    """A cancel scope around the call stops it within a moment; the caller sees one
    ``trio.Cancelled`` (not a group), no task of the conversion survives, and the target
    it created is gone. The same call left alone makes an identical copy."""
    require_tool("qemu-img")
    source = random_raw(tmp_path / "src.raw", 8 * MiB)
    target = tmp_path / "out.qcow2"
    options = trioconv.ConvertOptions(target_format="qcow2", rate_limit="1M")
    seen: list[BaseException] = []
    tasks_before = all_tasks()
    started = time.monotonic()
    with trio.move_on_after(0.3) as scope:
        try:
            await trioconv.convert(source, target, options)
        except BaseException as exc:
            seen.append(exc)
            raise
    elapsed = time.monotonic() - started
    assert scope.cancelled_caught
    assert [type(e) for e in seen] == [trio.Cancelled]
    assert elapsed < 1.5, f"took {elapsed:.2f} s to stop"
    assert not target.exists()
    # Nothing of the conversion is still running or touching files.
    assert all_tasks() == tasks_before
    await trio.sleep(0.05)
    assert not target.exists()

    await trioconv.convert(source, target, trioconv.ConvertOptions(target_format="qcow2"))
    assert_identical(source, target, "raw", "qcow2")
    assert_check_clean(target)


async def test_cancelled_by_a_sibling_task_in_the_callers_nursery(tmp_path: Path) -> None:
    """Cancelling the caller's nursery (a sibling task failing, say) stops the
    conversion running in it; what the caller's ``except`` sees is the sibling's error."""
    require_tool("qemu-img")
    source = qcow2_source(tmp_path / "src.qcow2")
    target = tmp_path / "out.raw"

    async def sibling() -> None:
        await trio.sleep(0.2)
        raise ValueError("the program's own failure")

    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="own failure")):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sibling)
            await trioconv.convert(source, target, SLOW)
    assert not target.exists()


def test_keyboard_interrupt_comes_out_as_itself(tmp_path: Path) -> None:
    """Ctrl-C while converting: the program gets ``KeyboardInterrupt`` itself, and the
    half-written target is removed. (In its own process: a real SIGINT.)"""
    require_tool("qemu-img")
    source = qcow2_source(tmp_path / "src.qcow2")
    program = textwrap.dedent(
        """
        import os, signal, sys, threading
        import trio, trioconv

        async def main() -> None:
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
            try:
                await trioconv.convert(sys.argv[1], sys.argv[2],
                                       trioconv.ConvertOptions(rate_limit="1M"))
            except BaseException as exc:
                print("inside:", type(exc).__name__)
                raise

        try:
            trio.run(main)
        except BaseException as exc:
            print("outside:", type(exc).__name__)
        """
    )
    target = tmp_path / "out.raw"
    result = subprocess.run(
        [sys.executable, "-c", program, str(source), str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.stdout.splitlines() == ["inside: KeyboardInterrupt", "outside: KeyboardInterrupt"]
    assert result.stderr == ""
    assert not target.exists()


async def test_two_conversions_at_once_in_one_nursery(tmp_path: Path) -> None:
    """Two conversions in sibling tasks each make their own exact copy."""
    require_tool("qemu-img")
    first = qcow2_source(tmp_path / "a.qcow2")
    second = random_raw(tmp_path / "b.raw", 3 * MiB)
    results: dict[str, trioconv.ConvertResult] = {}

    async def one(source: Path, target: Path, fmt: str) -> None:
        opts = trioconv.ConvertOptions(target_format=fmt, parallel=4)
        results[target.name] = await trioconv.convert(source, target, opts)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, first, tmp_path / "a.raw", "raw")
        nursery.start_soon(one, second, tmp_path / "b.qcow2", "qcow2")
    assert_identical(first, tmp_path / "a.raw", "qcow2", "raw")
    assert_identical(second, tmp_path / "b.qcow2", "raw", "qcow2")
    assert_check_clean(tmp_path / "b.qcow2")
    assert results["a.raw"].total == 8 * MiB
    assert results["b.qcow2"].written == 3 * MiB


# -- progress --------------------------------------------------------------------------------


async def test_progress_only_grows_and_ends_at_100_percent(tmp_path: Path) -> None:
    require_tool("qemu-img")
    source = qcow2_source(tmp_path / "src.qcow2", "16M")
    target = tmp_path / "out.qcow2"
    progress = trioconv.Progress()
    seen: list[tuple[float, int, int, int, int]] = []

    async def watch() -> None:
        while not progress.finished:
            await progress.wait_changed()
            p = progress
            seen.append((p.percent, p.done, p.written, p.zeroed, p.skipped))

    options = trioconv.ConvertOptions(target_format="qcow2", parallel=2, buffer_size="256k")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        result = await trioconv.convert(source, target, options, progress=progress)
    assert len(seen) > 3
    for before, after in itertools.pairwise(seen):
        assert all(a <= b for a, b in zip(before, after, strict=True)), (before, after)
    assert seen[-1][0] == progress.percent == 100.0
    # The data qemu-io wrote: 1 MiB + 512 KiB + 1 MiB (the zeroed MiB is no data).
    assert progress.data_total == progress.data_done == 2 * MiB + 512 * 1024
    assert (result.written, result.zeroed, result.skipped) == seen[-1][2:]
    assert result.written + result.zeroed + result.skipped == result.total == 16 * MiB
    assert_identical(source, target, "qcow2", "qcow2")
    assert_check_clean(target)


async def test_a_failing_watcher_stops_the_conversion_and_its_target(tmp_path: Path) -> None:
    """An exception in the caller's watcher task cancels the conversion beside it: the
    caller gets the watcher's error alone and the new target is removed."""
    source = random_raw(tmp_path / "src.raw", 8 * MiB)
    target = tmp_path / "out.raw"
    progress = trioconv.Progress()

    async def watch() -> None:
        while not progress.finished:
            await progress.wait_changed()
            if progress.written:
                raise ValueError("the watcher's own bug")

    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="watcher")):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trioconv.convert(source, target, SLOW, progress=progress)
    assert progress.finished
    assert not target.exists()


def test_progress_counters_are_not_arguments() -> None:
    """A Progress starts at zero: counters given to the constructor would run into the
    :class:`ConvertResult` of the conversion it follows."""
    with pytest.raises(TypeError):
        trioconv.Progress(written=5)  # type: ignore[call-arg]
    fresh = trioconv.Progress()
    assert (fresh.total, fresh.done, fresh.percent, fresh.finished) == (0, 0, 0.0, False)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "kind", "cause"),
    [
        ("missing source", trioconv.ImageError, FileNotFoundError),
        ("target in a missing folder", trioconv.ImageError, FileNotFoundError),
        ("wrong source format", trioconv.ImageError, None),
        ("unknown target format", trioconv.UsageError, None),
        ("compress to raw", trioconv.UnsupportedError, None),
        ("target too small", trioconv.ImageError, None),
    ],
)
async def test_an_error_is_the_documented_class_with_the_cli_line(
    tmp_path: Path, case: str, kind: type[trioconv.TrioconvError], cause: type[BaseException] | None
) -> None:
    """What ``trioconv convert`` prints after ``trioconv:`` is ``str()`` of what the API
    raises, and an operating-system error is kept as its cause."""
    require_tool("qemu-img")
    source = qcow2_source(tmp_path / "src.qcow2")
    small = create_filled(tmp_path / "small.raw", "raw", "1M")
    target = tmp_path / "out.img"
    cases: dict[str, tuple[list[str], Any, Any, trioconv.ConvertOptions]] = {
        "missing source": (
            [str(tmp_path / "nope.img"), str(target)],
            tmp_path / "nope.img",
            target,
            trioconv.ConvertOptions(),
        ),
        "target in a missing folder": (
            [str(source), str(tmp_path / "no" / "out.img")],
            source,
            tmp_path / "no" / "out.img",
            trioconv.ConvertOptions(),
        ),
        "wrong source format": (
            ["-f", "vmdk", str(source), str(target)],
            source,
            target,
            trioconv.ConvertOptions(source_format="vmdk"),
        ),
        "unknown target format": (
            ["-O", "qcow3", str(source), str(target)],
            source,
            target,
            trioconv.ConvertOptions(target_format="qcow3"),
        ),
        "compress to raw": (
            ["-c", str(source), str(target)],
            source,
            target,
            trioconv.ConvertOptions(compress=True),
        ),
        "target too small": (
            ["-n", str(source), str(small)],
            source,
            small,
            trioconv.ConvertOptions(no_create=True),
        ),
    }
    argv, src, dst, options = cases[case]
    cli = trioconv_cli("convert", *argv)
    assert cli.returncode == 1
    assert cli.stderr.count("\n") == 1 and cli.stderr.startswith("trioconv: ")
    with pytest.raises(kind) as caught:
        await trioconv.convert(src, dst, options)
    assert str(caught.value) == cli.stderr.removeprefix("trioconv: ").rstrip("\n")
    if cause is None:
        assert caught.value.__cause__ is None
    else:
        assert isinstance(caught.value.__cause__, cause)
    assert not target.exists()


async def test_a_failure_while_copying_is_a_convert_error_with_the_group(tmp_path: Path) -> None:
    source = MemoryDriver(data=os.urandom(8 * MiB))
    source.fail_read_at = 5 * MiB
    target = tmp_path / "out.qcow2"
    with pytest.raises(trioconv.ConvertError, match=r"^error while reading memory at byte") as e:
        await trioconv.convert(source, target, trioconv.ConvertOptions(target_format="qcow2"))
    group = e.value.__cause__
    assert isinstance(group, BaseExceptionGroup)
    assert group.subgroup(trioconv.TrioconvIOError) is not None
    assert not target.exists()
    assert not source.closed  # the caller's driver stays open


# -- options ------------------------------------------------------------------------------------


def test_options_compare_hash_copy_and_pickle() -> None:
    """Options are values: equal when their fields are, usable as dict keys, and they
    survive ``copy.deepcopy`` and ``pickle`` (a program hands them to another process)."""
    a = trioconv.ConvertOptions(target_format="qcow2", target_options={"cluster_size": "64k"})
    b = trioconv.ConvertOptions(target_format="qcow2", target_options={"cluster_size": "64k"})
    c = trioconv.ConvertOptions(target_format="qcow2", target_options={"cluster_size": "1M"})
    assert a == b and hash(a) == hash(b) and a != c
    assert len({a, b, c}) == 2
    for twin in (copy.copy(a), copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        assert twin == a and hash(twin) == hash(a)
        assert twin.target_options == {"cluster_size": "64k"}
    assert "target_options={'cluster_size': '64k'}" in repr(a)
    given = {"preallocation": "falloc"}
    kept = trioconv.ConvertOptions(target_options=given)
    given["preallocation"] = "full"  # the caller's dict is copied, not shared
    assert kept.target_options == {"preallocation": "falloc"}
    with pytest.raises(TypeError):
        kept.target_options["preallocation"] = "full"  # type: ignore[index]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("target_options", "cluster_size=64k", "Invalid -o options"),
        ("target_options", [("cluster_size", "64k")], "Invalid -o options"),
        ("no_create", "yes", "no_create"),
        ("compress", 1, "compress"),
        ("source_format", 5, "source_format"),
        ("target_format", b"qcow2", "target_format"),
        ("backing_file", 5, "backing_file"),
        ("snapshot", 1, "snapshot"),
    ],
)
def test_options_of_the_wrong_type_are_refused_when_made(
    field: str, value: object, message: str
) -> None:
    """An untyped program's wrong value fails when the options are made, with a
    :class:`UsageError` naming the field, not later deep inside a conversion."""
    with pytest.raises(trioconv.UsageError, match=re.escape(message)):
        trioconv.ConvertOptions(**{field: value})  # type: ignore[arg-type]


async def test_a_backing_file_may_be_given_as_a_path(tmp_path: Path) -> None:
    require_tool("qemu-img")
    base = create_filled(tmp_path / "base.qcow2", "qcow2", "4M", "write -P 7 0 4M")
    top = create_filled(
        tmp_path / "top.qcow2",
        "qcow2",
        "4M",
        "write -P 9 1M 64k",
        backing="base.qcow2",
        backing_fmt="qcow2",
    )
    options = trioconv.ConvertOptions(
        target_format="qcow2", backing_file=Path("base.qcow2"), backing_format="qcow2"
    )
    assert options.backing_file == "base.qcow2"
    target = tmp_path / "copy.qcow2"
    await trioconv.convert(top, target, options)
    info = run("qemu-img", "info", "--output=json", target).stdout
    assert '"backing-filename": "base.qcow2"' in info
    assert_identical(top, target, "qcow2", "qcow2")
    assert_check_clean(target)
    assert base.exists()


# -- anyio, asyncio ---------------------------------------------------------------------------


def test_works_under_anyio_with_the_trio_backend(tmp_path: Path) -> None:
    require_tool("qemu-img")
    source = qcow2_source(tmp_path / "src.qcow2")

    async def main() -> bool:
        with anyio.move_on_after(0.3) as scope:
            await trioconv.convert(source, tmp_path / "slow.raw", SLOW)
        progress = trioconv.Progress()
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                while not progress.finished:
                    await progress.wait_changed()

            tg.start_soon(watch)
            await trioconv.convert(source, tmp_path / "out.raw", progress=progress)
        return scope.cancelled_caught and progress.percent == 100.0

    assert anyio.run(main, backend="trio")
    assert not (tmp_path / "slow.raw").exists()
    assert_identical(source, tmp_path / "out.raw", "qcow2", "raw")


def test_outside_trio_the_drivers_and_progress_refuse_in_one_line() -> None:
    """Under asyncio (anyio's default backend) trioconv says it needs Trio, instead of
    Trio's "must be called from async context" or asyncio's "Task got bad yield"."""
    memory = MemoryDriver(data=b"x" * 4096)

    async def read() -> bytes:
        return await memory.pread(0, 512)

    async def wait() -> None:
        await trioconv.Progress().wait_changed()

    async def status() -> trioconv.Extent:
        return await memory.block_status(0, 4096)

    for call in (read, wait, status):
        with pytest.raises(trioconv.UsageError, match=r"needs Trio.*backend='trio'"):
            anyio.run(call, backend="asyncio")


def test_outside_trio_the_entry_points_refuse_in_one_line(tmp_path: Path) -> None:
    """convert, open_image and create_image say they need Trio, and touch nothing."""
    source = tmp_path / "src.raw"
    source.write_bytes(os.urandom(64 * 1024))
    target = tmp_path / "out.raw"

    async def convert() -> object:
        return await trioconv.convert(source, target)

    async def open_image() -> object:
        async with trioconv.open_image(source) as image:
            return image.size

    async def create_image() -> object:
        return await trioconv.create_image(target, "raw", 65536)

    for call, name in (
        (convert, "convert"),
        (open_image, "open_image"),
        (create_image, "create_image"),
    ):
        with pytest.raises(trioconv.UsageError, match=rf"trioconv\.{name} needs Trio"):
            anyio.run(call, backend="asyncio")
    assert not target.exists()


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((b"src.raw", "out.raw"), {}, r"Invalid sources b'src.raw'"),
        ((None, "out.raw"), {}, r"Invalid sources None"),
        ((["src.raw", 5], "out.raw"), {}, r"Invalid source 5"),
        (("src.raw", b"out.raw"), {}, r"Invalid target b'out.raw'"),
        (("src.raw", "out.raw", {"parallel": 4}), {}, r"Invalid options \{'parallel': 4\}"),
        (("src.raw", "out.raw"), {"progress": 5}, r"Invalid progress 5"),
    ],
)
async def test_arguments_of_the_wrong_type_are_refused_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    message: str,
) -> None:
    """From untyped code, a wrong argument is a UsageError naming it, before anything
    is opened or made (not an AttributeError from deep inside)."""
    monkeypatch.chdir(tmp_path)
    Path("src.raw").write_bytes(bytes(4096))
    with pytest.raises(trioconv.UsageError, match=message):
        await trioconv.convert(*args, **kwargs)
    assert not Path("out.raw").exists()


async def test_one_progress_is_taken_by_one_of_two_conversions_started_together(
    tmp_path: Path,
) -> None:
    """Two conversions given the same Progress at the same moment: one takes it, the
    other is refused at once, and the Progress tells only the first one's story."""
    sources = []
    for name, size in (("a.raw", 4 << 20), ("b.raw", 1 << 20)):
        path = tmp_path / name
        path.write_bytes(os.urandom(size))
        sources.append(path)
    progress = trioconv.Progress()
    outcomes: dict[str, object] = {}

    async def one(source: Path) -> None:
        try:
            outcomes[source.name] = await trioconv.convert(
                source, tmp_path / f"{source.stem}.out", progress=progress
            )
        except trioconv.UsageError as exc:
            outcomes[source.name] = exc

    async with trio.open_nursery() as nursery:
        for source in sources:
            nursery.start_soon(one, source)
    done = [v for v in outcomes.values() if isinstance(v, trioconv.ConvertResult)]
    refused = [v for v in outcomes.values() if isinstance(v, trioconv.UsageError)]
    assert len(done) == 1 and len(refused) == 1
    assert "used already" in str(refused[0])
    assert progress.finished
    assert progress.total == progress.written == done[0].total == done[0].written


async def test_a_failure_zeroing_the_target_up_front_is_a_convert_error() -> None:
    """Before copying, a target that can zero fast is zeroed whole; when that fails the
    caller gets a ConvertError (cause: the I/O error), as for any failed copy."""

    class FailingZeroes(MemoryDriver):
        async def pwrite_zeroes(
            self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
        ) -> None:
            raise trioconv.TrioconvIOError(
                f"error while writing {self.location} at byte {offset}: Input/output error",
                offset=offset,
            )

    source = MemoryDriver(data=os.urandom(1 << 20))
    target = FailingZeroes(size=1 << 20)
    with pytest.raises(trioconv.ConvertError, match="Input/output error") as caught:
        await trioconv.convert(source, target)
    assert isinstance(caught.value.__cause__, trioconv.TrioconvIOError)


# -- the in-memory driver ---------------------------------------------------------------------


async def test_memory_block_status_outside_the_image_is_an_io_error() -> None:
    """Only trioconv errors leave a driver: asking past the end (or anything of an
    empty image) is a TrioconvIOError, not an IndexError."""
    for driver, offset in ((MemoryDriver(MiB), MiB), (MemoryDriver(0), 0)):
        with pytest.raises(trioconv.TrioconvIOError, match="outside the image"):
            await driver.block_status(offset, 4096)
    last = await MemoryDriver(MiB).block_status(MiB - 1, 4096)
    assert (last.offset, last.length) == (MiB - 1, 1)


async def test_memory_compressed_writes_keep_the_drivers_rules() -> None:
    """``pwrite_compressed`` is a write: refused read-only or closed, failed by
    ``fail_write_at``, and counted in ``max_writes_in_flight``."""
    cluster = 64 * 1024
    data = memoryview(os.urandom(cluster))
    driver = MemoryDriver(MiB, cluster_size=cluster)
    prepared = await driver.compress(0, data)
    await driver.pwrite_compressed(0, prepared)
    assert bytes(driver.data[:cluster]) == data
    assert driver.max_writes_in_flight == 1
    driver.fail_write_at = cluster + 5
    with pytest.raises(trioconv.TrioconvIOError, match="at byte 65536"):
        await driver.pwrite_compressed(cluster, prepared)
    assert driver.data[cluster:] == bytes(MiB - cluster)
    read_only = MemoryDriver(MiB, cluster_size=cluster, writable=False)
    with pytest.raises(trioconv.UnsupportedError, match="read-only"):
        await read_only.pwrite_compressed(0, prepared)
    await driver.aclose()
    with pytest.raises(trioconv.TrioconvIOError, match="closed"):
        await driver.pwrite_compressed(0, prepared)


# -- the examples in docs/api.rst -------------------------------------------------------------


def _literal_blocks(text: str) -> list[str]:
    """The ``::`` literal blocks of a reST text, dedented."""
    blocks: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.rstrip().endswith("::") or line.lstrip().startswith(".."):
            continue
        indent = len(line) - len(line.lstrip())
        body: list[str] = []
        for nxt in lines[i + 1 :]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            body.append(nxt)
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
    return blocks


def test_api_doc_examples_run(tmp_path: Path) -> None:
    """Every code example in docs/api.rst runs as written, in a folder holding the
    images it names; the doctest of ConvertOptions' message passes."""
    require_tool("qemu-img")
    blocks = _literal_blocks(API_DOC.read_text())
    doctests = [b for b in blocks if b.startswith(">>>")]
    programs = [b for b in blocks if not b.startswith(">>>") and "trioconv." in b]
    assert len(doctests) == 1 and len(programs) == 5, blocks

    parser = doctest.DocTestParser()
    for block in doctests:
        test = parser.get_doctest(block, {"trioconv": trioconv}, "api.rst", str(API_DOC), 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        runner.run(test)
        assert runner.summarize(verbose=False).failed == 0

    image_bytes = os.urandom(2 * MiB)
    for name in ("a.img", "b.img"):
        random_raw(tmp_path / name, MiB)
    qcow2_source(tmp_path / "disk.img")
    script = ["import trio, trioconv", "async def main(image_bytes: bytes) -> None:"]
    for i, block in enumerate(programs):
        script.append(f"    print('-- example {i}')")
        script.append(textwrap.indent(block, "    "))
        # Each example starts afresh: the next one makes the same files again.
        script.append("    import os")
        script.append("    for f in ('copy.img', 'out.img'):")
        script.append("        os.path.exists(f) and os.unlink(f)")
    script.append(f"trio.run(main, {image_bytes!r})")
    program = tmp_path / "examples.py"
    program.write_text("\n".join(script) + "\n")
    result = subprocess.run(
        [sys.executable, str(program)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("-- example") == len(programs)
    assert "100.0%" in result.stdout
    # The in-memory example wrote disk.img from bytes over the qcow2 image it found.
    assert (tmp_path / "disk.img").read_bytes() == image_bytes


async def test_a_failed_conversion_removes_only_the_file_it_made(tmp_path: Path) -> None:
    """The target a failed conversion created is removed - but only if its name still
    leads to the file it made: a file someone else put at that name meanwhile stays."""
    target = tmp_path / "out.raw"

    class Failing(MemoryDriver):
        async def preadinto(self, offset: int, buf: memoryview) -> None:
            if offset >= 4 << 20:
                target.unlink()  # another program takes the name for a file of its own
                target.write_bytes(b"not ours")
                raise trioconv.TrioconvIOError("disk on fire", offset=offset)
            await super().preadinto(offset, buf)

    source = Failing(data=os.urandom(8 << 20))
    with pytest.raises(trioconv.ConvertError):
        await trioconv.convert(source, target, trioconv.ConvertOptions(parallel=1))
    assert target.read_bytes() == b"not ours"
    # And when the name still leads to the file it made, that file goes.
    plain = tmp_path / "plain.raw"

    class FailingLater(MemoryDriver):
        async def preadinto(self, offset: int, buf: memoryview) -> None:
            if offset >= 4 << 20:
                raise trioconv.TrioconvIOError("disk on fire", offset=offset)
            await super().preadinto(offset, buf)

    with pytest.raises(trioconv.ConvertError):
        await trioconv.convert(FailingLater(data=os.urandom(8 << 20)), plain)
    assert not plain.exists()
