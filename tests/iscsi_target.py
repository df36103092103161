"""A real iSCSI target for tests: one ``tgtd`` (Linux SCSI target framework) on loopback.

The session fixture :func:`iscsi_target` starts ``tgtd -f`` with its portal on 127.0.0.1
and hands out an :class:`ISCSITarget` once ``tgtadm`` answers and lists that portal. Each
:meth:`ISCSITarget.add_lun` makes a fresh target (a new target id *N* and IQN
``iqn.2024-01.trioconv.test:tN``) whose LUN 1 is backed by a file, open to every initiator,
and returns the ``iscsi://`` URL to use; LUN 0 is tgt's controller. At teardown tgtd is
always stopped. The function fixture :func:`iscsi_lun` is a factory on top of it that puts
the backing file in the test's ``tmp_path`` and removes its targets afterwards::

    def test_write(iscsi_lun: LunFactory) -> None:
        lun = iscsi_lun(8 * MiB, thin=True)
        lun.url    # 'iscsi://127.0.0.1:3262/iqn.2024-01.trioconv.test:t1/1'
        lun.path   # the backing file: compare it with qemu-img compare

    def test_outage(iscsi_target: ISCSITarget, tmp_path: Path) -> None:
        url = iscsi_target.add_lun(tmp_path / "lun.img", 8 * MiB, chap=("user", "secret"))
        # 'iscsi://user%secret@127.0.0.1:3262/iqn.2024-01.trioconv.test:t2/1'
        iscsi_target.stop(kill=True)   # the target vanishes mid-test (SIGKILL)
        iscsi_target.start()           # and comes back, empty: add_lun again

    def test_restart(iscsi_target: ISCSITarget, tmp_path: Path) -> None:
        url = iscsi_target.add_lun(tmp_path / "lun.img", 8 * MiB)
        iscsi_target.restart(kill=True)  # gone, then back with the same target and LUN

Both fixtures are registered for every test module by ``pytest_plugins`` in
``tests/conftest.py``; import the types from here for annotations.

Things worth knowing about tgt (1.0.85, Debian package ``tgt``):

- tgtd keeps its whole configuration in memory. After :meth:`ISCSITarget.stop` and
  :meth:`ISCSITarget.start` no target exists; the backing files stay where they were.
  :meth:`ISCSITarget.restart` (or :meth:`~ISCSITarget.recreate` after ``start``) makes
  them again as they were - target ids, names, backing files, provisioning, CHAP - on
  the same portal, as a target restarted by its service manager comes back.
- A LUN is exactly as large as its backing file, in 512-byte blocks. :meth:`add_lun`
  makes the file (sparse) when it does not exist and sets its length to ``size`` when it
  does, keeping the data: write an image first to read it back over iSCSI.
- ``thin=True`` sets ``thin_provisioning=1``: the LUN then reports logical block
  provisioning (UNMAP, WRITE SAME with UNMAP, GET LBA STATUS, zeroes after unmap) and
  punches holes in the backing file. A thick LUN must get every zero written.
- ``chap=(user, password)`` requires incoming CHAP: logins without those credentials fail
  with "Authentication failure". The URL then carries ``user%password@``, the form QEMU's
  libiscsi driver reads, which is why neither may contain ``%``, ``@``, ``/`` or ``:``.
- tgtd ignores SIGTERM. A clean stop takes the system offline, deletes the targets and
  then the system (``tgtadm --op delete --mode system``); SIGKILL is the fallback.
- tgtd does not exit when it cannot bind its portal: it keeps running with no portal.
  So the fixture probes for a free port first (3262 upwards, leaving a developer's own
  tgtd on 3260 alone) and a free control port (7 upwards: the ``tgtadm -C`` number,
  a Unix socket ``/var/run/tgtd/socket.N`` guarded by a lock file), and only trusts a
  tgtd that answers on its control port *and* lists its portal.

tgtd is started under ``setpriv --pdeathsig KILL`` when available, so it dies with
pytest even if pytest itself is killed. That signal follows the *thread* that started
it: call :meth:`ISCSITarget.start` from the test's own thread. tgtd must run as root
(it creates ``/var/run/tgtd``): as another user the fixture skips (fails under CI=true),
as it does without ``tgtd``/``tgtadm`` (Debian: ``tgt``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from .conftest import DEBIAN_PACKAGES, IN_CI, require_tool

__all__ = [
    "HOST",
    "IQN_PREFIX",
    "ISCSILun",
    "ISCSITarget",
    "LunFactory",
    "iscsi_lun",
    "iscsi_target",
    "require_qemu_iscsi",
]

#: The only address the portal listens on.
HOST = "127.0.0.1"
#: First portal port tried (tgtd's default, 3260, is left to the developer).
FIRST_PORT = 3262
#: First control port tried (``tgtd -C N`` / ``tgtadm -C N``; tgtd's default is 0).
FIRST_CONTROL_PORT = 7
#: How many portal ports and control ports are tried before giving up.
PORT_ATTEMPTS = 32
#: Where tgtd keeps its control sockets and their lock files.
CONTROL_DIR = Path("/var/run/tgtd")
#: Targets are named ``IQN_PREFIX:tN`` with N the target id.
IQN_PREFIX = "iqn.2024-01.trioconv.test"
#: Seconds to wait for tgtd to answer on its control port.
START_TIMEOUT = 30.0
#: Seconds to wait for tgtd to exit after ``--op delete --mode system`` or SIGKILL.
STOP_TIMEOUT = 10.0
#: Seconds any single ``tgtadm`` call may take.
TGTADM_TIMEOUT = 30.0
#: Block size of a file-backed tgt LUN: sizes must be multiples of it.
BLOCK_SIZE = 512

# Characters that survive in the user%password@ part of an iscsi:// URL (taken as
# written, as libiscsi takes it: a password may hold "%" and ":") and on tgtadm's
# command line.
_CHAP_TEXT = re.compile(r"[A-Za-z0-9._~+=%:-]+")


def _guarded(args: list[str]) -> list[str]:
    """``args`` under ``setpriv --pdeathsig KILL`` when setpriv exists."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", *args] if setpriv else args


def _port_free(port: int) -> bool:
    """Whether nothing listens on ``HOST:port`` (tgtd binds with SO_REUSEADDR, so do we)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            sock.listen(1)
        except OSError:
            return False
    return True


def _control_port_free(number: int) -> bool:
    """Whether no tgtd holds the lock of control port ``number`` (tgtd uses ``lockf``)."""
    lock = CONTROL_DIR / f"socket.{number}.lock"
    try:
        fd = os.open(lock, os.O_WRONLY)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1)
    except OSError:
        return False
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1)
        return True
    finally:
        os.close(fd)


def require_qemu_iscsi() -> str:
    """Return qemu-img's path if its ``iscsi://`` driver is installed; else skip (CI: fail).

    Debian ships the driver as a module in ``qemu-block-extra``; ``qemu-img --help`` lists
    ``iscsi`` even without it, so ask qemu-img to open a URL whose portal refuses at once
    (port 1 on loopback): without the module it says "Unknown protocol 'iscsi'".
    """
    qemu_img = require_tool("qemu-img")
    probe = subprocess.run(
        [qemu_img, "info", f"iscsi://{HOST}:1/{IQN_PREFIX}:probe/1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "Unknown protocol" in probe.stderr:
        package = DEBIAN_PACKAGES["qemu-img-iscsi"]
        message = f"qemu-img's iscsi driver is not installed (Debian: apt-get install {package})"
        if IN_CI:
            pytest.fail(f"CI=true and {message}")
        pytest.skip(message)
    return qemu_img


@dataclass(frozen=True)
class ISCSILun:
    """One target made by :meth:`ISCSITarget.add_lun`: its URL and LUN 1's backing file."""

    #: ``iscsi://[user%password@]127.0.0.1:PORT/IQN/1``
    url: str
    #: The backing file of LUN 1 (exactly ``size`` bytes).
    path: Path
    #: tgt's target id.
    tid: int
    #: The target's name, ``IQN_PREFIX:tN``.
    iqn: str
    size: int
    thin: bool
    chap: tuple[str, str] | None
    readonly: bool = False


#: The :func:`iscsi_lun` factory: ``iscsi_lun(size, *, thin=False, chap=None, name=None)``.
LunFactory = Callable[..., ISCSILun]


class ISCSITarget:
    """A tgtd serving iSCSI on ``127.0.0.1:port``; see the module docstring.

    :attr:`port` and :attr:`control_port` are chosen by :meth:`start` (the previous ones
    are tried first when it restarts).
    """

    def __init__(self, root: Path, tgtd: str, tgtadm: str) -> None:
        self.root = root
        self.host = HOST
        self.port = FIRST_PORT
        self.control_port = FIRST_CONTROL_PORT
        self.log = root / "tgtd.log"
        self._tgtd = tgtd
        self._tgtadm = tgtadm
        self._proc: subprocess.Popen[bytes] | None = None
        self._luns: dict[int, ISCSILun] = {}
        # CHAP user -> (password, number of targets bound to it); accounts are global.
        self._accounts: dict[str, tuple[str, int]] = {}
        self._next_tid = 1

    # ------------------------------------------------------------------ targets

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """The server's process id (it must be running)."""
        assert self._proc is not None
        return self._proc.pid

    @property
    def luns(self) -> list[ISCSILun]:
        """The targets made by :meth:`add_lun` that still exist, oldest first."""
        return list(self._luns.values())

    def tgtadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``tgtadm -C CONTROL_PORT ARGS``; with ``check`` a failure fails the test."""
        argv = [self._tgtadm, "-C", str(self.control_port), *args]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=TGTADM_TIMEOUT, check=False
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"{' '.join(argv)} failed with status {result.returncode}: "
                f"{(result.stdout + result.stderr).strip()}"
            )
        return result

    def add_lun(
        self,
        path: Path,
        size: int,
        *,
        thin: bool = False,
        chap: tuple[str, str] | None = None,
        readonly: bool = False,
    ) -> str:
        """Make a new target whose LUN 1 is the file ``path`` of ``size`` bytes; return its URL.

        The file is created sparse if missing and set to ``size`` bytes (data kept) if not.
        ``readonly`` write-protects the LUN (MODE SENSE reports WP, writes fail).
        ``thin`` turns on thin provisioning (UNMAP); ``chap=(user, password)`` requires
        incoming CHAP with those credentials, which the returned URL then carries.
        """
        if size <= 0 or size % BLOCK_SIZE:
            raise ValueError(f"LUN size must be a positive multiple of {BLOCK_SIZE}: {size}")
        if chap is not None:
            for text in chap:
                if not _CHAP_TEXT.fullmatch(text):
                    raise ValueError(f"CHAP user and password must match {_CHAP_TEXT.pattern}")
            user, password = chap
            known = self._accounts.get(user)
            if known is not None and known[0] != password:
                raise ValueError(f"CHAP user {user!r} already exists with another password")
        if not self.running:
            pytest.fail("the iSCSI target is stopped; call start() first")
        path = Path(path).resolve()
        with open(path, "ab") as f:
            f.truncate(size)
        tid = self._next_tid
        self._next_tid += 1
        return self._make(
            ISCSILun("", path, tid, f"{IQN_PREFIX}:t{tid}", size, thin, chap, readonly)
        ).url

    def _make(self, lun: ISCSILun) -> ISCSILun:
        """Make target ``lun.tid`` with LUN 1 as ``lun`` says (its ``url`` is made here)."""
        tid, iqn, path, thin, chap, readonly = (
            lun.tid, lun.iqn, lun.path, lun.thin, lun.chap, lun.readonly
        )  # fmt: skip
        self._iscsi("--mode", "target", "--op", "new", "--tid", str(tid), "--targetname", iqn)
        try:
            lu = ("--mode", "logicalunit", "--tid", str(tid), "--lun", "1")
            self._iscsi(*lu, "--op", "new", "--backing-store", str(path))
            if thin:
                self._iscsi(*lu, "--op", "update", "--params", "thin_provisioning=1")
            if readonly:
                self._iscsi(*lu, "--op", "update", "--params", "readonly=1")
            self._iscsi("--mode", "target", "--op", "bind", "--tid", str(tid), "-I", "ALL")
            credentials = ""
            if chap is not None:
                user, password = chap
                account = ("--mode", "account", "--user", user)
                if user not in self._accounts:
                    self._iscsi(*account, "--op", "new", "--password", password)
                    self._accounts[user] = (password, 0)
                self._iscsi(*account, "--op", "bind", "--tid", str(tid))
                self._accounts[user] = (password, self._accounts[user][1] + 1)
                credentials = f"{user}%{password}@"
        except BaseException:
            self._delete_target(tid)
            raise
        url = f"iscsi://{credentials}{self.host}:{self.port}/{iqn}/1"
        made = ISCSILun(url, path, tid, iqn, lun.size, thin, chap, readonly)
        self._luns[tid] = made
        return made

    def recreate(self, luns: list[ISCSILun]) -> None:
        """Make the targets ``luns`` again in a tgtd started anew (same ids, names,
        backing files and settings): the URLs they had work again - if the portal is
        the same port, which :meth:`start` tries first."""
        for lun in luns:
            made = self._make(lun)
            if made.url != lun.url:
                pytest.fail(f"tgtd came back on another portal: {made.url} for {lun.url}")

    def restart(self, *, kill: bool = True, down: float = 0.0) -> None:
        """Stop tgtd (SIGKILL with ``kill``, else the clean way), wait ``down`` seconds,
        start it again and :meth:`recreate` its targets: initiators see their
        connections drop, then find the same targets and LUNs at the same URLs.

        Call it from the test's own thread (see the module docstring).
        """
        luns = self.luns
        self.stop(kill=kill)
        time.sleep(down)
        self.start()
        self.recreate(luns)

    def lun(self, url_or_tid: str | int) -> ISCSILun:
        """The :class:`ISCSILun` of a URL (with or without credentials) or target id."""
        if isinstance(url_or_tid, int):
            found = self._luns.get(url_or_tid)
        else:
            iqn = urlsplit(url_or_tid).path.strip("/").split("/")[0]
            found = next((lun for lun in self._luns.values() if lun.iqn == iqn), None)
        if found is None:
            raise KeyError(f"no such iSCSI target: {url_or_tid!r}")
        return found

    def remove(self, url_or_tid: str | int) -> None:
        """Delete a target made by :meth:`add_lun` (even with initiators logged in).

        Its CHAP account goes too when no other target uses it; the backing file stays.
        """
        lun = self.lun(url_or_tid)
        del self._luns[lun.tid]
        if self.running:
            self._delete_target(lun.tid)
        if lun.chap is not None:
            user = lun.chap[0]
            password, users = self._accounts[user]
            if users > 1:
                self._accounts[user] = (password, users - 1)
            else:
                del self._accounts[user]
                if self.running:
                    self._iscsi("--mode", "account", "--op", "delete", "--user", user)

    def _iscsi(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.tgtadm("--lld", "iscsi", *args, check=check)

    def _delete_target(self, tid: int, *, check: bool = True) -> None:
        self._iscsi("--mode", "target", "--op", "delete", "--force", "--tid", str(tid), check=check)

    # ------------------------------------------------------------------ the daemon

    def start(self) -> None:
        """Start tgtd (no targets) and wait until it answers and lists its portal.

        Ports in use by someone else are skipped; the previous ones are tried first.
        """
        if self.running:
            return
        self._forget()
        bad_ports: set[int] = set()
        bad_controls: set[int] = set()
        for _ in range(PORT_ATTEMPTS):
            port = self._pick(self.port, FIRST_PORT, bad_ports, _port_free)
            control = self._pick(
                self.control_port, FIRST_CONTROL_PORT, bad_controls, _control_port_free
            )
            self.port, self.control_port = port, control
            outcome = self._launch()
            if outcome == "ready":
                return
            if outcome == "portal":
                bad_ports.add(port)
            else:
                bad_controls.add(control)
        pytest.fail(f"tgtd found no free portal/control port after {PORT_ATTEMPTS} attempts")

    @staticmethod
    def _pick(previous: int, first: int, bad: set[int], free: Callable[[int], bool]) -> int:
        candidates: list[int] = [previous, *range(first, first + PORT_ATTEMPTS)]
        for candidate in candidates:
            if candidate not in bad and free(candidate):
                return candidate
            bad.add(candidate)
        pytest.fail(f"no free port in {first}..{first + PORT_ATTEMPTS - 1}")

    def _launch(self) -> str:
        """Start one tgtd; ``"ready"``, or which port was taken: ``"portal"``/``"control"``."""
        start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            log.write(f"--- tgtd -C {self.control_port} portal {self.port}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                _guarded(
                    [
                        self._tgtd,
                        "-f",
                        "-C",
                        str(self.control_port),
                        "--iscsi",
                        f"portal={self.host}:{self.port}",
                    ]
                ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        portal = f"Portal: {self.host}:{self.port},"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if (status := self._proc.poll()) is not None:
                tail = self._log_tail(start)
                self._proc = None
                if "another tgtd is using" in tail:
                    return "control"
                pytest.fail(f"tgtd exited with status {status}:\n{tail}")
            shown = self._iscsi("--mode", "portal", "--op", "show", check=False)
            if shown.returncode == 0 and self._proc.poll() is None:
                if portal in shown.stdout:
                    return "ready"
                # tgtd answers only once its portal is set up: no portal, no bind.
                self._kill()
                return "portal"
            time.sleep(0.05)
        tail = self._log_tail(start)
        self._kill()
        pytest.fail(f"tgtd did not answer on control port {self.control_port}:\n{tail}")

    def _log_tail(self, start: int = 0) -> str:
        """The last 2000 characters tgtd wrote to :attr:`log` after byte ``start``."""
        with open(self.log, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")[-2000:]

    def stop(self, *, kill: bool = False) -> None:
        """Stop tgtd; every target is gone afterwards (the backing files stay).

        ``kill=True`` is an outage: SIGKILL at once, initiators see the connection drop.
        Otherwise the clean way: system offline, targets deleted, then ``--op delete
        --mode system``; SIGKILL if tgtd is still alive after :data:`STOP_TIMEOUT`.
        """
        if self._proc is None:
            return
        if not kill and self._proc.poll() is None:
            # A tgtadm that hangs (TimeoutExpired) must not keep the SIGKILL below from coming.
            with contextlib.suppress(subprocess.SubprocessError):
                offline = ("--name", "State", "-v", "offline")
                self.tgtadm("--op", "update", "--mode", "sys", *offline, check=False)
                for tid in self._luns:
                    self._delete_target(tid, check=False)
                self.tgtadm("--op", "delete", "--mode", "system", check=False)
                self._proc.wait(timeout=STOP_TIMEOUT)
        self._kill()
        self._forget()

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=STOP_TIMEOUT)
            self._proc = None

    def _forget(self) -> None:
        """tgtd is gone, and with it every target and account it had."""
        self._luns.clear()
        self._accounts.clear()


@pytest.fixture(scope="session")
def iscsi_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ISCSITarget]:
    """One tgtd on 127.0.0.1 for the session; always stopped at the end. See the module."""
    tgtd = require_tool("tgtd")
    tgtadm = require_tool("tgtadm")
    if os.geteuid() != 0:
        message = f"tgtd needs root (it makes {CONTROL_DIR}); run the iSCSI tests as root"
        if IN_CI:
            pytest.fail(f"CI=true and {message}")
        pytest.skip(message)
    target = ISCSITarget(tmp_path_factory.mktemp("iscsi"), tgtd, tgtadm)
    try:
        target.start()
        yield target
    finally:
        target.stop()


@pytest.fixture
def iscsi_lun(iscsi_target: ISCSITarget, tmp_path: Path) -> Iterator[LunFactory]:
    """Factory of LUNs backed by files in ``tmp_path``: ``iscsi_lun(size, *, thin, chap, name)``.

    Returns an :class:`ISCSILun`. Its targets are removed after the test, and a tgtd the
    test stopped is started again for the next one.
    """
    iscsi_target.start()
    made: list[int] = []

    def make(
        size: int,
        *,
        thin: bool = False,
        chap: tuple[str, str] | None = None,
        name: str | None = None,
    ) -> ISCSILun:
        path = tmp_path / (name or f"lun-{len(made) + 1}.img")
        lun = iscsi_target.lun(iscsi_target.add_lun(path, size, thin=thin, chap=chap))
        made.append(lun.tid)
        return lun

    yield make
    if not iscsi_target.running:
        iscsi_target.start()  # start() forgets the targets the killed tgtd had
        return
    for tid in made:
        with contextlib.suppress(KeyError):
            iscsi_target.remove(tid)
