"""A real NFSv3 server for tests: nfs-ganesha (VFS backend) behind rpcbind, on loopback.

The session fixture :func:`nfs_server` starts ``rpcbind`` (unless a portmapper already
answers on 127.0.0.1) and ``ganesha.nfsd`` with a configuration written to a temporary
folder that exports a temporary folder as ``/export`` (and, each from a folder of its
own, the squashing, read-only and small-transfer exports of :data:`EXTRA_EXPORTS`). It
is handed out only once ``rpcinfo`` sees both NFS v3 (100003) and MOUNT v3 (100005)
over TCP, and at teardown it always stops ganesha (SIGTERM, then SIGKILL) and rpcbind
if it started it. There can be only one such server per machine (one portmapper
registration), hence the session scope.

::

    def test_read(nfs_server: NFSServer) -> None:
        (nfs_server.export_dir / "disk.img").write_bytes(data)
        nfs_server.url("disk.img")   # 'nfs://127.0.0.1/export/disk.img'
        nfs_server.stop(kill=True)   # the server vanishes mid-test
        nfs_server.start()           # and comes back for the next test
        nfs_server.restart()         # or both at once, as a crash and a reboot

A test module binds the fixture with ``nfs_server = nfs_server_mod.nfs_server`` after
``from . import nfs_server as nfs_server_mod`` (importing the fixture by name trips
ruff's F811 on the test arguments).

Servers are started under ``setpriv --pdeathsig KILL`` when available, so they die with
pytest even if pytest itself is killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import require_tool

__all__ = ["NFSServer", "nfs_server"]

#: More exports, by pseudo path (and folder name under :attr:`NFSServer.root`): what
#: each does differently from ``/export``, as deployments set them up. Each is its own
#: folder, so tests of ``/export`` never see them.
EXTRA_EXPORTS: dict[str, str] = {
    # The client's uid 0 becomes the anonymous user (65534): root_squash.
    "root-squash": "Access_Type = RW; Squash = Root_Squash;",
    # Every uid becomes 4321: all_squash with a chosen anonymous user.
    "all-squash": (
        "Access_Type = RW; Squash = All_Squash; Anonymous_Uid = 4321; Anonymous_Gid = 4321;"
    ),
    # Nothing may be written, whoever asks.
    "read-only": "Access_Type = RO; Squash = No_Root_Squash;",
    # FSINFO says rtmax = wtmax = 1024: larger READs and WRITEs must be split.
    "small-io": (
        "Access_Type = RW; Squash = No_Root_Squash;"
        " MaxRead = 1024; MaxWrite = 1024; PrefRead = 1024; PrefWrite = 1024;"
    ),
}

_EXTRA_EXPORT = """\
EXPORT {{
    Export_Id = {id};
    Path = "{dir}/{name}";
    Pseudo = "/{name}";
    {options}
    SecType = sys;
    Protocols = 3, 4;
    Transports = TCP;
    Attr_Expiration_Time = 0;
    FSAL {{ Name = VFS; }}
}}
"""

#: Seconds to wait for the server to register with the portmapper.
START_TIMEOUT = 30.0
#: Seconds to wait after SIGTERM before SIGKILL (ganesha takes 2-8 s to exit).
STOP_TIMEOUT = 15.0

_CONFIG = """\
NFS_CORE_PARAM {{
    Protocols = 3, 4;
    Bind_addr = 127.0.0.1;
    NFS_Port = 2049;
    MNT_Port = 20048;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    # Without this an NFSv3 MOUNT of the pseudo path /export fails with MNT3ERR_ACCES.
    Mount_Path_Pseudo = true;
}}
NFSV4 {{
    Graceless = true;
    RecoveryRoot = "{dir}/ganesha-recov";
    Allow_Numeric_Owners = true;
    Only_Numeric_Owners = true;
}}
NFS_KRB5 {{ Active_krb5 = false; }}
# Else files made outside NFS (by the tests, locally) stay invisible for a while.
MDCACHE {{ Dir_Chunk = 0; }}
EXPORT {{
    Export_Id = 1;
    Path = "{dir}/export";
    Pseudo = "/export";
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    Protocols = 3, 4;
    Transports = TCP;
    # Else sizes changed outside NFS are stale.
    Attr_Expiration_Time = 0;
    FSAL {{ Name = VFS; }}
}}
{extra_exports}LOG {{ Default_Log_Level = EVENT; }}
"""


def _answers(rpcinfo: str, program: str, version: str) -> bool:
    result = subprocess.run(
        [rpcinfo, "-T", "tcp", "127.0.0.1", program, version],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return result.returncode == 0


def _guarded(args: list[str]) -> list[str]:
    """``args`` under ``setpriv --pdeathsig KILL`` when setpriv exists."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", *args] if setpriv else args


def _stop(proc: subprocess.Popen[bytes], *, kill: bool = False) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)


class NFSServer:
    """A running ganesha exporting :attr:`export_dir` as ``/export`` on 127.0.0.1."""

    def __init__(self, root: Path, ganesha: str, rpcinfo: str) -> None:
        self.root = root
        self.export_dir = root / "export"
        self.export_dir.mkdir(exist_ok=True)
        self.export_dir.chmod(0o777)
        (root / "ganesha-recov").mkdir(exist_ok=True)
        extra = ""
        for export_id, (name, options) in enumerate(EXTRA_EXPORTS.items(), start=2):
            (root / name).mkdir(exist_ok=True)
            (root / name).chmod(0o777)
            extra += _EXTRA_EXPORT.format(id=export_id, dir=root, name=name, options=options)
        self.config = root / "ganesha.conf"
        self.config.write_text(_CONFIG.format(dir=root, extra_exports=extra))
        self.log = root / "ganesha.log"
        self._ganesha = ganesha
        self._rpcinfo = rpcinfo
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0

    def folder(self, export: str) -> Path:
        """The local folder behind ``/export`` or one of :data:`EXTRA_EXPORTS`."""
        return self.export_dir if export == "export" else self.root / export

    def url(self, name: str, query: str = "") -> str:
        """The ``nfs://`` URL of ``name`` in the export (``query`` without the ``?``)."""
        return f"nfs://127.0.0.1/export/{name}" + (f"?{query}" if query else "")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """The server's process id (it must be running)."""
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> None:
        """Start ganesha and wait until NFS v3 and MOUNT v3 answer over TCP."""
        if self.running:
            return
        if _answers(self._rpcinfo, "100003", "3"):
            pytest.fail("an NFS server is already registered with the portmapper on 127.0.0.1")
        pidfile = self.root / "ganesha.pid"
        self._proc = subprocess.Popen(
            _guarded(
                [
                    self._ganesha,
                    "-F",
                    "-f",
                    str(self.config),
                    "-L",
                    str(self.log),
                    "-p",
                    str(pidfile),
                ]
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                pytest.fail(f"ganesha.nfsd exited with status {self._proc.returncode}:\n{log}")
            if _answers(self._rpcinfo, "100003", "3") and _answers(self._rpcinfo, "100005", "3"):
                self._started_at = time.monotonic()
                return
            time.sleep(0.2)
        self.stop(kill=True)
        pytest.fail(f"ganesha.nfsd did not register NFS v3 and MOUNT v3 in {START_TIMEOUT} s")

    def restart(self, *, freeze: float = 0.0, kill: bool = True) -> None:
        """Stop ganesha and start it again, on the same export and ports: what a crash
        and a reboot do to clients. Their connections break, calls not yet answered are
        lost, and the write verifier changes: ganesha derives it from when it started, so
        the new start waits until a second has passed since the last, to be sure.

        ``freeze``: seconds it is stopped (SIGSTOP) first, so calls pile up unanswered;
        ``kill``: SIGKILL (the default, at once), or SIGTERM (ganesha's orderly exit,
        which also takes its ports off the portmapper).
        """
        if freeze and self.running:
            os.kill(self.pid, signal.SIGSTOP)
            time.sleep(freeze)
            if not kill:
                os.kill(self.pid, signal.SIGCONT)  # (else SIGTERM waits for it)
        self.stop(kill=kill)
        time.sleep(max(0.0, self._started_at + 1.1 - time.monotonic()))
        self.start()

    def stop(self, *, kill: bool = False) -> None:
        """Stop ganesha: SIGTERM (SIGKILL with ``kill``, or when it lingers)."""
        if self._proc is not None:
            _stop(self._proc, kill=kill)
            self._proc = None


#: The server the fixture started, while it runs (see :func:`nfs_server`).
_shared: list[NFSServer] = []


@pytest.fixture(scope="session")
def nfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NFSServer]:
    """nfs-ganesha exporting a temporary folder as ``/export``; see the module docstring.

    Each module that binds the fixture has its own session-scoped instance of it, but
    only one ganesha can run: the first starts it (and stops it at the end of the
    session), the others are handed that same server.
    """
    if _shared:
        yield _shared[0]
        return
    ganesha = require_tool("ganesha.nfsd")
    rpcinfo = require_tool("rpcinfo")
    rpcbind_proc: subprocess.Popen[bytes] | None = None
    if not _answers(rpcinfo, "100000", "2"):
        rpcbind = require_tool("rpcbind")
        os.makedirs("/run/rpcbind", exist_ok=True)
        rpcbind_proc = subprocess.Popen(
            _guarded([rpcbind, "-f"]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    server: NFSServer | None = None
    try:
        if rpcbind_proc is not None:
            deadline = time.monotonic() + START_TIMEOUT
            while not _answers(rpcinfo, "100000", "2"):
                if rpcbind_proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("rpcbind did not start")
                time.sleep(0.1)
        server = NFSServer(tmp_path_factory.mktemp("nfs"), ganesha, rpcinfo)
        server.start()
        _shared.append(server)
        yield server
    finally:
        if server is not None:
            if server in _shared:
                _shared.remove(server)
            server.stop()
        if rpcbind_proc is not None:
            _stop(rpcbind_proc)
