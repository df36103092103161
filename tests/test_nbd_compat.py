"""NBD servers that offer less: no structured replies, no meta contexts, no zeroes."""

from __future__ import annotations

from pathlib import Path

import pytest

import trioconv

from .conftest import ImageMaker, assert_identical, run, trioconv_cli
from .nbd_servers import NbdkitLauncher

MIXED = ("write -P 0xab 0 1M", "write -P 0 2M 1M", "write -P 0x11 5M 1536", "write -z 6M 1M")


@pytest.mark.parametrize(
    ("options", "filters"),
    [
        pytest.param(["--no-sr"], [], id="simple-replies"),
        pytest.param([], ["noextents"], id="all-data-status"),
        pytest.param(["--no-sr"], ["nozero"], id="no-zeroes"),
    ],
)
def test_round_trip_with_a_limited_server(
    nbdkit_server: NbdkitLauncher,
    make_image: ImageMaker,
    tmp_path: Path,
    options: list[str],
    filters: list[str],
) -> None:
    src = make_image("src.img", "8M", *MIXED)
    server = nbdkit_server("memory", ["size=8M"], options=options, filters=filters)
    result = trioconv_cli("convert", "-n", "-m", "8", src, server.uri)
    assert result.returncode == 0, result.stderr
    compare = run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, server.uri, check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    back = tmp_path / "back.img"
    result = trioconv_cli("convert", "-W", server.uri, back)
    assert result.returncode == 0, result.stderr
    assert_identical(src, back)


async def test_simple_replies_report_no_block_status(nbdkit_server: NbdkitLauncher) -> None:
    server = nbdkit_server("memory", ["size=4M"], options=["--no-sr"])
    async with trioconv.open_image(server.uri, "raw") as image:
        assert not image.caps.block_status
        extent = await image.block_status(0, image.size)
        assert extent.kind is trioconv.ExtentKind.DATA
        assert extent.length == image.size
