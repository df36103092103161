"""qcow2 (QEMU copy-on-write, versions 2 and 3): reading, writing and creating.

:func:`open_qcow2` is what the format registry calls: it reads the header and the active
L1 table, opens the backing image and the external data file if there are any, and
returns a :class:`~._driver.Qcow2Driver` - or, when the transport is writable, a
:class:`~._writer.Qcow2Writer`, which allocates clusters and writes the metadata back.
:func:`~._writer.create_qcow2` makes new images as ``qemu-img create -f qcow2`` does.
The on-disk structures are decoded and encoded by the sans-I/O functions in
:mod:`._codec`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...driver import Driver
from .._base import FormatInfo
from ._driver import Qcow2Driver
from ._driver import open_qcow2 as _open
from ._options import QCOW2_CREATE_OPTIONS
from ._writer import (
    Qcow2Writer,
    check_qcow2_create,
    create_qcow2,
    open_qcow2_writable,
    qcow2_side_files,
)

if TYPE_CHECKING:
    from ..._open import OpenContext

__all__ = ["FORMAT", "Qcow2Driver", "Qcow2Writer", "create_qcow2", "open_qcow2", "probe_qcow2"]


async def open_qcow2(transport: Driver, ctx: OpenContext) -> Driver:
    """Open a qcow2 image on top of ``transport``: for writing when it is writable.

    Raises:
        ImageError: the image is not valid qcow2, uses a feature this reader does not
            support, or its backing chain cannot be opened.
        UnsupportedError: writing into an image with internal snapshots and an external
            data file, or into a snapshot.
    """
    if transport.caps.writable:
        return await open_qcow2_writable(transport, ctx)
    return await _open(transport, ctx)


def probe_qcow2(header: bytes, filename: str) -> int:
    """qcow2 magic ``QFI\\xfb`` with a version from 2 on (later ones are refused by name)."""
    if header[:4] != b"QFI\xfb" or len(header) < 8:
        return 0
    return 100 if int.from_bytes(header[4:8], "big") >= 2 else 0


FORMAT = FormatInfo(
    "qcow2",
    probe_qcow2,
    open_qcow2,
    create=create_qcow2,
    create_options=QCOW2_CREATE_OPTIONS,
    can_compress=True,
    check_create=check_qcow2_create,
    side_files=qcow2_side_files,
)
