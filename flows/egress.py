"""Where a step may connect: the egress policy and the one address check of ``curl``.

The check runs where the connection is made, for every connection (the first request and
every redirect hop): the host is resolved here, each address is checked, and the socket is
opened to the checked address itself, so DNS cannot answer differently between the check
and the connect (rebinding). TLS still verifies and sends SNI for the URL's host name, and
the ``Host`` header is the URL's: only the TCP connect is pinned to the address.

An address is checked in every form it can reach: an IPv4 address hidden in an IPv6 one
(IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4
``2002::/16``) is checked as that IPv4 address too, and "this host" (``0.0.0.0/8``, ``::``,
which the kernel connects to the local machine) as loopback.

The policy (settings ``FLOWPLAY["CURL_*"]``):

- ``FLOWPLAY_CURL_DENY``: networks always denied; by default the cloud metadata services
  (``169.254.0.0/16``, ``fd00:ec2::254``, ``100.100.100.200``).
- ``FLOWPLAY_CURL_PUBLIC_ONLY`` (on by default with ``FLOWPLAY_PRODUCTION``, off on the
  embedded ``make run``, whose tutorial fetches from ``localhost``): deny every address that
  is not public, i.e. loopback, private (RFC 1918, ULA ``fc00::/7``, shared ``100.64.0.0/10``),
  link-local, ``0.0.0.0/8`` and ``::``, multicast, reserved and documentation ranges, and the
  translation prefixes whatever they embed: NAT64 (``64:ff9b::/96``, ``64:ff9b:1::/48``), 6to4
  (``2002::/16``), Teredo (``2001::/32``), IPv4-compatible and IPv4-mapped addresses.
- ``FLOWPLAY_CURL_ALLOW``: networks (CIDR) and host names that pass anyway, e.g. an internal
  API: ``FLOWPLAY_CURL_ALLOW=10.1.2.0/24,billing.internal``.

Framework-free: imports without Django configured (settings are read on each use).
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

DEFAULT_CURL_DENY = ["169.254.0.0/16", "fd00:ec2::254/128", "100.100.100.200/32"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_net = ipaddress.ip_network
LOOPBACK_V4 = ipaddress.IPv4Address("127.0.0.1")
THIS_HOST_V4 = _net("0.0.0.0/8")
NAT64 = _net("64:ff9b::/96")
NAT64_LOCAL = _net("64:ff9b:1::/48")
SIX_TO_FOUR = _net("2002::/16")
TEREDO = _net("2001::/32")
IPV4_COMPATIBLE = _net("::/96")
# Denied by FLOWPLAY_CURL_PUBLIC_ONLY besides everything ipaddress does not call global.
NOT_PUBLIC = (
    THIS_HOST_V4,
    _net("100.64.0.0/10"),
    NAT64,
    NAT64_LOCAL,
    SIX_TO_FOUR,
    TEREDO,
    IPV4_COMPATIBLE,
    _net("::ffff:0:0/96"),
    _net("fc00::/7"),
    _net("fe80::/10"),
    _net("fec0::/10"),
)


def _flowplay_settings() -> Mapping[str, Any]:
    # Read on every call, not at import: this module must import without Django
    # configured, and tests override settings.
    try:
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured
    except ImportError:
        return {}
    try:
        return getattr(settings, "FLOWPLAY", None) or {}
    except ImproperlyConfigured:
        return {}


def _step_error(message: str, code: str) -> Exception:
    from flows.modules.base import StepError  # not at import: flows.modules imports this module

    return StepError(message, code, retryable=False)


def reachable_forms(ip: IPAddress) -> list[IPAddress]:
    """``ip`` and every address a connection to it may actually reach."""
    forms: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        packed = ip.packed
        if ip.ipv4_mapped is not None:
            forms.append(ip.ipv4_mapped)
        elif ip in NAT64 or ip in IPV4_COMPATIBLE:
            forms.append(ipaddress.IPv4Address(packed[12:]))
        elif ip.sixtofour is not None:
            forms.append(ip.sixtofour)
        if ip.is_unspecified:
            forms.append(ipaddress.IPv6Address("::1"))
    for form in list(forms):
        if isinstance(form, ipaddress.IPv4Address) and form in THIS_HOST_V4:
            forms.append(LOOPBACK_V4)  # connect(0.0.0.0) reaches this machine
    return list(dict.fromkeys(forms))


def _is_public(ip: IPAddress) -> bool:
    return (
        ip.is_global and not ip.is_multicast and not any(ip in net for net in NOT_PUBLIC if net.version == ip.version)
    )


@dataclass(frozen=True)
class OutboundPolicy:
    """Which addresses a step may connect to (see the module docstring)."""

    deny: tuple[IPNetwork, ...]
    allow_networks: tuple[IPNetwork, ...]
    allow_hosts: frozenset[str]
    public_only: bool = False

    @classmethod
    def from_settings(cls) -> OutboundPolicy:
        conf = _flowplay_settings()
        deny_conf = conf.get("CURL_DENY")
        deny_conf = DEFAULT_CURL_DENY if deny_conf is None else deny_conf
        deny = []
        for entry in deny_conf:
            try:
                deny.append(ipaddress.ip_network(str(entry).strip(), strict=False))
            except ValueError as exc:
                # Fail closed: a typo in the deny list must not open it.
                raise _step_error(f"FLOWPLAY CURL_DENY entry {entry!r} is not a network", "CONFIG_ERROR") from exc
        allow_networks, allow_hosts = [], set()
        for entry in conf.get("CURL_ALLOW") or []:
            text = str(entry).strip()
            try:
                allow_networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                allow_hosts.add(text.lower().rstrip("."))
        public_only = conf.get("CURL_PUBLIC_ONLY")
        if public_only is None:
            public_only = bool(conf.get("PRODUCTION", False))
        return cls(tuple(deny), tuple(allow_networks), frozenset(allow_hosts), bool(public_only))

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.allow_hosts

    def _allowed(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.allow_networks if net.version == ip.version)

    def address_denied(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        forms = reachable_forms(ip)
        # Allow-listed as written or as the address it reaches: the allow list names destinations.
        if any(self._allowed(form) for form in forms):
            return False
        if self.public_only and not all(_is_public(form) for form in forms):
            return True
        return any(form in net for form in forms for net in self.deny if net.version == form.version)

    def check(self, host: str, addresses: Iterable[str]) -> None:
        """Raise ``HOST_DENIED`` if any address of ``host`` is denied (unless the host is allowed by name)."""
        if self.host_allowed(host):
            return
        for address in addresses:
            if self.address_denied(address):
                raise _step_error(f"Outbound connections to {host} ({address}) are not allowed", "HOST_DENIED")


class _GuardedBackend(httpcore.NetworkBackend):
    """Resolves the host itself and connects to a checked address."""

    def __init__(self, policy: OutboundPolicy):
        self.policy = policy
        self.inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        self.policy.check(host, addresses)
        last_error: Exception = httpcore.ConnectError(f"no address for {host}")
        for address in addresses:
            try:
                # The checked address, not the name: no second lookup that could answer otherwise.
                return self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last_error = exc
        raise last_error

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        raise httpcore.ConnectError("unix sockets are not allowed")


class _CoreStream(httpx.SyncByteStream):
    def __init__(self, stream: Iterable[bytes]):
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        if hasattr(self._stream, "close"):
            self._stream.close()


class GuardedTransport(httpx.BaseTransport):
    """httpx transport on an httpcore pool whose every connection goes through the check.

    Built from public httpcore API rather than patching HTTPTransport's private pool, so an
    httpx upgrade cannot silently drop the check. httpcore wraps the pinned socket in TLS
    with the URL's host name (SNI and certificate check) and sends the URL's ``Host``.
    """

    def __init__(self, policy: OutboundPolicy | None = None):
        self._pool = httpcore.ConnectionPool(
            ssl_context=_ssl_context(),
            max_connections=4,
            network_backend=_GuardedBackend(policy or OutboundPolicy.from_settings()),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        response = self._pool.handle_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_CoreStream(response.stream),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()


@functools.lru_cache(maxsize=1)
def _ssl_context() -> Any:
    # Loading the CA bundle costs milliseconds; contexts are safe to share.
    return httpx.create_ssl_context()
