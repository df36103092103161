"""The NBD protocol without sockets: byte-exact handshakes and reply parsing."""

from __future__ import annotations

import struct

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioconv.protocols.nbd import _proto as proto
from trioconv.protocols.nbd._proto import Cmd, CmdFlag, TxFlag

GREETING = struct.pack(">QQH", proto.NBDMAGIC, proto.IHAVEOPT, 3)  # fixed newstyle, no zeroes


def opt_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QIII", proto.REPLY_MAGIC, option, reply, len(payload)) + payload


def drive(gen: proto.Handshake, server: bytes) -> tuple[proto.ExportInfo, bytes]:
    """Run a handshake against canned server bytes; return the result and what was sent."""
    sent = bytearray()
    reply: bytes | None = None
    pos = 0
    while True:
        try:
            step = gen.send(reply)
        except StopIteration as stop:
            assert pos == len(server), "the client did not read everything the server sent"
            return stop.value, bytes(sent)
        if isinstance(step, proto.Send):
            sent += step.data
            reply = None
        elif isinstance(step, proto.StartTLS):
            raise AssertionError("no TLS in these replays")
        else:
            assert pos + step.size <= len(server), "the client wants more than the server sent"
            reply = server[pos : pos + step.size]
            pos += step.size


def option_sent(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", proto.IHAVEOPT, option, len(data)) + data


def test_full_handshake_is_byte_exact() -> None:
    flags = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_WRITE_ZEROES
    server = (
        GREETING
        + opt_reply(proto.OPT_STRUCTURED_REPLY, proto.REP_ACK)
        + opt_reply(
            proto.OPT_SET_META_CONTEXT,
            proto.REP_META_CONTEXT,
            struct.pack(">I", 7) + b"base:allocation",
        )
        + opt_reply(proto.OPT_SET_META_CONTEXT, proto.REP_ACK)
        + opt_reply(proto.OPT_GO, proto.REP_INFO, struct.pack(">HQH", 0, 1 << 30, int(flags)))
        + opt_reply(proto.OPT_GO, proto.REP_INFO, struct.pack(">HIII", 3, 512, 4096, 1 << 20))
        + opt_reply(proto.OPT_GO, proto.REP_ACK)
    )
    info, sent = drive(proto.client_handshake("disk"), server)
    assert info == proto.ExportInfo(
        size=1 << 30,
        flags=flags,
        structured=True,
        allocation_context=7,
        min_block=512,
        preferred_block=4096,
        max_block=1 << 20,
    )
    meta = struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 15) + b"base:allocation"
    go = struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 1, proto.INFO_BLOCK_SIZE)
    assert sent == (
        struct.pack(">I", 3)
        + option_sent(proto.OPT_STRUCTURED_REPLY)
        + option_sent(proto.OPT_SET_META_CONTEXT, meta)
        + option_sent(proto.OPT_GO, go)
    )


def test_old_server_without_go_falls_back_to_export_name() -> None:
    unsup = proto.REP_ERR_UNSUP
    server = (
        struct.pack(">QQH", proto.NBDMAGIC, proto.IHAVEOPT, 1)  # zeroes still sent
        + opt_reply(proto.OPT_STRUCTURED_REPLY, unsup)
        + opt_reply(proto.OPT_GO, unsup)
        + struct.pack(">QH", 4096, 1)
        + bytes(124)
    )
    info, sent = drive(proto.client_handshake(""), server)
    assert info.size == 4096
    assert not info.structured
    assert info.allocation_context is None
    assert sent.endswith(option_sent(proto.OPT_EXPORT_NAME))


def test_unknown_export_is_refused_clearly() -> None:
    server = (
        GREETING
        + opt_reply(proto.OPT_STRUCTURED_REPLY, proto.REP_ACK)
        + opt_reply(proto.OPT_SET_META_CONTEXT, proto.REP_ACK)
        + opt_reply(proto.OPT_GO, proto.REP_ERR | 6, b"no such export")
    )
    with pytest.raises(proto.NBDOptionError, match=r"unknown export.*no such export"):
        drive(proto.client_handshake("nope"), server)


@pytest.mark.parametrize(
    "greeting",
    [b"NOTNBD!!" + bytes(10), struct.pack(">QQH", proto.NBDMAGIC, 0x1234, 0)],
)
def test_bad_greetings(greeting: bytes) -> None:
    with pytest.raises(proto.NBDProtocolError):
        drive(proto.client_handshake(""), greeting)


def test_old_style_handshake() -> None:
    """Old style: size and flags come with the greeting (global flags in the high half
    of the 32 bits), nothing is sent, there are no export names and no TLS."""
    flags = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH
    server = struct.pack(
        ">QQQHH", proto.NBDMAGIC, proto.CLISERV_MAGIC, 6 << 20, 0, int(flags)
    ) + bytes(124)
    info, sent = drive(proto.client_handshake(""), server)
    assert info == proto.ExportInfo(size=6 << 20, flags=flags)
    assert sent == b""
    with pytest.raises(proto.NBDOptionError, match="non-empty export names"):
        drive(proto.client_handshake("disk"), server)
    with pytest.raises(proto.NBDProtocolError, match="old-style protocol, which has no TLS"):
        drive(proto.client_handshake("", tls=True), server)


@pytest.mark.parametrize("zeroes", [True, False])
def test_plain_newstyle_handshake(zeroes: bool) -> None:
    """Newstyle without the fixed bit: only NBD_OPT_EXPORT_NAME is sent (such a server
    may hang up on any other option), and the export's size and flags come back."""
    flags = TxFlag.HAS_FLAGS | TxFlag.SEND_WRITE_ZEROES
    greeting = struct.pack(">QQH", proto.NBDMAGIC, proto.IHAVEOPT, 0 if zeroes else 2)
    export = struct.pack(">QH", 1 << 20, int(flags)) + (bytes(124) if zeroes else b"")
    info, sent = drive(proto.client_handshake("disk"), greeting + export)
    assert info == proto.ExportInfo(size=1 << 20, flags=flags)
    assert sent == struct.pack(">I", 0 if zeroes else 2) + option_sent(
        proto.OPT_EXPORT_NAME, b"disk"
    )
    with pytest.raises(proto.NBDProtocolError, match="which TLS needs"):
        drive(proto.client_handshake("", tls=True), greeting)


def test_request_encoding() -> None:
    header = proto.encode_request(Cmd.WRITE_ZEROES, 0x1122, 4096, 8192, CmdFlag.NO_HOLE)
    assert header == struct.pack(">IHHQQI", 0x25609513, 2, 6, 0x1122, 4096, 8192)


def simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", proto.SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(cookie: int, kind: int, payload: bytes, done: bool = True) -> bytes:
    return (
        struct.pack(">IHHQI", proto.STRUCTURED_REPLY_MAGIC, int(done), kind, cookie, len(payload))
        + payload
    )


STREAM = (
    simple(1, data=b"abcd")
    + simple(2, error=5)
    + chunk(3, proto.CHUNK_OFFSET_DATA, struct.pack(">Q", 100) + b"xyz", done=False)
    + chunk(3, proto.CHUNK_OFFSET_HOLE, struct.pack(">QI", 103, 5), done=False)
    + chunk(3, proto.CHUNK_NONE, b"")
    + chunk(4, proto.CHUNK_BLOCK_STATUS, struct.pack(">IIIII", 9, 4096, 3, 8192, 0))
    + chunk(
        5, proto.CHUNK_ERROR_OFFSET, struct.pack(">IH", 28, 4) + b"full" + struct.pack(">Q", 77)
    )
)


def normal(event: proto.ReplyEvent) -> tuple[object, ...]:
    """An event as plain values (memoryviews compared by content)."""
    values = attrs.astuple(event, recurse=False)
    return (type(event), *(bytes(v) if isinstance(v, memoryview) else v for v in values))


def parse(pieces: list[bytes]) -> list[tuple[object, ...]]:
    """Events as plain values, taken as they come (payload views are valid until then)."""
    parser = proto.ReplyParser()
    parser.expect_read(1, 4)
    events: list[tuple[object, ...]] = []
    for piece in pieces:
        parser.receive_data(piece)
        while (event := parser.next_event()) is not None:
            events.append(normal(event))
    return events


def test_reply_parser_events() -> None:
    assert parse([STREAM]) == [
        (proto.SimpleReply, 1, 0, b"abcd"),
        (proto.SimpleReply, 2, 5, None),
        (proto.DataChunk, 3, 100, b"xyz", False),
        (proto.HoleChunk, 3, 103, 5, False),
        (proto.DoneChunk, 3),
        (proto.StatusChunk, 4, 9, ((4096, 3), (8192, 0)), True),
        (proto.ErrorChunk, 5, 28, "full", 77, True),
    ]


def test_reply_parser_zero_copy_receive() -> None:
    parser = proto.ReplyParser()
    big = bytes(range(256)) * 4096  # 1 MiB payload: larger than the initial buffer
    wire = chunk(7, proto.CHUNK_OFFSET_DATA, struct.pack(">Q", 0) + big)
    got = []
    pos = 0
    while pos < len(wire):
        with parser.get_buffer() as space:
            n = min(len(space), 100_000, len(wire) - pos)
            space[:n] = wire[pos : pos + n]
        parser.buffer_updated(n)
        pos += n
        while (event := parser.next_event()) is not None:
            got.append(normal(event))
    assert got == [(proto.DataChunk, 7, 0, big, True)]


@given(st.lists(st.integers(1, 40), max_size=60))
def test_reply_parser_is_independent_of_chunking(cuts: list[int]) -> None:
    pieces = []
    pos = 0
    for n in cuts:
        pieces.append(STREAM[pos : pos + n])
        pos += n
    pieces.append(STREAM[pos:])
    assert parse(pieces) == parse([STREAM])


def test_reply_parser_rejects_garbage() -> None:
    parser = proto.ReplyParser()
    parser.receive_data(b"\xde\xad\xbe\xef" + bytes(20))
    with pytest.raises(proto.NBDProtocolError, match="magic"):
        parser.next_event()
    parser = proto.ReplyParser(max_payload=1024)
    parser.receive_data(chunk(1, proto.CHUNK_OFFSET_DATA, bytes(4096)))
    with pytest.raises(proto.NBDProtocolError, match="too large"):
        parser.next_event()


@given(st.binary(max_size=200))
def test_reply_parser_never_crashes_on_noise(noise: bytes) -> None:
    parser = proto.ReplyParser(max_payload=4096)
    parser.receive_data(noise)
    try:
        while parser.next_event() is not None:
            pass
    except proto.NBDProtocolError:
        pass


@given(st.binary(max_size=300))
def test_handshake_never_crashes_on_noise(noise: bytes) -> None:
    gen = proto.client_handshake("x")
    reply: bytes | None = None
    pos = 0
    try:
        while True:
            step = gen.send(reply)
            if not isinstance(step, proto.Recv):
                reply = None
                continue
            if pos + step.size > len(noise):
                return
            reply = noise[pos : pos + step.size]
            pos += step.size
    except (proto.NBDProtocolError, proto.NBDOptionError, StopIteration):
        pass


def test_starttls_comes_first_and_yields_the_switch() -> None:
    gen = proto.client_handshake("", tls=True)
    assert gen.send(None) == proto.Recv(18)
    assert gen.send(GREETING) == proto.Send(struct.pack(">I", 3))
    assert gen.send(None) == proto.Send(option_sent(proto.OPT_STARTTLS))
    assert isinstance(gen.send(None), proto.Recv)
    step = gen.send(opt_reply(proto.OPT_STARTTLS, proto.REP_ACK)[:20])
    assert step == proto.StartTLS()
    # After the switch the negotiation goes on as usual (inside TLS).
    assert gen.send(None) == proto.Send(option_sent(proto.OPT_STRUCTURED_REPLY))


def test_server_without_tls_is_refused_when_tls_is_asked() -> None:
    server = GREETING + opt_reply(proto.OPT_STARTTLS, proto.REP_ERR_UNSUP)
    with pytest.raises(proto.NBDOptionError, match="refused TLS"):
        drive(proto.client_handshake("", tls=True), server)


def test_reply_parser_hands_over_a_read_payload() -> None:
    """``direct_payload`` gives up a partly received read payload: the caller receives its
    rest itself (into the requester's buffer), then parsing goes on after it."""
    parser = proto.ReplyParser()
    payload = bytes(range(256)) * 1024
    wire = (
        chunk(7, proto.CHUNK_OFFSET_DATA, struct.pack(">Q", 4096) + payload, done=False)
        + chunk(7, proto.CHUNK_NONE, b"")
        + simple(8, data=payload)
        + simple(9)
    )
    parser.expect_read(8, len(payload))
    head = 20 + 8 + 1000  # the chunk header, its offset and 1000 payload bytes
    parser.receive_data(wire[:head])
    assert parser.next_event() is None
    assert parser.direct_payload(min_remaining=len(payload)) is None  # not worth it
    direct = parser.direct_payload(min_remaining=4096)
    assert direct is not None
    assert normal(direct.event) == (proto.DataChunk, 7, 4096, payload[:1000], False)
    assert direct.remaining == len(payload) - 1000
    assert parser.direct_payload() is None  # the parser holds nothing more of it
    pos = head + direct.remaining  # the caller took those bytes off the wire
    parser.receive_data(wire[pos : pos + 16 + 20])
    assert normal(parser.next_event()) == (proto.DoneChunk, 7)  # type: ignore[arg-type]
    assert parser.next_event() is None
    direct = parser.direct_payload()
    assert direct is not None  # a simple reply to a READ, with nothing of its data here yet
    assert normal(direct.event) == (proto.SimpleReply, 8, 0, b"")
    assert direct.remaining == len(payload)
    parser.receive_data(wire[pos + 16 + 20 + len(payload) :])
    assert normal(parser.next_event()) == (proto.SimpleReply, 9, 0, None)  # type: ignore[arg-type]
    # Other frames, and complete ones, are left to next_event().
    parser.receive_data(chunk(10, proto.CHUNK_BLOCK_STATUS, struct.pack(">III", 9, 4096, 0))[:30])
    assert parser.direct_payload() is None


def test_nbd_uris() -> None:
    """QEMU's URI forms, with libnbd's TLS parameters; anything else in the query is a
    typo worth saying (qemu-img refuses it too)."""
    from trioconv._errors import ImageError
    from trioconv.protocols.nbd._client import NBDAddress, parse_nbd_uri

    assert parse_nbd_uri("nbd://h:1234/disk") == NBDAddress("disk", host="h", port=1234,
                                                            tls_hostname="h")  # fmt: skip
    unix = parse_nbd_uri("nbds+unix:///e?socket=/s&tls-certificates=/c&tls-verify-peer=false")
    assert (unix.socket, unix.tls, unix.tls_certificates, unix.tls_verify) == (
        "/s",
        True,
        "/c",
        False,
    )
    for uri in ("nbd+unix:///?socket=/s&x=1", "nbd://h/e?timeout=5", "nbd://h/?sockt=/s"):
        with pytest.raises(ImageError, match="unknown NBD URI parameter"):
            parse_nbd_uri(uri)


def test_uri_query_reads_a_plus_as_a_plus_and_refuses_psk() -> None:
    """Only percent-escapes are decoded in the query, as QEMU and libnbd do ('+' is
    not a space there), and IPv6 hosts come out of their brackets; libnbd's
    pre-shared-key parameters are refused by name."""
    from trioconv._errors import ImageError
    from trioconv.protocols.nbd._client import parse_nbd_uri

    unix = parse_nbd_uri("nbd+unix:///a%2Bb+c?socket=/run/x+y%20z.sock")
    assert (unix.export, unix.socket) == ("a+b+c", "/run/x+y z.sock")
    six = parse_nbd_uri("nbds://[::1]:10810/d%C3%AFsk%20%231")
    assert (six.host, six.port, six.export, six.tls_hostname) == ("::1", 10810, "dïsk #1", "::1")
    assert six.uri == "nbds://[::1]:10810/d%C3%AFsk%20%231"
    for param in ("tls-psk-file=/k", "tls-username=alice"):
        with pytest.raises(ImageError, match=r"TLS with a pre-shared key .* is not supported"):
            parse_nbd_uri(f"nbds://h/?{param}")


def status(cookie: int, *extents: tuple[int, int], context: int = 9) -> bytes:
    pairs = b"".join(struct.pack(">II", n, flags) for n, flags in extents)
    return chunk(cookie, proto.CHUNK_BLOCK_STATUS, struct.pack(">I", context) + pairs)


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (chunk(1, proto.CHUNK_OFFSET_DATA, struct.pack(">Q", 0)), "OFFSET_DATA chunk without"),
        (chunk(1, proto.CHUNK_OFFSET_HOLE, struct.pack(">QI", 0, 0)), "OFFSET_HOLE chunk of 0"),
        (chunk(1, proto.CHUNK_ERROR, struct.pack(">IH", 0, 0)), "error 0"),
        (chunk(1, proto.CHUNK_ERROR, struct.pack(">IH", 5, 9) + b"12345678"), "message longer"),
        (chunk(1, proto.CHUNK_ERROR_OFFSET, struct.pack(">IH", 5, 0) + b"1234"), "short error"),
        (
            chunk(1, proto.CHUNK_ERROR_OFFSET, struct.pack(">IH", 5, 4) + b"full" + bytes(7)),
            "message longer",
        ),
        (chunk(1, 0x8123, struct.pack(">IH", 5, 3) + b"ab"), "message longer"),
    ],
    ids=[
        "data-without-data",
        "empty-hole",
        "error-0",
        "long-message",
        "error-offset-short",
        "error-offset-long-message",
        "unknown-error-long-message",
    ],
)
def test_reply_parser_rejects_malformed_chunks(wire: bytes, message: str) -> None:
    """What the protocol says of a chunk by itself: data chunks carry data, holes are
    not empty, an error is not 0, a message fits in its chunk, ERROR_OFFSET has its
    offset - an unknown error type included."""
    parser = proto.ReplyParser()
    parser.receive_data(wire)
    with pytest.raises(proto.NBDProtocolError, match=message):
        parser.next_event()


def test_reply_parser_takes_unknown_error_types_as_errors() -> None:
    parser = proto.ReplyParser()
    parser.receive_data(chunk(4, 0x8123, struct.pack(">IH", 28, 4) + b"full"))
    assert normal(parser.next_event()) == (  # type: ignore[arg-type]
        proto.ErrorChunk, 4, 28, "full", None, True,
    )  # fmt: skip


def test_reply_parser_structured_only_when_negotiated() -> None:
    parser = proto.ReplyParser(structured=False)
    parser.receive_data(simple(1) + chunk(2, proto.CHUNK_NONE, b""))
    assert normal(parser.next_event()) == (proto.SimpleReply, 1, 0, None)  # type: ignore[arg-type]
    with pytest.raises(proto.NBDProtocolError, match="not negotiated"):
        parser.next_event()


def test_block_status_chunks_have_their_own_bound() -> None:
    """A small maximum payload (read chunks) does not refuse a block status chunk of
    thousands of extents; those are bounded by MAX_STATUS_CHUNK (2^20 extents)."""
    extents = [(4096, i % 2) for i in range(2000)]
    parser = proto.ReplyParser(max_payload=1024 + 4096)
    parser.receive_data(status(3, *extents))
    event = parser.next_event()
    assert isinstance(event, proto.StatusChunk) and len(event.extents) == 2000
    huge = struct.pack(">IHHQI", proto.STRUCTURED_REPLY_MAGIC, 1, proto.CHUNK_BLOCK_STATUS, 3,
                       proto.MAX_STATUS_CHUNK + 8)  # fmt: skip
    parser.receive_data(huge)
    with pytest.raises(proto.NBDProtocolError, match="too large"):
        parser.next_event()


def test_handshake_says_how_to_reach_a_tls_server() -> None:
    server = GREETING + opt_reply(proto.OPT_STRUCTURED_REPLY, proto.REP_ERR_TLS_REQD)
    server += opt_reply(proto.OPT_GO, proto.REP_ERR_TLS_REQD)
    with pytest.raises(proto.NBDOptionError, match=r"TLS required \(use an nbds://"):
        drive(proto.client_handshake("", meta_contexts=()), server)
