"""The conversion: :func:`convert`, its options and its result.

This front is light on purpose - the command line imports it before it can handle
Ctrl-C - and the work lives in :mod:`trioconv.convert._run`, imported on the first call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from ..driver import Driver
from .options import ConvertOptions

if TYPE_CHECKING:
    from .progress import Progress as Progress

__all__ = ["ConvertOptions", "ConvertResult", "Progress", "convert"]

ImageSpec = str | os.PathLike[str] | Driver


@attrs.frozen
class ConvertResult:
    """What a finished conversion did.

    Attributes:
        total: bytes covered (the sum of the source sizes).
        written: data bytes written.
        zeroed: bytes made zero on the target by write-zeroes or zero buffers.
        skipped: zero bytes left alone because the target already read as zero.
        elapsed: seconds from the first request to the last, by Trio's clock.
        salvaged: ``(offset, length)`` source ranges that could not be read and were
            written as zeroes (``salvage=True`` only).
    """

    total: int
    written: int
    zeroed: int
    skipped: int
    elapsed: float
    salvaged: tuple[tuple[int, int], ...] = ()


async def convert(
    sources: Sequence[ImageSpec] | ImageSpec,
    target: ImageSpec,
    options: ConvertOptions | None = None,
    *,
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert one image, or several concatenated, into ``target``.

    Runs inside the caller's Trio program: every task it starts lives in its own nursery
    and has ended when it returns or raises, and the caller's cancel scopes cancel it.

    Args:
        sources: one or more paths (or open :class:`~trioconv.Driver` objects, which
            stay open and owned by the caller), copied one after another.
        target: a path to create (or, with ``no_create``, to overwrite in place), or an
            open driver, which is written in place as with ``no_create``.
        options: :class:`ConvertOptions`; qemu-img's defaults when None.
        progress: a :class:`Progress` to update while copying.

    Returns:
        A :class:`ConvertResult`.

    Raises:
        UsageError: invalid options, an argument of the wrong type, a ``progress``
            already given to another conversion, or a call from outside a Trio task.
        ImageError: a source or the target cannot be opened or created.
        UnsupportedError: the formats or transports cannot do what was asked.
        ConvertError: copying failed; ``__cause__`` holds the exception group. A target
            file that this call created is removed.
    """
    from ._run import run_convert

    return await run_convert(sources, target, options, progress=progress)


def __getattr__(name: str) -> object:
    if name == "Progress":  # (it needs Trio, which the front does not import)
        from .progress import Progress

        return Progress
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
