"""The wire contract between gateways and workers: job payloads, replies and Redis key names."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

RUN_CALL = "run_call"
WAKE_CHANNEL = "ultralight:wake"


def wake_channel(queue_name: str) -> str:
    """Where gateways announce new work on a queue, so idle workers look at once."""
    return f"{WAKE_CHANNEL}:{queue_name}"
REPLY_TTL_S = 120


def reply_key(call_id: str) -> str:
    return f"ultralight:reply:{call_id}"


def claim_key(call_id: str) -> str:
    return f"ultralight:claim:{call_id}"


def worker_key(worker_id: str) -> str:
    return f"ultralight:worker:{worker_id}"


WORKER_KEY_PATTERN = "ultralight:worker:*"


@dataclasses.dataclass(frozen=True)
class CallJob:
    """Everything a worker needs to run one call, and nothing it must not see."""

    call_id: str
    app_id: str
    app_name: str
    version: str
    code_hash: str
    function: str
    args: dict[str, Any]
    deadline: float
    user: dict[str, Any] | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    # Env vars, the caller's secrets and BYOK keys, sealed with the farm key (workers.sealing).
    sealed: str | None = None
    # Set on replays: writes go to this shadow space, reads fall through to live data.
    shadow: str | None = None
    # How many app-to-app calls led here (0 for a call from a client), and through which apps.
    depth: int = 0
    chain: list[str] = dataclasses.field(default_factory=list)
    # The apps the caller's token is limited to (None: not limited); app-to-app calls keep it.
    caller_apps: list[str] | None = None

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> CallJob:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass(frozen=True)
class CallReply:
    """What comes back on the reply key."""

    outcome: str
    value: Any = None
    error: str | None = None
    logs: str = ""
    elapsed_ms: float = 0.0
    worker_id: str = ""
    # One entry per ul.ai completion: provider, model, tokens and cost.
    ai_usage: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def encode(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> CallReply:
        return cls(**orjson.loads(data))


def serialize_job(data: Any) -> bytes:
    """arq's job serializer: JSON, so nothing in the farm ever unpickles."""
    return orjson.dumps(data)


def deserialize_job(data: bytes) -> Any:
    return orjson.loads(data)
