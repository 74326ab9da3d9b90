"""Typed settings: defaults here, overridden by ``ULTRALIGHT_*`` environment variables."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "ULTRALIGHT_"


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of the farm; each field ``name`` reads ``ULTRALIGHT_NAME`` from the env."""

    # Where embedded state lives (SQLite file, code blobs).
    data_dir: Path = Path(".ultralight")
    # One Redis shared by every gateway and worker.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Metadata and app data; empty means SQLite under data_dir.
    database_url: str = ""
    # Code bundles; empty means a folder under data_dir.
    blob_dir: str = ""

    # Gateway.
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    max_body_bytes: int = 1_048_576
    session_ttl_s: int = 3600
    # Extra allowed browser origins, comma separated; loopback origins are always allowed.
    allowed_origins: str = ""
    call_timeout_s: float = 30.0
    max_call_timeout_s: float = 300.0
    cache_ttl_s: float = 1.0

    # Queue.
    queue_name: str = "ultralight:calls"
    # Replays run on their own queue, never ahead of live calls.
    replay_queue_name: str = "ultralight:replays"
    replay_concurrency: int = 2
    # Safety net only: workers are woken on enqueue, this is how often they look anyway.
    worker_poll_s: float = 2.0
    worker_heartbeat_s: float = 1.0
    worker_heartbeat_ttl_s: float = 3.0

    # Worker and sandbox.
    worker_concurrency: int = 8
    # "bwrap" (namespaces, required in production) or "process" (development only).
    sandbox_isolation: str = "bwrap"
    sandbox_tmp_mb: int = 16
    # Each concurrent sandbox runs as its own uid from this base when the worker is root.
    sandbox_uid_base: int = 640_000
    # Where workers reach a gateway for app-to-app calls (ul.call), and how deep chains may go.
    gateway_url: str = "http://127.0.0.1:8080"
    max_call_depth: int = 5
    # Sandboxes each worker process keeps started ahead of their calls.
    sandbox_warm: int = 2
    sandbox_python: str = ""
    sandbox_cpu_s: int = 10
    sandbox_memory_mb: int = 512
    sandbox_max_files: int = 64
    sandbox_max_file_mb: int = 16
    sandbox_max_processes: int = 32
    sandbox_max_output_bytes: int = 65_536
    max_result_bytes: int = 5 * 1024 * 1024

    # App data.
    max_value_bytes: int = 1_048_576
    max_query_limit: int = 1000

    # Operations: a worker process serves Prometheus metrics on this port (0: off); with
    # --processes N the processes take consecutive ports. Calls are refused with 503 while more
    # than max_queue_depth wait.
    worker_metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    max_queue_depth: int = 1000
    # Calls one caller (user, or address when anonymous) may have running at once; 0: no cap.
    max_calls_in_flight_per_caller: int = 32
    call_log_retention_days: float = 30.0

    # Logs: "console" for people, "json" for machines.
    log_format: str = "json"
    log_level: str = "INFO"

    # Production backends.
    # Code bundles in S3 or an S3-compatible store (R2, MinIO) as s3://BUCKET/PREFIX; empty means
    # the local folder (blob_dir).
    blob_url: str = ""
    # The endpoint of an S3-compatible store; empty means AWS S3 itself.
    s3_endpoint_url: str = ""
    s3_region: str = ""
    # Both keys empty leaves boto3 to find credentials (environment, config files, instance role).
    s3_access_key_id: str = ""
    s3_secret_access_key: str = dataclasses.field(default="", repr=False)
    # TLS for rediss:// URLs: a CA bundle to trust (empty trusts the system's), and whether to skip
    # certificate checks altogether (a test rig's shortcut, never production's).
    redis_tls_ca_file: str = ""
    redis_tls_insecure: bool = False
    # Sentinel, as "host:port,host:port": the master named below is found through them, and
    # redis_url then gives only the password, the database number and TLS (rediss://).
    redis_sentinels: str = ""
    redis_sentinel_master: str = "mymaster"

    # Outbound HTTP.
    # Host names that may use plain http and resolve to private addresses, comma separated.
    http_allow_hosts: str = ""
    http_max_in_flight: int = 20
    http_timeout_s: float = 15.0
    http_max_bytes: int = 10_485_760
    # A CA bundle trusted besides the system store; empty means the system store alone.
    http_ca_file: str = ""

    # Identity, access and limits.
    # Supabase JWTs, verified locally. supabase_url sets the issuer ({url}/auth/v1) and the JWKS
    # ({url}/auth/v1/.well-known/jwks.json) unless jwt_issuer or jwt_jwks_url say otherwise;
    # jwt_secret (the project's JWT secret) enables HS256. All empty: JWTs are refused.
    supabase_url: str = ""
    jwt_secret: str = dataclasses.field(default="", repr=False)
    jwt_jwks_url: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = "authenticated"
    jwt_algorithms: str = "HS256,RS256,ES256"
    jwt_leeway_s: float = 5.0
    # The JWKS is fetched once and kept; an unknown kid refetches it, at most this often.
    jwks_refresh_min_s: float = 10.0
    jwks_timeout_s: float = 5.0
    # Permission, token and secret caches: invalidated through Redis at once, this is the backstop.
    access_cache_ttl_s: float = 10.0
    # Peers (IPs or CIDRs, comma separated) whose X-Forwarded-For names the client's address.
    trusted_proxies: str = ""
    # Calls per minute per caller (user, or address when anonymous), by MCP method.
    rate_limit_call_per_min: int = 100
    rate_limit_list_per_min: int = 30
    rate_limit_initialize_per_min: int = 10
    # Tool calls per week by tier, "tier:calls,..."; 0 is unlimited; weeks start Sunday 00:00 UTC.
    weekly_quotas: str = "anonymous:1000,free:10000,pro:250000,unlimited:0"
    # How long the gates may wait on Redis before the call is refused (503, fail closed).
    gate_timeout_s: float = 2.0
    # AES-GCM keyrings, "id:base64key,..." with the current key first. Empty: a key generated
    # once in data_dir (mode 0600), fine when every process shares that folder.
    secret_keys: str = dataclasses.field(default="", repr=False)
    farm_key: str = dataclasses.field(default="", repr=False)

    # Zygote sandboxes.
    # "zygote": each slot keeps a warm, isolated fork server and every call is forked from it into
    # namespaces of its own (falls back to "fresh", with a warning, where the host lacks nested
    # user namespaces, per-slot uids or cgroups); "fresh": bubblewrap starts a new interpreter
    # for every call.
    sandbox_mode: str = "zygote"
    # How long a slot's zygote may take to answer a fork before it is replaced.
    sandbox_zygote_timeout_s: float = 3.0

    # AI providers for ul.ai (the caller's own keys; endpoints are the operator's).
    ai_default_model: str = "gpt-4o-mini"
    ai_default_provider: str = "openai"
    ai_openai_url: str = "https://api.openai.com/v1"
    ai_anthropic_url: str = "https://api.anthropic.com/v1"
    ai_openrouter_url: str = "https://openrouter.ai/api/v1"
    ai_deepseek_url: str = "https://api.deepseek.com/v1"
    ai_moonshot_url: str = "https://api.moonshot.ai/v1"
    ai_timeout_s: float = 60.0
    # JSON: model prefix -> [USD per million input tokens, per million output tokens].
    ai_prices: str = (
        '{"gpt-4o-mini": [0.15, 0.6], "gpt-4o": [2.5, 10], "claude-3-5-haiku": [0.8, 4],'
        ' "claude-sonnet-4": [3, 15], "deepseek-chat": [0.27, 1.1]}'
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``ULTRALIGHT_*`` variables, then explicit keyword overrides."""
        env = os.environ if env is None else env
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + field.name.upper())
            if raw is not None:
                values[field.name] = _convert(field.name, raw, hints[field.name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'ultralight.db').resolve()}"

    @property
    def resolved_blob_dir(self) -> Path:
        return Path(self.blob_dir) if self.blob_dir else self.data_dir / "blobs"

    @property
    def origin_allowlist(self) -> frozenset[str]:
        origins = (o.strip().rstrip("/") for o in self.allowed_origins.split(","))
        return frozenset(o for o in origins if o)


def _convert(name: str, raw: str, kind: Any) -> Any:
    env_name = ENV_PREFIX + name.upper()
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(raw)
            return lowered in {"1", "true", "yes", "on"}
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw)
        return raw
    except ValueError as exc:
        raise SettingsError(f"{env_name}={raw!r} is not a valid {kind.__name__}") from exc
