"""``ul.ai``: chat completions through the calling user's own provider key, made by the worker.

The key never enters the sandbox: the worker picks the provider from the model name, sends the
request with the caller's key, and hands back only the reply, the usage and its cost.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import aiohttp
import orjson
import structlog

from config import Settings
from workers import WorkerError

log = structlog.get_logger(__name__)

ANTHROPIC_VERSION = "2023-06-01"
MAX_MESSAGES = 200
MAX_REPLY_BYTES = 4 * 1024 * 1024
# Model-name prefixes to providers; a "vendor/model" name goes to OpenRouter.
PREFIXES = (
    ("claude", "anthropic"),
    ("gpt", "openai"),
    ("o1", "openai"),
    ("o3", "openai"),
    ("o4", "openai"),
    ("deepseek", "deepseek"),
    ("moonshot", "moonshot"),
    ("kimi", "moonshot"),
)


class AiError(WorkerError):
    """A chat completion could not be made; the message says why (never the key)."""


@dataclasses.dataclass(frozen=True)
class Completion:
    content: str
    model: str
    provider: str
    input_tokens: int
    output_tokens: int
    cost_usd: float | None

    def public(self) -> dict[str, Any]:
        return {"content": self.content, "model": self.model, "provider": self.provider,
                "usage": {"input_tokens": self.input_tokens,
                          "output_tokens": self.output_tokens},
                "cost_usd": self.cost_usd}


def provider_for(model: str, fallback: str) -> str:
    if "/" in model:
        return "openrouter"
    lowered = model.lower()
    return next((provider for prefix, provider in PREFIXES if lowered.startswith(prefix)),
                fallback)


def check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise AiError(f"ai: messages must be a list of 1 to {MAX_MESSAGES} "
                      "{'role', 'content'} objects")
    checked = []
    for message in messages:
        if not (isinstance(message, dict) and message.get("role") in
                ("system", "user", "assistant") and isinstance(message.get("content"), str)):
            raise AiError("ai: each message needs a role (system, user or assistant) and a "
                          "string content")
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


class AiClient:
    """One per worker process: the provider endpoints and prices from settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.urls = {
            "openai": settings.ai_openai_url,
            "anthropic": settings.ai_anthropic_url,
            "openrouter": settings.ai_openrouter_url,
            "deepseek": settings.ai_deepseek_url,
            "moonshot": settings.ai_moonshot_url,
        }
        self.prices: dict[str, list[float]] = orjson.loads(settings.ai_prices or "{}")
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.ai_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout, trust_env=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def complete(self, messages: Any, model: str | None, key_for: Any,
                       max_tokens: int | None = None, temperature: float | None = None
                       ) -> Completion:
        """``key_for(provider)`` gives the caller's key for a provider, or None."""
        chosen = model or self.settings.ai_default_model
        if not isinstance(chosen, str) or not chosen:
            raise AiError("ai: model must be a model name such as 'gpt-4o-mini'")
        provider = provider_for(chosen, self.settings.ai_default_provider)
        key = key_for(provider)
        if not key:
            raise AiError(f"ai: you have no API key for {provider}; add yours with "
                          f"'ultralight byok set {provider}' (the app never sees it)")
        body = {"model": chosen, "messages": check_messages(messages)}
        if max_tokens is not None:
            body["max_tokens"] = int(max_tokens)
        if temperature is not None:
            body["temperature"] = float(temperature)
        started = time.perf_counter()
        if provider == "anthropic":
            completion = await self._anthropic(body, key)
        else:
            completion = await self._openai_like(provider, body, key)
        log.info("ai_completion", provider=provider, model=chosen,
                 input_tokens=completion.input_tokens, output_tokens=completion.output_tokens,
                 elapsed_ms=round((time.perf_counter() - started) * 1000, 2))
        return completion

    async def _post(self, url: str, headers: dict[str, str], body: dict[str, Any],
                    provider: str) -> dict[str, Any]:
        assert self._session is not None
        try:
            async with self._session.post(url, data=orjson.dumps(body), headers={
                    "content-type": "application/json", **headers}) as response:
                raw = await response.content.read(MAX_REPLY_BYTES + 1)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AiError(f"ai: {provider} could not be reached ({type(exc).__name__})") from exc
        if len(raw) > MAX_REPLY_BYTES:
            raise AiError(f"ai: {provider} answered with more than {MAX_REPLY_BYTES} bytes")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise AiError(f"ai: {provider} answered HTTP {status} with something that is not "
                          "JSON") from None
        if status >= 400:
            message = _error_message(data)
            raise AiError(f"ai: {provider} refused the request (HTTP {status}): {message}")
        return data

    async def _openai_like(self, provider: str, body: dict[str, Any], key: str) -> Completion:
        data = await self._post(f"{self.urls[provider].rstrip('/')}/chat/completions",
                                {"authorization": f"Bearer {key}"}, body, provider)
        try:
            content = data["choices"][0]["message"]["content"] or ""
            usage = data.get("usage") or {}
            tokens_in, tokens_out = int(usage.get("prompt_tokens", 0)), int(
                usage.get("completion_tokens", 0))
        except (KeyError, IndexError, TypeError, ValueError):
            raise AiError(f"ai: {provider} answered in an unexpected shape") from None
        model = str(data.get("model") or body["model"])
        return Completion(content, model, provider, tokens_in, tokens_out,
                          self._cost(model, tokens_in, tokens_out))

    async def _anthropic(self, body: dict[str, Any], key: str) -> Completion:
        system = "\n\n".join(m["content"] for m in body["messages"] if m["role"] == "system")
        payload: dict[str, Any] = {
            "model": body["model"], "max_tokens": body.get("max_tokens", 1024),
            "messages": [m for m in body["messages"] if m["role"] != "system"],
        }
        if system:
            payload["system"] = system
        if "temperature" in body:
            payload["temperature"] = body["temperature"]
        data = await self._post(f"{self.urls['anthropic'].rstrip('/')}/messages",
                                {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION},
                                payload, "anthropic")
        try:
            content = "".join(part.get("text", "") for part in data["content"]
                              if part.get("type") == "text")
            usage = data.get("usage") or {}
            tokens_in, tokens_out = int(usage.get("input_tokens", 0)), int(
                usage.get("output_tokens", 0))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise AiError("ai: anthropic answered in an unexpected shape") from None
        model = str(data.get("model") or body["model"])
        return Completion(content, model, "anthropic", tokens_in, tokens_out,
                          self._cost(model, tokens_in, tokens_out))

    def _cost(self, model: str, tokens_in: int, tokens_out: int) -> float | None:
        """US dollars from the price table (per million tokens, by longest model prefix)."""
        matches = [p for p in self.prices if model.startswith(p)]
        if not matches:
            return None
        price_in, price_out = self.prices[max(matches, key=len)]
        return round((tokens_in * price_in + tokens_out * price_out) / 1_000_000, 8)


def _error_message(data: Any) -> str:
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            return str(error.get("message", ""))[:300]
        if isinstance(error, str):
            return error[:300]
    return "no details"
