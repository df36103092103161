"""NFSv3 without sockets: XDR round trips, RPC record marking, byte-exact NFS3 calls."""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trioconv import ImageError
from trioconv.protocols.nfs import NFSDriver, parse_nfs_uri
from trioconv.protocols.nfs import _client as nfs_client
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
    for zero_copy in (False, True):
        # A small buffer, so that it must move its bytes and grow.
        reader = rpc.RecordReader(max_record=1000, buffer_size=16)
        got: list[bytes] = []
        pos = 0
        sizes = iter(chunk_sizes)
        while pos < len(stream):
            n = next(sizes, len(stream))
            chunk = stream[pos : pos + n]
            if zero_copy:  # as sock.recv_into(reader.get_buffer()) does
                with reader.get_buffer(1) as space:
                    k = min(len(chunk), space.nbytes)
                    space[:k] = chunk[:k]
                reader.buffer_updated(k)
                n = k
            else:
                reader.receive_data(chunk)
            pos += n
            while (record := reader.next_record()) is not None:
                got.append(bytes(record))
        assert got == [body for body, _ in records]
        assert reader.buffered == 0


def read_reply(xid: int, data: bytes, *, eof: bool = False, attrs: bool = True) -> bytes:
    """A successful READ reply message (no record mark), with or without attributes."""
    post_op = u32(1) + fattr3(1 << 20) if attrs else u32(0)
    return accepted(xid, 0, u32(0) + post_op + u32(len(data), eof) + opaque(data))


@given(
    st.binary(min_size=0, max_size=300),
    st.integers(0, 400),
    st.lists(st.integers(1, 200), max_size=20),
)
def test_record_hand_over_any_split(data: bytes, received: int, chunk_sizes: list[int]) -> None:
    """A READ reply's data taken over part-way: the caller gets exactly the data, the
    reader drops the padding and goes on with the next record."""
    message = read_reply(7, data, eof=True, attrs=bool(len(data) % 2))
    nxt = accepted(8, 0, u32(2049))
    stream = rpc.frame(len(message)) + message + rpc.frame(len(nxt)) + nxt
    head = proto.read_head(message, rpc.success_offset(message) or 0, len(data))
    assert head is not None and head.length == len(data) and head.eof
    received = max(received, 4 + head.start)  # the head must have arrived
    reader = rpc.RecordReader(max_record=1000)
    reader.receive_data(stream[:received])
    found = reader.current()
    assert found is not None and found[0] == len(message)
    view, remaining = reader.hand_over(head.start, head.length)
    got = bytes(view)
    view.release()
    pos = received
    # The caller receives its ``remaining`` bytes itself, then feeds the reader again.
    got += stream[pos : pos + remaining]
    pos += remaining
    assert got == data
    records: list[bytes] = []
    sizes = iter(chunk_sizes)
    while pos < len(stream):
        n = next(sizes, len(stream))
        reader.receive_data(stream[pos : pos + n])
        pos += n
        while (record := reader.next_record()) is not None:
            records.append(bytes(record))
    while (record := reader.next_record()) is not None:
        records.append(bytes(record))
    assert records == [nxt]
    assert reader.buffered == 0


def test_record_current_only_for_single_fragments() -> None:
    reader = rpc.RecordReader(max_record=1000)
    reader.receive_data(u32(10) + bytes(10) + u32(rpc.LAST_FRAGMENT | 10) + bytes(3))
    assert reader.current() is None  # a record in several fragments
    assert reader.next_record() is None
    assert reader.current() is None  # its first fragment is buffered
    reader = rpc.RecordReader(max_record=1000)
    reader.receive_data(u32(rpc.LAST_FRAGMENT | 10) + b"abc")
    found = reader.current()
    assert found is not None and found[0] == 10 and bytes(found[1]) == b"abc"
    found[1].release()
    with pytest.raises(ValueError, match="outside"):
        reader.hand_over(4, 7)
    with pytest.raises(ValueError, match="not all arrived"):
        reader.hand_over(4, 2)


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
    assert rpc.success_offset(message) is None


def test_success_offset_of_partial_replies() -> None:
    message = accepted(5, 0, u32(2049))
    assert rpc.success_offset(message) == 24
    assert all(rpc.success_offset(message[:n]) is None for n in range(24))
    # A verifier with a body (padded to 4 bytes) moves the results.
    with_verf = u32(5, 1, 0, 1, 5) + b"abcde\0\0\0" + u32(0)
    assert rpc.success_offset(with_verf) == 32
    assert rpc.decode_reply(with_verf).offset == 32


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


def test_read_head() -> None:
    for attrs in (True, False):
        message = read_reply(1, b"hello", attrs=attrs)
        pos = rpc.success_offset(message)
        assert pos == 24
        head = proto.read_head(message, pos, 8)
        assert head is not None and not head.eof
        assert message[head.start : head.start + head.length] == b"hello"
        assert len(message) == head.start + 8  # data and padding end the message
        # Any beginning that stops short of the data's length is not enough yet.
        assert all(proto.read_head(message[:n], pos, 8) is None for n in range(head.start))
        assert proto.read_head(message, pos, 4) is None  # more than was asked for
    # Anything but a plain success is left to decode_read, which says what it is.
    assert proto.read_head(u32(13, 0), 0, 10) is None  # an error status
    assert proto.read_head(u32(0, 2), 0, 10) is None  # not a bool
    assert proto.read_head(u32(0, 0, 5, 0, 6) + b"hello\0\0\0", 0, 10) is None  # 5 != 6
    assert proto.read_head(u32(0, 0, 5, 2, 5) + b"hello\0\0\0", 0, 10) is None  # eof 2


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
    # QEMU's libnfs tuning parameters are taken (they change nothing copied), and a "."
    # in the path names the same folder, as for qemu-img.
    c = parse_nfs_uri("nfs://h/e/./d/f?readahead=131072&pagecache=1024&tcp-syncnt=3&debug=0")
    assert c.path == "/e/d/f"


@pytest.mark.parametrize(
    ("uri", "text"),
    [
        ("nfs:///export/f", "missing host"),
        ("nfs://h/export/", "must name a file"),
        ("nfs://h/export/f?uid=x", "must be a number"),
        ("nfs://h/export/f?foo=1", "unknown URL parameter"),
        ("nfs://h/export/../f", r"'\.\.' is not allowed"),
        ("nfs://h/export/f?readahead=x", "must be a number"),
        ("nfs://h/export/f?readahead-size=1", "unknown URL parameter"),
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


# -- the client's reader against a scripted server over a socket pair -------------------------


class ScriptedServer:
    """The server end of a socket pair: reads calls, sends whatever a test scripts."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.stream = trio.SocketStream(sock)
        self.records = rpc.RecordReader(max_record=1 << 20)

    async def next_call(self) -> tuple[int, int, bytes]:
        """The next call's xid, procedure and arguments."""
        while (record := self.records.next_record()) is None:
            data = await self.stream.receive_some(65536)
            assert data, "the client closed the connection"
            self.records.receive_data(data)
        u = Unpacker(bytes(record))
        xid, _call, _rpcvers, _prog, _vers, proc = (u.unpack_uint() for _ in range(6))
        for _ in range(2):  # credential and verifier
            u.unpack_uint()
            u.unpack_opaque(400)
        return xid, proc, bytes(record[u.pos :])

    async def send(self, message: bytes, cuts: list[int] | None = None) -> None:
        await self.stream.send_all(fragments(message, cuts or []))


@contextlib.asynccontextmanager
async def scripted_session() -> AsyncIterator[tuple[Any, ScriptedServer, list[int]]]:
    """An NFS session whose reader runs, the server it talks to, and the sizes of the
    READ data stretches the reader received straight into callers' buffers."""
    a, b = trio.socket.socketpair()
    client = nfs_client.RPCClient(trio.SocketStream(a), "test", None, 4 << 20)
    direct: list[int] = []
    hand_over = client._records.hand_over

    def spy(skip: int, length: int) -> tuple[memoryview, int]:
        direct.append(length)
        return hand_over(skip, length)

    client._records.hand_over = spy  # type: ignore[method-assign]
    session = nfs_client._Session(client, FH, "/export", [], "nfs://fake/export/disk.img")
    server = ScriptedServer(b)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.reader)
        try:
            yield session, server, direct
        finally:
            await client.aclose()
            await server.stream.aclose()


def read_args(args: bytes) -> tuple[int, int]:
    u = Unpacker(args)
    assert u.unpack_opaque(64) == FH
    return u.unpack_uhyper(), u.unpack_uint()


@pytest.mark.parametrize(
    ("size", "cuts", "direct"),
    [
        (1 << 20, None, True),  # the bulk straight into the caller's buffer
        (1000, None, False),  # small: the whole record, then one copy
        (1 << 20, [70000, 300000], False),  # several fragments: the plain decode
    ],
)
async def test_reader_puts_read_data_into_the_callers_buffer(
    size: int, cuts: list[int] | None, direct: bool
) -> None:
    data = os.urandom(size - 3)  # padded on the wire
    async with scripted_session() as (session, server, directs):
        buf = bytearray(b"\xee" * size)
        result: list[tuple[int, bool]] = []

        async def read() -> None:
            result.append(await session.read(FH, 4096, memoryview(buf)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            xid, proc, args = await server.next_call()
            assert proc == proto.Proc.READ and read_args(args) == (4096, size)
            await server.send(read_reply(xid, data, eof=True), cuts)
        assert result == [(size - 3, True)]
        assert buf[: size - 3] == data and buf[size - 3 :] == b"\xee" * 3
        assert bool(directs) == direct


async def test_reader_read_errors_and_jukebox(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nfs_client, "_JUKEBOX_DELAY", 0)
    async with scripted_session() as (session, server, _directs):
        buf = bytearray(1 << 20)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def failing() -> None:
                    with pytest.raises(proto.NFSStatusError, match="NFS3ERR_IO"):
                        await session.read(FH, 0, memoryview(buf))

                nursery.start_soon(failing)
                xid, _proc, _args = await server.next_call()
                await server.send(accepted(xid, 0, u32(5, 0)))
            result: list[tuple[int, bool]] = []

            async def busy_then_ok() -> None:
                result.append(await session.read(FH, 0, memoryview(buf)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(busy_then_ok)
                xid, _proc, _args = await server.next_call()
                await server.send(accepted(xid, 0, u32(10008, 0)))  # JUKEBOX: again
                xid, _proc, _args = await server.next_call()
                await server.send(read_reply(xid, b"x" * 200000))
            assert result == [(200000, False)] and buf[:200000] == b"x" * 200000


async def test_cancelled_read_never_writes_into_its_buffer() -> None:
    """The reply of a cancelled READ may already be half received straight into the
    caller's buffer: the rest goes to scratch space, and the stream stays in sync."""
    size = 1 << 20
    data = os.urandom(size)
    async with scripted_session() as (session, server, directs):
        buf = bytearray(b"\xee" * size)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.read, FH, 0, memoryview(buf))
                xid, _proc, _args = await server.next_call()
                message = rpc.frame(len(read_reply(xid, data))) + read_reply(xid, data)
                cut = len(message) - len(data) + 100000
                await server.stream.send_all(message[:cut])
                await trio.testing.wait_all_tasks_blocked()
                assert directs == [size]  # handed over, 100000 bytes in
                scope.cancel()
        await server.stream.send_all(message[cut:])
        # The next call gets its own reply, not the rest of the old one.
        other = bytearray(size)
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                assert await session.read(FH, 0, memoryview(other)) == (size, True)

            nursery.start_soon(read)
            xid, _proc, _args = await server.next_call()
            await server.send(read_reply(xid, data[::-1], eof=True))
        assert other == data[::-1]
        assert buf[:100000] == data[:100000]
        assert buf[100000:] == b"\xee" * (size - 100000)
        # A reply to a call nobody waits for any more is dropped whole.
        with trio.move_on_after(0.01):
            await session.read(FH, 0, memoryview(buf))
        xid, _proc, _args = await server.next_call()
        await server.send(read_reply(xid, data))
        async with trio.open_nursery() as nursery:

            async def read_again() -> None:
                assert await session.read(FH, 0, memoryview(other)) == (6, False)

            nursery.start_soon(read_again)
            xid, _proc, _args = await server.next_call()
            await server.send(read_reply(xid, b"again!"))
        assert other[:6] == b"again!"
        assert buf[100000:] == b"\xee" * (size - 100000)
