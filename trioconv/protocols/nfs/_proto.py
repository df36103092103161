"""The NFSv3 procedures trioconv needs, and their helpers, sans I/O (RFC 1813, RFC 1833).

Three RPC programs are involved in opening ``nfs://host/export/dir/file``:

1. the **portmapper** (program 100000 v2, port 111): ``GETPORT`` says which TCP port
   MOUNT and NFS listen on;
2. **MOUNT** v3 (program 100005): ``MNT`` of the export path returns the export's root
   *file handle* (an opaque token of up to 64 bytes) - ``UMNT`` drops the server's
   advisory mount-list entry again; NFSv3 handles do not depend on it;
3. **NFS** v3 (program 100003, usually port 2049): ``LOOKUP`` walks from the root handle
   to the file, one name at a time; ``GETATTR`` gives its size; ``FSINFO`` the largest
   and preferred READ/WRITE sizes; ``ACCESS`` whether our credential may read or write;
   ``READ``/``WRITE``/``COMMIT`` move data; ``CREATE``, ``SETATTR`` (size) and
   ``REMOVE`` make, truncate and delete files.

Writes go ``UNSTABLE`` (the server may keep them in memory) and are made durable by
``COMMIT``. Each WRITE and COMMIT reply carries the server's *write verifier*, which
changes when the server restarts: data written under an old verifier may be lost and
must be written again. :class:`WriteBackLog` does that bookkeeping without I/O.

For each procedure there is an ``encode_*`` function giving its XDR arguments and a
``decode_*`` function reading its results from an :class:`~._xdr.Unpacker`; a status
other than ``NFS3_OK`` raises :class:`NFSStatusError` with readable text.
"""

from __future__ import annotations

import enum
import itertools
import struct
from typing import NamedTuple

import attrs

from ._xdr import Packer, Unpacker, XDRError, pad

__all__ = [
    "FileAttr",
    "FSInfo",
    "MountError",
    "NFSStatusError",
    "ReadHead",
    "ReadResult",
    "Stable",
    "WriteBackLog",
    "WriteResult",
]

PMAP_PROG, PMAP_VERS, PMAPPROC_GETPORT = 100000, 2, 3
MOUNT_PROG, MOUNT_VERS, MOUNTPROC_MNT, MOUNTPROC_UMNT = 100005, 3, 1, 3
NFS_PROG, NFS_VERS = 100003, 3
IPPROTO_TCP = 6
PMAP_PORT = 111

FHSIZE3 = 64
MNTPATHLEN = 1024
NFS3_WRITEVERFSIZE = 8
NFS3_CREATEVERFSIZE = 8


class Proc(enum.IntEnum):
    """NFSv3 procedure numbers."""

    NULL = 0  # does nothing: shows the server answers
    GETATTR = 1
    SETATTR = 2
    LOOKUP = 3
    ACCESS = 4
    READLINK = 5
    READ = 6
    WRITE = 7
    CREATE = 8
    REMOVE = 12
    FSINFO = 19
    COMMIT = 21


class Stable(enum.IntEnum):
    """``stable_how``: how durable a WRITE must be before the server replies."""

    UNSTABLE = 0
    DATA_SYNC = 1
    FILE_SYNC = 2


class CreateMode(enum.IntEnum):
    """``createmode3``: UNCHECKED replaces silently, GUARDED fails if the name exists."""

    UNCHECKED = 0
    GUARDED = 1
    EXCLUSIVE = 2


class FileType(enum.IntEnum):
    REG = 1
    DIR = 2
    BLK = 3
    CHR = 4
    LNK = 5
    SOCK = 6
    FIFO = 7


# ACCESS3 bits.
ACCESS_READ = 0x01
ACCESS_LOOKUP = 0x02
ACCESS_MODIFY = 0x04
ACCESS_EXTEND = 0x08

NFS3_OK = 0
NFS3ERR_NOENT = 2
NFS3ERR_ACCES = 13
NFS3ERR_EXIST = 17
NFS3ERR_JUKEBOX = 10008

#: ``nfsstat3`` (and ``mountstat3``, which shares the numbers): name and meaning.
STATUS_TEXT: dict[int, tuple[str, str]] = {
    1: ("NFS3ERR_PERM", "Operation not permitted"),
    2: ("NFS3ERR_NOENT", "No such file or directory"),
    5: ("NFS3ERR_IO", "Input/output error"),
    6: ("NFS3ERR_NXIO", "No such device or address"),
    13: ("NFS3ERR_ACCES", "Permission denied"),
    17: ("NFS3ERR_EXIST", "File exists"),
    18: ("NFS3ERR_XDEV", "Invalid cross-device link"),
    19: ("NFS3ERR_NODEV", "No such device"),
    20: ("NFS3ERR_NOTDIR", "Not a directory"),
    21: ("NFS3ERR_ISDIR", "Is a directory"),
    22: ("NFS3ERR_INVAL", "Invalid argument"),
    27: ("NFS3ERR_FBIG", "File too large"),
    28: ("NFS3ERR_NOSPC", "No space left on device"),
    30: ("NFS3ERR_ROFS", "Read-only file system"),
    31: ("NFS3ERR_MLINK", "Too many links"),
    63: ("NFS3ERR_NAMETOOLONG", "File name too long"),
    66: ("NFS3ERR_NOTEMPTY", "Directory not empty"),
    69: ("NFS3ERR_DQUOT", "Disk quota exceeded"),
    70: ("NFS3ERR_STALE", "Stale file handle"),
    71: ("NFS3ERR_REMOTE", "Too many levels of remote in path"),
    10001: ("NFS3ERR_BADHANDLE", "Illegal NFS file handle"),
    10002: ("NFS3ERR_NOT_SYNC", "Update synchronization mismatch"),
    10003: ("NFS3ERR_BAD_COOKIE", "Stale directory cookie"),
    10004: ("NFS3ERR_NOTSUPP", "Operation not supported"),
    10005: ("NFS3ERR_TOOSMALL", "Buffer or request is too small"),
    10006: ("NFS3ERR_SERVERFAULT", "Server fault"),
    10007: ("NFS3ERR_BADTYPE", "Object type not supported by the server"),
    10008: ("NFS3ERR_JUKEBOX", "Server busy, try again later"),
}

#: errno values matching ``nfsstat3`` codes on Linux (the RFC took them from Unix).
STATUS_ERRNO = {1: 1, 2: 2, 5: 5, 6: 6, 13: 13, 17: 17, 18: 18, 19: 19, 20: 20, 21: 21}
STATUS_ERRNO |= {22: 22, 27: 27, 28: 28, 30: 30, 31: 31, 63: 36, 66: 39, 69: 122, 70: 116}
STATUS_ERRNO |= {10004: 95}


def status_text(status: int, *, mount: bool = False) -> str:
    """``Permission denied (NFS3ERR_ACCES)``; MOUNT statuses are named ``MNT3ERR_*``."""
    name, text = STATUS_TEXT.get(status, (f"status {status}", "NFS error"))
    if mount:
        name = name.replace("NFS3ERR_", "MNT3ERR_")
    return f"{text} ({name})"


class NFSStatusError(Exception):
    """A procedure failed with an ``nfsstat3`` other than ``NFS3_OK``."""

    def __init__(self, status: int, proc: str) -> None:
        super().__init__(status_text(status))
        self.status = status
        self.proc = proc

    @property
    def errno(self) -> int | None:
        return STATUS_ERRNO.get(self.status)


class MountError(NFSStatusError):
    """MNT failed with a ``mountstat3``."""

    def __init__(self, status: int, path: str) -> None:
        Exception.__init__(self, status_text(status, mount=True))
        self.status = status
        self.proc = "MNT"
        self.path = path


# -- PORTMAP and MOUNT ---------------------------------------------------------------------


def encode_getport(prog: int, vers: int, prot: int = IPPROTO_TCP) -> bytes:
    """``PMAPPROC_GETPORT`` of a ``mapping``: prog, vers, prot, port (ignored)."""
    p = Packer()
    for value in (prog, vers, prot, 0):
        p.pack_uint(value)
    return p.get_buffer()


def decode_getport(u: Unpacker) -> int:
    """The port, 0 when the program is not registered."""
    port = u.unpack_uint()
    if port > 0xFFFF:
        raise XDRError(f"port {port} out of range")
    return port


def encode_dirpath(path: str) -> bytes:
    """MNT and UMNT arguments: ``dirpath<MNTPATHLEN>``."""
    p = Packer()
    p.pack_string(path, MNTPATHLEN)
    return p.get_buffer()


def decode_mnt(u: Unpacker, path: str) -> bytes:
    """The export's root file handle (``mountres3``), or :class:`MountError`."""
    status = u.unpack_uint()
    if status != NFS3_OK:
        raise MountError(status, path)
    fh = u.unpack_opaque(FHSIZE3)
    u.unpack_array(u.unpack_uint, 64)  # auth flavours the export accepts
    return fh


# -- NFS v3 structures ---------------------------------------------------------------------


@attrs.frozen
class FileAttr:
    """The parts of ``fattr3`` trioconv uses."""

    type: int
    mode: int
    uid: int
    gid: int
    size: int
    used: int
    fileid: int


def _fattr3(u: Unpacker) -> FileAttr:
    ftype, mode, _nlink, uid, gid = (u.unpack_uint() for _ in range(5))
    size, used = u.unpack_uhyper(), u.unpack_uhyper()
    u.unpack_uint(), u.unpack_uint()  # rdev
    u.unpack_uhyper()  # fsid
    fileid = u.unpack_uhyper()
    for _ in range(6):  # atime, mtime, ctime
        u.unpack_uint()
    return FileAttr(ftype, mode, uid, gid, size, used, fileid)


def _post_op_attr(u: Unpacker) -> FileAttr | None:
    return _fattr3(u) if u.unpack_bool() else None


def _wcc_data(u: Unpacker) -> FileAttr | None:
    if u.unpack_bool():  # pre_op_attr: size, mtime, ctime
        u.unpack_fopaque_view(24)
    return _post_op_attr(u)


def _pack_fh(p: Packer, fh: bytes) -> None:
    p.pack_opaque(fh, FHSIZE3)


def _pack_sattr3(p: Packer, *, mode: int | None = None, size: int | None = None) -> None:
    """``sattr3`` setting only ``mode`` and/or ``size``; uid, gid and times unchanged."""
    p.pack_bool(mode is not None)
    if mode is not None:
        p.pack_uint(mode)
    p.pack_bool(False)  # uid
    p.pack_bool(False)  # gid
    p.pack_bool(size is not None)
    if size is not None:
        p.pack_uhyper(size)
    p.pack_uint(0)  # atime: DONT_CHANGE
    p.pack_uint(0)  # mtime: DONT_CHANGE


def encode_fh(fh: bytes) -> bytes:
    """Arguments that are only a file handle: GETATTR, FSINFO."""
    p = Packer()
    _pack_fh(p, fh)
    return p.get_buffer()


def encode_diropargs(dir_fh: bytes, name: str) -> bytes:
    """LOOKUP and REMOVE: a directory handle and a name in it."""
    p = Packer()
    _pack_fh(p, dir_fh)
    p.pack_string(name)
    return p.get_buffer()


def decode_getattr(u: Unpacker) -> FileAttr:
    status = u.unpack_uint()
    if status != NFS3_OK:
        raise NFSStatusError(status, "GETATTR")
    return _fattr3(u)


def decode_lookup(u: Unpacker) -> tuple[bytes, FileAttr | None]:
    """The object's handle and (when sent) attributes."""
    status = u.unpack_uint()
    if status != NFS3_OK:
        raise NFSStatusError(status, "LOOKUP")
    fh = u.unpack_opaque(FHSIZE3)
    attr = _post_op_attr(u)
    _post_op_attr(u)  # directory
    return fh, attr


def decode_readlink(u: Unpacker) -> str:
    """The path a symbolic link holds."""
    status = u.unpack_uint()
    _post_op_attr(u)
    if status != NFS3_OK:
        raise NFSStatusError(status, "READLINK")
    return u.unpack_string(MNTPATHLEN)


def encode_access(fh: bytes, access: int) -> bytes:
    p = Packer()
    _pack_fh(p, fh)
    p.pack_uint(access)
    return p.get_buffer()


def decode_access(u: Unpacker) -> int:
    """The access bits granted."""
    status = u.unpack_uint()
    if status != NFS3_OK:
        raise NFSStatusError(status, "ACCESS")
    _post_op_attr(u)
    return u.unpack_uint()


@attrs.frozen
class FSInfo:
    """``FSINFO``: READ and WRITE sizes (max, preferred, multiple) and the largest file."""

    rtmax: int
    rtpref: int
    rtmult: int
    wtmax: int
    wtpref: int
    wtmult: int
    maxfilesize: int


def decode_fsinfo(u: Unpacker) -> FSInfo:
    status = u.unpack_uint()
    if status != NFS3_OK:
        raise NFSStatusError(status, "FSINFO")
    _post_op_attr(u)
    rtmax, rtpref, rtmult, wtmax, wtpref, wtmult, _dtpref = (u.unpack_uint() for _ in range(7))
    maxfilesize = u.unpack_uhyper()
    u.unpack_uint(), u.unpack_uint()  # time_delta
    u.unpack_uint()  # properties
    return FSInfo(rtmax, rtpref, rtmult, wtmax, wtpref, wtmult, maxfilesize)


_READ_ARGS = struct.Struct(">QI")


def encode_read(fh: bytes, offset: int, count: int) -> bytes:
    if len(fh) > FHSIZE3:
        raise XDRError(f"opaque of {len(fh)} bytes exceeds its maximum {FHSIZE3}")
    try:
        tail = _READ_ARGS.pack(offset, count)
    except struct.error:
        raise XDRError(f"READ of {count} bytes at {offset} out of range") from None
    return b"".join((len(fh).to_bytes(4, "big"), fh, pad(len(fh)), tail))


@attrs.frozen
class ReadResult:
    """``READ``: the bytes returned (a view of the reply) and whether they reach EOF."""

    data: memoryview
    eof: bool


def decode_read(u: Unpacker, count: int) -> ReadResult:
    """Read results; refuses more data than the ``count`` that was asked for."""
    status = u.unpack_uint()
    if status != NFS3_OK:
        raise NFSStatusError(status, "READ")
    _post_op_attr(u)
    n = u.unpack_uint()
    eof = u.unpack_bool()
    data = u.unpack_opaque_view(count)
    if data.nbytes != n:
        raise XDRError(f"READ reply says {n} bytes but carries {data.nbytes}")
    return ReadResult(data, eof)


_READ_OK_HEAD = struct.Struct(">II")
_READ_COUNTS = struct.Struct(">III")
#: ``fattr3`` is fixed-size: 84 bytes.
_FATTR3_SIZE = 84


def read_head(message: bytes | bytearray | memoryview, pos: int, count: int) -> ReadHead | None:
    """The start of successful ``READ`` results at ``message[pos:]``, for receiving the
    data elsewhere: where the data starts, its length, and ``eof``.

    ``message`` may be just the beginning of a reply. None when the results are not
    (yet) known to be a well-formed success returning at most ``count`` bytes - too
    short, an error status, or anything odd: :func:`decode_read` then says what it is.
    """
    if len(message) < pos + 8:
        return None
    status, follows = _READ_OK_HEAD.unpack_from(message, pos)
    if status != NFS3_OK or follows > 1:
        return None
    pos += 8 + (_FATTR3_SIZE if follows else 0)
    if len(message) < pos + 12:
        return None
    n, eof, length = _READ_COUNTS.unpack_from(message, pos)
    if n != length or length > count or eof > 1:
        return None
    return ReadHead(pos + 12, length, eof == 1)


class ReadHead(NamedTuple):
    """Where a READ reply's data starts in the message, how long it is, and ``eof``."""

    start: int
    length: int
    eof: bool


def encode_write_head(fh: bytes, offset: int, count: int, stable: Stable) -> bytes:
    """``WRITE`` arguments up to the data: send the data and ``pad(count)`` after this."""
    p = Packer()
    _pack_fh(p, fh)
    p.pack_uhyper(offset)
    p.pack_uint(count)
    p.pack_uint(stable)
    p.pack_uint(count)  # opaque data<> length
    return p.get_buffer()


@attrs.frozen
class WriteResult:
    """``WRITE``: bytes written, how durably, and the server's write verifier."""

    count: int
    committed: Stable
    verf: bytes


def decode_write(u: Unpacker) -> WriteResult:
    status = u.unpack_uint()
    if status != NFS3_OK:
        raise NFSStatusError(status, "WRITE")
    _wcc_data(u)
    count = u.unpack_uint()
    committed = u.unpack_uint()
    if committed > Stable.FILE_SYNC:
        raise XDRError(f"invalid stable_how {committed}")
    return WriteResult(count, Stable(committed), u.unpack_fopaque(NFS3_WRITEVERFSIZE))


def encode_commit(fh: bytes, offset: int = 0, count: int = 0) -> bytes:
    """``COMMIT`` of ``count`` bytes at ``offset``; 0 and 0 commit the whole file."""
    p = Packer()
    _pack_fh(p, fh)
    p.pack_uhyper(offset)
    p.pack_uint(count)
    return p.get_buffer()


def decode_commit(u: Unpacker) -> bytes:
    """The write verifier the committed data was written under."""
    status = u.unpack_uint()
    if status != NFS3_OK:
        raise NFSStatusError(status, "COMMIT")
    _wcc_data(u)
    return u.unpack_fopaque(NFS3_WRITEVERFSIZE)


def encode_create(dir_fh: bytes, name: str, mode: CreateMode, perms: int = 0o644) -> bytes:
    """``CREATE`` a regular file (UNCHECKED or GUARDED) with ``perms`` and size 0."""
    if mode is CreateMode.EXCLUSIVE:
        raise ValueError("EXCLUSIVE creation is not used")
    p = Packer()
    _pack_fh(p, dir_fh)
    p.pack_string(name)
    p.pack_uint(mode)
    _pack_sattr3(p, mode=perms, size=0)
    return p.get_buffer()


def decode_create(u: Unpacker) -> bytes | None:
    """The new file's handle, or None when the server did not send it (LOOKUP it)."""
    status = u.unpack_uint()
    if status != NFS3_OK:
        raise NFSStatusError(status, "CREATE")
    fh = u.unpack_opaque(FHSIZE3) if u.unpack_bool() else None
    _post_op_attr(u)
    _wcc_data(u)
    return fh


def encode_setattr_size(fh: bytes, size: int) -> bytes:
    """``SETATTR`` of the size only, unguarded."""
    p = Packer()
    _pack_fh(p, fh)
    _pack_sattr3(p, size=size)
    p.pack_bool(False)  # sattrguard3: no ctime check
    return p.get_buffer()


def decode_wcc_status(u: Unpacker, proc: str) -> None:
    """SETATTR and REMOVE: a status, then ``wcc_data``."""
    status = u.unpack_uint()
    if status != NFS3_OK:
        raise NFSStatusError(status, proc)


# -- unstable writes -----------------------------------------------------------------------


@attrs.define(eq=False)
class Dirty:
    """Data written UNSTABLE and not yet covered by a COMMIT, kept to write it again."""

    offset: int
    data: bytes
    verf: bytes
    key: int = 0


class WriteBackLog:
    """What was written since the last COMMIT, and what must be written again.

    A client records every UNSTABLE write when its reply arrives (:meth:`add`). To commit
    it takes a :meth:`snapshot` *before sending* COMMIT - exactly the writes whose replies
    it has seen, which the server must therefore cover - and hands COMMIT's verifier to
    :meth:`committed`. Entries written under that same verifier are durable and dropped;
    the others were written before a server restart and may be lost: they are returned
    to be written again (then :meth:`rewritten`) and committed once more.
    """

    def __init__(self) -> None:
        self._entries: dict[int, Dirty] = {}
        self._ids = itertools.count()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, offset: int, data: bytes, verf: bytes) -> None:
        key = next(self._ids)
        self._entries[key] = Dirty(offset, data, verf, key)
        self.nbytes += len(data)

    def snapshot(self) -> list[int]:
        """The ids of the writes a COMMIT sent now covers."""
        return list(self._entries)

    def committed(self, ids: list[int], verf: bytes) -> list[Dirty]:
        """Drop what ``verf`` made durable; return what must be written again."""
        stale: list[Dirty] = []
        for key in ids:
            entry = self._entries[key]
            if entry.verf == verf:
                del self._entries[key]
                self.nbytes -= len(entry.data)
            else:
                stale.append(entry)
        return stale

    def rewritten(self, entry: Dirty, verf: bytes | None) -> None:
        """``entry`` was written again under ``verf`` (None: stably, so it is done)."""
        if verf is not None:
            entry.verf = verf
        elif self._entries.pop(entry.key, None) is not None:
            self.nbytes -= len(entry.data)
