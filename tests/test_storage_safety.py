"""Issue 13 (storage-safe values, a step runs again only when its worker died, broker errors
after commit). Run on PostgreSQL too: DATABASE_URL=postgres://… pytest tests/test_storage_safety.py"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from plays.models import Layer, Play

from .conftest import make_flow


class NulHandler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        NulHandler.hits[self.path] = NulHandler.hits.get(self.path, 0) + 1
        body = b'{"note": "x\\u0000y", "lone": "\\ud800", "pair": "\\ud83d\\ude00"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def nul_server() -> Any:
    NulHandler.hits = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NulHandler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_curl_side_effect_behind_a_nul_returning_server_is_called_once(api: Any, drain: Any, nul_server: str) -> None:
    flow = make_flow(api, [
        {"ref": "post", "appId": "curl", "args": {"url": nul_server + "/charge", "method": "POST"}},
        {"ref": "after", "appId": "var", "args": {"values": {"note": "{{ $prev.post.body.note }}"}}},
    ])
    r = api.post(f"/api/flows/{flow['id']}/run", {"args": {}}, format="json")
    play_id = r.json()["playId"]
    drain()
    play = api.get(f"/api/plays/{play_id}").json()
    assert play["state"] == "DONE", play
    assert NulHandler.hits == {"/charge": 1}
    out = Layer.objects.get(play_id=play_id, ref="post").out
    print(out)
