"""NFSv3 without sockets: XDR round trips, RPC record marking, byte-exact NFS3 calls."""

from __future__ import annotations

import os
import struct
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioconv import ImageError
from trioconv.protocols.nfs import NFSDriver, parse_nfs_uri
from trioconv.protocols.nfs import _proto as proto
from trioconv.protocols.nfs import _rpc as rpc
from trioconv.protocols.nfs._xdr import Packer, Unpacker, XDRError, pad

FH = bytes(range(1, 29))  # a 28-byte file handle, like ganesha's
FH_XDR = struct.pack(">I", 28) + FH


def u32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}I", *values)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def opaque(data: bytes) -> bytes:
    return u32(len(data)) + data + pad(len(data))


# -- XDR -----------------------------------------------------------------------------------

# One XDR item: (kind, value).
items = st.one_of(
    st.tuples(st.just("uint"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("int"), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just("uhyper"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("hyper"), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("bool"), st.booleans()),
    st.tuples(st.just("opaque"), st.binary(max_size=70)),
    st.tuples(st.just("fopaque"), st.binary(max_size=70)),
    st.tuples(st.just("string"), st.text(max_size=30)),
    st.tuples(st.just("array"), st.lists(st.integers(0, 2**32 - 1), max_size=8)),
)


def pack_all(values: list[tuple[str, object]]) -> bytes:
    p = Packer()
    for kind, value in values:
        if kind == "fopaque":
            assert isinstance(value, bytes)
            p.pack_fopaque(len(value), value)
        elif kind == "array":
            assert isinstance(value, list)
            p.pack_array(value, p.pack_uint)
        else:
            getattr(p, f"pack_{kind}")(value)
    return p.get_buffer()


def unpack_all(data: bytes, values: list[tuple[str, object]]) -> list[tuple[str, object]]:
    u = Unpacker(data)
    out: list[tuple[str, object]] = []
    for kind, value in values:
        if kind == "fopaque":
            assert isinstance(value, bytes)
            out.append((kind, u.unpack_fopaque(len(value))))
        elif kind == "array":
            out.append((kind, u.unpack_array(u.unpack_uint)))
        else:
            out.append((kind, getattr(u, f"unpack_{kind}")()))
    u.done()
    return out


@given(st.lists(items, max_size=12))
def test_xdr_round_trip(values: list[tuple[str, object]]) -> None:
    data = pack_all(values)
    assert len(data) % 4 == 0
    assert unpack_all(data, values) == values


@given(st.lists(items, min_size=1, max_size=8), st.data())
def test_xdr_truncated_input_is_refused(
    values: list[tuple[str, object]], data: st.DataObject
) -> None:
    """Any strict prefix fails with XDRError (or decodes fewer bytes), never anything else."""
    packed = pack_all(values)
    cut = data.draw(st.integers(0, max(0, len(packed) - 1)))
    if cut == len(packed):
        return
    with pytest.raises(XDRError):
        unpack_all(packed[:cut], values)


def test_xdr_known_encodings() -> None:
    p = Packer()
    p.pack_int(-2)
    p.pack_hyper(-1)
    p.pack_string("abcde")
    p.pack_bool(True)
    assert p.get_buffer() == (
        b"\xff\xff\xff\xfe" + b"\xff" * 8 + b"\0\0\0\x05abcde\0\0\0" + b"\0\0\0\x01"
    )


def test_xdr_limits() -> None:
    with pytest.raises(XDRError, match="exceeds its maximum 4"):
        Unpacker(opaque(b"12345")).unpack_opaque(4)
    with pytest.raises(XDRError, match="cannot fit"):
        Unpacker(u32(0xFFFFFFFF)).unpack_array(lambda: 0)
    with pytest.raises(XDRError, match="truncated"):
        Unpacker(u32(1000) + b"abc").unpack_opaque()
    with pytest.raises(XDRError, match="bool"):
        Unpacker(u32(2)).unpack_bool()
    with pytest.raises(XDRError):
        Packer().pack_uint(-1)
    with pytest.raises(XDRError):
        Packer().pack_opaque(b"x" * 65, 64)
    with pytest.raises(XDRError, match="unexpected"):
        Unpacker(u32(1, 2)).done()


# -- RPC record marking ----------------------------------------------------------------


def fragments(record: bytes, cuts: list[int]) -> bytes:
    """``record`` record-marked in fragments ending at ``cuts`` (and at its end)."""
    bounds = [*sorted({c for c in cuts if 0 < c < len(record)}), len(record)]
    out, start = b"", 0
    for end in bounds:
        last = rpc.LAST_FRAGMENT if end == len(record) else 0
        out += u32(last | (end - start)) + record[start:end]
        start = end
    return out


@given(
    st.lists(
        st.tuples(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=4)),
        min_size=1,
        max_size=6,
    ),
    st.lists(st.integers(1, 64), max_size=40),
)
def test_record_marking_any_chunking(
    records: list[tuple[bytes, list[int]]], chunk_sizes: list[int]
) -> None:
    stream = b"".join(fragments(body, cuts) for body, cuts in records)
    reader = rpc.RecordReader(max_record=1000)
    got: list[bytes] = []
    pos = 0
    sizes = iter(chunk_sizes)
    while pos < len(stream):
        n = next(sizes, len(stream))
        reader.receive_data(stream[pos : pos + n])
        pos += n
        while (record := reader.next_record()) is not None:
            got.append(record)
    assert got == [body for body, _ in records]
    assert reader.buffered == 0


def test_record_too_large_is_refused_before_buffering() -> None:
    reader = rpc.RecordReader(max_record=100)
    reader.receive_data(u32(50) + bytes(50) + u32(rpc.LAST_FRAGMENT | 60))
    with pytest.raises(rpc.RPCProtocolError, match="exceeds the limit of 100"):
        reader.next_record()


def test_frame() -> None:
    assert rpc.frame(0x1234) == b"\x80\x00\x12\x34"


# -- RPC calls and replies -------------------------------------------------------------


def test_call_with_auth_sys_is_byte_exact() -> None:
    cred = rpc.AuthSys(uid=1000, gid=100, gids=(4, 27), machine="host", stamp=7)
    data = rpc.encode_call(0x11223344, 100003, 3, 6, cred, b"ARGS")
    body = u32(7) + opaque(b"host") + u32(1000, 100) + u32(2, 4, 27)
    assert data == (
        u32(0x11223344, 0, 2, 100003, 3, 6)
        + u32(1)
        + opaque(body)
        + u32(0, 0)  # AUTH_NONE verifier
        + b"ARGS"
    )


def test_call_with_auth_none() -> None:
    assert rpc.encode_call(1, 100000, 2, 3, None) == u32(1, 0, 2, 100000, 2, 3, 0, 0, 0, 0)


def accepted(xid: int, stat: int, rest: bytes = b"") -> bytes:
    return u32(xid, 1, 0, 0, 0, stat) + rest


def test_reply_success_positions_at_results() -> None:
    reply = rpc.decode_reply(accepted(9, 0, u32(2049)))
    assert reply.xid == 9
    assert reply.unpacker().unpack_uint() == 2049


@pytest.mark.parametrize(
    ("message", "error", "text"),
    [
        (accepted(1, 1), rpc.RPCError, "program not available"),
        (accepted(1, 2, u32(2, 2)), rpc.RPCError, r"version not supported \(server has 2 to 2\)"),
        (accepted(1, 4), rpc.RPCError, "could not decode"),
        (u32(1, 1, 1, 1, 5), rpc.RPCError, "authentication too weak"),
        (u32(1, 1, 1, 0, 2, 2), rpc.RPCError, "RPC version mismatch"),
        (u32(1, 0), rpc.RPCProtocolError, "not a reply"),
        (u32(1, 1, 7), rpc.RPCProtocolError, "unknown reply status"),
        (u32(1, 1), rpc.RPCProtocolError, "malformed"),
        (accepted(1, 99), rpc.RPCProtocolError, "unknown accept status"),
    ],
)
def test_reply_errors(message: bytes, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        rpc.decode_reply(message)


# -- PORTMAP, MOUNT and NFS3 calls, byte-exact ----------------------------------------------


def test_getport_and_mount_encodings() -> None:
    assert proto.encode_getport(100005, 3) == u32(100005, 3, 6, 0)
    assert proto.decode_getport(Unpacker(u32(20048))) == 20048
    assert proto.encode_dirpath("/export") == opaque(b"/export")
    mnt = u32(0) + FH_XDR + u32(1, 1)
    assert proto.decode_mnt(Unpacker(mnt), "/export") == FH
    with pytest.raises(proto.MountError, match=r"Permission denied \(MNT3ERR_ACCES\)"):
        proto.decode_mnt(Unpacker(u32(13)), "/export")


def test_nfs3_call_encodings() -> None:
    assert proto.encode_fh(FH) == FH_XDR
    assert proto.encode_diropargs(FH, "disk.img") == FH_XDR + opaque(b"disk.img")
    assert proto.encode_access(FH, 0x5) == FH_XDR + u32(5)
    assert proto.encode_read(FH, 1 << 33, 65536) == FH_XDR + u64(1 << 33) + u32(65536)
    assert proto.encode_write_head(FH, 4096, 5, proto.Stable.UNSTABLE) == (
        FH_XDR + u64(4096) + u32(5, 0, 5)
    )
    assert proto.encode_commit(FH) == FH_XDR + u64(0) + u32(0)
    # sattr3: mode 0644, no uid, no gid, size 0, atime and mtime DONT_CHANGE.
    sattr = u32(1, 0o644, 0, 0, 1) + u64(0) + u32(0, 0)
    assert proto.encode_create(FH, "new.img", proto.CreateMode.GUARDED) == (
        FH_XDR + opaque(b"new.img") + u32(1) + sattr
    )
    assert proto.encode_create(FH, "n", proto.CreateMode.UNCHECKED) == (
        FH_XDR + opaque(b"n") + u32(0) + sattr
    )
    assert proto.encode_setattr_size(FH, 10 << 30) == (
        FH_XDR + u32(0, 0, 0, 1) + u64(10 << 30) + u32(0, 0) + u32(0)
    )


def fattr3(size: int, ftype: int = 1, mode: int = 0o644) -> bytes:
    return (
        u32(ftype, mode, 1, 0, 0) + u64(size) + u64(size) + u32(0, 0) + u64(1) + u64(42) + bytes(24)
    )


def wcc() -> bytes:
    return u32(1) + bytes(24) + u32(1) + fattr3(100)


def test_nfs3_reply_decoding() -> None:
    attr = proto.decode_getattr(Unpacker(u32(0) + fattr3(12345)))
    assert (attr.size, attr.type, attr.fileid) == (12345, 1, 42)
    fh, post = proto.decode_lookup(Unpacker(u32(0) + FH_XDR + u32(1) + fattr3(7) + u32(0)))
    assert fh == FH and post is not None and post.size == 7
    read = proto.decode_read(Unpacker(u32(0, 0, 5, 1) + opaque(b"hello")), 8)
    assert (bytes(read.data), read.eof) == (b"hello", True)
    write = proto.decode_write(Unpacker(u32(0) + wcc() + u32(4096, 0) + b"VERIFIER"))
    assert (write.count, write.committed, write.verf) == (4096, proto.Stable.UNSTABLE, b"VERIFIER")
    assert proto.decode_commit(Unpacker(u32(0) + wcc() + b"VERIFIER")) == b"VERIFIER"
    fsinfo = u32(0, 0) + u32(1 << 20, 65536, 4096, 1 << 19, 65536, 4096, 8192)
    info = proto.decode_fsinfo(Unpacker(fsinfo + u64(1 << 62) + u32(0, 1, 0x1B)))
    assert (info.rtmax, info.rtpref, info.wtmax) == (1 << 20, 65536, 1 << 19)
    assert proto.decode_create(Unpacker(u32(0, 1) + FH_XDR + u32(0) + wcc())) == FH
    assert proto.decode_access(Unpacker(u32(0, 0, 3))) == 3


def test_nfs3_status_errors_are_readable() -> None:
    with pytest.raises(proto.NFSStatusError, match=r"No such file or directory \(NFS3ERR_NOENT\)"):
        proto.decode_lookup(Unpacker(u32(2, 0)))
    with pytest.raises(proto.NFSStatusError, match=r"Permission denied \(NFS3ERR_ACCES\)") as info:
        proto.decode_read(Unpacker(u32(13, 0)), 10)
    assert info.value.errno == 13
    with pytest.raises(proto.NFSStatusError, match="NFS3ERR_JUKEBOX"):
        proto.decode_write(Unpacker(u32(10008) + u32(0, 0)))
    assert proto.status_text(99999) == "NFS error (status 99999)"


def test_read_reply_larger_than_asked_is_refused() -> None:
    with pytest.raises(XDRError, match="exceeds its maximum 4"):
        proto.decode_read(Unpacker(u32(0, 0, 5, 1) + opaque(b"hello")), 4)
    with pytest.raises(XDRError, match="says 6 bytes"):
        proto.decode_read(Unpacker(u32(0, 0, 6, 1) + opaque(b"hello")), 8)


# -- unstable writes and the write verifier ---------------------------------------------------


def test_write_back_log_rewrites_after_verifier_change() -> None:
    log = proto.WriteBackLog()
    log.add(0, b"a" * 10, b"VERF-one")
    log.add(10, b"b" * 10, b"VERF-one")
    ids = log.snapshot()
    log.add(20, b"c" * 5, b"VERF-two")  # completed after COMMIT was sent: not covered
    stale = log.committed(ids, b"VERF-two")  # the server restarted in between
    assert [(e.offset, e.data) for e in stale] == [(0, b"a" * 10), (10, b"b" * 10)]
    assert len(log) == 3 and log.nbytes == 25
    log.rewritten(stale[0], b"VERF-two")
    log.rewritten(stale[1], None)  # the server wrote it stably this time: done
    assert len(log) == 2 and log.nbytes == 15
    assert log.committed(log.snapshot(), b"VERF-two") == []
    assert len(log) == 0 and log.nbytes == 0


def test_write_back_log_same_verifier_drops_covered_writes_only() -> None:
    log = proto.WriteBackLog()
    log.add(0, b"x", b"V1")
    ids = log.snapshot()
    log.add(1, b"y", b"V1")
    assert log.committed(ids, b"V1") == []
    assert len(log) == 1 and log.nbytes == 1


# -- URLs ------------------------------------------------------------------------------------


def test_parse_nfs_uri() -> None:
    a = parse_nfs_uri("nfs://127.0.0.1/export/dir/disk%20one.img?uid=1000&gid=100")
    assert (a.host, a.path, a.uid, a.gid, a.port) == (
        "127.0.0.1",
        "/export/dir/disk one.img",
        1000,
        100,
        None,
    )
    assert a.names == ["export", "dir", "disk one.img"]
    b = parse_nfs_uri("nfs://server:2050/e/f?mountport=20048")
    assert (b.port, b.mount_port, b.uid, b.gid) == (2050, 20048, os.getuid(), os.getgid())


@pytest.mark.parametrize(
    ("uri", "text"),
    [
        ("nfs:///export/f", "missing host"),
        ("nfs://h/export/", "must name a file"),
        ("nfs://h/export/f?uid=x", "must be a number"),
        ("nfs://h/export/f?foo=1", "unknown URL parameter"),
        ("nfs://h/export/../f", r"'\.' and '\.\.'"),
    ],
)
def test_parse_nfs_uri_errors(uri: str, text: str) -> None:
    with pytest.raises(ImageError, match=text):
        parse_nfs_uri(uri)


# -- the driver's COMMIT and rewrite logic, against a simulated server -----------------------


class FakeSession:
    """Stands in for an NFS connection: WRITE lands in a volatile cache that COMMIT
    makes durable; :meth:`restart` loses the cache and changes the write verifier."""

    uri = "nfs://fake/export/disk.img"

    def __init__(self, size: int) -> None:
        self.disk = bytearray(size)
        self.cache: list[tuple[int, bytes]] = []
        self.verf = b"VERF-000"
        self.calls: list[str] = []

    def restart(self) -> None:
        self.cache.clear()
        self.verf = b"VERF-%03d" % (int(self.verf[5:]) + 1)

    async def nfs(
        self, proc: proto.Proc, args: bytes, decode: object, payload: memoryview | None = None
    ) -> object:
        assert callable(decode)
        self.calls.append(proc.name)
        u = Unpacker(args)
        assert u.unpack_opaque(64) == FH
        if proc is proto.Proc.WRITE:
            offset, count, stable = u.unpack_uhyper(), u.unpack_uint(), u.unpack_uint()
            assert payload is not None and payload.nbytes == count and stable == 0
            self.cache.append((offset, bytes(payload)))
            reply = u32(0, 0, 0, count, 0) + self.verf
        elif proc is proto.Proc.COMMIT:
            for offset, data in self.cache:
                self.disk[offset : offset + len(data)] = data
            self.cache.clear()
            reply = u32(0, 0, 0) + self.verf
        else:
            raise AssertionError(proc)
        return decode(Unpacker(reply))


async def test_commit_rewrites_what_a_server_restart_lost() -> None:
    fake = FakeSession(64 * 1024)
    fsinfo = proto.FSInfo(8192, 8192, 512, 8192, 8192, 512, 1 << 40)
    driver = NFSDriver(cast(Any, fake), FH, 64 * 1024, fsinfo, writable=True)
    expected = bytearray(64 * 1024)
    await driver.pwrite(0, b"a" * 20000)  # three WRITEs of at most 8 KiB
    expected[:20000] = b"a" * 20000
    fake.restart()  # loses them
    await driver.pwrite(30000, b"b" * 100)
    expected[30000:30100] = b"b" * 100
    await driver.flush()
    assert fake.disk == expected
    assert fake.calls.count("COMMIT") == 2
    # Committed data is forgotten: a later restart only costs what came after.
    fake.calls.clear()
    await driver.pwrite(40000, b"c" * 10)
    expected[40000:40010] = b"c" * 10
    fake.restart()
    await driver.flush()
    assert fake.disk == expected
    assert fake.calls == ["WRITE", "COMMIT", "WRITE", "COMMIT"]
