"""Serve flowplay with several daphne processes on one listening socket.

    python -m flowplay.serve [-b 127.0.0.1] [-p 4454] [--processes N] [daphne options …]

The socket is bound here once and handed to ``WEB_CONCURRENCY`` (default 2) daphne
processes (``python -m flowplay.web --fd``: daphne with the request body guard); the kernel spreads the connections over them. Daphne, not
another ASGI server's workers, because the WebSocket consumer's back-pressure reads the
Twisted transport's send buffer (plays/wsauth.py). A process that exits is started again;
SIGTERM / SIGINT stop them all.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-b", "--host", default=os.environ.get("WEB_HOST", "127.0.0.1"))
    parser.add_argument("-p", "--port", type=int, default=int(os.environ.get("PORT", "4454")))
    parser.add_argument("--processes", type=int, default=int(os.environ.get("WEB_CONCURRENCY", "2")))
    parser.add_argument("--app", default="flowplay.asgi:application")
    args, daphne_args = parser.parse_known_args(argv)

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(1024)
    listener.set_inheritable(True)
    fd = listener.fileno()
    command = [sys.executable, "-m", "flowplay.web", "--fd", str(fd), *daphne_args, args.app]

    stopping = False
    children: list[subprocess.Popen] = []

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(max(1, args.processes)):
        children.append(subprocess.Popen(command, pass_fds=(fd,)))
    while not stopping:
        for i, child in enumerate(children):
            if child.poll() is not None and not stopping:
                print(
                    f"flowplay.serve: daphne {child.pid} exited with {child.returncode}; starting another",
                    file=sys.stderr,
                )
                time.sleep(0.5)
                children[i] = subprocess.Popen(command, pass_fds=(fd,))
        time.sleep(0.2)
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + 10
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
