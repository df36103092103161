"""The null protocols (``null-co://``, ``null-aio://``) against qemu-img's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

import trioconv

from ._faults import one_line_error
from .conftest import assert_identical, create_filled, qemu_map, run, trioconv_cli


def test_convert_into_null_reads_the_whole_source(tmp_path: Path, qemu_img: str) -> None:
    """``-n ... null-co://``: the source is read, nothing is written, exit 0 - as
    qemu-img does it, and with the progress line scripts parse."""
    src = create_filled(tmp_path / "s.qcow2", "qcow2", "8M", "write -P 7 0 3M", "write -c 4M 1M")
    for target in ("null-co://", "null-aio://"):
        ours = trioconv_cli("convert", "-p", "-n", "-O", "raw", src, target)
        theirs = run(qemu_img, "convert", "-p", "-n", "-O", "raw", src, target, check=False)
        assert (ours.returncode, theirs.returncode) == (0, 0), ours.stderr
        assert ours.stdout.endswith("    (100.00/100%)\n")  # (text mode: \r read as \n)
    # The target named by block options, with a size and a delay per request.
    opts = "driver=null-co,size=8M,latency-ns=100000"
    ours = trioconv_cli("convert", "-n", "-W", src, "--target-image-opts", opts)
    assert ours.returncode == 0, ours.stderr


def test_null_source_converts_to_zeroes(tmp_path: Path, qemu_img: str) -> None:
    zero = tmp_path / "zero.raw"
    run(qemu_img, "create", "-q", "-f", "raw", zero, "4M")
    for opts in ("driver=null-co,size=4M,read-zeroes=on", "driver=null-aio,size=4M"):
        out = tmp_path / "out.qcow2"
        result = trioconv_cli("convert", "-O", "qcow2", "--image-opts", opts, out)
        assert result.returncode == 0, result.stderr
        assert_identical(zero, out, "raw", "qcow2")
        assert all(not m["data"] for m in qemu_map(out, "qcow2"))  # nothing allocated
        out.unlink()


@pytest.mark.parametrize(
    "args",
    [
        ["null-co://"],
        ["--image-opts", "driver=null-aio,size=1M,read-zeroes=on"],
        ["--image-opts", "driver=null-co,latency-ns=5"],
        ["--image-opts", "driver=raw,file.driver=null-co,file.size=1000"],
        ['json:{"driver": "null-co", "size": 1000}'],
    ],
)
@pytest.mark.parametrize("output", ["json", "human"])
def test_info_is_qemu_imgs(qemu_img: str, args: list[str], output: str) -> None:
    """Same text: the name (``null-co://``, or a ``json:`` name keeping the values as
    given), the driver as format, the size in whole sectors, no disk usage."""
    ours = trioconv_cli("info", "--output", output, *args)
    theirs = run(qemu_img, "info", "--output", output, *args)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout
    if output == "json":
        assert json.loads(ours.stdout)["actual-size"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["convert", "-O", "raw", "SRC", "null-co://"],
            "Protocol driver 'null-co' does not support image creation",
        ),
        (["info", "null-co://x"], "The only allowed filename for this driver is 'null-co://'"),
        (["info", "--image-opts", "driver=null-co,latency-ns=-1"], "latency-ns is invalid"),
        (
            ["info", "--image-opts", "driver=null-co,filename=null-co://"],
            "Block protocol 'null-co' doesn't support the option 'filename'",
        ),
        (
            ["convert", "-n", "SRC", "--target-image-opts", "driver=null-co,size=1M"],
            "output file is smaller than input file",
        ),
        # A name in options is a file name, not a protocol, as in QEMU.
        (
            ["info", 'json:{"file": {"filename": "null-co://"}}'],
            "Could not open 'null-co://': No such file or directory",
        ),
    ],
)
def test_refusals_as_qemu_img(tmp_path: Path, qemu_img: str, args: list[str], message: str) -> None:
    src = create_filled(tmp_path / "s.raw", "raw", "4M", "write -P 1 0 4M")
    args = [str(src) if a == "SRC" else a for a in args]
    theirs = run(qemu_img, *args, check=False)
    assert theirs.returncode == 1 and message in theirs.stderr
    assert message in one_line_error(trioconv_cli(*args))


async def test_library_open_null() -> None:
    async with trioconv.open_image("null-co://", writable=True) as image:
        assert image.size == 1 << 30
        await image.pwrite(4096, b"x" * 512)  # dropped
        assert await image.pread(4096, 512) == bytes(512)
        ext = await image.block_status(0, 1 << 20)
        assert ext.kind is trioconv.ExtentKind.ZERO
    with pytest.raises(trioconv.UnsupportedError, match="does not support image creation"):
        await trioconv.create_image("null-aio://", "raw", 1 << 20)


async def test_latency_delays_every_request() -> None:
    spec = 'json:{"driver": "null-co", "size": 65536, "latency-ns": 20000000}'
    async with trioconv.open_image(spec) as image:
        start = trio.current_time()
        await image.pread(0, 512)
        assert trio.current_time() - start >= 0.02
