"""QEMU's block options: ``--image-opts``, ``--target-image-opts``, ``json:`` names, ``--object``.

The parsing and resolving are pure and tested directly; then every form is run through
the CLI beside ``qemu-img`` with the same arguments, on images made by ``qemu-img`` and
``qemu-io``, and the outputs compared; NBD over TLS - which qemu-img reaches only through
``--object tls-creds-x509`` and ``--image-opts`` - against real nbdkit servers.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from trioconv import ImageError, UnsupportedError, UsageError
from trioconv import _blockopts as bo

from .conftest import ImageMaker, assert_identical, run, trioconv_cli
from .nbd_servers import NbdkitLauncher, TLSCerts, nbd_tls_certs, nbdkit_server
from .test_locking import held_by_qemu

__all__ = ["nbd_tls_certs", "nbdkit_server"]

MiB = 1024 * 1024


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """Exit status 1, one ``trioconv:`` line on stderr, nothing on stdout; return it."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("trioconv: "), result.stderr
    assert result.stdout == ""
    return lines[0]


# -- parsing (pure) ---------------------------------------------------------------------


def test_image_opts_parsing() -> None:
    flat = bo.parse_image_opts("driver=qcow2,file.filename=a,,b.qcow2,read-only")
    assert flat == {"driver": "qcow2", "file.filename": "a,b.qcow2", "read-only": "on"}
    # A trailing comma is allowed, as in QEMU; an empty key is not.
    assert bo.parse_image_opts("driver=raw,file.filename=x,") == {
        "driver": "raw",
        "file.filename": "x",
    }
    with pytest.raises(ImageError, match="Invalid parameter '=x'"):
        bo.parse_image_opts("driver=qcow2,=x")


def test_json_filenames_flatten_and_round_trip() -> None:
    text = (
        'json:{"driver":"qcow2","file":{"driver":"file","filename":"x"},"backing":null,'
        '"read-only":true,"l":[1,2]}'
    )
    flat = bo.parse_json_filename(text)
    assert flat == {
        "driver": "qcow2",
        "file.driver": "file",
        "file.filename": "x",
        "backing": None,
        "read-only": "on",
        "l.0": "1",
        "l.1": "2",
    }
    assert isinstance(flat["l.0"], bo._Number)  # a number is not a string for QEMU
    again = bo.parse_json_filename(bo.to_json_filename(flat))
    assert again == flat
    for bad, message in [
        ('json:{"driver":', "Could not parse the JSON options"),
        ("json:[1]", "Invalid JSON object given"),
        ("json:" + "[" * 100000, "nest too deeply|Could not parse"),
        ('json:{"driver":"raw","driver":"qcow2"}', "duplicate key 'driver'"),
    ]:
        with pytest.raises(ImageError, match=message):
            bo.parse_json_filename(bad)


def test_resolve_local_and_format_options() -> None:
    spec = bo.resolve(bo.parse_image_opts("driver=qcow2,file.filename=d.qcow2"), "t")
    assert (spec.location, spec.fmt, spec.name) == ("d.qcow2", "qcow2", "d.qcow2")
    # No driver: the format is probed; a file name in options is a file name even
    # when it looks like a URI (QEMU reads protocol prefixes only in plain names).
    spec = bo.resolve({"file.filename": "nbd://x"}, "t")
    assert (spec.location, spec.fmt, spec.protocol) == ("file:nbd://x", None, "file")
    spec = bo.resolve({"file.driver": "file", "file.filename": "nbd://x"}, "t")
    assert spec.location == "file:nbd://x"
    opts = (
        "driver=raw,offset=1k,size=4096,file.filename=d,file.locking=off,force-share=on,"
        "cache.direct=on"
    )
    spec = bo.resolve(bo.parse_image_opts(opts), "t")
    assert (spec.offset, spec.size, spec.locking, spec.force_share, spec.direct) == (
        1024,
        4096,
        False,
        True,
        True,
    )
    spec = bo.resolve(
        bo.parse_image_opts("driver=qcow2,file.filename=d,backing=,l2-cache-size=1M"), "t"
    )
    assert spec.no_backing and spec.name == "d"  # options that change nothing read
    # QEMU's spellings: hexadecimal sizes, null as absent, a number where one goes.
    spec = bo.resolve_json('json:{"driver":"raw","offset":512,"size":null,"file":{"filename":"d"}}')
    assert (spec.offset, spec.size) == (512, None)
    assert (
        bo.resolve(bo.parse_image_opts("driver=raw,offset=0x200,file.filename=d"), "t").offset
        == 512
    )
    # A format over a format: qcow2 inside a window of a file.
    spec = bo.resolve(
        bo.parse_image_opts("driver=qcow2,file.driver=raw,file.offset=1M,file.file.filename=d"),
        "t",
    )
    assert spec.fmt == "qcow2" and spec.inner is not None
    assert (spec.inner.fmt, spec.inner.offset, spec.inner.location) == ("raw", 1 << 20, "d")
    assert spec.name == (
        # (values as the user wrote them, as QEMU keeps them)
        'json:{"driver": "qcow2", "file": {"offset": "1M", "driver": "raw", "file": '
        '{"driver": "file", "filename": "d"}}}'
    )
    # A protocol driver at the top: raw bytes of that protocol.
    spec = bo.resolve({"driver": "file", "filename": "d.img"}, "t")
    assert (spec.location, spec.fmt) == ("d.img", "raw")
    # -f wins over the tree's driver, as with qemu-img.
    assert bo.resolve({"driver": "qcow2", "file.filename": "d"}, "t", "raw").fmt == "raw"


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("filename=a.qcow2", ImageError, "Must specify either driver or file"),
        ("driver=nope,file.filename=a", ImageError, "Unknown driver 'nope'"),
        ("driver=qcow2,file.filename=a,bogus=1", ImageError, "does not support the option 'bogus'"),
        ("driver=qcow2,file.filename=a,file.bogus=1", ImageError, "doesn't support the option"),
        ("driver=qcow2,file=a", ImageError, "Cannot find device='a' nor node-name='a'"),
        ("driver=qcow2", ImageError, 'A block device must be specified for "file"'),
        ("driver=raw,size=1000,file.filename=a", ImageError, "not multiple of 512"),
        ("driver=raw,offset=abc,file.filename=a", ImageError, "expects a non-negative number"),
        ("driver=raw,file.filename=a,file.locking=maybe", ImageError, "locking"),
        (
            "driver=parallels,file.filename=a",
            UnsupportedError,
            "Block format 'parallels' is not supported",
        ),
        ("driver=ssh,path=/a", UnsupportedError, "Block protocol 'ssh' is not supported"),
        ("driver=qcow2,file.filename=a,backing.driver=raw", UnsupportedError, "backing image"),
        ("driver=qcow2,file.filename=a,backing=node0", ImageError, "node-name='node0'"),
        ("driver=nbd,server.type=unix", ImageError, "'server.path' is missing"),
        (
            "driver=nbd,server.type=unix,server.path=/s,server.host=h",
            ImageError,
            "'host' is unexpected",
        ),
        (
            "driver=nbd,server.type=inet,server.host=h,server.path=/s",
            ImageError,
            "'path' is unexpected",
        ),
        ("driver=nbd", ImageError, "Parameter 'server' is missing"),
        ("driver=raw,file.filename=a,force-share=on,read-only=off", ImageError, "read-only images"),
        ("driver=raw,file.driver=nosuch,file.filename=a", ImageError, "Unknown driver 'nosuch'"),
        ("driver=nbd,server.path=/s", ImageError, "'server.type' is missing"),
        ("driver=nfs,server.host=h,path=/e/f", ImageError, "'server.type' is missing"),
        ("driver=nbd,server.type=vsock,server.path=x", ImageError, "'server.type'"),
        ("driver=nbd,path=/s,tls-creds=nope", ImageError, "No TLS credentials with id"),
        ("driver=iscsi,portal=h,target=t,lun=1,user=u", ImageError, "without password-secret"),
        ("driver=iscsi,portal=h,target=t,header-digest=crc32c", UnsupportedError, "digest"),
        ("driver=http,url=https://h/x", ImageError, "cannot open the URL"),
    ],
)
def test_resolve_refuses(text: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as info:
        bo.resolve(bo.parse_image_opts(text), text)
    assert str(info.value).startswith(f"Could not open '{text}': ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('json:{"driver":"raw","file":{"filename":123}}', "'file.filename', expected: string"),
        ('json:{"driver":["qcow2"],"file":{"filename":"a"}}', "'driver', expected: string"),
        ('json:{"driver":"raw","offset":512.5,"file":{"filename":"a"}}', "expected: integer"),
        ('json:{"driver":"raw","file":null}', 'A block device must be specified for "file"'),
    ],
)
def test_json_types_are_checked(text: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        bo.resolve_json(text)


def test_network_nodes_become_uris() -> None:
    token = bo.use_objects(
        [
            bo.parse_object("secret,id=pw,data=p@ss/w%rd"),
            bo.parse_object("secret,id=b64,data=aHR0cHM=,format=base64"),
        ]
    )
    try:
        nbd = bo.resolve(
            bo.parse_image_opts("driver=nbd,server.type=unix,server.path=/run/s,export=e x"), "t"
        )
        assert nbd.location == "nbd+unix:///e%20x?socket=/run/s"
        inet = bo.resolve(bo.parse_image_opts("driver=nbd,host=::1,port=10810"), "t")
        assert inet.location == "nbd://[::1]:10810/"
        nfs = bo.resolve(
            bo.parse_image_opts(
                "driver=nfs,server.type=inet,server.host=h,path=/export/d.img,user=7,group=8"
            ),
            "t",
        )
        assert nfs.location == "nfs://h/export/d.img?uid=7&gid=8"
        iscsi = bo.resolve(
            bo.parse_image_opts(
                "driver=iscsi,portal=h:3261,target=iqn.x:y,lun=2,user=al,password-secret=pw,"
                "initiator-name=iqn.i:me"
            ),
            "t",
        )
        from trioconv.protocols.iscsi import parse_iscsi_uri

        address = parse_iscsi_uri(iscsi.location)
        assert (address.host, address.port, address.target, address.lun) == (
            "h",
            3261,
            "iqn.x:y",
            2,
        )
        # The credentials travel beside the URL (whose own are taken as written).
        assert (address.user, address.password, address.initiator) == (None, None, "iqn.i:me")
        assert iscsi.chap == ("al", "p@ss/w%rd")
        assert "p@ss" not in iscsi.shown and "p@ss" not in iscsi.location
        assert "p@ss" not in repr(iscsi)
        http = bo.resolve(
            bo.parse_image_opts(
                "driver=https,url=https://h/d.qcow2,username=u,password-secret=b64"
            ),
            "t",
        )
        assert http.location == "https://u:https@h/d.qcow2"
    finally:
        bo._OBJECTS.reset(token)


def test_objects(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-a-file")
    secret = bo.parse_object(f"secret,id=s0,file={tmp_path / 'pw'}")
    assert secret == bo.Secret("s0", "from-a-file")
    (tmp_path / "ca-cert.pem").write_text("x")
    creds = bo.parse_object(f"tls-creds-x509,id=t0,dir={tmp_path},endpoint=client")
    assert creds == bo.TLSCreds("t0", str(tmp_path), True)
    as_json = bo.parse_object('{"qom-type": "secret", "id": "s1", "data": "pw"}')
    assert as_json == bo.Secret("s1", "pw")
    unverified = bo.parse_object("tls-creds-x509,id=t1,dir=/nonexistent,verify-peer=off")
    assert unverified == bo.TLSCreds("t1", "/nonexistent", False)
    for text, error, message in [
        ("id=x", UsageError, "Parameter 'qom-type' is missing"),
        ("secret,data=a", UsageError, "Parameter 'id' is missing"),
        ("secret,id=s", UsageError, "Either 'file' or 'data' must be provided"),
        ("secret,id=s,data=a,file=b", UsageError, "mutually exclusive"),
        ("secret,id=s,file=/nonexistent/pw", UsageError, "Unable to read /nonexistent/pw"),
        ("secret,id=s,data=!!,format=base64", UsageError, "base64"),
        ("secret,id=s,data=a,keyid=k,iv=i", UnsupportedError, "encrypted secrets"),
        ("bogus,id=x", UsageError, "does not accept value 'bogus'"),
        ("tls-creds-psk,id=x,dir=/", UnsupportedError, "not supported"),
        ("tls-creds-x509,id=t,dir=/nonexistent", UsageError, "Unable to access credentials"),
        ("tls-creds-x509,id=t,dir=/,endpoint=server", UnsupportedError, "server credentials"),
    ]:
        with pytest.raises(error, match=message):
            bo.parse_object(text)
    with pytest.raises(UsageError, match="duplicate property 's0'"):
        bo.use_objects([secret, bo.Secret("s0", "other")])


# -- the CLI beside qemu-img ------------------------------------------------------------


@pytest.fixture
def images(make_image: ImageMaker, tmp_path: Path) -> dict[str, Path]:
    """A qcow2 base with data, an overlay on it with more, and a raw image."""
    base = make_image(
        "base.qcow2", "4M", "write -P 0x11 0 1M", "write -P 0x22 2M 512k", fmt="qcow2"
    )
    overlay = tmp_path / "overlay.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", overlay)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 512k 1M", overlay)
    raw = make_image("plain.img", "4M", "write -P 0x44 0 1M", "write -P 0x55 3M 64k")
    return {"base": base, "overlay": overlay, "raw": raw}


def same_info(*variants: list[str]) -> None:
    """``info`` with each argument list prints exactly what ``qemu-img info`` prints."""
    for args in variants:
        ours = trioconv_cli("info", *args)
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == run("qemu-img", "info", *args).stdout


def both(args: list[str], ours: Path, theirs: Path) -> None:
    """Run ``convert ARGS OUT`` with qemu-img and trioconv; both succeed, outputs equal."""
    run("qemu-img", "convert", *args, theirs)
    result = trioconv_cli("convert", *args, ours)
    assert result.returncode == 0, result.stderr
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize(
    "form",
    [
        ["--image-opts", "driver=qcow2,file.filename={overlay}"],
        ["--image-opts", "file.filename={overlay}"],  # format probed
        ["--image-opts", "driver=qcow2,file.driver=file,file.filename={overlay},l2-cache-size=1M"],
        ['json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{overlay}"}}}}'],
        ["--image-opts", "driver=qcow2,file.filename={overlay},backing="],
        ['json:{{"driver":"qcow2","file":{{"filename":"{overlay}"}},"backing":null}}'],
        ["--image-opts", "driver=raw,offset=1M,size=2M,file.filename={raw}"],
        ["--image-opts", "driver=file,filename={raw}"],
    ],
    ids=["opts", "probed", "tuning", "json", "no-backing", "json-null", "raw-window", "protocol"],
)
def test_sources_as_qemu_img_reads_them(
    images: dict[str, Path], tmp_path: Path, form: list[str]
) -> None:
    args = [a.format(**{k: str(v) for k, v in images.items()}) for a in form]
    both([*args, "-O", "raw"], tmp_path / "ours.img", tmp_path / "theirs.img")


def test_qcow2_inside_a_window_of_a_file(images: dict[str, Path], tmp_path: Path) -> None:
    # A qcow2 image 1 MiB into a bigger file (a partition): a format over a raw window.
    embedded = tmp_path / "embedded.img"
    embedded.write_bytes(b"\x5a" * MiB + images["overlay"].read_bytes() + b"\x5a" * MiB)
    size = images["overlay"].stat().st_size
    opts = (
        f"driver=qcow2,backing=,file.driver=raw,file.offset=1M,file.size={-(-size // 512) * 512},"
        f"file.file.filename={embedded}"
    )
    both(["--image-opts", opts, "-O", "raw"], tmp_path / "ours.img", tmp_path / "theirs.img")
    ours = trioconv_cli("info", "--output=json", "--image-opts", opts)
    theirs = run("qemu-img", "info", "--output=json", "--image-opts", opts)
    assert ours.returncode == 0, ours.stderr
    assert json.loads(ours.stdout)["virtual-size"] == json.loads(theirs.stdout)["virtual-size"]


def test_writing_a_qcow2_inside_a_window(images: dict[str, Path], tmp_path: Path) -> None:
    """``-n`` into a qcow2 image stored 1 MiB into a file, in a window of fixed size:
    the image grows only inside the window; the bytes around it are never touched."""
    inner = tmp_path / "inner.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", inner, "4M")
    outside = b"\x5a" * MiB
    disk = tmp_path / "disk.img"

    def fresh(window: int) -> str:
        body = inner.read_bytes()
        disk.write_bytes(outside + body + bytes(window - len(body)) + outside)
        return (
            f"driver=qcow2,file.driver=raw,file.offset=1M,file.size={window},"
            f"file.file.filename={disk}"
        )

    src = images["raw"]
    opts = fresh(4 * MiB)
    result = trioconv_cli("convert", "-n", "-f", "raw", src, "--target-image-opts", opts)
    assert result.returncode == 0, result.stderr
    data = disk.read_bytes()
    assert data[:MiB] == data[-MiB:] == outside
    extracted = tmp_path / "extracted.qcow2"
    extracted.write_bytes(data[MiB:-MiB])
    assert_identical(src, extracted, "raw", "qcow2")
    run("qemu-img", "check", "-q", extracted)
    # A window too small for the data: one line, and still nothing written around it.
    opts = fresh(512 * 1024)
    line = one_line(trioconv_cli("convert", "-n", "-f", "raw", src, "--target-image-opts", opts))
    assert "window" in line or "space" in line.lower() or "device" in line.lower(), line
    data = disk.read_bytes()
    assert data[:MiB] == data[-MiB:] == outside


@pytest.mark.parametrize(
    "name",
    [
        'json:{{"file":{{"filename":"{raw}"}}}}',
        'json:{{"driver":"raw","offset":1048576,"file":{{"filename":"{raw}"}}}}',
        'json:{{"driver":"raw","size":2097152,"read-only":true,"file":{{"driver":"file",'
        '"filename":"{raw}","locking":"off"}}}}',
    ],
    ids=["plain", "window", "window-and-options"],
)
def test_info_names_images_as_qemu_does(images: dict[str, Path], name: str) -> None:
    text = name.format(raw=images["raw"])
    same_info([text], ["--output=json", text])


def test_info_without_the_backing_image_still_names_it(images: dict[str, Path]) -> None:
    # backing=null: the image is read alone, but info shows (and with --backing-chain
    # follows) its backing file by name, as qemu-img does.
    opts = f"driver=qcow2,file.filename={images['overlay']},backing="
    image = ["--image-opts", opts]
    same_info(
        image,
        ["--output=json", *image],
        ["--backing-chain", *image],
        ["--backing-chain", "--output=json", *image],
    )


def test_info_of_a_protocol_driver(images: dict[str, Path]) -> None:
    # driver=file: QEMU's top node is the protocol itself, which info shows as the format.
    opts = f"driver=file,filename={images['overlay']}"
    same_info(["--image-opts", opts], ["--output=json", "--image-opts", opts])


def test_info_shows_a_windowed_backing_file_by_its_options(
    images: dict[str, Path], tmp_path: Path
) -> None:
    name = (
        'json:{"driver":"raw","offset":1048576,"size":2097152,"file":{"filename":"'
        + str(images["raw"])
        + '"}}'
    )
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", name, "-F", "raw", top, "2M")
    same_info(["--backing-chain", str(top)], ["--backing-chain", "--output=json", str(top)])
    both(["-O", "raw", str(top)], tmp_path / "ours.img", tmp_path / "theirs.img")


def test_unaligned_raw_window_reads_the_file_bytes(images: dict[str, Path], tmp_path: Path) -> None:
    # offset=100: the image is the file from byte 100 on, rounded up to a sector.
    # (qemu-img 7.2 loses bytes next to a hole here: its block status is rounded to
    # sectors of the file, so it is not the reference for this case.)
    src = images["raw"]
    out = tmp_path / "window.img"
    opts = f"driver=raw,offset=100,file.filename={src}"
    result = trioconv_cli("convert", "--image-opts", opts, "-O", "raw", out)
    assert result.returncode == 0, result.stderr
    data = src.read_bytes()[100:]
    assert out.read_bytes() == data + bytes(-len(data) % 512)
    info = trioconv_cli("info", "--output=json", "--image-opts", opts)
    assert json.loads(info.stdout)["virtual-size"] == 4 * MiB


def test_target_image_opts(images: dict[str, Path], tmp_path: Path) -> None:
    src = images["overlay"]
    target = tmp_path / "target.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", target, "4M")
    # The target's format probed (qcow2), as qemu-img does without a driver.
    result = trioconv_cli("convert", "-n", src, "--target-image-opts", f"file.filename={target}")
    assert result.returncode == 0, result.stderr
    assert_identical(src, target, "qcow2", "qcow2")
    run("qemu-img", "check", "-q", target)
    # A raw window of a bigger file as the target.
    big = tmp_path / "big.img"
    big.write_bytes(b"\xee" * (8 * MiB))
    opts = f"driver=raw,offset=2M,size=4M,file.filename={big}"
    result = trioconv_cli("convert", "-n", "-f", "qcow2", src, "--target-image-opts", opts)
    assert result.returncode == 0, result.stderr
    data = big.read_bytes()
    reference = tmp_path / "reference.img"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", src, reference)
    assert data[2 * MiB : 6 * MiB] == reference.read_bytes()
    assert data[: 2 * MiB] == data[6 * MiB :] == b"\xee" * (2 * MiB)


def test_json_target_is_raw_unless_named(images: dict[str, Path], tmp_path: Path) -> None:
    # A positional json: target is opened as -O says (raw by default), as qemu-img does.
    target = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", target, "4M")
    name = f'json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{target}"}}}}'
    line = one_line(trioconv_cli("convert", "-n", images["overlay"], name))
    assert "output file is smaller than input file" in line
    result = trioconv_cli("convert", "-n", "-O", "qcow2", images["overlay"], name)
    assert result.returncode == 0, result.stderr
    assert_identical(images["overlay"], target, "qcow2", "qcow2")


def test_json_backing_file(images: dict[str, Path], tmp_path: Path) -> None:
    name = f'json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{images["base"]}"}}}}'
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", name, "-F", "qcow2", top)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x66 3M 64k", top)
    both(["-O", "raw", str(top)], tmp_path / "ours.img", tmp_path / "theirs.img")
    same_info(["--output=json", "--backing-chain", str(top)], [str(top)])


def test_info_image_opts_matches_qemu_img(images: dict[str, Path]) -> None:
    opts = f"driver=qcow2,file.filename={images['overlay']}"
    same_info(["--output=json", "--image-opts", opts])


def test_locking_and_force_share_options(images: dict[str, Path], tmp_path: Path) -> None:
    src = images["raw"]
    out = tmp_path / "out.img"
    with held_by_qemu(src, "raw"):
        line = one_line(
            trioconv_cli("convert", "--image-opts", f"driver=raw,file.filename={src}", out)
        )
        assert 'Failed to get shared "write" lock' in line
        assert not out.exists()
        for extra in ("file.locking=off", "force-share=on"):
            opts = f"driver=raw,file.filename={src},{extra}"
            result = trioconv_cli("convert", "--image-opts", opts, "-O", "raw", out)
            assert result.returncode == 0, (extra, result.stderr)
            assert_identical(src, out)
            out.unlink()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image-opts", "-f", "raw", "driver=raw,file.filename={raw}"], "mutually exclusive"),
        (["{raw}", "--target-image-opts", "driver=raw,file.filename={out}"], "requires use of -n"),
        (["-n", "-O", "raw", "{raw}", "--target-image-opts", "file.filename={raw2}"], "mutually"),
        (
            ["-n", "{raw}", "--target-image-opts", "driver=raw,read-only=on,file.filename={raw2}"],
            "read-only",
        ),
        (["--image-opts", "driver=qcow2,file.filename={raw},bogus=1"], "option 'bogus'"),
        (["--image-opts", "driver=nope,file.filename={raw}"], "Unknown driver 'nope'"),
        (["--image-opts", "driver=raw,offset=8M,file.filename={raw}"], "cannot be greater"),
        (["--image-opts", "driver=raw,offset=1M,size=4M,file.filename={raw}"], "sum of offset"),
        (['json:{{"driver":"raw"'], "Could not parse the JSON options"),
        (
            ["--object", "secret,id=s0,data=a", "--object", "secret,id=s0,data=b", "{raw}"],
            "duplicate",
        ),
        (["--object", "bogus,id=x", "{raw}"], "does not accept value 'bogus'"),
        (
            [
                "--image-opts",
                "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=/nonexistent.sock",
            ],
            "No such file",
        ),
        # A file name the system cannot take, as a source and as a target.
        (['json:{{"driver":"raw","file":{{"driver":"file","filename":"a\\u0000b"}}}}'], "NUL"),
        (
            ["-n", "{raw}", 'json:{{"driver":"raw","file":{{"filename":"x\\u0000"}}}}'],
            "NUL byte",
        ),
    ],
)
def test_bad_block_options(
    images: dict[str, Path], tmp_path: Path, args: list[str], message: str
) -> None:
    raw2 = tmp_path / "raw2.img"
    raw2.write_bytes(bytes(4 * MiB))
    before = raw2.read_bytes()
    out = tmp_path / "out.img"
    names = {"raw": str(images["raw"]), "out": str(out), "raw2": str(raw2)}
    argv = [a.format(**names) for a in args]
    if not any(a.startswith("--target") or a == "-n" for a in argv):
        argv += ["-O", "raw", str(out)]
    line = one_line(trioconv_cli("convert", *argv))
    assert message in line, line
    assert not out.exists()
    assert raw2.read_bytes() == before


def test_open_errors_name_the_users_options(images: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "missing.qcow2"
    opts = f"driver=qcow2,file.filename={missing}"
    line = one_line(trioconv_cli("convert", "--image-opts", opts, "-O", "raw", tmp_path / "o"))
    theirs = run(
        "qemu-img", "convert", "--image-opts", opts, "-O", "raw", tmp_path / "q", check=False
    )
    assert line == "trioconv: " + theirs.stderr.strip().removeprefix("qemu-img: ")
    # -U against force-share=off, host_device on a regular file: refused as qemu-img does.
    plain = f"driver=raw,file.filename={images['raw']}"
    line = one_line(
        trioconv_cli("convert", "-U", "--image-opts", plain + ",force-share=off", tmp_path / "o")
    )
    assert "force-share=off" in line
    line = one_line(
        trioconv_cli(
            "convert",
            "--image-opts",
            f"driver=raw,file.driver=host_device,file.filename={images['raw']}",
            tmp_path / "o",
        )
    )
    assert "either a character or block device" in line
    assert not (tmp_path / "o").exists()


def test_encrypt_options_on_an_unencrypted_image(images: dict[str, Path], tmp_path: Path) -> None:
    opts = f"driver=qcow2,file.filename={images['overlay']},encrypt.key-secret=s0"
    args = ["--object", "secret,id=s0,data=x", "--image-opts", opts, "-O", "raw"]
    both(args, tmp_path / "ours.img", tmp_path / "theirs.img")


def test_object_help() -> None:
    result = trioconv_cli("convert", "--object", "help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == ["  secret", "  tls-creds-x509"]
    for kind in ("secret", "tls-creds-x509"):
        ours = trioconv_cli("convert", "--object", f"{kind},help")
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == run("qemu-img", "convert", "--object", f"{kind},help").stdout


# -- NBD over TLS, as qemu-img spells it --------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbd_tls_with_object_and_image_opts(
    nbdkit_server: NbdkitLauncher,
    nbd_tls_certs: TLSCerts,
    images: dict[str, Path],
    tmp_path: Path,
    tcp: bool,
) -> None:
    src = images["raw"]
    server = nbdkit_server("memory", ["size=4M"], tls=nbd_tls_certs, tcp=tcp)
    creds = server.qemu_object()
    opts = server.qemu_image_opts()
    # Writing: -n --target-image-opts, the export's format raw.
    result = trioconv_cli("convert", *creds, "-n", src, "--target-image-opts", opts)
    assert result.returncode == 0, result.stderr
    # Reading it back with the same spelling; qemu-img reads it the same way.
    ours, theirs = tmp_path / "ours.img", tmp_path / "theirs.img"
    result = trioconv_cli("convert", *creds, "--image-opts", opts, "-O", "raw", ours)
    assert result.returncode == 0, result.stderr
    run("qemu-img", "convert", *creds, "--image-opts", opts, "-O", "raw", theirs)
    assert ours.read_bytes() == theirs.read_bytes() == src.read_bytes()
    # A certificate for another name: refused, in the user's terms (not trioconv's URI).
    wrong = (
        opts + ",tls-hostname=evil.example"
        if ",tls-hostname=" not in opts
        else (opts.rsplit(",tls-hostname=", 1)[0] + ",tls-hostname=evil.example")
    )
    line = one_line(
        trioconv_cli("convert", *creds, "--image-opts", wrong, "-O", "raw", tmp_path / "w.img")
    )
    assert line.startswith(f"trioconv: Could not open '{wrong}': ")
    assert "tls-certificates" not in line and "nbds" not in line
    # Without the credentials' id defined: one line, nothing created.
    line = one_line(trioconv_cli("convert", "--image-opts", opts, "-O", "raw", tmp_path / "x.img"))
    assert "No TLS credentials with id 'tls0'" in line
    assert not (tmp_path / "x.img").exists()


def test_nbd_tls_over_a_socket_needs_a_hostname(
    nbdkit_server: NbdkitLauncher, nbd_tls_certs: TLSCerts, tmp_path: Path
) -> None:
    """A certificate is checked against a host name, and a socket path gives none: as
    qemu-img, a verifying TLS connection over a Unix socket needs ``tls-hostname``."""
    server = nbdkit_server("memory", ["size=4M"], tls=nbd_tls_certs)
    creds = server.qemu_object()
    opts = server.qemu_image_opts().rsplit(",tls-hostname=", 1)[0]
    theirs = run("qemu-img", "info", *creds, "--image-opts", opts, check=False)
    assert theirs.returncode == 1 and "No hostname for certificate validation" in theirs.stderr
    for command in (["info"], ["convert", "-O", "raw"]):
        args = [*command, *creds, "--image-opts", opts]
        if command[0] == "convert":
            args.append(str(tmp_path / "out.img"))
        line = one_line(trioconv_cli(*args))
        assert line == f"trioconv: Could not open '{opts}': No hostname for certificate validation"
    assert not (tmp_path / "out.img").exists()


def test_nbd_tls_verify_peer_off(
    nbdkit_server: NbdkitLauncher, nbd_tls_certs: TLSCerts, images: dict[str, Path], tmp_path: Path
) -> None:
    server = nbdkit_server("memory", ["size=4M"], tls=nbd_tls_certs, tcp=True)
    opts = server.qemu_image_opts()
    empty = tmp_path / "no-ca"
    empty.mkdir()
    # A folder without the CA: refused when verifying, accepted with verify-peer=off.
    strict = f"tls-creds-x509,id=tls0,endpoint=client,dir={empty}"
    line = one_line(
        trioconv_cli("convert", "--object", strict, "--image-opts", opts, tmp_path / "a.img")
    )
    assert "Unable to access credentials" in line
    loose = strict + ",verify-peer=off"
    result = trioconv_cli(
        "convert", "--object", loose, "-n", images["raw"], "--target-image-opts", opts
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "back.img"
    result = trioconv_cli("convert", "--object", loose, "--image-opts", opts, "-O", "raw", out)
    assert result.returncode == 0, result.stderr
    assert_identical(images["raw"], out)
