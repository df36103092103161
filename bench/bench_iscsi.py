#!/usr/bin/env python3
"""Benchmark iSCSI: ``trioconv convert`` vs ``qemu-img convert`` with NFS, iSCSI and latency.

What it measures: the effect of asynchronous copying (many requests in flight, ``-W``)
when every request pays a network round trip, on the three paths of the original
report: nfs -> iscsi, nfs -> local file and local file -> iscsi. The servers are real
and local: ``nfs-ganesha`` behind ``rpcbind`` (started with ``bench_nfs``'s helpers and
configuration) exports ``WORKDIR/nfs/export`` as ``/export``; one ``tgtd`` (Linux SCSI
target framework) serves, with its portal on 127.0.0.1:``--iscsi-port``, a thin LUN
(``thin_provisioning=1``: UNMAP and WRITE SAME with unmap punch holes) and a thick one,
each backed by a file in ``WORKDIR/iscsi`` of exactly the image size, so the backing file
can be compared with the source. ``bench_nfs``'s delay proxy sits on 127.0.0.2 in front
of NFS (2049), MOUNT (20048) and the iSCSI portal: every chunk is forwarded ``--delays``
milliseconds after it arrived, per direction, in order, without serializing pipelined
requests. ``nfs://127.0.0.2/export/IMAGE`` and ``iscsi://127.0.0.2:PORT/IQN/1`` are the
delayed paths, for both tools (QEMU's own libnfs and libiscsi drivers for qemu-img).

Tools: trioconv ``-m 1``, its defaults (``-m 8``, in order) and ``-m 8 -W``; qemu-img
``-m 1``, ``-m 8`` and ``-m 8 -W``. Each is called as
``CMD convert -n -f raw -O raw FLAGS SRC DST`` into a LUN (a LUN cannot be created, and
``-n`` also tells the tool not to assume zeros there) and as
``CMD convert -f raw -O raw FLAGS SRC DST`` into a local file, which the tool creates
(deleted before every run). Before every run into a LUN its backing file is filled with
non-zero data (``--fill data``, synced to disk, outside the timing) so that a tool that
skips zeros it should have written fails verification; ``--fill zero`` leaves a sparse,
zeroed file instead. Runs are interleaved across tools, ``--warmup`` untimed runs per
tool and row, then ``--repeat`` timed ones; every timed output is checked with
``qemu-img compare`` against the source image (for a LUN: its backing file). The report
shows median wall seconds per tool, trioconv ``-m 8 -W`` / qemu-img ``-m 8 -W`` and
trioconv default / trioconv ``-m 8 -W``. tgtd, ganesha, rpcbind (if started here) and
the proxy are always stopped at exit.

Run from the project root, as root (tgtd, ganesha and rpcbind need it), while no NFS
tests run (they use the same fixed NFS ports):

    python bench/bench_iscsi.py --output bench/results-iscsi.md
    python bench/bench_iscsi.py --size 64M --repeat 1 --delays 0,1 --tools qemu-img

Exits non-zero if any timed run fails or any output does not verify.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from bench_convert import (
    MIB,
    add_output_args,
    add_run_args,
    bench_parser,
    create_in_child,
    create_source,
    image_info,
    machine_header,
    select,
)
from bench_nbd import Tally, Tool, print_progress, rss_floor, run_timed, verify, version
from bench_nfs import (
    MOUNT_PORT,
    NFS_PORT,
    PROXY_HOST,
    SERVER_HOST,
    START_TIMEOUT,
    delay_proxy,
    finish_report,
    fmt_wall_table,
    ganesha,
    guarded,
    parse_delays,
    rpcbind,
)

IQN_PREFIX = "iqn.2024-01.trioconv.bench"
#: tgtd's stop: ``--op delete --mode system`` ends it at once; SIGKILL after this long.
TGTD_STOP_TIMEOUT = 10.0
#: Filling a LUN's backing file with non-zero data, this much per write.
FILL_CHUNK = 4 * MIB

PATHS = {
    "nfs-iscsi": "nfs -> iscsi",
    "nfs-file": "nfs -> file",
    "file-iscsi": "file -> iscsi",
}
LUN_KINDS = ["thin", "thick"]


TOOLS = [
    Tool("trioconv-m1", "trioconv -m 1", "trioconv", ("-m", "1")),
    Tool("trioconv-default", "trioconv default (-m 8)", "trioconv"),
    Tool("trioconv-m8-W", "trioconv -m 8 -W", "trioconv", ("-m", "8", "-W")),
    Tool("qemu-img-m1", "qemu-img -m 1", "qemu-img", ("-m", "1")),
    Tool("qemu-img-m8", "qemu-img -m 8", "qemu-img", ("-m", "8")),
    Tool("qemu-img-m8-W", "qemu-img -m 8 -W", "qemu-img", ("-m", "8", "-W")),
]


@dataclass
class Row(Tally):
    """One table row: a path, the LUN kind for an iSCSI target, a delay; its results."""

    path: str
    lun: str | None
    delay_ms: float

    @property
    def label(self) -> str:
        lun = f", {self.lun} LUN" if self.lun else ""
        return f"{PATHS[self.path]}{lun}, {self.delay_ms:g} ms"


# --------------------------------------------------------------------------- tgtd


class Tgtd:
    """A running ``tgtd -f`` with its portal on ``SERVER_HOST:port`` (see :func:`tgtd`)."""

    def __init__(self, control_port: int, port: int) -> None:
        self.control_port = control_port
        self.port = port
        self.tids: list[int] = []

    def adm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``tgtadm -C CONTROL_PORT ARGS``; raises with tgtadm's message when ``check``."""
        argv = ["tgtadm", "-C", str(self.control_port), *args]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if check and r.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)}: {(r.stdout + r.stderr).strip()}")
        return r

    def add_lun(self, tid: int, backing: Path, *, thin: bool) -> str:
        """Target ``tid`` with LUN 1 on ``backing``, open to all initiators; its IQN."""
        iqn = f"{IQN_PREFIX}:{backing.stem}"
        iscsi = ("--lld", "iscsi")
        self.adm(*iscsi, "--mode", "target", "--op", "new", "--tid", str(tid), "-T", iqn)
        self.tids.append(tid)
        lu = ("--mode", "logicalunit", "--tid", str(tid), "--lun", "1")
        self.adm(*iscsi, *lu, "--op", "new", "--backing-store", str(backing))
        if thin:
            self.adm(*iscsi, *lu, "--op", "update", "--params", "thin_provisioning=1")
        self.adm(*iscsi, "--mode", "target", "--op", "bind", "--tid", str(tid), "-I", "ALL")
        return iqn


def port_free(host: str, port: int) -> bool:
    """Whether nothing listens on host:port (bound the way tgtd binds, SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError:
            return False
    return True


@contextlib.contextmanager
def tgtd(root: Path, port: int, control_port: int) -> Iterator[Tgtd]:
    """tgtd on ``SERVER_HOST:port``, control port ``control_port``; always stopped.

    tgtd keeps running without a portal when it cannot bind one, and a tgtadm call on a
    control port another tgtd owns reaches that one; so both are checked first, and tgtd
    counts as up once it answers on its control port *and* lists the portal. tgtd
    ignores SIGTERM: it is stopped with system offline, targets deleted, ``--op delete
    --mode system``, and SIGKILL as the fallback.
    """
    server = Tgtd(control_port, port)
    if server.adm("--mode", "system", "--op", "show", check=False).returncode == 0:
        raise RuntimeError(f"another tgtd answers on control port {control_port} (--control-port)")
    for host in (SERVER_HOST, PROXY_HOST):
        if not port_free(host, port):
            raise RuntimeError(f"{host}:{port} is in use (--iscsi-port)")
    root.mkdir(parents=True, exist_ok=True)
    log = root / "tgtd.log"
    argv = ["tgtd", "-f", "-C", str(control_port), "--iscsi", f"portal={SERVER_HOST}:{port}"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            guarded(argv), stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tgtd exited {proc.returncode}:\n{log.read_text()[-2000:]}")
            shown = server.adm("--lld", "iscsi", "--mode", "portal", "--op", "show", check=False)
            if shown.returncode == 0:
                if f"Portal: {SERVER_HOST}:{port}," not in shown.stdout:
                    raise RuntimeError(f"tgtd has no portal:\n{log.read_text()[-2000:]}")
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"tgtd not answering after {START_TIMEOUT:g} s")
            time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                offline = ("--name", "State", "-v", "offline")
                server.adm("--op", "update", "--mode", "sys", *offline, check=False)
                for tid in server.tids:
                    target = ("--mode", "target", "--tid", str(tid))
                    server.adm("--lld", "iscsi", *target, "--op", "delete", "--force", check=False)
                server.adm("--op", "delete", "--mode", "system", check=False)
        stop_proc_kill(proc)


def stop_proc_kill(proc: subprocess.Popen[bytes]) -> None:
    """Wait for proc to exit; SIGKILL it after TGTD_STOP_TIMEOUT (it ignores SIGTERM)."""
    try:
        proc.wait(timeout=TGTD_STOP_TIMEOUT if proc.poll() is None else 0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def qemu_img_speaks(protocol: str) -> bool:
    """Whether qemu-img has its ``protocol`` driver (Debian: qemu-block-extra).

    ``qemu-img --help`` lists module drivers even when the module is missing; opening a
    URL on a loopback port that refuses at once tells: "Unknown protocol" without it.
    """
    url = f"{protocol}://{SERVER_HOST}:1/{IQN_PREFIX}:probe/1"
    r = subprocess.run(["qemu-img", "info", url], capture_output=True, text=True, timeout=60)
    return "Unknown protocol" not in r.stderr


# --------------------------------------------------------------------------- bench


@dataclass(frozen=True)
class Endpoints:
    """Where a row reads and writes: URLs for the tools, files for reset and compare."""

    src: str
    dst: str
    dst_file: Path  # the local target, or the LUN's backing file
    dst_is_lun: bool


def fill(path: Path, size: int, mode: str) -> None:
    """Reset a LUN's backing file: non-zero data (``data``) or a sparse zeroed file."""
    with open(path, "ab") as f:
        f.truncate(0)
        f.truncate(size)
    if mode == "zero":
        return
    block = bytes([0x5A]) * FILL_CHUNK
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in range(0, size, FILL_CHUNK):
            os.pwrite(fd, block[: min(FILL_CHUNK, size - off)], off)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def tool_argv(tool: Tool, trioconv: list[str], ends: Endpoints) -> list[str]:
    prefix = trioconv if tool.program == "trioconv" else ["qemu-img"]
    n = ["-n"] if ends.dst_is_lun else []
    return [*prefix, "convert", *n, "-f", "raw", "-O", "raw", *tool.flags, ends.src, ends.dst]


def bench_row(
    row: Row, tools: list[Tool], args: argparse.Namespace, image: Path, ends: Endpoints
) -> None:
    trioconv = shlex.split(args.trioconv)
    print(f"== {row.label}", flush=True)
    for i in range(-args.warmup, args.repeat):
        for tool in tools:
            if ends.dst_is_lun:
                fill(ends.dst_file, args.size, args.fill)
            else:
                ends.dst_file.unlink(missing_ok=True)
            argv = tool_argv(tool, trioconv, ends)
            code, secs, rss, tail = run_timed(argv, args.timeout)
            if i < 0:  # untimed warm-up run
                continue
            ok = code == 0 and verify(image, str(ends.dst_file), args.timeout)
            row.record(tool.key, argv, code, secs, rss, tail, ok)
            print_progress(i, args.repeat, tool.label, 24, secs, rss, ok)
    if not ends.dst_is_lun:
        ends.dst_file.unlink(missing_ok=True)


def fmt_table(rows: list[Row], tools: list[Tool]) -> list[str]:
    return fmt_wall_table([(r.label, r) for r in rows], tools)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: servers are stopped


def default_trioconv() -> str:
    """The ``trioconv`` console script on PATH, else ``python -m trioconv``."""
    script = shutil.which("trioconv")
    return script if script else shlex.join([sys.executable, "-m", "trioconv"])


def main() -> int:
    ap = bench_parser(__doc__)
    add = ap.add_argument
    add_run_args(ap, size="1G")
    add(
        "--workdir",
        type=Path,
        default=Path("/var/tmp/trioconv-bench-iscsi"),
        help="source cache (nfs/export), LUN backing files (iscsi), local target",
    )
    add("--delays", type=parse_delays, default="0,1,5", help="one-way delays in ms, comma list")
    add("--paths", default=",".join(PATHS), help=f"comma list of {list(PATHS)}")
    add("--lun", default=",".join(LUN_KINDS), help="comma list of LUN kinds: thin, thick")
    add(
        "--tools",
        default=",".join(t.key for t in TOOLS),
        help="comma list of tools; 'trioconv' / 'qemu-img' select all of one program",
    )
    add("--trioconv", default=default_trioconv(), help="trioconv command")
    add("--fill", choices=["data", "zero"], default="data", help="LUN content before each run")
    add("--iscsi-port", type=int, default=3270, help="tgtd portal port (127.0.0.1 and proxy)")
    add("--control-port", type=int, default=70, help="tgtd/tgtadm control port (-C)")
    add("--timeout", type=float, default=900, help="kill a copy after this many seconds")
    add_output_args(ap)
    args = ap.parse_args()

    # An installed trioconv runs from compiled bytecode; a source tree under
    # PYTHONDONTWRITEBYTECODE would compile its modules again in every run. Python reads
    # existing .pyc files even then, so compile them once here.
    package = Path(__file__).resolve().parent.parent / "trioconv"
    if package.is_dir():
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=False)

    paths = select(args.paths, list(PATHS), "path(s)", ap)
    lun_kinds = select(args.lun, LUN_KINDS, "LUN kind(s)", ap)
    names = {n.strip() for n in args.tools.split(",") if n.strip()}
    choices = [t.key for t in TOOLS] + sorted({t.program for t in TOOLS})
    if unknown := sorted(names - set(choices)):
        ap.error(f"unknown tool(s) {unknown}; choose from {choices}")
    tools = [t for t in TOOLS if t.key in names or t.program in names]
    if not tools or not paths or args.repeat < 1 or args.warmup < 0 or args.timeout <= 0:
        ap.error("need tools, paths, --repeat >= 1, --warmup >= 0, --timeout > 0")
    if args.size % 512:
        ap.error("--size must be a multiple of 512 (a LUN is made of 512-byte blocks)")
    use_nfs = any(p.startswith("nfs") for p in paths)
    use_iscsi = any(p.endswith("iscsi") for p in paths)
    if use_iscsi and not lun_kinds:
        ap.error("iSCSI paths need --lun thin and/or thick")
    needed = ["qemu-img"]
    needed += ["ganesha.nfsd", "rpcbind", "rpcinfo"] if use_nfs else []
    needed += ["tgtd", "tgtadm"] if use_iscsi else []
    for prog in needed:
        if shutil.which(prog) is None:
            sys.exit(f"{prog} not found on PATH (Debian: qemu-utils nfs-ganesha rpcbind tgt)")
    for protocol, used in (("nfs", use_nfs), ("iscsi", use_iscsi)):
        if used and any(t.program == "qemu-img" for t in tools) and not qemu_img_speaks(protocol):
            sys.exit(f"qemu-img has no {protocol}:// driver (Debian: qemu-block-extra)")

    workdir: Path = args.workdir
    nfsroot, iscsiroot = workdir / "nfs", workdir / "iscsi"
    (nfsroot / "export").mkdir(parents=True, exist_ok=True)
    iscsiroot.mkdir(parents=True, exist_ok=True)
    name = f"source-v1-{args.size}-s{args.seed}.raw"
    image = nfsroot / "export" / name
    if not image.exists():
        create_in_child(lambda p: create_source(p, args.size, args.seed), image)
    print(image_info(image))

    routes: list[str] = []
    if use_nfs:
        routes += [f"{PROXY_HOST}:{p}={SERVER_HOST}:{p}" for p in (NFS_PORT, MOUNT_PORT)]
    if use_iscsi:
        routes += [f"{PROXY_HOST}:{args.iscsi_port}={SERVER_HOST}:{args.iscsi_port}"]
    nfs_src = f"nfs://{PROXY_HOST}/export/{name}"
    local_dst = workdir / "dst.raw"

    signal.signal(signal.SIGTERM, _sigterm)
    rows: list[Row] = []
    pmap, ganesha_ver, tgt_ver = "not used", "not used", "not used"
    luns: dict[str, tuple[str, Path]] = {}  # kind -> (URL through the proxy, backing file)
    with contextlib.ExitStack() as stack:
        if use_nfs:
            pmap = stack.enter_context(rpcbind())
            stack.enter_context(ganesha(nfsroot))
            ganesha_ver = version(["ganesha.nfsd", "-v"])
        if use_iscsi:
            server = stack.enter_context(tgtd(iscsiroot, args.iscsi_port, args.control_port))
            tgt_ver = version(["tgtd", "-V"])
            for tid, kind in enumerate(lun_kinds, start=1):
                backing = iscsiroot / f"lun-{kind}.raw"
                fill(backing, args.size, "zero")
                iqn = server.add_lun(tid, backing, thin=kind == "thin")
                luns[kind] = (f"iscsi://{PROXY_HOST}:{args.iscsi_port}/{iqn}/1", backing)
        for delay in args.delays:
            with delay_proxy(delay, routes):
                for path in paths:
                    src = nfs_src if path.startswith("nfs") else str(image)
                    if path.endswith("file"):
                        rows.append(Row(path, None, delay))
                        ends = Endpoints(src, str(local_dst), local_dst, False)
                        bench_row(rows[-1], tools, args, image, ends)
                        continue
                    for kind in lun_kinds:
                        rows.append(Row(path, kind, delay))
                        url, backing = luns[kind]
                        bench_row(rows[-1], tools, args, image, Endpoints(src, url, backing, True))
        for _, backing in luns.values():
            os.truncate(backing, 0)  # give the space back (the files stay, empty)

    report = [
        "# iSCSI convert: trioconv vs qemu-img (nfs -> iscsi, nfs -> file, file -> iscsi)",
        "",
        *machine_header(workdir),
        f"- tgt: {tgt_ver}; portal {SERVER_HOST}:{args.iscsi_port}, LUN 1 of each target"
        f" backed by a file of exactly the image size (thin: `thin_provisioning=1`)",
        f"- nfs-ganesha: {ganesha_ver} (VFS, NFSv3/TCP on {SERVER_HOST}); rpcbind: {pmap}",
        f"- source: {image_info(image)}; read as `{nfs_src}` or as the local file",
        f"- delay proxy: {PROXY_HOST} -> {SERVER_HOST} on ports {NFS_PORT}, {MOUNT_PORT} and"
        f" {args.iscsi_port}, each chunk held for the row's delay per direction (timestamp"
        " queue, order kept, pipelining unchanged); the portmapper itself is not delayed",
        f"- iSCSI targets: `iscsi://{PROXY_HOST}:{args.iscsi_port}/{IQN_PREFIX}:lun-KIND/1`,"
        f" backing file reset before every run (`--fill {args.fill}`"
        + (": non-zero data, synced)" if args.fill == "data" else ": sparse zeros)"),
        f"- commands: `{args.trioconv} convert -n -f raw -O raw FLAGS SRC LUN` and"
        " `qemu-img convert -n -f raw -O raw FLAGS SRC LUN`; into a file, the same without"
        " `-n` (the tool creates the file)",
        f"- {args.warmup} untimed warm-up + {args.repeat} timed runs per tool and row,"
        " interleaved; median wall time, max peak RSS; every timed output checked with"
        " `qemu-img compare` against the source (a LUN: its backing file)",
        rss_floor(),
        "- trioconv's start-up is in every trioconv time; at small `--size` it matters",
        "",
        *fmt_table(rows, tools),
    ]
    return finish_report(report, rows, args.output)


if __name__ == "__main__":
    sys.exit(main())
