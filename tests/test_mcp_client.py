"""The official MCP client lists and calls real apps through gateway, Redis and workers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import SHARED_APPS, Farm


@asynccontextmanager
async def connect(url: str, token: str | None, mode: str = "auto") -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
            yield client


def text_of(result: Any) -> str:
    return " ".join(c.text for c in result.content if c.type == "text")


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_notes_round_trip(farm: Farm, deployed: dict[str, str], mode: str) -> None:
    """Add notes, find them by tag, delete one and count, in both protocol eras."""
    app = f"notes-{mode}"
    farm.deploy(SHARED_APPS / "notes.py", app)
    async with connect(f"{farm.url}/mcp/{app}", farm.token, mode) as client:
        expected = {"auto": "2026-07-28", "legacy": "2025-11-25"}[mode]
        assert client.protocol_version == expected
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {"add_note", "get_note", "find_notes", "delete_note", "count_notes"}
        assert tools["find_notes"].input_schema["properties"]["order"]["enum"] == [
            "newest", "oldest"]

        first = await client.call_tool("add_note", {"text": "buy milk", "tags": ["home"]})
        await client.call_tool("add_note", {"text": "ship release", "tags": ["work"]})
        await client.call_tool("add_note", {"text": "water plants", "tags": ["home"],
                                            "pinned": True})
        key = first.structured_content["key"]

        home = await client.call_tool("find_notes", {"tag": "home"})
        texts = [n["value"]["text"] for n in home.structured_content["result"]]
        assert texts == ["water plants", "buy milk"]
        oldest = await client.call_tool("find_notes", {"order": "oldest"})
        assert [n["value"]["text"] for n in oldest.structured_content["result"]][0] == "buy milk"
        pinned = await client.call_tool("find_notes", {"pinned_only": True})
        assert len(pinned.structured_content["result"]) == 1

        assert (await client.call_tool("delete_note", {"key": key})).structured_content == {
            "result": True}
        assert (await client.call_tool("delete_note", {"key": key})).structured_content == {
            "result": False}
        count = await client.call_tool("count_notes", {})
        assert count.structured_content == {"result": 2}
        missing = await client.call_tool("get_note", {"key": key})
        assert missing.structured_content == {"result": None}


async def test_tool_error_arrives_as_is_error(farm: Farm, deployed: dict[str, str]) -> None:
    """A ValueError raised by the app is a tool result with isError, not a protocol error."""
    async with connect(f"{farm.url}/mcp/notes", farm.token) as client:
        result = await client.call_tool("add_note", {"text": "   "})
    assert result.is_error
    assert "ValueError: a note needs some text" in text_of(result)


async def test_units_literal_async_and_public(farm: Farm, deployed: dict[str, str]) -> None:
    """Literal enums, an async tool and a public app called without any token."""
    async with connect(f"{farm.url}/mcp/units", None) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        units = tools["convert_length"].input_schema["properties"]["from_unit"]["enum"]
        assert units == ["mm", "cm", "m", "km", "in", "ft", "mi"]
        km = await client.call_tool("convert_length",
                                    {"value": 5, "from_unit": "km", "to_unit": "mi"})
        assert km.structured_content["result"] == pytest.approx(3.10686, rel=1e-4)
        echo = await client.call_tool("echo", {"message": "hi", "times": 3})
        assert echo.structured_content == {"result": "hi hi hi"}
        bad = await client.call_tool("convert_length",
                                     {"value": 1, "from_unit": "parsec", "to_unit": "m"})
        assert bad.is_error and "parsec" in text_of(bad)
        too_big = await client.call_tool("primes_below", {"n": 2_000_000})
        assert too_big.is_error and "at most 1000000" in text_of(too_big)


async def test_concurrent_calls_from_many_clients(farm: Farm, deployed: dict[str, str]) -> None:
    """Twenty clients calling at once all get their own right answers."""
    async def one(i: int) -> float:
        async with connect(f"{farm.url}/mcp/units", None) as client:
            result = await client.call_tool("celsius_to_fahrenheit", {"celsius": i})
            return float(result.structured_content["result"])

    results = await asyncio.gather(*(one(i) for i in range(20)))
    assert results == [i * 9 / 5 + 32 for i in range(20)]
