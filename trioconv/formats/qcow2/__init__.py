"""qcow2 (QEMU copy-on-write v2/v3)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..._errors import ImageError
from ...driver import Driver

if TYPE_CHECKING:
    from ..._open import OpenContext

__all__ = ["open_qcow2"]


async def open_qcow2(transport: Driver, ctx: OpenContext) -> Driver:
    """Open a qcow2 image for reading (not available yet)."""
    raise ImageError(f"Could not open '{ctx.location}': image format 'qcow2' is not supported yet")
