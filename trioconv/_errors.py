"""The error hierarchy.

Every failure that leaves trioconv is a :class:`TrioconvError`. Its ``str()`` is one line
meant for a person (the CLI prints it after ``trioconv: ``); subclasses say whose fault it
was, so programs can react without parsing messages:

* :class:`UsageError` - the caller asked for something invalid (bad option, bad combination).
* :class:`ImageError` - an image could not be opened, probed or created.
* :class:`UnsupportedError` - a valid request that this format or transport cannot do.
* :class:`TrioconvIOError` - reading, writing or flushing failed part-way.
* :class:`ConvertError` - raised by :func:`trioconv.convert` when the pipeline failed; the
  original exception group is kept as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "ConvertError",
    "ImageError",
    "TrioconvError",
    "TrioconvIOError",
    "UnsupportedError",
    "UsageError",
    "ZeroesNotSupported",
]


class TrioconvError(Exception):
    """Base of every error trioconv raises on purpose."""


class UsageError(TrioconvError):
    """Invalid options or an invalid combination of them."""


class ImageError(TrioconvError):
    """An image could not be opened, probed or created."""


class ImageInUse(ImageError):
    """Another process holds the image in a way this open cannot share (QEMU's image
    locks): a running VM's disk, an image another conversion writes."""


class BackingChainTooLong(ImageError):
    """A backing chain longer than trioconv opens. Said once, for the whole chain: the
    images above do not each wrap it in their own "Could not open backing file"."""


class UnsupportedError(TrioconvError):
    """The request is valid but this format or transport cannot do it."""


class ZeroesNotSupported(UnsupportedError):
    """A driver cannot write zeroes efficiently; the caller writes zero buffers instead.

    This is part of the driver contract, not a user-facing failure: the copy engine
    catches it and falls back.
    """


class TrioconvIOError(TrioconvError):
    """An I/O request failed.

    Attributes:
        offset: byte offset of the failed request, when known.
        errno: the operating-system error number, when there is one.
    """

    def __init__(self, message: str, *, offset: int | None = None, errno: int | None = None):
        super().__init__(message)
        self.offset = offset
        self.errno = errno


class ConvertError(TrioconvError):
    """A conversion failed. ``__cause__`` holds what the pipeline raised."""
