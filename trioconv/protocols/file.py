"""The file transport: regular files and block devices on the local host.

Every request is one positioned system call (``preadv``/``pwritev``/``fallocate``/
``copy_file_range``) run in a worker thread, where the GIL is released while the kernel
works. Reads land directly in the caller's buffer: no per-request allocation, no extra
copy. The hand-off to the thread uses Trio's thread cache directly
(:func:`trio.lowlevel.start_thread_soon`), without what :func:`trio.to_thread.run_sync`
adds around it - a capacity limiter, a copied context, renaming the thread twice,
``trio.from_thread`` support - which a system call does not need and which made each
hand-off cost about twice the CPU time. The number of threads is bounded by the callers
(the copy engine has at most ``-m`` requests in flight).

Block status comes from ``SEEK_DATA``/``SEEK_HOLE``, so a sparse file is copied in time
proportional to its data. One query maps a whole window - up to :data:`STATUS_EXTENTS`
extents, one ``lseek`` each - in one worker-thread call, and the driver keeps that map to
answer the next queries without a system call; its own writes drop the map.

Zeroes are written with ``fallocate`` (punch hole when the range may be unmapped, zero
range otherwise) or ``BLKZEROOUT`` on a block device; when the filesystem cannot,
:class:`~trioconv.ZeroesNotSupported` tells the caller to write zero buffers instead.

With cache mode ``none`` or ``directsync`` the file is opened with ``O_DIRECT``. Aligned
requests into aligned buffers (the engine's buffers are page-aligned) go straight
through; a read of anything else - the unaligned tail of an image - is bounced through
an aligned buffer, and a write of part of a block (a format's metadata) goes through a
second, buffered descriptor of the file.

Storage that changes underneath is an error, not a quiet copy: a source truncated by
another process while it is read (its end found before the size it had when opened),
a target whose last name was removed while it was written (found when it is flushed),
and a block device to be written that the kernel holds - a mounted file system, an
LVM or RAID member - which is refused when it is opened (``O_EXCL``).
"""

from __future__ import annotations

import array
import bisect
import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import trio

if TYPE_CHECKING:
    import outcome

from .._cache import CacheMode
from .._errors import (
    ImageError,
    ImageInUse,
    TrioconvIOError,
    UnsupportedError,
    UsageError,
    ZeroesNotSupported,
)
from ..driver import Buffer, Caps, Driver, Extent, ExtentKind, Limits

__all__ = ["FileDriver", "create_file", "open_file"]

log = logging.getLogger("trioconv")

_T = TypeVar("_T")

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_BLKGETSIZE64 = 0x80081272
# Copy-on-write flag (btrfs) and extent size hint (XFS) of a new file.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_NOCOW_FL = 0x0080_0000
_FS_IOC_FSGETXATTR = 0x801C581F
_FS_IOC_FSSETXATTR = 0x401C5820
_FS_XFLAG_EXTSIZE = 0x800
_FSXATTR = struct.Struct("=IIIII8x")  # struct fsxattr
#: qemu's extent size hint for new image files (1 MiB).
_DEFAULT_EXTENT_HINT = 1 << 20
_BLKSSZGET = 0x1268
_BLKZEROOUT = 0x127F
_DIRECT_FILE_ALIGNMENT = 4096
_NOT_SUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY}
#: The largest file offset there is (off_t).
MAX_FILE_SIZE = 2**63 - 1
#: Most extents one block-status query maps (in one worker-thread call) and keeps.
STATUS_EXTENTS = 1024

# Loading by soname avoids ctypes.util.find_library, which runs helper programs.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_char_p]
_fstatfs.restype = ctypes.c_int
#: File systems whose buffered writes gain from blocks allocated ahead (see
#: _write_buffered): ext2/3/4 and XFS, local and with delayed allocation. Elsewhere an
#: allocation may cost a round trip (NFS 4.2, SMB) or buy nothing (tmpfs).
_ALLOCATE_AHEAD_FS = {0xEF53, 0x58465342}


def _allocates_ahead(fd: int) -> bool:
    """Whether the file system of ``fd`` is one that :func:`_write_buffered` allocates
    ahead on (its ``statfs`` type)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type first, 120 bytes
    if _fstatfs(fd, buf) != 0:
        return False
    return struct.unpack_from("@l", buf.raw)[0] in _ALLOCATE_AHEAD_FS


# -- image locks, as QEMU takes them ---------------------------------------------------
#
# QEMU marks an image in use with open file description locks on single bytes of it,
# all shared (read) locks: byte 100 + n while it holds permission n, byte 200 + n while
# it does not let others have permission n. Taking the same locks, trioconv and QEMU
# see each other: neither writes into an image the other is using, and neither reads
# one that a writer does not share - unless told to with -U (force share).
_PERMS = ("consistent read", "write", "write unchanged", "resize")
_PERM_READ, _PERM_WRITE, _PERM_WRITE_UNCHANGED, _PERM_RESIZE = 1, 2, 4, 8
_PERM_ALL = 15
_LOCK_PERM_BASE = 100
_LOCK_SHARED_BASE = 200
_FLOCK = "@hhqqi4x"  # struct flock: type, whence, start, len, pid (0 for OFD locks)


def _flock(fd: int, command: int, kind: int, offset: int) -> int:
    """One ``fcntl`` lock command on byte ``offset``; the lock type it reports."""
    arg = struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0)
    return int(struct.unpack(_FLOCK, fcntl.fcntl(fd, command, arg))[0])


def _open_perms(*, writable: bool, force_share: bool, share_writes: bool) -> tuple[int, int]:
    """The permissions an open holds and those it shares, as ``qemu-img convert`` takes
    them on the file under an image.

    A reader (qemu-img's sources) holds consistent read and shares everything but write
    and resize (all of it with ``force_share``). A writer of an image format with
    metadata (qcow2, vmdk, ...) also holds write and resize and shares the same: no one
    else may write under its tables. A writer of a raw image (``share_writes``) holds
    consistent read and write and shares everything, as QEMU's raw format passes its
    user's sharing down - so it is kept out only by someone who does not share write:
    a reader such as a qemu-img source, or a running VM's disk.
    """
    if not writable:
        return _PERM_READ, _PERM_ALL if force_share else _PERM_ALL & ~(_PERM_WRITE | _PERM_RESIZE)
    if share_writes:
        return _PERM_READ | _PERM_WRITE, _PERM_ALL
    return _PERM_READ | _PERM_WRITE | _PERM_RESIZE, _PERM_ALL & ~(_PERM_WRITE | _PERM_RESIZE)


#: Creating (truncating) an existing file: write and resize held, only resize not shared,
#: as QEMU's file protocol locks a file it creates.
_CREATE_PERMS = (_PERM_WRITE | _PERM_RESIZE, _PERM_ALL & ~_PERM_RESIZE)


def _lock_image(fd: int, path: str, perms: tuple[int, int], *, what: str) -> None:
    """Take QEMU's locks for the image open at ``fd``: ``perms`` is (held, shared).

    Filesystems without such locks (some network ones) are used without them, as
    QEMU's ``locking=auto``.

    Raises:
        ImageError: another process holds a permission we do not share, or does not
            share one we need.
    """
    perm, shared = perms
    try:
        for n in range(len(_PERMS)):
            if perm >> n & 1:
                _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _LOCK_PERM_BASE + n)
            if not shared >> n & 1:
                _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _LOCK_SHARED_BASE + n)
        conflict = ""
        for n, name in enumerate(_PERMS):
            if perm >> n & 1 and _held(fd, _LOCK_SHARED_BASE + n):
                conflict = f'Failed to get "{name}" lock'
                break
        else:
            for n, name in enumerate(_PERMS):
                if not shared >> n & 1 and _held(fd, _LOCK_PERM_BASE + n):
                    conflict = f'Failed to get shared "{name}" lock'
                    break
    except OSError as exc:
        if exc.errno in _NOT_SUPPORTED or exc.errno == errno.ENOLCK:
            return
        raise ImageError(f"Could not {what} '{path}': cannot lock it: {exc.strerror}") from exc
    if conflict:
        raise ImageInUse(
            # qemu-img's second line after a period, on this one: scripts look for it.
            f"Could not {what} '{path}': {conflict}. Is another process using the image [{path}]?"
        )


def _held(fd: int, offset: int) -> bool:
    """Whether another open file holds a lock on byte ``offset``."""
    return _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK


def _fallocate_or_raise(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _abort_failed(raise_cancel: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


async def _in_thread(fn: Callable[..., _T], *args: object) -> _T:
    """``fn(*args)`` in a worker thread; Trio's ``to_thread.run_sync`` without its extras.

    Cancellation is checked on entry; once the call runs it is waited for, as with
    ``to_thread.run_sync(abandon_on_cancel=False)``: a system call cannot be abandoned.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: outcome.Outcome[_T]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(functools.partial(fn, *args), deliver)
    result: _T = await trio.lowlevel.wait_task_rescheduled(_abort_failed)
    return result


def _buffer_address(buf: memoryview) -> int | None:
    """Address of a writable buffer's first byte, or None when it cannot be known."""
    if buf.readonly or not buf.nbytes:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _aligned_buffer(length: int) -> mmap.mmap:
    """A zeroed, page-aligned anonymous buffer (suitable for O_DIRECT)."""
    return mmap.mmap(-1, max(length, 1))


class _Shrank(Exception):
    """The file ends before the size it had when it was opened (see :func:`_read_full`)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def _check_not_shrunk(fd: int, size: int) -> None:
    """Raise :class:`_Shrank` when the file or device at ``fd`` is now smaller than
    ``size``."""
    st = os.fstat(fd)
    now = _device_size(fd) if stat.S_ISBLK(st.st_mode) else st.st_size
    if now < size:
        raise _Shrank(now)


def _device_size(fd: int) -> int:
    """A block device's size in bytes."""
    return int(struct.unpack("Q", fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8))[0])


def _loop_backed_by(rdev: int) -> str | None:
    """The loop device whose backing file is the block device ``rdev``, if any.

    A loop device holds its backing file open without claiming it, so the exclusive
    open cannot see it; its ``backing_file`` in sysfs names it. (A file system mounted
    from the loop device would be written under by writing its backing device.)
    """
    with contextlib.suppress(OSError):
        for entry in os.scandir("/sys/block"):
            if not entry.name.startswith("loop"):
                continue
            try:
                with open(f"/sys/block/{entry.name}/loop/backing_file") as f:
                    backing = f.read().strip()
                st = os.stat(backing)
            except OSError:
                continue  # (not attached, or its file is gone)
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                return f"/dev/{entry.name}"
    return None


def _read_full(fd: int, buf: memoryview, offset: int, size: int) -> None:
    """preadv until ``buf`` is full; bytes past end of file read as zeroes.

    ``size`` is the size the file had when it was opened. The end of the file before it
    means someone truncated the file since (or a device shrank): what it held there is
    gone, and zeroes in its place would be a silently wrong copy, so that is
    :class:`_Shrank`. At or past ``size`` the end is expected: a raw image whose size is
    not a multiple of 512 reads as zeroes up to the next multiple, as in QEMU.
    """
    while buf.nbytes:
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            if offset < size:
                _check_not_shrunk(fd, size)
            buf[:] = bytes(buf.nbytes)
            return
        buf = buf[n:]
        offset += n


def _write_full(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        n = os.pwritev(fd, [data], offset)
        data = data[n:]
        offset += n


#: Buffered writes that start on this boundary write their first page on its own.
_FOLIO_BOUNDARY = 64 * 1024
#: Buffered writes at least this long have their blocks allocated first.
_ALLOCATE_AHEAD = 64 * 1024


def _write_buffered(fd: int, data: memoryview, offset: int, allocate: bool) -> bool:
    """Write through the page cache; False when the file system cannot allocate ahead.

    Two things make a large write into a hole of a new file cheaper, both measured on
    the virtual machines this runs on (Linux 6.18, ext4):

    - Its blocks are allocated first, with one ``fallocate`` (mode 0, keeping the size:
      it never changes what a file reads, only which of its blocks are reserved). A
      write into a hole otherwise takes the file system's delayed-allocation path page
      by page; into blocks allocated ahead it only copies: 1 GiB in 2 MiB writes took
      0.117 s of CPU against 0.18 s, and a 2 GiB raw conversion about 10 % less wall
      time. Only ext4 and XFS are asked (``allocate``; see :func:`_allocates_ahead`):
      over NFS 4.2 or SMB an allocation is a round trip of its own, on tmpfs it buys
      nothing. One that refuses is not asked again; any other error is left to the
      write itself, which reports it properly.
    - The kernel gives a write into new page-cache pages folios as large as the write's
      length and alignment allow: a 2 MiB write at a 2 MiB boundary gets one 2 MiB
      folio. Copying into such fresh large folios ran at a quarter to a half of the
      speed of copying into the smaller ones a write gets that starts one page later
      (a 2 GiB raw copy: 1.0-1.8 s against 0.55-0.8 s, single runs up to 10 s).
      Writing the first page on its own makes every write start one page past the
      boundary; it costs one system call per request.
    """
    ahead = allocate and data.nbytes >= _ALLOCATE_AHEAD
    if ahead and _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, data.nbytes) != 0:
        allocate = ctypes.get_errno() not in _NOT_SUPPORTED
    page = mmap.PAGESIZE
    if offset % _FOLIO_BOUNDARY == 0 and data.nbytes > page:
        _write_full(fd, data[:page], offset)
        data, offset = data[page:], offset + page
    _write_full(fd, data, offset)
    return allocate


def _round_down(value: int, align: int) -> int:
    return value - value % align


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


class FileDriver(Driver):
    """An open local file or block device. Made by :func:`open_file`."""

    name = "file"

    def __init__(
        self,
        fd: int,
        path: str,
        *,
        writable: bool,
        cache: CacheMode,
        size: int,
        blockdev: bool,
        alignment: int,
    ) -> None:
        self._fd = fd
        self.location = path
        self._writable = writable
        self._cache = cache
        self._size = size
        self._blockdev = blockdev
        self._alignment = alignment
        self._zeroes_ok = True
        self._buffered_fd = -1  # for writes of part of a block under O_DIRECT
        # Buffered writes to one regular file are serialised by the kernel (the inode's
        # lock); several in flight only spin on that lock and burn a core that the
        # reads, the checks for zeroes and a network peer could use. One at a time, in
        # the order they ask (trio.Lock is fair, so in-order mode stays in order).
        self._write_lock = trio.Lock() if not (blockdev or cache.direct) else None
        # On ext4 and XFS, until the file system says it cannot.
        self._allocate_ahead = self._write_lock is not None and _allocates_ahead(fd)
        # Block status map: contiguous extents, their start offsets for bisect, and
        # what keeps it honest - writes in flight and a count of writes started.
        self._extents: list[Extent] = []
        self._starts: list[int] = []
        self._writing = 0
        self._generation = 0

    # -- contract ---------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def fd(self) -> int:
        """The open file descriptor (owned by the driver)."""
        return self._fd

    @property
    def is_block_device(self) -> bool:
        """True when this is a block device rather than a regular file."""
        return self._blockdev

    @property
    def limits(self) -> Limits:
        return Limits(request_alignment=self._alignment)

    @property
    def caps(self) -> Caps:
        return Caps(
            writable=self._writable,
            zeroes=self._zeroes_ok,
            block_status=not self._blockdev,
            zero_init=not self._blockdev,
            copy_range=not self._cache.direct,
        )

    def _os_error(self, what: str, offset: int, exc: OSError) -> TrioconvIOError:
        """``error while WHAT FILE at byte OFFSET: STRERROR``, keeping the errno."""
        return TrioconvIOError(
            f"error while {what} {self.location} at byte {offset}: {exc.strerror}",
            offset=offset,
            errno=exc.errno,
        )

    async def _run(self, what: str, offset: int, fn: Callable[..., _T], *args: object) -> _T:
        if self._fd < 0:
            raise TrioconvIOError(f"{self.location}: image is closed")
        try:
            return await _in_thread(fn, *args)
        except OSError as exc:
            raise self._os_error(what, offset, exc) from exc
        except _Shrank as exc:
            raise TrioconvIOError(
                f"error while {what} {self.location} at byte {offset}: the file shrank to "
                f"{exc.size} bytes while in use ({self._size} when opened)",
                offset=offset,
            ) from None
        except OverflowError:  # an offset past what a file offset can hold
            raise TrioconvIOError(
                f"error while {what} {self.location} at byte {offset}: File too large",
                offset=offset,
                errno=errno.EFBIG,
            ) from None

    def _is_direct_ok(self, offset: int, buf: memoryview) -> bool:
        if not self._cache.direct:
            return True
        a = self._alignment
        if offset % a or buf.nbytes % a:
            return False
        addr = _buffer_address(buf)
        return addr is not None and addr % a == 0

    async def preadinto(self, offset: int, buf: memoryview) -> None:
        buf = buf.cast("B") if buf.format != "B" else buf
        if self._is_direct_ok(offset, buf):
            await self._run("reading", offset, _read_full, self._fd, buf, offset, self._size)
            return
        a = self._alignment
        start = _round_down(offset, a)
        end = _round_up(offset + buf.nbytes, a)
        with _aligned_buffer(end - start) as bounce:
            view = memoryview(bounce)
            try:
                await self._run("reading", offset, _read_full, self._fd, view, start, self._size)
                buf[:] = view[offset - start : offset - start + buf.nbytes]
            finally:
                view.release()

    async def preadinto_many(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        """All the reads in one worker-thread hand-off (unless O_DIRECT needs bouncing)."""
        views = [(off, b.cast("B") if b.format != "B" else b) for off, b in requests]
        if not all(self._is_direct_ok(off, b) for off, b in views):
            await super().preadinto_many(views)
            return

        def read_all() -> None:
            for off, b in views:
                _read_full(self._fd, b, off, self._size)

        first = views[0][0] if views else 0
        await self._run("reading", first, read_all)

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Around every write: the block status map is dropped and not refilled meanwhile."""
        self._writing += 1
        self._generation += 1
        self._extents, self._starts = [], []
        try:
            yield
        finally:
            self._writing -= 1
            self._generation += 1

    async def pwrite(self, offset: int, data: Buffer) -> None:
        self._check_writable()
        with self._changing():
            await self._pwrite(offset, data)

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        if self._write_lock is not None:
            async with self._write_lock:
                self._allocate_ahead = await self._run(
                    "writing", offset, _write_buffered, self._fd, view, offset, self._allocate_ahead
                )
            return
        if self._is_direct_ok(offset, view):
            await self._run("writing", offset, _write_full, self._fd, view, offset)
            return
        if not self._cache.direct or (
            offset % self._alignment == 0 and view.nbytes % self._alignment == 0
        ):
            # Aligned request in an unaligned buffer: bounce without reading.
            if self._cache.direct:
                with _aligned_buffer(view.nbytes) as bounce:
                    bview = memoryview(bounce)
                    try:
                        bview[:] = view
                        await self._run("writing", offset, _write_full, self._fd, bview, offset)
                    finally:
                        bview.release()
            else:
                await self._run("writing", offset, _write_full, self._fd, view, offset)
            return
        await self._write_partial(offset, view)

    async def _write_partial(self, offset: int, view: memoryview) -> None:
        """A write that does not cover whole blocks of an ``O_DIRECT`` file (a format's
        metadata: a 512-byte table entry, a header): it goes through a second, buffered
        descriptor of the same file, opened on first need.

        Direct I/O cannot write part of a block; reading the covering blocks, patching
        and writing them back would race with a direct write to another part of the same
        block, and would extend the file past its end when the write is the last bytes.
        The page cache writes part of a block safely, and the kernel keeps buffered and
        direct I/O of one file coherent (a direct read or write first writes back and
        drops the cached pages of its range); ``flush`` syncs the file, both ways in.
        """
        if self._buffered_fd < 0:
            # Through /proc: the same file even if its name has changed since. (Opened
            # here, with no checkpoint, so two first writes do not both open one.)
            flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_DSYNC if self._cache.dsync else 0)
            try:
                self._buffered_fd = os.open(f"/proc/self/fd/{self._fd}", flags)
            except OSError as exc:
                raise self._os_error("writing", offset, exc) from exc
        await self._run("writing", offset, _write_full, self._buffered_fd, view, offset)

    def _check_writable(self) -> None:
        if not self._writable:
            raise UnsupportedError(f"{self.location}: opened read-only")

    async def pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
    ) -> None:
        self._check_writable()
        if not self._zeroes_ok:
            raise ZeroesNotSupported(f"{self.location}: write zeroes not supported")
        if fast and (self._blockdev or not may_unmap):
            # BLKZEROOUT and ZERO_RANGE may write zeroes; only punching holes is surely cheap.
            raise ZeroesNotSupported(f"{self.location}: no fast zeroing")
        try:
            with self._changing():
                await _in_thread(self._zero_sync, offset, length, may_unmap)
        except OSError as exc:
            if exc.errno in _NOT_SUPPORTED:
                self._zeroes_ok = False
                raise ZeroesNotSupported(str(exc)) from exc
            raise self._os_error("zeroing", offset, exc) from exc

    def _zero_sync(self, offset: int, length: int, may_unmap: bool) -> None:
        if self._blockdev:
            fcntl.ioctl(self._fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        if may_unmap:
            try:
                _fallocate_or_raise(
                    self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length
                )
                return
            except OSError as exc:
                if exc.errno not in _NOT_SUPPORTED:
                    raise
        _fallocate_or_raise(self._fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length)

    async def block_status(self, offset: int, length: int) -> Extent:
        if self._fd < 0:
            raise TrioconvIOError(f"{self.location}: image is closed")
        if self._blockdev:
            return Extent(offset, min(length, self._size - offset), ExtentKind.DATA)
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0 and offset < (ext := self._extents[i]).end:
            return ext if ext.offset == offset else Extent(offset, ext.end - offset, ext.kind)
        generation = self._generation
        extents = await self._run("querying", offset, self._map_status, offset, length)
        if generation == self._generation and not self._writing:
            self._extents, self._starts = extents, [e.offset for e in extents]
        return extents[0]

    def _map_status(self, offset: int, length: int) -> list[Extent]:
        """Extents from ``offset`` on, at least ``length`` bytes, at most STATUS_EXTENTS.

        Holes and data alternate, so each ``lseek`` ends one extent: ``SEEK_DATA`` from
        the start of a hole finds its end, ``SEEK_HOLE`` from the start of data finds
        its end.
        """
        end = self._size
        stop = min(end, offset + max(length, 1))
        out: list[Extent] = []
        pos = offset
        while pos < stop and len(out) < STATUS_EXTENTS:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole up to end of file
                    # ... or the file was truncated below its size at open (_read_full).
                    _check_not_shrunk(self._fd, end)
                    out.append(Extent(pos, end - pos, ExtentKind.ZERO))
                    break
                if out:
                    break  # asked again, and answered, by the next query
                if exc.errno in _NOT_SUPPORTED:
                    return [Extent(pos, min(length, end - pos), ExtentKind.DATA)]
                raise
            if data > pos:
                out.append(Extent(pos, min(data, end) - pos, ExtentKind.ZERO))
                pos = data
                if pos >= stop or len(out) >= STATUS_EXTENTS:
                    break
            hole = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
            if hole > pos:  # else the data went away between the two calls: ask again
                out.append(Extent(pos, hole - pos, ExtentKind.DATA))
                pos = hole
        return out

    async def copy_range(
        self, source: FileDriver, src_offset: int, offset: int, length: int
    ) -> None:
        """Copy ``length`` bytes from ``source`` at ``src_offset`` to ``offset`` in the kernel.

        Raises:
            UnsupportedError: the kernel or filesystem cannot; read and write instead.
        """
        self._check_writable()

        def copy() -> None:
            src_pos, dst_pos, left = src_offset, offset, length
            while left:
                n = os.copy_file_range(source.fd, self._fd, left, src_pos, dst_pos)
                if n == 0:
                    raise OSError(errno.EIO, "unexpected end of file in copy_file_range")
                src_pos += n
                dst_pos += n
                left -= n

        try:
            with self._changing():
                await _in_thread(copy)
        except OSError as exc:
            if exc.errno in _NOT_SUPPORTED or exc.errno == errno.EXDEV:
                raise UnsupportedError(f"copy offload not possible: {exc.strerror}") from exc
            raise self._os_error("copying to", offset, exc) from exc

    async def flush(self) -> None:
        """Make the writes stable (unless the cache mode says not to), and make sure
        they went somewhere: a file whose last name was removed meanwhile (its
        directory deleted under a running conversion, say) is written to the end
        without a single error and then freed with everything written into it, so
        that is an error here rather than a conversion reported as done."""
        if not self._writable:
            return
        if not self._blockdev:
            st = await self._run("flushing", 0, os.fstat, self._fd)
            if st.st_nlink == 0:
                raise TrioconvIOError(
                    f"error while flushing {self.location}: the file was removed while "
                    "being written, and what was written is lost with it",
                    errno=errno.ENOENT,
                )
        if self._cache.flush and not self._cache.dsync:
            await self._run("flushing", 0, os.fdatasync, self._fd)

    async def aclose(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        buffered, self._buffered_fd = self._buffered_fd, -1
        if buffered >= 0:
            os.close(buffered)


def _open_flags(writable: bool, cache: CacheMode) -> int:
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    if cache.direct:
        flags |= os.O_DIRECT
    if cache.dsync and writable:
        flags |= os.O_DSYNC
    return flags


def _describe_open_error(path: str, exc: OSError, cache: CacheMode) -> ImageError:
    if exc.errno == errno.EINVAL and cache.direct:
        return ImageError(
            f"Could not open '{path}': the filesystem does not support O_DIRECT "
            f"(cache mode '{cache.value}'); use another cache mode"
        )
    return ImageError(f"Could not open '{path}': {exc.strerror}")


def _check_seekable(path: str, st: os.stat_result) -> None:
    """Refuse what is neither a regular file nor a device, as QEMU's ``file`` driver does.

    Raises:
        ImageError: ``'file' driver requires 'PATH' to be a regular file``.
    """
    mode = st.st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode) or stat.S_ISCHR(mode) or stat.S_ISDIR(mode)):
        raise ImageError(
            f"Could not open '{path}': 'file' driver requires '{path}' to be a regular file"
        )


def _open_sync(
    path: str,
    writable: bool,
    cache: CacheMode,
    force_share: bool,
    locking: bool,
    share_writes: bool,
) -> FileDriver:
    # A pipe, FIFO or socket has no size and no offsets: read, it would be an empty
    # disk (``cat disk.img | convert /dev/stdin`` making a 0-byte image that exits 0).
    # Looked at before opening, since opening a FIFO waits for a writer.
    before: os.stat_result | None = None
    with contextlib.suppress(OSError):
        before = os.stat(path)
        _check_seekable(path, before)
    flags = _open_flags(writable, cache)
    # A block device is written only if no one holds it exclusively: not while a file
    # system on it is mounted, nor while it is part of an LVM volume, a RAID array or a
    # swap area (the kernel's exclusive open; qemu-img 7.2 would write over them).
    # Other programs' plain opens do not conflict; file.locking=off skips this too.
    exclusive = writable and locking and before is not None and stat.S_ISBLK(before.st_mode)
    if exclusive and before is not None and (loop := _loop_backed_by(before.st_rdev)):
        raise ImageInUse(
            f"Could not open '{path}': the device is in use (it backs loop device {loop})"
        )
    try:
        fd = os.open(path, flags | (os.O_EXCL if exclusive else 0))
    except OSError as exc:
        if exclusive and exc.errno == errno.EBUSY:
            raise ImageInUse(
                f"Could not open '{path}': the device is in use (a mounted file system, "
                "or held by the kernel: LVM, RAID, swap)"
            ) from exc
        raise _describe_open_error(path, exc, cache) from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"Could not open '{path}': Is a directory")
        _check_seekable(path, st)
        if locking and (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            perms = _open_perms(
                writable=writable, force_share=force_share, share_writes=share_writes
            )
            _lock_image(fd, path, perms, what="open")
        blockdev = stat.S_ISBLK(st.st_mode)
        if blockdev:
            size = struct.unpack("Q", fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8))[0]
            sector = struct.unpack("i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0]
            alignment = sector if cache.direct else 1
        else:
            size = st.st_size
            alignment = _DIRECT_FILE_ALIGNMENT if cache.direct else 1
    except BaseException:
        os.close(fd)
        raise
    return FileDriver(
        fd, path, writable=writable, cache=cache, size=size, blockdev=blockdev, alignment=alignment
    )


def _check_name(path: str | os.PathLike[str]) -> None:
    """Refuse a name with a NUL byte (from block options, or from inside an image) in
    one line: the system cannot take it, and ``os`` would raise ValueError."""
    text = os.fspath(path)
    if "\0" in text:
        shown = text.replace("\0", "\\0")
        raise ImageError(f"Could not open '{shown}': the file name holds a NUL byte")


async def open_file(
    path: str | os.PathLike[str],
    *,
    writable: bool = False,
    cache: CacheMode = CacheMode.WRITEBACK,
    force_share: bool = False,
    locking: bool = True,
    share_writes: bool = False,
) -> FileDriver:
    """Open a local file or block device, locked the way QEMU locks images it uses.

    Args:
        force_share: read it even while another process writes it (``-U``; read-only
            opens only), as QEMU's ``force-share``.
        locking: False takes no locks and checks none (QEMU's ``file.locking=off``),
            and opens a block device for writing even while it is mounted or held by
            the kernel (without ``O_EXCL``).
        share_writes: a writable open for a raw image, which lets others write too,
            as QEMU's raw format does (see :func:`_open_perms`).

    Raises:
        ImageError: it does not exist, cannot be opened, is in use by another process
            (QEMU, or trioconv) that does not share it, is a block device to be written
            that is mounted or held by the kernel, or its filesystem refuses the
            requested cache mode.
    """
    if force_share and writable:
        raise UsageError("force-share=on can only be used with read-only images")
    _check_name(path)
    return await trio.to_thread.run_sync(
        _open_sync, os.fspath(path), writable, cache, force_share, locking, share_writes
    )


def _file_hints(fd: int, nocow: bool, extent_size_hint: int | None) -> None:
    """Set a new, empty file's copy-on-write flag and extent size hint, as QEMU's file
    protocol does when it creates one; a filesystem without them is no error."""
    if nocow:
        flags = array.array("i", [0])
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
            flags[0] |= _FS_NOCOW_FL
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags)
    hint = _DEFAULT_EXTENT_HINT if extent_size_hint is None else extent_size_hint
    if not hint:
        return
    try:
        raw = bytearray(_FSXATTR.size)
        fcntl.ioctl(fd, _FS_IOC_FSGETXATTR, raw, True)
        xflags, _, nextents, projid, cowextsize = _FSXATTR.unpack_from(raw)
        attr = _FSXATTR.pack(xflags | _FS_XFLAG_EXTSIZE, hint, nextents, projid, cowextsize)
        fcntl.ioctl(fd, _FS_IOC_FSSETXATTR, attr)
    except OSError as exc:
        if extent_size_hint is not None:
            log.warning("Failed to set extent size hint: %s", exc.strerror)


def _create_sync(
    path: str,
    size: int,
    preallocation: str,
    nocow: bool = False,
    extent_size_hint: int | None = None,
) -> bool:
    """Create or truncate ``path`` to ``size``; return True when it is a regular file."""
    if size > MAX_FILE_SIZE:
        raise ImageError(f"Could not create '{path}': File too large")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ImageError(f"Could not create '{path}': {exc.strerror}") from exc
    if st is not None and stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dev_size = struct.unpack("Q", fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8))[0]
        finally:
            os.close(fd)
        if dev_size < size:
            raise ImageError(f"Could not create '{path}': the device is smaller than the image")
        return False
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise ImageError(f"Could not create '{path}': Is a directory")
    try:
        # Not O_TRUNC: an image another process uses must stay as it is.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ImageError(f"Could not create '{path}': {exc.strerror}") from exc
    try:
        if st is not None and stat.S_ISREG(st.st_mode):
            _lock_image(fd, path, _CREATE_PERMS, what="create")
            os.ftruncate(fd, 0)
    except OSError as exc:
        os.close(fd)
        raise ImageError(f"Could not create '{path}': {exc.strerror}") from exc
    except BaseException:
        os.close(fd)
        raise
    if st is None or stat.S_ISREG(st.st_mode):
        _file_hints(fd, nocow, extent_size_hint)
    try:
        os.ftruncate(fd, size)
        if preallocation == "falloc" and size:
            os.posix_fallocate(fd, 0, size)
        elif preallocation == "full" and size:
            chunk = bytes(min(size, 8 * 1024 * 1024))
            pos = 0
            while pos < size:
                n = min(len(chunk), size - pos)
                pos += os.pwrite(fd, memoryview(chunk)[:n], pos)
    except OSError as exc:
        os.close(fd)
        if st is None:
            # Only what this call made goes: a file, device or link that was there
            # stays (emptied, for a regular file, as qemu-img leaves it). Through a
            # link that pointed nowhere, what was made is the file it points at.
            Path(os.path.realpath(path)).unlink(missing_ok=True)
        raise ImageError(f"Could not create '{path}': {exc.strerror}") from exc
    os.close(fd)
    return st is None


async def create_file(
    path: str | os.PathLike[str],
    size: int,
    *,
    preallocation: str = "off",
    nocow: bool = False,
    extent_size_hint: int | None = None,
) -> bool:
    """Create (or truncate) a file of ``size`` bytes, as ``qemu-img create -f raw`` does.

    Args:
        preallocation: ``off`` (sparse), ``falloc`` (reserve blocks) or ``full`` (write
            zeroes).
        nocow: turn off copy-on-write for the file (btrfs; elsewhere nothing happens).
        extent_size_hint: the filesystem's extent size hint for the file (XFS); None
            is qemu's default of 1 MiB, which a filesystem without hints ignores
            silently; a hint asked for explicitly that cannot be set is a warning.

    Returns:
        True when a new regular file was created (and may be removed again on failure);
        False when an existing file was truncated or an existing block device was only
        checked for size.

    Raises:
        ImageError: the file cannot be created.
    """
    _check_name(path)
    return await trio.to_thread.run_sync(
        _create_sync, os.fspath(path), size, preallocation, nocow, extent_size_hint
    )
