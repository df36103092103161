"""LUKS images (a LUKS1 header, then the encrypted disk): ``info`` only.

A standalone LUKS image is what ``qemu-img create -f luks`` makes and what
``cryptsetup luksFormat`` makes of a block device: the header (see
:mod:`trioconv.formats._luks`), the key slots, then the *payload* - the guest's disk,
every sector encrypted - to the end of the file. The guest's disk is therefore the
file's size (in whole sectors, as qemu measures it) less the payload offset.

Reading the payload needs the master key, unlocked from a key slot by a passphrase,
which trioconv does not take. So this driver opens an image only to describe it, as
``qemu-img info`` does without a secret (``encrypted: yes`` and the header's fields);
a conversion is refused when it opens the image, before any target is made, and any
read of guest data is refused too.

LUKS2 images (version 2) are recognised by their magic and refused by name, never read
as raw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._errors import ImageError, TrioconvIOError, UnsupportedError
from ..driver import Driver
from . import _luks
from ._base import FormatInfo

if TYPE_CHECKING:
    from .._open import OpenContext

__all__ = ["FORMAT", "LuksDriver", "open_luks", "probe_luks"]


def _refusal(location: str) -> str:
    return (
        f"LUKS images are not supported: '{location}' is encrypted, and trioconv has no "
        "key to read it (only 'info' shows it)"
    )


class LuksDriver(Driver):
    """A LUKS image opened to be described. Made by :func:`open_luks`."""

    name = "luks"

    def __init__(self, child: Driver, header: _luks.LuksHeader, location: str) -> None:
        self.child = child
        self.header = header
        self.location = location

    @property
    def size(self) -> int:
        """The payload: from the payload offset to the file's end, in whole sectors
        (a file cut inside its last sector counts that sector, as qemu counts it)."""
        file_sectors = -(-self.child.size // _luks.SECTOR)
        return file_sectors * _luks.SECTOR - self.header.payload_offset

    def describe(self) -> dict[str, object]:
        """qemu-img info's luks keys: ``encrypted`` and the header's fields."""
        return {
            "format-specific": {"type": "luks", "data": _luks.describe(self.header)},
            "encrypted": True,
        }

    async def preadinto(self, offset: int, buf: memoryview) -> None:
        raise UnsupportedError(_refusal(self.location))

    async def aclose(self) -> None:
        pass


async def open_luks(transport: Driver, ctx: OpenContext) -> LuksDriver:
    """Read and check the LUKS header.

    Opened alone (``info``), the image is described; opened to be read (a conversion,
    a backing file), it is refused at once.

    Raises:
        ImageError: not a LUKS1 header qemu would accept, or the payload lies past the
            end of the file.
        UnsupportedError: LUKS2; or the image is opened to be read.
    """
    where = f"Could not open '{ctx.location}'"
    file_size = transport.size
    try:
        raw = await transport.pread(0, min(file_size, _luks.HEADER_SIZE))
        header = _luks.decode_header(raw)
    except _luks.LuksFormatError as exc:
        raise ImageError(f"{where}: {exc}") from None
    except UnsupportedError as exc:
        raise UnsupportedError(f"{where}: {exc}") from None
    except TrioconvIOError as exc:
        raise ImageError(f"{where}: {exc}") from None
    if header.payload_offset > -(-file_size // _luks.SECTOR) * _luks.SECTOR:
        raise ImageError(
            f"{where}: the LUKS payload starts at {header.payload_offset}, past the end of "
            f"the file ({file_size} bytes)"
        )
    if not ctx.alone or transport.caps.writable:
        raise UnsupportedError(_refusal(ctx.location))
    return LuksDriver(transport, header, ctx.location)


def probe_luks(header: bytes, filename: str) -> int:
    """The ``LUKS\\xba\\xbe`` magic at offset 0, whatever the version (LUKS2 is then
    refused by name rather than shown as raw)."""
    return 100 if header[: len(_luks.MAGIC)] == _luks.MAGIC else 0


FORMAT = FormatInfo("luks", probe_luks, open_luks)
