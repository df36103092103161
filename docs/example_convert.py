"""Convert a sparse raw image with trioconv while another task watches the progress.

Run it from anywhere once trioconv is installed::

    python docs/example_convert.py

It works in a temporary directory that it removes again:

1. makes ``source.img``, a 16 MiB sparse raw image with a few runs of data, using
   nothing but Python's own file I/O;
2. starts a conversion that is slowed down with a rate limit and cancels it with
   :func:`trio.move_on_after`, to show that the half-written target is removed;
3. converts ``source.img`` to ``copy.img`` with :func:`trioconv.convert` while a second
   task prints :class:`trioconv.Progress` each time it changes;
4. prints the :class:`trioconv.ConvertResult` and checks the copy byte for byte.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import trio

import trioconv

MiB = 1024 * 1024
IMAGE_SIZE = 16 * MiB


def make_source(path: Path) -> None:
    """Write a sparse image: holes everywhere except a few runs of data."""
    rng = random.Random(2024)
    log_lines = b"".join(b"%06d INFO request served in %d ms\n" % (i, i % 97) for i in range(2000))
    with path.open("wb") as f:
        f.truncate(IMAGE_SIZE)  # 16 MiB of holes
        f.seek(0)
        f.write(rng.randbytes(1 * MiB))  # a "boot sector and file system header"
        f.seek(5 * MiB)
        f.write(log_lines[: 64 * 1024])  # 64 KiB of text
        f.seek(9 * MiB)
        f.write(bytes(2 * MiB))  # allocated, but all zeroes: not copied as data
        f.seek(IMAGE_SIZE - 1 * MiB)
        f.write(rng.randbytes(1 * MiB))  # data right up to the end


def same_content(a: Path, b: Path) -> bool:
    """Compare two files byte for byte, one MiB at a time."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            block = fa.read(MiB)
            if block != fb.read(MiB):
                return False
            if not block:
                return True


async def watch(progress: trioconv.Progress) -> None:
    """Print the counters every time they change, until the conversion ends."""
    while not progress.finished:
        await progress.wait_changed()
        print(
            f"progress: {progress.percent:6.2f}%  "
            f"written={progress.written} zeroed={progress.zeroed} skipped={progress.skipped}"
        )


async def cancelled_conversion(source: Path, target: Path) -> None:
    """Cancel a conversion from outside: the target it created does not survive."""
    slow = trioconv.ConvertOptions(rate_limit="1M")  # at most 1 MiB of writes per second
    progress = trioconv.Progress()
    with trio.move_on_after(0.3) as scope:
        await trioconv.convert(source, target, slow, progress=progress)
    print(
        f"cancelled: {scope.cancelled_caught} after writing {progress.written} bytes; "
        f"target left behind: {target.exists()}"
    )
    if target.exists():
        raise SystemExit("a cancelled conversion left its target behind")


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="trioconv-example-") as tmp:
        source, target = Path(tmp, "source.img"), Path(tmp, "copy.img")
        make_source(source)

        await cancelled_conversion(source, target)

        options = trioconv.ConvertOptions(parallel=8, oob_writes=False, sparse_size="4k")
        progress = trioconv.Progress()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, progress)
            result = await trioconv.convert(source, target, options, progress=progress)
        print(result)

        if result.written + result.zeroed + result.skipped != result.total:
            raise SystemExit("the counters do not add up to the image size")
        if not same_content(source, target):
            raise SystemExit("the copy differs from the source")
        allocated = target.stat().st_blocks * 512
        print(f"allocated in the copy: {allocated // 1024} KiB of {IMAGE_SIZE // 1024} KiB")
        print("verified: copy.img is identical to source.img")


if __name__ == "__main__":
    trio.run(main)
