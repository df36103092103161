"""``info`` on encrypted images, as qemu-img shows them; converting them stays refused.

An encrypted image keeps its metadata in the clear: a qcow2 image's tables, and the
LUKS header that says how its key is protected (cipher, hash, key slots). ``info``
reads no guest data, so it needs no key: it shows ``encrypted: yes`` and the LUKS
header's fields, as qemu-img does without a secret. Reading guest data would need the
key, which trioconv does not take, so a conversion is refused in one line, before any
target is made.

Every image here is made by qemu-img and compared with qemu-img's own ``info``, byte
for byte (the LUKS uuid, iteration counts and offsets come from the image).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from trioconv import _open, cli
from trioconv._errors import UnsupportedError
from trioconv._qdict import qemu_order
from trioconv.formats import _luks

from .conftest import require_tool

SECRET = "secret,id=s0,data=abc"


@pytest.fixture(autouse=True)
def _luks_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry imports ``trioconv.formats.luks`` (``_open._FORMAT_MODULES``)."""
    if "luks" not in _open._FORMAT_MODULES:
        monkeypatch.setattr(_open, "_FORMAT_MODULES", (*_open._FORMAT_MODULES, "luks"))


def _qemu_img(*args: str | os.PathLike[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("qemu-img"), *(os.fspath(a) for a in args)],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
    )


def _create(folder: Path, name: str, fmt: str, opts: str) -> None:
    """``qemu-img create`` with a short PBKDF time. qemu first times a fixed number of
    PBKDF2 iterations, and when that takes less than the CPU clock's tick it fails
    ("Unable to get accurate CPU usage"): it fails fast, so it is simply tried again."""
    for _ in range(30):
        done = _qemu_img(
            "create", "-q", "-f", fmt, "--object", SECRET, "-o", opts, name, "4M", cwd=folder
        )
        if done.returncode == 0:
            return
    raise AssertionError(done.stderr)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("encrypted")
    luks = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"
    _create(folder, "luks.qcow2", "qcow2", luks)
    _create(folder, "aes.qcow2", "qcow2", "encrypt.format=aes,encrypt.key-secret=s0")
    _create(folder, "aes-v2.qcow2", "qcow2", "compat=0.10,encrypt.format=aes,encrypt.key-secret=s0")
    _create(folder, "disk.luks", "luks", "key-secret=s0,iter-time=10")
    essiv = "key-secret=s0,iter-time=10,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv"
    _create(folder, "essiv.luks", "luks", essiv + ",ivgen-hash-alg=sha256,hash-alg=sha512")
    done = _qemu_img(
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "luks.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "4M",
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr
    return folder


def _ours(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``trioconv ARGS`` run in this process: its status, stdout and stderr."""
    capsys.readouterr()
    status = cli._run(list(args))
    out, err = capsys.readouterr()
    return status, out, err


NAMES = ["luks.qcow2", "aes.qcow2", "aes-v2.qcow2", "disk.luks", "essiv.luks", "top.qcow2"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("chain", [[], ["--backing-chain"]])
def test_info_is_qemu_imgs(
    images: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    output: str,
    chain: list[str],
) -> None:
    """Human and JSON, alone and with the backing chain (``top.qcow2`` is a plain
    overlay over ``luks.qcow2``): qemu-img's bytes, key order and layout of the nested
    ``encrypt``/``slots`` data included."""
    monkeypatch.chdir(images)
    argv = ["info", f"--output={output}", *chain, name]
    status, out, err = _ours(capsys, *argv)
    assert status == 0, err
    theirs = _qemu_img(*argv, cwd=images)
    assert theirs.returncode == 0, theirs.stderr
    assert out == theirs.stdout


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("luks.qcow2", "encrypted qcow2 images are not supported"),
        ("aes.qcow2", "encrypted qcow2 images are not supported"),
        ("top.qcow2", "encrypted qcow2 images are not supported"),
        ("disk.luks", "LUKS images are not supported: "),
    ],
)
def test_converting_is_refused_in_one_line(
    images: Path, capsys: pytest.CaptureFixture[str], name: str, message: str
) -> None:
    """Refused when the source is opened (also as a backing file), so no target is made."""
    out = images / f"out-{name}.raw"
    status, _, err = _ours(capsys, "convert", "-O", "raw", os.fspath(images / name), os.fspath(out))
    assert status == 1
    assert err.count("\n") == 1 and err.startswith("trioconv: ") and message in err, err
    assert not out.exists()


def test_writing_into_an_encrypted_image_is_refused(
    images: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``convert -n`` into an encrypted image would write its clusters in the clear."""
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(4 << 20))
    status, _, err = _ours(
        capsys, "convert", "-n", "-O", "qcow2", os.fspath(src), os.fspath(images / "aes.qcow2")
    )
    assert status == 1 and err.count("\n") == 1, err
    assert "encrypted qcow2 images are not supported (crypt method 1)" in err


@pytest.mark.parametrize("name", ["luks.qcow2", "disk.luks"])
async def test_an_image_opened_to_be_described_reads_no_guest_data(images: Path, name: str) -> None:
    """Opened alone, as ``info`` opens it, the image is there to be described: a read of
    guest data is still refused, in one line."""
    async with _open.open_image(os.fspath(images / name), None, backing=False) as image:
        assert image.describe()["encrypted"] is True
        with pytest.raises(UnsupportedError, match=r"(encrypted qcow2|LUKS) images are not"):
            await image.pread(0, 512)


# ------------------------------------------------------------ the header decoder


def _header(version: int = 1, mode: bytes = b"xts-plain64", key_bytes: int = 64) -> bytearray:
    """A LUKS1 header with one active key slot, laid out as the on-disk format says."""
    out = bytearray(_luks.MAGIC + struct.pack(">H", version))
    out += b"aes".ljust(32, b"\0") + mode.ljust(32, b"\0") + b"sha256".ljust(32, b"\0")
    out += struct.pack(">II", 4040, key_bytes) + bytes(20) + bytes(32) + struct.pack(">I", 1000)
    out += b"0e1f7b35-6f2c-4d9a-b6b1-000000000001".ljust(40, b"\0")
    for i in range(8):
        active = 0x00AC71F3 if i == 0 else 0x0000DEAD
        out += struct.pack(">II", active, 2000 if i == 0 else 0) + bytes(32)
        out += struct.pack(">II", 8 + i * 504, 4000)
    return out


def test_decoder_reads_the_fields_info_shows() -> None:
    header = _luks.decode_header(_header())
    assert header.payload_offset == 4040 * 512
    info = _luks.describe(header)
    assert info["cipher-alg"] == "aes-256" and info["cipher-mode"] == "xts"
    slots = info["slots"]
    assert isinstance(slots, list)
    assert slots[0] == {"active": True, "iters": 2000, "key-offset": 4096, "stripes": 4000}
    assert slots[1] == {"active": False, "key-offset": 4096 + 504 * 512}


@pytest.mark.parametrize("qcow2", [False, True])
def test_keys_come_in_qemus_order(qcow2: bool) -> None:
    """The human layout walks the dictionary as it is: its order must be qemu's."""
    info = _luks.describe(
        _luks.decode_header(_header(mode=b"cbc-essiv:sha256", key_bytes=32)), qcow2=qcow2
    )
    assert "ivgen-hash-alg" in info and ("format" in info) is qcow2
    assert json.dumps(info) == json.dumps(qemu_order(info))


@pytest.mark.parametrize(
    ("raw", "error", "message"),
    [
        (_header(version=2), UnsupportedError, "LUKS version 2 is not supported"),
        (b"NOTLUKS" + bytes(600), _luks.LuksFormatError, "not in LUKS format"),
        (_header()[:100], _luks.LuksFormatError, "truncated"),
        (_header(mode=b"xts"), _luks.LuksFormatError, "cipher mode 'xts'"),
        (_header(key_bytes=40), _luks.LuksFormatError, "key size"),
    ],
)
def test_decoder_refuses_what_it_cannot_trust(raw: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        _luks.decode_header(raw)
