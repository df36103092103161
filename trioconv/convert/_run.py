"""The conversion itself: what :func:`trioconv.convert` runs (opening, creating,
checking, the pipeline, cleaning up after a failure)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .._errors import ConvertError, ImageError, TrioconvError, UnsupportedError, UsageError
from .._open import (
    check_create_options,
    create_image,
    format_info,
    is_nfs_uri,
    legacy_nbd_name,
    not_there,
    open_image,
    side_files,
    typed_names,
)
from ..driver import Driver, require_trio
from . import ConvertResult, ImageSpec
from .options import ConvertOptions
from .pipeline import convert_error_from_group, lone_exception, run_pipeline
from .progress import Progress

if TYPE_CHECKING:
    from ..formats.qcow2._bitmaps import Bitmap

log = logging.getLogger("trioconv")

__all__ = ["run_convert"]


def _target_format(opts: ConvertOptions) -> str:
    """The target's format, raw when none is named (``-O ''`` is a name, and wrong)."""
    return opts.target_format if opts.target_format is not None else "raw"


def _check_format_features(
    opts: ConvertOptions, nsources: int, *, target_is_driver: bool = False
) -> None:
    """Refuse, by name, what the target format cannot do (qemu-img's wording)."""
    fmt = _target_format(opts)
    creating = not opts.no_create and not target_is_driver
    if creating:
        check_create_options(fmt, opts.target_options)
    if nsources > 1 and opts.snapshot is not None:
        raise UnsupportedError("No support for concatenating multiple snapshot")
    if creating:
        known = format_info(fmt).create_options or {}
        if opts.backing_file is not None and "backing_file" not in known:
            raise UnsupportedError(f"Backing file not supported for file format '{fmt}'")
        if opts.backing_format is not None and "backing_fmt" not in known:
            raise UnsupportedError(f"Backing file format not supported for file format '{fmt}'")
    backing = _target_backing(opts, target_is_driver=target_is_driver)
    if opts.target_is_zero and backing is not None:
        raise UnsupportedError(
            "Cannot use --target-is-zero when the destination image has a backing file"
        )
    if nsources > 1 and backing is not None:
        raise UnsupportedError(
            "Having a backing file for the target makes no sense when concatenating "
            "multiple input images"
        )
    if creating and backing is not None and opts.target_backing_format is None:
        raise UsageError("Use of backing file requires explicit backing format")
    if creating and backing == "":
        # (qemu-img 7.2 crashes on an empty name with a format; no image has that name.)
        raise UsageError("Could not open backing file '': No such file or directory")
    if nsources > 1 and opts.bitmaps:
        raise UnsupportedError("Copying bitmaps only possible with single source")
    # (A target format of None - found when the target is opened - is checked then.)
    named = opts.target_format is not None and not target_is_driver
    if opts.compress and named and not format_info(fmt).can_compress:
        raise UnsupportedError(f"Compression not supported for this file format ('{fmt}')")
    # (--bitmaps: the source is asked first, once it is open; see _check_bitmap_target.)


def _check_bitmap_target(opts: ConvertOptions, *, target_is_driver: bool) -> None:
    """``--bitmaps`` needs a target format that stores them - asked after the source,
    as qemu-img asks."""
    fmt = _target_format(opts)
    named = opts.target_format is not None and not target_is_driver
    if named and fmt != "qcow2":
        raise UnsupportedError(f"Format driver '{fmt}' does not support bitmaps")
    creating = not opts.no_create and not target_is_driver
    if creating and opts.create_options().get("compat") in ("0.10", "v2"):
        raise UnsupportedError("Cannot store dirty bitmaps in qcow2 v2 files")


@contextlib.asynccontextmanager
async def _keeping_the_first_error(
    image: contextlib.AbstractAsyncContextManager[Driver],
) -> AsyncIterator[Driver]:
    """``image``, whose closing cannot replace the error that ended the conversion.

    A target closed after a failure may fail to store its metadata too (the disk that
    filled up is still full, the server is still gone); that second error is logged,
    and the first one - what went wrong - is what the caller gets.
    """
    first: BaseException | None = None
    try:
        async with image as driver:
            try:
                yield driver
            except BaseException as exc:
                first = exc
                raise
    except TrioconvError as exc:
        if first is None or exc is first:
            raise
        log.debug("closing the target after a failure: %s", exc)
    else:
        return
    raise first  # outside the handler: its cause and context stay as they were


def _target_backing(opts: ConvertOptions, *, target_is_driver: bool) -> str | None:
    """The target's backing file, as qemu-img decides it (``-B`` wins over ``-o``).

    With ``-n`` (or an open target) ``-B`` only says that the existing target has a
    backing file: the target's header is left alone.
    """
    if opts.no_create or target_is_driver:
        return opts.backing_file or None
    return opts.target_backing_file


def _same_file(a: ImageSpec, b: ImageSpec) -> bool:
    if isinstance(a, Driver) or isinstance(b, Driver):
        return a is b
    if os.fspath(a) == os.fspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_spec(spec: object, what: str) -> None:
    """An image is named by a path (a string or path object) or given as an open
    driver; anything else (bytes included: trioconv's names are text) is refused."""
    if isinstance(spec, Driver):
        return
    if isinstance(spec, str | os.PathLike) and isinstance(os.fspath(spec), str):
        return
    raise UsageError(f"Invalid {what} {spec!r}: give a path, a URI or an open trioconv.Driver")


def _specs(sources: object) -> list[ImageSpec]:
    """The sources as a list, each checked (see :func:`_check_spec`)."""
    if not isinstance(sources, Sequence) or isinstance(sources, bytes | bytearray):
        raise UsageError(
            f"Invalid sources {sources!r}: give a path, a URI, an open trioconv.Driver, "
            "or a list of them"
        )
    for spec in sources:
        _check_spec(spec, "source")
    return list(sources)


async def run_convert(
    sources: Sequence[ImageSpec] | ImageSpec,
    target: ImageSpec,
    options: ConvertOptions | None = None,
    *,
    progress: Progress | None = None,
) -> ConvertResult:
    """:func:`trioconv.convert` (see there)."""
    require_trio("trioconv.convert")
    if options is not None and not isinstance(options, ConvertOptions):
        raise UsageError(f"Invalid options {options!r}: give a trioconv.ConvertOptions (or None)")
    if progress is not None and not isinstance(progress, Progress):
        raise UsageError(f"Invalid progress {progress!r}: give a trioconv.Progress (or None)")
    typed = [sources] if isinstance(sources, (str, os.PathLike, Driver)) else _specs(sources)
    _check_spec(target, "target")
    opts = options if options is not None else ConvertOptions()
    if progress is not None and progress._taken:
        # Its counters would run on from the other one's, and so would the result's.
        raise UsageError("A Progress follows one conversion: this one was used already")
    if progress is None:
        progress = Progress()
        progress._wants_data = False  # nobody watches it
    progress._taken = True
    # QEMU's older NBD names (nbd:unix:PATH:exportname=X) as the URIs they stand for;
    # errors name them as they were given.
    specs = [s if isinstance(s, Driver) else legacy_nbd_name(s) for s in typed]
    with typed_names([*typed, target]):
        target = target if isinstance(target, Driver) else legacy_nbd_name(target)
        return await _converting(specs, target, opts, progress)


async def _converting(
    specs: list[ImageSpec], target: ImageSpec, opts: ConvertOptions, progress: Progress
) -> ConvertResult:
    try:
        return await _convert(specs, target, opts, progress)
    except BaseExceptionGroup as group:
        # A transport's own task failed (a dropped connection), outside the pipeline.
        error = convert_error_from_group(group)
        if error is not None:
            raise error from group
        lone = lone_exception(group)
        if lone is group:
            raise
        # A cancellation or a Ctrl-C, as itself: ``except trio.Cancelled`` and ``except
        # KeyboardInterrupt`` around the call see it, not a group of copy tasks' copies.
        raise lone from None
    finally:
        progress._finish()


async def _convert(
    specs: list[ImageSpec], target: ImageSpec, opts: ConvertOptions, progress: Progress
) -> ConvertResult:
    if not specs:
        raise ImageError("Must specify image file name")
    _check_format_features(opts, len(specs), target_is_driver=isinstance(target, Driver))
    for spec in specs:
        if _same_file(spec, target):
            raise ImageError(
                f"'{os.fspath(target) if not isinstance(target, Driver) else target.location}'"
                " is both a source and the target"
            )
    async with contextlib.AsyncExitStack() as stack:
        drivers: list[Driver] = []
        for spec in specs:
            if isinstance(spec, Driver):
                drivers.append(spec)
            else:
                drv = await stack.enter_async_context(
                    open_image(
                        spec,
                        opts.source_format,
                        cache=opts.source_cache,
                        connections=opts.connections,
                        snapshot=opts.snapshot,
                        force_share=opts.force_share,
                    )
                )
                drivers.append(drv)
        if opts.bitmaps:
            _check_bitmap_source(drivers[0])
            _check_bitmap_target(opts, target_is_driver=isinstance(target, Driver))
        total = sum(d.size for d in drivers)
        created: _Created | str | None = None
        extra_files: list[_Created] = []
        if isinstance(target, Driver):
            tgt, is_new = target, False
        else:
            is_new = not opts.no_create
            if is_new:
                fmt = _target_format(opts)  # (None is refused without no_create)
                check_create_options(fmt, opts.create_options())
                # Formats with several files (vmdk extents, a qcow2 data file) create
                # them too: those that are new are removed with the target on failure.
                fresh = not_there(side_files(target, fmt, total, opts.create_options()))
                if await create_image(target, fmt, total, opts.create_options()):
                    text = os.fspath(target)
                    created = text if is_nfs_uri(text) else _Created(text)
                    extra_files = [_Created(p) for p in fresh]
            try:
                tgt = await stack.enter_async_context(
                    _keeping_the_first_error(
                        open_image(
                            target,
                            opts.target_format,
                            writable=True,
                            cache=opts.target_cache,
                            connections=opts.connections,
                        )
                    )
                )
            except BaseException:
                await _remove(created, extra_files)
                raise
        try:
            if tgt.size < total:
                raise ImageError("output file is smaller than input file")
            bitmaps = await _bitmaps_to_copy(drivers[0], tgt, opts) if opts.bitmaps else []
            backing = _target_backing(opts, target_is_driver=isinstance(target, Driver))
            zero_init = backing is None and (opts.target_is_zero or (is_new and tgt.caps.zero_init))
            # Past the end of a new target's backing file, untouched ranges read as
            # zeroes (qemu-img's target_backing_sectors).
            backing_end = tgt.backing.size if is_new and tgt.backing is not None else None
            start = trio.current_time()
            salvaged = await run_pipeline(
                drivers,
                tgt,
                opts,
                progress,
                zero_init=zero_init,
                backing=backing is not None,
                backing_end=backing_end,
            )
            try:
                if bitmaps:
                    await _add_bitmaps(tgt, bitmaps)
                await tgt.flush()
            except TrioconvError as exc:
                raise ConvertError(str(exc)) from exc
        except BaseException:
            await _remove(created, extra_files)
            raise
        return ConvertResult(
            total=total,
            written=progress.written,
            zeroed=progress.zeroed,
            skipped=progress.skipped,
            elapsed=trio.current_time() - start,
            salvaged=tuple(salvaged),
        )


async def _bitmaps_to_copy(source: Driver, target: Driver, opts: ConvertOptions) -> list[Bitmap]:
    """``--bitmaps``: the source's persistent bitmaps, checked before anything is copied.

    An inconsistent one (``in_use``) stops the conversion unless
    ``--skip-broken-bitmaps``; a name the target already has stops it too.
    """
    from ..formats.qcow2 import Qcow2Driver, Qcow2Writer

    if not isinstance(target, Qcow2Writer):
        raise UnsupportedError(f"Format driver '{target.name}' does not support bitmaps")
    if target.header.version < 3:
        raise UnsupportedError("Cannot store dirty bitmaps in qcow2 v2 files")
    _check_bitmap_source(source)
    assert isinstance(source, Qcow2Driver)
    bitmaps: list[Bitmap] = []
    for b in await source.load_bitmaps():
        if b.in_use:
            if opts.skip_broken_bitmaps:
                log.warning("skipping inconsistent bitmap '%s'", b.name)
                continue
            raise UnsupportedError(
                f"Cannot copy inconsistent bitmap '{b.name}' (try --skip-broken-bitmaps, or "
                "remove it with 'qemu-img bitmap --remove')"
            )
        bitmaps.append(b)
    existing = {b.name for b in target.bitmaps}
    for b in bitmaps:
        if b.name in existing:
            raise UnsupportedError(f"Bitmap '{b.name}' already exists in the target")
    return bitmaps


def _check_bitmap_source(source: Driver) -> None:
    """``--bitmaps`` needs a source format that stores them (qcow2), as qemu-img says
    before it creates the target."""
    from ..formats.qcow2 import Qcow2Driver

    if not isinstance(source, Qcow2Driver):
        raise UnsupportedError("Source lacks bitmap support")


async def _add_bitmaps(target: Driver, bitmaps: list[Bitmap]) -> None:
    from ..formats.qcow2 import Qcow2Writer

    assert isinstance(target, Qcow2Writer)
    await target.add_bitmaps(bitmaps)


#: Seconds allowed for removing a new ``nfs://`` target after a failure.
NFS_REMOVE_TIMEOUT = 2.0


class _Created:
    """A local file this conversion created, and which file it is (device and inode,
    through a link that pointed nowhere: the file made): on failure it is removed only
    if its name still leads to that file - not to one someone else put there since."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(os.path.realpath(path))
        try:
            st = os.stat(self.path)
            self.identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            self.identity = None  # (not there: nothing to remove, nothing to mistake)

    def unlink(self) -> None:
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self.identity:
                self.path.unlink()


async def _remove(path: _Created | str | None, extra_files: list[_Created] | None = None) -> None:
    """Remove a target this conversion created; never raises, even when cancelled.

    A local file is unlinked at once; an ``nfs://`` target (given as its URI) needs a
    few calls to the server, which run shielded from cancellation for at most
    :data:`NFS_REMOVE_TIMEOUT` seconds: a server that stopped answering is not waited
    for (the file then stays, as it does when the server is gone).
    """
    if path is None:
        return
    if isinstance(path, str):
        from ..protocols.nfs import remove_nfs_file

        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(NFS_REMOVE_TIMEOUT),
            contextlib.suppress(TrioconvError),
        ):
            await remove_nfs_file(path)
        return
    path.unlink()
    for extra in extra_files or ():
        extra.unlink()
