"""trioconv: convert virtual-disk images between formats and storage back ends, fast.

A Trio library and a command-line tool that does what ``qemu-img convert`` does, with
many copy requests in flight::

    import trio, trioconv

    async def main() -> None:
        result = await trioconv.convert(["disk.img"], "copy.img",
                                        trioconv.ConvertOptions(parallel=8))
        print(result.written, "bytes written")

    trio.run(main)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._cache import CacheMode as CacheMode
from ._errors import ConvertError as ConvertError
from ._errors import ImageError as ImageError
from ._errors import TrioconvError as TrioconvError
from ._errors import TrioconvIOError as TrioconvIOError
from ._errors import UnsupportedError as UnsupportedError
from ._errors import UsageError as UsageError
from ._errors import ZeroesNotSupported as ZeroesNotSupported
from ._open import create_image as create_image
from ._open import open_image as open_image
from ._sizes import parse_size as parse_size
from .convert import ConvertOptions as ConvertOptions
from .convert import ConvertResult as ConvertResult
from .convert import Progress as Progress
from .convert import convert as convert
from .driver import Caps as Caps
from .driver import Driver as Driver
from .driver import Extent as Extent
from .driver import ExtentKind as ExtentKind
from .driver import Limits as Limits

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .protocols.memory import MemoryDriver as MemoryDriver


def __getattr__(name: str) -> object:
    # The in-memory driver is for tests and programs; the CLI does not import it.
    if name == "MemoryDriver":
        from .protocols.memory import MemoryDriver

        return MemoryDriver
    raise AttributeError(f"module 'trioconv' has no attribute {name!r}")
