"""App env vars, per-user secrets and BYOK provider keys, encrypted at rest.

Each record is AES-256-GCM under a key derived with HKDF from the current keyring key and a random
salt stored beside the ciphertext; the record's identity (kind, owner, name) is the associated
data, so a ciphertext moved to another row does not open. Rows carry the id of the keyring key
they were made with, so ``rotate`` re-encrypts under a new key while every gateway can still read
both. Values are never logged, returned or put in an error message.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from config import Settings
from gateway import GatewayError
from gateway.caches import Invalidation, Invalidations, TtlCache
from gateway.registry import Registry, Tx
from workers.sealing import Keyring, SealingError, load_keyring, new_key_entry

log = structlog.get_logger(__name__)

MAX_ENV_VARS = 50
MAX_NAME_CHARS = 64
MAX_VALUE_BYTES = 4096
RESERVED_PREFIX = "ULTRALIGHT_"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PROVIDER = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
SALT_BYTES = 16
NONCE_BYTES = 12
HKDF_INFO = b"ultralight/secret/v1"
KEY_FILE = "secrets.key"
SECRET_KEYS = "ULTRALIGHT_SECRET_KEYS"
TABLES = {
    "app_env": ("env", ("app_id", "name")),
    "user_secrets": ("secret", ("user_id", "app_id", "name")),
    "byok_keys": ("byok", ("user_id", "provider")),
}


class SecretError(GatewayError):
    """A secret cannot be stored or read; never carries a secret value."""


# Rules on names and values.

def check_env_name(name: str) -> str:
    if not ENV_NAME.match(name) or len(name) > MAX_NAME_CHARS:
        raise SecretError(f"{name[:80]!r} is not a valid variable name: use up to "
                          f"{MAX_NAME_CHARS} letters, digits and '_', not starting with a digit")
    if name.upper().startswith(RESERVED_PREFIX):
        raise SecretError(f"names starting with {RESERVED_PREFIX} are reserved for the platform")
    return name


def check_value(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise SecretError(f"the value of {what} must be a string")
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise SecretError(f"the value of {what} is longer than {MAX_VALUE_BYTES} bytes")
    return value


def check_provider(name: str) -> str:
    if not PROVIDER.match(name):
        raise SecretError(f"{name[:80]!r} is not a provider name: use up to 32 lowercase "
                          "letters, digits, '-' or '_' (e.g. openai, anthropic)")
    return name


@dataclasses.dataclass(frozen=True)
class Declared:
    """An env var an app's manifest declares."""

    name: str
    per_user: bool
    required: bool
    description: str


def declared(manifest: dict[str, Any]) -> dict[str, Declared]:
    env = manifest.get("env") or {}
    return {name: Declared(name, spec.get("scope") == "per_user", bool(spec.get("required")),
                           str(spec.get("description") or ""))
            for name, spec in env.items() if isinstance(spec, dict)}


# Encryption at rest.

class SecretKeys:
    """The keyring for records at rest; a generated local keyring is re-read when a record names
    a key it does not have yet (``keys rotate`` run by another process)."""

    def __init__(self, settings: Settings) -> None:
        self.configured = bool(settings.secret_keys.strip())
        self.path = settings.data_dir / KEY_FILE
        self._settings = settings
        self.keyring = self._load()

    def _load(self) -> Keyring:
        try:
            return load_keyring(self._settings.secret_keys, self._settings.data_dir, KEY_FILE,
                                SECRET_KEYS)
        except SealingError as exc:
            raise SecretError(str(exc)) from exc

    def find(self, key_id: str) -> bytes:
        if key_id not in self.keyring.ids and not self.configured:
            self.keyring = self._load()
        try:
            return self.keyring.key(key_id)
        except SealingError:
            raise SecretError(f"a secret was encrypted with the key {key_id!r}, which this "
                              f"process does not have; add it to {SECRET_KEYS}") from None

    def add_local_key(self) -> str:
        """Put a new key first in the generated local keyring; returns its id."""
        if self.configured:
            raise SecretError(f"the keys come from {SECRET_KEYS}: put a new key first there on "
                              "every process, then run the rotation")
        entry = new_key_entry("l")
        current = self.path.read_text().strip()
        _write_private(self.path, f"{entry},{current}\n")
        self.keyring = self._load()
        return entry.partition(":")[0]


def _write_private(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    temp.touch(mode=0o600)
    temp.write_text(text)
    temp.replace(path)


def _record_key(key: bytes, salt: bytes) -> AESGCM:
    return AESGCM(HKDF(hashes.SHA256(), 32, salt, HKDF_INFO).derive(key))


def encrypt(keys: SecretKeys, context: bytes, value: str) -> tuple[str, bytes]:
    key_id = keys.keyring.current_id
    salt, nonce = secrets.token_bytes(SALT_BYTES), secrets.token_bytes(NONCE_BYTES)
    sealed = _record_key(keys.find(key_id), salt).encrypt(nonce, value.encode(), context)
    return key_id, salt + nonce + sealed


def decrypt(keys: SecretKeys, context: bytes, key_id: str, blob: bytes) -> str:
    salt, nonce = blob[:SALT_BYTES], blob[SALT_BYTES:SALT_BYTES + NONCE_BYTES]
    try:
        plain = _record_key(keys.find(key_id), salt).decrypt(
            nonce, blob[SALT_BYTES + NONCE_BYTES:], context)
    except InvalidTag:
        raise SecretError("a stored secret does not open with its key: it was altered or "
                          "moved") from None
    return plain.decode()


def context(kind: str, *parts: str) -> bytes:
    return "\0".join((kind, *parts)).encode()


# Storage and the per-gateway cache of opened values.

Row = tuple[str, bytes, str]  # name, blob, key id


class Secrets:
    """Reads and writes the three kinds of secret; caches opened values per gateway, dropped on
    any ``secrets`` invalidation."""

    def __init__(self, registry: Registry, keys: SecretKeys, bus: Invalidations | None,
                 ttl_s: float) -> None:
        self.registry = registry
        self.keys = keys
        self.bus = bus
        self._cache: TtlCache[tuple[str, ...], dict[str, str]] = TtlCache(ttl_s, bus)
        if bus is not None:
            bus.listen(self._invalidate)

    def _invalidate(self, event: Invalidation | None) -> None:
        if event is None or event.kind == "secrets":
            self._cache.clear()

    async def _changed(self, scope: str) -> None:
        if self.bus is not None:
            await self.bus.publish("secrets", scope)
        else:
            self._cache.clear()

    # App env vars.

    async def set_env(self, app_id: str, name: str, value: str) -> None:
        check_env_name(name)
        check_value(value, name)
        key_id, blob = encrypt(self.keys, context("env", app_id, name), value)

        def op(tx: Tx) -> None:
            exists = tx.execute("SELECT 1 FROM app_env WHERE app_id = ? AND name = ?",
                                  (app_id, name)).fetchone()
            count = tx.execute("SELECT count(*) FROM app_env WHERE app_id = ?",
                                 (app_id,)).fetchone()[0]
            if not exists and count >= MAX_ENV_VARS:
                raise SecretError(f"an app may have at most {MAX_ENV_VARS} env vars")
            _upsert(tx, "app_env", {"app_id": app_id, "name": name}, key_id, blob)

        await self.registry.run(op)
        await self._changed(app_id)

    async def unset_env(self, app_id: str, name: str) -> bool:
        removed = await self._delete("app_env", {"app_id": app_id, "name": name})
        await self._changed(app_id)
        return removed

    async def env_names(self, app_id: str) -> list[dict[str, Any]]:
        return await self._names("app_env", {"app_id": app_id}, "name")

    async def env_values(self, app_id: str) -> dict[str, str]:
        return await self._values(("env", app_id), "app_env", {"app_id": app_id}, "name",
                                  lambda name: context("env", app_id, name))

    # Per-user secrets, as an app declares them.

    async def set_user_secret(self, user_id: str, app_id: str, name: str, value: str) -> None:
        check_value(value, name)
        key_id, blob = encrypt(self.keys, context("secret", user_id, app_id, name), value)
        await self.registry.run(lambda tx: _upsert(
            tx, "user_secrets", {"user_id": user_id, "app_id": app_id, "name": name},
            key_id, blob))
        await self._changed(user_id)

    async def unset_user_secret(self, user_id: str, app_id: str, name: str) -> bool:
        removed = await self._delete("user_secrets",
                                     {"user_id": user_id, "app_id": app_id, "name": name})
        await self._changed(user_id)
        return removed

    async def user_secret_names(self, user_id: str, app_id: str) -> list[dict[str, Any]]:
        return await self._names("user_secrets", {"user_id": user_id, "app_id": app_id}, "name")

    async def user_secret_values(self, user_id: str, app_id: str) -> dict[str, str]:
        return await self._values(
            ("secret", user_id, app_id), "user_secrets", {"user_id": user_id, "app_id": app_id},
            "name", lambda name: context("secret", user_id, app_id, name))

    # BYOK provider keys.

    async def set_byok(self, user_id: str, provider: str, value: str) -> None:
        check_provider(provider)
        check_value(value, f"the {provider} key")
        key_id, blob = encrypt(self.keys, context("byok", user_id, provider), value)
        await self.registry.run(lambda tx: _upsert(
            tx, "byok_keys", {"user_id": user_id, "provider": provider}, key_id, blob))
        await self._changed(user_id)

    async def unset_byok(self, user_id: str, provider: str) -> bool:
        removed = await self._delete("byok_keys", {"user_id": user_id, "provider": provider})
        await self._changed(user_id)
        return removed

    async def byok_names(self, user_id: str) -> list[dict[str, Any]]:
        return await self._names("byok_keys", {"user_id": user_id}, "provider")

    async def byok_values(self, user_id: str) -> dict[str, str]:
        return await self._values(("byok", user_id), "byok_keys", {"user_id": user_id},
                                  "provider", lambda name: context("byok", user_id, name))

    # Shared plumbing.

    async def _delete(self, table: str, where: dict[str, str]) -> bool:
        clause = " AND ".join(f"{column} = ?" for column in where)
        removed = await self.registry.run(lambda tx: tx.execute(
            f"DELETE FROM {table} WHERE {clause}", tuple(where.values())).rowcount)
        return bool(removed)

    async def _names(self, table: str, where: dict[str, str], column: str
                     ) -> list[dict[str, Any]]:
        clause = " AND ".join(f"{c} = ?" for c in where)

        def op(tx: Tx) -> list[dict[str, Any]]:
            rows = tx.execute(f"SELECT {column}, updated_at FROM {table} WHERE {clause}"
                                f" ORDER BY {column}", tuple(where.values()))
            return [{"name": r[0], "updated_at": r[1]} for r in rows]

        return await self.registry.run(op)

    async def _values(self, cache_key: tuple[str, ...], table: str, where: dict[str, str],
                      column: str, context_of: Callable[[str], bytes]) -> dict[str, str]:
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        generation = self._cache.generation
        clause = " AND ".join(f"{c} = ?" for c in where)

        def op(tx: Tx) -> list[Row]:
            return list(tx.execute(f"SELECT {column}, sealed, key_id FROM {table}"
                                     f" WHERE {clause}", tuple(where.values())))

        rows = await self.registry.run(op)
        values = {name: decrypt(self.keys, context_of(name), key_id, blob)
                  for name, blob, key_id in rows}
        self._cache.put(cache_key, values, generation)
        return values


def _upsert(tx: Tx, table: str, key: dict[str, str], key_id: str,
            blob: bytes) -> None:
    columns = [*key, "key_id", "sealed", "updated_at"]
    conflict = ", ".join(key)
    tx.execute(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        f" ON CONFLICT ({conflict}) DO UPDATE SET key_id = excluded.key_id,"
        " sealed = excluded.sealed, updated_at = excluded.updated_at",
        (*key.values(), key_id, blob, time.time()))


# Rotation.

@dataclasses.dataclass
class Rotation:
    key_id: str
    rewritten: int = 0
    total: int = 0


async def rotate(registry: Registry, keys: SecretKeys, batch: int = 200) -> Rotation:
    """Re-encrypt every record not under the current key. Each row is swapped only if unchanged
    since it was read, so a value written meanwhile is never undone."""
    report = Rotation(keys.keyring.current_id)
    for table, (kind, key_columns) in TABLES.items():
        while True:
            rows = await registry.run(_stale_rows(table, key_columns, report.key_id, batch))
            swapped = 0
            for *key_values, key_id, blob in rows:
                ctx = context(kind, *key_values)
                new_id, new_blob = encrypt(keys, ctx, decrypt(keys, ctx, key_id, blob))
                swapped += await registry.run(
                    _swap(table, key_columns, key_values, blob, new_id, new_blob))
            report.rewritten += swapped
            if not swapped:
                break
        report.total += await registry.run(_count(table))
    log.info("secrets_rotated", key_id=report.key_id, rewritten=report.rewritten,
             total=report.total)
    return report


def _count(table: str) -> Callable[[Tx], int]:
    return lambda tx: int(tx.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _stale_rows(table: str, key_columns: tuple[str, ...], current: str, batch: int
                ) -> Callable[[Tx], list[tuple[Any, ...]]]:
    def op(tx: Tx) -> list[tuple[Any, ...]]:
        return list(tx.execute(f"SELECT {', '.join(key_columns)}, key_id, sealed FROM {table}"
                                 f" WHERE key_id != ? LIMIT ?", (current, batch)))

    return op


def _swap(table: str, key_columns: tuple[str, ...], key_values: list[str], old_blob: bytes,
          key_id: str, blob: bytes) -> Callable[[Tx], int]:
    where = " AND ".join(f"{c} = ?" for c in key_columns)

    def op(tx: Tx) -> int:
        cursor = tx.execute(f"UPDATE {table} SET key_id = ?, sealed = ? WHERE {where}"
                              " AND sealed = ?", (key_id, blob, *key_values, old_blob))
        return int(cursor.rowcount)

    return op
