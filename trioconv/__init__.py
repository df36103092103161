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

import importlib
from typing import TYPE_CHECKING

from ._cache import CacheMode as CacheMode
from ._errors import ConvertError as ConvertError
from ._errors import ImageError as ImageError
from ._errors import TrioconvError as TrioconvError
from ._errors import TrioconvIOError as TrioconvIOError
from ._errors import UnsupportedError as UnsupportedError
from ._errors import UsageError as UsageError
from ._errors import ZeroesNotSupported as ZeroesNotSupported
from ._sizes import parse_size as parse_size
from .convert import ConvertOptions as ConvertOptions
from .convert import ConvertResult as ConvertResult
from .convert import convert as convert
from .driver import Caps as Caps
from .driver import Driver as Driver
from .driver import Extent as Extent
from .driver import ExtentKind as ExtentKind
from .driver import Limits as Limits

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ._open import create_image as create_image
    from ._open import open_image as open_image
    from .convert.progress import Progress as Progress
    from .protocols.memory import MemoryDriver as MemoryDriver

#: Names imported on first use: they need Trio, which ``import trioconv`` itself does
#: not load (the command line must be able to handle Ctrl-C first). The in-memory
#: driver is for tests and programs; the command line never imports it.
_LAZY = {
    "create_image": "._open",
    "open_image": "._open",
    "Progress": ".convert.progress",
    "MemoryDriver": ".protocols.memory",
}

__all__ = [
    "Caps",
    "CacheMode",
    "ConvertError",
    "ConvertOptions",
    "ConvertResult",
    "Driver",
    "Extent",
    "ExtentKind",
    "ImageError",
    "Limits",
    "MemoryDriver",
    "Progress",
    "TrioconvError",
    "TrioconvIOError",
    "UnsupportedError",
    "UsageError",
    "ZeroesNotSupported",
    "convert",
    "create_image",
    "open_image",
    "parse_size",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trioconv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
