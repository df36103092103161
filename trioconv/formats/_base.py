"""What a format module gives the registry: a :class:`FormatInfo`.

A format lives in ``trioconv/formats/<name>.py`` (or a package of that name) and exports
``FORMAT = FormatInfo(...)``. The registry in ``trioconv._open`` imports the module the
first time a format is looked up, so a format is added by adding its module.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import attrs

from ..driver import Driver

if TYPE_CHECKING:
    from .._open import OpenContext

__all__ = ["CreateCheck", "FormatCreator", "FormatInfo", "FormatOpener", "Probe", "SideFiles"]

#: Scores the first bytes of an image (and its name): higher is surer, 0 is no.
Probe = Callable[[bytes, str], int]
#: Wraps an open transport in a format driver; may read headers and tables.
FormatOpener = Callable[[Driver, "OpenContext"], Awaitable[Driver]]
#: Writes a new, empty image of the given virtual size onto an empty, writable transport,
#: with the ``-o`` options (keys already checked against ``create_options``).
FormatCreator = Callable[[Driver, int, Mapping[str, str]], Awaitable[None]]
#: Checks the ``-o`` options and the virtual size of a new image before any file is
#: touched, so that a bad value never truncates an existing target: raises the error
#: ``create`` would raise, with qemu-img's message. Given the new image's location for
#: checks that look at other files (a vmdk delta's parent).
CreateCheck = Callable[[str, int, Mapping[str, str]], Awaitable[None]]
#: The other files that creating an image at a local path makes, given its virtual size
#: and its (checked) ``-o`` options: vmdk extent files, a qcow2 external data file.
#: Those that did not exist before are removed with the image when a conversion fails.
SideFiles = Callable[[str, int, Mapping[str, str]], list[str]]


@attrs.frozen
class FormatInfo:
    """A registered image format.

    Attributes:
        name: the name ``-f``/``-O`` use.
        probe: scores a header.
        open: wraps a transport driver; None when the format is recognised but not
            readable yet (it is then refused by name, never read as raw).
        create: writes a new image; None when trioconv cannot create the format.
        create_options: the ``-o`` options accepted when creating, with help text.
        can_compress: ``-c`` is allowed for this format.
        probe_tail: bytes to read from the *end* of the image for probing (VHD keeps its
            footer there); they are appended to the header given to ``probe``.
        check_create: validates a new image's options before anything is created.
        side_files: names the other files a new image at a local path comes with.
    """

    name: str
    probe: Probe
    open: FormatOpener | None = None
    create: FormatCreator | None = None
    create_options: Mapping[str, str] | None = None
    can_compress: bool = False
    probe_tail: int = 0
    check_create: CreateCheck | None = None
    side_files: SideFiles | None = None
