"""Secrets: app env vars, per-user secrets and BYOK keys, encrypted at rest, sealed into jobs,
opened only by the worker, and never in Redis, logs or error messages in the clear."""

from __future__ import annotations

import base64
import secrets
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from config import Settings
from gateway.secrets import MAX_ENV_VARS, SecretError, SecretKeys, context, decrypt, encrypt
from tests.conftest import SHARED_APPS, Farm, RedisServer, modern_call, start_farm
from workers.sealing import (
    Keyring,
    SealedPayload,
    SealingError,
    job_aad,
    new_key_entry,
    open_sealed,
    seal,
)

ENV_VIEW = '''"""Shows what a call can read."""
import ultralight as ul


def env_view() -> dict:
    """The env vars and secrets this call sees."""
    return dict(ul.env)
'''
ENV_VIEW_MANIFEST = {"env": {"API_URL": {"scope": "app"},
                             "MY_TOKEN": {"scope": "per_user", "required": False}}}


@pytest.fixture(scope="module")
def farm(redis_server: RedisServer) -> Iterator[Farm]:
    running = start_farm(redis_server.url, settings={"ULTRALIGHT_CALL_TIMEOUT_S": "6"})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def greeter(farm: Farm) -> str:
    farm.deploy(SHARED_APPS / "greeter.py", "greeter", "--public")
    return "greeter"


def put(farm: Farm, path: str, value: Any, token: str | None = None) -> Any:
    with farm.http(token or farm.token) as http:
        return http.put(path, json={"value": value})


def call(farm: Farm, app: str, tool: str, token: str | None = None) -> dict[str, Any]:
    with farm.http(token or farm.token) as http:
        response = modern_call(http, app, "tools/call", {"name": tool, "arguments": {}})
    assert response.status_code == 200, response.text
    return dict(response.json()["result"])


def cli_with_stdin(farm: Farm, stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**farm.env, "ULTRALIGHT_URL": farm.url, "ULTRALIGHT_TOKEN": farm.token}
    return subprocess.run([sys.executable, "-m", "gateway", *args], input=stdin, env=env,
                          text=True, capture_output=True, timeout=60, check=True)


# The greeter example, end to end.

def test_a_missing_per_user_secret_is_a_clear_tool_error(farm: Farm, greeter: str) -> None:
    """A caller without PERSONAL_TOKEN gets a tool error naming it and the command to set it."""
    stranger = farm.new_token("no-secret@example.test")

    result = call(farm, greeter, "secret_hint", stranger)

    text = result["content"][0]["text"]
    assert result["isError"] is True
    assert "PERSONAL_TOKEN" in text
    assert "ultralight secret set greeter PERSONAL_TOKEN" in text


def test_secret_and_env_reach_the_app(farm: Farm, greeter: str) -> None:
    """With the secret set (from stdin) secret_hint sees it; greet uses the app's GREETING."""
    token_value = "pt-" + secrets.token_hex(8)
    cli_with_stdin(farm, token_value + "\n", "secret", "set", greeter, "PERSONAL_TOKEN")
    farm.cli("env", "set", greeter, "GREETING", "Ahoy")

    hint = call(farm, greeter, "secret_hint")
    greeting = call(farm, greeter, "greet")

    assert hint["structuredContent"] == {"configured": True, "length": len(token_value)}
    assert greeting["structuredContent"] == {"result": "Ahoy, owner@example.test!"}


def test_each_caller_has_their_own_secret(farm: Farm, greeter: str) -> None:
    """Per-user secrets are per user: another caller's value is theirs alone."""
    other = farm.new_token("other-secret@example.test")
    assert put(farm, f"/api/apps/{greeter}/secrets/PERSONAL_TOKEN", "x" * 5,
               other).status_code == 200

    mine = call(farm, greeter, "secret_hint")["structuredContent"]
    theirs = call(farm, greeter, "secret_hint", other)["structuredContent"]

    assert theirs == {"configured": True, "length": 5}
    assert mine["length"] != 5


def test_listings_never_show_values(farm: Farm, greeter: str) -> None:
    """env list, secret list and byok list name what is set, never its value."""
    value = "listing-" + secrets.token_hex(8)
    farm.cli("env", "set", greeter, "LISTED", value)
    farm.cli("byok", "set", "anthropic", value)

    outputs = [farm.cli("env", "list", greeter).stdout, farm.cli("secret", "list", greeter).stdout,
               farm.cli("byok", "list").stdout]

    assert "LISTED" in outputs[0] and "PERSONAL_TOKEN" in outputs[1]
    assert "anthropic" in outputs[2]
    assert all(value not in out for out in outputs)


def test_the_sandbox_sees_env_and_secrets_but_no_byok_key(farm: Farm, tmp_path: Path) -> None:
    """The sealed payload gives the sandbox env vars and the caller's secrets, never BYOK keys."""
    source = tmp_path / "envview.py"
    source.write_text(ENV_VIEW)
    manifest = tmp_path / "envview.manifest.json"
    manifest.write_text(__import__("orjson").dumps(ENV_VIEW_MANIFEST).decode())
    farm.deploy(source, "envview")
    byok = "sk-" + secrets.token_hex(12)
    put(farm, "/api/apps/envview/env/API_URL", "https://api.test")
    put(farm, "/api/apps/envview/secrets/MY_TOKEN", "mine")
    put(farm, "/api/byok/openai", byok)

    seen = call(farm, "envview", "env_view")["structuredContent"]

    assert seen == {"API_URL": "https://api.test", "MY_TOKEN": "mine"}


# Validation, with values never echoed.

@pytest.mark.parametrize(("name", "value", "expected"), [
    ("ULTRALIGHT_MODE", "value-not-echoed", "reserved"),
    ("X" * 65, "value-not-echoed", "not a valid variable name"),
    ("1ABC", "value-not-echoed", "not a valid variable name"),
    ("BIG", "é" * 2049, "longer than 4096 bytes"),
    ("NOT_TEXT", 42, "must be a string"),
])
def test_env_var_rules(farm: Farm, greeter: str, name: str, value: Any, expected: str) -> None:
    """Reserved prefix, name shape and length, value size and type are checked, no echo."""
    response = put(farm, f"/api/apps/{greeter}/env/{name}", value)

    assert response.status_code == 400
    assert expected in response.text
    if isinstance(value, str):
        assert value not in response.text


def test_at_most_fifty_env_vars(farm: Farm, tmp_path: Path) -> None:
    """The 51st env var of an app is refused; replacing an existing one still works."""
    app = tmp_path / "many.py"
    app.write_text('"""Many vars."""\n\n\ndef f() -> int:\n    """One."""\n    return 1\n')
    farm.deploy(app, "many-vars")
    for index in range(MAX_ENV_VARS):
        assert put(farm, f"/api/apps/many-vars/env/V{index}", "x").status_code == 200

    refused = put(farm, "/api/apps/many-vars/env/ONE_MORE", "x")
    replaced = put(farm, "/api/apps/many-vars/env/V0", "y")

    assert refused.status_code == 400 and "at most 50" in refused.text
    assert replaced.status_code == 200


def test_undeclared_or_app_level_names_are_refused(farm: Farm, greeter: str) -> None:
    """A per-user secret must be declared per_user; a per-user name cannot be an env var."""
    undeclared = put(farm, f"/api/apps/{greeter}/secrets/OTHER", "v")
    as_env = put(farm, f"/api/apps/{greeter}/env/PERSONAL_TOKEN", "v")

    assert undeclared.status_code == 400 and "declares no per-user secret" in undeclared.text
    assert as_env.status_code == 400 and "ultralight secret set" in as_env.text


def test_others_cannot_touch_an_apps_env(farm: Farm, greeter: str) -> None:
    """Only the owner may set an app's env vars."""
    stranger = farm.new_token("env-stranger@example.test")

    response = put(farm, f"/api/apps/{greeter}/env/GREETING", "hijack", stranger)

    assert response.status_code == 403


# Nothing in the clear: Redis, logs, the database.

class Monitor:
    """Records every command Redis receives while active (Redis MONITOR)."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.seen: list[str] = []
        self.sentinel = "monitor-done-" + secrets.token_hex(4)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        self._ready.wait(5)
        return self

    def _run(self) -> None:
        with self.client.monitor() as monitor:
            self._ready.set()
            for command in monitor.listen():
                text = str(command.get("command", ""))
                if self.sentinel in text:
                    return
                self.seen.append(text)

    def __exit__(self, *exc: object) -> None:
        self.client.echo(self.sentinel)
        self._thread.join(10)
        self.client.close()


def test_no_secret_in_redis_logs_or_database(farm: Farm, greeter: str,
                                            redis_server: RedisServer) -> None:
    """No secret value in Redis (commands received, keys left), the logs or the database."""
    values = {"secret": "pt-" + secrets.token_hex(10), "env": "gr-" + secrets.token_hex(10),
              "byok": "sk-" + secrets.token_hex(10)}
    with Monitor(redis_server.url) as monitor:
        put(farm, f"/api/apps/{greeter}/secrets/PERSONAL_TOKEN", values["secret"])
        put(farm, f"/api/apps/{greeter}/env/UNUSED_BUT_SEALED", values["env"])
        put(farm, "/api/byok/openai", values["byok"])
        for _ in range(3):
            assert call(farm, greeter, "secret_hint")["isError"] is False

    haystacks = {"redis commands": "\n".join(monitor.seen),
                 "redis contents": dump_redis(redis_server.url),
                 "logs": farm.logs(),
                 "database": (farm.data_dir / "ultralight.db").read_bytes().decode("latin-1")}
    assert len(monitor.seen) > 10
    for where, text in haystacks.items():
        for kind, value in values.items():
            assert value not in text, f"the {kind} value is in the {where}"
            assert base64.b64encode(value.encode()).decode() not in text


def dump_redis(url: str) -> str:
    client = redis.Redis.from_url(url)
    parts: list[str] = []
    for key in client.scan_iter(count=1000):
        kind = cast(bytes, client.type(key)).decode()
        parts.append(key.decode(errors="replace"))
        if kind == "string":
            parts.append(str(client.get(key)))
        elif kind == "list":
            parts.append(str(client.lrange(key, 0, -1)))
        elif kind == "hash":
            parts.append(str(client.hgetall(key)))
        elif kind == "set":
            parts.append(str(client.smembers(key)))
        elif kind == "zset":
            parts.append(str(client.zrange(key, 0, -1)))
        elif kind == "stream":
            parts.append(str(client.xrange(key)))
    client.close()
    return "\n".join(parts)


# Key rotation.

def test_keys_rotate_reencrypts_without_downtime(farm: Farm, greeter: str) -> None:
    """keys rotate adds a new key and re-encrypts every record; the running gateway reads them."""
    before = set(key_ids(farm))
    put(farm, f"/api/apps/{greeter}/secrets/PERSONAL_TOKEN", "rotating")

    output = farm.cli("keys", "rotate").stdout
    after = set(key_ids(farm))

    assert "re-encrypted" in output
    assert len(after) == 1 and after.isdisjoint(before)
    assert call(farm, greeter, "secret_hint")["structuredContent"] == {
        "configured": True, "length": len("rotating")}


def key_ids(farm: Farm) -> list[str]:
    with sqlite3.connect(farm.data_dir / "ultralight.db") as conn:
        rows = conn.execute("SELECT key_id FROM app_env UNION ALL SELECT key_id FROM"
                            " user_secrets UNION ALL SELECT key_id FROM byok_keys").fetchall()
    return [r[0] for r in rows]


# The cryptography, directly.

def keys_in(tmp_path: Path, configured: str = "") -> SecretKeys:
    return SecretKeys(Settings(data_dir=tmp_path, secret_keys=configured))


def test_records_open_only_where_they_belong(tmp_path: Path) -> None:
    """A ciphertext opens with its own context only; a moved or altered one does not."""
    keys = keys_in(tmp_path)
    key_id, blob = encrypt(keys, context("env", "app_1", "TOKEN"), "value")

    assert decrypt(keys, context("env", "app_1", "TOKEN"), key_id, blob) == "value"
    with pytest.raises(SecretError, match="altered or moved"):
        decrypt(keys, context("env", "app_2", "TOKEN"), key_id, blob)
    with pytest.raises(SecretError, match="altered or moved"):
        decrypt(keys, context("env", "app_1", "TOKEN"), key_id, blob[:-1] + b"\0")


def test_each_record_has_its_own_salt(tmp_path: Path) -> None:
    """The same value encrypts differently every time (random salt and nonce)."""
    keys = keys_in(tmp_path)

    first = encrypt(keys, b"ctx", "same")[1]
    second = encrypt(keys, b"ctx", "same")[1]

    assert first[:16] != second[:16] and first != second


def test_a_generated_key_file_is_private(tmp_path: Path) -> None:
    """Without configured keys, one is generated in the data dir with mode 0600 and reused."""
    first = keys_in(tmp_path).keyring.current_id
    second = keys_in(tmp_path).keyring.current_id

    assert first == second
    assert (tmp_path / "secrets.key").stat().st_mode & 0o777 == 0o600


def test_configured_keyrings_are_checked(tmp_path: Path) -> None:
    """A malformed ULTRALIGHT_SECRET_KEYS is a clear error that never shows the key."""
    short = base64.b64encode(b"too short").decode()

    with pytest.raises(SecretError, match="must be 32 bytes") as caught:
        keys_in(tmp_path, f"k1:{short}")
    with pytest.raises(SecretError, match="id:base64key"):
        keys_in(tmp_path, "no-colon-here")

    assert short not in str(caught.value)


def test_old_keys_still_open_records(tmp_path: Path) -> None:
    """With a new key first, records made under the old one still open."""
    old = new_key_entry()
    key_id, blob = encrypt(keys_in(tmp_path, old), b"ctx", "kept")
    rotated = keys_in(tmp_path, f"{new_key_entry()},{old}")

    assert rotated.keyring.current_id != key_id
    assert decrypt(rotated, b"ctx", key_id, blob) == "kept"


def test_a_sealed_job_opens_only_for_its_call() -> None:
    """A sealed payload is bound to its call, app and caller, and needs the farm key."""
    keyring = Keyring.parse(new_key_entry(), "test")
    payload = SealedPayload(env={"A": "1"}, secrets={"S": "2"}, byok={"openai": "sk"})
    sealed = seal(keyring, payload, job_aad("call-1", "app_1", "usr_1"))

    assert open_sealed(keyring, sealed, job_aad("call-1", "app_1", "usr_1")) == payload
    for aad in (job_aad("call-2", "app_1", "usr_1"), job_aad("call-1", "app_1", None)):
        with pytest.raises(SealingError, match="belongs to another call"):
            open_sealed(keyring, sealed, aad)
    with pytest.raises(SealingError, match="does not have"):
        open_sealed(Keyring.parse(new_key_entry(), "other"), sealed, job_aad("call-1", "app_1",
                                                                           "usr_1"))
    assert payload.sandbox_env() == {"A": "1", "S": "2"}
