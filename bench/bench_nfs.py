#!/usr/bin/env python3
"""Benchmark NFS reads: ``trioconv convert`` vs ``qemu-img convert`` (nfs -> local file).

What it measures: the effect of asynchronous copying over NFS with network
latency.  The script starts ``rpcbind`` (unless a portmapper already answers on
127.0.0.1) and ``nfs-ganesha`` (VFS backend, NFSv3 over TCP, bound to
127.0.0.1) exporting ``WORKDIR/nfs/export`` as ``/export``, with the
configuration used by ``tests/nfs_server.py``.  In front of ganesha's NFS (2049)
and MOUNT (20048) ports it runs a small TCP delay proxy (a child process of this
script) on 127.0.0.2, same ports: every chunk read from one side is forwarded
to the other ``--delays`` milliseconds after it arrived, per direction, in
order, without waiting for earlier chunks to be delivered (a timestamped queue
per direction, so pipelined requests stay pipelined).  The portmapper hands out
the real ports, so ``nfs://127.0.0.2/export/IMAGE`` is the delayed path for
both tools.  (qemu-img 7.2's nfs driver refuses ``?nfsport=`` /
``?mountport=``, and a port in the URL does not bring it to the proxy (it
still asks the portmapper), so an explicit proxy port cannot be used for it;
``--trioconv-url port`` gives trioconv
``nfs://127.0.0.1:PORT/export/IMAGE?mountport=PORT2`` instead, with extra
proxy listeners on 127.0.0.1.)

Tools: trioconv ``-m 1``, ``-m 8 -W`` and its defaults (``-m 8``, in order),
qemu-img ``-m 1`` and ``-m 8 -W``, each called as
``CMD convert -f raw -O raw FLAGS SRC DST`` with DST a local file in
``--workdir`` (deleted before every run).  The source is a raw image of
``--size`` with the mixed layout of ``bench_convert.create_source``, cached in
the export folder.  Runs are interleaved across tools, ``--warmup`` untimed runs
per tool and delay, then ``--repeat`` timed ones; every timed output is checked
with ``qemu-img compare`` against the source file.  The report shows median
wall seconds, trioconv ``-m 8 -W`` / qemu-img ``-m 8 -W`` and trioconv default /
trioconv ``-m 8 -W``.  ganesha, rpcbind (if started here) and the proxy are
always stopped at exit.

Run from the project root, as root (ganesha and rpcbind bind privileged ports):

    python bench/bench_nfs.py --output bench/results-nfs.md
    python bench/bench_nfs.py --size 64M --repeat 1

Exits non-zero if any timed run fails or any output does not verify.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from bench_convert import (
    KIB,
    add_output_args,
    add_run_args,
    add_trioconv_arg,
    bench_parser,
    create_in_child,
    create_source,
    image_info,
    machine_header,
    ratio,
    write_report,
)
from bench_nbd import (
    Tally,
    Tool,
    print_progress,
    rss_cells,
    rss_floor,
    run_timed,
    table_head,
    time_cell,
    tool_table,
    verified_cell,
    verify,
    version,
)

SERVER_HOST = "127.0.0.1"
PROXY_HOST = "127.0.0.2"
NFS_PORT = 2049
MOUNT_PORT = 20048
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0  # ganesha takes 2-8 s to exit after SIGTERM
CHUNK = 256 * KIB

GANESHA_CONFIG = """\
NFS_CORE_PARAM {{
    Protocols = 3, 4;
    Bind_addr = {host};
    NFS_Port = {nfs_port};
    MNT_Port = {mount_port};
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
# Else files made outside NFS stay invisible for a while.
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
LOG {{ Default_Log_Level = EVENT; }}
"""


TOOLS = [
    Tool("trioconv-m1", "trioconv -m 1", "trioconv", ("-m", "1")),
    Tool("trioconv-m8-W", "trioconv -m 8 -W", "trioconv", ("-m", "8", "-W")),
    Tool("trioconv-default", "trioconv default (-m 8)", "trioconv"),
    Tool("qemu-img-m1", "qemu-img -m 1", "qemu-img", ("-m", "1")),
    Tool("qemu-img-m8-W", "qemu-img -m 8 -W", "qemu-img", ("-m", "8", "-W")),
]
#: With ``--baseline CMD``: the same trioconv runs through another trioconv command (an
#: older tree), in the same interleaved rounds, for before/after numbers.
BASELINE_TOOLS = [
    Tool("baseline-m8-W", "baseline -m 8 -W", "baseline", ("-m", "8", "-W")),
    Tool("baseline-default", "baseline default (-m 8)", "baseline"),
]


@dataclass
class Result(Tally):
    delay_ms: float
    cpu: dict[str, list[float]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"nfs -> file, {self.delay_ms:g} ms"


# --------------------------------------------------------------------------- proxy


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Forward reader -> writer, each chunk ``delay`` s after it arrived, in order.

    Reading never waits for delivery: chunks go into a queue stamped with their
    due time, and a separate task writes each one when it is due.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(CHUNK)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await sender
    finally:
        sender.cancel()


async def _serve_proxy(routes: list[tuple[str, int, str, int]], delay: float) -> None:
    async def handle(
        c_reader: asyncio.StreamReader,
        c_writer: asyncio.StreamWriter,
        target: tuple[str, int],
    ) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection(*target)
        except OSError:
            c_writer.close()
            return
        pumps = [
            asyncio.create_task(_pump(c_reader, s_writer, delay)),
            asyncio.create_task(_pump(s_reader, c_writer, delay)),
        ]
        try:
            # EOF (delivered after the delay) or a reset either way ends the connection.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in pumps:
                t.cancel()
            for t in pumps:
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await t
            for w in (s_writer, c_writer):
                w.close()

    servers = []
    for lhost, lport, thost, tport in routes:
        target = (thost, tport)

        async def cb(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, target: tuple[str, int] = target
        ) -> None:
            await handle(r, w, target)

        servers.append(await asyncio.start_server(cb, lhost, lport, reuse_address=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for s in servers:
        s.close()


def proxy_main(argv: list[str]) -> int:
    """``bench_nfs.py --proxy DELAY_MS LHOST:LPORT=THOST:TPORT ...`` (used internally)."""
    delay = float(argv[0]) / 1000
    routes = []
    for spec in argv[1:]:
        left, right = spec.split("=")
        lh, lp = left.rsplit(":", 1)
        th, tp = right.rsplit(":", 1)
        routes.append((lh, int(lp), th, int(tp)))
    asyncio.run(_serve_proxy(routes, delay))
    return 0


# --------------------------------------------------------------------------- servers


def guarded(argv: list[str]) -> list[str]:
    """argv under ``setpriv --pdeathsig KILL`` when available (dies with this script)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", *argv] if setpriv else argv


def rpc_answers(program: str, vers: str, host: str = SERVER_HOST) -> bool:
    try:
        r = subprocess.run(
            ["rpcinfo", "-T", "tcp", host, program, vers], capture_output=True, timeout=10
        )
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def stop_proc(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def spawn(argv: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
    with open(log or os.devnull, "ab") as err:
        return subprocess.Popen(
            guarded(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )


@contextlib.contextmanager
def rpcbind() -> Iterator[str]:
    """A portmapper on 127.0.0.1: the running one, or rpcbind started (and stopped) here."""
    if rpc_answers("100000", "2"):
        yield "already running (left alone)"
        return
    os.makedirs("/run/rpcbind", exist_ok=True)
    proc = spawn(["rpcbind", "-f"])
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not rpc_answers("100000", "2"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("rpcbind did not start")
            time.sleep(0.1)
        yield "started here"
    finally:
        stop_proc(proc)


@contextlib.contextmanager
def ganesha(root: Path) -> Iterator[Path]:
    """nfs-ganesha exporting ``root/export`` as ``/export``; yields the export folder."""
    if rpc_answers("100003", "3"):
        raise RuntimeError("an NFS server is already registered with the portmapper")
    export = root / "export"
    export.mkdir(parents=True, exist_ok=True)
    export.chmod(0o777)
    (root / "ganesha-recov").mkdir(exist_ok=True)
    conf = root / "ganesha.conf"
    conf.write_text(
        GANESHA_CONFIG.format(dir=root, host=SERVER_HOST, nfs_port=NFS_PORT, mount_port=MOUNT_PORT)
    )
    log = root / "ganesha.log"
    argv = ["ganesha.nfsd", "-F", "-f", str(conf), "-L", str(log), "-p", str(root / "ganesha.pid")]
    proc = spawn(argv)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (rpc_answers("100003", "3") and rpc_answers("100005", "3")):
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"ganesha.nfsd exited {proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ganesha.nfsd not registered after {START_TIMEOUT:g} s")
            time.sleep(0.2)
        yield export
    finally:
        stop_proc(proc)


@contextlib.contextmanager
def delay_proxy(delay_ms: float, routes: list[str]) -> Iterator[None]:
    """The delay proxy as a child process (``--proxy``); ready once it prints ``ready``."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--proxy", f"{delay_ms:g}", *routes]
    proc = subprocess.Popen(
        guarded(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=None
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"delay proxy failed to start: {shlex.join(argv)}")
        yield
    finally:
        stop_proc(proc, timeout=5)


# --------------------------------------------------------------------------- bench


def bench_delay(
    res: Result,
    tools: list[Tool],
    args: argparse.Namespace,
    image: Path,
    urls: dict[str, str],
) -> None:
    prefixes = {"trioconv": shlex.split(args.trioconv), "qemu-img": ["qemu-img"]}
    if args.baseline:
        prefixes["baseline"] = shlex.split(args.baseline)
    dst = args.workdir / "dst.raw"
    print(f"== nfs -> file, {res.delay_ms:g} ms one-way delay", flush=True)
    for i in range(-args.warmup, args.repeat):
        for tool in tools:
            prefix = prefixes[tool.program]
            src = urls["trioconv" if tool.program == "baseline" else tool.program]
            argv = [*prefix, "convert", "-f", "raw", "-O", "raw", *tool.flags, src, str(dst)]
            dst.unlink(missing_ok=True)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            code, secs, rss, tail = run_timed(argv, args.timeout)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            if i < 0:  # untimed warm-up run
                dst.unlink(missing_ok=True)
                continue
            ok = code == 0 and verify(image, str(dst), args.timeout)
            res.record(tool.key, argv, code, secs, rss, tail, ok)
            if ok:
                res.cpu.setdefault(tool.key, []).append(cpu)
            print_progress(i, args.repeat, tool.label, 24, secs, rss, ok, f" {cpu:7.3f} s CPU")
            dst.unlink(missing_ok=True)


def fmt_wall_table(rows: list[tuple[str, Tally]], tools: list[Tool]) -> list[str]:
    """Median wall seconds with the -W ratios, then peak RSS; ``rows``: (label, results)."""
    head = ["row", *(f"{t.label} s" for t in tools)]
    head += ["trioconv -m 8 -W / qemu-img -m 8 -W", "trioconv default / -m 8 -W", "verified"]
    out = ["Median wall seconds; ratios < 1 mean the first one is faster.", "", *table_head(head)]
    for label, r in rows:
        cells = [label, *(time_cell(r.median(t.key), r.failed.get(t.key, 0)) for t in tools)]
        cells += [
            ratio(r.median("trioconv-m8-W"), r.median("qemu-img-m8-W")),
            ratio(r.median("trioconv-default"), r.median("trioconv-m8-W")),
            verified_cell(r),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out + tool_table(
        "Peak RSS (MiB):", tools, [(label, rss_cells(r, tools)) for label, r in rows]
    )


def fmt_table(results: list[Result], tools: list[Tool]) -> list[str]:
    out = fmt_wall_table([(r.label, r) for r in results], tools)
    cpu = [
        (
            r.label,
            [f"{statistics.median(r.cpu[t.key]):.3f}" if r.cpu.get(t.key) else "-" for t in tools],
        )
        for r in results
    ]
    title = "Median CPU seconds of the copy process (user + sys, from its rusage):"
    out += tool_table(title, tools, cpu)
    if any(t.program == "baseline" for t in tools):
        out += ["", "Against the baseline (ratios < 1: faster than the baseline):", ""]
        out += ["| row | -m 8 -W wall | default wall | -m 8 -W CPU | default CPU |"]
        out += ["|---|---:|---:|---:|---:|"]
        for r in results:
            cells = []
            for kind in ("times", "cpu"):
                for flags in ("m8-W", "default"):
                    new, old = (
                        getattr(r, kind).get(f"trioconv-{flags}"),
                        getattr(r, kind).get(f"baseline-{flags}"),
                    )
                    cells.append(
                        ratio(statistics.median(new), statistics.median(old))
                        if new and old
                        else "-"
                    )
            out.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return out


def finish_report(report: list[str], rows: Sequence[Tally], output: Path | None) -> int:
    """Add the first failures to the report and write it; the exit code: 1 if any failed."""
    failures = [f for r in rows for f in r.failures]
    if failures:
        report += ["", "## Failures", "", *(f"- {f}" for f in failures[:5])]
    write_report(report, output)
    return 1 if failures else 0


def parse_delays(text: str) -> list[float]:
    try:
        delays = [float(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad delay list {text!r} (use e.g. 1,5)") from None
    if not delays or any(d < 0 for d in delays):
        raise argparse.ArgumentTypeError("delays must be a non-empty list of ms >= 0")
    return delays


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: servers are stopped


def main() -> int:
    ap = bench_parser(__doc__)
    add = ap.add_argument
    add_run_args(
        ap,
        size="256M",
        repeat_help="timed runs per tool and delay",
        warmup_help="untimed runs per tool before each delay",
    )
    add(
        "--workdir",
        type=Path,
        default=Path("/var/tmp/trioconv-bench-nfs"),
        help="export folder (source cache, under nfs/export) + local target dir",
    )
    add("--delays", type=parse_delays, default="1,5", help="one-way delays in ms, comma list")
    add(
        "--tools",
        default=",".join(t.key for t in TOOLS),
        help="comma list of tools",
    )
    add_trioconv_arg(ap)
    add(
        "--trioconv-url",
        choices=["portmap", "port"],
        default="portmap",
        help="'portmap': the same URL as qemu-img (proxy on 127.0.0.2, ports from the "
        "portmapper); 'port': nfs://127.0.0.1:PROXY_PORT/...?mountport=PROXY_PORT+1",
    )
    add(
        "--proxy-port", type=int, default=12049, help="127.0.0.1 proxy port for --trioconv-url port"
    )
    add(
        "--baseline",
        help="another trioconv command (e.g. an older tree: 'env -C /tmp/old python -m "
        "trioconv') run as baseline -m 8 -W and baseline default beside the others",
    )
    add("--timeout", type=float, default=600, help="kill a copy after this many seconds")
    add_output_args(ap)
    args = ap.parse_args()

    keys = [k.strip() for k in args.tools.split(",") if k.strip()]
    known = TOOLS + (BASELINE_TOOLS if args.baseline else [])
    if args.baseline and args.tools == ap.get_default("tools"):
        keys += [t.key for t in BASELINE_TOOLS]
    if unknown := [k for k in keys if k not in {t.key for t in known}]:
        ap.error(f"unknown tool(s) {unknown}; choose from {[t.key for t in known]}")
    tools = [t for t in known if t.key in keys]
    if not tools or args.repeat < 1 or args.warmup < 0 or args.timeout <= 0:
        ap.error("need tools, --repeat >= 1, --warmup >= 0, --timeout > 0")
    for prog in ("qemu-img", "ganesha.nfsd", "rpcbind", "rpcinfo"):
        if shutil.which(prog) is None:
            sys.exit(f"{prog} not found on PATH (Debian: nfs-ganesha nfs-ganesha-vfs rpcbind)")
    workdir: Path = args.workdir
    nfsroot = workdir / "nfs"
    (nfsroot / "export").mkdir(parents=True, exist_ok=True)
    name = f"source-v1-{args.size}-s{args.seed}.raw"
    image = nfsroot / "export" / name
    if not image.exists():
        create_in_child(lambda p: create_source(p, args.size, args.seed), image)
    print(image_info(image))

    routes = [f"{PROXY_HOST}:{p}={SERVER_HOST}:{p}" for p in (NFS_PORT, MOUNT_PORT)]
    urls = {"qemu-img": f"nfs://{PROXY_HOST}/export/{name}"}
    if args.trioconv_url == "port":
        pp, mp = args.proxy_port, args.proxy_port + 1
        routes += [f"{SERVER_HOST}:{pp}={SERVER_HOST}:{NFS_PORT}"]
        routes += [f"{SERVER_HOST}:{mp}={SERVER_HOST}:{MOUNT_PORT}"]
        urls["trioconv"] = f"nfs://{SERVER_HOST}:{pp}/export/{name}?mountport={mp}"
    else:
        urls["trioconv"] = urls["qemu-img"]

    signal.signal(signal.SIGTERM, _sigterm)
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        pmap = stack.enter_context(rpcbind())
        stack.enter_context(ganesha(nfsroot))
        ganesha_ver = version(["ganesha.nfsd", "-v"])
        for delay in args.delays:
            results.append(Result(delay))
            with delay_proxy(delay, routes):
                bench_delay(results[-1], tools, args, image, urls)

    report = [
        "# NFS convert: trioconv vs qemu-img (nfs -> local raw file)",
        "",
        *machine_header(workdir),
        f"- nfs-ganesha: {ganesha_ver} (VFS, NFSv3/TCP on {SERVER_HOST}); rpcbind: {pmap}",
        f"- source: {image_info(image)}, exported as `/export/{name}`",
        f"- delay proxy: {PROXY_HOST}:{NFS_PORT} and :{MOUNT_PORT} -> {SERVER_HOST}, each chunk"
        " held for the row's delay per direction (timestamp queue, order kept, pipelining"
        " unchanged); the portmapper itself is not delayed",
        f"- qemu-img source: `{urls['qemu-img']}`; trioconv source: `{urls['trioconv']}`",
        *(
            [f"- baseline: `{args.baseline} convert -f raw -O raw FLAGS SRC DST`"]
            if args.baseline
            else []
        ),
        f"- commands: `{args.trioconv} convert -f raw -O raw FLAGS SRC DST`,"
        " `qemu-img convert -f raw -O raw FLAGS SRC DST`; DST a local file in the workdir",
        f"- {args.warmup} untimed warm-up + {args.repeat} timed runs per tool and delay,"
        " interleaved; median wall time, max peak RSS; every timed output checked with"
        " `qemu-img compare` against the exported file",
        rss_floor(),
        "- trioconv's start-up is in every trioconv time; at small `--size` it matters",
        "",
        *fmt_table(results, tools),
    ]
    return finish_report(report, results, args.output)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--proxy":
        sys.exit(proxy_main(sys.argv[2:]))
    sys.exit(main())
