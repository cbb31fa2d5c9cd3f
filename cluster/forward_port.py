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
Standard library only."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
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
        with open(pidfile + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(pidfile + ".tmp", pidfile)
    print(f"{PROG}: forwarding {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with server:
        await stop
    if pidfile:
        with contextlib.suppress(FileNotFoundError):
            if open(pidfile).read().strip() == str(os.getpid()):
                os.remove(pidfile)


def stop_running(pidfile: str) -> bool:
    try:
        pid = int(open(pidfile).read().strip())
    except (FileNotFoundError, ValueError):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.remove(pidfile)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


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
    if args.stop:
        print(f"{PROG}: {'stopped' if stop_running(args.pidfile) else 'no forwarder running for'} {args.pidfile}")
        return 0
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
    stop_running(pidfile)
    log = os.path.abspath(args.log or pidfile + ".log")
    child_argv = [sys.executable, os.path.abspath(__file__), "--listen", "%s:%d" % args.listen,
                  "--to", "%s:%d" % args.to, "--pidfile", pidfile]
    with open(log, "ab") as out:
        child = subprocess.Popen(child_argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 start_new_session=True, close_fds=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = open(log, errors="replace").read().strip().splitlines()[-1:] or ["(no output)"]
            print(f"{PROG}: the forwarder exited: {tail[0]}", file=sys.stderr)
            return 1
        if os.path.exists(pidfile):
            print(f"{PROG}: forwarding {args.listen[0]}:{args.listen[1]} -> {args.to[0]}:{args.to[1]} "
                  f"in the background (pid {child.pid}, log {log})")
            return 0
        time.sleep(0.05)
    child.terminate()
    print(f"{PROG}: the forwarder did not start listening within {args.timeout:g}s (log {log})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
