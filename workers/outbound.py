"""Outbound HTTP for apps: the worker fetches on a sandbox's behalf, and only from public addresses.

Every hop (the first request and each redirect) is checked before any connection: the scheme, the
host, and every address the host resolves to. The connector is then pinned to exactly the addresses
that were checked, so a DNS answer that changes between the check and the connection (rebinding)
cannot reach anything else, while TLS still verifies the certificate against the host name.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohappyeyeballs import SocketFactoryType
from yarl import URL

from config import Settings
from workers import WorkerError

log = structlog.get_logger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Resolves a host name for a port to IP address strings; the default asks the system.
Resolver = Callable[[str, int], Awaitable[list[str]]]

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_HEADERS = 64
MAX_HEADER_BYTES = 32 * 1024
USER_AGENT = "Ultralight"
READ_CHUNK = 64 * 1024

# Hop-by-hop headers, plus those the client itself must own (Host, framing, Expect).
DROPPED_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect",
})
# Credentials that must not follow a redirect to another origin.
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie"})
# Headers that describe a request body, dropped when a redirect turns the request into a GET.
BODY_HEADERS = frozenset({"content-type", "content-encoding", "content-language",
                          "content-location"})

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
# A last label that the WHATWG URL parser (and inet_aton) would read as a number.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")

_METADATA = frozenset({ipaddress.ip_address("169.254.169.254"),
                       ipaddress.ip_address("fd00:ec2::254")})
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_PRIVATE = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("172.16.0.0/12"),
            ipaddress.ip_network("192.168.0.0/16"), ipaddress.ip_network("fc00::/7"))
_BROADCAST = ipaddress.ip_address("255.255.255.255")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


class OutboundError(WorkerError):
    """A refused or failed request; str() is shown to the app author and never holds a secret."""


class OutboundRefused(OutboundError):
    """A request the policy refused before any connection was made."""


@dataclass(frozen=True)
class OutboundPolicy:
    """What apps may fetch, and how much.

    ``allow_hosts`` names hosts (for tests and operators) that may use plain http and may resolve to
    loopback or private addresses. ``max_in_flight`` is per call; ``timeout_s`` covers a whole
    request, redirects and body included, and caps what an app asks for; ``max_bytes`` caps each
    response body as it streams in, and each request body. ``ca_file`` is a CA bundle trusted in
    addition to the system store.
    """

    allow_hosts: frozenset[str]
    max_in_flight: int = 20
    timeout_s: float = 15.0
    max_bytes: int = 10 * 1024 * 1024
    max_redirects: int = 5
    ca_file: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboundPolicy:
        hosts = (host.strip() for host in settings.http_allow_hosts.split(","))
        return cls(
            allow_hosts=frozenset(host for host in hosts if host),
            max_in_flight=settings.http_max_in_flight,
            timeout_s=settings.http_timeout_s,
            max_bytes=settings.http_max_bytes,
            ca_file=settings.http_ca_file or None,
        )

    def __post_init__(self) -> None:
        if self.max_in_flight < 1 or self.timeout_s <= 0 or self.max_bytes < 0:
            raise OutboundError("outbound policy: max_in_flight must be at least 1, timeout_s "
                                "positive and max_bytes not negative")
        if self.max_redirects < 0:
            raise OutboundError("outbound policy: max_redirects must not be negative")
        hosts = frozenset(host.lower().rstrip(".") for host in self.allow_hosts)
        object.__setattr__(self, "allow_hosts", hosts)

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.allow_hosts


@dataclass(frozen=True)
class HttpResult:
    """A response: lower-case header names (repeats joined by ", ") and the URL after redirects."""

    status: int
    headers: dict[str, str]
    body: bytes
    url: str


def address_refusal(ip: IPAddress) -> str | None:
    """Why an app may not connect to ``ip``, or None when it is a public unicast address."""
    if ip in _METADATA:
        return "cloud metadata"
    if isinstance(ip, ipaddress.IPv6Address):
        return _ipv6_refusal(ip)
    return _common_refusal(ip)


def _ipv6_refusal(ip: ipaddress.IPv6Address) -> str | None:
    if ip.scope_id:
        return "scoped"
    # Forms that reach an IPv4 address stand or fall with it.
    if ip.ipv4_mapped is not None:
        return _embedded_refusal("IPv4-mapped", ip.ipv4_mapped)
    if ip in _NAT64:
        return _embedded_refusal("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip in _NAT64_LOCAL:
        return "private (local NAT64)"
    if ip in _IPV4_COMPATIBLE and not (ip.is_unspecified or ip.is_loopback):
        embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        return _embedded_refusal("IPv4-compatible", embedded) or "reserved (IPv4-compatible)"
    if ip.sixtofour is not None and (reason := _embedded_refusal("6to4", ip.sixtofour)):
        return reason
    if ip.teredo is not None:
        for embedded in ip.teredo:
            if reason := _embedded_refusal("Teredo", embedded):
                return reason
    if ip.is_site_local:
        return "reserved (site-local)"
    return _common_refusal(ip)


def _embedded_refusal(form: str, embedded: ipaddress.IPv4Address) -> str | None:
    reason = address_refusal(embedded)
    return f"{reason} ({form} {embedded})" if reason else None


def _common_refusal(ip: IPAddress) -> str | None:
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip == _BROADCAST:
        return "broadcast"
    if ip in _SHARED:
        return "shared (carrier-grade NAT)"
    if any(ip in net for net in _PRIVATE):
        return "private"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private or not ip.is_global:
        return "not globally routable"
    return None


@dataclass(frozen=True)
class Target:
    """One checked URL: where it connects and whether the operator allowlisted its host."""

    url: URL
    host: str
    port: int
    literal: IPAddress | None
    allowed: bool

    @property
    def origin(self) -> str:
        return f"{self.url.origin()}/"


def _origin_text(url: URL) -> str:
    try:
        return f"{url.origin()}/"
    except ValueError:
        return "the URL"


def check_url(url: URL, policy: OutboundPolicy) -> Target:
    """Scheme, host and port of a URL, refused unless it is one an app may request."""
    if not url.is_absolute() or not url.raw_host:
        raise OutboundRefused("refused: the URL has no host; give a full https:// URL")
    origin = _origin_text(url)
    if not url.scheme:
        raise OutboundRefused("refused: the URL has no scheme; give a full https:// URL")
    if url.scheme not in {"https", "http"}:
        raise OutboundRefused(f"refused: {url.scheme}: URLs are not allowed; only https")
    if url.user is not None or url.password is not None:
        raise OutboundRefused(f"{origin}: refused: credentials in the URL are not allowed; "
                              "send an Authorization header instead")
    port = url.port
    if port is None or not 1 <= port <= 65535:
        raise OutboundRefused(f"{origin}: refused: port must be 1-65535")
    host = url.raw_host
    allowed = policy.allows_host(host)
    if url.scheme == "http" and not allowed:
        raise OutboundRefused(f"{origin}: refused: plain http is not allowed; use https")
    return Target(url, host, port, _literal_address(url, origin), allowed)


def _literal_address(url: URL, origin: str) -> IPAddress | None:
    """The IP address a URL names directly, refusing numeric hosts that are not canonical."""
    raw = url.raw_host or ""
    if ":" in raw:
        try:
            return ipaddress.IPv6Address(url.host or "")
        except ValueError:
            raise OutboundRefused(f"{origin}: refused: cannot classify the IPv6 host") from None
    last_label = raw.rstrip(".").rsplit(".", 1)[-1]
    if _NUMERIC_LABEL.fullmatch(last_label):
        try:
            return ipaddress.IPv4Address(raw)
        except ValueError:
            # 2130706433, 0x7f.1, 127.1, 0177.0.0.1: the system would read them as addresses.
            raise OutboundRefused(f"{origin}: refused: the host is not a canonical IP address "
                                  "or a host name") from None
    if not _HOST_NAME.fullmatch(raw):
        raise OutboundRefused(f"{origin}: refused: invalid host name")
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the system resolver gives for ``host``, in its order, without repeats."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class _Pin:
    host: str
    addresses: tuple[IPAddress, ...]


# The addresses checked for the request running in this context; the connector may use only these.
_PINNED: contextvars.ContextVar[_Pin | None] = contextvars.ContextVar("outbound_pin", default=None)


class PinnedResolver(AbstractResolver):
    """aiohttp's resolver: the addresses checked for this request, never a fresh answer."""

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        pin = _PINNED.get()
        if pin is None or pin.host != host:
            raise OSError(f"no checked address for {host}")
        flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        return [ResolveResult(hostname=host, host=str(ip), port=port, proto=0, flags=flags,
                              family=socket.AF_INET6 if ip.version == 6 else socket.AF_INET)
                for ip in pin.addresses]

    async def close(self) -> None:
        return None


class Outbound:
    """One HTTP client per worker process, shared by every call through its ``for_call`` handles.

    ``resolver`` replaces the system resolver (tests); ``socket_factory`` creates each outgoing
    socket from the address it is about to connect to (tests record connections with it).
    """

    def __init__(self, policy: OutboundPolicy, resolver: Resolver | None = None, *,
                 socket_factory: SocketFactoryType | None = None) -> None:
        self.policy = policy
        self.resolver = resolver or system_resolver
        self._socket_factory = socket_factory
        self._session: aiohttp.ClientSession | None = None
        self._tls: ssl.SSLContext | None = None

    async def open(self) -> None:
        if self._session is not None:
            return
        self._tls = _tls_context(self.policy.ca_file)
        # No DNS cache: each connection asks PinnedResolver, which answers from this request.
        # limit=0: the per-call semaphores times the worker's concurrency bound the connections.
        connector = aiohttp.TCPConnector(resolver=PinnedResolver(), use_dns_cache=False,
                                         ssl=self._tls, limit=0,
                                         socket_factory=self._socket_factory)
        # No cookie jar (calls must not share cookies) and no proxy settings from the environment.
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None), headers={"User-Agent": USER_AGENT},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Outbound:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def for_call(self, **log_context: Any) -> CallHttp:
        """A handle for one call; ``log_context`` (request_id, app_id, ...) tags its log lines."""
        return CallHttp(self, log.bind(**log_context))

    async def _fetch(self, method: str, target: Target, headers: dict[str, str],
                    body: bytes | None) -> HttpResult:
        """Send a checked request and follow its redirects, checking each hop the same way."""
        for hop in range(self.policy.max_redirects + 1):
            addresses = await self._addresses(target)
            async with await self._send(method, target, headers, body, addresses) as response:
                location = response.headers.get("Location")
                if response.status not in REDIRECTS or location is None:
                    return await self._result(method, target, response)
            if hop == self.policy.max_redirects:
                break
            following = self._next_target(target, location)
            method, headers, body = _redirected(response.status, method, headers, body,
                                                same_origin=_same_origin(target, following))
            target = following
        raise OutboundError(f"{target.origin}: too many redirects "
                            f"(more than {self.policy.max_redirects})")

    def _next_target(self, current: Target, location: str) -> Target:
        try:
            url = current.url.join(URL(location))
        except ValueError as exc:
            raise OutboundError(f"{current.origin}: redirect to an invalid URL") from exc
        return check_url(url.with_fragment(None), self.policy)

    async def _addresses(self, target: Target) -> tuple[IPAddress, ...]:
        """Every address this hop may connect to, each checked, before any connection."""
        if target.literal is not None:
            addresses: tuple[IPAddress, ...] = (target.literal,)
        else:
            addresses = await self._resolve(target)
        if target.allowed:
            return addresses
        for ip in addresses:
            if reason := address_refusal(ip):
                what = (f"{ip} is" if target.literal is not None
                        else f"{target.host} resolves to {ip}, which is")
                raise OutboundRefused(f"{target.origin}: refused: {what} not public ({reason})")
        return addresses

    async def _resolve(self, target: Target) -> tuple[IPAddress, ...]:
        try:
            answers = await self.resolver(target.host, target.port)
        except OSError as exc:
            raise OutboundError(f"{target.origin}: could not resolve {target.host}") from exc
        if not answers:
            raise OutboundError(f"{target.origin}: {target.host} has no address")
        try:
            return tuple(ipaddress.ip_address(answer) for answer in answers)
        except ValueError as exc:
            raise OutboundRefused(f"{target.origin}: refused: {target.host} resolves to an "
                                  "address that cannot be classified") from exc

    async def _send(self, method: str, target: Target, headers: dict[str, str],
                    body: bytes | None,
                    addresses: tuple[IPAddress, ...]) -> aiohttp.ClientResponse:
        if self._session is None or self._session.closed:
            raise OutboundError("outbound HTTP is not open in this worker")
        pinned = _PINNED.set(_Pin(target.host, addresses))
        try:
            return await self._session.request(method, target.url, headers=headers, data=body,
                                               allow_redirects=False)
        except aiohttp.ClientError as exc:
            raise _translate(target, exc) from exc
        finally:
            _PINNED.reset(pinned)

    async def _result(self, method: str, target: Target,
                      response: aiohttp.ClientResponse) -> HttpResult:
        limit = self.policy.max_bytes
        too_big = OutboundError(f"{target.origin}: response body is over the "
                                f"{_size_text(limit)} limit")
        # A declared length over the cap is refused at once (a HEAD has none to read); a smaller
        # one is not trusted: the body is counted as it arrives.
        declared = response.content_length
        if method != "HEAD" and declared is not None and declared > limit:
            response.close()
            raise too_big
        body = bytearray()
        try:
            async for chunk in response.content.iter_chunked(READ_CHUNK):
                body += chunk
                if len(body) > limit:
                    response.close()
                    raise too_big
        except aiohttp.ClientError as exc:
            raise _translate(target, exc) from exc
        headers: dict[str, str] = {}
        for name, value in response.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return HttpResult(response.status, headers, bytes(body), str(target.url))


class CallHttp:
    """One call's outbound HTTP: at most ``max_in_flight`` requests at a time, the rest wait."""

    def __init__(self, outbound: Outbound, logger: Any = None) -> None:
        self.outbound = outbound
        self.policy = outbound.policy
        self._log = logger or log
        self._slots = asyncio.Semaphore(self.policy.max_in_flight)

    async def request(self, method: str, url: str, headers: Mapping[str, str] | None = None,
                      body: bytes | None = None, timeout_s: float | None = None) -> HttpResult:
        """Fetch ``url`` for the app, or raise OutboundError with a message for its author."""
        verb = _check_method(method)
        target = check_url(_parse(url), self.policy)
        sent = _request_headers(headers)
        _check_body(body, self.policy.max_bytes)
        limit_s = self._timeout(timeout_s)

        async with self._slots:
            started = time.perf_counter()
            outcome, status = "failed", None
            try:
                async with asyncio.timeout(limit_s):
                    result = await self.outbound._fetch(verb, target, sent, body)
                outcome, status = "ok", result.status
                return result
            except TimeoutError as exc:
                raise OutboundError(f"{target.origin}: timed out after {limit_s:g} s") from exc
            except OutboundRefused:
                outcome = "refused"
                raise
            finally:
                elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
                self._log.info("http_request", method=verb, origin=target.origin, status=status,
                               outcome=outcome, elapsed_ms=elapsed_ms)

    def _timeout(self, asked: float | None) -> float:
        if asked is None:
            return self.policy.timeout_s
        if not isinstance(asked, int | float) or not asked > 0:
            raise OutboundError("timeout must be a positive number of seconds")
        return min(float(asked), self.policy.timeout_s)


def _parse(url: str) -> URL:
    if not isinstance(url, str):
        raise OutboundError("the URL must be a string")
    try:
        return URL(url).with_fragment(None)
    except ValueError as exc:
        raise OutboundRefused(f"refused: invalid URL ({exc})") from exc


def _check_method(method: str) -> str:
    verb = method.upper() if isinstance(method, str) else ""
    if verb not in METHODS:
        raise OutboundError(f"method must be one of {', '.join(sorted(METHODS))}")
    return verb


def _request_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The app's headers minus hop-by-hop ones, refused when malformed or too many or too big."""
    if not headers:
        return {}
    if len(headers) > MAX_HEADERS:
        raise OutboundError(f"too many request headers (more than {MAX_HEADERS})")
    listed = _connection_listed(headers)
    sent: dict[str, str] = {}
    size = 0
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise OutboundError("request header names and values must be strings")
        if not _TOKEN.fullmatch(name):
            raise OutboundError(f"invalid request header name {name[:40]!r}")
        if any(char in value for char in "\r\n\0"):
            raise OutboundError(f"request header {name} contains a line break or NUL")
        size += len(name) + len(value)
        if name.lower() not in DROPPED_HEADERS and name.lower() not in listed:
            sent[name] = value
    if size > MAX_HEADER_BYTES:
        raise OutboundError(f"request headers are over the {_size_text(MAX_HEADER_BYTES)} limit")
    return sent


def _connection_listed(headers: Mapping[str, str]) -> set[str]:
    """Header names the app's own Connection header marks as hop-by-hop."""
    listed: set[str] = set()
    for name, value in headers.items():
        if isinstance(name, str) and name.lower() == "connection" and isinstance(value, str):
            listed.update(part.strip().lower() for part in value.split(","))
    return listed


def _check_body(body: bytes | None, limit: int) -> None:
    if body is None:
        return
    if not isinstance(body, bytes | bytearray | memoryview):
        raise OutboundError("the request body must be bytes")
    if len(body) > limit:
        raise OutboundError(f"request body is over the {_size_text(limit)} limit")


def _redirected(status: int, method: str, headers: dict[str, str], body: bytes | None, *,
                same_origin: bool) -> tuple[str, dict[str, str], bytes | None]:
    """The method, headers and body for the next hop, as browsers do it."""
    if (status == 303 and method != "HEAD") or (status in {301, 302} and method == "POST"):
        method, body = "GET", None
        headers = {k: v for k, v in headers.items() if k.lower() not in BODY_HEADERS}
    if not same_origin:
        headers = {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
    return method, headers, body


def _same_origin(a: Target, b: Target) -> bool:
    return (a.url.scheme, a.host.rstrip("."), a.port) == (b.url.scheme, b.host.rstrip("."), b.port)


def _translate(target: Target, exc: aiohttp.ClientError) -> OutboundError:
    """A short message for an aiohttp failure; the caller chains the original with ``from``."""
    origin = target.origin
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        detail = getattr(exc.certificate_error, "verify_message", "") or ""
        return OutboundError(f"{origin}: certificate verify failed"
                             + (f" ({detail})" if detail else ""))
    if isinstance(exc, aiohttp.ClientSSLError):
        return OutboundError(f"{origin}: TLS handshake failed")
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or "connection failed"
        return OutboundError(f"{origin}: could not connect ({reason})")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return OutboundError(f"{origin}: the server closed the connection")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return OutboundError(f"{origin}: the response body was cut short or malformed")
    if isinstance(exc, aiohttp.ClientResponseError):
        return OutboundError(f"{origin}: invalid HTTP response")
    return OutboundError(f"{origin}: request failed ({type(exc).__name__})")


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise OutboundError(f"cannot load the outbound CA file {ca_file}") from exc
    return context


def _size_text(size: int) -> str:
    for unit, scale in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"

