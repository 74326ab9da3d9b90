"""``ul.call``: an app calls another app's tool through the gateway, as the original caller.

The worker vouches for the caller with a short-lived token sealed under the farm key; the gateway
opens it, applies the same permission and limit checks as for any call, and runs the tool with the
remaining deadline. Each hop adds one to the depth; past the limit the chain stops, which is what
ends cycles (a calls b calls a ...).
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import Any

import aiohttp
import orjson
from cryptography.exceptions import InvalidTag

from config import Settings
from workers import WorkerError
from workers.jobs import CallJob
from workers.sealing import Keyring, SealingError

INTERNAL_AAD = b"ultralight-internal-call-v1"
NONCE_BYTES = 12


class NestedCallError(WorkerError):
    """The nested call failed, was refused, or went too deep; str() is for the app author."""


def seal_identity(keyring: Keyring, identity: dict[str, Any]) -> str:
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = keyring.aead(keyring.current_id).encrypt(nonce, orjson.dumps(identity),
                                                      INTERNAL_AAD)
    return f"{keyring.current_id}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"


def open_identity(keyring: Keyring, token: str) -> dict[str, Any]:
    """The identity a worker vouched for; raises NestedCallError if forged or expired."""
    key_id, _, encoded = token.partition(".")
    try:
        raw = base64.urlsafe_b64decode(encoded)
        identity = orjson.loads(keyring.aead(key_id).decrypt(raw[:NONCE_BYTES],
                                                              raw[NONCE_BYTES:], INTERNAL_AAD))
    except (SealingError, InvalidTag, ValueError) as exc:
        raise NestedCallError("the internal call token does not open with this farm's key") \
            from exc
    if not isinstance(identity, dict) or float(identity.get("deadline", 0)) < time.time():
        raise NestedCallError("the internal call token has expired")
    return identity


class NestedCaller:
    def __init__(self, settings: Settings, keyring: Keyring) -> None:
        self.settings = settings
        self.keyring = keyring
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(trust_env=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, job: CallJob, app: str, function: str, args: Any) -> Any:
        if not isinstance(app, str) or not isinstance(function, str) or not isinstance(
                args, dict):
            raise NestedCallError("call: app and function must be strings, arguments keywords")
        if job.shadow is not None:
            raise NestedCallError("call: app-to-app calls are not made during replays (their "
                                  "writes could not be kept out of live data)")
        chain = [*job.chain, job.app_name]
        if job.depth + 1 > self.settings.max_call_depth:
            raise NestedCallError(f"call: the chain {' -> '.join([*chain, app])} is deeper than "
                                  f"{self.settings.max_call_depth} calls; is it a cycle?")
        remaining = job.deadline - time.time() - 0.5
        if remaining <= 0:
            raise NestedCallError("call: no time is left before this call's deadline")
        token = seal_identity(self.keyring, {"user": job.user, "depth": job.depth + 1,
                                             "chain": chain, "from_app": job.app_id,
                                             "caller_apps": job.caller_apps,
                                             "deadline": job.deadline - 0.5})
        assert self._session is not None
        url = f"{self.settings.gateway_url.rstrip('/')}/internal/call"
        try:
            async with self._session.post(url, json={"token": token, "app": app,
                                                     "function": function, "arguments": args},
                                          timeout=aiohttp.ClientTimeout(total=remaining)
                                          ) as response:
                answer = await response.json(loads=orjson.loads)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise NestedCallError(f"call: the gateway at {self.settings.gateway_url} could not "
                                  f"run {app}.{function} ({type(exc).__name__})") from exc
        if answer.get("isError"):
            raise NestedCallError(f"{app}.{function}: {answer.get('error')}")
        return answer.get("result")
