"""The side effect of the fleet tests' `curl` steps: an HTTP server that counts calls.

Runs inside the fleet's db namespace (``python fleet_target.py <address> <port>``), so the
workers reach it over the namespaces' links, never over loopback. ``GET /hit/<play>/<step>``
counts one call of that step of that play and remembers the caller's address (which host
ran it); ``GET /counts`` returns ``{"<play>/<step>": [address, …]}``. ``?ms=`` delays the
answer, so that plays are still running when a test cuts a link.
"""

from __future__ import annotations

import http.server
import json
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

calls: dict[str, list[str]] = {}
lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        if parts.path == "/counts":
            with lock:
                body = json.dumps(calls).encode()
        elif parts.path.startswith("/hit/"):
            key = parts.path[len("/hit/") :]
            with lock:
                calls.setdefault(key, []).append(self.client_address[0])
                n = len(calls[key])
            delay = float((parse_qs(parts.query).get("ms") or ["0"])[0]) / 1000
            if delay:
                time.sleep(delay)
            body = json.dumps({"key": key, "n": n}).encode()
        else:
            self.send_error(404)
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the caller's link went down

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    server = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler)
    server.daemon_threads = True
    server.serve_forever()
