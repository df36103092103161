"""VHDX (Hyper-V virtual hard disk, version 1): read dynamic and fixed images, write new ones.

:func:`open_vhdx` is what the format registry calls; :func:`create_vhdx` writes a new,
empty image laid out as ``qemu-img create -f vhdx`` lays it out. The on-disk structures
are encoded and decoded by the sans-I/O functions in :mod:`._codec`; the driver in
:mod:`._driver` does the reads and writes.
"""

from __future__ import annotations

from .._base import FormatInfo
from ._driver import VHDX_CREATE_OPTIONS, VhdxDriver, check_vhdx_create, create_vhdx, open_vhdx

__all__ = ["FORMAT", "VhdxDriver", "create_vhdx", "open_vhdx", "probe_vhdx"]


def probe_vhdx(header: bytes, filename: str) -> int:
    """The ``vhdxfile`` signature at offset 0."""
    return 100 if header[:8] == b"vhdxfile" else 0


FORMAT = FormatInfo(
    "vhdx",
    probe_vhdx,
    open_vhdx,
    create=create_vhdx,
    create_options=VHDX_CREATE_OPTIONS,
    check_create=check_vhdx_create,
)
