"""The egress policy of ``curl`` (flows/egress.py): one address check after DNS resolution
and on every redirect hop, connecting to the checked address.

Found (issue 13): with loopback denied, ``curl`` still reached it through ``0.0.0.0``, ``0``
and a redirect to ``http://0.0.0.0:…``; NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16`` and
IPv4-compatible forms of denied addresses were not denied; the default policy let a tenant
reach any private or loopback service of the host.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import pytest

from flows import egress, modules

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK_DENIED = ["127.0.0.0/8", "::1/128"]


def policy(monkeypatch: pytest.MonkeyPatch, **conf: Any) -> egress.OutboundPolicy:
    monkeypatch.setattr(egress, "_flowplay_settings", lambda: conf)
    return egress.OutboundPolicy.from_settings()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", "http://" + self.path[len("/to/") :])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps({"host": self.headers.get("Host"), "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def port() -> Any:
    httpd = ThreadingHTTPServer(("0.0.0.0", 0), Handler)
    httpd.daemon_threads = True
    Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def run(args: dict[str, Any]) -> Any:
    ctx = modules.RunContext(play_id="p", flow_id="f", company_id="c", ref="r", attempt=1, timeout=10)
    return modules.get_module("curl").run(args, ctx)


def denied(args: dict[str, Any]) -> str:
    with pytest.raises(modules.StepError) as info:
        run(args)
    return info.value.code


# --- The check, address by address ------------------------------------------------------

LOOPBACK_FORMS = [
    "127.0.0.1",
    "127.1.2.3",
    "0.0.0.0",
    "0.1.2.3",
    "::1",
    "::",
    "::ffff:127.0.0.1",
    "::127.0.0.1",
    "64:ff9b::7f00:1",
    "2002:7f00:1::1",
]


@pytest.mark.parametrize("address", LOOPBACK_FORMS)
def test_every_form_of_loopback_is_denied_when_loopback_is(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    assert policy(monkeypatch, CURL_DENY=LOOPBACK_DENIED).address_denied(address)
    # The embedded default allows loopback (the README's tutorial fetches from localhost).
    assert not policy(monkeypatch).address_denied(address)


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "::ffff:169.254.169.254",
        "::169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "2002:a9fe:a9fe::",
        "fd00:ec2::254",
        "100.100.100.200",
    ],
)
def test_metadata_is_denied_in_every_form_by_default(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    assert policy(monkeypatch).address_denied(address)


NOT_PUBLIC = [
    *LOOPBACK_FORMS,
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",
    "169.254.1.1",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "64:ff9b::a00:1",
    "64:ff9b::808:808",
    "64:ff9b:1::1",
    "2002:a00:1::",
    "2002:808:808::",
    "2001::1",
    "::ffff:10.0.0.1",
    "::ffff:8.8.8.8",
    "::10.0.0.1",
    "2001:db8::1",
    "192.0.2.1",
]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_production_denies_every_address_that_is_not_public(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    assert policy(monkeypatch, PRODUCTION=True).address_denied(address)
    assert policy(monkeypatch, CURL_PUBLIC_ONLY=True).address_denied(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_production_allows_public_addresses(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    assert not policy(monkeypatch, CURL_PUBLIC_ONLY=True).address_denied(address)


def test_the_allow_list_names_destinations_in_any_form(monkeypatch: pytest.MonkeyPatch) -> None:
    strict = policy(monkeypatch, CURL_PUBLIC_ONLY=True, CURL_ALLOW=["10.1.2.0/24", "billing.internal"])
    assert not strict.address_denied("10.1.2.3")
    assert not strict.address_denied("::ffff:10.1.2.3")
    assert strict.address_denied("10.1.3.1")
    strict.check("billing.internal", ["10.9.9.9"])  # allowed by name: no error
    with pytest.raises(modules.StepError) as info:
        strict.check("other.internal", ["10.9.9.9"])
    assert info.value.code == "HOST_DENIED" and "10.9.9.9" in info.value.message


def test_public_only_follows_production_in_settings() -> None:
    code = "from django.conf import settings; print(settings.FLOWPLAY['CURL_PUBLIC_ONLY'])"
    base = {k: v for k, v in os.environ.items() if k not in ("FLOWPLAY_PRODUCTION", "FLOWPLAY_CURL_PUBLIC_ONLY")}
    base["DJANGO_SETTINGS_MODULE"] = "flowplay.settings"

    def value(**env: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60
        )
        return out.stdout.strip() or out.stderr

    assert value() == "False"
    assert value(FLOWPLAY_PRODUCTION="1", SECRET_KEY="k" * 60) == "True"
    assert value(FLOWPLAY_PRODUCTION="1", SECRET_KEY="k" * 60, FLOWPLAY_CURL_PUBLIC_ONLY="0") == "False"
    assert value(FLOWPLAY_CURL_PUBLIC_ONLY="1") == "True"


# --- Real requests: the names, the redirects, the pinned connection ----------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "0", "127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
def test_curl_cannot_reach_loopback_by_another_name(monkeypatch: pytest.MonkeyPatch, port: int, host: str) -> None:
    policy(monkeypatch, CURL_DENY=LOOPBACK_DENIED)
    assert denied({"url": f"http://{host}:{port}/x"}) == "HOST_DENIED"


@pytest.mark.parametrize("target", ["0.0.0.0", "0", "127.0.0.1"])
def test_curl_cannot_reach_loopback_through_a_redirect(monkeypatch: pytest.MonkeyPatch, port: int, target: str) -> None:
    """A public server redirecting to loopback: the first hop is allowed, the second is not."""
    real = socket.getaddrinfo

    def resolve(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "public.example.test":  # stands for a public server: allow-listed by name
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    policy(monkeypatch, CURL_DENY=LOOPBACK_DENIED, CURL_ALLOW=["public.example.test"])
    assert run({"url": f"http://public.example.test:{port}/ok"})["statusCode"] == 200
    assert denied({"url": f"http://public.example.test:{port}/to/{target}:{port}/secret"}) == "HOST_DENIED"


def test_production_policy_refuses_loopback_and_the_allow_list_opens_it(
    monkeypatch: pytest.MonkeyPatch, port: int
) -> None:
    policy(monkeypatch, PRODUCTION=True)
    assert denied({"url": f"http://127.0.0.1:{port}/x"}) == "HOST_DENIED"
    assert denied({"url": f"http://localhost:{port}/x"}) == "HOST_DENIED"
    policy(monkeypatch, PRODUCTION=True, CURL_ALLOW=["127.0.0.1/32"])
    assert run({"url": f"http://127.0.0.1:{port}/x"})["statusCode"] == 200


def test_the_connection_goes_to_the_checked_address_with_the_urls_host(
    monkeypatch: pytest.MonkeyPatch, port: int
) -> None:
    """One lookup per connection, whose checked answer is the address connected to; Host stays the name."""
    real = socket.getaddrinfo
    lookups: list[str] = []
    connects: list[str] = []

    def resolve(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "pinned.example.test":
            lookups.append(host)
            # A rebinding resolver: public-looking first, loopback for any later lookup.
            return real("127.0.0.1" if len(lookups) == 1 else "0.0.0.0", *args, **kwargs)
        return real(host, *args, **kwargs)

    real_connect = modules.httpcore.SyncBackend.connect_tcp

    def connect(self: Any, host: str, *args: Any, **kwargs: Any) -> Any:
        connects.append(host)
        return real_connect(self, host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(modules.httpcore.SyncBackend, "connect_tcp", connect)
    policy(monkeypatch, CURL_DENY=["0.0.0.0/32"])
    out = run({"url": f"http://pinned.example.test:{port}/x"})
    assert out["body"] == {"host": f"pinned.example.test:{port}", "path": "/x"}
    assert lookups == ["pinned.example.test"] and connects == ["127.0.0.1"]


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls_to_the_pinned_address_sends_sni_and_checks_the_certificate_for_the_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import ssl

    name = "pinned.example.test"
    cert, key = _self_signed(tmp_path, name)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda sock, server_name, ctx: sni.append(server_name)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    httpd.daemon_threads = True
    Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        client_ctx = ssl.create_default_context(cafile=str(cert))  # trusts this certificate only
        monkeypatch.setattr(egress, "_ssl_context", lambda: client_ctx)
        real = socket.getaddrinfo

        def resolve(host: str, *args: Any, **kwargs: Any) -> Any:
            return real("127.0.0.1" if host == name else host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", resolve)
        policy(monkeypatch)
        out = run({"url": f"https://{name}:{port}/tls"})
        assert out["body"] == {"host": f"{name}:{port}", "path": "/tls"}
        assert sni == [name]  # the URL's name, although the socket went to 127.0.0.1
        # The certificate is checked against the name: by address, it does not match.
        assert denied({"url": f"https://127.0.0.1:{port}/tls"}) == "HTTP_ERROR"
    finally:
        httpd.shutdown()
        httpd.server_close()
