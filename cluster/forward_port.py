#!/usr/bin/env python3
"""A small TCP port forwarder, so that one MLflow URI, http://127.0.0.1:5000, works on every node
of the Ray clusters in this folder (see cluster/README.md):

* on the head, the tracking server listens on 127.0.0.1:5000 only, and this forwards the head's
  private address (the one Ray registered for the node) to it:
      forward_port.py --listen ray-node-ip:5000 --to 127.0.0.1:5000
* on each worker, this forwards the worker's own 127.0.0.1:5000 to the head's private address:
      forward_port.py --listen 127.0.0.1:5000 --to $RAY_HEAD_IP:5000

Nothing listens on a public address. `--daemon` detaches, writes --pidfile and returns once the
port is listening (an old forwarder of the same --pidfile is stopped first); `--stop` stops it.

The pid file holds the forwarder's pid, its start time (field 22 of /proc/PID/stat) and its command
line; `--stop` and `--daemon` signal a process only if all three still match, so a stale pid file (a
crash, a reboot, a reused pid) never stops a stranger: it is removed with a one-line note, and
`--stop` exits 1. A pid file that is a symbolic link or belongs to another user is refused (it may sit
in a shared folder such as /tmp). Linux only (/proc). Standard library only."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time

PROG = "cluster/forward_port.py"


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    if host == "ray-node-ip":
        host = ray_node_ip()
    return host.strip("[]"), int(port)


def ray_node_ip() -> str:
    """The address Ray uses for this node: the private one the other nodes reach it by."""
    try:
        from ray.util import get_node_ip_address
    except ImportError as e:  # pragma: no cover - Ray is installed wherever the configs run this
        raise argparse.ArgumentTypeError(f"ray-node-ip needs Ray installed: {e}") from e
    return get_node_ip_address()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def handle(client_reader, client_writer, target: tuple[str, int]) -> None:
    try:
        up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*target), timeout=10)
    except (OSError, asyncio.TimeoutError) as e:
        print(f"{PROG}: cannot reach {target[0]}:{target[1]}: {e}", file=sys.stderr, flush=True)
        client_writer.close()
        return
    try:
        await asyncio.gather(pipe(client_reader, up_writer), pipe(up_reader, client_writer))
    finally:
        for w in (up_writer, client_writer):
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()


async def serve(listen: tuple[str, int], target: tuple[str, int], pidfile: str | None) -> None:
    server = await asyncio.start_server(lambda r, w: handle(r, w, target), *listen, reuse_address=True)
    if pidfile:  # written only once listening: --daemon waits for it
        write_pidfile(pidfile)
    print(f"{PROG}: forwarding {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with server:
        await stop
    if pidfile:
        with contextlib.suppress(OSError, PidfileError):
            if read_pidfile(pidfile)[0] == os.getpid():
                os.remove(pidfile)


class PidfileError(Exception):
    """A pid file this program must not act on; the message says why, in one line."""


def process_identity(pid: int) -> tuple[str, str] | None:
    """(start time, command line) of a live process: field 22 of /proc/PID/stat (clock ticks after
    boot; a reused pid has another) and /proc/PID/cmdline with its NULs as spaces. None when no such
    process runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after "PID (COMM)": COMM may hold spaces
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    if not fields or fields[0] == "Z":
        return None
    return fields[19], cmdline.replace(b"\0", b" ").replace(b"\n", b" ").decode(errors="replace")


def write_pidfile(pidfile: str) -> None:
    """This process's pid, start time and command line, written atomically through a private
    temporary file (O_EXCL, mode 0600: no link planted in a shared folder is followed)."""
    start, cmdline = process_identity(os.getpid())
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(pidfile) or ".", prefix=os.path.basename(pidfile) + ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n{start}\n{cmdline}\n")
        os.replace(tmp, pidfile)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_pidfile(pidfile: str) -> tuple[int, str, str]:
    """(pid, start time, command line) from a pid file of ours. FileNotFoundError when there is none;
    PidfileError for a link or another user's file (never trusted, never removed)."""
    try:
        fd = os.open(pidfile, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise PidfileError(f"cannot read {pidfile} ({e.strerror}): a symbolic link is never trusted; "
                           "choose another --pidfile") from e
    with os.fdopen(fd) as f:
        owner = os.fstat(f.fileno()).st_uid
        if owner != os.geteuid():
            raise PidfileError(f"{pidfile} belongs to uid {owner}, not to you: not trusted; choose another --pidfile")
        lines = f.read().split("\n")
    if len(lines) < 3 or not lines[0].isdigit() or not lines[1].isdigit():
        return 0, "", ""  # an old or foreign format: names no process we could vouch for
    return int(lines[0]), lines[1], lines[2]


def owned_forwarder(pidfile: str) -> tuple[int | None, str]:
    """(pid, "") of the forwarder that wrote pidfile if that very process still runs; else (None, why).
    FileNotFoundError when there is no pid file."""
    pid, start, cmdline = read_pidfile(pidfile)
    if not pid:
        return None, "it records no pid, start time and command line"
    identity = process_identity(pid)
    if identity is None:
        return None, f"pid {pid} is not running"
    if identity != (start, cmdline):
        return None, f"pid {pid} is another process now"
    return pid, ""


def stop_pid(pid: int) -> None:
    """TERM, then KILL after 5 s if that very process still runs: only ever called with a pid
    owned_forwarder vouched for."""
    identity = process_identity(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    for _ in range(50):
        if process_identity(pid) != identity:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def clear_pidfile(pidfile: str) -> str | None:
    """Before a --daemon start: stops the forwarder pidfile names if it is ours, removes a stale pid
    file. Returns a note for the user, or None when there was no pid file."""
    try:
        pid, why = owned_forwarder(pidfile)
    except FileNotFoundError:
        return None
    if pid is not None:
        stop_pid(pid)
    with contextlib.suppress(FileNotFoundError):
        os.remove(pidfile)
    return (f"replaced the forwarder of {pidfile} (pid {pid})" if pid is not None
            else f"removed the stale {pidfile} ({why}); no process was signalled")


def stop_command(pidfile: str) -> int:
    try:
        pid, why = owned_forwarder(pidfile)
    except FileNotFoundError:
        print(f"{PROG}: --stop: no forwarder running for {pidfile} (no such file)", file=sys.stderr)
        return 1
    if pid is not None:
        stop_pid(pid)
    with contextlib.suppress(FileNotFoundError):  # the forwarder removes its own on a clean exit
        os.remove(pidfile)
    if pid is None:
        print(f"{PROG}: --stop: {pidfile} is stale ({why}): removed it, stopped nothing", file=sys.stderr)
        return 1
    print(f"{PROG}: stopped the forwarder of {pidfile} (pid {pid})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=parse_address, metavar="HOST:PORT",
                        help="where to accept connections; HOST 'ray-node-ip' is the node's address in Ray")
    parser.add_argument("--to", type=parse_address, metavar="HOST:PORT", help="where to forward them")
    parser.add_argument("--pidfile", help="pid file (required with --daemon and --stop)")
    parser.add_argument("--log", help="log file of the daemon (default: PIDFILE.log)")
    parser.add_argument("--daemon", action="store_true", help="run in the background; return once listening")
    parser.add_argument("--stop", action="store_true", help="stop the forwarder of --pidfile")
    parser.add_argument("--timeout", type=float, default=15, help="seconds --daemon waits (default: 15)")
    args = parser.parse_args(argv)

    if (args.daemon or args.stop) and not args.pidfile:
        parser.error("--daemon and --stop need --pidfile")
    if args.pidfile and not os.path.isdir("/proc/self"):
        parser.error("--pidfile needs Linux's /proc (to check which process a pid file names)")
    if args.stop:
        try:
            return stop_command(os.path.abspath(args.pidfile))
        except PidfileError as e:
            print(f"{PROG}: --stop: {e}", file=sys.stderr)
            return 1
    if not args.listen or not args.to:
        parser.error("--listen and --to are required")
    if args.listen == args.to:
        parser.error("--listen and --to are the same address")

    if not args.daemon:
        try:
            asyncio.run(serve(args.listen, args.to, args.pidfile))
        except OSError as e:
            print(f"{PROG}: cannot listen on {args.listen[0]}:{args.listen[1]}: {e.strerror or e}", file=sys.stderr)
            return 1
        return 0

    pidfile = os.path.abspath(args.pidfile)
    try:
        note = clear_pidfile(pidfile)
    except PidfileError as e:
        print(f"{PROG}: --pidfile {e}", file=sys.stderr)
        return 1
    if note:
        print(f"{PROG}: {note}", file=sys.stderr)
    log = os.path.abspath(args.log or pidfile + ".log")
    child_argv = [sys.executable, os.path.abspath(__file__), "--listen", "%s:%d" % args.listen,
                  "--to", "%s:%d" % args.to, "--pidfile", pidfile]
    try:  # private, and no link planted in a shared folder (the default log sits beside the pid file)
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        print(f"{PROG}: cannot open the log {log}: {e.strerror} (choose another --log)", file=sys.stderr)
        return 1
    with os.fdopen(out, "ab") as out:
        child = subprocess.Popen(child_argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 start_new_session=True, close_fds=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = open(log, errors="replace").read().strip().splitlines()[-1:] or ["(no output)"]
            print(f"{PROG}: the forwarder exited: {tail[0]}", file=sys.stderr)
            return 1
        listening = False
        with contextlib.suppress(OSError, PidfileError):
            listening = read_pidfile(pidfile)[0] == child.pid
        if listening:
            print(f"{PROG}: forwarding {args.listen[0]}:{args.listen[1]} -> {args.to[0]}:{args.to[1]} "
                  f"in the background (pid {child.pid}, log {log})")
            return 0
        time.sleep(0.05)
    child.terminate()
    print(f"{PROG}: the forwarder did not start listening within {args.timeout:g}s (log {log})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
