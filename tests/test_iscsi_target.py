"""Self-tests of the iSCSI target fixture (tests/iscsi_target.py), with QEMU as the initiator.

They need no trioconv code: ``qemu-img`` with its own libiscsi driver (Debian:
``qemu-block-extra``) writes into and reads from the LUNs, and ``qemu-img compare``
checks the backing files. If these fail, suspect the fixture (or tgt), not trioconv.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ImageMaker, assert_identical, run
from .iscsi_target import CONTROL_DIR, IQN_PREFIX, ISCSITarget, LunFactory, require_qemu_iscsi

MiB = 1024 * 1024


@pytest.fixture
def qemu_img() -> str:
    """qemu-img, with its iscsi:// driver (overrides conftest's plain ``qemu_img``)."""
    return require_qemu_iscsi()


def write_lun(qemu_img: str, src: Path, url: str) -> None:
    """``qemu-img convert -n`` the raw image ``src`` into the LUN at ``url``; must succeed."""
    result = run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", src, url, check=False)
    assert result.returncode == 0, result.stderr


def open_fails(qemu_img: str, url: str) -> str:
    """``qemu-img info url`` must fail; returns its stderr."""
    result = run(qemu_img, "info", url, check=False)
    assert result.returncode != 0, result.stdout
    return result.stderr


def allocated(path: Path) -> int:
    """Bytes the file really occupies on disk."""
    return os.stat(path).st_blocks * 512


def test_write_image_into_lun(
    qemu_img: str, iscsi_lun: LunFactory, iscsi_target: ISCSITarget, make_image: ImageMaker
) -> None:
    src = make_image("src.img", "4M", "write -P 0xab 0 1M", "write -P 0xcd 3M 512k")
    lun = iscsi_lun(4 * MiB)
    assert re.fullmatch(
        rf"iscsi://127\.0\.0\.1:{iscsi_target.port}/{re.escape(IQN_PREFIX)}:t{lun.tid}/1", lun.url
    )
    assert lun.path.stat().st_size == 4 * MiB
    assert allocated(lun.path) == 0  # made sparse
    info = run(qemu_img, "info", "--output=json", lun.url).stdout
    assert '"virtual-size": 4194304' in info
    write_lun(qemu_img, src, lun.url)
    assert_identical(src, lun.path)


def test_existing_file_is_served_with_its_data(
    qemu_img: str, iscsi_target: ISCSITarget, make_image: ImageMaker, tmp_path: Path
) -> None:
    """A file that exists keeps its data: the way to put a source image behind iSCSI."""
    image = make_image("image.img", "2M", "write -P 0x5a 512k 1M")
    url = iscsi_target.add_lun(image, 2 * MiB)
    try:
        copy = tmp_path / "copy.img"
        run(qemu_img, "convert", "-f", "raw", "-O", "raw", url, copy)
        assert_identical(image, copy)
    finally:
        iscsi_target.remove(url)


@pytest.mark.parametrize("thin", [True, False], ids=["thin", "thick"])
def test_thin_lun_unmaps_zeros(
    qemu_img: str, iscsi_lun: LunFactory, make_image: ImageMaker, thin: bool
) -> None:
    """Thin: qemu-img unmaps the zero runs (holes in the file); thick: zeros are written."""
    src = make_image("src.img", "4M", "write -P 0xab 0 512k", "write -z 1M 1M")
    lun = iscsi_lun(4 * MiB, thin=thin)
    lun.path.write_bytes(b"\x55" * (4 * MiB))  # old data that must be overwritten
    write_lun(qemu_img, src, lun.url)
    assert_identical(src, lun.path)
    if thin:
        assert allocated(lun.path) <= 1 * MiB
        mapped = run(qemu_img, "map", "--output=json", lun.url).stdout
        assert '"zero": true' in mapped  # GET LBA STATUS reports the unmapped blocks
    else:
        assert allocated(lun.path) == 4 * MiB


def test_chap(qemu_img: str, iscsi_lun: LunFactory, make_image: ImageMaker) -> None:
    src = make_image("src.img", "1M", "write -P 0x11 0 64k")
    lun = iscsi_lun(1 * MiB, chap=("tester", "s3cret-pass"))
    assert lun.url.startswith("iscsi://tester%s3cret-pass@127.0.0.1:")
    write_lun(qemu_img, src, lun.url)
    assert_identical(src, lun.path)
    wrong = lun.url.replace("s3cret-pass", "wrong-pass")
    assert "Authentication failure" in open_fails(qemu_img, wrong)
    anonymous = lun.url.replace("tester%s3cret-pass@", "")
    assert "Authentication failure" in open_fails(qemu_img, anonymous)


def test_chap_account_shared_and_released(
    qemu_img: str, iscsi_target: ISCSITarget, iscsi_lun: LunFactory
) -> None:
    first = iscsi_lun(1 * MiB, chap=("shared", "password1"))
    second = iscsi_lun(1 * MiB, chap=("shared", "password1"))
    with pytest.raises(ValueError, match="another password"):
        iscsi_lun(1 * MiB, chap=("shared", "password2"))
    iscsi_target.remove(first.url)
    run(qemu_img, "info", second.url)  # the account outlives the first target
    iscsi_target.remove(second.tid)
    accounts = iscsi_target.tgtadm("--lld", "iscsi", "--mode", "account", "--op", "show")
    assert "shared" not in accounts.stdout


def test_remove(qemu_img: str, iscsi_target: ISCSITarget, iscsi_lun: LunFactory) -> None:
    kept, gone = iscsi_lun(1 * MiB), iscsi_lun(1 * MiB)
    iscsi_target.remove(gone.url)
    assert [lun.tid for lun in iscsi_target.luns if lun.tid in (kept.tid, gone.tid)] == [kept.tid]
    open_fails(qemu_img, gone.url)
    run(qemu_img, "info", kept.url)
    with pytest.raises(KeyError):
        iscsi_target.remove(gone.tid)
    assert gone.path.exists()  # the backing file stays


def test_bad_arguments(iscsi_target: ISCSITarget, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 512"):
        iscsi_target.add_lun(tmp_path / "odd.img", 1000)
    with pytest.raises(ValueError, match="CHAP"):
        iscsi_target.add_lun(tmp_path / "chap.img", 512, chap=("user", "pass@word"))


@pytest.mark.parametrize("kill", [True, False], ids=["kill", "clean"])
def test_stop_and_start(
    qemu_img: str, iscsi_target: ISCSITarget, iscsi_lun: LunFactory, kill: bool
) -> None:
    old = iscsi_lun(1 * MiB)
    iscsi_target.stop(kill=kill)
    assert not iscsi_target.running
    open_fails(qemu_img, old.url)
    iscsi_target.start()
    assert iscsi_target.running
    assert iscsi_target.luns == []  # tgtd forgot its targets; nothing is re-created
    open_fails(qemu_img, old.url)
    new = iscsi_lun(1 * MiB)
    assert new.tid != old.tid
    run(qemu_img, "info", new.url)


@pytest.mark.parametrize("kill", [True, False], ids=["kill", "clean"])
def test_restart_makes_the_targets_again(
    qemu_img: str,
    iscsi_target: ISCSITarget,
    iscsi_lun: LunFactory,
    make_image: ImageMaker,
    kill: bool,
) -> None:
    """After restart() the same URLs reach the same backing files (data kept), with the
    same provisioning and CHAP accounts: tgtd as its service manager would bring it back."""
    src = make_image("src.img", "2M", "write -P 0x5a 0 1M")
    plain = iscsi_lun(2 * MiB, thin=True)
    guarded = iscsi_lun(2 * MiB, chap=("restart", "pa55"))
    write_lun(qemu_img, src, plain.url)
    write_lun(qemu_img, src, guarded.url)
    iscsi_target.restart(kill=kill)
    assert iscsi_target.running
    assert iscsi_target.luns == [plain, guarded]
    no_chap = guarded.url.replace("restart%pa55@", "")
    assert "Authentication failure" in open_fails(qemu_img, no_chap)  # CHAP required again
    for lun in (plain, guarded):
        assert_identical(src, lun.path)
        out = lun.path.with_suffix(".out")
        run(qemu_img, "convert", "-f", "raw", "-O", "raw", lun.url, out)
        assert_identical(src, out)


# Holds tgtd's lock on a control port, as another tgtd would, until stdin closes. (A lock
# taken in pytest's own process would not do: POSIX record locks belong to a process, and
# closing any descriptor of the file, as the fixture's probe does, drops them.)
_HOLD_LOCK = """
import fcntl, sys
with open(sys.argv[1], "ab") as lock:
    fcntl.lockf(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB, 1)
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_busy_ports_are_skipped(
    qemu_img: str, iscsi_target: ISCSITarget, iscsi_lun: LunFactory
) -> None:
    """A portal port someone listens on, or a control port another tgtd holds, is passed over."""
    iscsi_target.stop()
    port, control = iscsi_target.port, iscsi_target.control_port
    lock = CONTROL_DIR / f"socket.{control}.lock"
    with (
        socket.socket() as listener,
        subprocess.Popen(
            [sys.executable, "-c", _HOLD_LOCK, str(lock)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as holder,
    ):
        assert holder.stdin is not None and holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAITs remain
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
        iscsi_target.start()
        assert iscsi_target.port != port and iscsi_target.control_port != control
        run(qemu_img, "info", iscsi_lun(1 * MiB).url)
        holder.stdin.close()
        holder.wait(timeout=10)
    moved = iscsi_target.port, iscsi_target.control_port
    iscsi_target.stop()
    iscsi_target.start()
    assert (iscsi_target.port, iscsi_target.control_port) == moved  # the last ones come first
