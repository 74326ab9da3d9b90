"""Outbound HTTP: the policy, redirects, limits and DNS pinning, against local TLS servers only.

Every test connects through ``Recorder``, which refuses to open a socket to anything but loopback,
and resolves through ``StubResolver``, so no test sends a packet off this machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import errno
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from structlog.testing import capture_logs

from config import Settings
from workers.outbound import (
    CallHttp,
    Outbound,
    OutboundError,
    OutboundPolicy,
    OutboundRefused,
    address_refusal,
)

CAP = 256 * 1024
NAMES = ("localhost", "alt.localhost")


@dataclasses.dataclass(frozen=True)
class Certs:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                 signer: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                signer.public_key()), False))


def make_certs(directory: Path) -> Certs:
    """A throwaway CA and a server certificate it signed for the names in NAMES."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Ultralight test CA")])
    ca = (_certificate("Ultralight test CA", ca_key, ca_name, ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(
              digital_signature=False, content_commitment=False, key_encipherment=False,
              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
              encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (_certificate("localhost", key, ca_name, ca_key)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in NAMES]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(ca_key, hashes.SHA256()))
    certs = Certs(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    certs.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certs.cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    certs.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    return certs


class StubResolver:
    """Answers from a table (or a queue of answers per name) and records every question."""

    def __init__(self, answers: dict[str, list[list[str]]] | None = None) -> None:
        self.answers = answers or {name: [["127.0.0.1"]] for name in NAMES}
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        queue = self.answers.get(host.rstrip("."))
        if not queue:
            raise socket.gaierror(socket.EAI_NONAME, "unknown in the test table")
        return queue.pop(0) if len(queue) > 1 else queue[0]


class Recorder:
    """A socket factory that notes every address connected to and opens sockets to loopback only."""

    def __init__(self) -> None:
        self.addresses: list[str] = []

    def __call__(self, addr_info: tuple) -> socket.socket:  # type: ignore[type-arg]
        family, kind, proto, _, sockaddr = addr_info
        self.addresses.append(sockaddr[0])
        if not ipaddress.ip_address(sockaddr[0]).is_loopback:
            raise OSError(errno.ENETUNREACH, "the test recorder opens loopback sockets only")
        return socket.socket(family, kind, proto)


@dataclasses.dataclass
class Site:
    """The local HTTPS test server and what it saw."""

    port: int
    in_flight: int = 0
    most_in_flight: int = 0

    def url(self, path: str, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}{path}"


@dataclasses.dataclass
class Client:
    http: CallHttp
    resolver: StubResolver
    recorder: Recorder


ClientFactory = Callable[..., Awaitable[Client]]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _routes(site: Site) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/hello")
    async def hello(request: web.Request) -> web.Response:
        response = web.Response(text="hello", headers={"Host-Seen": request.host})
        response.headers.add("X-Multi", "1")
        response.headers.add("X-Multi", "2")
        return response

    @routes.route("*", "/echo")
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"method": request.method, "body": await request.text(),
                                  "headers": {k.lower(): v for k, v in request.headers.items()}})

    @routes.route("*", "/redirect")
    async def redirect(request: web.Request) -> web.Response:
        status = int(request.query.get("status", "302"))
        return web.Response(status=status, headers={"Location": request.query["to"]})

    @routes.get("/chain/{n}")
    async def chain(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(text="end")
        return web.Response(status=302, headers={"Location": f"/chain/{n - 1}"})

    @routes.get("/sized")
    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"s" * int(request.query["size"]))

    @routes.get("/chunked")
    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        left = int(request.query["size"])
        while left > 0:
            await response.write(b"c" * min(left, 16 * 1024))
            left -= 16 * 1024
        await response.write_eof()
        return response

    @routes.get("/slow")
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    @routes.get("/count")
    async def count(request: web.Request) -> web.Response:
        site.in_flight += 1
        site.most_in_flight = max(site.most_in_flight, site.in_flight)
        try:
            await asyncio.sleep(0.3)
        finally:
            site.in_flight -= 1
        return web.Response(text="counted")

    return routes


@pytest.fixture
async def site(certs: Certs) -> AsyncIterator[Site]:
    """An aiohttp HTTPS server on 127.0.0.1 with a certificate for localhost."""
    app = web.Application()
    state = Site(port=0)
    app.add_routes(_routes(state))
    runner = web.AppRunner(app, shutdown_timeout=0.5, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=certs.server_context()).start()
    state.port = runner.addresses[0][1]
    yield state
    await runner.cleanup()


RAW_RESPONSES = {
    # Declares a length well under the cap, then keeps sending past the cap.
    b"/lying-length": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * (CAP * 2),
    # No length at all: the body runs until the server closes.
    b"/no-length": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"y" * (CAP + 1),
    # Declares more than the cap.
    b"/long-length": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (CAP * 4) + b"z" * CAP,
}


@pytest.fixture
async def raw_site(certs: Certs) -> AsyncIterator[Site]:
    """A hand-written HTTPS server on 127.0.0.1 that sends malformed or lying responses."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            writer.write(RAW_RESPONSES[request.split(b" ")[1]])
            await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # The client hung up early, as it should on an oversized body.
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=certs.server_context())
    yield Site(port=server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


@pytest.fixture
async def client(certs: Certs) -> AsyncIterator[ClientFactory]:
    """Opens an Outbound with a stub resolver and a recorder; closes them all afterwards."""
    opened: list[Outbound] = []

    async def make(resolver: StubResolver | None = None, trust: bool = True,
                   **policy: object) -> Client:
        settings = {"allow_hosts": frozenset(NAMES), "max_bytes": CAP,
                    "ca_file": str(certs.ca_file) if trust else None, **policy}
        stub, recorder = resolver or StubResolver(), Recorder()
        outbound = Outbound(OutboundPolicy(**settings), stub,  # type: ignore[arg-type]
                            socket_factory=recorder)
        await outbound.open()
        opened.append(outbound)
        return Client(outbound.for_call(), stub, recorder)

    yield make
    for outbound in opened:
        await outbound.close()


async def test_get_returns_status_headers_body_and_final_url(client: ClientFactory,
                                                             site: Site) -> None:
    """A GET returns status, lower-cased headers with repeats joined, body and URL."""
    c = await client()

    result = await c.http.request("GET", site.url("/hello?q=1"))

    assert result.status == 200
    assert result.body == b"hello"
    assert result.url == site.url("/hello?q=1")
    assert result.headers["x-multi"] == "1, 2"
    assert result.headers["content-type"].startswith("text/plain")
    assert result.headers["host-seen"] == f"localhost:{site.port}"
    assert c.recorder.addresses == ["127.0.0.1"]


async def test_json_post_round_trips(client: ClientFactory, site: Site) -> None:
    """A JSON body and its content type reach the server intact."""
    c = await client()
    payload = {"text": "héllo", "tags": ["a", "b"], "n": 3}

    result = await c.http.request("post", site.url("/echo"),
                                  headers={"Content-Type": "application/json"},
                                  body=json.dumps(payload).encode())

    seen = json.loads(result.body)
    assert seen["method"] == "POST"
    assert json.loads(seen["body"]) == payload
    assert seen["headers"]["content-type"] == "application/json"


async def test_hop_by_hop_and_host_headers_are_dropped(client: ClientFactory, site: Site) -> None:
    """Host, hop-by-hop headers and those named in Connection never reach the server."""
    c = await client()
    headers = {"Host": "evil.example", "Connection": "X-Private", "X-Private": "1",
               "Proxy-Authorization": "Basic eA==", "Transfer-Encoding": "chunked",
               "X-Kept": "yes"}

    result = await c.http.request("GET", site.url("/echo"), headers=headers)

    seen = json.loads(result.body)["headers"]
    assert seen["host"] == f"localhost:{site.port}"
    assert seen["x-kept"] == "yes"
    assert {"x-private", "proxy-authorization", "transfer-encoding"}.isdisjoint(seen)


@pytest.mark.parametrize("headers, message", [
    ({"X-Bad": "a\r\nInjected: 1"}, "line break"),
    ({"Bad Name": "1"}, "invalid request header name"),
    ({f"X-{i}": "1" for i in range(65)}, "too many request headers"),
    ({"X-Big": "v" * 40_000}, "request headers are over"),
])
async def test_bad_request_headers_are_refused(client: ClientFactory, headers: dict[str, str],
                                               message: str) -> None:
    """Malformed, too many or too large request headers are refused before any connection."""
    c = await client()

    with pytest.raises(OutboundError, match=message):
        await c.http.request("GET", "https://localhost/", headers=headers)

    assert c.recorder.addresses == []


async def test_request_body_over_the_cap_is_refused(client: ClientFactory) -> None:
    """A request body larger than max_bytes is refused before any connection."""
    c = await client()

    with pytest.raises(OutboundError, match="request body is over the 256 KiB limit"):
        await c.http.request("POST", "https://localhost/", body=b"b" * (CAP + 1))

    assert c.recorder.addresses == []


async def test_redirect_chain_is_followed_to_the_final_url(client: ClientFactory,
                                                           site: Site) -> None:
    """Relative redirects are followed and the result names the last URL."""
    c = await client()

    result = await c.http.request("GET", site.url("/chain/3"))

    assert (result.status, result.body) == (200, b"end")
    assert result.url == site.url("/chain/0")


async def test_too_many_redirects_are_refused(client: ClientFactory, site: Site) -> None:
    """More than max_redirects hops is an error."""
    c = await client(max_redirects=2)

    with pytest.raises(OutboundError, match=r"too many redirects \(more than 2\)"):
        await c.http.request("GET", site.url("/chain/3"))


async def test_see_other_turns_post_into_get_without_body(client: ClientFactory,
                                                          site: Site) -> None:
    """A 303 after a POST is followed with a GET that carries no body or content type."""
    c = await client()
    url = site.url("/redirect?status=303&to=/echo")

    result = await c.http.request("POST", url, headers={"Content-Type": "text/plain"}, body=b"hi")

    seen = json.loads(result.body)
    assert (seen["method"], seen["body"]) == ("GET", "")
    assert "content-type" not in seen["headers"]


async def test_temporary_redirect_keeps_method_and_body(client: ClientFactory, site: Site) -> None:
    """A 307 repeats the same method and body at the new location."""
    c = await client()

    result = await c.http.request("PUT", site.url("/redirect?status=307&to=/echo"), body=b"same")

    seen = json.loads(result.body)
    assert (seen["method"], seen["body"]) == ("PUT", "same")


async def test_credentials_are_dropped_when_a_redirect_changes_host(client: ClientFactory,
                                                                    site: Site) -> None:
    """Authorization and Cookie follow a same-origin redirect but not one to another host."""
    c = await client()
    secret = {"Authorization": "Bearer s3cret", "Cookie": "sid=1", "X-Other": "kept"}
    elsewhere = site.url("/echo", host="alt.localhost")

    same = await c.http.request("GET", site.url("/redirect?to=/echo"), headers=secret)
    moved = await c.http.request("GET", site.url(f"/redirect?to={elsewhere}"), headers=secret)

    assert json.loads(same.body)["headers"]["authorization"] == "Bearer s3cret"
    seen = json.loads(moved.body)["headers"]
    assert seen["x-other"] == "kept"
    assert {"authorization", "cookie"}.isdisjoint(seen)
    assert seen["host"] == f"alt.localhost:{site.port}"


async def test_redirect_to_a_literal_loopback_address_is_refused(client: ClientFactory,
                                                                 site: Site) -> None:
    """A redirect to https://127.0.0.1 (not allowlisted) is refused before connecting to it."""
    c = await client()
    target = site.url("/hello", host="127.0.0.1")

    with pytest.raises(OutboundRefused, match=r"127\.0\.0\.1 is not public \(loopback\)"):
        await c.http.request("GET", site.url(f"/redirect?to={target}"))

    assert c.recorder.addresses == ["127.0.0.1"]  # Only the first hop, to localhost.


@pytest.mark.parametrize("target, message", [
    ("http://169.254.169.254/latest/meta-data/", "plain http is not allowed"),
    ("https://169.254.169.254/latest/meta-data/", r"not public \(cloud metadata\)"),
    ("https://[fd00:ec2::254]/", r"not public \(cloud metadata\)"),
])
async def test_redirect_to_the_metadata_address_is_refused(client: ClientFactory, site: Site,
                                                           target: str, message: str) -> None:
    """A redirect to the cloud metadata address is refused without any connection to it."""
    c = await client()

    with pytest.raises(OutboundRefused, match=message):
        await c.http.request("GET", site.url(f"/redirect?to={target}"))

    assert c.recorder.addresses == ["127.0.0.1"]
    assert c.resolver.asked == ["localhost"]


async def test_plain_http_to_a_host_not_allowlisted_is_refused(client: ClientFactory) -> None:
    """http:// is refused for hosts outside allow_hosts, before resolving or connecting."""
    c = await client()

    with pytest.raises(OutboundRefused, match="plain http is not allowed; use https"):
        await c.http.request("GET", "http://example.com/")

    assert (c.resolver.asked, c.recorder.addresses) == ([], [])


async def test_chunked_body_over_the_cap_is_refused(client: ClientFactory, site: Site) -> None:
    """A chunked body (no Content-Length) is counted while streaming and cut off over the cap."""
    c = await client()

    exact = await c.http.request("GET", site.url(f"/chunked?size={CAP}"))
    with pytest.raises(OutboundError, match="response body is over the 256 KiB limit"):
        await c.http.request("GET", site.url(f"/chunked?size={CAP * 4}"))

    assert len(exact.body) == CAP


async def test_close_delimited_body_over_the_cap_is_refused(client: ClientFactory,
                                                            raw_site: Site) -> None:
    """A body with no length, read until the server closes, is cut off over the cap."""
    c = await client()

    with pytest.raises(OutboundError, match="response body is over the 256 KiB limit"):
        await c.http.request("GET", raw_site.url("/no-length"))


async def test_declared_length_over_the_cap_is_refused(client: ClientFactory,
                                                       raw_site: Site) -> None:
    """A Content-Length over the cap is refused without reading the body."""
    c = await client()

    with pytest.raises(OutboundError, match="response body is over the 256 KiB limit"):
        await c.http.request("GET", raw_site.url("/long-length"))


async def test_head_of_a_large_resource_is_not_refused(client: ClientFactory, site: Site) -> None:
    """A HEAD whose Content-Length is over the cap succeeds: there is no body to read."""
    c = await client()

    result = await c.http.request("HEAD", site.url(f"/sized?size={CAP * 2}"))

    assert (result.status, result.body) == (200, b"")
    assert result.headers["content-length"] == str(CAP * 2)


async def test_lying_small_content_length_never_yields_more(client: ClientFactory,
                                                            raw_site: Site) -> None:
    """Data past a small Content-Length is a broken response, never a bigger body."""
    c = await client()

    with pytest.raises(OutboundError) as caught:
        await c.http.request("GET", raw_site.url("/lying-length"))

    assert str(caught.value) == f"{raw_site.url('/')}: invalid HTTP response"


async def test_slow_response_times_out(client: ClientFactory, site: Site) -> None:
    """A request slower than the app's timeout fails with a short message."""
    c = await client()
    started = time.monotonic()

    with pytest.raises(OutboundError) as caught:
        await c.http.request("GET", site.url("/slow"), timeout_s=0.3)

    assert str(caught.value) == f"{site.url('/')}: timed out after 0.3 s"
    assert time.monotonic() - started < 2


async def test_timeout_is_clamped_to_the_policy(client: ClientFactory, site: Site) -> None:
    """An app asking for more time than the policy allows gets the policy's limit."""
    c = await client(timeout_s=0.3)

    with pytest.raises(OutboundError, match=r"timed out after 0\.3 s"):
        await c.http.request("GET", site.url("/slow"), timeout_s=600)


async def test_in_flight_requests_are_capped_per_call(client: ClientFactory, site: Site) -> None:
    """30 requests at once through one call all succeed, at most 20 in flight at a time."""
    c = await client()

    results = await asyncio.gather(*(c.http.request("GET", site.url("/count"))
                                     for _ in range(30)))

    assert [r.status for r in results] == [200] * 30
    assert site.most_in_flight == 20


async def test_untrusted_certificate_is_refused(client: ClientFactory, site: Site) -> None:
    """Without the test CA, the server's certificate fails verification."""
    c = await client(trust=False)

    with pytest.raises(OutboundError, match="certificate verify failed"):
        await c.http.request("GET", site.url("/hello"))


async def test_certificate_is_checked_against_the_host_name(client: ClientFactory,
                                                            site: Site) -> None:
    """An allowlisted literal address is still held to its certificate, which names localhost."""
    c = await client(allow_hosts=frozenset({"127.0.0.1"}))

    with pytest.raises(OutboundError, match="certificate verify failed"):
        await c.http.request("GET", site.url("/hello", host="127.0.0.1"))


async def test_rebinding_name_connects_only_to_the_checked_address(client: ClientFactory) -> None:
    """A name that answers public then loopback is connected to at the public address only."""
    stub = StubResolver({"rebind.test": [["8.8.8.8"], ["127.0.0.1"]]})
    c = await client(resolver=stub)

    # The recorder refuses the public address, so nothing leaves the machine.
    with pytest.raises(OutboundError, match="could not connect"):
        await c.http.request("GET", "https://rebind.test/")
    with pytest.raises(OutboundRefused, match=r"rebind\.test resolves to 127\.0\.0\.1"):
        await c.http.request("GET", "https://rebind.test/")

    assert stub.asked == ["rebind.test", "rebind.test"]
    assert c.recorder.addresses == ["8.8.8.8"]


async def test_connection_goes_to_the_checked_address_under_the_name(client: ClientFactory,
                                                                     site: Site) -> None:
    """The connector uses the address checked for the request, with TLS verified by name."""
    stub = StubResolver({"localhost": [["127.0.0.1"], ["127.0.0.2"]]})
    c = await client(resolver=stub)

    result = await c.http.request("GET", site.url("/hello"))

    assert result.headers["host-seen"] == f"localhost:{site.port}"
    assert stub.asked == ["localhost"]
    assert c.recorder.addresses == ["127.0.0.1"]


def _teredo(server: str, client_address: str) -> str:
    obscured = int(ipaddress.IPv4Address(client_address)) ^ 0xFFFFFFFF
    value = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64) | obscured
    return str(ipaddress.IPv6Address(value))


@pytest.mark.parametrize("address, reason", [
    ("8.8.8.8", None),
    ("1.1.1.1", None),
    ("2606:4700:4700::1111", None),
    ("::ffff:8.8.8.8", None),
    ("64:ff9b::808:808", None),
    ("2002:808:808::1", None),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "cloud metadata"),
    ("169.254.1.1", "link-local"),
    ("100.64.0.1", "shared (carrier-grade NAT)"),
    ("100.127.255.254", "shared (carrier-grade NAT)"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "not globally routable"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("192.0.2.1", "not globally routable"),
    ("198.51.100.7", "not globally routable"),
    ("203.0.113.9", "not globally routable"),
    ("198.18.0.1", "not globally routable"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fd00:ec2::254", "cloud metadata"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "scoped"),
    ("fec0::1", "reserved (site-local)"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "not globally routable"),
    ("::ffff:127.0.0.1", "loopback (IPv4-mapped 127.0.0.1)"),
    ("::ffff:10.0.0.1", "private (IPv4-mapped 10.0.0.1)"),
    ("::ffff:169.254.169.254", "cloud metadata (IPv4-mapped 169.254.169.254)"),
    ("::127.0.0.1", "loopback (IPv4-compatible 127.0.0.1)"),
    ("::8.8.8.8", "reserved (IPv4-compatible)"),
    ("64:ff9b::7f00:1", "loopback (NAT64 127.0.0.1)"),
    ("64:ff9b::a9fe:a9fe", "cloud metadata (NAT64 169.254.169.254)"),
    ("64:ff9b:1::1", "private (local NAT64)"),
    ("2002:7f00:1::1", "loopback (6to4 127.0.0.1)"),
    ("2002:a9fe:a9fe::1", "cloud metadata (6to4 169.254.169.254)"),
    (_teredo("65.54.227.120", "127.0.0.1"), "loopback (Teredo 127.0.0.1)"),
    (_teredo("65.54.227.120", "8.8.8.8"), "not globally routable"),
])
def test_address_classifier(address: str, reason: str | None) -> None:
    """Each literal address is public (None) or refused for the stated reason."""
    assert address_refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("url, message", [
    ("ftp://example.com/", "ftp: URLs are not allowed"),
    ("file:///etc/passwd", "the URL has no host"),
    ("https:///path", "the URL has no host"),
    ("//example.com/x", "the URL has no scheme"),
    ("https://user:pw@example.com/", "credentials in the URL are not allowed"),
    ("https://example.com:0/", "port must be 1-65535"),
    ("https://example.com:70000/", "invalid URL"),
    ("https://a\\@example.com/", "invalid URL"),
    ("https://2130706433/", "not a canonical IP address"),
    ("https://0x7f.1/", "not a canonical IP address"),
    ("https://0x7f000001/", "not a canonical IP address"),
    ("https://127.1/", "not a canonical IP address"),
    ("https://0177.0.0.1/", "not a canonical IP address"),
    ("https://1.2.3.4.5/", "not a canonical IP address"),
    ("https://ex%61mple.com/", "invalid host name"),
    ("https://127.0.0.1/", r"127\.0\.0\.1 is not public \(loopback\)"),
    ("https://0.0.0.0:8080/", r"not public \(unspecified\)"),
    ("https://[::1]/", r"not public \(loopback\)"),
    ("https://[::ffff:127.0.0.1]/", r"not public \(loopback \(IPv4-mapped 127\.0\.0\.1\)\)"),
    ("https://[::ffff:7f00:1]/", r"not public \(loopback \(IPv4-mapped"),
    ("https://[fe80::1%25eth0]/", r"not public \(scoped\)"),
    ("https://10.0.0.1/", r"not public \(private\)"),
    ("https://100.100.100.200/", r"not public \(shared"),
    ("https://localhost/", r"localhost resolves to 127\.0\.0\.1, which is not public"),
    ("https://LOCALHOST./", r"localhost\. resolves to 127\.0\.0\.1, which is not public"),
])
async def test_tricky_urls_are_refused_before_connecting(client: ClientFactory, url: str,
                                                         message: str) -> None:
    """Odd schemes, credentials, ports and numeric or private hosts never reach a socket."""
    c = await client(allow_hosts=frozenset())

    with pytest.raises(OutboundRefused, match=message):
        await c.http.request("GET", url)

    assert c.recorder.addresses == []


async def test_unknown_host_is_a_clear_error(client: ClientFactory) -> None:
    """A name that does not resolve names the host and nothing else."""
    c = await client()

    with pytest.raises(OutboundError, match=r"^https://nowhere\.test/: could not resolve"):
        await c.http.request("GET", "https://nowhere.test/secret?key=abc")


async def test_messages_never_show_the_path_or_query(client: ClientFactory, site: Site) -> None:
    """Errors name only the origin: paths and queries can hold keys."""
    c = await client()

    with pytest.raises(OutboundError) as caught:
        await c.http.request("GET", site.url("/slow?api_key=s3cret"), timeout_s=0.2)

    assert "s3cret" not in str(caught.value)


async def test_each_request_logs_one_line_without_path_or_query(client: ClientFactory,
                                                                site: Site) -> None:
    """One http_request line per request, tagged with the call, naming only the origin."""
    c = await client()
    http = c.http.outbound.for_call(request_id="call-1")

    with capture_logs() as logs:
        await http.request("GET", site.url("/hello?token=s3cret"))
        with pytest.raises(OutboundRefused):
            await http.request("GET", "https://10.0.0.1/?token=s3cret")

    lines = [entry for entry in logs if entry["event"] == "http_request"]
    assert [(e["outcome"], e["status"], e["request_id"]) for e in lines] == [
        ("ok", 200, "call-1"), ("refused", None, "call-1")]
    assert lines[0]["origin"] == site.url("/")
    assert "s3cret" not in repr(logs)


def test_policy_rejects_unusable_limits() -> None:
    """A policy that could never send a request is an error, not a hang."""
    with pytest.raises(OutboundError, match="max_in_flight must be at least 1"):
        OutboundPolicy(allow_hosts=frozenset(), max_in_flight=0)


def test_policy_from_settings() -> None:
    """The http_* settings become the policy, allow_hosts parsed from a comma list."""
    settings = Settings.from_env({"ULTRALIGHT_HTTP_ALLOW_HOSTS": " LocalHost., api.test ,",
                                  "ULTRALIGHT_HTTP_MAX_IN_FLIGHT": "5",
                                  "ULTRALIGHT_HTTP_TIMEOUT_S": "2.5",
                                  "ULTRALIGHT_HTTP_MAX_BYTES": "1024"})

    policy = OutboundPolicy.from_settings(settings)

    assert policy.allow_hosts == {"localhost", "api.test"}
    assert (policy.max_in_flight, policy.timeout_s, policy.max_bytes) == (5, 2.5, 1024)
    assert policy.ca_file is None

