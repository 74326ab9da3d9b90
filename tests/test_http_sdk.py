"""Apps fetch URLs through the worker: a local HTTPS server, real farm, real sandbox."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import SHARED_APPS, Farm, RedisServer, free_port, start_farm
from tests.test_farm import call
from tests.test_outbound import Certs, make_certs

FETCHER = Path(__file__).parent / "apps" / "fetcher.py"


class LocalSite:
    """An HTTPS server on 127.0.0.1 in a thread, counting requests in flight."""

    def __init__(self, certs: Certs) -> None:
        self.certs = certs
        self.port = free_port()
        self.in_flight = 0
        self.max_in_flight = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text="<html><title> Hello there </title></html>",
                            content_type="text/html")

    async def slow(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.3)
        self.in_flight -= 1
        return web.Response(text="ok")

    async def echo(self, request: web.Request) -> web.Response:
        return web.json_response({"got": await request.json()})

    async def to_private(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"https://127.0.0.1:{self.port}/page")

    async def huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(12):
            await response.write(b"x" * 1024 * 1024)
        return response

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.add_routes([web.get("/page", self.page), web.get("/slow", self.slow),
                        web.post("/echo", self.echo), web.get("/to-private", self.to_private),
                        web.get("/huge", self.huge)])
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", self.port,
                           ssl_context=self.certs.server_context())
        self.loop.run_until_complete(site.start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    def url(self, path: str) -> str:
        return f"https://localhost:{self.port}{path}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSite]:
    server = LocalSite(make_certs(tmp_path_factory.mktemp("certs")))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    server.ready.wait(10)
    yield server
    server.loop.call_soon_threadsafe(server.loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def web_farm(redis_server: RedisServer, site: LocalSite) -> Iterator[Farm]:
    farm = start_farm(redis_server.url, settings={
        "ULTRALIGHT_HTTP_ALLOW_HOSTS": "localhost",
        "ULTRALIGHT_HTTP_CA_FILE": str(site.certs.ca_file),
        "ULTRALIGHT_CALL_TIMEOUT_S": "20",
        "ULTRALIGHT_SANDBOX_MAX_PROCESSES": "64",
    })
    farm.deploy(SHARED_APPS / "linkcheck.py", "linkcheck")
    farm.deploy(FETCHER, "fetcher")
    yield farm
    farm.stop()


def test_linkcheck_fetches_a_page_through_the_worker(web_farm: Farm, site: LocalSite) -> None:
    """The shared linkcheck app gets status, size and title of an HTTPS page."""
    body = call(web_farm.url, web_farm.token, "linkcheck", "check_link",
                {"url": site.url("/page")})

    assert body["result"]["structuredContent"] == {
        "url": site.url("/page"), "status": 200, "bytes": 41, "title": "Hello there"}


def test_refused_links_are_reported_not_raised(web_farm: Farm, site: LocalSite) -> None:
    """Private addresses, redirects to them and plain HTTP come back as per-link errors."""
    urls = [site.url("/page"), site.url("/to-private"), f"https://127.0.0.1:{site.port}/page",
            "http://example.com/", "ftp://localhost/"]
    body = call(web_farm.url, web_farm.token, "linkcheck", "check_links", {"urls": urls})
    results = body["result"]["structuredContent"]["result"]

    assert results[0]["status"] == 200
    assert all("error" in r for r in results[1:]), results
    assert "127.0.0.1" in results[1]["error"] or "address" in results[1]["error"]


def test_json_post_round_trips(web_farm: Farm, site: LocalSite) -> None:
    """ul.http.post(json=...) sends JSON and the app reads JSON back."""
    body = call(web_farm.url, web_farm.token, "fetcher", "post_json",
                {"url": site.url("/echo"), "payload": {"a": [1, 2]}})

    assert body["result"]["structuredContent"] == {"got": {"a": [1, 2]}}


def test_at_most_twenty_requests_are_in_flight_per_call(web_farm: Farm, site: LocalSite) -> None:
    """Twenty-five threads fetching at once all succeed, never more than twenty at the server."""
    body = call(web_farm.url, web_farm.token, "fetcher", "fetch_many",
                {"url": site.url("/slow"), "n": 25})

    assert body["result"]["structuredContent"] == {"result": [200] * 25}
    assert 1 < site.max_in_flight <= 20


def test_a_response_over_the_size_cap_is_an_error(web_farm: Farm, site: LocalSite) -> None:
    """A 12 MB streamed body is cut off at the 10 MB cap with a clear error."""
    body = call(web_farm.url, web_farm.token, "fetcher", "fetch_error",
                {"url": site.url("/huge")})

    message = body["result"]["structuredContent"]["result"]
    assert "over the 10 MiB limit" in message
