"""Compressing qcow2 clusters (``-c``): deflate or zstd, one stream per cluster.

qemu reads a zlib cluster as raw deflate with a 4 KiB window (``inflateInit2(-12)``), so
every stream written here is raw deflate limited to that window (``wbits=-12``); a
stream that refers further back could not be read by qemu.

Two deflate encoders write such streams:

* **ISA-L** (the ``isal`` package, a dependency; level :data:`ISAL_LEVEL`) - the
  default when it can be imported. On mixed disk data it deflates about 10x faster
  than zlib and its streams are about 1% larger. They are standard raw deflate that
  any inflate reads, qemu's included, but not the bytes qemu writes.
* **zlib** from the standard library with qemu's settings (``Z_DEFAULT_COMPRESSION``,
  ``wbits=-12``, ``memLevel=9``) - used when ``isal`` is not importable, or when the
  environment variable :data:`DEFLATE_ENV` is ``zlib``. Its streams are the ones
  ``qemu-img convert -c`` writes, byte for byte, when both use the same zlib build.

zstd clusters use qemu's level (3) and frame format (content size included), so they
match qemu's byte for byte; each worker thread keeps its compressor.

Both libraries release the GIL while they compress, so the worker threads that
:meth:`~trioconv.formats.qcow2.Qcow2Writer.compress` uses run on all cores.
"""

from __future__ import annotations

import functools
import os
import threading
import zlib
from collections.abc import Callable
from typing import Any

from ..._errors import UnsupportedError, UsageError

__all__ = [
    "DEFLATE_ENV",
    "ISAL_LEVEL",
    "ZLIB_MEMLEVEL",
    "ZLIB_WBITS",
    "ZSTD_LEVEL",
    "compress_clusters",
    "deflate_backend",
]

#: zlib settings qemu uses for compressed clusters: raw deflate, 4 KiB window.
ZLIB_WBITS = -12
ZLIB_MEMLEVEL = 9
#: ISA-L level (0-3). Levels 1 and 2 give the same size on disk data; 3 is 0.3% smaller
#: and about 2.5x slower; 0 is 8% larger.
ISAL_LEVEL = 1
#: zstd level qemu uses (ZSTD_CLEVEL_DEFAULT).
ZSTD_LEVEL = 3
#: Environment variable choosing the deflate encoder: ``zlib`` (qemu's streams, byte for
#: byte), ``isal`` (ISA-L, required), or unset/empty (ISA-L when installed, else zlib).
DEFLATE_ENV = "TRIOCONV_DEFLATE"

Deflate = Callable[[memoryview], bytes]


def _deflate_zlib(data: memoryview) -> bytes:
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, ZLIB_WBITS, ZLIB_MEMLEVEL)
    return c.compress(data) + c.flush()


@functools.cache
def _deflater(choice: str) -> tuple[str, Deflate]:
    if choice not in ("", "isal", "zlib"):
        raise UsageError(f"{DEFLATE_ENV}={choice!r}: use 'zlib' or 'isal' (or leave it unset)")
    if choice != "zlib":
        try:
            from isal import isal_zlib  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            if choice == "isal":
                raise UnsupportedError(
                    f"{DEFLATE_ENV}=isal: the isal package is not installed"
                ) from None
        else:

            def deflate_isal(data: memoryview) -> bytes:
                return isal_zlib.compress(data, ISAL_LEVEL, ZLIB_WBITS)  # type: ignore[no-any-return,unused-ignore]

            return "isal", deflate_isal
    return "zlib", _deflate_zlib


def deflate_backend() -> tuple[str, Deflate]:
    """The deflate encoder in use: ``("isal" | "zlib", function)``; see :data:`DEFLATE_ENV`."""
    return _deflater(os.environ.get(DEFLATE_ENV, "").strip().lower())


_local = threading.local()


def _zstd_compressor() -> Any:
    """This thread's zstd compressor (qemu's level and frame header), made once."""
    compressor = getattr(_local, "zstd", None)
    if compressor is None:
        try:
            import zstandard  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise UnsupportedError("zstd-compressed qcow2 needs the zstandard package") from None
        compressor = _local.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return compressor


def compress_clusters(
    payload: memoryview, cluster_size: int, zstd: bool, deflate: Deflate | None = None
) -> tuple[tuple[bool, bytes], ...]:
    """Compress each cluster of ``payload`` (the last one zero-padded), as qemu does.

    A cluster whose stream would not fit in ``cluster_size - 1`` bytes is kept as is
    (unpadded) and written as a normal cluster. Runs in a worker thread; ``deflate`` is
    the zlib encoder (default: :func:`deflate_backend`'s).
    """
    if zstd:
        compress: Deflate = _zstd_compressor().compress
    else:
        compress = deflate or deflate_backend()[1]
    out: list[tuple[bool, bytes]] = []
    for start in range(0, payload.nbytes, cluster_size):
        chunk = payload[start : start + cluster_size]
        full = chunk.nbytes == cluster_size
        padded = chunk if full else memoryview(bytes(chunk) + bytes(cluster_size - chunk.nbytes))
        stream = compress(padded)
        if len(stream) <= cluster_size - 1:
            out.append((True, stream))
        else:
            out.append((False, bytes(chunk)))  # the caller's buffer is reused: copy
    return tuple(out)
