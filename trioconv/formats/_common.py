"""Small helpers every format driver needs: zero-filling, and where a referenced file is.

Images name other files - a backing file, a data file, an extent - relative to their own
folder. :func:`resolve_name` makes such a name usable, and :func:`same_place` tells when
two names reach the same file (so a backing chain that loops can be refused).
"""

from __future__ import annotations

import os
import posixpath
import re
import urllib.parse
from typing import TYPE_CHECKING

from .._errors import ImageError, ImageInUse, TrioconvError, TrioconvIOError

if TYPE_CHECKING:
    from .._open import OpenContext
    from ..driver import Driver

__all__ = [
    "ZEROS",
    "beside",
    "check_range",
    "fill_zero",
    "full_backing_name",
    "local_path",
    "read_or_zero",
    "resolve_name",
    "same_place",
]

#: A shared, read-only megabyte of zeroes.
ZEROS = bytes(1024 * 1024)
_URI_RE = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def check_range(location: str, size: int, what: str, offset: int, length: int) -> None:
    """Refuse a request (``what``: "read", "block status", ...) that is not inside an
    image of ``size`` bytes.

    Raises:
        TrioconvIOError: it starts before the image or ends past it.
    """
    if offset < 0 or length < 0 or offset + length > size:
        raise TrioconvIOError(
            f"{location}: {what} of {length} bytes at {offset} is outside the image ({size} bytes)",
            offset=offset,
        )


def fill_zero(view: memoryview) -> None:
    """Clear ``view`` (C-level copies from :data:`ZEROS`, no per-byte loop)."""
    pos = 0
    while pos < view.nbytes:
        n = min(len(ZEROS), view.nbytes - pos)
        view[pos : pos + n] = ZEROS[:n]
        pos += n


async def read_or_zero(source: Driver, offset: int, view: memoryview) -> None:
    """Read ``view`` at ``offset`` of ``source``; bytes past its end read as zeroes (a
    backing image smaller than its overlay, a data cluster past a truncated file)."""
    n = max(0, min(view.nbytes, source.size - offset))
    if n:
        await source.preadinto(offset, view[:n])
    if n < view.nbytes:
        fill_zero(view[n:])


def local_path(location: str) -> str | None:
    """The local path of a location, or None for a network URI."""
    if location.startswith("file:"):
        return location[5:]
    if _URI_RE.match(location) and not os.path.exists(location):
        return None
    return location


def resolve_name(ctx: OpenContext, name: str, what: str) -> str:
    """A file name stored in the image, made relative to the image's folder.

    Raises:
        ImageError: a relative name inside an image reached over the network.
    """
    if os.path.isabs(name) or _URI_RE.match(name):
        return name
    here = local_path(ctx.location)
    if here is not None:
        return os.path.join(os.path.dirname(here), name)
    joined = _join_url(ctx.location, name)
    if joined is None:
        raise ImageError(
            f"Could not open '{ctx.location}': cannot resolve the relative {what} name "
            f"'{name}' of an image that is not in a folder (NBD export, iSCSI LUN)"
        )
    return joined


def _join_url(location: str, name: str) -> str | None:
    """``name`` next to the file an ``nfs://`` or ``http(s)://`` URL names, as QEMU
    resolves it there; None for other locations. An NFS URL's query (``uid``, ``gid``,
    ...) are connection options and go along; an HTTP query belongs to that one file."""
    parts = urllib.parse.urlsplit(location)
    scheme = parts.scheme.lower()
    if scheme not in ("nfs", "http", "https"):
        return None
    path = posixpath.normpath(posixpath.join(posixpath.dirname(parts.path) or "/", name))
    query = parts.query if scheme == "nfs" else ""
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query, ""))


def backing_error(where: str, exc: TrioconvError) -> ImageError:
    """``WHERE: Could not open backing file: ...`` for a backing image that would not
    open - still an :class:`~trioconv._errors.ImageInUse` when it is one, so that
    ``info`` can look at a raw backing file that is in use, as qemu-img does."""
    kind = ImageInUse if isinstance(exc, ImageInUse) else ImageError
    return kind(f"{where}: Could not open backing file: {exc}")


def same_place(a: str, b: str) -> bool:
    """Whether two locations name the same file (paths compared after resolving links)."""
    local_a, local_b = local_path(a), local_path(b)
    if local_a is None or local_b is None or "\0" in local_a + local_b:
        return a == b
    return os.path.realpath(local_a) == os.path.realpath(local_b)


def full_backing_name(name: str, backing: Driver | None, location: str) -> str | None:
    """qemu-img info's ``full-backing-filename``: where the backing image was found (or,
    not opened, would be: next to the image at ``location``), or a ``json:`` name as
    stored (QEMU shows block options as they are). None when a relative name has no
    folder to be found in (an image in an NBD export or a LUN): QEMU then says it
    "cannot determine actual path"."""
    if name.startswith("json:"):
        return name
    if backing is not None:
        return backing.location
    if os.path.isabs(name) or _URI_RE.match(name) or local_path(location) is not None:
        return beside(location, name)
    return _join_url(location, name)  # on an NFS or web server, or in no folder: None


def beside(location: str, name: str) -> str:
    """A file name stored in the image at ``location`` (a backing file, a parent), made
    relative to that image's folder when it is a relative name; anything else
    (an absolute path, a URI, an image not in a folder) as it is. Next to an image on
    an NFS or web server, a relative name is on the same server, as QEMU resolves it."""
    here = local_path(location)
    if os.path.isabs(name) or _URI_RE.match(name):
        return name
    if here is None:
        return _join_url(location, name) or name
    return here[: here.rfind("/") + 1] + name  # (as QEMU joins them: "a//b" stays)
