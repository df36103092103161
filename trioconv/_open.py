"""Opening images: choose the transport from the location, probe the format, stack them.

``open_image("disk.img")`` opens the file transport, reads the first bytes, recognises the
format and returns the format driver on top. Formats that trioconv recognises but cannot
read yet are refused by name, never mistaken for raw.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import stat
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import attrs
import trio

from ._cache import CacheMode
from ._errors import BackingChainTooLong, ImageError, TrioconvError, UnsupportedError, UsageError
from ._sizes import parse_size
from .driver import Driver, require_trio
from .formats._base import FormatInfo
from .formats.raw import RAW_CREATE_OPTIONS, RawDriver, probe_raw
from .protocols.file import create_file, open_file

if TYPE_CHECKING:
    from . import _blockopts

__all__ = [
    "FormatInfo",
    "create_image",
    "format_names",
    "open_image",
    "probe_format",
]

_PROBE_BYTES = 4096

#: The longest backing chain opened (the top image included). Each image opens the
#: next in a nested call; the command line raises Python's recursion limit to match.
MAX_CHAIN_LENGTH = 1000
_NBD_SCHEMES = ("nbd", "nbds", "nbd+tcp", "nbds+tcp", "nbd+unix", "nbds+unix")


def is_nbd_uri(location: str) -> bool:
    """True when ``location`` is an NBD URI (``nbd://``, ``nbd+unix://``, TLS forms)."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.lower() in _NBD_SCHEMES


def legacy_nbd_name(location: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """QEMU's older NBD file names as the URI they stand for; anything else as it is.

    ``nbd:unix:PATH[:exportname=NAME]`` is ``nbd+unix:///NAME?socket=PATH`` and
    ``nbd:HOST:PORT[:exportname=NAME]`` is ``nbd://HOST:PORT/NAME`` (an IPv6 host in
    brackets), as qemu-img reads them - and names them, in ``info``.

    Raises:
        ImageError: ``nbd:`` with no port (qemu-img's "error parsing address").
    """
    if not isinstance(location, str) or not location.startswith("nbd:") or "://" in location:
        return location
    import urllib.parse

    spec, _, export = location[4:].partition(":exportname=")
    name = urllib.parse.quote(export, safe="")
    if spec.startswith("unix:"):
        path = urllib.parse.quote(spec[5:], safe="/")
        return f"nbd+unix:///{name}?socket={path}"
    host, colon, port = spec.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ImageError(f"Could not open '{location}': error parsing address '{spec}'")
    return f"nbd://{host}:{int(port)}/{name}"


def as_typed(message: str, names: Iterable[object]) -> str:
    """``message`` with each older ``nbd:`` name among ``names`` as it was typed.

    Such a name is opened as the URI it stands for (:func:`legacy_nbd_name`), so a
    transport's message says ``Could not open 'nbd+unix:///x?socket=/s'``; qemu-img
    says ``Could not open 'nbd:unix:/s:exportname=x'``, and so, from here, do we.
    """
    for name in names:
        if isinstance(name, str) and name.startswith("nbd:"):
            try:
                uri = legacy_nbd_name(name)
            except ImageError:
                continue  # refused under its own name
            if uri != name:
                message = message.replace(f"'{uri}'", f"'{name}'")
    return message


@contextlib.contextmanager
def typed_names(names: Iterable[object]) -> Iterator[None]:
    """Errors raised inside name each older ``nbd:`` name as it was typed (:func:`as_typed`)."""
    try:
        yield
    except TrioconvError as exc:
        if exc.args and isinstance(exc.args[0], str):
            exc.args = (as_typed(exc.args[0], names), *exc.args[1:])
        raise


def refuse_unknown_protocol(name: str, *, target: bool = False) -> None:
    """Refuse ``WORD:REST`` with no protocol trioconv knows, even when a file of that
    name exists, as qemu-img reads such a name: ``x:y.raw`` is refused (``./x:y.raw``
    or ``file:x:y.raw`` is the file). (Opening refuses it only when there is no such
    file, so that a program's path with a colon still opens.)

    Raises:
        UnsupportedError: ``Could not open 'x:y.raw': Unknown protocol 'x'`` (``Could not
            create`` for a ``target``), as qemu-img words it.
    """
    known = (is_nbd_uri, is_nfs_uri, is_iscsi_uri, is_http_uri, is_null_uri)
    if name.startswith(("file:", "json:", "nbd:")) or any(test(name) for test in known):
        return
    # QEMU's rule: whatever comes before the first colon, unless a slash comes first.
    match = re.match(r"([^:/]+):", name)
    if match:
        verb = "create" if target else "open"
        raise UnsupportedError(f"Could not {verb} '{name}': Unknown protocol '{match.group(1)}'")


def is_nfs_uri(location: str) -> bool:
    """True when ``location`` is an NFS URL (``nfs://host[:port]/export/path``)."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.lower() == "nfs"


def is_iscsi_uri(location: str) -> bool:
    """True when ``location`` is an iSCSI URL (``iscsi://host[:port]/target-iqn/lun``)."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.lower() == "iscsi"


def is_http_uri(location: str) -> bool:
    """True when ``location`` is an ``http://`` or ``https://`` URL."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.lower() in ("http", "https")


def is_null_uri(location: str) -> bool:
    """True for a null device's name (``null-co://``, ``null-aio://``; see
    :mod:`trioconv.protocols.null`)."""
    return location.startswith(("null-co://", "null-aio://"))


def redact_location(location: str) -> str:
    """``location`` fit to show: the password of an iSCSI URL (``user%password@``, or
    ``user:password@`` as libiscsi also takes it) or an HTTP one (``user:password@``) is
    left out."""
    if not (is_iscsi_uri(location) or is_http_uri(location)):
        return location
    scheme, _, rest = location.partition("://")
    userinfo, at, hostpath = rest.partition("@")
    separator = "%" if is_iscsi_uri(location) and "%" in userinfo else ":"
    if not at or "/" in userinfo or separator not in userinfo:
        return location
    return f"{scheme}://{userinfo.partition(separator)[0]}@{hostpath}"


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The first trioconv error in what a transport's nursery raised, if any."""
    for exc in group.exceptions:
        found = _first_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if isinstance(found, TrioconvError):
            return found
    return None


#: The largest image size (a byte offset must fit in a signed 64-bit number, as in QEMU).
MAX_IMAGE_SIZE = 2**63 - 1

_URI_RE = re.compile(r"^([a-z][a-z0-9+.-]*):", re.IGNORECASE)


@attrs.define(eq=False)
class OpenContext:
    """What a format driver may need while opening, beyond its transport.

    Attributes:
        location: where the image is (a path or URI), for resolving relative backing
            file names against the image's folder.
        chain: locations already open above this one, to refuse backing loops.
        stack: everything opened here is closed when the image is.
    """

    location: str
    chain: tuple[str, ...]
    stack: contextlib.AsyncExitStack
    cache: CacheMode = CacheMode.WRITEBACK
    #: ``-l``: the internal snapshot to open instead of the active layer (top image only).
    snapshot: str | None = None
    #: Set by a format opener that honoured ``snapshot``.
    snapshot_loaded: bool = False
    #: The transport is a device of fixed size (an NBD export, an iSCSI LUN; for the
    #: qcow2 writer a local block device too): a writer cannot grow it, and space past
    #: the image's data may hold old bytes.
    fixed_size: bool = False
    #: ``-U``: read the image (and its backing files) even while another process
    #: writes it.
    force_share: bool = False
    #: ``backing: null`` in block options: open no backing image (unallocated areas
    #: read as zeroes).
    no_backing: bool = False
    #: Opened alone, as ``qemu-img info`` looks at an image (``open_image(backing=False)``):
    #: no backing image, and an external data file that cannot be opened fails only the
    #: reads of guest data, not the opening.
    alone: bool = False
    #: The raw format's window into its transport (block options ``offset``, ``size``).
    raw_offset: int = 0
    raw_size: int | None = None

    async def open_backing(self, location: str, fmt: str | None) -> Driver:
        """Open a backing image read-only; it is closed together with this image.

        Raises:
            ImageError: the backing chain loops back on itself, or it cannot be opened.
        """
        if location in self.chain or location == self.location:
            raise ImageError(f"Backing file '{location}' creates an infinite loop")
        if len(self.chain) + 1 >= MAX_CHAIN_LENGTH:
            raise BackingChainTooLong(
                f"Could not open '{self.chain[0] if self.chain else self.location}': its "
                f"backing chain is longer than {MAX_CHAIN_LENGTH} images"
            )
        try:
            return await self.stack.enter_async_context(
                _open_image(
                    location,
                    fmt,
                    writable=False,
                    cache=self.cache,
                    connections=None,
                    chain=(*self.chain, self.location),
                    force_share=self.force_share,
                )
            )
        except RecursionError:
            # Each image opens the next one down; a program with Python's default
            # recursion limit gets about 80 levels (the command line allows all).
            raise BackingChainTooLong(
                f"Could not open '{self.chain[0] if self.chain else self.location}': its "
                f"backing chain is too deep for Python's recursion limit "
                f"({sys.getrecursionlimit()}; sys.setrecursionlimit raises it)"
            ) from None


async def _open_raw(transport: Driver, ctx: OpenContext) -> Driver:
    offset, size, total = ctx.raw_offset, ctx.raw_size, transport.size
    if offset > total:
        raise ImageError(
            f"Could not open '{ctx.location}': Offset ({offset}) cannot be greater than size "
            f"of the containing file ({total})"
        )
    if size is not None and offset + size > total:
        raise ImageError(
            f"Could not open '{ctx.location}': The sum of offset ({offset}) and size "
            f"({size}) has to be smaller or equal to the actual size of the containing "
            f"file ({total})"
        )
    return RawDriver(transport, offset=offset, size=size)


def _magic(magic: bytes, at: int = 0, score: int = 100) -> Callable[[bytes, str], int]:
    def probe(header: bytes, filename: str) -> int:
        return score if header[at : at + len(magic)] == magic else 0

    return probe


def _probe_qcow(version_ok: Callable[[int], bool]) -> Callable[[bytes, str], int]:
    def probe(header: bytes, filename: str) -> int:
        if header[:4] != b"QFI\xfb" or len(header) < 8:
            return 0
        return 100 if version_ok(int.from_bytes(header[4:8], "big")) else 0

    return probe


def _probe_vmdk(header: bytes, filename: str) -> int:
    # Wider than vmdk's own probe (a descriptor's first statement is ``version=N``):
    # this one only decides whether the vmdk module is worth importing.
    if header[:4] in (b"KDMV", b"COWD"):
        return 100
    return 100 if b"version=" in header[:4096] else 0


_FORMATS: dict[str, FormatInfo] = {}


def _register(info: FormatInfo) -> None:
    _FORMATS[info.name] = info


_register(FormatInfo("raw", probe_raw, _open_raw, create_options=RAW_CREATE_OPTIONS))


#: Format modules under ``trioconv.formats``; each exports ``FORMAT`` when it exists.
_FORMAT_MODULES = ("qcow2", "vmdk", "vpc", "vhdx", "vdi", "qed", "luks")
_loaded: set[str] = set()


def _load_format_module(name: str) -> None:
    """Import one format module once; its ``FORMAT`` replaces the recognise-only entry.

    Formats are imported when they are named (``-f``/``-O``) or when probing needs every
    probe, so ``convert -f raw -O raw`` pays for none of them.
    """
    if name in _loaded or name not in _FORMAT_MODULES:
        return
    _loaded.add(name)
    module_name = f"trioconv.formats.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return
    info = getattr(module, "FORMAT", None)
    if isinstance(info, FormatInfo):
        _register(info)


def _load_format_modules() -> None:
    """Import every format module (for probing and listings)."""
    for name in _FORMAT_MODULES:
        _load_format_module(name)


for _name, _probe in [
    ("qcow2", _probe_qcow(lambda v: v >= 2)),
    ("qcow", _probe_qcow(lambda v: v == 1)),
    ("vmdk", _probe_vmdk),
    ("vpc", _magic(b"conectix")),  # (a fixed disk's footer, at the end only, is raw)
    ("vhdx", _magic(b"vhdxfile")),
    ("vdi", _magic(b"\x7f\x10\xda\xbe", at=0x40)),
    ("qed", _magic(b"QED\x00")),
    ("luks", _magic(b"LUKS\xba\xbe")),
    ("parallels", lambda h, f: 100 if h[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt") else 0),
    ("bochs", _magic(b"Bochs Virtual HD Image")),
    ("cloop", _magic(b"#!/bin/sh\n#V2.0 Format")),
]:
    _register(FormatInfo(_name, _probe))


def format_names() -> list[str]:
    """Every format name trioconv recognises (not all are readable yet)."""
    _load_format_modules()
    return sorted(_FORMATS)


def format_info(name: str) -> FormatInfo:
    """The registered :class:`FormatInfo` of ``name``.

    Raises:
        UsageError: no such format.
    """
    return _format(name)


def _format(name: str) -> FormatInfo:
    _load_format_module(name)
    try:
        return _FORMATS[name]
    except KeyError:
        raise UsageError(f"Unknown file format '{name}'") from None


def probe_format(header: bytes, filename: str = "", tail: bytes = b"") -> str:
    """Name the format whose probe scores highest.

    Args:
        header: the image's first bytes (up to 4 KiB).
        tail: its last bytes; formats with ``probe_tail`` see ``header + tail``.
    """
    _load_format_modules()
    return _best_format(header, filename, tail)


def _score(info: FormatInfo, header: bytes, filename: str, tail: bytes) -> int:
    data = header + tail[-info.probe_tail :] if info.probe_tail and tail else header
    return info.probe(data, filename)


def _best_format(header: bytes, filename: str, tail: bytes) -> str:
    """The best-scoring registered format, after importing the modules that may match.

    A format module not imported yet is represented by a recognise-only probe that fires
    whenever the module's own probe could; only those modules are imported, so probing
    a raw image imports no format module at all.
    """
    for name in _FORMAT_MODULES:
        if name not in _loaded and _score(_FORMATS[name], header, filename, tail) > 0:
            _load_format_module(name)
    return max(_FORMATS.values(), key=lambda f: _score(f, header, filename, tail)).name


async def _probe_transport(transport: Driver, filename: str) -> str:
    size = transport.size
    length = min(_PROBE_BYTES, size)
    header = await transport.pread(0, length) if length else b""
    # A file shorter than the probe reads on as zeroes, as QEMU's probe buffer does: a
    # VDI cut short inside its 512-byte header is still a VDI (refused, or read, as such).
    header = header.ljust(_PROBE_BYTES, b"\0")
    want_tail = max((f.probe_tail for f in _FORMATS.values()), default=0)
    tail = b""
    if want_tail and size > length:
        n = min(want_tail, size)
        tail = await transport.pread(size - n, n)
    return _best_format(header, filename, tail)


def _transport_path(location: str | os.PathLike[str]) -> str:
    """The local path of a location, refusing network transports that are not built yet."""
    text = os.fspath(location)
    if text.startswith("file:"):
        return text[5:]
    match = _URI_RE.match(text)
    if match and not os.path.exists(text):
        scheme = match.group(1).lower()
        raise UnsupportedError(f"Could not open '{text}': Unknown protocol '{scheme}'")
    return text


@asynccontextmanager
async def open_image(
    location: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    writable: bool = False,
    cache: CacheMode | str = CacheMode.WRITEBACK,
    connections: int | None = None,
    snapshot: str | None = None,
    force_share: bool = False,
    backing: bool = True,
) -> AsyncIterator[Driver]:
    """Open an image: an async context manager giving the driver stack's top.

    ::

        async with trioconv.open_image("disk.img") as image:
            header = await image.pread(0, 512)

    Args:
        location: a path (optionally ``file:``-prefixed), an NBD URI
            (``nbd://host[:port]/export``, ``nbd+unix:///export?socket=PATH``), an NFS
            URL (``nfs://host/export/path``), an iSCSI URL
            (``iscsi://[user%password@]host[:port]/target-iqn/lun``), read-only an
            HTTP(S) URL (``https://host/path/disk.qcow2``), or ``null-co://``, QEMU's
            null device (writes dropped, reads zeroes).
        fmt: the format; probed from the first bytes when None.
        writable: open for writing (sources are always opened read-only).
        cache: the cache mode (see :class:`~trioconv.CacheMode`): ``O_DIRECT`` and
            the final flush for local files; over the network, whether an iSCSI LUN
            is flushed and whether each write is made durable (``writethrough``,
            ``directsync``: NBD FUA, iSCSI SYNCHRONIZE CACHE, NFS FILE_SYNC).
        connections: for NBD exports that allow it, how many connections to spread
            requests over (4 by default).
        snapshot: open this internal snapshot read-only instead of the active layer
            (``-l``: ``NAME``, ``snapshot.id=ID`` or ``snapshot.name=NAME``).
        force_share: read a local image even while another process (QEMU, another
            trioconv) writes it (``-U``, read-only only). Local files are locked as QEMU
            locks them, so otherwise an image in use by a writer is refused, and an
            image opened writable is refused while another process uses it in a way
            that does not share writing (a reader such as a qemu-img source, a
            running VM's disk, any user of a qcow2 or other format's file).
        backing: False opens the image alone, without its backing image (unallocated
            areas read as zeroes), as ``qemu-img info`` looks at an image.

    Everything the image needs - a file descriptor, a network connection and its reader
    task - lives inside the ``async with`` block and is released when it ends.

    Raises:
        ImageError: it cannot be opened, or is in a format trioconv cannot read yet.
        UsageError: ``fmt`` is not a format name, or this is not a Trio task.
    """
    require_trio("trioconv.open_image")
    async with _open_image(
        location,
        fmt,
        writable=writable,
        cache=cache,
        connections=connections,
        chain=(),
        snapshot=snapshot,
        force_share=force_share,
        backing=backing,
    ) as driver:
        yield driver


@asynccontextmanager
async def _open_image(
    location: str | os.PathLike[str],
    fmt: str | None,
    *,
    writable: bool,
    cache: CacheMode | str,
    connections: int | None,
    chain: tuple[str, ...],
    snapshot: str | None = None,
    force_share: bool = False,
    backing: bool = True,
) -> AsyncIterator[Driver]:
    text = os.fspath(legacy_nbd_name(location))
    # A json: name holds QEMU block options (see _blockopts); anything else is a path
    # or a URI.
    opener = _open_spec if text.startswith("json:") else _open_transport_image
    async with opener(
        text,
        fmt,
        writable=writable,
        cache=cache,
        connections=connections,
        chain=chain,
        snapshot=snapshot,
        force_share=force_share,
        backing=backing,
    ) as driver:
        yield driver


@asynccontextmanager
async def _open_spec(
    text: str,
    fmt: str | None,
    *,
    writable: bool,
    cache: CacheMode | str,
    connections: int | None,
    chain: tuple[str, ...],
    snapshot: str | None,
    force_share: bool,
    backing: bool = True,
) -> AsyncIterator[Driver]:
    """Open a ``json:`` filename: QEMU's block options (see :mod:`trioconv._blockopts`)."""
    from . import _blockopts

    shown = _blockopts.shown_name(text)  # an --image-opts value, as the user wrote it
    spec = _blockopts.resolve(_blockopts.parse_json_filename(text), shown, fmt)
    if writable and spec.read_only:
        raise ImageError(f"Could not open '{shown}': Block node is read-only")
    if force_share and spec.force_share is False:
        raise UsageError(f"Could not open '{shown}': force-share=off conflicts with -U")
    share = force_share or bool(spec.force_share)
    if writable and share:
        raise UsageError("force-share=on can only be used with read-only images")
    mode = CacheMode.parse(cache)
    if spec.direct and not mode.direct:
        mode = CacheMode.NONE
    async with contextlib.AsyncExitStack() as stack:
        try:
            driver = await stack.enter_async_context(
                _open_transport_image(
                    spec.location,
                    spec.fmt,
                    writable=writable,
                    cache=mode,
                    connections=connections,
                    chain=chain,
                    snapshot=snapshot,
                    force_share=share,
                    spec=spec,
                    backing=backing,
                )
            )
        except TrioconvError as exc:
            raise _reworded(exc, shown, spec) from None
        if spec.name.startswith("json:"):
            driver.location = spec.name  # as QEMU names it (qemu-img info shows it)
        yield driver


def _reworded(exc: TrioconvError, shown: str, spec: _blockopts.BlockSpec) -> TrioconvError:
    """An error opening what block options name, told in the user's terms: it names
    their option text, and the URI trioconv made of the options only as QEMU would
    (``Could not open 'OPTIONS': Could not open 'FILE': reason`` for a file)."""
    message = str(exc)
    path = spec.location[5:] if spec.location.startswith("file:") else spec.location
    ours = next(
        (
            f"Could not open '{name}': "
            for name in (spec.location, path)
            if message.startswith(f"Could not open '{name}': ")
        ),
        None,
    )
    if ours is not None:
        reason = message[len(ours) :]
        if spec.protocol in ("file", "host_device", "host_cdrom") and shown != spec.shown:
            message = f"Could not open '{shown}': Could not open '{spec.shown}': {reason}"
        else:
            message = f"Could not open '{shown}': {reason}"
    elif not message.startswith("Could not open "):
        message = f"Could not open '{shown}': {message}"
    if isinstance(exc, (UsageError, UnsupportedError)):
        return type(exc)(message)
    return ImageError(message)


@asynccontextmanager
async def _open_transport_image(
    text: str,
    fmt: str | None,
    *,
    writable: bool,
    cache: CacheMode | str,
    connections: int | None,
    chain: tuple[str, ...],
    snapshot: str | None = None,
    force_share: bool = False,
    spec: _blockopts.BlockSpec | None = None,
    backing: bool = True,
) -> AsyncIterator[Driver]:
    try:
        info = _format(fmt) if fmt is not None else None
    except UsageError:
        raise UsageError(f"Could not open '{text}': Unknown driver '{fmt}'") from None
    async with contextlib.AsyncExitStack() as stack:
        transport: Driver
        if spec is not None and spec.inner is not None:
            # A format over a format (``driver=qcow2,file.driver=raw,file.offset=...``).
            transport = await stack.enter_async_context(
                _open_transport_image(
                    spec.inner.location,
                    spec.inner.fmt,
                    writable=writable,
                    cache=cache,
                    connections=connections,
                    chain=chain,
                    force_share=force_share,
                    spec=spec.inner,
                )
            )
        elif is_null_uri(text):
            from .protocols.null import open_null

            transport = open_null(text, spec.null if spec is not None else None, writable=writable)
            stack.push_async_callback(transport.aclose)
        elif is_nbd_uri(text):
            from .protocols.nbd import open_nbd  # only programs that use NBD pay for it

            transport = await stack.enter_async_context(
                open_nbd(
                    text,
                    writable=writable,
                    connections=connections,
                    cache=cache,
                    retry_connect=spec.nbd_open_timeout if spec is not None else 0,
                    reconnect_delay=spec.nbd_reconnect_delay if spec is not None else 0,
                )
            )
        elif is_nfs_uri(text):
            from .protocols.nfs import open_nfs  # only programs that use NFS pay for it

            transport = await stack.enter_async_context(
                open_nfs(text, writable=writable, cache=cache)
            )
        elif is_iscsi_uri(text):
            from .protocols.iscsi import open_iscsi  # only programs that use iSCSI pay for it

            transport = await stack.enter_async_context(
                open_iscsi(
                    text,
                    writable=writable,
                    cache=cache,
                    chap=spec.chap if spec is not None else None,
                    timeout=spec.timeout if spec is not None else None,
                )
            )
        elif is_http_uri(text):
            from .protocols.http import open_http  # only programs that use HTTP pay for it

            verify = spec is None or spec.tls_verify
            timeout = spec.timeout if spec is not None else None
            transport = await stack.enter_async_context(
                open_http(
                    text,
                    writable=writable,
                    verify=verify,
                    timeout=timeout,
                    cookie=spec.cookie if spec is not None else None,
                    proxy_user=spec.proxy_user if spec is not None else None,
                    proxy_password=spec.proxy_password if spec is not None else None,
                )
            )
        else:
            path = _transport_path(text)
            transport = await open_file(
                path,
                writable=writable,
                cache=CacheMode.parse(cache),
                force_share=force_share,
                locking=spec is None or spec.locking,
                share_writes=writable and info is not None and info.name == "raw",
            )
            stack.push_async_callback(transport.aclose)
            device = spec is not None and spec.protocol in ("host_device", "host_cdrom")
            if (
                device
                and not transport.is_block_device
                and not stat.S_ISCHR(os.fstat(transport.fd).st_mode)
            ):
                assert spec is not None
                raise ImageError(
                    f"Could not open '{path}': '{spec.protocol}' driver requires "
                    f"'{path}' to be either a character or block device"
                )
        if info is None:
            info = _FORMATS[await _probe_transport(transport, text)]
        if info.open is None:
            raise ImageError(
                f"Could not open '{text}': image format '{info.name}' is not supported yet"
            )
        fixed_size = is_nbd_uri(text) or is_iscsi_uri(text)
        if spec is not None and spec.inner is not None and spec.inner.size is not None:
            fixed_size = True  # a format inside a raw window of fixed size
        if writable and fixed_size and info.name not in ("raw", "qcow2"):
            # The format writers take new clusters from the end of their file, which an
            # NBD export or a LUN cannot grow past: refuse before anything is written.
            # (qcow2 allocates after its last used cluster there, within the device.)
            kind = (
                "an NBD export"
                if is_nbd_uri(text)
                else "an iSCSI LUN"
                if is_iscsi_uri(text)
                else "a raw window of fixed size"
            )
            raise UnsupportedError(
                f"Writing a '{info.name}' image into {kind} is not supported yet: "
                f"'{redact_location(text)}' (write a raw image with -O raw)"
            )
        if writable and info.name == "qcow2" and getattr(transport, "is_block_device", False):
            # A local disk or LV cannot grow either, and its sectors hold old bytes: the
            # qcow2 writer keeps within it and writes new clusters whole, as on an NBD
            # export. (The other writers grow their file within the device, as before.)
            fixed_size = True
        ctx = OpenContext(
            text,
            chain,
            stack,
            CacheMode.parse(cache),
            snapshot=snapshot,
            fixed_size=fixed_size,
            force_share=force_share,
            no_backing=not backing,
            alone=not backing,
        )
        if spec is not None:
            ctx.no_backing = ctx.no_backing or spec.no_backing
            ctx.raw_offset, ctx.raw_size = spec.offset, spec.size
            if info.name != "raw" and (spec.offset or spec.size is not None):
                key = "offset" if spec.offset else "size"
                raise ImageError(
                    f"Could not open '{spec.shown}': Block format '{info.name}' does not "
                    f"support the option '{key}'"
                )
        driver = await info.open(transport, ctx)
        if writable and not driver.caps.writable:
            await driver.aclose()
            raise UnsupportedError(f"Format '{info.name}' is not supported for writing yet")
        if driver.size > MAX_IMAGE_SIZE:
            raise ImageError(
                f"Could not open '{redact_location(text)}': the image is too large "
                f"({driver.size} bytes; at most {MAX_IMAGE_SIZE})"
            )
        if is_iscsi_uri(text) or is_http_uri(text):
            driver.location = redact_location(text)  # its messages never show a password
        # Closed first (the stack unwinds in reverse), so a format writes its metadata
        # while its transport is still open.
        stack.push_async_callback(driver.aclose)
        if snapshot is not None and not ctx.snapshot_loaded:
            raise UnsupportedError(
                f"Failed to load snapshot: Device '{text}' (format '{info.name}') does not "
                "support internal snapshots"
            )
        yield driver


def check_create_options(fmt: str, options: Mapping[str, str]) -> None:
    """Validate ``-o`` options for creating an image of ``fmt``.

    Raises:
        UsageError: unknown format, a format that cannot be created, or a bad option.
    """
    info = _format(fmt)
    if info.create_options is None or (info.create is None and info.name != "raw"):
        raise UnsupportedError(f"Format '{fmt}' is not supported for writing yet")
    for key, value in options.items():
        if key in FILE_CREATE_OPTIONS:
            file_create_hints({key: value})  # checks the value
            continue
        if key == "preallocation" and key not in info.create_options:
            # The file protocol's, under a format without its own: qemu-img passes it
            # to the new, still empty file, where it has nothing to allocate.
            _file_preallocation(value)
            continue
        if key not in info.create_options:
            if fmt == "qcow2" and (key == "encryption" or key.startswith("encrypt.")):
                # QEMU's own option, for a feature trioconv does not have: say so.
                raise UnsupportedError(f"Encrypted {fmt} images are not supported ('{key}')")
            raise UsageError(f"Invalid parameter '{key}'")
        if _OPTION_TYPES.get(key) == "size":
            _option_size(key, value)
        own_checks = info.create is not None  # a format with a creator checks its own values
        if key == "preallocation" and not own_checks:
            _file_preallocation(value)


def _option_size(key: str, value: str) -> int:
    """An ``-o`` size value, refused as qemu-img's option parser refuses it (it checks
    the type of every option before the format sees any; ``size`` itself is then
    replaced by the source's size)."""
    try:
        size = parse_size(value, what=key)
    except UsageError:
        size = -1
    if not 0 <= size < 1 << 64:
        raise UsageError(
            f"Parameter '{key}' expects a non-negative number below 2^64 "
            "(optional suffix k, M, G, T, P or E)"
        )
    return size


def _file_preallocation(value: str) -> None:
    """Check the file protocol's ``preallocation`` value, with qemu-img's messages."""
    if value == "metadata":
        raise UsageError("Unsupported preallocation mode: metadata")
    if value not in ("off", "falloc", "full"):
        raise UsageError(f"invalid parameter value: {value}")


#: ``-o`` options of the file protocol under any format: the new local file gets them.
FILE_CREATE_OPTIONS: dict[str, str] = {
    "extent_size_hint": "Extent size hint for the image file, 0 to disable",
    "nocow": "Turn off copy-on-write (valid only on btrfs)",
}


def file_create_hints(options: Mapping[str, str]) -> tuple[bool, int | None]:
    """The file-protocol options among ``options``, checked: ``nocow`` and
    ``extent_size_hint`` (None when not given) for
    :func:`~trioconv.protocols.file.create_file`.

    Raises:
        UsageError: a value qemu-img would refuse.
    """
    nocow = False
    if "nocow" in options:
        value = options["nocow"]
        if value not in ("on", "off"):
            raise UsageError("Parameter 'nocow' expects 'on' or 'off'")
        nocow = value == "on"
    hint = None
    if "extent_size_hint" in options:
        hint = _option_size("extent_size_hint", options["extent_size_hint"])
        if hint > 0xFFFF_FFFF:
            raise UsageError("Extent size hint is too large")
    return nocow, hint


#: The value types ``-o help`` shows, as qemu-img names them (``<str>`` otherwise).
_OPTION_TYPES = {
    **dict.fromkeys(("size", "cluster_size", "block_size", "log_size"), "size"),
    "extent_size_hint": "size",
    "nocow": "bool (on/off)",
    "refcount_bits": "num",
    **dict.fromkeys(
        (
            "block_state_zero",
            "compat6",
            "data_file_raw",
            "extended_l2",
            "force_size",
            "lazy_refcounts",
            "static",
            "zeroed_grain",
        ),
        "bool (on/off)",
    ),
}


def create_options_help(fmt: str, *, with_files: bool = False) -> str:
    """The text ``-o help`` prints for ``fmt``, laid out as qemu-img lays it out: with
    no file names given, a header naming the format and a closing note."""
    info = _format(fmt)
    if info.create_options is None:
        raise UnsupportedError(f"Format '{fmt}' is not supported for writing yet")
    lines = ["Supported options:" if with_files else f"Supported {fmt} options:"]
    options = dict(info.create_options)
    if with_files:  # the protocol's options too (a local file's)
        options.update(FILE_CREATE_OPTIONS)
        options.setdefault("preallocation", RAW_CREATE_OPTIONS["preallocation"])
    elif fmt == "raw":
        del options["preallocation"]  # raw's is the file protocol's
    for key, text in sorted(options.items()):
        lines.append(f"  {key + '=<' + _OPTION_TYPES.get(key, 'str') + '>':<22} - {text}")
    if not with_files:
        lines += [
            "",
            "The protocol level may support further options.",
            "Specify the target filename to include those options.",
        ]
    return "\n".join(lines)


async def create_image(
    location: str | os.PathLike[str],
    fmt: str,
    size: int,
    options: Mapping[str, str] | None = None,
) -> bool:
    """Create an image of ``fmt`` and ``size`` bytes (truncating an existing file).

    Returns:
        True when a new file was created (the caller may remove it on failure); False
        when an existing file or device was reused.

    Raises:
        ImageError: it cannot be created.
        UsageError: a bad format or option, or this is not a Trio task.
    """
    require_trio("trioconv.create_image")
    if size < 0:
        raise UsageError(f"Invalid image size specified: {size}")
    location = legacy_nbd_name(location)
    options = dict(options or {})
    size = -(-size // 512) * 512  # whole sectors, as qemu-img create makes it
    check_create_options(fmt, options)
    info = _format(fmt)
    if info.check_create is not None:
        # Every option the format would refuse is refused before an existing target is
        # truncated, so a typo in -o never destroys what the target held.
        await info.check_create(os.fspath(location), size, options)
    nocow, hint = file_create_hints(options)
    file_keys = [key for key in options if key in FILE_CREATE_OPTIONS]
    for key in file_keys:
        del options[key]
    if info.create is not None and "preallocation" not in (info.create_options or {}):
        options.pop("preallocation", None)  # the file protocol's: nothing to allocate yet
    if (
        file_keys
        and _URI_RE.match(os.fspath(location))
        and not os.fspath(location).startswith("file:")
    ):
        raise UsageError(f"Invalid parameter '{file_keys[0]}'")  # not a local file
    if is_nbd_uri(os.fspath(location)):
        return await _create_on_device(os.fspath(location), fmt, size, options)
    if is_null_uri(os.fspath(location)):
        protocol = os.fspath(location).partition(":")[0]
        raise UnsupportedError(
            f"Protocol driver '{protocol}' does not support image creation "
            "(use -n to write into a null device)"
        )
    if is_iscsi_uri(os.fspath(location)):
        return await _create_on_device(os.fspath(location), fmt, size, options)
    if is_http_uri(os.fspath(location)):
        raise UnsupportedError(
            f"Could not create '{redact_location(os.fspath(location))}': HTTP images are read-only"
        )
    if is_nfs_uri(os.fspath(location)):
        return await _create_nfs_image(os.fspath(location), fmt, size, options)
    path = _transport_path(location)
    if info.create is None:
        return await create_file(
            path,
            size,
            preallocation=options.get("preallocation", "off"),
            nocow=nocow,
            extent_size_hint=hint,
        )
    # Files the format adds (extents, a data file) that are new are removed with the
    # image if creating it fails or is cancelled at any point, even once the format's
    # own work is done (in the final flush, say).
    fresh = not_there(_format_side_files(info, path, size, options))
    created = await create_file(path, 0, nocow=nocow, extent_size_hint=hint)
    try:
        transport = await open_file(path, writable=True)
        try:
            await info.create(transport, size, options)
            await transport.flush()
        finally:
            await transport.aclose()
    except BaseException:
        for name in [path, *fresh] if created else fresh:
            with contextlib.suppress(OSError):
                os.unlink(name)
        raise
    return created


def side_files(
    location: str | os.PathLike[str], fmt: str, size: int, options: Mapping[str, str]
) -> list[str]:
    """The other files that :func:`create_image` makes for a ``fmt`` image at a local
    ``location``: a multi-file VMDK's extents, a qcow2 image's ``data_file``. Empty for
    formats of one file and for images over the network.

    Raises:
        UsageError: a bad format or option (as :func:`create_image` would).
    """
    text = os.fspath(location)
    if _URI_RE.match(text) and not text.startswith("file:"):
        return []
    options = {k: v for k, v in options.items() if k not in FILE_CREATE_OPTIONS}
    return _format_side_files(_format(fmt), _transport_path(text), -(-size // 512) * 512, options)


def not_there(paths: list[str]) -> list[str]:
    """The ``paths`` that do not exist (not even as a dangling link)."""
    return [p for p in paths if not os.path.lexists(p)]


def _format_side_files(
    info: FormatInfo, path: str, size: int, options: Mapping[str, str]
) -> list[str]:
    return info.side_files(path, size, options) if info.side_files is not None else []


async def _create_nfs_image(uri: str, fmt: str, size: int, options: Mapping[str, str]) -> bool:
    """:func:`create_image` on an NFS server: create or truncate, then format it."""
    from .protocols.nfs import create_nfs_file, open_nfs, remove_nfs_file

    info = _format(fmt)
    # Reserving blocks needs the file protocol's fallocate, which NFSv3 lacks; a format's
    # metadata preallocation (qcow2's tables) is plain writes.
    prealloc = options.get("preallocation", "off")
    own = "preallocation" in (info.create_options or {}) and info.create is not None
    if prealloc != "off" and not (own and prealloc == "metadata"):
        raise UnsupportedError(f"Protocol driver 'nfs' does not support preallocation: '{uri}'")
    if info.create is None:
        return await create_nfs_file(uri, size)
    created = await create_nfs_file(uri, 0)
    try:
        try:
            async with open_nfs(uri, writable=True) as transport:
                await info.create(transport, size, options)
                await transport.flush()
        except BaseExceptionGroup as group:  # from the transport's reader nursery
            first = _first_error(group)
            if first is None:
                raise
            raise first from group
    except BaseException:
        if created:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(10),
                contextlib.suppress(TrioconvError),
            ):
                await remove_nfs_file(uri)
        raise
    return created


#: Formats whose writers work inside a device of fixed size (see _open_transport_image).
_FIXED_SIZE_FORMATS = ("raw", "qcow2")


async def _create_on_device(uri: str, fmt: str, size: int, options: Mapping[str, str]) -> bool:
    """:func:`create_image` on an NBD export or an iSCSI LUN, which exist already and
    cannot grow.

    As QEMU does for such protocols, "creating" checks that the device is large enough
    and then writes the new image's format onto it: nothing for raw, a qcow2 image's
    header and tables at its start. The device is never new, so the result is always
    False (a failed conversion leaves it, rather than removing it).
    """
    from .protocols.iscsi import open_iscsi
    from .protocols.nbd import open_nbd

    nbd = is_nbd_uri(uri)
    if nbd:
        protocol, kind, shown = "nbd", "NBD nodes", "the export"
    else:
        protocol, kind, shown = "iscsi", "iSCSI devices", "the LUN"
    if options.get("preallocation", "off") != "off":
        raise UnsupportedError(
            f"Protocol driver '{protocol}' does not support preallocation: '{uri}'"
        )
    info = _format(fmt)
    if info.name not in _FIXED_SIZE_FORMATS:
        where = "an NBD export" if nbd else "an iSCSI LUN"
        raise UnsupportedError(
            f"Writing a '{info.name}' image into {where} is not supported yet: "
            f"'{redact_location(uri)}' (write a raw image with -O raw)"
        )
    opener = open_nbd(uri, writable=True, connections=1) if nbd else open_iscsi(uri, writable=True)
    try:
        async with opener as device:
            if info.create is None and device.size < size:
                # (A format's image takes what it allocates; it says when that is full.)
                raise ImageError(
                    f"Could not create '{device.location}': Cannot grow {kind} ({shown} has "
                    f"{device.size} bytes, the image needs {size})"
                )
            if info.create is not None:
                await info.create(device, size, options)
                await device.flush()
    except BaseExceptionGroup as group:  # from the transport's reader nursery
        first = _first_error(group)
        if first is None:
            raise
        raise first from group
    return False
