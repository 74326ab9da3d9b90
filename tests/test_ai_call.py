"""ul.ai with the caller's own key against a local fake provider, and ul.call between apps."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import SHARED_APPS, Farm, RedisServer, free_port, start_farm
from tests.test_farm import call

LOOP = Path(__file__).parent / "apps" / "loop.py"
KEY = "sk-test-4f1c9a0b7e3d"
ANTHROPIC_KEY = "sk-ant-test-77aa11"


class FakeProvider:
    """OpenAI- and Anthropic-shaped endpoints on 127.0.0.1 that record what they received."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append({"path": request.path, "headers": dict(request.headers),
                              "body": body})
        return web.json_response({
            "model": body["model"],
            "choices": [{"message": {"role": "assistant", "content": "A short summary."}}],
            "usage": {"prompt_tokens": 120, "completion_tokens": 8}})

    async def messages(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append({"path": request.path, "headers": dict(request.headers),
                              "body": body})
        return web.json_response({
            "model": body["model"], "content": [{"type": "text", "text": "Yes."}],
            "usage": {"input_tokens": 20, "output_tokens": 2}})

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.add_routes([web.post("/v1/chat/completions", self.chat),
                        web.post("/v1/messages", self.messages)])
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    fake = FakeProvider()
    thread = threading.Thread(target=fake.run, daemon=True)
    thread.start()
    fake.ready.wait(10)
    yield fake
    fake.loop.call_soon_threadsafe(fake.loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def ai_farm(redis_server: RedisServer, provider: FakeProvider) -> Iterator[Farm]:
    base = f"http://127.0.0.1:{provider.port}/v1"
    farm = start_farm(redis_server.url, settings={
        "ULTRALIGHT_AI_OPENAI_URL": base, "ULTRALIGHT_AI_ANTHROPIC_URL": base,
        "ULTRALIGHT_CALL_TIMEOUT_S": "20", "ULTRALIGHT_WORKER_CONCURRENCY": "8",
    })
    farm.deploy(SHARED_APPS / "notes.py", "notes")
    farm.deploy(SHARED_APPS / "digest.py", "digest")
    farm.deploy(LOOP, "loop")
    yield farm
    farm.stop()


def set_key(farm: Farm, provider: str, key: str, token: str | None = None) -> None:
    import subprocess
    import sys

    env = {**farm.env, "ULTRALIGHT_URL": farm.url, "ULTRALIGHT_TOKEN": token or farm.token}
    subprocess.run([sys.executable, "-m", "gateway", "byok", "set", provider], input=key,
                   text=True, env=env, check=True, capture_output=True, timeout=60)


def test_digest_calls_notes_then_the_callers_model(ai_farm: Farm,
                                                   provider: FakeProvider) -> None:
    """digest reads the caller's notes through ul.call and summarises them with their key."""
    set_key(ai_farm, "openai", KEY)
    call(ai_farm.url, ai_farm.token, "notes", "add_note", {"text": "buy milk", "tags": ["a"]})
    call(ai_farm.url, ai_farm.token, "notes", "add_note", {"text": "call mum", "tags": ["a"]})
    before = len(provider.received)
    body = call(ai_farm.url, ai_farm.token, "digest", "summarize_notes", {"tag": "a"})

    assert body["result"]["structuredContent"] == {"summary": "A short summary.", "count": 2}
    sent = provider.received[before]
    assert sent["headers"]["Authorization"] == f"Bearer {KEY}"
    assert "buy milk" in sent["body"]["messages"][1]["content"]
    assert sent["body"]["model"] == "gpt-4o-mini"


def test_anthropic_models_use_the_anthropic_api_and_report_cost(ai_farm: Farm,
                                                                provider: FakeProvider) -> None:
    """A claude model goes to /messages with x-api-key; usage and cost come back."""
    set_key(ai_farm, "anthropic", ANTHROPIC_KEY)
    body = call(ai_farm.url, ai_farm.token, "loop", "ask", {"question": "ok?"})
    answer = body["result"]["structuredContent"]

    assert answer["content"] == "Yes."
    assert answer["provider"] == "anthropic"
    assert answer["usage"] == {"input_tokens": 20, "output_tokens": 2}
    assert answer["cost_usd"] == pytest.approx((20 * 0.8 + 2 * 4) / 1e6)
    sent = provider.received[-1]
    assert sent["path"] == "/v1/messages" and sent["headers"]["x-api-key"] == ANTHROPIC_KEY
    assert sent["body"]["system"] == "Be brief."


def test_a_caller_without_a_key_is_told_how_to_add_one(ai_farm: Farm) -> None:
    """No BYOK key for the provider: a clear tool error naming the command."""
    stranger = ai_farm.new_token("nokey@example.test")
    ai_farm.cli("visibility", "loop", "public")
    body = call(ai_farm.url, stranger, "loop", "ask", {"question": "hi", "model": "gpt-4o"})

    text = body["result"]["content"][0]["text"]
    assert body["result"]["isError"] is True
    assert "no API key for openai" in text and "ultralight byok set openai" in text


def test_a_cycle_of_calls_stops_at_the_depth_limit(ai_farm: Farm) -> None:
    """An app calling itself is stopped after five hops with a message naming the chain."""
    body = call(ai_farm.url, ai_farm.token, "loop", "again", {})

    text = body["result"]["content"][0]["text"]
    assert body["result"]["isError"] is True
    assert "deeper than 5 calls" in text and "loop -> loop" in text


def test_called_apps_see_the_original_caller(ai_farm: Farm) -> None:
    """Notes read through digest's ul.call are the caller's own, not digest's."""
    other = ai_farm.new_token("other-reader@example.test")
    ai_farm.cli("visibility", "notes", "public")
    ai_farm.cli("visibility", "digest", "public")
    set_key(ai_farm, "openai", KEY, token=other)
    body = call(ai_farm.url, other, "digest", "summarize_notes", {"tag": "a"})

    assert body["result"]["structuredContent"] == {"summary": "", "count": 0}


PROBER = Path(__file__).parent / "apps" / "prober.py"


def test_another_owners_app_cannot_reach_the_callers_private_apps(ai_farm: Farm) -> None:
    """A public app of someone else, called by the owner, cannot use ul.call on their apps."""
    mallory = ai_farm.new_token("mallory@example.test")
    ai_farm.cli("deploy", str(PROBER), "--name", "prober", "--public", token=mallory)
    ai_farm.cli("visibility", "loop", "private")
    body = call(ai_farm.url, ai_farm.token, "prober", "probe",
                {"app": "loop", "function": "ask"})

    text = body["result"]["structuredContent"]["result"]
    assert text.startswith("refused:") and "may not call the private app 'loop'" in text
